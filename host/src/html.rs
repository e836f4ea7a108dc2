//! The host's page frame and small HTML helpers.

use actix_web::HttpResponse;
use crm_sdk::{Chrome, CurrentUser, MenuItem};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none}header .brand{font-weight:600;margin-right:1rem}
header .me{margin-left:auto;display:flex;gap:.8rem;align-items:center}
main{max-width:960px;margin:1.5rem auto;padding:0 1rem}
section.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:1rem 1.2rem;margin-bottom:1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:0}
label{display:block;font-weight:600;margin-top:.8rem}
input[type=text],input[type=email],input[type=password],input[type=date],input[type=number],input:not([type]),select,textarea{width:100%;box-sizing:border-box;padding:.4rem;border:1px solid #d0d7de;border-radius:4px;font:inherit}
textarea{min-height:6rem}
.help{color:#57606a;font-size:.85rem;margin:.2rem 0}
.error{color:#cf222e;font-size:.9rem}
button,.button{background:#1f883d;color:#fff;border:0;border-radius:4px;padding:.45rem .9rem;font:inherit;cursor:pointer;text-decoration:none;display:inline-block}
button.secondary,.button.secondary{background:#6e7781}button.danger,.button.danger{background:#cf222e}
.flash{padding:.7rem 1rem;border-radius:6px;margin-bottom:1rem}
.flash.ok{background:#dafbe1;border:1px solid #4ac26b}.flash.bad{background:#ffebe9;border:1px solid #ff8182}
.flash.warn{background:#fff8c5;border:1px solid #d4a72c}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:1rem;font-size:.85rem;font-weight:600}
.badge.ok{background:#dafbe1;color:#116329}.badge.bad{background:#ffebe9;color:#a40e26}.badge.muted{background:#eaeef2;color:#57606a}.badge.warn{background:#fff8c5;color:#7d4e00}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.4rem;border-bottom:1px solid #d0d7de;vertical-align:top}
code,.copy{background:#eaeef2;padding:.1rem .3rem;border-radius:3px;word-break:break-all}
form.inline{display:inline}
section.card.narrow{max-width:420px;margin:3rem auto}
.badge.unread{background:#cf222e;color:#fff;margin-left:.2rem}
section.card.unread{border-left:4px solid #d4a72c}section.card.resolved{opacity:.85}
:focus-visible{outline:3px solid #0969da;outline-offset:2px}
.scroll{overflow-x:auto;max-width:100%}
details.setup-guide{margin:.6rem 0 1rem}details.setup-guide summary{cursor:pointer}
ol.steps li{margin:.5rem 0}.copy-row{display:flex;gap:.5rem;align-items:center;flex-wrap:wrap}
.consequences li{margin:.3rem 0}
main p,main li,main dd,main h1,main h2{overflow-wrap:anywhere}
@media (max-width:640px){
main{margin:1rem auto;padding:0 .6rem}
header{padding:.5rem .6rem;gap:.6rem}header .me{margin-left:0}
section.card{padding:.8rem}
table{display:block;overflow-x:auto;max-width:100%}th,td{min-width:6.5rem}
td,code{overflow-wrap:anywhere}
table.history{display:table}table.history th,table.history td{min-width:0}
table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;min-width:0}table.cards thead{display:none}
table.cards tr{border-bottom:2px solid #d0d7de;padding:.4rem 0}table.cards td{border:0;padding:.1rem .2rem}
table.cards td[data-label]::before{content:attr(data-label) ": ";font-weight:600;color:#57606a}table.cards td.title{font-weight:600}
table.cards td[data-label]:empty{display:none}
}
form.filters{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));gap:0 .8rem}
form.filters .wide{grid-column:1/-1}form.filters p{grid-column:1/-1;margin:.8rem 0 0}
table.outbox td,table.outbox th{font-size:.9rem}table.fields th{width:9rem}
table.history td,table.history th{font-size:.9rem;vertical-align:top}table.history td.reply{overflow-wrap:anywhere}
div.status form.inline{display:block;margin-top:.5rem}
details.resolved-list{margin-top:1rem}details.resolved-list>summary{cursor:pointer;font-weight:600;margin:.5rem 0}
"#;

/// Where the stylesheet is served (a file, not inline: the Content-Security-Policy allows only
/// this site's own styles).
pub const STYLESHEET_PATH: &str = "/assets/crm.css";

/// The icon every page names (and browsers ask for at this address anyway).
pub const ICON_PATH: &str = "/favicon.ico";

/// A small envelope, in SVG.
const ICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#1f5fbf"/><path d="M3 5h10v7H3zM3 5l5 4 5-4" fill="none" stroke="#fff" stroke-width="1.4"/></svg>"##;

/// The icon of every page.
pub async fn icon() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header(("Cache-Control", "public, max-age=86400"))
        .body(ICON)
}

/// The stylesheet of every page.
pub async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header(("Cache-Control", "public, max-age=3600"))
        .body(STYLE)
}

/// The menu entries of one module, shown while it is enabled.
pub struct ModuleMenu {
    /// Whether the module is enabled now.
    pub enabled: Arc<AtomicBool>,
    /// Its entries.
    pub items: Vec<MenuItem>,
}

/// The host's frame, shared by its own pages and module pages.
pub struct HostChrome {
    menus: Vec<ModuleMenu>,
}

impl HostChrome {
    /// A frame that shows these module menus.
    pub fn new(menus: Vec<ModuleMenu>) -> Self {
        Self { menus }
    }

    /// The full page as markup.
    pub fn render(&self, title: &str, user: Option<&CurrentUser>, body: Markup) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · CRM" }
                    link rel="stylesheet" href=(STYLESHEET_PATH);
                    link rel="icon" type="image/svg+xml" href=(ICON_PATH);
                }
                body {
                    header {
                        a.brand href="/" { "CRM" }
                        @if let Some(user) = user {
                            a href="/contacts" { "Contacts" }
                            @for menu in &self.menus {
                                @if menu.enabled.load(Ordering::Relaxed) {
                                    @for item in &menu.items {
                                        @if !item.operators_only || user.is_admin {
                                            a href=(item.path) { (item.label) }
                                        }
                                    }
                                }
                            }
                            @if user.is_admin {
                                a href="/settings" { "Settings" }
                                a href="/modules" { "Modules" }
                            }
                            @let unread = crate::inbox::current_unread();
                            a href="/notifications" {
                                "Notifications"
                                @if unread > 0 { " " span.badge.unread aria-label=(format!("{unread} unread")) { (unread) } }
                            }
                            span.me {
                                span { (user.name) @if user.is_admin { " (operator)" } }
                                form.inline method="post" action="/logout" {
                                    input type="hidden" name=(crm_sdk::CSRF_FIELD) value=(user.csrf_token);
                                    button.secondary type="submit" { "Sign out" }
                                }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
    }
}

impl Chrome for HostChrome {
    fn page(&self, title: &str, user: Option<&CurrentUser>, body: &str) -> String {
        self.render(title, user, PreEscaped(body.to_string()))
            .into_string()
    }
}

/// A 200 HTML response.
pub fn ok(markup: Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(markup.into_string())
}

/// The hidden CSRF field for a form.
pub fn csrf(user: &CurrentUser) -> Markup {
    html! { input type="hidden" name=(crm_sdk::CSRF_FIELD) value=(user.csrf_token); }
}

//! The operators' modules page: enable or disable a linked module at run time.

use actix_web::{HttpResponse, web};
use crm_sdk::CurrentUser;
use maud::{Markup, html};

use crate::auth::require_admin;
use crate::html::{csrf, ok};
use crate::state::AppState;

async fn render(state: &AppState, user: &CurrentUser, flash: Option<Markup>) -> Markup {
    let mut rows = Vec::new();
    for entry in state.registry.entries() {
        let m = entry.module.manifest();
        let jobs = entry.running_jobs().await;
        rows.push(html! {
            section.card id=(format!("module-{}", m.id)) {
                h2 { (m.name) " " span.badge.muted { "v" (m.version) }
                    " " @if entry.is_enabled() { span.badge.ok.status { "enabled" } } @else { span.badge.muted.status { "disabled" } } }
                p { (m.description) }
                p.help { "Id " code { (m.id) } " · routes under " code { (m.route_prefix) } " · tables: " (m.tables.join(", ")) }
                p.help { "Migrations: " (entry.module.migration_names().join(", ")) }
                p.help.jobs { "Jobs: "
                    @if jobs.is_empty() { "stopped" } @else { "running — " (jobs.join(", ")) } }
                @if entry.is_enabled() {
                    p {
                        a.button.danger href=(format!("/modules/{}/disable", m.id)) { "Disable" }
                        span.help { " Asks first and says what happens to its queued work; its data is kept." }
                    }
                } @else {
                    form method="post" action=(format!("/modules/{}/enable", m.id)) {
                        (csrf(user))
                        button type="submit" { "Enable" }
                        span.help { " Runs its migrations and starts its jobs." }
                    }
                }
            }
        });
    }
    html! {
        h1 { "Modules" }
        @if let Some(flash) = flash { (flash) }
        @for r in rows { (r) }
    }
}

async fn page(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    let body = render(&state, &user, None).await;
    ok(state.chrome.render("Modules", Some(&user), body))
}

async fn change(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    let (id, action) = path.into_inner();
    let result = match action.as_str() {
        "enable" => state.registry.enable(&id).await,
        "disable" => state.registry.disable(&id).await,
        _ => return HttpResponse::NotFound().finish(),
    };
    let (status, flash) = match result {
        Ok(()) => (
            actix_web::http::StatusCode::OK,
            html! { p.flash.ok role="status" { "Module " code { (id) } " " (action) "d." } },
        ),
        Err(e) => {
            tracing::error!(module = %id, error = %e, "changing a module failed");
            (
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                html! { p.flash.bad role="alert" { "Could not " (action) " " code { (id) } ": " (e) } },
            )
        }
    };
    let body = render(&state, &user, Some(flash)).await;
    let mut response = ok(state.chrome.render("Modules", Some(&user), body));
    *response.status_mut() = status;
    response
}

/// Disabling asks first: what stops and what happens to the module's queued work.
async fn confirm_disable(
    state: web::Data<AppState>,
    user: CurrentUser,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    let (id, action) = path.into_inner();
    let Some(entry) = state.registry.get(&id).filter(|_| action == "disable") else {
        return HttpResponse::NotFound().body("No such module.");
    };
    if !entry.is_enabled() {
        return HttpResponse::SeeOther()
            .insert_header(("Location", "/modules"))
            .finish();
    }
    let m = entry.module.manifest();
    let consequences = entry.module.disable_consequences(&entry.ctx).await;
    let body = html! {
        h1 { "Disable " (m.name) "?" }
        section.card.confirm {
            p { strong { "What will happen:" } }
            ul.consequences {
                @for c in &consequences { li { (c) } }
                li { "Operators can enable it again on this page at any time; its migrations are kept." }
            }
            form method="post" action=(format!("/modules/{}/disable", m.id)) {
                (csrf(&user))
                button.danger type="submit" { "Disable " (m.name) }
                " " a.button.secondary href="/modules" { "Cancel" }
            }
        }
    };
    ok(state.chrome.render("Disable a module", Some(&user), body))
}

/// The modules routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/modules", web::get().to(page))
        .route("/modules/{id}/{action}", web::get().to(confirm_disable))
        .route("/modules/{id}/{action}", web::post().to(change));
}

//! The module's pages: shared servers (operators), a user's own mailbox, and a server's page
//! with its connection status.

use actix_web::{HttpResponse, web};
use crm_sdk::{CurrentUser, FieldError, ModuleContext};
use maud::{Markup, html};
use sea_orm::EntityTrait;
use serde::Deserialize;

use crate::delivery::classify::HoldReason;
use crate::delivery::health::Health;
use crate::entities::{mail_server, token};
use crate::settings::{OutlookSettings, PersonalSmtpHosts};
use crate::web::layout::{csrf, db_down, managed_server, page, page_with};
use crate::web::server_form::{cloud_smtp_host, server_form};
use crate::web::servers::{self, OutboundRules, ServerForm, ServerInput, ServerKind, server_url};
use crate::web::status_block::status_block;

/// The refusal of an operator's page to a user: `what` they cannot do, and where their own
/// mailbox is.
fn forbidden(ctx: &ModuleContext, user: &CurrentUser, what: &str) -> HttpResponse {
    page_with(
        actix_web::http::StatusCode::FORBIDDEN,
        ctx,
        user,
        "Not yours",
        html! {
            h1 { (what) }
            p { "Shared mail servers are managed by operators; a personal mailbox only by its owner." }
            p { a href="/microsoft_outlook/my-mailbox" { "Go to My mailbox" } }
        },
    )
}

const NOT_SERVERS: &str = "You cannot manage mail servers";

/// The first sentence of `text` (up to and with its first ". ").
fn first_sentence(text: &str) -> &str {
    match text.find(". ") {
        Some(at) => &text[..=at],
        None => text,
    }
}

#[derive(Deserialize)]
struct Flash {
    connected: Option<String>,
    disconnected: Option<String>,
    saved: Option<String>,
    released: Option<String>,
}

async fn server_page_body(
    ctx: &ModuleContext,
    user: &CurrentUser,
    server: &mail_server::Model,
    form: &ServerForm,
    errors: &[FieldError],
    flash: Option<Markup>,
) -> Markup {
    let token = token::Entity::find_by_id(server.id)
        .one(ctx.db())
        .await
        .ok()
        .flatten();
    let health = crate::delivery::health::get(ctx, server.id)
        .await
        .unwrap_or(Health::Ready);
    let waiting = crate::delivery::health::waiting_counts(ctx)
        .await
        .ok()
        .and_then(|w| w.get(&server.id).copied())
        .unwrap_or(0);
    let configured = OutlookSettings::load(ctx).await;
    // A personal mailbox the operator's list no longer allows: said here, not only when a
    // mail is refused.
    let not_allowed = crate::outbox::queue::outbound_refusal(ctx, server, user).await;
    let kind = if server.kind == "shared" {
        ServerKind::Shared
    } else {
        ServerKind::Personal
    };
    html! {
        h1 { (server.name) }
        @if let Some(flash) = flash { (flash) }
        section.card id="connection" {
            h2 { "Connection" }
            (status_block(server, token.as_ref(), &health, waiting, user))
            @if let Some(why) = &not_allowed {
                p.flash.bad role="alert" { (why) " Until then no mail can be sent from it." }
            }
            @match &configured {
                Err(problem) => {
                    p.flash.warn { (problem.to_string()) @if user.is_admin { " " a href="/settings" { "Open settings" } } }
                }
                Ok(_) if server.auth == "app_only" => {
                    p.help { "App-only servers need no sign-in: the module uses the client-credentials grant. An Exchange administrator must have registered the app's service principal in Exchange Online (New-ServicePrincipal) and granted it SendAs / FullAccess on " (server.mailbox) "." }
                }
                Ok(_) if health.reason().is_some_and(|r| matches!(r, HoldReason::ClientCredentials | HoldReason::WrongCloud)) => {
                    // A sign-in would meet the same refusal: the CRM's settings come first.
                    p.help {
                        "Connect is possible again once Microsoft accepts the CRM's own settings: "
                        @if user.is_admin { a href="/settings" { "correct them in Settings" } "." }
                        @else { "the CRM's operators have been told and must correct them; nothing is needed from you." }
                    }
                }
                Ok(_) => {
                    form.inline method="post" action="/microsoft_outlook/connect" {
                        (csrf(user))
                        input type="hidden" name="server" value=(server.id);
                        button type="submit" { @if token.is_some() { "Reconnect" } @else { "Connect" } }
                    }
                }
            }
            @if token.is_some() {
                " " a.button.secondary href=(format!("{}/disconnect", server_url(server))) { "Disconnect" }
            }
        }
        (crate::web::test_connection::section(server, user))
        section.card {
            h2 { "Server" }
            (server_form(user, &server_url(server), form, kind, errors))
        }
        @if kind == ServerKind::Shared {
            section.card {
                a.button.danger href=(format!("{}/delete", server_url(server))) { "Delete this server" }
                span.help { " Asks first, and says what happens to its queued mail." }
            }
        }
    }
}

/// The flash of the list pages after a deletion.
#[derive(Deserialize)]
struct Deleted {
    deleted: Option<String>,
}

fn deleted_flash(query: &Deleted) -> Option<Markup> {
    query.deleted.as_ref().map(
        |_| html! { p.flash.ok role="status" { "Deleted: the mail server and its tokens are gone." } },
    )
}

async fn list(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    query: web::Query<Deleted>,
) -> HttpResponse {
    if !user.is_admin {
        return forbidden(&ctx, &user, NOT_SERVERS);
    }
    let servers = servers::shared(ctx.db()).await.unwrap_or_default();
    let healths = crate::delivery::health::all(&ctx).await.unwrap_or_default();
    let waiting = crate::delivery::health::waiting_counts(&ctx)
        .await
        .unwrap_or_default();
    let tokens: std::collections::HashMap<i32, token::Model> = token::Entity::find()
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.server_id, t))
        .collect();
    let now = ctx.clock().now();
    let when = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let mut rows = Vec::new();
    for s in &servers {
        let token = tokens.get(&s.id);
        let health = Health::of(healths.get(&s.id), now);
        rows.push(html! {
            tr {
                td.title { a href=(server_url(s)) { (s.name) } @if s.is_default { " " span.badge.muted { "default" } } }
                td data-label="Mailbox" { (s.mailbox) }
                td data-label="Sends through" { @if s.transport == "graph" { "Microsoft Graph" } @else { (s.smtp_host) ":" (s.smtp_port) } }
                td.health data-label="Health" { @match (&health, token) {
                    (Health::Held { since, .. }, _) => {
                        span.badge.bad { (health.label()) }
                        br; span.help { "since " (when(*since)) }
                    }
                    (Health::Throttled { .. }, _) => span.badge.warn { (health.label()) },
                    (Health::Ready, None) if s.auth == "app_only" => span.badge.ok { "App-only" },
                    (Health::Ready, None) => span.badge.muted { "Not connected" },
                    (Health::Ready, Some(t)) if t.status == "valid" => span.badge.ok { "Outlook token validated" },
                    (Health::Ready, Some(_)) => span.badge.bad { "Needs reconnect" },
                } }
                td data-label="Waiting" { (waiting.get(&s.id).copied().unwrap_or(0)) }
                td data-label="Last refresh" { (token.and_then(|t| t.last_refresh_at).map(when).unwrap_or_else(|| "-".into())) }
                td.help data-label="Last error" { @match (&health, token.and_then(|t| t.last_error.as_deref())) {
                    // The first sentence here; the whole text on the server's page.
                    (Health::Held { detail, .. }, _) => (first_sentence(detail)),
                    (_, Some(e)) => (first_sentence(e)),
                    _ => "-",
                } }
            }
        });
    }
    let configured = OutlookSettings::load(&ctx).await;
    let body = html! {
        h1 { "Outgoing mail servers" }
        @if let Some(flash) = deleted_flash(&query) { (flash) }
        @if let Err(problem) = &configured {
            p.flash.warn { (problem.to_string()) " " a href="/settings" { "Open settings" } }
        }
        section.card {
            @if servers.is_empty() {
                p { "No shared server yet. Add the Office 365 mailbox the CRM sends from." }
            } @else {
                // `data-label`: a phone shows each server as a card, each field named.
                div.scroll { table.servers.cards {
                    thead { tr { th { "Name" } th { "Mailbox" } th { "Sends through" } th { "Health" } th { "Waiting" } th { "Last refresh" } th { "Last error" } } }
                    tbody { @for r in rows { (r) } }
                } }
            }
            p { a.button href="/microsoft_outlook/servers/new" { "Add a server" } }
        }
    };
    page(&ctx, &user, "Outgoing mail servers", body)
}

async fn new_page(ctx: web::Data<ModuleContext>, user: CurrentUser) -> HttpResponse {
    if !user.is_admin {
        return forbidden(&ctx, &user, NOT_SERVERS);
    }
    let mut form = ServerForm::new_defaults(ServerKind::Shared, &user);
    form.smtp_host = cloud_smtp_host(&ctx).await;
    let body = html! {
        h1 { "New outgoing mail server" }
        section.card { (server_form(&user, "/microsoft_outlook/servers", &form, ServerKind::Shared, &[])) }
    };
    page(&ctx, &user, "New mail server", body)
}

async fn create(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    form: web::Form<ServerForm>,
) -> HttpResponse {
    if !user.is_admin {
        return forbidden(&ctx, &user, NOT_SERVERS);
    }
    match ServerInput::parse(&form, ServerKind::Shared) {
        Err(errors) => {
            let body = html! {
                h1 { "New outgoing mail server" }
                section.card { (server_form(&user, "/microsoft_outlook/servers", &form, ServerKind::Shared, &errors)) }
            };
            page_with(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                &ctx,
                &user,
                "New mail server",
                body,
            )
        }
        Ok(input) => match servers::save(ctx.db(), None, input, ServerKind::Shared, None).await {
            Ok(server) => {
                tracing::info!(
                    server_id = server.id,
                    user_id = user.id,
                    "mail server created"
                );
                see_other(&format!("{}?saved=1", server_url(&server)))
            }
            Err(e) => db_down(&ctx, &user, e),
        },
    }
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .finish()
}

async fn show(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    id: web::Path<i32>,
    flash: web::Query<Flash>,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    let flash = if flash.connected.as_deref() == Some("graph") {
        Some(
            html! { p.flash.ok role="status" { "Switched: this server now sends through Microsoft Graph; the token for Graph was validated and stored." } },
        )
    } else if flash.connected.is_some() {
        Some(
            html! { p.flash.ok role="status" { "Connected: the Outlook token was validated and stored." } },
        )
    } else if flash.disconnected.is_some() {
        Some(
            html! { p.flash.ok role="status" { "Disconnected: the tokens of this server were forgotten." } },
        )
    } else if flash.released.is_some() {
        Some(html! { p.flash.ok role="status" { (crate::web::outbox_page::RELEASED_FLASH) } })
    } else if flash.saved.is_some() {
        Some(html! { p.flash.ok role="status" { "Saved." } })
    } else {
        None
    };
    let form = ServerForm::from_model(&server);
    let body = server_page_body(&ctx, &user, &server, &form, &[], flash).await;
    page(&ctx, &user, &server.name, body)
}

async fn update(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<crate::runtime::Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
    form: web::Form<ServerForm>,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    let kind = if server.kind == "shared" {
        ServerKind::Shared
    } else {
        ServerKind::Personal
    };
    let hosts = PersonalSmtpHosts::load(&ctx).await;
    let rules = OutboundRules {
        operator: user.is_admin,
        personal_hosts: &hosts,
    };
    match ServerInput::parse_with(&form, kind, &rules) {
        Err(errors) => {
            let body = server_page_body(&ctx, &user, &server, &form, &errors, None).await;
            page_with(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                &ctx,
                &user,
                &server.name,
                body,
            )
        }
        Ok(input) => {
            let owner = server.owner_user_id;
            let transport_before = server.transport.clone();
            match servers::save(ctx.db(), Some(server), input, kind, owner).await {
                Ok(saved) => {
                    shared.server_changed(saved.id);
                    if saved.transport != transport_before {
                        let shared = shared.clone().into_inner();
                        let _ = servers::transport_switched(&ctx, &shared, saved.id, &user).await;
                    }
                    see_other(&format!("{}?saved=1", server_url(&saved)))
                }
                Err(e) => db_down(&ctx, &user, e),
            }
        }
    }
}

async fn delete(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<crate::runtime::Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    let _ = token::Entity::delete_by_id(server.id).exec(ctx.db()).await;
    shared.server_changed(server.id);
    let deleted = mail_server::Entity::delete_by_id(server.id)
        .exec(ctx.db())
        .await;
    if deleted.is_ok() {
        // Its waiting mails are not held any more: they fail as "server deleted", in words.
        let shared = shared.clone().into_inner();
        let released = crate::delivery::release::release(
            &ctx,
            &shared,
            server.id,
            (None, crate::delivery::release::Release::Forced),
            crate::outbox::history::Ended::ServerDeleted,
        )
        .await;
        if let Err(e) = released.and(crate::delivery::health::forget(&ctx, server.id).await) {
            tracing::warn!(error = %e, "forgetting a deleted server's health failed");
        }
    }
    match deleted {
        Ok(_) => {
            tracing::info!(
                server_id = server.id,
                user_id = user.id,
                "mail server deleted"
            );
            see_other(if server.kind == "shared" {
                "/microsoft_outlook/servers?deleted=1"
            } else {
                "/microsoft_outlook/my-mailbox?deleted=1"
            })
        }
        Err(e) => db_down(&ctx, &user, e),
    }
}

async fn retry(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<crate::runtime::Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
) -> HttpResponse {
    if !user.is_admin {
        return forbidden(&ctx, &user, "You cannot manage this mail server");
    }
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    shared.server_changed(server.id);
    match crate::delivery::release::release_by(&ctx, &shared.clone().into_inner(), server.id, &user)
        .await
    {
        Ok(Err(not)) => page_with(
            actix_web::http::StatusCode::CONFLICT,
            &ctx,
            &user,
            not.title(),
            html! {
                h1 { (not.title()) }
                p { (not.words(server.owner_user_id.is_some())) }
                p { a href=(server_url(&server)) { "Back to " (server.name) } }
            },
        ),
        Ok(Ok(_)) => {
            tracing::info!(
                server_id = server.id,
                user_id = user.id,
                "held mail released"
            );
            see_other(&format!("{}?released=1", server_url(&server)))
        }
        Err(e) => db_down(&ctx, &user, e),
    }
}

async fn disconnect(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<crate::runtime::Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    match token::Entity::delete_by_id(server.id).exec(ctx.db()).await {
        Ok(_) => {
            shared.server_changed(server.id);
            tracing::info!(
                server_id = server.id,
                user_id = user.id,
                "mail server disconnected"
            );
            see_other(&format!("{}?disconnected=1", server_url(&server)))
        }
        Err(e) => db_down(&ctx, &user, e),
    }
}

async fn my_mailbox(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    query: web::Query<Deleted>,
) -> HttpResponse {
    match servers::personal_of(ctx.db(), user.id).await {
        Ok(Some(server)) => see_other(&server_url(&server)),
        Ok(None) => {
            let mut form = ServerForm::new_defaults(ServerKind::Personal, &user);
            form.smtp_host = cloud_smtp_host(&ctx).await;
            if let Ok(shared) = servers::shared(ctx.db()).await {
                let hosts = PersonalSmtpHosts::load(&ctx).await;
                servers::personal_connection_defaults(&mut form, &shared, &hosts);
            }
            let body = html! {
                h1 { "My mailbox" }
                @if let Some(flash) = deleted_flash(&query) { (flash) }
                section.card {
                    p { "Connect your own Office 365 mailbox to send CRM mail from it. Without one, mail goes out through the shared server." }
                    (server_form(&user, "/microsoft_outlook/my-mailbox", &form, ServerKind::Personal, &[]))
                }
            };
            page(&ctx, &user, "My mailbox", body)
        }
        Err(e) => db_down(&ctx, &user, e),
    }
}

async fn create_mine(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    form: web::Form<ServerForm>,
) -> HttpResponse {
    if let Ok(Some(server)) = servers::personal_of(ctx.db(), user.id).await {
        return see_other(&server_url(&server));
    }
    let hosts = PersonalSmtpHosts::load(&ctx).await;
    let rules = OutboundRules {
        operator: user.is_admin,
        personal_hosts: &hosts,
    };
    match ServerInput::parse_with(&form, ServerKind::Personal, &rules) {
        Err(errors) => {
            let body = html! {
                h1 { "My mailbox" }
                section.card { (server_form(&user, "/microsoft_outlook/my-mailbox", &form, ServerKind::Personal, &errors)) }
            };
            page_with(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                &ctx,
                &user,
                "My mailbox",
                body,
            )
        }
        Ok(input) => {
            match servers::save(ctx.db(), None, input, ServerKind::Personal, Some(user.id)).await {
                Ok(server) => see_other(&format!("{}?saved=1", server_url(&server))),
                Err(e) => db_down(&ctx, &user, e),
            }
        }
    }
}

/// The page routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/servers", web::get().to(list))
        .route("/servers", web::post().to(create))
        .route("/servers/new", web::get().to(new_page))
        .route("/servers/{id}", web::get().to(show))
        .route("/servers/{id}", web::post().to(update))
        .route("/servers/{id}/delete", web::post().to(delete))
        .route("/servers/{id}/disconnect", web::post().to(disconnect))
        .route("/servers/{id}/retry", web::post().to(retry))
        .route("/my-mailbox", web::get().to(my_mailbox))
        .route("/my-mailbox", web::post().to(create_mine));
}

//! Careful actions: deleting a server and disconnecting a mailbox are asked first, on a page
//! that says what happens to the mail waiting for it (no script: a page and a POST button).

use actix_web::{HttpResponse, web};
use crm_sdk::{CurrentUser, ModuleContext};
use maud::{Markup, html};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use crate::entities::{mail_server, outbox, token};
use crate::web::layout::{csrf, page};
use crate::web::servers::may_manage;

/// Mails of `server_id` not yet sent or failed.
pub async fn queued_mails(ctx: &ModuleContext, server_id: i32) -> u64 {
    outbox::Entity::find()
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::unsent())
        .count(ctx.db())
        .await
        .unwrap_or(0)
}

async fn server_of(
    ctx: &ModuleContext,
    user: &CurrentUser,
    id: i32,
) -> Result<mail_server::Model, Box<HttpResponse>> {
    match mail_server::Entity::find_by_id(id).one(ctx.db()).await {
        Ok(Some(server)) if may_manage(user, &server) => Ok(server),
        // Not yours and not there answer alike.
        _ => Err(Box::new(crate::web::layout::not_found(ctx, user))),
    }
}

fn confirm_body(
    title: &str,
    server: &mail_server::Model,
    consequences: &[String],
    action: &str,
    button: &str,
    user: &CurrentUser,
) -> Markup {
    let back = format!("/microsoft_outlook/servers/{}", server.id);
    html! {
        h1 { (title) }
        section.card.confirm {
            p { "Mail server " strong { (server.name) } " (" (server.mailbox) ")." }
            p { strong { "What will happen:" } }
            ul.consequences { @for c in consequences { li { (c) } } }
            form method="post" action=(action) {
                (csrf(user))
                button.danger type="submit" { (button) }
                " " a.button.secondary href=(back) { "Cancel" }
            }
        }
    }
}

async fn delete_page(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    id: web::Path<i32>,
) -> HttpResponse {
    let server = match server_of(&ctx, &user, id.into_inner()).await {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let queued = queued_mails(&ctx, server.id).await;
    let mut consequences = vec![
        "The server and its Outlook tokens are deleted; this cannot be undone.".to_string(),
        if queued == 0 {
            "No mail is waiting for it.".to_string()
        } else {
            format!(
                "{queued} queued mail(s) of this server will fail (\"The mail server of this mail was deleted.\"); their authors and the operators are told."
            )
        },
    ];
    if server.is_default {
        consequences.push(
            "It is the default server: mail is sent through another shared server only once one is made the default.".into(),
        );
    }
    let body = confirm_body(
        &format!("Delete {}?", server.name),
        &server,
        &consequences,
        &format!("/microsoft_outlook/servers/{}/delete", server.id),
        "Delete this server",
        &user,
    );
    page(&ctx, &user, "Delete a mail server", body)
}

async fn disconnect_page(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    id: web::Path<i32>,
) -> HttpResponse {
    let server = match server_of(&ctx, &user, id.into_inner()).await {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let connected = token::Entity::find_by_id(server.id)
        .one(ctx.db())
        .await
        .ok()
        .flatten()
        .is_some();
    let queued = queued_mails(&ctx, server.id).await;
    let consequences = vec![
        if connected {
            format!(
                "The Outlook tokens of {} are forgotten: the CRM can no longer send from it until someone clicks Connect and signs in again.",
                server.mailbox
            )
        } else {
            "No Outlook token is stored: nothing changes.".to_string()
        },
        if queued == 0 {
            "No mail is waiting for it.".to_string()
        } else {
            format!(
                "{queued} queued mail(s) wait (the mailbox is held: not connected); they spend no attempt and go out in queue order after the next Connect."
            )
        },
    ];
    let body = confirm_body(
        &format!("Disconnect {}?", server.name),
        &server,
        &consequences,
        &format!("/microsoft_outlook/servers/{}/disconnect", server.id),
        "Disconnect",
        &user,
    );
    page(&ctx, &user, "Disconnect a mailbox", body)
}

/// The confirmation pages.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/servers/{id}/delete", web::get().to(delete_page))
        .route("/servers/{id}/disconnect", web::get().to(disconnect_page));
}

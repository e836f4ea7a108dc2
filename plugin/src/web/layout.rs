//! The frame every page of the module shares: a page in the host's layout, a page with
//! another status, the hidden CSRF field, and the 404 page of a mail server that is not there
//! or not the viewer's.

use actix_web::HttpResponse;
use crm_sdk::{CSRF_FIELD, CurrentUser, ModuleContext};
use maud::{Markup, html};
use sea_orm::EntityTrait;

use crate::entities::mail_server;
use crate::web::servers::may_manage;

/// A full page in the host's frame.
pub fn page(ctx: &ModuleContext, user: &CurrentUser, title: &str, body: Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(ctx.page(title, Some(user), &body.into_string()))
}

/// A page with another status (refusals, errors).
pub fn page_with(
    status: actix_web::http::StatusCode,
    ctx: &ModuleContext,
    user: &CurrentUser,
    title: &str,
    body: Markup,
) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(ctx.page(title, Some(user), &body.into_string()))
}

/// The hidden CSRF field.
pub fn csrf(user: &CurrentUser) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(user.csrf_token); }
}

/// Where `user` manages mail servers: the list for operators, their own mailbox for others.
pub(crate) fn servers_home(user: &CurrentUser) -> (&'static str, &'static str) {
    if user.is_admin {
        ("/microsoft_outlook/servers", "Back to mail servers")
    } else {
        ("/microsoft_outlook/my-mailbox", "Go to My mailbox")
    }
}

/// The 404 page of a mail server (the same for "not yours" and "not there"), with a link to
/// where `user` may go.
pub(crate) fn not_found(ctx: &ModuleContext, user: &CurrentUser) -> HttpResponse {
    let (href, words) = servers_home(user);
    page_with(
        actix_web::http::StatusCode::NOT_FOUND,
        ctx,
        user,
        "Not found",
        html! { h1 { "No such mail server" } p { a href=(href) { (words) } } },
    )
}

/// The 503 page of a database that did not answer (the error logged, not shown).
pub(crate) fn db_down(ctx: &ModuleContext, user: &CurrentUser, e: sea_orm::DbErr) -> HttpResponse {
    tracing::error!(error = %e, "mail server storage failed");
    page_with(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        ctx,
        user,
        "Try again",
        html! { h1 { "The database did not answer" } p { "Nothing was saved. Try again in a moment." } },
    )
}

/// The server `id` if `user` may manage it, else the 404 page (the same for "not yours" and
/// "not there"), or the 503 page when the database did not answer.
pub(crate) async fn managed_server(
    ctx: &ModuleContext,
    user: &CurrentUser,
    id: i32,
) -> Result<mail_server::Model, Box<HttpResponse>> {
    let found = match mail_server::Entity::find_by_id(id).one(ctx.db()).await {
        Ok(found) => found,
        Err(e) => return Err(Box::new(db_down(ctx, user, e))),
    };
    match found {
        Some(server) if may_manage(user, &server) => Ok(server),
        _ => Err(Box::new(not_found(ctx, user))),
    }
}

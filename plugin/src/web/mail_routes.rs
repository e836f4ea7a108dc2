//! Mails on records: `POST /records/{model}/{id}/mails` (form or JSON) and the record's list.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use crm_sdk::{CurrentUser, FieldError, ModuleContext, RecordAccess, RecordRef};
use maud::{Markup, html};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Deserialize;
use std::sync::Arc;

use crate::entities::outbox;
use crate::outbox::compose::{AddressInput, MailRequest};
use crate::outbox::queue::{Refusal, queue_mail};
use crate::runtime::Shared;
use crate::web::compose_box::{COMPOSE_SCRIPT, Typed, UploadLimits, compose_form, read_upload};
use crate::web::layout::page_with;
pub use crate::web::mail_words::{
    MailView, RecordMail, classified_reply, for_viewer, mailboxes, mails_table, queued_words,
    status_badge, status_words, via_words,
};

#[derive(Deserialize)]
struct MailForm {
    #[serde(default)]
    to: String,
    #[serde(default)]
    cc: String,
    #[serde(default)]
    bcc: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    text_body: String,
    #[serde(default)]
    html_body: String,
    #[serde(default)]
    markdown_body: Option<String>,
    #[serde(default)]
    reply_to: String,
}

impl From<MailForm> for MailRequest {
    fn from(f: MailForm) -> Self {
        MailRequest {
            to: AddressInput::One(f.to),
            cc: AddressInput::One(f.cc),
            bcc: AddressInput::One(f.bcc),
            subject: f.subject,
            text_body: f.text_body,
            html_body: Some(f.html_body).filter(|h| !h.trim().is_empty()),
            reply_to: Some(f.reply_to).filter(|r| !r.trim().is_empty()),
            markdown_body: f.markdown_body,
            ..MailRequest::default()
        }
    }
}

/// Whether the request asks for (or sends) JSON.
pub(crate) fn wants_json(req: &HttpRequest) -> bool {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    header("content-type").starts_with("application/json")
        || header("accept").starts_with("application/json")
}

/// A JSON refusal: `{"errors": [{"field", "message"}]}`.
pub(crate) fn json_refusal(status: StatusCode, errors: &[FieldError]) -> HttpResponse {
    let errors: Vec<serde_json::Value> = errors
        .iter()
        .map(|e| serde_json::json!({"field": e.field, "message": e.message}))
        .collect();
    HttpResponse::build(status).json(serde_json::json!({ "errors": errors }))
}

fn record_path(model: &str, id: i64) -> String {
    format!("/microsoft_outlook/records/{model}/{id}/mails")
}

/// The record's mails as the panel shows them (the compose script reloads this part).
async fn mails_part(
    ctx: &ModuleContext,
    record: &RecordRef,
    user: &CurrentUser,
    limit: u64,
) -> Markup {
    let mails = recent(ctx, record, limit, user).await;
    let mailboxes = mailboxes(ctx).await;
    html! {
        div.mails-part id=(format!("mails-{}-{}", record.model, record.id))
            data-src=(format!("{}?part=table", record_path(&record.model, record.id))) {
            (mails_table(&mails, &mailboxes))
        }
    }
}

/// The latest mails of `record`, as `viewer` may see them.
async fn recent(
    ctx: &ModuleContext,
    record: &RecordRef,
    limit: u64,
    viewer: &CurrentUser,
) -> Vec<RecordMail> {
    let waits = crate::delivery::waiting::waiting_words_as(ctx, viewer).await;
    outbox::Entity::find()
        .filter(outbox::Column::RecordModel.eq(record.model.clone()))
        .filter(outbox::Column::RecordId.eq(record.id))
        .order_by_desc(outbox::Column::Id)
        .limit(limit)
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| RecordMail::of(m, viewer, &waits))
        .collect()
}

/// The panel the host shows on a record's page.
pub async fn record_panel(
    ctx: &ModuleContext,
    shared: &Shared,
    record: &RecordRef,
    user: &CurrentUser,
) -> Option<String> {
    let to = match ctx.records().find(record, user).await {
        Ok(RecordAccess::Visible(summary)) => summary.email.unwrap_or_default(),
        _ => return None,
    };
    let action = record_path(&record.model, record.id);
    let max_files = crate::delivery::limits::limits(ctx, shared)
        .await
        .max_attachment_bytes;
    Some(
        html! {
            section.card id="mails" {
                h2 { "Send a mail" }
                (compose_form(user, record, &action, &Typed::to(&to), &[], max_files))
                h2 { "Mails" }
                (mails_part(ctx, record, user, 20).await)
                p { a href=(action) { "All mails of this record" } }
            }
        }
        .into_string(),
    )
}

/// `?part=table` asks for the table alone; `?queued=ID` follows a Send without the script.
#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    part: Option<String>,
    #[serde(default)]
    queued: Option<i64>,
}

async fn list(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    path: web::Path<(String, i64)>,
    query: web::Query<ListQuery>,
    req: HttpRequest,
) -> HttpResponse {
    let (model, id) = path.into_inner();
    let record = RecordRef { model, id };
    let summary = match ctx.records().find(&record, &user).await {
        Ok(RecordAccess::Visible(s)) => s,
        // Hidden or missing: the same answer.
        _ => {
            let errors = [FieldError {
                field: "record".into(),
                message: format!("there is no {} {}", record.model, record.id),
            }];
            if wants_json(&req) {
                return json_refusal(StatusCode::NOT_FOUND, &errors);
            }
            return record_not_found(&ctx, &user);
        }
    };
    if query.part.as_deref() == Some("table") {
        return HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header(("Cache-Control", "no-store"))
            .body(mails_part(&ctx, &record, &user, 20).await.into_string());
    }
    let mails = recent(&ctx, &record, 500, &user).await;
    if wants_json(&req) {
        return HttpResponse::Ok().json(mails);
    }
    let mailboxes = mailboxes(&ctx).await;
    let queued = query
        .queued
        .and_then(|id| {
            mails.iter().find_map(|m| match m {
                RecordMail::Own(m) if m.id == id => Some(m),
                _ => None,
            })
        })
        .map(|m| {
            queued_words(
                mailboxes.get(&m.server_id).map_or("", String::as_str),
                &m.from,
            )
        });
    let body = html! {
        h1 { "Mails of " a href=(summary.url) { (summary.title) } }
        @if let Some(words) = queued { p.flash.ok role="status" { (words) } }
        section.card { (mails_table(&mails, &mailboxes)) }
    };
    crate::web::layout::page(&ctx, &user, "Mails", body)
}

/// The page for a record that is missing or hidden from `user` (the same for both).
fn record_not_found(ctx: &ModuleContext, user: &CurrentUser) -> HttpResponse {
    let body = html! { h1 { "Not found" } section.card { p { "There is no such record, or it is not yours to see." } } };
    page_with(StatusCode::NOT_FOUND, ctx, user, "Not found", body)
}

async fn refusal_response(
    ctx: &ModuleContext,
    shared: &Shared,
    user: &CurrentUser,
    req: &HttpRequest,
    record: &RecordRef,
    refusal: Refusal,
    typed: &Typed,
) -> HttpResponse {
    if wants_json(req) {
        return json_refusal(refusal.status, &refusal.errors);
    }
    if refusal.status == StatusCode::NOT_FOUND {
        return record_not_found(ctx, user);
    }
    let action = record_path(&record.model, record.id);
    let max_files = crate::delivery::limits::limits(ctx, shared)
        .await
        .max_attachment_bytes;
    let body = html! {
        h1 { "The mail was not sent" }
        section.card {
            p.flash.bad role="alert" { "Nothing was queued. Correct what is marked below and send again; your text is kept." }
            (compose_form(user, record, &action, typed, &refusal.errors, max_files))
            p { a href=(format!("/contacts/{}", record.id)) { "Back to the record" } }
        }
    };
    page_with(refusal.status, ctx, user, "Not queued", body)
}

/// The content type of `req`, lowercased, without parameters.
fn content_type(req: &HttpRequest) -> String {
    req.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn refused(status: StatusCode, field: &str, message: String) -> (Refusal, MailRequest) {
    let errors = vec![FieldError {
        field: field.into(),
        message,
    }];
    (Refusal { status, errors }, MailRequest::default())
}

/// The largest JSON or URL-encoded mail read, in bytes: 25 MB of files in base64 and the text.
const MAX_REQUEST_BYTES: usize = 64_000_000;

/// The mail a request carries: JSON, the compose form's upload, or a URL-encoded form. A
/// refusal comes with what could be read, to refill the form.
async fn read_request(
    ctx: &ModuleContext,
    shared: &Shared,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<MailRequest, (Refusal, MailRequest)> {
    let kind = content_type(req);
    if kind == "multipart/form-data" {
        let limits = crate::delivery::limits::limits(ctx, shared).await;
        let form = actix_multipart::Multipart::new(req.headers(), payload);
        let upload = UploadLimits {
            files: limits.max_attachment_bytes,
            text: limits.max_bytes,
        };
        return match read_upload(form, upload).await {
            (request, None) => Ok(request),
            (request, Some(r)) => Err((
                Refusal {
                    status: r.status,
                    errors: vec![r.error],
                },
                request,
            )),
        };
    }
    let body = match payload.to_bytes_limited(MAX_REQUEST_BYTES).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            let why = format!("The request could not be read ({e}); nothing was queued");
            return Err(refused(StatusCode::BAD_REQUEST, "body", why));
        }
        Err(_) => {
            let why = format!(
                "The request is over {} MB; nothing was queued",
                MAX_REQUEST_BYTES / 1_000_000
            );
            return Err(refused(StatusCode::PAYLOAD_TOO_LARGE, "attachments", why));
        }
    };
    if kind == "application/json" {
        return serde_json::from_slice(&body).map_err(|e| {
            refused(
                StatusCode::BAD_REQUEST,
                "body",
                format!("not a mail in JSON: {e}"),
            )
        });
    }
    serde_urlencoded::from_bytes::<MailForm>(&body)
        .map(Into::into)
        .map_err(|e| {
            refused(
                StatusCode::BAD_REQUEST,
                "body",
                format!("not a mail form: {e}"),
            )
        })
}

async fn create(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    path: web::Path<(String, i64)>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let (model, id) = path.into_inner();
    let record = RecordRef { model, id };
    let json = wants_json(&req);
    let shared: Arc<Shared> = shared.into_inner();
    let request = match read_request(&ctx, &shared, &req, payload).await {
        Ok(r) => r,
        Err((refusal, partial)) => {
            let typed = Typed::of(&partial);
            return refusal_response(&ctx, &shared, &user, &req, &record, refusal, &typed).await;
        }
    };
    let typed = Typed::of(&request);
    match queue_mail(&ctx, &shared, &user, &record, request).await {
        Ok((row, server)) if json => {
            let mailbox = server.mailbox;
            HttpResponse::Created().json(serde_json::json!({
                "id": row.id,
                "message_id": row.message_id,
                "status": row.status,
                "status_words": status_words(&row.status),
                "via": via_words(&mailbox, &row.from_header),
                "confirmation": queued_words(&mailbox, &row.from_header),
                "url": format!("/microsoft_outlook/outbox/{}", row.id),
            }))
        }
        Ok((row, _)) => HttpResponse::SeeOther()
            .insert_header((
                "Location",
                format!(
                    "{}?queued={}",
                    record_path(&record.model, record.id),
                    row.id
                ),
            ))
            .finish(),
        Err(refusal) => {
            refusal_response(&ctx, &shared, &user, &req, &record, refusal, &typed).await
        }
    }
}

/// The mail routes, and the compose box's script.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/records/{model}/{id}/mails", web::post().to(create))
        .route("/records/{model}/{id}/mails", web::get().to(list))
        .route(
            "/assets/compose.js",
            web::get().to(|| async {
                HttpResponse::Ok()
                    .content_type("text/javascript; charset=utf-8")
                    .insert_header(("Cache-Control", "public, max-age=3600"))
                    .body(COMPOSE_SCRIPT)
            }),
        );
}

//! Mails on records: `POST /records/{model}/{id}/mails` (form or JSON) and the record's list.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use crm_sdk::{CurrentUser, FieldError, ModuleContext, RecordAccess, RecordRef};
use maud::{Markup, html};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use crate::entities::outbox;
use crate::outbox::compose::{AddressInput, MailRequest};
use crate::outbox::queue::{Refusal, queue_mail};
use crate::runtime::Shared;
use crate::web::layout::{csrf, page_with};

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
        }
    }
}

/// One mail as the JSON list shows it.
#[derive(Serialize)]
pub struct MailView {
    pub id: i64,
    pub message_id: String,
    pub status: String,
    pub subject: String,
    pub from: String,
    pub attempts: i32,
    pub last_reply: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    /// Why a queued mail waits on its mailbox (held or throttled), in words; else `null`.
    pub waiting: Option<String>,
}

/// The classified words of a remote SMTP reply: its code and enhanced status code
/// (`554 5.2.0`), never the remote server's free text.
pub fn classified_reply(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let Some(code) = words
        .next()
        .filter(|w| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()))
    else {
        return "no SMTP reply".into();
    };
    let enhanced = words.next().filter(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    });
    match enhanced {
        Some(enhanced) => format!("{code} {enhanced}"),
        None => code.to_string(),
    }
}

/// A mail as `viewer` may see it: operators see the remote server's reply as it was; others
/// see its classified words (the remote server may be one a user pointed a mailbox at).
pub fn for_viewer(mut m: outbox::Model, viewer: &CurrentUser) -> outbox::Model {
    if viewer.is_admin {
        return m;
    }
    if let Some(reply) = m.last_reply.take() {
        let words = classified_reply(&reply);
        m.last_error = m.last_error.map(|e| e.replace(&reply, &words));
        m.last_reply = Some(words);
    }
    m
}

impl From<outbox::Model> for MailView {
    fn from(m: outbox::Model) -> Self {
        Self {
            id: m.id,
            message_id: m.message_id,
            status: m.status,
            subject: m.subject,
            from: m.from_header,
            attempts: m.attempts,
            last_reply: m.last_reply,
            last_error: m.last_error,
            created_at: m.created_at,
            updated_at: m.updated_at,
            next_attempt_at: m.next_attempt_at,
            sent_at: m.sent_at,
            waiting: None,
        }
    }
}

/// Why `m` waits, if it is queued on a mailbox in `waits`.
fn waiting_of(m: &outbox::Model, waits: &HashMap<i32, String>) -> Option<String> {
    matches!(m.status.as_str(), "queued" | "sending")
        .then(|| waits.get(&m.server_id).cloned())
        .flatten()
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

/// A mail's status as a badge.
pub fn status_badge(status: &str) -> Markup {
    let class = match status {
        "sent" => "badge ok",
        "failed" | "needs_reconnect" => "badge bad",
        "sending" => "badge warn",
        _ => "badge muted",
    };
    html! { span class=(class) { (status.replace('_', " ")) } }
}

/// The table of a record's mails.
pub fn mails_table(mails: &[outbox::Model], waits: &HashMap<i32, String>) -> Markup {
    html! {
        @if mails.is_empty() {
            p.help { "No mail sent from this record yet." }
        } @else {
            table.mails {
                thead { tr { th { "Subject" } th { "Status" } th { "Attempts" } th { "Last reply" } th { "Queued" } th { "Updated" } } }
                tbody {
                    @for m in mails {
                        tr data-message-id=(m.message_id) {
                            td { (m.subject) }
                            td { (status_badge(&m.status)) @if let Some(w) = waiting_of(m, waits) { p.help.waiting { (w) } } }
                            td { (m.attempts) }
                            td { (m.last_reply.as_deref().unwrap_or("")) @if let Some(e) = &m.last_error { p.help { (e) } } }
                            td { (m.created_at.format("%Y-%m-%d %H:%M:%S")) }
                            td { (m.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
        }
    }
}

/// The compose form for a record.
pub fn compose_form(
    user: &CurrentUser,
    record: &RecordRef,
    to: &str,
    errors: &[FieldError],
) -> Markup {
    let error = |field: &str| html! { @for e in errors.iter().filter(|e| e.field == field) { p.error role="alert" { (e.message) } } };
    html! {
        form method="post" action=(record_path(&record.model, record.id)) {
            (csrf(user))
            label for="mail-to" { "To" }
            input #mail-to name="to" value=(to);
            (error("to"))
            label for="mail-cc" { "Cc" }
            input #mail-cc name="cc";
            (error("cc"))
            label for="mail-subject" { "Subject" }
            input #mail-subject name="subject";
            (error("subject"))
            label for="mail-body" { "Message" }
            textarea #mail-body name="text_body" {}
            (error("text_body"))
            (error("from"))
            (error("server"))
            p { button type="submit" { "Send" } }
        }
    }
}

/// The latest mails of `record`, as `viewer` may see them.
async fn recent(
    ctx: &ModuleContext,
    record: &RecordRef,
    limit: u64,
    viewer: &CurrentUser,
) -> Vec<outbox::Model> {
    outbox::Entity::find()
        .filter(outbox::Column::RecordModel.eq(record.model.clone()))
        .filter(outbox::Column::RecordId.eq(record.id))
        .order_by_desc(outbox::Column::Id)
        .limit(limit)
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|m| for_viewer(m, viewer))
        .collect()
}

/// The panel the host shows on a record's page.
pub async fn record_panel(
    ctx: &ModuleContext,
    record: &RecordRef,
    user: &CurrentUser,
) -> Option<String> {
    let to = match ctx.records().find(record, user).await {
        Ok(RecordAccess::Visible(summary)) => summary.email.unwrap_or_default(),
        _ => return None,
    };
    let mails = recent(ctx, record, 20, user).await;
    Some(
        html! {
            section.card id="mails" {
                h2 { "Send a mail" }
                (compose_form(user, record, &to, &[]))
                h2 { "Mails" }
                (mails_table(&mails, &crate::delivery::health::waiting_words(ctx).await))
                p { a href=(record_path(&record.model, record.id)) { "All mails of this record" } }
            }
        }
        .into_string(),
    )
}

async fn list(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    path: web::Path<(String, i64)>,
    req: HttpRequest,
) -> HttpResponse {
    let (model, id) = path.into_inner();
    let record = RecordRef { model, id };
    let summary = match ctx.records().find(&record, &user).await {
        Ok(RecordAccess::Visible(s)) => s,
        // Hidden or missing: the same answer.
        _ => {
            return refusal_response(
                &ctx,
                &user,
                &req,
                &record,
                Refusal {
                    status: StatusCode::NOT_FOUND,
                    errors: vec![FieldError {
                        field: "record".into(),
                        message: format!("there is no {} {}", record.model, record.id),
                    }],
                },
            );
        }
    };
    let mails = recent(&ctx, &record, 500, &user).await;
    if wants_json(&req) {
        let waits = crate::delivery::health::waiting_words(&ctx).await;
        let views: Vec<MailView> = mails
            .into_iter()
            .map(|m| {
                let waiting = waiting_of(&m, &waits);
                MailView {
                    waiting,
                    ..MailView::from(m)
                }
            })
            .collect();
        return HttpResponse::Ok().json(views);
    }
    let body = html! {
        h1 { "Mails of " a href=(summary.url) { (summary.title) } }
        section.card { (mails_table(&mails, &crate::delivery::health::waiting_words(&ctx).await)) }
    };
    crate::web::layout::page(&ctx, &user, "Mails", body)
}

fn refusal_response(
    ctx: &ModuleContext,
    user: &CurrentUser,
    req: &HttpRequest,
    record: &RecordRef,
    refusal: Refusal,
) -> HttpResponse {
    if wants_json(req) {
        return json_refusal(refusal.status, &refusal.errors);
    }
    let body = html! {
        h1 { "The mail was not queued" }
        section.card {
            p.flash.bad role="alert" { "Nothing was queued:" }
            ul { @for e in &refusal.errors { li { strong { (e.field) } ": " (e.message) } } }
            p { a href=(format!("/contacts/{}", record.id)) { "Back to the record" } }
        }
    };
    page_with(refusal.status, ctx, user, "Not queued", body)
}

async fn create(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    path: web::Path<(String, i64)>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let (model, id) = path.into_inner();
    let record = RecordRef { model, id };
    let json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
    let request: MailRequest = if json {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return json_refusal(
                    StatusCode::BAD_REQUEST,
                    &[FieldError {
                        field: "body".into(),
                        message: format!("not a mail in JSON: {e}"),
                    }],
                );
            }
        }
    } else {
        match serde_urlencoded::from_bytes::<MailForm>(&body) {
            Ok(f) => f.into(),
            Err(e) => {
                let refusal = Refusal {
                    status: StatusCode::BAD_REQUEST,
                    errors: vec![FieldError {
                        field: "body".into(),
                        message: format!("not a mail form: {e}"),
                    }],
                };
                return refusal_response(&ctx, &user, &req, &record, refusal);
            }
        }
    };
    let shared: Arc<Shared> = shared.into_inner();
    match queue_mail(&ctx, &shared, &user, &record, &request).await {
        Ok(row) if json => HttpResponse::Created().json(serde_json::json!({
            "id": row.id,
            "message_id": row.message_id,
            "status": row.status,
        })),
        Ok(_) => HttpResponse::SeeOther()
            .insert_header((
                "Location",
                format!("{}?queued=1", record_path(&record.model, record.id)),
            ))
            .finish(),
        Err(refusal) => refusal_response(&ctx, &user, &req, &record, refusal),
    }
}

/// The mail routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(64 * 1024 * 1024))
        .route("/records/{model}/{id}/mails", web::post().to(create))
        .route("/records/{model}/{id}/mails", web::get().to(list));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_classified_to_its_codes() {
        assert_eq!(
            classified_reply("554 5.2.0 STOREDRV.Submission.Exception: anything the server says"),
            "554 5.2.0"
        );
        assert_eq!(classified_reply("250 OK queued as 12345"), "250");
        assert_eq!(classified_reply("421 4.7.0 <script>"), "421 4.7.0");
        assert_eq!(
            classified_reply("Connection refused by peer"),
            "no SMTP reply"
        );
        assert_eq!(classified_reply("5541 x"), "no SMTP reply");
    }
}

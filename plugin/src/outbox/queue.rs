//! Queuing a mail from a record: the request parsed, then admitted and stored with those of
//! concurrent requests (`outbox::admit`, `outbox::group_insert`).

use actix_web::http::StatusCode;
use crm_sdk::{CurrentUser, ModuleContext, RecordRef};
use rand::Rng;

use crate::entities::{mail_server, outbox};
use crate::outbox::admit::{Request, build};
use crate::outbox::compose::{MailRequest, OutgoingMail, SizeLimits};
use crate::outbox::group_insert;
use crate::runtime::{PendingMail, Shared};

pub use crate::outbox::admit::{EXCHANGE_MAX_MESSAGE_BYTES, allowed_from, outbound_refusal};
pub use crate::outbox::refusal::Refusal;

/// Validates and queues a mail on `record` written by `author`: the stored row and the server
/// it goes through; nothing is stored when refused. The mail is parsed here, so a malformed
/// mail is refused (422) before its record is looked up; whether the author may file it under
/// the record (404 for a hidden record as for a missing one) and the server it goes through
/// are decided with the mails of concurrent requests (`outbox::admit`), stored together.
pub async fn queue_mail(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    author: &CurrentUser,
    record: &RecordRef,
    request: MailRequest,
) -> Result<(outbox::Model, mail_server::Model), Refusal> {
    let limits = crate::delivery::limits::limits(ctx, shared).await;
    let sizes = SizeLimits {
        text: limits.max_bytes,
        attachments: limits.max_attachment_bytes,
    };
    let mail = OutgoingMail::parse(request, sizes).map_err(|errors| Refusal {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        errors,
    })?;
    let request = Request {
        author: author.clone(),
        record: record.clone(),
        mail,
        message_id: message_id(ctx),
    };
    let (row, server) =
        group_insert::insert(ctx, shared, PendingMail::Admit(Box::new(request))).await?;
    log_queued(&row, author);
    Ok((row, server))
}

/// A new Message-ID (without angle brackets): 128 random bits at the CRM's host name.
fn message_id(ctx: &ModuleContext) -> String {
    let host = ctx
        .public_base_url()
        .host_str()
        .unwrap_or("crm.localdomain");
    let id: u128 = rand::rng().random();
    format!("{id:032x}@{host}")
}

fn log_queued(row: &outbox::Model, author: &CurrentUser) {
    tracing::info!(
        outbox_id = row.id,
        server_id = row.server_id,
        user_id = author.id,
        "mail queued"
    );
}

/// Queues `mail` of `author` through `server`, filed under `record` (both already checked):
/// From is the author or the mailbox as the server says, or the mailbox itself when
/// `as_mailbox` (a test mail of the server page).
pub async fn queue_through(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    author: &CurrentUser,
    server: &mail_server::Model,
    record: &RecordRef,
    mail: OutgoingMail,
    as_mailbox: bool,
) -> Result<outbox::Model, Refusal> {
    let request = Request {
        author: author.clone(),
        record: record.clone(),
        mail,
        message_id: message_id(ctx),
    };
    let admitted = build(server, request, ctx.clock().now(), as_mailbox)?;
    let (row, _) =
        group_insert::insert(ctx, shared, PendingMail::Built(Box::new(admitted))).await?;
    log_queued(&row, author);
    Ok(row)
}

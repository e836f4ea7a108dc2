//! Queuing a mail from a record: validation, choosing the sender, the outbox row and its body,
//! the wake of the mailbox's drain.

use actix_web::http::StatusCode;
use chrono::Utc;
use crm_sdk::{CurrentUser, FieldError, ModuleContext, RecordAccess, RecordRef};
use lettre::message::Mailbox;
use rand::Rng;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::entities::{mail_server, outbox, token};
use crate::outbox::compose::{MailRequest, OutgoingMail, SizeLimits};
use crate::runtime::Shared;

/// A refused mail: the HTTP status and what is wrong, per field.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// 4xx.
    pub status: StatusCode,
    /// The problems.
    pub errors: Vec<FieldError>,
}

fn refuse(status: StatusCode, field: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        errors: vec![FieldError {
            field: field.into(),
            message: message.into(),
        }],
    }
}

/// Exchange Online's fixed maximum message size, encoded (its `SIZE` extension's value).
pub const EXCHANGE_MAX_MESSAGE_BYTES: usize = 35_882_577;

/// Whether `address` may be used as From on `server`.
pub fn allowed_from(server: &mail_server::Model, address: &str) -> bool {
    let address = address.to_ascii_lowercase();
    let entries: Vec<&str> = server
        .from_allow_list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if entries.is_empty() {
        return server.send_as == "author" || address.eq_ignore_ascii_case(&server.mailbox);
    }
    address.eq_ignore_ascii_case(&server.mailbox)
        || entries.iter().any(|e| match e.strip_prefix('@') {
            Some(domain) => address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
            None => e.eq_ignore_ascii_case(&address),
        })
}

/// The server a mail of `author` goes through: their connected personal mailbox, else the
/// default shared server (then the oldest shared one). One query: the author's personal server
/// when it has a token, and the shared servers, personal first.
pub async fn choose_server(
    ctx: &ModuleContext,
    author: &CurrentUser,
) -> Result<mail_server::Model, Refusal> {
    let connected = Query::select()
        .column(token::Column::ServerId)
        .from(token::Entity)
        .to_owned();
    let chosen = mail_server::Entity::find()
        .filter(
            Condition::any()
                .add(
                    Condition::all()
                        .add(mail_server::Column::Kind.eq("personal"))
                        .add(mail_server::Column::OwnerUserId.eq(author.id))
                        .add(mail_server::Column::Id.in_subquery(connected)),
                )
                .add(mail_server::Column::Kind.eq("shared")),
        )
        .order_by_desc(Expr::col(mail_server::Column::Kind).eq("personal"))
        .order_by_desc(mail_server::Column::IsDefault)
        .order_by_asc(mail_server::Column::Id)
        // The author's personal server and the shared ones (a handful), not `.one()`: its
        // bound `LIMIT ?` made SQLite compile the statement again at every request (see
        // `crate::entities::by_key`).
        .all(ctx.db())
        .await
        .map(|servers| servers.into_iter().next())
        .map_err(|e| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "server",
                format!("the database did not answer ({e})"),
            )
        })?;
    let Some(server) = chosen else {
        return Err(refuse(
            StatusCode::CONFLICT,
            "server",
            "No outgoing mail server is configured: an operator must add and connect one (Outgoing mail servers), or connect your own mailbox (My mailbox).",
        ));
    };
    if let Some(why) = outbound_refusal(ctx, &server, author).await {
        return Err(refuse(StatusCode::CONFLICT, "server", why));
    }
    Ok(server)
}

/// Why the module must not connect to a personal mailbox's server for `user` (users never
/// choose where the server connects): its host and port are not among those the operator
/// allows, or it is unencrypted and `user` is not an operator. A server saved before the
/// operator narrowed the list is caught here too. `None` for shared servers and allowed ones.
pub async fn outbound_refusal(
    ctx: &ModuleContext,
    server: &mail_server::Model,
    user: &CurrentUser,
) -> Option<String> {
    if server.kind != "personal" {
        return None;
    }
    let hosts = crate::settings::PersonalSmtpHosts::load(ctx).await;
    let port = u16::try_from(server.smtp_port).unwrap_or(0);
    if hosts.allows(&server.smtp_host, port) && (server.security != "none" || user.is_admin) {
        return None;
    }
    Some(format!(
        "this mailbox connects to {}:{}, which the operator does not allow for personal mailboxes (allowed: {}). Change it under My mailbox.",
        server.smtp_host,
        server.smtp_port,
        hosts.describe()
    ))
}

/// Validates and queues a mail on `record` written by `author`: the stored row and the server
/// it goes through; nothing is stored when refused.
pub async fn queue_mail(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    author: &CurrentUser,
    record: &RecordRef,
    request: MailRequest,
) -> Result<(outbox::Model, mail_server::Model), Refusal> {
    match ctx.records().find(record, author).await {
        Ok(RecordAccess::Visible(_)) => {}
        // Hidden or missing: the same answer.
        Ok(RecordAccess::Missing | RecordAccess::Hidden) => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "record",
                format!("there is no {} {}", record.model, record.id),
            ));
        }
        Err(e) => {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "record",
                format!("the record could not be looked up ({e})"),
            ));
        }
    }
    let limits = crate::delivery::limits::limits(ctx, shared).await;
    let sizes = SizeLimits {
        text: limits.max_bytes,
        attachments: limits.max_attachment_bytes,
    };
    let mail = OutgoingMail::parse(request, sizes).map_err(|errors| Refusal {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        errors,
    })?;
    let server = choose_server(ctx, author).await?;
    let row = queue_through(ctx, shared, author, &server, record, mail, false).await?;
    Ok((row, server))
}

/// The From header and the envelope sender of a mail of `author` through `server`: the author,
/// or the mailbox as the server says (always the mailbox when `as_mailbox`), refused when the
/// server may not send as it.
fn sender(
    server: &mail_server::Model,
    author: &CurrentUser,
    as_mailbox: bool,
) -> Result<(Mailbox, String), Refusal> {
    let mailbox_address = server.mailbox.parse().map_err(|_| {
        refuse(
            StatusCode::CONFLICT,
            "server",
            "the mail server's mailbox address is invalid",
        )
    })?;
    let (from, envelope_from) =
        if as_mailbox || server.kind == "personal" || server.send_as == "mailbox" {
            (
                Mailbox::new(Some(author.name.clone()), mailbox_address),
                server.mailbox.clone(),
            )
        } else {
            let author_address = author.email.parse().map_err(|_| {
                refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "from",
                    "your user's e-mail address is not valid",
                )
            })?;
            (
                Mailbox::new(Some(author.name.clone()), author_address),
                author.email.clone(),
            )
        };
    if !allowed_from(server, from.email.as_ref()) {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "from",
            format!(
                "the server \"{}\" may not send as {}: it is not in its \"may send as\" list. Ask an operator to add it (and to grant Send As in Exchange).",
                server.name, from.email
            ),
        ));
    }
    Ok((from, envelope_from))
}

/// Stores the outbox row and its body together, or neither (503 when the database fails),
/// in one transaction with the mails of concurrent requests; the mailbox's drain is woken
/// once they are stored.
async fn insert(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    mut row: outbox::ActiveModel,
    (message_id, server_id): (String, i32),
    raw: String,
) -> Result<outbox::Model, Refusal> {
    // Drained at once in this process: no job now; if that drain dies, the sweep wakes the
    // mailbox (a mail never pushed is due for the sweep).
    if !shared.delivers_here() && shared.queue().is_some() {
        row.pushed_at = Set(Some(ctx.clock().now()));
    }
    crate::outbox::group_insert::insert(ctx, shared, (message_id, server_id), row, raw)
        .await
        .map_err(|e| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "record",
                format!("the database did not answer; nothing was queued ({e})"),
            )
        })
}

/// Queues `mail` of `author` through `server`, filed under `record` (already checked): From is
/// the author or the mailbox as the server says, or the mailbox itself when `as_mailbox` (a test
/// mail of the server page).
pub async fn queue_through(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    author: &CurrentUser,
    server: &mail_server::Model,
    record: &RecordRef,
    mail: OutgoingMail,
    as_mailbox: bool,
) -> Result<outbox::Model, Refusal> {
    let (from, envelope_from) = sender(server, author, as_mailbox)?;
    let mut mail = mail;
    if server.send_as == "mailbox" && server.kind == "shared" && mail.reply_to.is_none() {
        mail.reply_to = author
            .email
            .parse()
            .ok()
            .map(|a| Mailbox::new(Some(author.name.clone()), a));
    }
    let host = ctx
        .public_base_url()
        .host_str()
        .unwrap_or("crm.localdomain")
        .to_string();
    let id: u128 = rand::rng().random();
    let message_id = format!("{id:032x}@{host}");
    let now = ctx.clock().now();
    let recipients: Vec<String> = mail.recipients().map(|a| a.to_string()).collect();
    let subject = mail.subject.clone();
    let message = mail
        .build(from.clone(), None, &message_id, now.into())
        .map_err(|e| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "to",
                format!("the mail cannot be built: {e}"),
            )
        })?;
    let raw = String::from_utf8(message.formatted())
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    drop(message);
    if raw.len() > EXCHANGE_MAX_MESSAGE_BYTES {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "attachments",
            format!(
                "Encoded for sending, the mail is {}; Exchange Online accepts at most {} per message. Attach fewer or smaller files.",
                crate::outbox::attachments::size_words(raw.len()),
                crate::outbox::attachments::size_words(EXCHANGE_MAX_MESSAGE_BYTES)
            ),
        ));
    }
    let row = outbox::ActiveModel {
        message_id: Set(message_id.clone()),
        status: Set("queued".into()),
        server_id: Set(server.id),
        author_user_id: Set(author.id),
        record_model: Set(record.model.clone()),
        record_id: Set(record.id),
        from_header: Set(from.to_string()),
        envelope_from: Set(envelope_from),
        recipients: Set(recipients.join("\n")),
        subject: Set(subject),
        size_bytes: Set(raw.len() as i64),
        attempts: Set(0),
        next_attempt_at: Set(now),
        created_at: Set(now),
        updated_at: Set(Utc::now()),
        ..Default::default()
    };
    let row = insert(ctx, shared, row, (message_id, server.id), raw).await?;
    tracing::info!(
        outbox_id = row.id,
        server_id = server.id,
        user_id = author.id,
        "mail queued"
    );
    Ok(row)
}

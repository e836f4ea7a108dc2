//! A record's mails in words, as people read them: the status ("Delivered to Exchange"), why
//! a mail waits, which mailbox it goes out from and as whom, and the remote server's reply
//! classified to its codes for those who did not configure the server.

use chrono::{DateTime, Utc};
use crm_sdk::{CurrentUser, ModuleContext};
use maud::{Markup, html};
use sea_orm::EntityTrait;
use serde::Serialize;
use std::collections::HashMap;

use crate::entities::{mail_server, outbox};
pub use crate::outbox::user_words::{classified_reply, for_user, user_words};

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
    /// The status in words ("Delivered to Exchange").
    pub status_words: String,
    /// Where the mail's page is.
    pub url: String,
    /// The mail server it goes out through (the table names its mailbox).
    #[serde(skip)]
    pub server_id: i32,
}

/// A colleague's mail on a shared record, as a user sees it: what it is about and how it
/// stands, not its page, its sender or its failure (the colleague's mailbox and recipients).
#[derive(Serialize)]
pub struct ColleagueMail {
    pub message_id: String,
    pub status: String,
    pub status_words: String,
    pub subject: String,
    pub waiting: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One mail of a record's list as its viewer sees it, the same in the table and in JSON:
/// their own mails (every mail, for operators) whole, a colleague's as [`ColleagueMail`].
#[derive(Serialize)]
#[serde(untagged)]
pub enum RecordMail {
    Own(MailView),
    Colleague(ColleagueMail),
}

impl RecordMail {
    /// `m` as `viewer` may see it; `waits` says why mails wait on their mailboxes.
    pub fn of(m: outbox::Model, viewer: &CurrentUser, waits: &HashMap<i32, String>) -> Self {
        let waiting = waiting_of(&m, waits);
        if viewer.is_admin || m.author_user_id == viewer.id {
            return RecordMail::Own(MailView {
                waiting,
                ..MailView::from(for_viewer(m, viewer))
            });
        }
        RecordMail::Colleague(ColleagueMail {
            status_words: status_words(&m.status).to_string(),
            message_id: m.message_id,
            status: m.status,
            subject: m.subject,
            waiting,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// A mail as `viewer` may see it: operators see the remote server's reply as it was; others
/// see its classified words (the remote server may be one a user pointed a mailbox at).
/// The failure is in the words a user reads ([`user_words`]).
pub fn for_viewer(mut m: outbox::Model, viewer: &CurrentUser) -> outbox::Model {
    if viewer.is_admin {
        return m;
    }
    (m.last_error, m.last_reply) = for_user(m.last_error.take(), m.last_reply.take(), &m.status);
    m
}

impl From<outbox::Model> for MailView {
    fn from(m: outbox::Model) -> Self {
        Self {
            status_words: status_words(&m.status).to_string(),
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
            url: format!("/microsoft_outlook/outbox/{}", m.id),
            server_id: m.server_id,
        }
    }
}

/// Why `m` waits, if it is queued on a mailbox in `waits`.
pub(crate) fn waiting_of(m: &outbox::Model, waits: &HashMap<i32, String>) -> Option<String> {
    matches!(m.status.as_str(), "queued" | "sending")
        .then(|| waits.get(&m.server_id).cloned())
        .flatten()
}

/// A mail's status in words, as its author reads it.
pub fn status_words(status: &str) -> &'static str {
    match status {
        "queued" => "Queued",
        "sending" => "Sending",
        "sent" => "Delivered to Exchange",
        "failed" => "Not sent",
        "cancelled" => "Cancelled",
        "needs_reconnect" => "Waiting for the mailbox to be connected again",
        _ => "Unknown",
    }
}

/// A mail's status as a badge, in words; `data-status` keeps the status itself.
pub fn status_badge(status: &str) -> Markup {
    let class = match status {
        "sent" => "badge ok",
        "failed" | "needs_reconnect" => "badge bad",
        "sending" => "badge warn",
        _ => "badge muted",
    };
    html! { span class=(class) data-status=(status) { (status_words(status)) } }
}

/// Which mailbox a mail goes out from, and as whom: "sales@contoso.example as Alice Adams"
/// (the From address too when it is not the mailbox's).
pub fn via_words(mailbox: &str, from_header: &str) -> String {
    if mailbox.is_empty() {
        return from_header.to_string();
    }
    let Ok(from) = from_header.parse::<lettre::message::Mailbox>() else {
        return format!("{mailbox} as {from_header}");
    };
    let address = from.email.to_string();
    let same = address.eq_ignore_ascii_case(mailbox);
    match from.name.filter(|n| !n.trim().is_empty()) {
        Some(name) if same => format!("{mailbox} as {name}"),
        Some(name) => format!("{mailbox} as {name} <{address}>"),
        None if same => mailbox.to_string(),
        None => format!("{mailbox} as {address}"),
    }
}

/// The mailbox address of each mail server, by id.
pub async fn mailboxes(ctx: &ModuleContext) -> HashMap<i32, String> {
    mail_server::Entity::find()
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.id, s.mailbox))
        .collect()
}

/// What the author reads after Send.
pub fn queued_words(mailbox: &str, from_header: &str) -> String {
    format!(
        "Queued — it will go out from {}; the list of mails shows what becomes of it.",
        via_words(mailbox, from_header)
    )
}

/// The table of a record's mails, in words: the status (and why it waits), the mailbox it goes
/// out from and as whom; the remote server's reply is on each mail's own page. A colleague's
/// mail shows only what [`RecordMail::Colleague`] carries.
pub fn mails_table(mails: &[RecordMail], mailboxes: &HashMap<i32, String>) -> Markup {
    html! {
        @if mails.is_empty() {
            p.help { "No mail sent from this record yet." }
        } @else {
            // `data-label`: a phone shows each mail as a card, each field named.
            table.mails.cards {
                thead { tr { th { "Subject" } th { "Status" } th { "Sent via" } th { "Queued (UTC)" } th { "Updated (UTC)" } } }
                tbody {
                    @for mail in mails {
                        @match mail {
                            RecordMail::Own(m) => tr data-message-id=(m.message_id) data-status=(m.status) {
                                td.title { a href=(m.url) { @if m.subject.is_empty() { "(no subject)" } @else { (m.subject) } } }
                                td data-label="Status" {
                                    (status_badge(&m.status))
                                    @if let Some(w) = &m.waiting { p.help.waiting { (w) } }
                                    @if m.status == "failed" { @if let Some(e) = &m.last_error { p.help { (e) } } }
                                }
                                td data-label="Sent via" { (via_words(mailboxes.get(&m.server_id).map_or("", String::as_str), &m.from)) }
                                td data-label="Queued (UTC)" { (m.created_at.format("%Y-%m-%d %H:%M:%S")) }
                                td data-label="Updated (UTC)" { (m.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                            },
                            RecordMail::Colleague(m) => tr data-message-id=(m.message_id) data-status=(m.status) {
                                td.title { @if m.subject.is_empty() { "(no subject)" } @else { (m.subject) } }
                                td data-label="Status" {
                                    (status_badge(&m.status))
                                    @if let Some(w) = &m.waiting { p.help.waiting { (w) } }
                                }
                                td data-label="Sent via" { "—" }
                                td data-label="Queued (UTC)" { (m.created_at.format("%Y-%m-%d %H:%M:%S")) }
                                td data-label="Updated (UTC)" { (m.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                            },
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_a_mail_can_have_is_said_in_words() {
        for status in outbox::STATUSES {
            assert_ne!(status_words(status), "Unknown", "{status}");
            assert!(
                status_badge(status)
                    .into_string()
                    .contains(status_words(status)),
                "{status}"
            );
        }
        assert_eq!(status_words("cancelled"), "Cancelled");
    }
}

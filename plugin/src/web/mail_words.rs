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
/// The failure is in the words a user reads ([`user_words`]).
pub fn for_viewer(mut m: outbox::Model, viewer: &CurrentUser) -> outbox::Model {
    if viewer.is_admin {
        return m;
    }
    if let Some(reply) = m.last_reply.take() {
        let words = classified_reply(&reply);
        m.last_error = m.last_error.map(|e| e.replace(&reply, &words));
        m.last_reply = Some(words);
    }
    m.last_error = m.last_error.map(|e| user_words(&e, &m.status));
    m
}

/// What the author reads when the operators must act and the mail failed for good (as the
/// failed-mail notification says it).
pub const OPERATORS_TOLD_FAILED: &str = "The CRM's operators have been told; nothing is needed from you until they have fixed it — then send it again.";
/// What the author reads when the operators must act and the mail waits (as the notification
/// to the authors of waiting mail says it).
pub const OPERATORS_TOLD_WAITING: &str =
    "The CRM's operators have been told and will fix it; nothing is needed from you.";
/// What the author reads when the mailbox must be connected again. Who can (its owner: the
/// reader, another user, or the operators for a shared mailbox) is said to each reader by the
/// mailbox's waiting words (`delivery::hold::waiting_words_for`).
const RECONNECT_TOLD: &str =
    "The mailbox must be connected again; the mail waits until then. Nothing is lost.";

/// Sentences that tell an operator or an administrator what to do (where a user cannot go:
/// the server page, the settings, Azure, the Exchange admin center).
const FOR_OPERATORS: &[&str] = &[
    "administrator",
    "operator",
    "Retry now",
    "server page",
    "server's page",
    "Settings ›",
    "Azure",
    "Entra",
    "App registrations",
    "Enterprise applications",
    "admin center",
    "Reconnecting",
    "proxy",
    "report it",
];

/// Sentences that ask for the mailbox to be connected again (not lettre's "Connection
/// error: …", a network failure).
const RECONNECT: &[&str] = &["Click Connect", "connected again", "sign in again"];

/// How the "what to do" part of a failure may begin where the "what happened" before it ends
/// with a remote reply rather than a full stop.
const STEPS_BEGIN: &[&str] = &[
    "A CRM operator",
    "An administrator",
    "An Exchange administrator",
    "A Microsoft 365 administrator",
    "Reconnecting",
    "Nothing to do",
    "Check ",
    "Click ",
];

/// The sentences of `text`: each ends with a full stop followed by a capital letter, or just
/// before the steps of [`STEPS_BEGIN`].
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices(' ') {
        let next = &text[at + 1..];
        let ends = (text[..at].ends_with('.') && next.starts_with(char::is_uppercase))
            || STEPS_BEGIN.iter().any(|s| next.starts_with(s));
        if ends && at > start {
            out.push(text[start..at].trim());
            start = at + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// A failure in the words its author reads: what happened, without the steps only operators
/// (or a mailbox's owner) can take, and instead what the notifications tell authors — that
/// the operators were told, and what is left for them to do. `status` is the mail's.
pub fn user_words(words: &str, status: &str) -> String {
    let (mut for_operators, mut reconnect) = (false, false);
    let mut kept: Vec<&str> = Vec::new();
    for sentence in sentences(words) {
        if FOR_OPERATORS.iter().any(|w| sentence.contains(w)) {
            for_operators = true;
        } else if RECONNECT.iter().any(|w| sentence.contains(w)) {
            reconnect = true;
        } else {
            kept.push(sentence);
        }
    }
    let told = match (reconnect, for_operators, status) {
        (true, _, "failed") => Some("The mailbox must be connected again; then send it again."),
        (true, _, _) => Some(RECONNECT_TOLD),
        (false, true, "failed") => Some(OPERATORS_TOLD_FAILED),
        (false, true, _) => Some(OPERATORS_TOLD_WAITING),
        (false, false, _) => None,
    };
    kept.extend(told);
    kept.join(" ")
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
        "Queued — it will go out from {}.",
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
            table.mails {
                thead { tr { th { "Subject" } th { "Status" } th { "Sent via" } th { "Queued" } th { "Updated" } } }
                tbody {
                    @for mail in mails {
                        @match mail {
                            RecordMail::Own(m) => tr data-message-id=(m.message_id) data-status=(m.status) {
                                td { a href=(m.url) { (m.subject) } }
                                td {
                                    (status_badge(&m.status))
                                    @if let Some(w) = &m.waiting { p.help.waiting { (w) } }
                                    @if m.status == "failed" { @if let Some(e) = &m.last_error { p.help { (e) } } }
                                }
                                td { (via_words(mailboxes.get(&m.server_id).map_or("", String::as_str), &m.from)) }
                                td { (m.created_at.format("%Y-%m-%d %H:%M:%S")) }
                                td { (m.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                            },
                            RecordMail::Colleague(m) => tr data-message-id=(m.message_id) data-status=(m.status) {
                                td { (m.subject) }
                                td {
                                    (status_badge(&m.status))
                                    @if let Some(w) = &m.waiting { p.help.waiting { (w) } }
                                }
                                td { "—" }
                                td { (m.created_at.format("%Y-%m-%d %H:%M:%S")) }
                                td { (m.updated_at.format("%Y-%m-%d %H:%M:%S")) }
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
    use crate::delivery::classify::{self, Facts, Observed, Stage};

    /// Words only operators can act on.
    fn for_operators_only(words: &str) -> bool {
        [
            "Retry now",
            "server page",
            "Settings ›",
            "administrator",
            "operator must",
            "Azure",
        ]
        .iter()
        .any(|w| words.contains(w))
    }

    #[test]
    fn a_user_reads_every_failure_without_the_operators_steps() {
        let facts = Facts {
            mailbox: "sales@contoso.example",
            from: "alice@contoso.example",
            auth_user: "admin@contoso.example",
        };
        let mut verdicts: Vec<classify::Verdict> = classify::SMTP_RULES
            .iter()
            .map(|rule| {
                let code = if rule.id.contains("temporary") || rule.id == "rate-throttled" {
                    421
                } else {
                    554
                };
                let stage = match rule.id {
                    "auth-refused" | "auth-temporary" | "auth-other" => Stage::Auth,
                    "connection-refused" => Stage::Connect,
                    _ => Stage::Transaction,
                };
                let text = format!(
                    "{code} {} x",
                    rule.when.contains.first().copied().unwrap_or("5.0.0")
                );
                classify::smtp(
                    Observed::Reply {
                        stage,
                        code,
                        text: &text,
                    },
                    &facts,
                )
            })
            .collect();
        verdicts.push(classify::smtp(Observed::NoXoauth2, &facts));
        verdicts.push(classify::not_connected("sales@contoso.example"));
        for detail in [
            "Connection error: failed to lookup address information",
            "Connection error: invalid peer certificate: UnknownIssuer",
        ] {
            verdicts.push(classify::smtp(
                Observed::Network {
                    stage: Stage::Connect,
                    detail,
                },
                &facts,
            ));
        }
        verdicts.push(classify::smtp(
            Observed::NeedsSmtpUtf8 {
                detail: "the server does not offer SMTPUTF8, which dänä@fabrikam.example needs",
            },
            &facts,
        ));
        for v in &verdicts {
            for status in ["queued", "failed"] {
                let seen = user_words(&v.words(), status);
                assert!(!for_operators_only(&seen), "{}: {seen}", v.rule);
                // Only a mailbox that is not connected is said to need connecting again
                // (lettre's "Connection error: …" is a network failure).
                assert_eq!(
                    seen.contains("connected again"),
                    v.rule == "not-connected",
                    "{}: {seen}",
                    v.rule
                );
                assert!(
                    seen.starts_with(v.what.split(". ").next().unwrap_or_default()),
                    "{}: {seen}",
                    v.rule
                );
            }
        }
    }

    #[test]
    fn a_user_is_told_the_operators_were_told() {
        let words = "Microsoft Graph refused to send from sales@contoso.example (403). An administrator must grant the app Mail.Send with admin consent; then click Retry now on the server page.";
        assert_eq!(
            user_words(words, "failed"),
            format!(
                "Microsoft Graph refused to send from sales@contoso.example (403). {OPERATORS_TOLD_FAILED}"
            )
        );
        assert_eq!(
            user_words(words, "queued"),
            format!(
                "Microsoft Graph refused to send from sales@contoso.example (403). {OPERATORS_TOLD_WAITING}"
            )
        );
        // What is the author's to fix stays as it is.
        let theirs = "The SMTP server refused this mail: 550 5.1.1 Check the recipients and the content, then send it again.";
        assert_eq!(user_words(theirs, "failed"), theirs);
    }

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

//! One mail transaction on an open SMTP connection (RFC 5321 §3.3). Where the server offers
//! PIPELINING (RFC 2920; Exchange Online does), `MAIL FROM`, every `RCPT TO` and `DATA` go out
//! in one write and their replies are read in order, then the content, dot-stuffed and ended,
//! in one more write: two round trips per mail instead of lettre's four (and two writes instead
//! of five), which on a reused connection is most of what a mail costs the client and the
//! server. Elsewhere, and for mail that needs SMTPUTF8 or 8BITMIME, lettre's own transaction.

use lettre::address::Envelope;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension};
use lettre::transport::smtp::response::Response;
use std::time::Duration;

use crate::delivery::classify::{Observed, Stage};

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// `250`: the server took it.
    Sent(String),
    /// It did not go out: what was observed, for [`crate::delivery::classify::smtp`].
    Failed(SmtpFailure),
    /// Every connection slot of the mailbox stayed taken (by other processes): nothing was
    /// tried, the mail waits a little without spending an attempt.
    Busy(String),
    /// This worker's claim on the mail ran out and another worker took it over: not sent here.
    LeaseLost,
    /// Nothing was tried, for a reason of this CRM's, not the server's (its database did not
    /// answer when a connection slot was taken, the sender is stopping): the mail is given
    /// back, due at once, spending nothing.
    NotTried(String),
}

/// A failed attempt as observed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpFailure {
    /// The stage of the dialogue.
    pub stage: Stage,
    /// The reply's code; `None` when the line dropped, timed out or never opened.
    pub code: Option<u16>,
    /// The reply as on the wire, or what failed.
    pub text: String,
    /// The server offered no AUTH XOAUTH2.
    pub no_xoauth2: bool,
    /// The mail has an address with letters outside ASCII and the server offers no SMTPUTF8
    /// (RFC 6531): it cannot take this mail as it is; nothing was sent.
    pub needs_smtputf8: bool,
    /// The `user=` presented (the last one tried).
    pub auth_user: String,
}

impl SmtpFailure {
    pub(crate) fn network(stage: Stage, text: String) -> Self {
        Self {
            stage,
            code: None,
            text,
            no_xoauth2: false,
            needs_smtputf8: false,
            auth_user: String::new(),
        }
    }

    /// The mail needs SMTPUTF8 and the server does not offer it.
    fn needs_smtputf8(addresses: Vec<String>) -> Self {
        Self {
            needs_smtputf8: true,
            ..Self::network(
                Stage::Transaction,
                format!(
                    "the server does not offer SMTPUTF8, which {} needs",
                    addresses.join(", ")
                ),
            )
        }
    }

    /// What was observed, for the classification table.
    pub fn observed(&self) -> Observed<'_> {
        match self.code {
            _ if self.no_xoauth2 => Observed::NoXoauth2,
            _ if self.needs_smtputf8 => Observed::NeedsSmtpUtf8 { detail: &self.text },
            Some(code) => Observed::Reply {
                stage: self.stage,
                code,
                text: &self.text,
            },
            None => Observed::Network {
                stage: self.stage,
                detail: &self.text,
            },
        }
    }

    /// Whether the server refused the token itself (`535` at AUTH, SMTP AUTH not disabled):
    /// a token that was not just issued is refreshed once and tried again.
    pub fn refused_token(&self) -> bool {
        self.stage == Stage::Auth && self.code == Some(535) && !self.text.contains("5.7.139")
    }
}

/// The server's reply as it was on the wire (`432 4.3.2 ...`), else lettre's description.
fn error_text(e: &lettre::transport::smtp::Error) -> String {
    // lettre names a connection error once for itself and once for its source.
    let text = e
        .to_string()
        .replace("Connection error: Connection error: ", "Connection error: ");
    match (e.status(), text.split_once("): ")) {
        (Some(code), Some((_, message))) => format!("{code} {message}"),
        _ => text,
    }
}

/// What a lettre error shows: the reply (code and text) or a network failure, at `stage`.
pub(crate) fn failure(stage: Stage, e: &lettre::transport::smtp::Error) -> SmtpFailure {
    SmtpFailure {
        stage,
        code: e.status().and_then(|c| c.to_string().parse().ok()),
        text: error_text(e),
        no_xoauth2: false,
        needs_smtputf8: false,
        auth_user: String::new(),
    }
}

pub(crate) fn response_text(response: &lettre::transport::smtp::response::Response) -> String {
    format!(
        "{} {}",
        response.code(),
        response.message().collect::<Vec<_>>().join(" ")
    )
}

/// Mails up to this size go out pipelined. The pipelined content is written from a
/// dot-stuffed copy (and lettre copies a command once more), which costs nothing beside the
/// round trips saved on small mail; a larger one (files) goes through lettre's transaction,
/// which streams it with one copy, and round trips matter little beside its size.
pub const PIPELINED_MAX_BYTES: usize = 256 * 1024;

/// One mail for a transaction: its outbox id, envelope and bytes.
#[derive(Clone, Copy)]
pub(crate) struct Message<'a> {
    /// The outbox row.
    pub id: i64,
    /// MAIL FROM and RCPT TO.
    pub envelope: &'a Envelope,
    /// The message (RFC 5322), as stored.
    pub raw: &'a str,
}

/// An open connection and what its server offers beyond what lettre records.
pub(crate) struct Line {
    /// The connection (authenticated once it is handed to a send).
    pub conn: AsyncSmtpConnection,
    /// The server's EHLO reply listed PIPELINING.
    pub pipelining: bool,
    /// A transaction was left mid-`DATA` (a refusal came after the server accepted `DATA`):
    /// the connection cannot carry another mail and is closed, not kept.
    pub spoilt: bool,
    /// The mail (outbox id) whose MAIL FROM, RCPT TO and DATA went out behind the last
    /// content, their replies not read yet: the connection can carry only that mail next.
    pub pending: Option<i64>,
    /// Whether the content of the last transaction was written (before that, a dropped line
    /// means the mail was not sent at all).
    pub content_written: bool,
}

impl Line {
    /// Says EHLO again on `conn` (after TLS, before AUTH; lettre keeps only the extensions it
    /// knows) to learn whether the server offers PIPELINING.
    pub async fn open(
        mut conn: AsyncSmtpConnection,
        hello: &ClientId,
    ) -> Result<Self, lettre::transport::smtp::Error> {
        let reply = conn.command(Ehlo::new(hello.clone())).await?;
        Ok(Self {
            pipelining: offers_pipelining(&reply),
            conn,
            spoilt: false,
            pending: None,
            content_written: false,
        })
    }

    /// Whether the connection can carry another mail.
    pub fn reusable(&self) -> bool {
        !self.spoilt && !self.conn.has_broken()
    }

    /// The text of `mail` if it can be pipelined on this connection: the server offers
    /// PIPELINING, and the mail is plain ASCII (it needs no MAIL parameter) and at most
    /// [`PIPELINED_MAX_BYTES`].
    fn pipelinable<'m>(&self, mail: &Message<'m>) -> Option<&'m str> {
        let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
        let envelope = mail.envelope;
        (self.pipelining
            && mail.raw.len() <= PIPELINED_MAX_BYTES
            && mail.raw.is_ascii()
            && envelope.from().is_none_or(ascii)
            && envelope.to().iter().all(ascii))
        .then_some(mail.raw)
    }
}

/// Whether an EHLO reply lists the PIPELINING keyword (its first line is the greeting).
fn offers_pipelining(reply: &Response) -> bool {
    reply.message().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// Sends `mail` on `line`, waiting at most `timeout` for the whole exchange. With `next`, the
/// next mail's MAIL FROM, RCPT TO and DATA go out in the same write as this mail's content
/// (RFC 2920 allows content first in a group), when both can be pipelined: a mail then costs
/// one write and one read on a reused connection. The line's `pending` says whether they did;
/// a line with a pending mail must carry that mail next, or be closed.
pub(crate) async fn transact(
    line: &mut Line,
    mail: &Message<'_>,
    next: Option<&Message<'_>>,
    timeout: Duration,
) -> SendOutcome {
    line.content_written = false;
    let unicode = unicode_addresses(mail.envelope);
    if !unicode.is_empty()
        && !line
            .conn
            .server_info()
            .supports_feature(Extension::SmtpUtfEight)
    {
        // lettre would refuse it too, in words that read like a network failure.
        return SendOutcome::Failed(SmtpFailure::needs_smtputf8(unicode));
    }
    let exchange = async {
        match line.pipelinable(mail) {
            Some(text) => {
                let next = next.filter(|n| line.pipelinable(n).is_some());
                pipelined(line, mail, text, next).await
            }
            // lettre adds SMTPUTF8 or 8BITMIME where the server offers them, or says why not.
            None => {
                line.content_written = true;
                line.conn.send(mail.envelope, mail.raw.as_bytes()).await
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(response)) => SendOutcome::Sent(response_text(&response)),
        Ok(Err(e)) => SendOutcome::Failed(failure(Stage::Transaction, &e)),
        Err(_) => {
            // The server may be anywhere in the exchange: the line cannot be trusted.
            line.spoilt = true;
            line.pending = None;
            SendOutcome::Failed(SmtpFailure::network(
                Stage::Transaction,
                "the SMTP server did not answer in time".into(),
            ))
        }
    }
}

/// The addresses of `envelope` with letters outside ASCII (their domains are in ASCII already,
/// `outbox::compose`; what is left is before the @).
fn unicode_addresses(envelope: &Envelope) -> Vec<String> {
    envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .map(AsRef::<str>::as_ref)
        .filter(|a| !a.is_ascii())
        .map(str::to_string)
        .collect()
}

/// MAIL FROM, every RCPT TO and DATA of `envelope`, as written in one group.
fn commands(envelope: &Envelope) -> String {
    let mut commands = Mail::new(envelope.from().cloned(), Vec::new()).to_string();
    for to in envelope.to() {
        commands.push_str(&Rcpt::new(to.clone(), Vec::new()).to_string());
    }
    commands.push_str(&Data.to_string());
    commands
}

/// The pipelined transaction. The first refusal decides, as in lettre's `send`; after one the
/// connection is closed (politely unless the server already accepted `DATA`, when closing it
/// is the only way to abandon the content without sending it).
async fn pipelined(
    line: &mut Line,
    mail: &Message<'_>,
    text: &str,
    next: Option<&Message<'_>>,
) -> Result<Response, lettre::transport::smtp::Error> {
    // This mail's commands went out behind the previous content, or go out now.
    let mut written = match line.pending.take() {
        Some(id) if id == mail.id => None,
        _ => Some(line.conn.command(Verbatim(&commands(mail.envelope))).await),
    };
    let conn = &mut line.conn;
    // The replies to MAIL FROM, each RCPT TO and DATA, in order.
    let count = mail.envelope.to().len() + 2;
    let (mut refused, mut data_accepted) = (None, false);
    for k in 0..count {
        let reply = match written.take() {
            Some(reply) => reply,
            None => conn.read_response().await,
        };
        match reply {
            Ok(_) => data_accepted = k + 1 == count,
            // The line dropped or the reply made no sense: nothing more can be read. A server
            // that refused a command and closed (`421`) said why in that refusal.
            Err(e) if e.status().is_none() => {
                line.spoilt = true;
                return Err(refused.unwrap_or(e));
            }
            Err(e) => {
                refused.get_or_insert(e);
            }
        }
    }
    if let Some(first) = refused {
        if data_accepted {
            // The server waits for content that must not go to the other recipients.
            line.spoilt = true;
        } else {
            conn.abort().await;
        }
        return Err(first);
    }
    let mut content = dot_stuffed(text);
    if let Some(next) = next {
        content.push_str(&commands(next.envelope));
    }
    line.content_written = true;
    match conn.command(Verbatim(&content)).await {
        Ok(response) => {
            line.pending = next.map(|n| n.id);
            Ok(response)
        }
        // Refused: the transaction is over; the next mail's commands, if written, stand.
        Err(e) if e.status().is_some() && next.is_some() => {
            line.pending = next.map(|n| n.id);
            Err(e)
        }
        Err(e) if e.status().is_some() => {
            conn.abort().await;
            Err(e)
        }
        Err(e) => {
            line.spoilt = true;
            Err(e)
        }
    }
}

/// Text written as it is, for [`AsyncSmtpConnection::command`] (which writes a command's
/// `Display` in one write and reads one reply).
pub(crate) struct Verbatim<'a>(pub &'a str);

impl std::fmt::Display for Verbatim<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The content of `DATA` as it goes on the wire (RFC 5321 §4.5.2): a `.` that begins a line
/// is doubled, and `CRLF . CRLF` ends it (after a line end of its own, as lettre ends it).
fn dot_stuffed(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    if text.starts_with('.') {
        out.push('.');
    }
    let mut rest = text;
    while let Some(at) = rest.find("\r\n.") {
        out.push_str(&rest[..at + 3]);
        out.push('.');
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out.push_str("\r\n.\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_that_begin_a_line_are_doubled_and_the_content_is_ended() {
        assert_eq!(
            dot_stuffed(".a\r\nb\r\n.\r\n..c"),
            "..a\r\nb\r\n..\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuffed("a.b\r\n"), "a.b\r\n\r\n.\r\n");
        // Only CRLF ends a line (a bare LF does not, as in lettre's codec).
        assert_eq!(dot_stuffed("a\n.b"), "a\n.b\r\n.\r\n");
        assert_eq!(dot_stuffed("a\r.b"), "a\r.b\r\n.\r\n");
    }

    #[test]
    fn pipelining_is_read_from_the_ehlo_keywords_not_the_greeting() {
        let reply = |lines: &[&str]| {
            Response::new(
                lettre::transport::smtp::response::Code::new(
                    lettre::transport::smtp::response::Severity::PositiveCompletion,
                    lettre::transport::smtp::response::Category::MailSystem,
                    lettre::transport::smtp::response::Detail::Zero,
                ),
                lines.iter().map(|l| l.to_string()).collect(),
            )
        };
        assert!(offers_pipelining(&reply(&[
            "smtp.office365.com Hello [203.0.113.5]",
            "SIZE 157286400",
            "PIPELINING",
            "AUTH LOGIN XOAUTH2",
        ])));
        assert!(!offers_pipelining(&reply(&[
            "PIPELINING.example Hello",
            "SIZE 1000",
            "8BITMIME",
        ])));
    }
}

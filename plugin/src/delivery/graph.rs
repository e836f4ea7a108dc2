//! The Microsoft Graph side of the transport seam: each message goes as
//! `POST {graph}/v1.0/{me|users/{mailbox}}/sendMail` with the same RFC 5322 bytes the SMTP path
//! sends (base64, `Content-Type: text/plain`), `202 Accepted` meaning sent. A batch goes over
//! at most [`CONNECTIONS_PER_MAILBOX`] requests at once, counted across processes by the
//! mailbox's sending slots (Graph allows 4 per mailbox). sendMail is not idempotent: a message
//! tried before is first looked for in the mailbox's Sent Items by its `internetMessageId`, and
//! recorded as sent when it is there. Source: MICROSOFT.md › Microsoft Graph mail.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::future::BoxFuture;
use secrecy::ExposeSecret;

use crate::delivery::classify::Level;
use crate::delivery::graph_replies::{self, GraphReply};
use crate::delivery::smtp::{CONNECTIONS_PER_MAILBOX, SendOutcome, SmtpSender};
use crate::delivery::transport::{
    Batch, BatchResult, MessageResult, Prepared, Progress, Stop, Transport,
};
use crate::settings::OutlookSettings;
use crate::tokens::store::AccessToken;

/// Graph's limit of one request's body, in bytes (MICROSOFT.md: 4 MB).
pub const GRAPH_REQUEST_LIMIT: usize = 4 * 1024 * 1024;

/// Files from this size go through an upload session; smaller ones in one request (Graph:
/// upload sessions for files of 3 MB and more).
pub const UPLOAD_SESSION_FROM: usize = 3 * 1024 * 1024;

/// The bytes of one upload `PUT`: 12 × 320 KiB (Graph wants multiples of 320 KiB, at most
/// 4 MB per request).
pub const UPLOAD_CHUNK: usize = 12 * 320 * 1024;

/// How long one request may take before its answer counts as lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a message waits for a free sending slot before the rest of the batch waits in the
/// queue instead.
const SLOT_WAIT: Duration = Duration::from_secs(20);

/// Sends through Microsoft Graph.
pub struct GraphSender {
    pub(crate) http: reqwest::Client,
    slots: std::sync::Arc<SmtpSender>,
}

/// What one request came to.
pub(crate) enum Answer {
    /// `202 Accepted`, or found in Sent Items.
    Sent(String),
    /// A Graph error answer.
    Refused(GraphReply),
    /// Nothing was sent: Graph could not be reached at the mail's first request.
    Unreachable(String),
    /// Nothing was sent: a later request of the mail (a file, its upload, the send of its
    /// draft) could not connect, after Graph had answered its first: this mail's retry.
    ConnectionLost(String),
    /// Sent, but no answer came: it may have been taken.
    Unknown(String),
}

impl GraphSender {
    /// A sender whose requests share `slots`' per-mailbox sending slots.
    pub fn new(slots: std::sync::Arc<SmtpSender>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { http, slots }
    }

    /// `{graph}/v1.0/users/{mailbox}`: the server's mailbox by address, whoever signed in (the
    /// mailbox itself, a delegate with `Mail.Send.Shared`, or the app with an app-only token).
    fn mailbox_url(base: &str, mailbox: &str) -> String {
        format!(
            "{base}/v1.0/users/{}",
            url::form_urlencoded::byte_serialize(mailbox.as_bytes()).collect::<String>()
        )
    }

    /// Whether `message_id` is in the mailbox's Sent Items (`$filter=internetMessageId eq`).
    async fn in_sent_items(&self, url: &str, batch: &Batch<'_>, message_id: &str) -> Answer {
        let filter = by_internet_message_id(message_id);
        let response = self
            .http
            .get(format!("{url}/mailFolders/SentItems/messages"))
            .query(&[
                ("$filter", filter.as_str()),
                ("$select", "id,internetMessageId"),
            ])
            .bearer_auth(batch.token.token.expose_secret())
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => {
                let found = r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["value"].as_array().map(|a| !a.is_empty()));
                match found {
                    Some(true) => {
                        Answer::Sent("found in Sent Items (sent by an earlier attempt)".into())
                    }
                    Some(false) => Answer::Sent(String::new()),
                    // Not knowing is not "not there": the mail is not sent again yet.
                    None => Answer::Unknown("the Sent Items answer could not be read".into()),
                }
            }
            Ok(r) => Answer::Refused(reply_of(r).await),
            Err(e) if e.is_connect() => Answer::Unreachable(words(e)),
            Err(e) => Answer::Unknown(words(e)),
        }
    }

    /// Sends one message (after looking for it in Sent Items if it was tried before).
    async fn send_one(&self, url: &str, batch: &Batch<'_>, message: &Prepared) -> Answer {
        if message.tried_before {
            match self.in_sent_items(url, batch, &message.message_id).await {
                Answer::Sent(found) if !found.is_empty() => return Answer::Sent(found),
                Answer::Sent(_) => {}
                other => return other,
            }
        }
        let raw = with_bcc(message);
        let body = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
        if body.len() > GRAPH_REQUEST_LIMIT {
            drop(body);
            if message.tried_before {
                // An earlier attempt may have left its draft (its process died, or its send got
                // no answer and the mail was not in Sent Items): it goes before a new one is made.
                self.delete_drafts_of(url, batch, &message.message_id).await;
            }
            return self.send_as_draft(url, batch, &raw).await;
        }
        let response = self
            .http
            .post(format!("{url}/sendMail"))
            .bearer_auth(batch.token.token.expose_secret())
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await;
        match response {
            Ok(r) if r.status().as_u16() == 202 => Answer::Sent("202 Accepted".into()),
            Ok(r) => Answer::Refused(reply_of(r).await),
            Err(e) if e.is_connect() => Answer::Unreachable(words(e)),
            Err(e) => Answer::Unknown(words(e)),
        }
    }
}

/// The OData `$filter` that finds a message by its Message-ID (`message_id` without `<>`; a
/// `'` in it doubled, as OData quotes).
pub(crate) fn by_internet_message_id(message_id: &str) -> String {
    format!(
        "internetMessageId eq '<{}>'",
        message_id.replace('\'', "''")
    )
}

/// A transport error in words, without its URL (an upload session's URL carries a token).
pub(crate) fn words(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

/// The message as Graph must get it: the stored bytes, with a `Bcc:` field naming the envelope
/// recipients that no To or Cc field names (lettre leaves Bcc out of the message, and Graph
/// reads the recipients from the message; Exchange removes the field before delivery).
fn with_bcc(message: &Prepared) -> std::borrow::Cow<'_, str> {
    let Some(parsed) = mail_parser::MessageParser::default().parse_headers(message.raw.as_bytes())
    else {
        return std::borrow::Cow::Borrowed(&message.raw);
    };
    let mut named: Vec<String> = Vec::new();
    for list in [parsed.to(), parsed.cc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(address) = a.address() {
                named.push(address.to_ascii_lowercase());
            }
        }
    }
    let bcc: Vec<String> = message
        .envelope
        .to()
        .iter()
        .map(|a| a.to_string())
        .filter(|a| !named.contains(&a.to_ascii_lowercase()))
        .collect();
    if bcc.is_empty() {
        return std::borrow::Cow::Borrowed(&message.raw);
    }
    std::borrow::Cow::Owned(format!("Bcc: {}\r\n{}", bcc.join(", "), message.raw))
}

/// What a connection test's read of a mailbox's Sent Items came to.
#[derive(Debug, Clone)]
pub enum GraphProbe {
    /// Graph answered the read (`200 OK`): the token works on the mailbox.
    Read {
        /// The HTTP status.
        status: u16,
    },
    /// A Graph error answer.
    Refused(GraphReply),
    /// Graph could not be reached, or gave no answer.
    Unreachable(String),
}

impl GraphSender {
    /// `GET {graph}/v1.0/users/{mailbox}/mailFolders/SentItems/messages?$top=1`: proves that
    /// `token` works on the mailbox (it needs the Mail.ReadWrite the connect flow asks for);
    /// sends nothing.
    pub async fn probe(&self, graph_url: &str, mailbox: &str, token: &AccessToken) -> GraphProbe {
        let url = Self::mailbox_url(graph_url.trim_end_matches('/'), mailbox);
        let response = self
            .http
            .get(format!("{url}/mailFolders/SentItems/messages"))
            .query(&[("$top", "1"), ("$select", "id")])
            .bearer_auth(token.token.expose_secret())
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => GraphProbe::Read {
                status: r.status().as_u16(),
            },
            Ok(r) => GraphProbe::Refused(reply_of(r).await),
            Err(e) => GraphProbe::Unreachable(words(e)),
        }
    }
}

/// Graph's error answer: status, `error.code`, `error.message`, `Retry-After`.
pub(crate) async fn reply_of(response: reqwest::Response) -> GraphReply {
    let status = response.status().as_u16();
    let retry_after_secs = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    GraphReply {
        status,
        code: body["error"]["code"].as_str().unwrap_or("").to_string(),
        message: body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect(),
        retry_after_secs,
    }
}

/// What an answer means for the message and the batch.
fn settle(batch: &Batch<'_>, progress: &Progress, index: usize, answer: Answer) {
    let message = &batch.messages[index];
    match answer {
        Answer::Sent(reply) => progress.set(batch, index, MessageResult::Sent(reply)),
        Answer::Refused(reply) if reply.refused_token() && !batch.token.refreshed => {
            progress.stop(Stop::TokenRefused);
        }
        Answer::Refused(reply) => {
            let verdict = graph_replies::classify(&reply, &batch.server.mailbox, &message.from);
            match verdict.level {
                Level::MailFails | Level::MailRetries => progress.set(
                    batch,
                    index,
                    MessageResult::Refused {
                        verdict,
                        reply: Some(reply.text()),
                    },
                ),
                Level::MailboxHeld(_) | Level::MailboxThrottled => progress.stop(Stop::Mailbox {
                    verdict,
                    reply: Some(reply.text()),
                }),
            }
        }
        // Nothing reached Graph: the mailbox waits (the message spends no attempt).
        Answer::Unreachable(detail) => progress.stop(Stop::Mailbox {
            verdict: graph_replies::unreachable(&detail),
            reply: None,
        }),
        Answer::ConnectionLost(detail) => progress.set(
            batch,
            index,
            MessageResult::Refused {
                verdict: graph_replies::connection_lost(&detail),
                reply: None,
            },
        ),
        Answer::Unknown(detail) => {
            let verdict = graph_replies::unknown(&detail);
            progress.set(
                batch,
                index,
                MessageResult::Refused {
                    verdict,
                    reply: None,
                },
            );
        }
    }
}

/// One sending slot's share of the batch: the next message until none is left or the batch
/// stopped; only one message when `once`.
async fn lane(sender: &GraphSender, url: &str, batch: &Batch<'_>, progress: &Progress, once: bool) {
    let slot = match sender
        .slots
        .mailbox_slot(batch.ctx, batch.server.id, Instant::now() + SLOT_WAIT)
        .await
    {
        Ok(slot) => slot,
        Err(SendOutcome::Busy(_)) => {
            progress.stop(Stop::Busy);
            return;
        }
        Err(_) => {
            progress.stop(Stop::Halted);
            return;
        }
    };
    loop {
        if progress.stopped() {
            return;
        }
        if slot.lost() || batch.halt.load(Ordering::SeqCst) || batch.stopping.load(Ordering::SeqCst)
        {
            progress.stop(Stop::Halted);
            return;
        }
        let index = progress.take_next();
        let Some(message) = batch.messages.get(index) else {
            return;
        };
        let Some(turn) = batch.turn().await else {
            progress.stop(Stop::Halted);
            return;
        };
        let answer = sender.send_one(url, batch, message).await;
        settle(batch, progress, index, answer);
        progress.end_turn(index, turn);
        if once {
            return;
        }
    }
}

impl Transport for GraphSender {
    fn send<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, BatchResult> {
        Box::pin(async move {
            let count = batch.messages.len();
            let progress = Progress::new(count);
            let Ok(settings) = OutlookSettings::load(batch.ctx).await else {
                // The token step checks the settings first; should they go meanwhile, wait.
                progress.stop(Stop::Halted);
                return BatchResult {
                    results: vec![MessageResult::NotTried; count],
                    stop: Some(Stop::Halted),
                };
            };
            let url = Self::mailbox_url(
                settings.graph_url.trim_end_matches('/'),
                &batch.server.mailbox,
            );
            // One message first: the others fan out only once Graph was reached.
            lane(self, &url, &batch, &progress, true).await;
            let lanes = Ord::min(CONNECTIONS_PER_MAILBOX, count.saturating_sub(1));
            futures::future::join_all(
                (0..lanes).map(|_| lane(self, &url, &batch, &progress, false)),
            )
            .await;
            progress.into_result()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_id_is_quoted_as_odata_quotes_it() {
        assert_eq!(
            by_internet_message_id("a'b@contoso.example"),
            "internetMessageId eq '<a''b@contoso.example>'"
        );
    }
}

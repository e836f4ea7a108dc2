//! The transport seam: how a batch of one mailbox's prepared messages leaves, whatever carries
//! it (SMTP with XOAUTH2 now; Microsoft Graph next). A transport sends and classifies; the drain
//! decides what each outcome does to the outbox rows and to the mailbox's health.

use std::sync::atomic::AtomicBool;

use crm_sdk::ModuleContext;
use futures::future::BoxFuture;
use lettre::address::Envelope;

use crate::delivery::classify::Verdict;
use crate::entities::mail_server;
use crate::tokens::store::AccessToken;

/// One message ready to go: its outbox id, envelope (RFC 5321 MAIL FROM and RCPT TO) and
/// bytes (RFC 5322, as built at queue time).
#[derive(Clone)]
pub struct Prepared {
    /// The outbox row.
    pub id: i64,
    /// The envelope sender and recipients.
    pub envelope: Envelope,
    /// The envelope sender as stored (for the classification's facts).
    pub from: String,
    /// The message.
    pub raw: String,
    /// Its `Message-ID`, without `<>` (Graph's Sent Items are searched by it).
    pub message_id: String,
    /// Whether it may have been sent already: tried in an earlier attempt (attempts counts this
    /// one), or given an outcome before and queued again from the outbox (Retry resets the
    /// attempts, not the last reply or error).
    pub tried_before: bool,
}

/// What the transport says of one message.
#[derive(Debug, Clone)]
pub enum MessageResult {
    /// The server took it; its reply (`250 2.0.0 OK ...`, or Graph's `202 Accepted`).
    Sent(String),
    /// The server refused this message; the verdict is of the message's level (it fails or is
    /// retried), with the server's reply when there was one.
    Refused {
        /// The classification.
        verdict: Verdict,
        /// The reply as it came, if any.
        reply: Option<String>,
    },
    /// Not tried: the batch stopped before it ([`Stop`] says why).
    NotTried,
}

/// Why a batch stopped before its end: the messages not tried wait (no attempt spent).
#[derive(Debug, Clone)]
pub enum Stop {
    /// The server refused the token itself and the token was not just issued: refresh it once
    /// and send the rest again.
    TokenRefused,
    /// A refusal of the mailbox (its token, account, tenant or quota): hold or throttle it.
    Mailbox {
        /// The classification (its level is `MailboxHeld` or `MailboxThrottled`).
        verdict: Verdict,
        /// The reply as it came, if any.
        reply: Option<String>,
    },
    /// No connection came free in time (every one of the mailbox's connections is in use, by
    /// this process or others): the rest wait a moment.
    Busy,
    /// Nothing more may be sent: the drain's claim was lost, its outcomes cannot be written
    /// now, or the process is stopping. The mails not tried wait (another worker's claim, if
    /// any, keeps them).
    Halted,
}

/// What became of a batch: one result per message, in the batch's order (each also reported as
/// it came), and why it stopped early, if it did.
#[derive(Debug)]
pub struct BatchResult {
    /// One per message of the batch.
    pub results: Vec<MessageResult>,
    /// Set when the batch stopped before its end.
    pub stop: Option<Stop>,
}

/// A batch to send through one mailbox.
pub struct Batch<'a> {
    /// The module's context.
    pub ctx: &'a ModuleContext,
    /// The mailbox (mail server row).
    pub server: &'a mail_server::Model,
    /// A fresh access token for it.
    pub token: &'a AccessToken,
    /// The messages, in queue order.
    pub messages: &'a [Prepared],
    /// When the batch was claimed (the module's clock): what an earlier attempt of one of its
    /// mails left behind is older.
    pub claimed_at: chrono::DateTime<chrono::Utc>,
    /// Set when nothing more may be sent (the claim was lost, outcomes cannot be written).
    pub halt: &'a AtomicBool,
    /// Set when the process stops its drains.
    pub stopping: &'a AtomicBool,
    /// Where each message's result goes as soon as it is known (by outbox id), so that the
    /// drain writes outcomes while the batch is still being sent.
    pub report: &'a Report,
    /// Turns to send: one is taken before a message is sent and comes back once its outcome
    /// is written ([`UNWRITTEN_PER_MAILBOX`] in all), so that a process killed at any moment
    /// leaves at most that many of a mailbox's mails accepted by the server but not recorded
    /// (those are sent again).
    pub window: &'a tokio::sync::Semaphore,
}

/// At most this many of a mailbox's mails are sent and not yet recorded, per process. Large
/// enough that a mailbox's connections never wait for the database in normal operation (a
/// window of 6 cut the drain on SQLite from about 10,000 to 4,100 mails/s: every lane waited
/// for each commit), small enough to bound what a process killed while its writes lag can
/// send twice.
pub const UNWRITTEN_PER_MAILBOX: usize = 64;

impl Batch<'_> {
    /// Waits for a turn to send one message; `None` once the batch must halt or the process
    /// stops. The caller forgets the permit when the message's result was reported (the
    /// drain gives it back after writing the outcome) and drops it otherwise.
    pub async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        use std::sync::atomic::Ordering;
        loop {
            if self.halt.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
                return None;
            }
            let wait = std::time::Duration::from_millis(250);
            match tokio::time::timeout(wait, self.window.acquire()).await {
                Ok(Ok(permit)) => return Some(permit),
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
    }
}

/// The channel a transport reports each message's result on, as it comes.
pub type Report = tokio::sync::mpsc::UnboundedSender<(i64, MessageResult)>;

/// Sends a batch of one mailbox's messages and classifies each outcome.
pub trait Transport: Send + Sync {
    /// Sends `batch`; never fails as a whole (a problem is a [`Stop`] or per-message result).
    fn send<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, BatchResult>;
}

/// A batch's shared progress, for a transport that sends it over several lanes: the next
/// message to take, one result per message, and why the batch stopped (the first reason).
pub(crate) struct Progress {
    next: std::sync::atomic::AtomicUsize,
    results: std::sync::Mutex<Vec<MessageResult>>,
    stop: std::sync::Mutex<Option<Stop>>,
}

impl Progress {
    /// Nothing sent yet for `count` messages.
    pub(crate) fn new(count: usize) -> Self {
        Self {
            next: std::sync::atomic::AtomicUsize::new(0),
            results: std::sync::Mutex::new(vec![MessageResult::NotTried; count]),
            stop: std::sync::Mutex::new(None),
        }
    }

    /// The index of the next message to send (past the end when none is left).
    pub(crate) fn take_next(&self) -> usize {
        self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the batch stopped.
    pub(crate) fn stopped(&self) -> bool {
        self.stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Stops the batch for `why`, unless it stopped already.
    pub(crate) fn stop(&self, why: Stop) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if stop.is_none() {
            *stop = Some(why);
        }
    }

    /// Records and reports the result of message `index`.
    pub(crate) fn set(&self, batch: &Batch<'_>, index: usize, result: MessageResult) {
        let _ = batch
            .report
            .send((batch.messages[index].id, result.clone()));
        self.results.lock().unwrap_or_else(|e| e.into_inner())[index] = result;
    }

    /// Ends the turn message `index` was sent with: a reported result keeps it taken (the
    /// drain gives it back once the outcome is written); otherwise it comes back now.
    pub(crate) fn end_turn(&self, index: usize, turn: tokio::sync::SemaphorePermit<'_>) {
        let reported = !matches!(
            self.results.lock().unwrap_or_else(|e| e.into_inner())[index],
            MessageResult::NotTried
        );
        if reported {
            turn.forget();
        }
    }

    /// The batch's outcome.
    pub(crate) fn into_result(self) -> BatchResult {
        BatchResult {
            results: self.results.into_inner().unwrap_or_else(|e| e.into_inner()),
            stop: self.stop.into_inner().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

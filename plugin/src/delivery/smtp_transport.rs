//! The SMTP side of the transport seam: a batch goes out over up to three of the mailbox's
//! connections at once (Exchange Online's limit per mailbox, counted across processes by the
//! connection slots), each reused from one message to the next, and every refusal is
//! classified by the SMTP table ([`crate::delivery::classify::smtp`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::delivery::classify::{self, Facts, Level};
use crate::delivery::smtp::{CONNECTIONS_PER_MAILBOX, SendOutcome, SmtpFailure, SmtpSender};
use crate::delivery::smtp_transaction::Message;
use crate::delivery::transport::{
    Batch, BatchResult, MessageResult, Prepared, Progress, Stop, Transport,
};

/// How long one message waits for a free connection before the rest of the batch waits in
/// the queue instead.
const CONNECTION_WAIT: Duration = Duration::from_secs(20);

/// What one failed send means: a result for the message, or a stop of the batch.
fn classify_failure(batch: &Batch<'_>, from: &str, f: &SmtpFailure) -> Result<MessageResult, Stop> {
    if f.refused_token() && !batch.token.refreshed {
        return Err(Stop::TokenRefused);
    }
    let server = batch.server;
    let facts = Facts {
        mailbox: &server.mailbox,
        from,
        auth_user: if f.auth_user.is_empty() {
            &server.mailbox
        } else {
            &f.auth_user
        },
    };
    let verdict = classify::smtp(f.observed(), &facts);
    let reply = f.code.is_some().then(|| f.text.clone());
    match verdict.level {
        Level::MailFails | Level::MailRetries => Ok(MessageResult::Refused { verdict, reply }),
        Level::MailboxHeld(_) | Level::MailboxThrottled => Err(Stop::Mailbox { verdict, reply }),
    }
}

/// One connection's share of the batch: takes the next message until none is left, the batch
/// stopped, or (`once`) one message was tried. Where the server pipelines, the commands of the
/// lane's next message go out with the content of the current one, on the connection the
/// lane keeps between its sends.
async fn lane(sender: &SmtpSender, batch: &Batch<'_>, progress: &Progress, once: bool) {
    let mut held = None;
    // The turn of the lane's next message, taken before its commands go out behind the
    // current content: the server then waits in DATA for that content, which must not wait
    // for outcome writes.
    let mut next_turn = None;
    let mut index = progress.take_next();
    loop {
        if progress.stopped() {
            return;
        }
        if batch.halt.load(Ordering::SeqCst) || batch.stopping.load(Ordering::SeqCst) {
            progress.stop(Stop::Halted);
            return;
        }
        let Some(message) = batch.messages.get(index) else {
            return;
        };
        let turn = match next_turn.take() {
            Some(turn) => turn,
            None => match batch.turn().await {
                Some(turn) => turn,
                None => {
                    progress.stop(Stop::Halted);
                    return;
                }
            },
        };
        let following = (!once).then(|| progress.take_next());
        let next = following.and_then(|k| batch.messages.get(k)).and_then(|m| {
            next_turn = batch.window.try_acquire().ok();
            next_turn.as_ref().map(|_| as_message(m))
        });
        let deadline = Instant::now() + CONNECTION_WAIT;
        let outcome = sender
            .send(
                batch.ctx,
                batch.server,
                batch.token,
                (&as_message(message), next.as_ref()),
                &mut held,
                deadline,
                batch.halt,
            )
            .await;
        match outcome {
            SendOutcome::Sent(reply) => progress.set(batch, index, MessageResult::Sent(reply)),
            // A connection that failed before the server answered holds the mailbox (the
            // `unreachable` rule): the message is not this failure's, it spends no attempt.
            SendOutcome::Failed(f) => match classify_failure(batch, &message.from, &f) {
                Ok(result) => progress.set(batch, index, result),
                Err(stop) => progress.stop(stop),
            },
            SendOutcome::Busy(_) => progress.stop(Stop::Busy),
            SendOutcome::LeaseLost | SendOutcome::NotTried(_) => progress.stop(Stop::Halted),
        }
        progress.end_turn(index, turn);
        match following {
            Some(k) => index = k,
            None => return,
        }
    }
}

fn as_message(p: &Prepared) -> Message<'_> {
    Message {
        id: p.id,
        envelope: &p.envelope,
        raw: &p.raw,
    }
}

impl Transport for SmtpSender {
    fn send<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, BatchResult> {
        Box::pin(async move {
            let count = batch.messages.len();
            let progress = Progress::new(count);
            // One message first: the others fan out over more connections only once the
            // server was reached (an unreachable one is then met by one connection, not three).
            lane(self, &batch, &progress, true).await;
            let lanes = Ord::min(CONNECTIONS_PER_MAILBOX, count.saturating_sub(1));
            futures::future::join_all((0..lanes).map(|_| lane(self, &batch, &progress, false)))
                .await;
            progress.into_result()
        })
    }
}

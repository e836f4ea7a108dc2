//! Draining one mailbox: claim a batch of its due mails, take its token once, send the batch
//! through its transport, write the outcomes in as few statements as their kinds; again until
//! no mail of the mailbox is due. A refusal of one message fails or retries that message; a
//! refusal of the mailbox holds or throttles it and the rest of the batch waits without
//! spending an attempt.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use lettre::Address;
use lettre::address::Envelope;
use rand::Rng;

use crate::classify::{Level, Verdict, Who};
use crate::delivery::limits::{Limits, backoff, limits};
use crate::delivery::transport::{Batch, BatchResult, MessageResult, Prepared, Stop, Transport};
use crate::entities::{mail_server, outbox};
use crate::outbox::claims::{self, Claim, Claimed, LeaseKeeper, Outcome};
use crate::runtime::Shared;
use crate::token_service::{AccessToken, TokenProblem, fresh_access_token};

/// What a drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Mails the server took.
    pub sent: usize,
    /// Mails failed for good.
    pub failed: usize,
    /// Mails to be tried again, or waiting for their mailbox.
    pub again: usize,
}

/// Drains `server_id`: batch after batch until none of its mails is due, its mailbox is held
/// or throttled, or the process stops. At its per-minute limit the drain ends and wakes the
/// mailbox again when the window frees.
pub async fn drain(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server_id: i32,
) -> Result<Drained, sea_orm::DbErr> {
    let mut total = Drained::default();
    while !shared.stopping() {
        let limits = limits(ctx, shared).await;
        let claimed = match claims::claim_batch(ctx, shared, server_id, limits.per_minute).await? {
            Claim::Nothing => break,
            Claim::AtLimit(until) => {
                wake_at(ctx, shared, server_id, until);
                break;
            }
            Claim::Batch(claimed) => claimed,
        };
        let (step, go_on) = send_batch(ctx, shared, server_id, &claimed, &limits).await?;
        total.sent += step.sent;
        total.failed += step.failed;
        total.again += step.again;
        if !go_on {
            break;
        }
    }
    Ok(total)
}

/// Wakes `server_id`'s drain in this process at `until` (the sweep would, within seconds).
fn wake_at(ctx: &ModuleContext, shared: &Arc<Shared>, server_id: i32, until: DateTime<Utc>) {
    let wait = (until - ctx.clock().now())
        .to_std()
        .unwrap_or_default()
        .min(std::time::Duration::from_secs(60));
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        shared.wake(server_id).await;
    });
}

/// The envelope of a stored mail.
fn envelope_of(row: &outbox::Model) -> Result<Envelope, lettre::error::Error> {
    let from: Option<Address> = row.envelope_from.parse().ok();
    let to: Vec<Address> = row
        .recipients
        .lines()
        .filter_map(|r| r.parse().ok())
        .collect();
    Envelope::new(from, to)
}

/// One claimed mail's attempt, and what it may spend.
struct Attempt<'a> {
    row: &'a outbox::Model,
    max_attempts: i32,
    retry_base_secs: i64,
    now: DateTime<Utc>,
}

/// An outcome, and who must act when the mail failed for good.
struct Decided {
    outcome: Outcome,
    failed_for: Option<Who>,
}

impl Attempt<'_> {
    fn outcome(
        &self,
        status: &'static str,
        reply: Option<String>,
        error: Option<String>,
    ) -> Outcome {
        Outcome {
            id: self.row.id,
            status,
            next_attempt_at: None,
            last_reply: reply,
            last_error: error,
            uncount: false,
        }
    }

    fn sent(&self, reply: String) -> Decided {
        Decided {
            outcome: self.outcome("sent", Some(reply), None),
            failed_for: None,
        }
    }

    fn failed(&self, reply: Option<String>, why: String, who: Who) -> Decided {
        Decided {
            outcome: self.outcome("failed", reply, Some(why)),
            failed_for: Some(who),
        }
    }

    fn retry_or_fail(&self, reply: Option<String>, error: String) -> Decided {
        if self.row.attempts >= self.max_attempts {
            let why = format!("Gave up after {} attempts: {error}", self.row.attempts);
            return self.failed(reply, why, Who::Nobody);
        }
        let mut outcome = self.outcome("queued", reply, Some(error));
        outcome.next_attempt_at = Some(self.now + backoff(self.retry_base_secs, self.row.attempts));
        Decided {
            outcome,
            failed_for: None,
        }
    }

    /// The mail waits for its mailbox, spending no attempt.
    fn wait(
        &self,
        until: Option<DateTime<Utc>>,
        reply: Option<String>,
        why: Option<String>,
    ) -> Decided {
        let mut outcome = self.outcome("queued", reply, why);
        outcome.next_attempt_at = Some(until.unwrap_or(self.now));
        outcome.uncount = true;
        Decided {
            outcome,
            failed_for: None,
        }
    }

    /// What a token problem does to the mail (a hold was recorded by the token service).
    fn token_problem(&self, problem: &TokenProblem) -> Decided {
        match problem {
            TokenProblem::Held(v) => {
                let until = v.hold_for.map(|d| self.now + d);
                self.wait(until, None, Some(v.words()))
            }
            TokenProblem::Transient {
                retry_after_secs, ..
            } => {
                let mut d = self.retry_or_fail(None, problem.to_string());
                if let (Some(secs), Some(at)) = (retry_after_secs, d.outcome.next_attempt_at) {
                    d.outcome.next_attempt_at =
                        Some(Ord::max(at, self.now + Duration::seconds(*secs as i64)));
                }
                d
            }
            TokenProblem::Database(_) => self.retry_or_fail(None, problem.to_string()),
        }
    }

    /// What a message-level refusal does to the mail.
    fn refused(&self, verdict: &Verdict, reply: Option<String>) -> Decided {
        match verdict.level {
            Level::MailFails => self.failed(reply, verdict.words(), verdict.who),
            _ => self.retry_or_fail(reply, verdict.words()),
        }
    }
}

/// Sends one claimed batch and writes its outcomes; says what happened and whether the drain
/// goes on (not after a stop: a held or throttled mailbox, no free connection, a lost claim).
async fn send_batch(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server_id: i32,
    claimed: &Claimed,
    limits: &Limits,
) -> Result<(Drained, bool), sea_orm::DbErr> {
    let lease_length =
        std::time::Duration::from_secs(Ord::max(shared.options.lease_secs, 1) as u64);
    let lease = LeaseKeeper::start(ctx, claimed, lease_length);
    let now = ctx.clock().now();
    let attempt = |row| Attempt {
        row,
        max_attempts: limits.max_attempts,
        retry_base_secs: shared.options.retry_base_secs,
        now,
    };
    let Some(server) = shared.server(ctx, server_id).await? else {
        // A deleted server is the operators' matter, not the authors'.
        let decided = claimed
            .rows
            .iter()
            .map(|row| {
                let why = "The mail server of this mail was deleted.".to_string();
                attempt(row).failed(None, why, Who::Operator)
            })
            .collect();
        return finish(ctx, shared, claimed, decided, limits, None).await;
    };
    let mut decided: Vec<Option<Decided>> = claimed.rows.iter().map(|_| None).collect();
    let mut bodies =
        claims::bodies(ctx, &claimed.rows.iter().map(|r| r.id).collect::<Vec<_>>()).await?;
    let mut prepared = Vec::new();
    let mut index_of = Vec::new();
    for (i, row) in claimed.rows.iter().enumerate() {
        match (envelope_of(row), bodies.remove(&row.id)) {
            (Ok(envelope), Some(raw)) => {
                prepared.push(Prepared {
                    id: row.id,
                    envelope,
                    from: row.envelope_from.clone(),
                    raw,
                });
                index_of.push(i);
            }
            (Err(e), _) => {
                let why = format!("The stored envelope is invalid: {e}");
                decided[i] = Some(attempt(row).failed(None, why, Who::Operator));
            }
            (_, None) => {
                let why = "The text of this mail is no longer stored.".to_string();
                decided[i] = Some(attempt(row).failed(None, why, Who::Operator));
            }
        }
    }
    let sent = match fresh_access_token(ctx, shared, &server, false).await {
        Ok(token) => send_with_one_refresh(ctx, shared, &server, token, &prepared, &lease).await,
        Err(problem) => Err(problem),
    };
    let mut stop = None;
    match sent {
        Err(problem) => {
            for &i in &index_of {
                decided[i] = Some(attempt(&claimed.rows[i]).token_problem(&problem));
            }
            stop = Some(None);
        }
        Ok(result) => {
            let words = stop_words(ctx, shared, &server, now, result.stop.as_ref()).await?;
            for (k, message) in result.results.into_iter().enumerate() {
                let i = index_of[k];
                let a = attempt(&claimed.rows[i]);
                decided[i] = match message {
                    MessageResult::Sent(reply) => Some(a.sent(reply)),
                    MessageResult::Refused { verdict, reply } => {
                        shared.metrics.outcome(&verdict);
                        Some(a.refused(&verdict, reply))
                    }
                    MessageResult::NotTried => words
                        .as_ref()
                        .map(|(until, reply, why)| a.wait(*until, reply.clone(), why.clone())),
                };
            }
            if result.stop.is_some() {
                stop = Some(result.stop);
            }
        }
    }
    let decided = decided.into_iter().flatten().collect();
    let (drained, _) = finish(ctx, shared, claimed, decided, limits, Some(&server)).await?;
    Ok((drained, stop.is_none()))
}

/// Sends the batch; when the server refused a token that was not just issued, refreshes it
/// once and sends what was not tried again.
async fn send_with_one_refresh(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    token: AccessToken,
    prepared: &[Prepared],
    lease: &LeaseKeeper,
) -> Result<BatchResult, TokenProblem> {
    let transport: &dyn Transport = &shared.smtp;
    let batch = |token| Batch {
        ctx,
        server,
        token,
        messages: prepared,
        lease_lost: &lease.lost,
    };
    let mut result = transport.send(batch(&token)).await;
    if !matches!(result.stop, Some(Stop::TokenRefused)) {
        return Ok(result);
    }
    shared.smtp.forget(server.id);
    let token = fresh_access_token(ctx, shared, server, true).await?;
    let rest: Vec<usize> = (0..prepared.len())
        .filter(|&k| matches!(result.results[k], MessageResult::NotTried))
        .collect();
    let again: Vec<Prepared> = rest
        .iter()
        .map(|&k| Prepared {
            id: prepared[k].id,
            envelope: prepared[k].envelope.clone(),
            from: prepared[k].from.clone(),
            raw: prepared[k].raw.clone(),
        })
        .collect();
    let second = transport
        .send(Batch {
            messages: &again,
            ..batch(&token)
        })
        .await;
    for (k, r) in rest.into_iter().zip(second.results) {
        result.results[k] = r;
    }
    result.stop = second.stop;
    Ok(result)
}

/// What the mails not tried get after a stop, recording the mailbox's hold or throttle first:
/// when they are due again, the reply and the words. `None`: they get no outcome (another
/// worker took them over).
async fn stop_words(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    now: DateTime<Utc>,
    stop: Option<&Stop>,
) -> Result<Option<(Option<DateTime<Utc>>, Option<String>, Option<String>)>, sea_orm::DbErr> {
    Ok(match stop {
        Some(Stop::LeaseLost) => None,
        Some(Stop::Mailbox { verdict, reply }) => {
            shared.metrics.outcome(verdict);
            let until = match verdict.level {
                Level::MailboxHeld(reason) => {
                    crate::health::hold(ctx, shared, server, reason, verdict).await?;
                    verdict.hold_for.map(|d| now + d)
                }
                _ => {
                    let until = now + verdict.hold_for.unwrap_or(Duration::seconds(60));
                    crate::health::throttle(ctx, shared, server.id, until, &verdict.words())
                        .await?;
                    Some(until)
                }
            };
            Some((until, reply.clone(), Some(verdict.words())))
        }
        // Nothing was tried: wait a moment, quietly.
        Some(Stop::Busy) | Some(Stop::TokenRefused) | None => {
            let wait = Duration::milliseconds(rand::rng().random_range(1000..3000));
            Some((Some(now + wait), None, None))
        }
    })
}

/// Writes the outcomes, tells the people a failure concerns, counts, and notes a success in
/// the mailbox's health.
async fn finish(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    claimed: &Claimed,
    decided: Vec<Decided>,
    limits: &Limits,
    server: Option<&mail_server::Model>,
) -> Result<(Drained, bool), sea_orm::DbErr> {
    let outcomes: Vec<Outcome> = decided.iter().map(|d| d.outcome.clone()).collect();
    claims::record(ctx, &claimed.owner, &outcomes, limits.keep_sent_days == 0).await?;
    let now = ctx.clock().now();
    let mut drained = Drained::default();
    for d in &decided {
        let Some(row) = claimed.rows.iter().find(|r| r.id == d.outcome.id) else {
            continue;
        };
        let queued_for = (now - row.created_at).num_milliseconds() as f64 / 1000.0;
        match d.outcome.status {
            "sent" => {
                drained.sent += 1;
                shared.metrics.sent(queued_for);
            }
            "failed" => {
                drained.failed += 1;
                shared.metrics.failed(queued_for);
                let why = d.outcome.last_error.as_deref().unwrap_or_default();
                let who = d.failed_for.unwrap_or(Who::Nobody);
                crate::failed_notice::mail_failed(ctx, row, why, who).await;
            }
            _ => drained.again += 1,
        }
    }
    if let Some(server) = server
        && drained.sent > 0
    {
        crate::health::succeeded(ctx, shared, server.id, None).await?;
    }
    tracing::info!(
        server_id = claimed.rows.first().map(|r| r.server_id),
        sent = drained.sent,
        failed = drained.failed,
        again = drained.again,
        "drained a batch"
    );
    Ok((drained, true))
}

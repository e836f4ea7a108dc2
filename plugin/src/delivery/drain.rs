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

use crate::delivery::attempt::{Attempt, Decided};
use crate::delivery::classify::{Level, Who};
use crate::delivery::limits::{Limits, backoff, limits};
use crate::delivery::transport::{
    Batch, BatchResult, MessageResult, Prepared, Report, Stop, Transport,
};
use crate::entities::{mail_server, outbox};
use crate::outbox::claims::{self, Claim, Claimed, Outcome};
use crate::outbox::lease::LeaseKeeper;
use crate::runtime::Shared;
use crate::tokens::service::{AccessToken, TokenProblem, fresh_access_token};

/// What a drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Mails the server took.
    pub sent: usize,
    /// Mails failed for good.
    pub failed: usize,
    /// Mails to be tried again, or waiting for their mailbox.
    pub again: usize,
    /// Groups of outcomes written (each one statement per kind of outcome in it).
    pub writes: usize,
}

impl Drained {
    fn add(&mut self, other: Drained) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.again += other.again;
        self.writes += other.writes;
    }
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
            Claim::Batch(claimed) => {
                claims::keep_within(ctx, shared, claimed, claims::BATCH_BYTES).await?
            }
        };
        let (step, go_on) = send_batch(ctx, shared, server_id, &claimed, &limits).await?;
        total.add(step);
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

/// Sends one claimed batch and writes its outcomes as they come (a group of them at a time:
/// whatever arrived while the previous write ran), then those of the mails not tried; says
/// what happened and whether the drain goes on (not after a stop: a held or throttled
/// mailbox, no free connection, a lost claim, a token problem).
async fn send_batch(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server_id: i32,
    claimed: &Claimed,
    limits: &Limits,
) -> Result<(Drained, bool), sea_orm::DbErr> {
    let lease_length =
        std::time::Duration::from_secs(Ord::max(shared.options.lease_secs, 1) as u64);
    let lease = LeaseKeeper::start(ctx, shared, claimed, lease_length);
    let w = Writer {
        ctx,
        shared,
        claimed,
        lease: &lease,
        limits,
    };
    let Some(server) = shared.server(ctx, server_id).await? else {
        // A deleted server is the operators' matter, not the authors'.
        let why = "The mail server of this mail was deleted.";
        let decided = claimed
            .rows
            .iter()
            .map(|row| w.attempt(row).failed(None, why.to_string(), Who::Operator))
            .collect();
        return Ok((w.write(decided).await?, true));
    };
    // The batch's share of the process's message budget, taken before its bodies are read.
    let kib: i64 = claimed.rows.iter().map(|r| r.size_bytes / 1024 + 1).sum();
    let kib = u32::try_from(kib)
        .unwrap_or(u32::MAX)
        .min(crate::runtime::IN_FLIGHT_BODY_KIB);
    let Ok(_budget) = shared.body_budget.clone().acquire_many_owned(kib).await else {
        return Ok((Drained::default(), false));
    };
    let (prepared, mut rest) = w.prepare().await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let window = tokio::sync::Semaphore::new(crate::delivery::transport::UNWRITTEN_PER_MAILBOX);
    let sending = send_reporting(ctx, shared, &server, &prepared, &lease, (tx, &window));
    let (sent, written) = tokio::join!(sending, w.write_as_reported(rx, &window));
    let mut drained = written?;
    let go_on = match sent {
        Err((first, problem)) => {
            rest.extend(w.after_token_problem(&prepared, first.as_ref(), &problem));
            false
        }
        Ok(result) => {
            let now = ctx.clock().now();
            let words = stop_words(ctx, shared, &server, now, result.stop.as_ref()).await?;
            if let Some((until, reply, why)) = words {
                for (p, r) in prepared.iter().zip(&result.results) {
                    if matches!(r, MessageResult::NotTried) {
                        let a = w.attempt(w.row(p.id));
                        rest.push(a.wait(until, reply.clone(), why.clone()));
                    }
                }
            }
            if matches!(result.stop, Some(Stop::Busy)) {
                wake_at(ctx, shared, server_id, now + Duration::seconds(3));
            }
            result.stop.is_none()
        }
    };
    drained.add(w.write(rest).await?);
    if drained.sent > 0 {
        crate::delivery::health::succeeded(ctx, shared, server.id, None).await?;
    }
    tracing::info!(
        server_id,
        sent = drained.sent,
        failed = drained.failed,
        again = drained.again,
        writes = drained.writes,
        "drained a batch"
    );
    Ok((drained, go_on))
}

/// Takes the mailbox's token and sends the batch, each result reported on `report` as it
/// comes; the report channel closes when the sending is over (the writer then ends).
async fn send_reporting(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    prepared: &[Prepared],
    lease: &LeaseKeeper,
    (report, window): (Report, &tokio::sync::Semaphore),
) -> Result<BatchResult, (Option<BatchResult>, TokenProblem)> {
    match fresh_access_token(ctx, shared, server, false).await {
        Ok(token) => {
            send_with_one_refresh(
                ctx,
                shared,
                server,
                token,
                prepared,
                lease,
                (&report, window),
            )
            .await
        }
        Err(problem) => Err((None, problem)),
    }
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
    (report, window): (&Report, &tokio::sync::Semaphore),
) -> Result<BatchResult, (Option<BatchResult>, TokenProblem)> {
    let transport: &dyn Transport = if server.transport == "graph" {
        &shared.graph
    } else {
        shared.smtp.as_ref()
    };
    let batch = |token| Batch {
        ctx,
        server,
        token,
        messages: prepared,
        halt: &lease.lost,
        stopping: shared.stopping_flag(),
        report,
        window,
    };
    let mut result = transport.send(batch(&token)).await;
    if !matches!(result.stop, Some(Stop::TokenRefused)) {
        return Ok(result);
    }
    shared.smtp.forget(server.id);
    let token = match fresh_access_token(ctx, shared, server, true).await {
        Ok(token) => token,
        Err(problem) => return Err((Some(result), problem)),
    };
    let rest: Vec<usize> = (0..prepared.len())
        .filter(|&k| matches!(result.results[k], MessageResult::NotTried))
        .collect();
    let again: Vec<Prepared> = rest.iter().map(|&k| prepared[k].clone()).collect();
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
/// when they are due again, the reply and the words (`None`: nothing to write).
async fn stop_words(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    now: DateTime<Utc>,
    stop: Option<&Stop>,
) -> Result<Option<(Option<DateTime<Utc>>, Option<String>, Option<String>)>, sea_orm::DbErr> {
    Ok(match stop {
        // Given back, due now (a row another worker took over is not this claim's to write).
        Some(Stop::Halted) => Some((Some(now), None, None)),
        Some(Stop::Mailbox { verdict, reply }) => {
            shared.metrics.outcome(verdict);
            let until = match verdict.level {
                Level::MailboxHeld(reason) => {
                    crate::delivery::health::hold(ctx, shared, server, reason, verdict).await?;
                    verdict.hold_for.map(|d| now + d)
                }
                _ => {
                    let until = now + verdict.hold_for.unwrap_or(Duration::seconds(60));
                    crate::delivery::health::throttle(
                        ctx,
                        shared,
                        server.id,
                        until,
                        &verdict.words(),
                    )
                    .await?;
                    Some(until)
                }
            };
            Some((until, reply.clone(), Some(verdict.words())))
        }
        // The server could not be reached: the rest wait as long as a first retry would.
        Some(Stop::Unreachable { verdict }) => {
            let until = now + backoff(shared.options.retry_base_secs, 1);
            Some((Some(until), None, Some(verdict.words())))
        }
        // Nothing was tried: wait a moment, quietly.
        Some(Stop::Busy) | Some(Stop::TokenRefused) | None => {
            let wait = Duration::milliseconds(rand::rng().random_range(1000..3000));
            Some((Some(now + wait), None, None))
        }
    })
}

/// Writes a batch's outcomes: the claim, the limits and the time of the attempt.
struct Writer<'a> {
    ctx: &'a ModuleContext,
    shared: &'a Arc<Shared>,
    claimed: &'a Claimed,
    lease: &'a LeaseKeeper,
    limits: &'a Limits,
}

impl Writer<'_> {
    fn attempt<'r>(&self, row: &'r outbox::Model) -> Attempt<'r> {
        Attempt {
            row,
            max_attempts: self.limits.max_attempts,
            retry_base_secs: self.shared.options.retry_base_secs,
            // The time of the decision: a batch may take a while to send.
            now: self.ctx.clock().now(),
        }
    }

    /// The claimed row `id` (every reported id is one of the batch's).
    fn row(&self, id: i64) -> &outbox::Model {
        let at = self
            .claimed
            .rows
            .binary_search_by_key(&id, |r| r.id)
            .unwrap_or_default();
        &self.claimed.rows[at]
    }

    /// The outcomes of the mails not tried when the token could not be had (the first pass
    /// may have sent some before the refusal). A held mailbox makes them all wait without
    /// spending an attempt; a passing problem (the token endpoint or the database away) costs
    /// the first of them an attempt, and the others wait as long without spending one.
    fn after_token_problem(
        &self,
        prepared: &[Prepared],
        first: Option<&BatchResult>,
        problem: &TokenProblem,
    ) -> Vec<Decided> {
        let mut decided = Vec::new();
        let mut paced: Option<Decided> = None;
        for (k, p) in prepared.iter().enumerate() {
            if first.is_some_and(|r| !matches!(r.results[k], MessageResult::NotTried)) {
                continue;
            }
            let a = self.attempt(self.row(p.id));
            match (problem, &paced) {
                (TokenProblem::Held(_), _) | (_, None) => {
                    let d = a.token_problem(problem);
                    if !matches!(problem, TokenProblem::Held(_)) && d.outcome.status == "queued" {
                        paced = Some(Decided {
                            outcome: d.outcome.clone(),
                            failed_for: None,
                        });
                    }
                    decided.push(d);
                }
                (_, Some(probe)) => decided.push(a.wait(
                    probe.outcome.next_attempt_at,
                    None,
                    probe.outcome.last_error.clone(),
                )),
            }
        }
        decided
    }

    /// The batch's messages ready to send, and the outcomes of the mails that cannot be (an
    /// invalid envelope, a text no longer stored).
    async fn prepare(&self) -> Result<(Vec<Prepared>, Vec<Decided>), sea_orm::DbErr> {
        let ids: Vec<i64> = self.claimed.rows.iter().map(|r| r.id).collect();
        let mut bodies = claims::bodies(self.ctx, &ids).await?;
        let (mut prepared, mut failed) = (Vec::new(), Vec::new());
        for row in &self.claimed.rows {
            match (envelope_of(row), bodies.remove(&row.id)) {
                (Ok(envelope), Some(raw)) => prepared.push(Prepared {
                    id: row.id,
                    envelope,
                    from: row.envelope_from.clone(),
                    raw,
                    message_id: row.message_id.clone(),
                    tried_before: row.attempts > 1
                        || row.last_error.is_some()
                        || row.last_reply.is_some(),
                }),
                (Err(e), _) => {
                    let why = format!("The stored envelope is invalid: {e}");
                    failed.push(self.attempt(row).failed(None, why, Who::Operator));
                }
                (_, None) => {
                    let why = "The text of this mail is no longer stored.".to_string();
                    failed.push(self.attempt(row).failed(None, why, Who::Operator));
                }
            }
        }
        Ok((prepared, failed))
    }

    /// Writes the results the transport reports while it sends, a group at a time. On a
    /// database error the batch stops (nothing more is sent without its outcome written).
    async fn write_as_reported(
        &self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(i64, MessageResult)>,
        window: &tokio::sync::Semaphore,
    ) -> Result<Drained, sea_orm::DbErr> {
        let mut drained = Drained::default();
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while let Ok(next) = rx.try_recv() {
                group.push(next);
            }
            let turns = group.len();
            let decided = group
                .into_iter()
                .filter_map(|(id, result)| {
                    let a = self.attempt(self.row(id));
                    match result {
                        MessageResult::Sent(reply) => Some(a.sent(reply)),
                        MessageResult::Refused { verdict, reply } => {
                            self.shared.metrics.outcome(&verdict);
                            Some(a.refused(&verdict, reply))
                        }
                        MessageResult::NotTried => None,
                    }
                })
                .collect();
            match self.write(decided).await {
                Ok(d) => drained.add(d),
                Err(e) => return Err(e),
            }
            // Written: their turns to send come back.
            window.add_permits(turns);
        }
        Ok(drained)
    }

    /// Writes outcomes (trying again for about half a minute while the database is away: an
    /// outcome after the server's `250` must not be lost), tells the people a failure
    /// concerns, and counts.
    async fn write(&self, decided: Vec<Decided>) -> Result<Drained, sea_orm::DbErr> {
        let mut drained = Drained::default();
        if decided.is_empty() {
            return Ok(drained);
        }
        drained.writes = 1;
        let outcomes: Vec<Outcome> = decided.iter().map(|d| d.outcome.clone()).collect();
        let delete_bodies = self.limits.keep_sent_days == 0;
        // Every quarter second for half a minute: written as soon as the database is back,
        // before the sweep of another process gives these mails to another drain.
        let mut tries = 0;
        let counting = self.lease.writing.lock().await;
        let first_try = std::time::Instant::now();
        loop {
            match claims::record(
                self.ctx,
                self.shared,
                &self.claimed.owner,
                &outcomes,
                delete_bodies,
            )
            .await
            {
                Ok(()) => break,
                Err(e) if first_try.elapsed() < claims::OUTCOME_RETRY => {
                    // Nothing more is sent while outcomes cannot be written.
                    self.lease
                        .lost
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    if tries % 20 == 0 {
                        tracing::warn!(error = %e, "writing outcomes failed; trying again");
                    }
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.lease
            .written
            .fetch_add(outcomes.len(), std::sync::atomic::Ordering::SeqCst);
        drop(counting);
        let now = self.ctx.clock().now();
        for d in &decided {
            let row = self.row(d.outcome.id);
            let queued_for = (now - row.created_at).num_milliseconds() as f64 / 1000.0;
            match d.outcome.status {
                "sent" => {
                    drained.sent += 1;
                    self.shared.metrics.sent(queued_for);
                }
                "failed" => {
                    drained.failed += 1;
                    self.shared.metrics.failed(queued_for);
                    let why = d.outcome.last_error.as_deref().unwrap_or_default();
                    let who = d.failed_for.unwrap_or(Who::Nobody);
                    crate::outbox::failed_notice::mail_failed(self.ctx, row, why, who).await;
                }
                _ => drained.again += 1,
            }
        }
        Ok(drained)
    }
}

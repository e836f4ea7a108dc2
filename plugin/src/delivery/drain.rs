//! Draining one mailbox: claim a batch of its due mails, take its token once, send the batch
//! through its transport, write the outcomes in as few statements as their kinds; again until
//! no mail of the mailbox is due. A refusal of one message fails or retries that message; a
//! refusal of the mailbox holds or throttles it and the rest of the batch waits without
//! spending an attempt.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use rand::Rng;

use crate::delivery::classify::{HoldReason, Level, Who};
use crate::delivery::limits::{Limits, limits};
use crate::delivery::transport::{
    Batch, BatchResult, MessageResult, Prepared, Report, Stop, Transport,
};
use crate::entities::mail_server;
use crate::outbox::claims::{self, Claim, Claimed};
use crate::outbox::lease::LeaseKeeper;
use crate::runtime::Shared;

use crate::delivery::attempt::Decided;
pub use crate::delivery::outcomes::Drained;
use crate::delivery::outcomes::Writer;
use crate::tokens::service::{AccessToken, TokenProblem, fresh_access_token};

/// How long a drain lets mails gather before it claims again after a small batch during which
/// more mail was queued for the mailbox: mails queued one by one at a high rate leave in
/// batches (one claim, one token, one outcome write for many) rather than each in its own, and
/// such a mail waits at most this much longer. The first claim of a drain, a claim after a full
/// batch and one after a batch during which no mail came are at once (a drain that has nothing
/// more to do ends without waiting).
pub const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Drains `server_id`: batch after batch until none of its mails is due, its mailbox is held
/// or throttled, or the process stops. At its per-minute limit the drain ends and wakes the
/// mailbox again when the window frees.
pub async fn drain(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server_id: i32,
) -> Result<Drained, sea_orm::DbErr> {
    let mut total = Drained::default();
    let mut gather_until: Option<tokio::time::Instant> = None;
    while !shared.stopping() {
        if let Some(until) = gather_until.take() {
            tokio::time::sleep_until(until).await;
            if shared.stopping() {
                break;
            }
        }
        let claimed_at = tokio::time::Instant::now();
        let small;
        let limits = limits(ctx, shared).await;
        let claimed = match claims::claim_batch(ctx, shared, server_id, limits.per_minute).await? {
            Claim::Nothing => break,
            Claim::AtLimit(until) => {
                wake_at(ctx, shared, server_id, until);
                break;
            }
            Claim::Batch(claimed) => {
                // Counted before the cut by size: mails left out for their size are due now.
                small = (claimed.rows.len() as u64) < claims::BATCH / 2;
                claims::keep_within(ctx, shared, claimed, claims::BATCH_BYTES).await?
            }
        };
        let (step, go_on) = send_batch(ctx, shared, server_id, &claimed, &limits).await?;
        total.add(step);
        // The wake of mail queued meanwhile is taken here: the next claim finds that mail.
        if small && shared.take_more(server_id) {
            gather_until = Some(claimed_at + GATHER);
        }
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

/// Sends one claimed batch and writes its outcomes as they come (a group of them at a time:
/// whatever arrived until it could write, on SQLite until its turn came), then those of the
/// mails not tried; says what happened and whether the drain goes on (not after a stop: a held
/// or throttled mailbox, no free connection, a lost claim, a token problem).
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
            let problem = token_away(ctx, shared, &server, problem).await?;
            rest.extend(w.after_token_problem(&prepared, first.as_ref(), &problem));
            false
        }
        Ok(result) => {
            let (go_on, waiting) = after_send(&w, &server, &prepared, &result).await?;
            rest.extend(waiting);
            go_on
        }
    };
    drained.add(w.write(rest).await?);
    if drained.sent > 0 {
        let ids: Vec<i64> = claimed.rows.iter().map(|r| r.id).collect();
        let went = crate::delivery::release::Success::MailsWent(&ids, claimed.claimed_at);
        crate::delivery::release::succeeded(ctx, shared, server.id, went).await?;
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

/// After a batch was sent (`result`): whether the drain goes on (nothing stopped it), and the
/// outcomes of the mails a stop left untried, which wait as it says (the mailbox's hold or
/// throttle recorded first; the mail that met a refusal of the mailbox counts as tried).
async fn after_send(
    w: &Writer<'_>,
    server: &mail_server::Model,
    prepared: &[Prepared],
    result: &BatchResult,
) -> Result<(bool, Vec<Decided>), sea_orm::DbErr> {
    let (ctx, shared) = (w.ctx, w.shared);
    let now = ctx.clock().now();
    let mut waiting = Vec::new();
    let words = stop_words(ctx, shared, server, now, result.stop.as_ref()).await?;
    if let Some((until, reply, why)) = words {
        // A refusal of the mailbox leaves the mail that met it unsent: the first of them
        // (mails go in queue order). The others were not tried.
        let mut first = matches!(result.stop, Some(Stop::Mailbox { .. }));
        for (p, r) in prepared.iter().zip(&result.results) {
            if matches!(r, MessageResult::NotTried) {
                let a = w.attempt(w.row(p.id));
                let mut d = a.wait(until, reply.clone(), why.clone());
                d.outcome.tried = std::mem::take(&mut first);
                waiting.push(d);
            }
        }
    }
    if matches!(result.stop, Some(Stop::Busy)) {
        wake_at(ctx, shared, server.id, now + Duration::seconds(3));
    }
    Ok((result.stop.is_none(), waiting))
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
        claimed_at: lease.claimed_at,
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

/// A token endpoint that is away ([`TokenProblem::Transient`]: a timeout, a 5xx, a 429) holds
/// the mailbox as unreachable, as a mail server that cannot be reached does: its mails wait,
/// spending no attempt, until a probe gets a token (other problems are returned as they are).
async fn token_away(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    problem: TokenProblem,
) -> Result<TokenProblem, sea_orm::DbErr> {
    let TokenProblem::Transient {
        reason,
        retry_after_secs,
    } = &problem
    else {
        return Ok(problem);
    };
    let mut verdict = crate::delivery::classify::token_unavailable(reason, *retry_after_secs);
    shared.metrics.outcome(&verdict);
    let held =
        crate::delivery::hold::hold(ctx, shared, server, HoldReason::Unreachable, &verdict).await?;
    verdict.hold_for = held.until.map(|until| until - ctx.clock().now());
    Ok(TokenProblem::Held(verdict))
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
                    crate::delivery::hold::hold(ctx, shared, server, reason, verdict)
                        .await?
                        .until
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
        // Nothing was tried: wait a moment, quietly.
        Some(Stop::Busy) | Some(Stop::TokenRefused) | None => {
            let wait = Duration::milliseconds(rand::rng().random_range(1000..3000));
            Some((Some(now + wait), None, None))
        }
    })
}

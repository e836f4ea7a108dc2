//! Writing a batch's outcomes: the claimed rows with their bodies become messages to send,
//! the transport's results become outcomes (what the mail gets: sent, again later, failed),
//! written a group at a time as the server answers, and the people a failure concerns are told.

use std::sync::Arc;

use crm_sdk::ModuleContext;
use lettre::Address;
use lettre::address::Envelope;

use crate::delivery::attempt::{Attempt, Decided};
use crate::delivery::classify::Who;
use crate::delivery::limits::Limits;
use crate::delivery::transport::{BatchResult, MessageResult, Prepared};

use crate::outbox::claims::{self, Claimed, ClaimedRow};
use crate::outbox::lease::LeaseKeeper;
use crate::outbox::record::{self, Outcome};
use crate::runtime::{Shared, WriteTurn};
use crate::tokens::service::TokenProblem;

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
    pub(crate) fn add(&mut self, other: Drained) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.again += other.again;
        self.writes += other.writes;
    }
}

/// The envelope of a stored mail.
fn envelope_of(row: &ClaimedRow) -> Result<Envelope, lettre::error::Error> {
    let from: Option<Address> = row.envelope_from.parse().ok();
    let to: Vec<Address> = row
        .recipients
        .lines()
        .filter_map(|r| r.parse().ok())
        .collect();
    Envelope::new(from, to)
}

/// Writes a batch's outcomes: the claim, the limits and the time of the attempt.
pub(crate) struct Writer<'a> {
    pub(crate) ctx: &'a ModuleContext,
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) claimed: &'a Claimed,
    pub(crate) lease: &'a LeaseKeeper,
    pub(crate) limits: &'a Limits,
}

impl Writer<'_> {
    pub(crate) fn attempt<'r>(&self, row: &'r ClaimedRow) -> Attempt<'r> {
        Attempt {
            row,
            max_attempts: self.limits.max_attempts,
            retry_base_secs: self.shared.options.retry_base_secs,
            // The time of the decision: a batch may take a while to send.
            now: self.ctx.clock().now(),
        }
    }

    /// The claimed row `id` (every reported id is one of the batch's).
    pub(crate) fn row(&self, id: i64) -> &ClaimedRow {
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
    pub(crate) fn after_token_problem(
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
        // Only the first mail met the problem; the others waited without being tried.
        for d in decided.iter_mut().skip(1) {
            d.outcome.tried = false;
        }
        decided
    }

    /// The batch's messages ready to send, and the outcomes of the mails that cannot be (an
    /// invalid envelope, a text no longer stored).
    pub(crate) async fn prepare(&self) -> Result<(Vec<Prepared>, Vec<Decided>), sea_orm::DbErr> {
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
    pub(crate) async fn write_as_reported(
        &self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(i64, MessageResult)>,
        window: &tokio::sync::Semaphore,
    ) -> Result<Drained, sea_orm::DbErr> {
        let mut drained = Drained::default();
        while let Some(first) = rx.recv().await {
            // The turn to write first (on SQLite this process's writes take turns, and the
            // other mailboxes' claims and outcomes are ahead): whatever the server answers
            // while this mailbox waits for its turn is written in the same statement. Locks in
            // the order the lease keeper takes them: the batch's, then the turn.
            let counting = self.lease.writing.clone().lock_owned().await;
            let turn = self.shared.write_gate(self.ctx).await;
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
            match self.write_holding(decided, counting, turn).await {
                Ok(d) => drained.add(d),
                Err(e) => return Err(e),
            }
            // Written: their turns to send come back.
            window.add_permits(turns);
        }
        Ok(drained)
    }

    /// Writes outcomes (trying again every quarter second while the database cannot be
    /// reached, and for half a minute when it refuses them: an outcome after the server's
    /// `250` must not be lost), tells the people a failure concerns, and counts.
    pub(crate) async fn write(&self, decided: Vec<Decided>) -> Result<Drained, sea_orm::DbErr> {
        if decided.is_empty() {
            return Ok(Drained::default());
        }
        let counting = self.lease.writing.clone().lock_owned().await;
        let turn = self.shared.write_gate(self.ctx).await;
        self.write_holding(decided, counting, turn).await
    }

    /// [`Writer::write`], the batch's write lock and a first turn to write already held.
    async fn write_holding(
        &self,
        decided: Vec<Decided>,
        counting: tokio::sync::OwnedMutexGuard<()>,
        turn: WriteTurn,
    ) -> Result<Drained, sea_orm::DbErr> {
        if decided.is_empty() {
            return Ok(Drained::default());
        }
        let outcomes: Vec<Outcome> = decided.iter().map(|d| d.outcome.clone()).collect();
        self.persist(&outcomes, turn).await?;
        self.lease
            .written
            .fetch_add(outcomes.len(), std::sync::atomic::Ordering::SeqCst);
        drop(counting);
        let mut drained = self.tell(&decided).await;
        drained.writes = 1;
        Ok(drained)
    }

    /// Writes `outcomes` (one statement per kind), beginning in `turn`. A database that cannot
    /// be reached is tried again every quarter second until it answers, so that they are
    /// written before the sweep of another process gives these mails to another drain
    /// (`claims::TAKEOVER_GRACE`); meanwhile nothing more is sent. Other refusals are tried for
    /// `record::OUTCOME_RETRY` after the database was last unreachable (a deadlock or a busy
    /// SQLite is not the end), then returned.
    async fn persist(&self, outcomes: &[Outcome], turn: WriteTurn) -> Result<(), sea_orm::DbErr> {
        let delete_bodies = self.limits.keep_sent_days == 0;
        let mut tries = 0;
        let mut turn = Some(turn);
        let mut first_try = std::time::Instant::now();
        loop {
            let turn = match turn.take() {
                Some(turn) => turn,
                None => self.shared.write_gate(self.ctx).await,
            };
            let owner = &self.claimed.owner;
            match record::record(self.ctx, &turn, owner, outcomes, delete_bodies).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    drop(turn);
                    if crate::reach::is_unreachable(&e) {
                        self.shared.note_db_error(&e);
                        first_try = std::time::Instant::now();
                    } else if first_try.elapsed() >= record::OUTCOME_RETRY {
                        return Err(e);
                    }
                    self.lease
                        .lost
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    if tries % 20 == 0 {
                        tracing::warn!(error = %e, "writing outcomes failed; trying again");
                    }
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Counts the written outcomes in the metrics and the batch's tally, and tells the people
    /// concerned of each failed mail.
    async fn tell(&self, decided: &[Decided]) -> Drained {
        let mut drained = Drained::default();
        let now = self.ctx.clock().now();
        for d in decided {
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
                    let (who, advice) = d.failed_for.as_ref().map_or((Who::Nobody, None), |f| {
                        (f.who, f.authors_advice.as_deref())
                    });
                    let reply = d.outcome.last_reply.as_deref();
                    crate::outbox::failed_notice::mail_failed(
                        self.ctx,
                        row,
                        (why, reply),
                        who,
                        advice,
                    )
                    .await;
                }
                _ => drained.again += 1,
            }
        }
        drained
    }
}

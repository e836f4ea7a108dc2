//! Delivering one outbox row: claim it under a lease, get a fresh token, send, record the outcome.

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use lettre::Address;
use lettre::address::Envelope;
use rand::Rng;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};

use std::sync::Arc;

use crate::classify::{self, Facts, Level, Verdict, Who};
use crate::entities::{mail_server, outbox};
use crate::runtime::Shared;
use crate::smtp::SendOutcome;
use crate::token_service::{TokenProblem, fresh_access_token};

/// The default number of attempts before a mail is failed.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 8;

/// What happened to a mail in this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Someone else has it, or it is not due.
    Skipped,
    /// Sent.
    Sent,
    /// Will be tried again.
    Retry,
    /// Failed for good.
    Failed,
    /// Waits: its mailbox is held until the cause is fixed.
    Held,
}

/// The retry delay after `attempts` failed attempts: exponential from `base`, at most an hour,
/// with ±20 % jitter so that retries of many mails spread out.
pub fn backoff(base_secs: i64, attempts: i32) -> Duration {
    let exp = Ord::min(
        base_secs.saturating_mul(1_i64 << attempts.clamp(1, 16).saturating_sub(1)),
        3600,
    );
    let jitter = rand::rng().random_range(0.8..1.2);
    Duration::milliseconds((exp as f64 * 1000.0 * jitter) as i64)
}

/// The delivery limits from settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts before a mail fails.
    pub max_attempts: i32,
    per_minute: usize,
    /// The largest mail accepted at the queue route.
    pub max_bytes: usize,
}

/// How long a process goes on using the limits it read (settings saved in another process
/// apply within this time; in this one, at once).
const LIMITS_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// The delivery limits from settings, read at most every [`LIMITS_FOR`].
pub async fn limits(ctx: &ModuleContext, shared: &Shared) -> Limits {
    if let Some((at, cached)) = *shared.limits.lock().unwrap_or_else(|e| e.into_inner())
        && at.elapsed() < LIMITS_FOR
    {
        return cached;
    }
    let fresh = read_limits(ctx).await;
    *shared.limits.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((std::time::Instant::now(), fresh));
    fresh
}

async fn read_limits(ctx: &ModuleContext) -> Limits {
    let settings = ctx.settings().load(ctx.module_id()).await.ok();
    let get = |field: &str| {
        settings
            .as_ref()
            .and_then(|s| s.get(field).and_then(|v| v.parse::<i64>().ok()))
    };
    Limits {
        max_attempts: get("max_attempts").map_or(DEFAULT_MAX_ATTEMPTS, |n| n.clamp(1, 100) as i32),
        per_minute: get("mailbox_rate_per_minute").map_or(30, |n| Ord::max(n, 0) as usize),
        max_bytes: get("max_message_kb").map_or(crate::compose::DEFAULT_MAX_BYTES, |kb| {
            Ord::max(kb, 1) as usize * 1024
        }),
    }
}

#[derive(Clone)]
struct Outcome {
    status: &'static str,
    next_attempt_at: Option<DateTime<Utc>>,
    last_reply: Option<String>,
    last_error: Option<String>,
    sent: bool,
    /// Give the attempt back (nothing was tried: e.g. the mailbox waits).
    uncount: bool,
    /// Who must act on a failure (the author is told to correct the mail only when theirs).
    who: Who,
}

/// Whether SQLite refused a write because another connection was writing (in WAL mode a
/// statement whose snapshot went stale is refused at once, not waited for).
fn is_busy(e: &sea_orm::DbErr) -> bool {
    let text = e.to_string();
    text.contains("database is locked") || text.contains("database is busy")
}

/// Runs a write, again a few times if SQLite says the database is busy: an outcome after the
/// server's `250` must not be lost (the mail would be sent again once its lease ran out).
async fn persist<T, F, Fut>(mut write: F) -> Result<T, sea_orm::DbErr>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sea_orm::DbErr>>,
{
    let mut wait = std::time::Duration::from_millis(5);
    for _ in 0..10 {
        match write().await {
            Err(e) if is_busy(&e) => {
                tokio::time::sleep(wait).await;
                wait = Ord::min(wait * 2, std::time::Duration::from_millis(500));
            }
            done => return done,
        }
    }
    write().await
}

async fn record(
    ctx: &ModuleContext,
    row: &outbox::Model,
    owner: &str,
    o: Outcome,
) -> Result<(), sea_orm::DbErr> {
    persist(|| record_once(ctx, row, owner, o.clone())).await
}

async fn record_once(
    ctx: &ModuleContext,
    row: &outbox::Model,
    owner: &str,
    o: Outcome,
) -> Result<(), sea_orm::DbErr> {
    let now = ctx.clock().now();
    let mut update = outbox::Entity::update_many()
        .col_expr(outbox::Column::Status, Expr::value(o.status))
        .col_expr(
            outbox::Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            outbox::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
        .col_expr(outbox::Column::UpdatedAt, Expr::value(now));
    if let Some(at) = o.next_attempt_at {
        update = update.col_expr(outbox::Column::NextAttemptAt, Expr::value(at));
    }
    if o.last_reply.is_some() {
        update = update.col_expr(outbox::Column::LastReply, Expr::value(o.last_reply));
    }
    update = update.col_expr(outbox::Column::LastError, Expr::value(o.last_error));
    // Sent now; otherwise not sent (an admission under the per-minute limit is taken back).
    update = update.col_expr(outbox::Column::SentAt, Expr::value(o.sent.then_some(now)));
    if o.uncount {
        update = update.col_expr(
            outbox::Column::Attempts,
            Expr::col(outbox::Column::Attempts).sub(1),
        );
    }
    // Only the lease holder writes the outcome.
    update
        .filter(outbox::Column::Id.eq(row.id))
        .filter(outbox::Column::LeaseOwner.eq(owner))
        .exec(ctx.db())
        .await
        .map(|_| ())
}

/// Admits `row` under the mailbox's limit of `per_minute` sends a minute (0 = no limit), or
/// says how long to wait. Counted over every process on the database: admissions to one mailbox
/// are serialised by a row lock, and an admitted mail is marked (`sent_at`, cleared again if the
/// send does not succeed), so the count of the last minute includes mails being sent right now.
async fn admit(
    ctx: &ModuleContext,
    shared: &Shared,
    row: &outbox::Model,
    per_minute: usize,
) -> Result<Option<Duration>, sea_orm::DbErr> {
    use crate::entities::smtp_slot;
    use sea_orm::{PaginatorTrait, TransactionTrait};
    if per_minute == 0 {
        return Ok(None);
    }
    shared.smtp.ensure_slot_rows(ctx, row.server_id).await?;
    let txn = ctx.db().begin().await?;
    // The mailbox's first slot row is the lock (a write that changes nothing).
    smtp_slot::Entity::update_many()
        .col_expr(
            smtp_slot::Column::Holder,
            Expr::col(smtp_slot::Column::Holder),
        )
        .filter(smtp_slot::Column::ServerId.eq(row.server_id))
        .filter(smtp_slot::Column::Slot.eq(0))
        .exec(&txn)
        .await?;
    let now = ctx.clock().now();
    let window_start = now - Duration::seconds(60);
    let in_window = outbox::Entity::find()
        .filter(outbox::Column::ServerId.eq(row.server_id))
        .filter(outbox::Column::Id.ne(row.id))
        .filter(outbox::Column::SentAt.gt(window_start))
        .count(&txn)
        .await?;
    if (in_window as usize) < per_minute {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::SentAt, Expr::value(now))
            .filter(outbox::Column::Id.eq(row.id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        return Ok(None);
    }
    let oldest: Option<DateTime<Utc>> = outbox::Entity::find()
        .select_only()
        .column_as(outbox::Column::SentAt.min(), "oldest")
        .filter(outbox::Column::ServerId.eq(row.server_id))
        .filter(outbox::Column::Id.ne(row.id))
        .filter(outbox::Column::SentAt.gt(window_start))
        .into_tuple::<Option<DateTime<Utc>>>()
        .one(&txn)
        .await?
        .flatten();
    txn.commit().await?;
    Ok(Some(oldest.map_or(Duration::seconds(5), |t| {
        Ord::max(t + Duration::seconds(60) - now, Duration::seconds(1))
    })))
}

/// Keeps this worker's claim on a mail alive while it works on it: a task extends the lease
/// every third of its length, and says when the claim was lost (another worker took the mail
/// over), so that this one does not send it too. Dropping it stops the task.
struct LeaseKeeper {
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(ctx: &ModuleContext, id: i64, owner: &str, length: std::time::Duration) -> Self {
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ctx, owner, flag) = (ctx.clone(), owner.to_string(), lost.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(length / 3).await;
                let now = ctx.clock().now();
                let extended = outbox::Entity::update_many()
                    .col_expr(
                        outbox::Column::LeaseUntil,
                        Expr::value(
                            now + Duration::from_std(length).unwrap_or(Duration::minutes(5)),
                        ),
                    )
                    .filter(outbox::Column::Id.eq(id))
                    .filter(outbox::Column::Status.eq("sending"))
                    .filter(outbox::Column::LeaseOwner.eq(owner.as_str()))
                    .exec(ctx.db())
                    .await;
                match extended {
                    Ok(r) if r.rows_affected == 1 => {}
                    Ok(_) => {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    // The database is away: try again; if the lease runs out meanwhile, the
                    // next extension finds it taken over.
                    Err(e) => {
                        tracing::warn!(error = %e, outbox_id = id, "extending a lease failed")
                    }
                }
            }
        });
        Self { lost, task }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One send of a claimed mail. The sender waits at most 20 seconds for a connection (then the
/// mail waits in the queue instead of holding a worker), and not at all once the lease is lost.
async fn send_once(
    ctx: &ModuleContext,
    shared: &Shared,
    server: &mail_server::Model,
    token: &crate::token_service::AccessToken,
    envelope: &Envelope,
    raw: &[u8],
    lease: &LeaseKeeper,
) -> SendOutcome {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    shared
        .smtp
        .send(ctx, server, token, envelope, raw, deadline, &lease.lost)
        .await
}

/// Claims the outbox row `id` for this worker when it is due and its mailbox is neither held
/// nor throttled: the row and the claim's owner name.
async fn claim(
    ctx: &ModuleContext,
    shared: &Shared,
    id: i64,
) -> Result<Option<(outbox::Model, String)>, sea_orm::DbErr> {
    let now = ctx.clock().now();
    // Unique per claim, so that two claims of one process are told apart too.
    let owner = format!(
        "{}:{}",
        shared.instance,
        shared
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let due = Condition::all()
        .add(
            Condition::any()
                .add(
                    Condition::all()
                        .add(outbox::Column::Status.eq("queued"))
                        .add(outbox::Column::NextAttemptAt.lte(now)),
                )
                .add(
                    Condition::all()
                        .add(outbox::Column::Status.eq("sending"))
                        .add(outbox::Column::LeaseUntil.lt(now)),
                ),
        )
        .add(crate::health::claimable(now));
    let claimed = outbox::Entity::update_many()
        .col_expr(outbox::Column::Status, Expr::value("sending"))
        .col_expr(
            outbox::Column::LeaseUntil,
            Expr::value(now + Duration::seconds(shared.options.lease_secs)),
        )
        .col_expr(outbox::Column::LeaseOwner, Expr::value(owner.clone()))
        .col_expr(
            outbox::Column::Attempts,
            Expr::col(outbox::Column::Attempts).add(1),
        )
        .col_expr(outbox::Column::UpdatedAt, Expr::value(now));
    // The claim returns the row, so one round trip claims and reads it.
    let claimed = if ctx.db().get_database_backend() == sea_orm::DbBackend::Postgres {
        // A row another worker is claiming right now is skipped, not waited for.
        let due_and_free = sea_orm::sea_query::Query::select()
            .column(outbox::Column::Id)
            .from(outbox::Entity)
            .and_where(outbox::Column::Id.eq(id))
            .cond_where(due)
            .lock_with_behavior(
                sea_orm::sea_query::LockType::Update,
                sea_orm::sea_query::LockBehavior::SkipLocked,
            )
            .to_owned();
        claimed
            .filter(outbox::Column::Id.in_subquery(due_and_free))
            .exec_with_returning(ctx.db())
            .await?
    } else {
        let claim = claimed.filter(outbox::Column::Id.eq(id)).filter(due);
        persist(|| claim.clone().exec_with_returning(ctx.db())).await?
    };
    Ok(claimed.into_iter().next().map(|row| (row, owner)))
}

/// One claimed mail, and what its attempt may spend.
struct Attempt<'a> {
    row: &'a outbox::Model,
    server: &'a mail_server::Model,
    max_attempts: i32,
    retry_base_secs: i64,
    now: DateTime<Utc>,
}

impl Attempt<'_> {
    fn retry_or_fail(&self, reply: Option<String>, error: String) -> (Delivered, Outcome) {
        if self.row.attempts >= self.max_attempts {
            let o = Outcome {
                status: "failed",
                next_attempt_at: None,
                last_reply: reply,
                last_error: Some(format!(
                    "Gave up after {} attempts: {error}",
                    self.row.attempts
                )),
                sent: false,
                uncount: false,
                who: Who::Nobody,
            };
            (Delivered::Failed, o)
        } else {
            let o = Outcome {
                status: "queued",
                next_attempt_at: Some(self.now + backoff(self.retry_base_secs, self.row.attempts)),
                last_reply: reply,
                last_error: Some(error),
                sent: false,
                uncount: false,
                who: Who::Nobody,
            };
            (Delivered::Retry, o)
        }
    }

    /// The mail waits for its mailbox, spending no attempt.
    fn wait(&self, until: Option<DateTime<Utc>>, reply: Option<String>, why: String) -> Outcome {
        Outcome {
            status: "queued",
            next_attempt_at: Some(until.unwrap_or(self.now)),
            last_reply: reply,
            last_error: Some(why),
            sent: false,
            uncount: true,
            who: Who::Nobody,
        }
    }

    fn failed(&self, reply: Option<String>, why: String, who: Who) -> (Delivered, Outcome) {
        let o = Outcome {
            status: "failed",
            next_attempt_at: None,
            last_reply: reply,
            last_error: Some(why),
            sent: false,
            uncount: false,
            who,
        };
        (Delivered::Failed, o)
    }

    /// Applies a verdict of the classification table at its level.
    async fn apply(
        &self,
        ctx: &ModuleContext,
        shared: &Shared,
        verdict: &Verdict,
        reply: Option<String>,
    ) -> Result<(Delivered, Outcome), sea_orm::DbErr> {
        let until = verdict.hold_for.map(|d| self.now + d);
        Ok(match verdict.level {
            Level::MailFails => self.failed(reply, verdict.words(), verdict.who),
            Level::MailRetries => self.retry_or_fail(reply, verdict.words()),
            Level::MailboxHeld(reason) => {
                crate::health::hold(ctx, shared, self.server, reason, verdict).await?;
                (Delivered::Held, self.wait(until, reply, verdict.words()))
            }
            Level::MailboxThrottled => {
                let until = until.unwrap_or(self.now + Duration::seconds(60));
                crate::health::throttle(ctx, shared, self.server.id, until, &verdict.words())
                    .await?;
                (
                    Delivered::Retry,
                    self.wait(Some(until), reply, verdict.words()),
                )
            }
        })
    }

    /// What a token problem does to the mail (a hold was recorded by the token service).
    fn token_problem(&self, problem: &TokenProblem) -> (Delivered, Outcome) {
        match problem {
            TokenProblem::Held(v) => {
                let until = v.hold_for.map(|d| self.now + d);
                (Delivered::Held, self.wait(until, None, v.words()))
            }
            TokenProblem::Transient {
                retry_after_secs, ..
            } => {
                let (d, mut o) = self.retry_or_fail(None, problem.to_string());
                if let (Some(secs), Some(at)) = (retry_after_secs, o.next_attempt_at) {
                    o.next_attempt_at =
                        Some(Ord::max(at, self.now + Duration::seconds(*secs as i64)));
                }
                (d, o)
            }
            TokenProblem::Database(_) => self.retry_or_fail(None, problem.to_string()),
        }
    }
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

/// Tries to deliver the outbox row `id` once.
pub async fn deliver(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    id: i64,
) -> Result<Delivered, sea_orm::DbErr> {
    let Some((row, owner)) = claim(ctx, shared, id).await? else {
        return Ok(Delivered::Skipped);
    };
    let lease_length =
        std::time::Duration::from_secs(Ord::max(shared.options.lease_secs, 1) as u64);
    let lease = LeaseKeeper::start(ctx, id, &owner, lease_length);
    let Some(server) = shared.server(ctx, row.server_id).await? else {
        let why = "The mail server of this mail was deleted.".to_string();
        let attempt = Attempt {
            row: &row,
            server: &placeholder_server(row.server_id),
            max_attempts: 1,
            retry_base_secs: 0,
            now: ctx.clock().now(),
        };
        // A deleted server is the operators' matter, not the author's.
        let failed = attempt.failed(None, why.clone(), Who::Operator).1;
        record(ctx, &row, &owner, failed).await?;
        crate::failed_notice::mail_failed(ctx, &row, &why, Who::Operator).await;
        return Ok(Delivered::Failed);
    };
    let limits = limits(ctx, shared).await;
    if let Some(wait) = admit(ctx, shared, &row, limits.per_minute).await? {
        // The mailbox's per-minute budget is spent: wait without spending an attempt.
        let at = ctx.clock().now() + wait;
        let o = Outcome {
            status: "queued",
            next_attempt_at: Some(at),
            last_reply: None,
            last_error: None,
            sent: false,
            uncount: true,
            who: Who::Nobody,
        };
        record(ctx, &row, &owner, o).await?;
        return Ok(Delivered::Retry);
    }
    let attempt = Attempt {
        row: &row,
        server: &server,
        max_attempts: limits.max_attempts,
        retry_base_secs: shared.options.retry_base_secs,
        now: ctx.clock().now(),
    };
    let (delivered, o) = send_claimed(ctx, shared, &attempt, &lease).await?;
    if delivered == Delivered::Skipped {
        // Another worker took the mail over (this one was too slow): it sends it, not us.
        tracing::warn!(
            outbox_id = row.id,
            "lease lost before sending; left to the worker that took the mail over"
        );
        return Ok(delivered);
    }
    let (why, who) = (o.last_error.clone(), o.who);
    record(ctx, &row, &owner, o).await?;
    let queued_for = (ctx.clock().now() - row.created_at).num_milliseconds() as f64 / 1000.0;
    match delivered {
        Delivered::Sent => shared.metrics.sent(queued_for),
        Delivered::Failed => shared.metrics.failed(queued_for),
        _ => {}
    }
    if delivered == Delivered::Failed {
        crate::failed_notice::mail_failed(ctx, &row, why.as_deref().unwrap_or_default(), who).await;
    }
    if delivered == Delivered::Sent {
        crate::health::succeeded(ctx, shared, server.id, None).await?;
    }
    tracing::info!(outbox_id = row.id, outcome = ?delivered, "delivery attempt");
    Ok(delivered)
}

/// Gets a token and sends the claimed mail; a token the server refused (`535`) that was not
/// just issued is refreshed once and the mail sent again.
async fn send_claimed(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    attempt: &Attempt<'_>,
    lease: &LeaseKeeper,
) -> Result<(Delivered, Outcome), sea_orm::DbErr> {
    let (row, server) = (attempt.row, attempt.server);
    let mut token = match fresh_access_token(ctx, shared, server, false).await {
        Ok(t) => t,
        Err(problem) => return Ok(attempt.token_problem(&problem)),
    };
    let envelope = match envelope_of(row) {
        Ok(e) => e,
        Err(e) => {
            let why = format!("The stored envelope is invalid: {e}");
            return Ok(attempt.failed(None, why, Who::Operator));
        }
    };
    let raw = row.raw_message.as_bytes();
    let mut outcome = send_once(ctx, shared, server, &token, &envelope, raw, lease).await;
    if let SendOutcome::Failed(f) = &outcome
        && f.refused_token()
        && !token.refreshed
    {
        shared.smtp.forget(server.id);
        match fresh_access_token(ctx, shared, server, true).await {
            Ok(t) => {
                token = t;
                outcome = send_once(ctx, shared, server, &token, &envelope, raw, lease).await;
            }
            Err(problem) => return Ok(attempt.token_problem(&problem)),
        }
    }
    Ok(match outcome {
        SendOutcome::LeaseLost => (Delivered::Skipped, attempt.wait(None, None, String::new())),
        SendOutcome::Sent(reply) => (
            Delivered::Sent,
            Outcome {
                status: "sent",
                next_attempt_at: None,
                last_reply: Some(reply),
                last_error: None,
                sent: true,
                uncount: false,
                who: Who::Nobody,
            },
        ),
        SendOutcome::Busy(why) => {
            // Nothing was tried: wait a moment without spending an attempt.
            let wait = Duration::milliseconds(rand::rng().random_range(1000..3000));
            tracing::debug!(outbox_id = row.id, "{why}");
            let mut o = attempt.wait(Some(attempt.now + wait), None, String::new());
            o.last_error = None;
            (Delivered::Retry, o)
        }
        SendOutcome::Failed(f) => {
            let facts = Facts {
                mailbox: &server.mailbox,
                from: &row.envelope_from,
                auth_user: if f.auth_user.is_empty() {
                    &server.mailbox
                } else {
                    &f.auth_user
                },
            };
            let verdict = classify::smtp(f.observed(), &facts);
            shared.metrics.outcome(&verdict);
            let reply = f.code.is_some().then(|| f.text.clone());
            attempt.apply(ctx, shared, &verdict, reply).await?
        }
    })
}

/// A stand-in for a deleted server (only its id is known).
fn placeholder_server(id: i32) -> mail_server::Model {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    mail_server::Model {
        id,
        name: String::new(),
        kind: String::new(),
        owner_user_id: None,
        smtp_host: String::new(),
        smtp_port: 0,
        security: String::new(),
        extra_ca_pem: None,
        mailbox: String::new(),
        auth: String::new(),
        transport: String::new(),
        send_as: String::new(),
        from_allow_list: String::new(),
        is_default: false,
        created_at: epoch,
        updated_at: epoch,
    }
}

/// The ids of mails that need a delivery job now, marked as pushed in the same statement (so
/// that the sweeps of several processes push each once): queued and due, or claimed by a
/// worker whose lease ran out, and not pushed since — or pushed longer than `repush_after` ago
/// (its job may be lost: apalis gave up on it, or its worker died with it).
pub async fn to_push(
    ctx: &ModuleContext,
    limit: u64,
    repush_after: Duration,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    use sea_orm::ConnectionTrait;
    use sea_orm::sea_query::{LockBehavior, LockType, Query};
    let now = ctx.clock().now();
    let not_pushed_since = |since: outbox::Column| {
        Condition::any()
            .add(outbox::Column::PushedAt.is_null())
            .add(Expr::col(outbox::Column::PushedAt).lt(Expr::col(since)))
            .add(outbox::Column::PushedAt.lt(now - repush_after))
    };
    let due = Condition::all()
        .add(
            Condition::any()
                .add(
                    Condition::all()
                        .add(outbox::Column::Status.eq("queued"))
                        .add(outbox::Column::NextAttemptAt.lte(now))
                        .add(not_pushed_since(outbox::Column::NextAttemptAt)),
                )
                .add(
                    Condition::all()
                        .add(outbox::Column::Status.eq("sending"))
                        .add(outbox::Column::LeaseUntil.lt(now))
                        .add(not_pushed_since(outbox::Column::LeaseUntil)),
                ),
        )
        .add(crate::health::claimable(now));
    let backend = ctx.db().get_database_backend();
    let mut pick = Query::select();
    pick.column(outbox::Column::Id)
        .from(outbox::Entity)
        .cond_where(due)
        .limit(limit);
    if backend == sea_orm::DbBackend::Postgres {
        pick.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let update = Query::update()
        .table(outbox::Entity)
        .value(outbox::Column::PushedAt, now)
        .and_where(outbox::Column::Id.in_subquery(pick))
        .returning_col(outbox::Column::Id)
        .to_owned();
    let rows = ctx.db().query_all(&update).await?;
    rows.iter().map(|r| r.try_get::<i64>("", "id")).collect()
}

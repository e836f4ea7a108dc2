//! Claims, a batch at a time: one statement claims a mailbox's due mails under a lease (SKIP
//! LOCKED on PostgreSQL; at a per-minute limit, only the window's room), one reads their
//! bodies. The outbox row stays the truth: only the claim's owner writes an outcome
//! ([`crate::outbox::record`]), and a claim whose lease ran out is taken over.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, TransactionTrait,
};

use crate::delivery::health::Health;
use crate::entities::{outbox, outbox_body, smtp_slot};
use crate::runtime::Shared;

/// Mails claimed at once from one mailbox.
pub const BATCH: u64 = 100;

/// Bytes of message text a batch holds at most (by the rows' `size_bytes`): a batch is cut
/// after the mail that would pass it, so a drain keeps about this much of mail text in memory,
/// or one mail when a single one is larger.
pub const BATCH_BYTES: i64 = 16 * 1024 * 1024;

/// How long a claim is left to its drain past its lease before the sweep takes it back, and
/// how long the sweeping process must itself have reached the database without a failure
/// before it takes any back (35 s, counted from its first sweep that got through). A drain
/// whose database was away goes on trying to write its outcomes every quarter second; once
/// the database answers again its pool opens a new connection within a few seconds (sqlx
/// tries again with a backoff of at most a fifth of its 30 s acquire timeout): it must get
/// its outcomes in before another drain is given the same mails, or those would be sent twice.
pub const TAKEOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(35);

/// A claimed mail: the columns of its outbox row that sending it, deciding its outcome and
/// telling people of a failure need. The claim returns only these: decoding whole rows (22
/// columns, six of them timestamps) took about half of a claim's time on SQLite.
#[derive(Clone, Debug, PartialEq, Eq, FromQueryResult)]
pub struct ClaimedRow {
    /// The outbox row.
    pub id: i64,
    /// The Message-ID, without `<>`.
    pub message_id: String,
    /// Who queued it.
    pub author_user_id: i64,
    /// The From header as shown to people.
    pub from_header: String,
    /// The envelope sender (MAIL FROM).
    pub envelope_from: String,
    /// Envelope recipients, one per line.
    pub recipients: String,
    /// The subject.
    pub subject: String,
    /// Bytes of the message.
    pub size_bytes: i64,
    /// Attempts, this one included.
    pub attempts: i32,
    /// The last reply before this attempt.
    pub last_reply: Option<String>,
    /// The last failure before this attempt, in words.
    pub last_error: Option<String>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
}

/// The columns of [`ClaimedRow`], as the claim returns them.
const CLAIMED_COLUMNS: [outbox::Column; 12] = [
    outbox::Column::Id,
    outbox::Column::MessageId,
    outbox::Column::AuthorUserId,
    outbox::Column::FromHeader,
    outbox::Column::EnvelopeFrom,
    outbox::Column::Recipients,
    outbox::Column::Subject,
    outbox::Column::SizeBytes,
    outbox::Column::Attempts,
    outbox::Column::LastReply,
    outbox::Column::LastError,
    outbox::Column::CreatedAt,
];

/// A claimed batch: the rows (in queue order, `attempts` already counting this attempt) and
/// the claim's owner name, unique per claim.
pub struct Claimed {
    /// The owner written in `lease_owner`.
    pub owner: String,
    /// When the batch was claimed (the module's clock).
    pub claimed_at: DateTime<Utc>,
    /// The rows, by id.
    pub rows: Vec<ClaimedRow>,
}

/// What a claim found.
pub enum Claim {
    /// No due mail (or the mailbox is held or throttled).
    Nothing,
    /// The mailbox sent its per-minute share: its next mails were made due at this time.
    AtLimit(DateTime<Utc>),
    /// A batch to send.
    Batch(Claimed),
}

/// Whether SQLite refused a write because another connection was writing (in WAL mode a
/// statement whose snapshot went stale is refused at once, not waited for).
fn is_busy(e: &sea_orm::DbErr) -> bool {
    let text = e.to_string();
    text.contains("database is locked") || text.contains("database is busy")
}

/// Runs a write, again a few times if SQLite says the database is busy: an outcome after the
/// server's `250` must not be lost (the mail would be sent again once its lease ran out).
pub async fn persist<T, F, Fut>(mut write: F) -> Result<T, sea_orm::DbErr>
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

/// The condition `id IN (…)` on the first `limit` queued mails of `server_id`, in queue
/// order, due by `by` (`skip_locked`: on PostgreSQL, without those another process is claiming):
/// the partial index on queued mails (server_id, id) gives them in that order. On PostgreSQL
/// the due filter is written `(… <= by) IS TRUE`: the same rows, but no index on the due time
/// can serve it, so PostgreSQL walks the mailbox's part of the queued index in id order
/// whatever its statistics say. Right after a burst of mail they still tell of an empty
/// queue, and it chose the index of due mails: every claim then read all the due mail of
/// every mailbox and sorted it (5.1 ms against 1.9 ms for a claim of 100 of 10,000 in
/// `EXPLAIN ANALYZE`). SQLite, with no statistics, takes the queued index.
fn first_queued(
    backend: sea_orm::DbBackend,
    server_id: i32,
    by: DateTime<Utc>,
    limit: u64,
    skip_locked: bool,
) -> sea_orm::sea_query::SimpleExpr {
    let due = outbox::Column::NextAttemptAt.lte(by);
    let mut pick = Query::select();
    pick.column(outbox::Column::Id)
        .from(outbox::Entity)
        .and_where(outbox::Column::ServerId.eq(server_id))
        .and_where(outbox::status_is("queued"))
        .order_by(outbox::Column::Id, sea_orm::Order::Asc);
    if backend == sea_orm::DbBackend::Postgres {
        pick.and_where(Expr::cust_with_expr("($1) IS TRUE", due))
            .limit(limit);
        if skip_locked {
            // Rows another process is claiming right now are skipped, not waited for.
            pick.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        return outbox::Column::Id.in_subquery(pick);
    }
    // On SQLite the limit is written into the text, not bound: SQLite reads a bound limit
    // while planning and then compiles the statement again at every run (see
    // [`crate::entities::by_key`]). `limit` is a number of this code, never input.
    pick.and_where(due);
    let sub = backend.build(&pick);
    let table = sea_orm::EntityName::table_name(&outbox::Entity);
    Expr::cust_with_values(
        format!("\"{table}\".\"id\" IN ({} LIMIT {limit})", sub.sql),
        sub.values.map(|v| v.0).unwrap_or_default(),
    )
}

/// Claims up to `limit` due mails of `server_id` in queue order (the index on server, status
/// and id walks them in that order); `admitted` also marks them `sent_at` (the per-minute
/// count includes mails in flight). Mails whose claim ran out are put back by the sweep
/// ([`crate::outbox::sweep::to_wake`]), so only queued ones are looked at here.
async fn claim_rows<C: ConnectionTrait>(
    db: &C,
    shared: &Shared,
    now: DateTime<Utc>,
    server_id: i32,
    limit: u64,
    admitted: bool,
) -> Result<Claimed, sea_orm::DbErr> {
    let owner = format!(
        "{}:{}",
        shared.instance,
        shared.claims.fetch_add(1, Ordering::Relaxed)
    );
    let picked = first_queued(db.get_database_backend(), server_id, now, limit, true);
    let mut claim = outbox::Entity::update_many()
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
    if admitted {
        claim = claim.col_expr(outbox::Column::SentAt, Expr::value(now));
    }
    let mut claim = claim.filter(picked).into_query();
    claim.returning(Query::returning().columns(CLAIMED_COLUMNS));
    let claim = db.get_database_backend().build(&claim);
    let mut rows = ClaimedRow::find_by_statement(claim).all(db).await?;
    rows.sort_unstable_by_key(|r| r.id);
    Ok(Claimed {
        owner,
        claimed_at: now,
        rows,
    })
}

/// Claims a batch of `server_id`'s due mails. With a per-minute limit (`per_minute` > 0,
/// counted over every process on the database), only as many as the last minute leaves room
/// for; when none is left, the due mails wait for the window to free, spending no attempt.
pub async fn claim_batch(
    ctx: &ModuleContext,
    shared: &Shared,
    server_id: i32,
    per_minute: usize,
) -> Result<Claim, sea_orm::DbErr> {
    // The mailbox's health decides, read once per batch: held or throttled, nothing; a hold
    // whose probe time has passed, only its oldest waiting mail (the probe: if it goes out the
    // hold ends and the others follow in queue order).
    let now = ctx.clock().now();
    let limit = match crate::delivery::health::get(ctx, server_id).await? {
        Health::Ready => BATCH,
        Health::Held {
            until: Some(until), ..
        } if until <= now => 1,
        Health::Held { .. } | Health::Throttled { .. } => return Ok(Claim::Nothing),
    };
    if per_minute > 0 {
        shared.smtp.ensure_slot_rows(ctx, server_id).await?;
    }
    let turn = shared.write_gate(ctx).await;
    let claimed = if per_minute == 0 {
        persist(|| claim_rows(turn.db(), shared, now, server_id, limit, false)).await?
    } else {
        match persist(|| admit_and_claim(ctx, turn.db(), shared, (server_id, per_minute), limit))
            .await?
        {
            Ok(claimed) => claimed,
            Err(until) => return Ok(Claim::AtLimit(until)),
        }
    };
    Ok(if claimed.rows.is_empty() {
        Claim::Nothing
    } else {
        Claim::Batch(claimed)
    })
}

/// In one transaction, serialised per mailbox by a row lock: counts the mailbox's sends of the
/// last minute and claims what is left of its share; or, with none left, makes its next mails
/// (as many as leave the window first) due when the window frees, and says when.
async fn admit_and_claim(
    ctx: &ModuleContext,
    db: &sea_orm::DatabaseConnection,
    shared: &Shared,
    (server_id, per_minute): (i32, usize),
    limit: u64,
) -> Result<Result<Claimed, DateTime<Utc>>, sea_orm::DbErr> {
    let txn = db.begin().await?;
    // The mailbox's first slot row is the lock (a write that changes nothing).
    smtp_slot::Entity::update_many()
        .col_expr(
            smtp_slot::Column::Holder,
            Expr::col(smtp_slot::Column::Holder),
        )
        .filter(smtp_slot::Column::ServerId.eq(server_id))
        .filter(smtp_slot::Column::Slot.eq(0))
        .exec(&txn)
        .await?;
    let now = ctx.clock().now();
    let window_start = now - Duration::seconds(60);
    let in_window = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::SentAt)
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::Column::SentAt.gt(window_start))
        .order_by_asc(outbox::Column::SentAt)
        .into_tuple::<DateTime<Utc>>()
        .all(&txn)
        .await?;
    let room = per_minute.saturating_sub(in_window.len()) as u64;
    if room > 0 {
        let claimed = claim_rows(&txn, shared, now, server_id, Ord::min(room, limit), true).await?;
        txn.commit().await?;
        return Ok(Ok(claimed));
    }
    // The oldest sends of the window (a batch's share the same time) leave it first: as many
    // of the oldest queued mails are due then, when the sweep or this process wakes the
    // mailbox. The others keep their time and go in queue order after them: moving every
    // waiting mail each minute rewrote a throttled backlog of N mails 2N times a minute.
    let oldest = in_window.first().copied();
    let until = oldest.map_or(now + Duration::seconds(5), |t| {
        Ord::max(t + Duration::seconds(60), now + Duration::seconds(1))
    });
    let share = in_window.iter().take_while(|t| Some(**t) == oldest).count();
    // The oldest queued mails due by then (those already given this time included, so that
    // a second look moves no more; a mail waiting for a later retry is not among them).
    let next = first_queued(
        txn.get_database_backend(),
        server_id,
        until,
        Ord::max(share, 1) as u64,
        false,
    );
    outbox::Entity::update_many()
        .col_expr(outbox::Column::NextAttemptAt, Expr::value(until))
        .filter(next)
        .filter(outbox::status_is("queued"))
        .filter(outbox::Column::NextAttemptAt.lt(until))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(Err(until))
}

/// Keeps the first mails of `claimed` whose sizes add up to at most `max_bytes` (at least one)
/// and gives the others back at once: queued and due as before, their attempt and admission
/// returned, for the drain's next batch.
pub async fn keep_within(
    ctx: &ModuleContext,
    shared: &Shared,
    mut claimed: Claimed,
    max_bytes: i64,
) -> Result<Claimed, sea_orm::DbErr> {
    let mut total = 0_i64;
    let keep = claimed
        .rows
        .iter()
        .position(|r| {
            total += r.size_bytes;
            total > max_bytes
        })
        .map_or(claimed.rows.len(), |cut| Ord::max(cut, 1));
    if keep == claimed.rows.len() {
        return Ok(claimed);
    }
    let back: Vec<i64> = claimed.rows[keep..].iter().map(|r| r.id).collect();
    let turn = shared.write_gate(ctx).await;
    let back_at = ctx.clock().now();
    persist(|| {
        back_in_queue()
            // Due since now: after the mailbox's last wake, so that the sweep wakes it should
            // this drain stop before its next batch (queue order is by id, not by due time).
            .col_expr(outbox::Column::NextAttemptAt, Expr::value(back_at))
            .col_expr(
                outbox::Column::Attempts,
                Expr::col(outbox::Column::Attempts).sub(1),
            )
            .filter(outbox::Column::Id.is_in(back.iter().copied()))
            .filter(outbox::Column::LeaseOwner.eq(claimed.owner.as_str()))
            .exec(turn.db())
    })
    .await?;
    claimed.rows.truncate(keep);
    Ok(claimed)
}

/// An update that ends claims: the mails take `status`, with no owner and no lease.
pub(crate) fn unclaimed(status: &'static str) -> sea_orm::UpdateMany<outbox::Entity> {
    outbox::Entity::update_many()
        .col_expr(outbox::Column::Status, Expr::value(status))
        .col_expr(
            outbox::Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            outbox::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
}

/// An update that puts claimed mails back in the queue: no owner, no lease, not counted as
/// sent in the per-minute window.
pub(crate) fn back_in_queue() -> sea_orm::UpdateMany<outbox::Entity> {
    unclaimed("queued").col_expr(
        outbox::Column::SentAt,
        Expr::value(Option::<DateTime<Utc>>::None),
    )
}

/// The bodies of the mails `ids`, by id (a mail without one is missing from the map).
pub async fn bodies(
    ctx: &ModuleContext,
    ids: &[i64],
) -> Result<HashMap<i64, String>, sea_orm::DbErr> {
    let rows = outbox_body::Entity::find()
        .filter(outbox_body::Column::OutboxId.is_in(ids.iter().copied()))
        .all(ctx.db())
        .await?;
    Ok(rows.into_iter().map(|b| (b.outbox_id, b.raw)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On SQLite the claim's limit is written into its text: a bound `LIMIT ?` made SQLite
    /// compile the statement again at every claim. On PostgreSQL it stays a parameter.
    #[test]
    fn the_claim_limit_is_in_the_text_on_sqlite_and_bound_on_postgres() {
        let now = Utc::now();
        let render = |backend: sea_orm::DbBackend| {
            let claim = outbox::Entity::update_many()
                .col_expr(outbox::Column::Status, Expr::value("sending"))
                .filter(first_queued(backend, 7, now, BATCH, true))
                .into_query();
            backend.build(&claim)
        };
        let sqlite = render(sea_orm::DbBackend::Sqlite);
        assert!(sqlite.sql.contains("LIMIT 100)"), "{}", sqlite.sql);
        assert!(!sqlite.sql.contains("LIMIT ?"), "{}", sqlite.sql);
        // The status, the server and the due time: the values stay bound, in order.
        let values = sqlite.values.expect("values").0;
        assert_eq!(values.len(), 3, "{values:?}");
        assert_eq!(values[1], 7.into());
        let postgres = render(sea_orm::DbBackend::Postgres);
        assert!(postgres.sql.contains("SKIP LOCKED"), "{}", postgres.sql);
        assert!(postgres.sql.contains("LIMIT $"), "{}", postgres.sql);
    }
}

//! What the sweep finds: mails whose claim ran out (put back in the queue), the mailboxes whose
//! due mail nobody drains (woken), every mailbox with mail at start, and the texts of sent mail
//! past the retention (deleted).

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, Set};

use crate::entities::{mailbox_wake, outbox, outbox_body};
use crate::outbox::claims::{back_in_queue, persist};
use crate::runtime::Shared;

/// The mailboxes whose due mail nobody is draining, each once. First, mails whose claim ran
/// out (their drain died, or lost its database for longer than the lease) are put back in the
/// queue, their attempt spent: [`crate::outbox::claims::TAKEOVER_GRACE`] after the lease,
/// and only once this process has reached the database for that long without a failure
/// ([`Shared::db_steady_for`]). Then the mailboxes with queued mail that came due after the
/// mailbox was last woken (or was woken longer than `repush_after` ago: that drain may be
/// lost) are marked woken, one row per mailbox in `microsoft_outlook_mailbox_wakes`, so that
/// the sweeps of several processes wake each about once. (The mark was once on every mail: a
/// sweep rewrote the whole backlog behind a drain, 8,400 rows and 196 ms in a PostgreSQL serve
/// run of 10,000 mails.)
///
/// A mailbox this process is draining right now is not marked, only returned: its wake tells
/// the running drain to look once more before it ends (a mail may have come due after its last
/// claim), or starts a drain if it has just ended; left unmarked, the next sweep wakes it
/// again should that drain end without the mail. With several processes, the sweep of another
/// one may then wake it there as well; both drains claim with `SKIP LOCKED` and share the
/// mailbox's connection cap.
pub async fn to_wake(
    ctx: &ModuleContext,
    shared: &Shared,
    repush_after: Duration,
) -> Result<Vec<i32>, sea_orm::DbErr> {
    let now = ctx.clock().now();
    // Only a process that has reached the database for the whole grace takes claims over:
    // right after an outage, the owners of the claims (alive, retrying) get their outcomes in
    // first, however long the outage was.
    if shared.db_steady_for() >= crate::outbox::claims::TAKEOVER_GRACE {
        let turn = shared.write_gate(ctx).await;
        persist(|| {
            back_in_queue()
                .col_expr(outbox::Column::NextAttemptAt, Expr::value(now))
                .filter(outbox::status_is("sending"))
                // A grace past the lease, for a drain whose database was away (see above).
                .filter(outbox::Column::LeaseUntil.lt(now - takeover_grace()))
                .exec(turn.db())
        })
        .await?;
    }
    // Queued, due, and due since its mailbox was last woken (or woken longer ago than
    // `repush_after`: that drain may be lost). One wake time per mailbox, not per mail: a
    // drain takes all of its mailbox's due mail.
    let woken_since_due = Query::select()
        .expr(Expr::val(1))
        .from(mailbox_wake::Entity)
        .and_where(
            Expr::col((mailbox_wake::Entity, mailbox_wake::Column::ServerId))
                .equals((outbox::Entity, outbox::Column::ServerId)),
        )
        .and_where(
            Expr::col((mailbox_wake::Entity, mailbox_wake::Column::PushedAt))
                .gte(Expr::col((outbox::Entity, outbox::Column::NextAttemptAt))),
        )
        .and_where(
            Expr::col((mailbox_wake::Entity, mailbox_wake::Column::PushedAt))
                .gte(now - repush_after),
        )
        .to_owned();
    let servers: Vec<i32> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::ServerId)
        .distinct()
        .filter(outbox::status_is("queued"))
        .filter(outbox::Column::NextAttemptAt.lte(now))
        .filter(Expr::exists(woken_since_due).not())
        .filter(crate::delivery::health::claimable(now))
        .into_tuple()
        .all(ctx.db())
        .await?;
    let draining = shared.draining_here();
    let to_mark: Vec<i32> = servers
        .iter()
        .copied()
        .filter(|id| !draining.contains(id))
        .collect();
    if !to_mark.is_empty() {
        let turn = shared.write_gate(ctx).await;
        persist(|| mark_woken(turn.db(), &to_mark, now)).await?;
    }
    Ok(servers)
}

/// Records that a drain of each of `servers` was asked for at `now` (one row per mailbox).
pub async fn mark_woken<C: sea_orm::ConnectionTrait>(
    db: &C,
    servers: &[i32],
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    if servers.is_empty() {
        return Ok(());
    }
    mailbox_wake::Entity::insert_many(servers.iter().map(|id| mailbox_wake::ActiveModel {
        server_id: Set(*id),
        pushed_at: Set(now),
    }))
    .on_conflict(
        OnConflict::column(mailbox_wake::Column::ServerId)
            .update_column(mailbox_wake::Column::PushedAt)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Every mailbox with mail queued or being sent (a process starting wakes them all).
pub async fn with_mail(ctx: &ModuleContext) -> Result<Vec<i32>, sea_orm::DbErr> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::ServerId)
        .distinct()
        .filter(outbox::unsent())
        .into_tuple()
        .all(ctx.db())
        .await
}

/// Deletes the bodies of mails sent before `before`, at most `limit` of them; returns how many.
pub async fn prune_bodies(
    db: &sea_orm::DatabaseConnection,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64, sea_orm::DbErr> {
    let old = Query::select()
        .column((outbox_body::Entity, outbox_body::Column::OutboxId))
        .from(outbox_body::Entity)
        .inner_join(
            outbox::Entity,
            Expr::col((outbox::Entity, outbox::Column::Id))
                .equals((outbox_body::Entity, outbox_body::Column::OutboxId)),
        )
        .and_where(Expr::col((outbox::Entity, outbox::Column::Status)).eq("sent"))
        .and_where(Expr::col((outbox::Entity, outbox::Column::SentAt)).lt(before))
        .limit(limit)
        .to_owned();
    let deleted = outbox_body::Entity::delete_many()
        .filter(outbox_body::Column::OutboxId.in_subquery(old))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// How long past its lease a claim is left to its drain before the sweep takes it back
/// ([`crate::outbox::claims::TAKEOVER_GRACE`]).
pub fn takeover_grace() -> Duration {
    Duration::from_std(crate::outbox::claims::TAKEOVER_GRACE).unwrap_or(Duration::seconds(35))
}

//! What the sweep finds: mails whose claim ran out (put back in the queue), the mailboxes whose
//! due mail nobody drains (woken), every mailbox with mail at start, and the texts of sent mail
//! past the retention (deleted).

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};

use crate::entities::{outbox, outbox_body};
use crate::outbox::claims::{back_in_queue, persist};
use crate::runtime::Shared;

/// The mailboxes whose due mail nobody is draining, each once. First, mails whose claim ran
/// out (their drain died, or lost its database for longer than the lease) are put back in the
/// queue, their attempt spent: [`crate::outbox::claims::TAKEOVER_GRACE`] after the lease,
/// and only once this process has reached the database for that long without a failure
/// ([`Shared::db_steady_for`]). Then the mailboxes with queued, due mail that was not pushed
/// since it became due (or was pushed longer than `repush_after` ago: that drain may be lost)
/// are marked pushed, so that the sweeps of several processes wake each about once.
///
/// The mails of a mailbox this process is draining right now are not marked: marking its
/// backlog rewrote every row behind the batch in flight (one statement of 8,400 rows, 196 ms,
/// in a PostgreSQL serve run of 10,000 mails). Such a mailbox is still returned: its wake only
/// tells the running drain to look once more before it ends (a mail may have come due after
/// its last claim), or starts a drain if it has just ended. With several processes, the sweep
/// of another one may then wake it there as well; both drains claim with `SKIP LOCKED` and share
/// the mailbox's connection cap.
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
    let waiting = || {
        Condition::all()
            .add(outbox::status_is("queued"))
            .add(outbox::Column::NextAttemptAt.lte(now))
            .add(
                Condition::any()
                    .add(outbox::Column::PushedAt.is_null())
                    .add(
                        Expr::col(outbox::Column::PushedAt)
                            .lt(Expr::col(outbox::Column::NextAttemptAt)),
                    )
                    .add(outbox::Column::PushedAt.lt(now - repush_after)),
            )
    };
    let servers: Vec<i32> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::ServerId)
        .distinct()
        .filter(waiting())
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
        persist(|| {
            outbox::Entity::update_many()
                .col_expr(outbox::Column::PushedAt, Expr::value(now))
                .filter(waiting())
                .filter(outbox::Column::ServerId.is_in(to_mark.iter().copied()))
                .exec(turn.db())
        })
        .await?;
    }
    Ok(servers)
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

//! Ending a mailbox's hold: by its fix (a new connection, a passed test, a transport switched,
//! the settings saved, a token obtained again, a probe mail through) or by an operator's
//! Release held mail. The hold's end and the history rows of the mails that waited for it
//! commit together; its notification is resolved, and the waiting mails go out in queue
//! order. The state itself is [`crate::delivery::health`].

use chrono::{DateTime, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait};

use crate::delivery::classify::HoldReason;
use crate::delivery::health::{Health, get, incident_key, notification_key};
use crate::entities::{mailbox_health, outbox, token};
use crate::outbox::history::{self, Ended};
use crate::runtime::Shared;

/// How a release goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Someone fixed or asked (reconnect, Release held mail): send the waiting mails even if
    /// nothing was held.
    Forced,
    /// Only if a hold or throttle ended.
    IfHeld,
}

/// Ends whatever hold or throttle `server_id` is under (`only`: only holds for these reasons),
/// resolves its notification, and sends its waiting mails in queue order. When a hold ended,
/// each mail that waits for it (queued, or in flight) gets `ended` (who or what ended it) in
/// its history, in the transaction that ends the hold; a probe batch's mails that went out
/// get words of their own ([`history::probe_went_out`]). Returns whether a hold ended.
pub async fn release(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    server_id: i32,
    (only, how): (Option<&[HoldReason]>, Release),
    ended: Ended<'_>,
) -> Result<bool, sea_orm::DbErr> {
    let (was_held, waiting) = end_hold(ctx, shared, server_id, (only, how), ended).await?;
    if !waiting.is_empty() {
        // The mailbox's drain claims in queue order: the waiting mails go before later ones.
        shared.wake(server_id).await;
    }
    Ok(was_held)
}

/// The mails that waited for `server_id`'s hold: the queued ones and the one in flight as its
/// probe (in `db`, the transaction that ends the hold).
async fn waiting_ids<C: sea_orm::ConnectionTrait>(
    db: &C,
    server_id: i32,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::unsent())
        .into_tuple()
        .all(db)
        .await
}

/// Why Release held mail does nothing for a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReleased {
    /// Its sign-in at Microsoft has ended: only connecting it again ends the hold.
    OnlyReconnect,
    /// Microsoft 365 asked it to slow down until then: it sends again by itself.
    Throttled(DateTime<Utc>),
}

impl NotReleased {
    /// In words, for an operator, of a `personal` mailbox or a shared one.
    pub fn words(self, personal: bool) -> String {
        match self {
            NotReleased::OnlyReconnect if personal => "Release held mail cannot end this hold: the mailbox's sign-in at Microsoft has ended or it was never connected, and only its owner can connect it (they were asked to, under My mailbox). Its mails wait until then, without spending attempts.".into(),
            NotReleased::OnlyReconnect => "Release held mail cannot end this hold: the mailbox's sign-in at Microsoft has ended or it was never connected, and only connecting it ends it (Connect or Reconnect, on the mail server's page). Its mails wait until then, without spending attempts.".into(),
            NotReleased::Throttled(until) => format!(
                "Microsoft 365 asked this mailbox to slow down until {} UTC: its mails go out by themselves then, without spending attempts (sending sooner would only meet the same answer).",
                until.format("%Y-%m-%d %H:%M:%S")
            ),
        }
    }

    /// A title for the page that says it.
    pub fn title(self) -> &'static str {
        match self {
            NotReleased::OnlyReconnect => "Reconnect needed",
            NotReleased::Throttled(_) => "Throttled",
        }
    }
}

/// Release held mail, asked for by the operator `by` (the server's page, the outbox): as
/// [`release`] with [`Release::Forced`] for the holds a release can end. `Ok(Err(_))`: the
/// mailbox is held for a reason only its fix ends (a dead grant), or throttled, and nothing
/// was done; otherwise whether a hold ended.
pub async fn release_by(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    server_id: i32,
    by: &crm_sdk::CurrentUser,
) -> Result<Result<bool, NotReleased>, sea_orm::DbErr> {
    let refused = |health: Health| match health {
        Health::Held { reason, .. } if !reason.release_can_help() => {
            Some(NotReleased::OnlyReconnect)
        }
        Health::Throttled { until } => Some(NotReleased::Throttled(until)),
        _ => None,
    };
    if let Some(not) = refused(get(ctx, server_id).await?) {
        return Ok(Err(not));
    }
    // Only the holds a release can end, in the statement itself: a dead grant or a throttle
    // that came meanwhile (another process) stays.
    let releasable: Vec<HoldReason> = HoldReason::ALL
        .into_iter()
        .filter(|r| r.release_can_help())
        .collect();
    let how = (Some(releasable.as_slice()), Release::Forced);
    let ended = release(ctx, shared, server_id, how, Ended::ReleasedBy(by)).await?;
    if !ended {
        shared.forget_health(server_id);
        if let Some(not) = refused(get(ctx, server_id).await?) {
            return Ok(Err(not));
        }
    }
    Ok(Ok(ended))
}

/// The update that makes `server_id`'s state `ready` at `now` (its hold's reason, words, rule,
/// times and notice cleared), from any other state.
fn back_to_ready(
    server_id: i32,
    now: DateTime<Utc>,
) -> sea_orm::UpdateMany<mailbox_health::Entity> {
    let none = Option::<String>::None;
    let never = Option::<DateTime<Utc>>::None;
    mailbox_health::Entity::update_many()
        .col_expr(mailbox_health::Column::State, Expr::value("ready"))
        .col_expr(mailbox_health::Column::Reason, Expr::value(none.clone()))
        .col_expr(mailbox_health::Column::Detail, Expr::value(none.clone()))
        .col_expr(mailbox_health::Column::Rule, Expr::value(none))
        .col_expr(mailbox_health::Column::Since, Expr::value(never))
        .col_expr(mailbox_health::Column::Until, Expr::value(never))
        .col_expr(mailbox_health::Column::NotifiedAt, Expr::value(never))
        .col_expr(mailbox_health::Column::UpdatedAt, Expr::value(now))
        .filter(mailbox_health::Column::ServerId.eq(server_id))
        .filter(mailbox_health::Column::State.ne("ready"))
}

/// [`release`] without sending: whether a hold ended (then each mail that waited for it has
/// `ended_by` in its history), and the waiting mails to send.
async fn end_hold(
    ctx: &ModuleContext,
    shared: &Shared,
    server_id: i32,
    (only, how): (Option<&[HoldReason]>, Release),
    ended_by: Ended<'_>,
) -> Result<(bool, Vec<i64>), sea_orm::DbErr> {
    let now = ctx.clock().now();
    let before = mailbox_health::Entity::find_by_id(server_id)
        .one(ctx.db())
        .await?;
    let mut update = back_to_ready(server_id, now);
    if let Some(reasons) = only {
        update =
            update.filter(mailbox_health::Column::Reason.is_in(reasons.iter().map(|r| r.as_str())));
    }
    // The end of the hold and the history rows of the mails that waited for it commit
    // together: a drain can claim them only once both are written.
    let txn = ctx.db().begin().await?;
    let changed = update.exec(&txn).await?.rows_affected == 1;
    // A throttle's row stays `throttled` after it lapsed: ending that ends no hold.
    let ended = changed
        && before.as_ref().is_some_and(|b| {
            b.state == "held" || (b.state == "throttled" && b.until.is_some_and(|u| u > now))
        });
    if ended {
        let waited = waiting_ids(&txn, server_id).await?;
        history::hold_ended(&txn, &waited, ended_by, now).await?;
        // A batch claimed while held was the hold's probe: the mails of it that went out.
        let since = before.as_ref().and_then(|b| b.since);
        if let Ended::MailWentOut(batch, claimed_at) = ended_by
            && since.is_some_and(|since| claimed_at >= since)
        {
            history::probe_went_out(&txn, batch, now).await?;
        }
    }
    txn.commit().await?;
    shared.forget_health(server_id);
    if changed {
        tracing::info!(server_id, "mailbox hold ended");
        // The hold has ended: a stale error left behind must not undo that.
        if let Err(e) = clear_token_error(ctx, server_id).await {
            tracing::warn!(server_id, error = %e, "clearing the token's last error failed");
        }
        if let Err(e) = ctx.notifier().resolve(&notification_key(server_id)).await {
            tracing::warn!(error = %e, "resolving a hold notification failed");
        }
        let reason = before
            .and_then(|b| b.reason)
            .as_deref()
            .and_then(HoldReason::parse);
        if let Some(reason) = reason {
            end_incident_if_over(ctx, reason).await?;
        }
    }
    if !ended && how == Release::IfHeld {
        return Ok((false, Vec::new()));
    }
    Ok((ended, requeue_waiting(ctx, server_id).await?))
}

/// The token's last error described the hold that ended: it no longer stands beside a ready
/// mailbox (a dead grant keeps it: it says why the mailbox must be connected again).
async fn clear_token_error(ctx: &ModuleContext, server_id: i32) -> Result<(), sea_orm::DbErr> {
    token::Entity::update_many()
        .col_expr(
            token::Column::LastError,
            Expr::value(Option::<String>::None),
        )
        .filter(token::Column::ServerId.eq(server_id))
        .filter(token::Column::Status.eq("valid"))
        .exec(ctx.db())
        .await?;
    Ok(())
}

/// An incident told once for every mailbox (the settings', Microsoft out of reach:
/// [`incident_key`]) is over when no mailbox is held for its reason any more: it is resolved,
/// and a new one will be told again. Nothing to do for other reasons.
pub(crate) async fn end_incident_if_over(
    ctx: &ModuleContext,
    reason: HoldReason,
) -> Result<(), sea_orm::DbErr> {
    use sea_orm::PaginatorTrait;
    let Some(key) = incident_key(reason) else {
        return Ok(());
    };
    let key = key.as_str();
    let still = mailbox_health::Entity::find()
        .filter(mailbox_health::Column::State.eq("held"))
        .filter(mailbox_health::Column::Reason.eq(reason.as_str()))
        .count(ctx.db())
        .await?;
    if still == 0 {
        crate::alerts::forget_alert(ctx, key).await?;
        if let Err(e) = ctx.notifier().resolve(key).await {
            tracing::warn!(error = %e, "resolving an incident's notification failed");
        }
    }
    Ok(())
}

/// Ends every hold for one of `reasons` (after the settings were saved), resolving the
/// module-wide notification; the waiting mails of every mailbox go out in queue order, each
/// with the saved settings in its history.
pub async fn release_reasons(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    reasons: &[HoldReason],
) -> Result<usize, sea_orm::DbErr> {
    let held: Vec<i32> = mailbox_health::Entity::find()
        .select_only()
        .column(mailbox_health::Column::ServerId)
        .filter(mailbox_health::Column::State.eq("held"))
        .filter(mailbox_health::Column::Reason.is_in(reasons.iter().map(|r| r.as_str())))
        .order_by_asc(mailbox_health::Column::ServerId)
        .into_tuple()
        .all(ctx.db())
        .await?;
    let mut ended = 0;
    let mut waiting = Vec::new();
    for server_id in held {
        let how = (Some(reasons), Release::IfHeld);
        let (was_held, ids) = end_hold(ctx, shared, server_id, how, Ended::SettingsSaved).await?;
        ended += usize::from(was_held);
        if !ids.is_empty() {
            waiting.push(server_id);
        }
    }
    for reason in reasons {
        end_incident_if_over(ctx, *reason).await?;
    }
    for server_id in waiting {
        shared.wake(server_id).await;
    }
    Ok(ended)
}

/// What went right for a mailbox, as [`succeeded`] is told.
#[derive(Debug, Clone, Copy)]
pub enum Success<'a> {
    /// A token was obtained: ends holds for these reasons (the token endpoint's, the settings').
    Token(&'a [HoldReason]),
    /// Mail of a batch claimed at the given time went out (the ids: the batch's claimed
    /// mails, some perhaps not sent); a batch claimed while the mailbox was held was its probe.
    MailsWent(&'a [i64], DateTime<Utc>),
}

/// After mails went out or a token was obtained (`by`). A throttle is never ended here (it
/// lapses by itself); a hold ends when its probe time has passed (this success is the probe),
/// when a mail went out of a mailbox that could not reach Microsoft, or when a token was
/// obtained for a hold of the given reasons. A mail that was in flight when the mailbox was
/// held does not end the hold. Reads the state at most every two seconds per process.
pub async fn succeeded(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<Shared>,
    server_id: i32,
    by: Success<'_>,
) -> Result<(), sea_orm::DbErr> {
    if shared.known_ready(server_id) {
        return Ok(());
    }
    let now = ctx.clock().now();
    let health = get(ctx, server_id).await?;
    let ends = match &health {
        Health::Held { reason, until, .. } => match by {
            Success::Token(reasons) => reasons.contains(reason),
            // A mail that went out proves a server that could not be reached answers again
            // (whenever it was claimed).
            Success::MailsWent(..) => {
                until.is_some_and(|u| u <= now) || *reason == HoldReason::Unreachable
            }
        },
        Health::Ready | Health::Throttled { .. } => false,
    };
    if ends {
        let (only, ended) = match by {
            Success::Token(reasons) => (Some(reasons), Ended::TokenObtained),
            Success::MailsWent(ids, claimed_at) => (None, Ended::MailWentOut(ids, claimed_at)),
        };
        release(ctx, shared, server_id, (only, Release::IfHeld), ended).await?;
    } else if health == Health::Ready {
        shared.remember_ready(server_id);
    }
    Ok(())
}

/// Puts a mailbox's waiting mails back at the head of the queue: due now, in queue order.
async fn requeue_waiting(ctx: &ModuleContext, server_id: i32) -> Result<Vec<i64>, sea_orm::DbErr> {
    let now = ctx.clock().now();
    let waiting: Vec<i64> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::status_is("queued"))
        .order_by_asc(outbox::Column::Id)
        .into_tuple()
        .all(ctx.db())
        .await?;
    if waiting.is_empty() {
        return Ok(waiting);
    }
    // Due now, after the mailbox's last wake: if the wake that follows reaches no drain, the
    // sweep wakes the mailbox.
    outbox::Entity::update_many()
        .col_expr(outbox::Column::NextAttemptAt, Expr::value(now))
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::status_is("queued"))
        .exec(ctx.db())
        .await?;
    Ok(waiting)
}

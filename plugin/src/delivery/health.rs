//! One health state per mailbox (a mail server or a personal mailbox), persisted: `ready`,
//! `throttled` until a time, or `held` with a reason and since when. It is the single source
//! for the drains (a held mailbox's mails are not claimed), the pages, the CLI, the
//! notifications and the JSON APIs. A hold ends when its cause is fixed (reconnect, settings
//! saved, its time passing and a probe succeeding) or when an operator clicks Release held
//! mail; then the waiting mails go out in queue order. Beginning a hold, and telling the people who can
//! fix it, is [`crate::delivery::hold`]; ending one is [`crate::delivery::release`].

use chrono::{DateTime, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, OnConflict, Query, SimpleExpr};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect, Set};
use std::collections::HashMap;

use crate::delivery::classify::HoldReason;
use crate::entities::{mail_server, mailbox_health, outbox, token};
use crate::runtime::Shared;

/// A mailbox's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Mail goes out.
    Ready,
    /// Microsoft 365 (Exchange Online or Graph) asked to slow down: mails wait until `until`,
    /// spending no attempt.
    Throttled {
        /// When sending resumes.
        until: DateTime<Utc>,
    },
    /// Mails wait until the cause is fixed.
    Held {
        /// Why.
        reason: HoldReason,
        /// What happened and what to do.
        detail: String,
        /// The classification rule it stands on (empty for a hold stored before rules were).
        rule: String,
        /// Since when.
        since: DateTime<Utc>,
        /// When a mail is tried again by itself (a probe), if ever.
        until: Option<DateTime<Utc>>,
        /// Whether the people who can fix it were told (an unreachable mailbox is told of only
        /// once it lasts: [`crate::delivery::classify::UNREACHABLE_TELL_AFTER`]).
        told: bool,
    },
}

impl Health {
    /// The state of a stored row (a missing row is `Ready`), as of `now`.
    pub fn of(row: Option<&mailbox_health::Model>, now: DateTime<Utc>) -> Self {
        let Some(row) = row else {
            return Health::Ready;
        };
        match row.state.as_str() {
            "held" => Health::Held {
                reason: row
                    .reason
                    .as_deref()
                    .and_then(HoldReason::parse)
                    .unwrap_or(HoldReason::TokenRefused),
                detail: row.detail.clone().unwrap_or_default(),
                rule: row.rule.clone().unwrap_or_default(),
                since: row.since.unwrap_or(row.updated_at),
                until: row.until,
                told: row.notified_at.is_some(),
            },
            "throttled" if row.until.is_some_and(|u| u > now) => Health::Throttled {
                until: row.until.unwrap_or(now),
            },
            _ => Health::Ready,
        }
    }

    /// `ready`, `throttled` or `held`.
    pub fn state(&self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Throttled { .. } => "throttled",
            Health::Held { .. } => "held",
        }
    }

    /// The hold reason, if held.
    pub fn reason(&self) -> Option<HoldReason> {
        match self {
            Health::Held { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether the mailbox is held as out of reach because its SMTP server could not be
    /// reached (rule `unreachable`), where a personal mailbox's own settings (host, port,
    /// security) may be the cause; not when Microsoft Graph or the token endpoint was out of
    /// reach. A hold stored before its rule was is taken as the SMTP server's.
    pub fn smtp_out_of_reach(&self) -> bool {
        matches!(self, Health::Held { reason: HoldReason::Unreachable, rule, .. }
            if rule.is_empty() || rule == "unreachable")
    }

    /// One line for lists: "Held: SMTP AUTH disabled", "Throttled until 10:42:05 UTC", "Ready".
    pub fn label(&self) -> String {
        match self {
            Health::Ready => "Ready".into(),
            Health::Throttled { until } => {
                format!("Throttled until {}", until.format("%H:%M:%S UTC"))
            }
            Health::Held { reason, .. } => format!("Held: {}", reason.title()),
        }
    }
}

/// The notification key of a mailbox's incidents (resolved when the hold ends).
pub fn notification_key(server_id: i32) -> String {
    format!("microsoft_outlook:mailbox:{server_id}")
}

/// The notification key of an incident of the module's settings (one for every mailbox).
pub(crate) fn settings_key(reason: HoldReason) -> String {
    format!("microsoft_outlook:settings:{}", reason.as_str())
}

/// The notification key of the operators' notice that mailboxes cannot reach Microsoft (one
/// for all of them: resolved when none is held for it any more).
pub fn unreachable_key() -> String {
    "microsoft_outlook:unreachable".into()
}

/// The key of the operators' notice of `reason` told once for every mailbox held for it, if
/// it is such a reason (the settings', and Microsoft out of reach).
pub(crate) fn incident_key(reason: HoldReason) -> Option<String> {
    if module_wide(reason) {
        Some(settings_key(reason))
    } else if reason == HoldReason::Unreachable {
        Some(unreachable_key())
    } else {
        None
    }
}

/// Reasons that are the module's settings' (told once to operators, not once per mailbox).
pub(crate) fn module_wide(reason: HoldReason) -> bool {
    reason.ends_on_settings_saved()
}

/// The health of every mailbox that has a row.
pub async fn all(
    ctx: &ModuleContext,
) -> Result<HashMap<i32, mailbox_health::Model>, sea_orm::DbErr> {
    Ok(mailbox_health::Entity::find()
        .all(ctx.db())
        .await?
        .into_iter()
        .map(|r| (r.server_id, r))
        .collect())
}

/// The health of one mailbox.
pub async fn get(ctx: &ModuleContext, server_id: i32) -> Result<Health, sea_orm::DbErr> {
    let row = crate::entities::by_key::<mailbox_health::Entity, _>(ctx.db(), server_id).await?;
    Ok(Health::of(row.as_ref(), ctx.clock().now()))
}

/// A condition on outbox rows: their mailbox is neither held nor throttled at `now`. When a
/// hold's probe time has passed, only the mailbox's oldest waiting mail may be claimed: it is
/// the probe; if it goes out the hold ends and the others follow in queue order.
pub fn claimable(now: DateTime<Utc>) -> SimpleExpr {
    let blocked = Query::select()
        .column(mailbox_health::Column::ServerId)
        .from(mailbox_health::Entity)
        .cond_where(
            Condition::all()
                .add(mailbox_health::Column::State.ne("ready"))
                .add(
                    Condition::any()
                        .add(mailbox_health::Column::Until.is_null())
                        .add(mailbox_health::Column::Until.gt(now)),
                ),
        )
        .to_owned();
    // Held mailboxes whose probe time has passed: only their oldest waiting mail is claimable.
    let probe_due = Query::select()
        .column(mailbox_health::Column::ServerId)
        .from(mailbox_health::Entity)
        .and_where(mailbox_health::Column::State.eq("held"))
        .and_where(mailbox_health::Column::Until.lte(now))
        .to_owned();
    // The probe: the mailbox's claimed mail while one is in flight (no second probe meanwhile),
    // else its oldest queued one that is due (a mail waiting for a retry of its own must not
    // keep a mailbox that answers again from being probed); each found by a partial index
    // (migration m0007).
    let oldest = Func::coalesce([
        oldest_of_mailbox("sending", None),
        oldest_of_mailbox("queued", Some(now)),
    ]);
    let not_the_probe = outbox::Column::ServerId
        .in_subquery(probe_due)
        .and(Expr::col((outbox::Entity, outbox::Column::Id)).ne(oldest));
    outbox::Column::ServerId
        .not_in_subquery(blocked)
        .and(not_the_probe.not())
}

/// The smallest id of the outer outbox row's mailbox among its mails in `status` (due by
/// `due`, when given), as a scalar subquery.
fn oldest_of_mailbox(status: &'static str, due: Option<DateTime<Utc>>) -> SimpleExpr {
    let o = Alias::new("o");
    let mut q = Query::select();
    q.expr(Func::min(Expr::col((o.clone(), outbox::Column::Id))))
        .from_as(outbox::Entity, o.clone())
        .and_where(
            Expr::col((o.clone(), outbox::Column::ServerId))
                .equals((outbox::Entity, outbox::Column::ServerId)),
        )
        // Written into the SQL, as the partial indexes name it ([`outbox::status_is`]).
        .and_where(Expr::cust(format!("\"o\".\"status\" = '{status}'")));
    if let Some(due) = due {
        q.and_where(Expr::col((o, outbox::Column::NextAttemptAt)).lte(due));
    }
    SimpleExpr::SubQuery(None, Box::new(q.into()))
}

pub(crate) async fn ensure_row(ctx: &ModuleContext, server_id: i32) -> Result<(), sea_orm::DbErr> {
    mailbox_health::Entity::insert(mailbox_health::ActiveModel {
        server_id: Set(server_id),
        state: Set("ready".into()),
        reason: Set(None),
        detail: Set(None),
        rule: Set(None),
        since: Set(None),
        until: Set(None),
        notified_at: Set(None),
        updated_at: Set(ctx.clock().now()),
    })
    .on_conflict(
        OnConflict::column(mailbox_health::Column::ServerId)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(ctx.db())
    .await?;
    Ok(())
}

/// Throttles a mailbox until `until` (a held mailbox stays held).
pub async fn throttle(
    ctx: &ModuleContext,
    shared: &Shared,
    server_id: i32,
    until: DateTime<Utc>,
    why: &str,
) -> Result<(), sea_orm::DbErr> {
    ensure_row(ctx, server_id).await?;
    let now = ctx.clock().now();
    mailbox_health::Entity::update_many()
        .col_expr(mailbox_health::Column::State, Expr::value("throttled"))
        .col_expr(mailbox_health::Column::Reason, Expr::value("throttled"))
        .col_expr(mailbox_health::Column::Detail, Expr::value(why.to_string()))
        .col_expr(mailbox_health::Column::Since, Expr::value(now))
        .col_expr(mailbox_health::Column::Until, Expr::value(until))
        .col_expr(mailbox_health::Column::UpdatedAt, Expr::value(now))
        .filter(mailbox_health::Column::ServerId.eq(server_id))
        .filter(mailbox_health::Column::State.ne("held"))
        .exec(ctx.db())
        .await?;
    shared.forget_health(server_id);
    due_at(ctx, server_id, until).await
}

/// Makes a blocked mailbox's queued mails due when the block lapses, so that the sweep pushes
/// them then (their earlier jobs were skipped while it held).
async fn due_at(
    ctx: &ModuleContext,
    server_id: i32,
    until: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    outbox::Entity::update_many()
        .col_expr(outbox::Column::NextAttemptAt, Expr::value(until))
        .filter(outbox::Column::ServerId.eq(server_id))
        .filter(outbox::status_is("queued"))
        .filter(outbox::Column::NextAttemptAt.lt(until))
        .exec(ctx.db())
        .await?;
    Ok(())
}

/// How many mailboxes are ready, throttled, held and not connected. A mailbox that signs in
/// as a user (`auth` other than `app_only`) and has no token yet is `not_connected`, not
/// `ready`: nothing it is given can go out until someone connects it.
pub async fn counts(
    ctx: &ModuleContext,
) -> Result<std::collections::BTreeMap<&'static str, i64>, sea_orm::DbErr> {
    let servers: Vec<(i32, String)> = mail_server::Entity::find()
        .select_only()
        .column(mail_server::Column::Id)
        .column(mail_server::Column::Auth)
        .into_tuple()
        .all(ctx.db())
        .await?;
    let connected: std::collections::HashSet<i32> = token::Entity::find()
        .select_only()
        .column(token::Column::ServerId)
        .into_tuple::<i32>()
        .all(ctx.db())
        .await?
        .into_iter()
        .collect();
    let healths = all(ctx).await?;
    let now = ctx.clock().now();
    let mut counts: std::collections::BTreeMap<&'static str, i64> = [
        ("ready", 0),
        ("throttled", 0),
        ("held", 0),
        ("not_connected", 0),
    ]
    .into();
    for (id, auth) in servers {
        let state = match Health::of(healths.get(&id), now) {
            Health::Ready if auth != "app_only" && !connected.contains(&id) => "not_connected",
            health => health.state(),
        };
        *counts.entry(state).or_default() += 1;
    }
    Ok(counts)
}

/// Forgets a deleted mailbox's health (its mails then fail as "server deleted").
pub async fn forget(ctx: &ModuleContext, server_id: i32) -> Result<(), sea_orm::DbErr> {
    mailbox_health::Entity::delete_by_id(server_id)
        .exec(ctx.db())
        .await?;
    Ok(())
}

/// How many mails wait on each mailbox (queued or being sent).
pub async fn waiting_counts(ctx: &ModuleContext) -> Result<HashMap<i32, i64>, sea_orm::DbErr> {
    let rows: Vec<(i32, i64)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::ServerId)
        .column_as(outbox::Column::Id.count(), "n")
        .filter(outbox::unsent())
        .group_by(outbox::Column::ServerId)
        .into_tuple()
        .all(ctx.db())
        .await?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::sea_query::{PostgresQueryBuilder, SqliteQueryBuilder};

    #[test]
    fn only_an_smtp_server_out_of_reach_may_be_the_owners_settings() {
        let held = |reason, rule: &str| Health::Held {
            reason,
            detail: String::new(),
            rule: rule.into(),
            since: Utc::now(),
            until: None,
            told: true,
        };
        assert!(held(HoldReason::Unreachable, "unreachable").smtp_out_of_reach());
        // A hold stored before its rule was: taken as the SMTP server's.
        assert!(held(HoldReason::Unreachable, "").smtp_out_of_reach());
        for rule in ["graph-unreachable", "token-endpoint-unavailable"] {
            assert!(
                !held(HoldReason::Unreachable, rule).smtp_out_of_reach(),
                "{rule}"
            );
        }
        assert!(!held(HoldReason::ServerRefused, "connection-refused").smtp_out_of_reach());
        assert!(!Health::Ready.smtp_out_of_reach());
    }

    #[test]
    fn claimable_binds_its_values_on_both_databases() {
        let query = Query::select()
            .column(outbox::Column::Id)
            .from(outbox::Entity)
            .and_where(claimable(Utc::now()))
            .to_owned();
        let (postgres, values) = query.build(PostgresQueryBuilder);
        assert!(!postgres.contains('?'), "{postgres}");
        assert!(postgres.contains("$5"), "{postgres}");
        assert_eq!(values.0.len(), 5, "{postgres}");
        let (sqlite, _) = query.build(SqliteQueryBuilder);
        assert!(!sqlite.contains('$'), "{sqlite}");
    }
}

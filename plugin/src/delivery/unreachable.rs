//! A mailbox that cannot reach Microsoft (its mail server, Microsoft Graph or the token
//! endpoint away): the pace of its probes, and how such a hold stands beside a hold for
//! another cause. Beginning the hold and telling people is [`crate::delivery::hold`].

use chrono::{DateTime, Duration, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter};

use crate::delivery::classify::{
    HoldReason, UNREACHABLE_PROBE_MAX, UNREACHABLE_TELL_AFTER, Verdict,
};
use crate::entities::mailbox_health;
use crate::runtime::Shared;

/// How an unreachable mailbox's hold goes on.
pub(crate) enum Paced {
    /// Held for a cause of its own, which this probe did not reach: that hold stays.
    Kept(Held),
    /// The unreachable hold's next probe (`until`), and the first probe of a new one
    /// (`first`: the least wait, should the hold have ended since it was read).
    Until {
        until: DateTime<Utc>,
        first: DateTime<Utc>,
    },
}

/// Paces the probes of an unreachable mailbox (`row`: its health as read before): the retry
/// base at first, then as long as it has lasted, at most [`UNREACHABLE_PROBE_MAX`]; never
/// before the verdict's own time (a `Retry-After`), the end of a throttle that was running or
/// a later probe time another process set; and, until its people are told, not after
/// [`UNREACHABLE_TELL_AFTER`] has passed (that probe tells them). A mailbox held for another
/// cause (SMTP AUTH disabled, a quota...) whose probe could not reach Microsoft keeps that
/// hold, its words and its incident (nobody is told again): only its next probe may move
/// later, by that cause's own interval, at most [`UNREACHABLE_PROBE_MAX`].
pub(crate) async fn pace_unreachable(
    ctx: &ModuleContext,
    shared: &Shared,
    server_id: i32,
    row: Option<&mailbox_health::Model>,
    verdict: &Verdict,
) -> Result<Paced, sea_orm::DbErr> {
    let now = ctx.clock().now();
    let base = Duration::seconds(Ord::max(shared.options.retry_base_secs, 1));
    let later = |t: Option<DateTime<Utc>>| t.filter(|t| *t > now);
    let mut first = now + Ord::max(base, verdict.hold_for.unwrap_or_default());
    // A throttle that was running keeps its time (Microsoft asked for it).
    if let Some(t) = later(row.filter(|h| h.state == "throttled").and_then(|h| h.until)) {
        first = Ord::max(first, t);
    }
    let held = row.filter(|h| h.state == "held");
    let reason = held
        .and_then(|h| h.reason.as_deref())
        .and_then(HoldReason::parse);
    match (held, reason) {
        (Some(h), Some(other)) if other != HoldReason::Unreachable => {
            let Some(every) = other.probe_after() else {
                return Ok(Paced::Kept(Held {
                    began: false,
                    until: h.until,
                }));
            };
            let until = Ord::max(
                later(h.until).unwrap_or(now),
                now + Ord::min(every, UNREACHABLE_PROBE_MAX),
            );
            // Only ever later: a quota's day or another process's time stays.
            mailbox_health::Entity::update_many()
                .col_expr(mailbox_health::Column::Until, Expr::value(until))
                .col_expr(mailbox_health::Column::UpdatedAt, Expr::value(now))
                .filter(mailbox_health::Column::ServerId.eq(server_id))
                .filter(mailbox_health::Column::State.eq("held"))
                .filter(mailbox_health::Column::Reason.eq(other.as_str()))
                .filter(
                    Condition::any()
                        .add(mailbox_health::Column::Until.is_null())
                        .add(mailbox_health::Column::Until.lt(until)),
                )
                .exec(ctx.db())
                .await?;
            shared.forget_health(server_id);
            Ok(Paced::Kept(Held {
                began: false,
                until: Some(until),
            }))
        }
        (Some(h), Some(_)) => {
            let since = h.since.unwrap_or(h.updated_at);
            let lasted = (now - since).clamp(base, Ord::max(base, UNREACHABLE_PROBE_MAX));
            let mut until = Ord::max(first, now + lasted);
            if let Some(t) = later(h.until) {
                until = Ord::max(until, t);
            }
            let tell_at = since + UNREACHABLE_TELL_AFTER;
            if h.notified_at.is_none() && tell_at > now {
                until = Ord::min(until, Ord::max(first, tell_at));
            }
            Ok(Paced::Until { until, first })
        }
        _ => Ok(Paced::Until {
            until: first,
            first,
        }),
    }
}

/// What [`crate::delivery::hold::hold`] did.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Whether this call began the incident.
    pub began: bool,
    /// When the mailbox is tried again by itself (`None`: only its fix ends the hold).
    pub until: Option<DateTime<Utc>>,
}

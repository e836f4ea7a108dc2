//! What a mail waiting on its mailbox says to each reader: why it waits, when it goes, and
//! who has been told or must act, in words for that reader (an operator, the owner of a
//! personal mailbox, another author). The state itself is [`crate::delivery::health`].

use crm_sdk::ModuleContext;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use std::collections::HashMap;

use crate::delivery::classify::HoldReason;
use crate::delivery::health::{Health, all};
use crate::entities::mail_server;

/// For each held or throttled mailbox, what its waiting mails say to the user `viewer` (an id,
/// not an operator): why they wait, and who has been told, in words for the reader (the owner
/// of a personal mailbox reads "you"; nobody is asked to do another's job).
pub async fn waiting_words_for(ctx: &ModuleContext, viewer: Option<i64>) -> HashMap<i32, String> {
    waiting_words_of(ctx, Reader::User(viewer)).await
}

/// [`waiting_words_for`] as `viewer` reads them: an operator is told what is theirs to do
/// (not that the operators have been told).
pub async fn waiting_words_as(
    ctx: &ModuleContext,
    viewer: &crm_sdk::CurrentUser,
) -> HashMap<i32, String> {
    let reader = if viewer.is_admin {
        Reader::Operator(viewer.id)
    } else {
        Reader::User(Some(viewer.id))
    };
    waiting_words_of(ctx, reader).await
}

/// Who reads a waiting mail's words.
#[derive(Clone, Copy)]
enum Reader {
    /// An operator (by id: they may own a personal mailbox too).
    Operator(i64),
    /// A user (by id; `None`: nobody in particular).
    User(Option<i64>),
}

async fn waiting_words_of(ctx: &ModuleContext, reader: Reader) -> HashMap<i32, String> {
    let now = ctx.clock().now();
    let rows = all(ctx).await.unwrap_or_default();
    let owners: HashMap<i32, Option<i64>> = mail_server::Entity::find()
        .select_only()
        .column(mail_server::Column::Id)
        .column(mail_server::Column::OwnerUserId)
        .filter(mail_server::Column::Id.is_in(rows.keys().copied()))
        .into_tuple()
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    rows.iter()
        .filter_map(|(id, row)| {
            let owner = owners.get(id).copied().flatten();
            let health = Health::of(Some(row), now);
            let words = match (reader, &health) {
                // It may pass by itself: theirs to look at only if it lasts.
                (
                    Reader::Operator(_),
                    Health::Held {
                        reason: HoldReason::Unreachable,
                        until,
                        ..
                    },
                ) => format!(
                    "Waiting: the CRM cannot reach Microsoft's servers for this mailbox; it tries again by itself{}. If it lasts, see its page for what to check. Nothing is lost.",
                    until
                        .map(|u| format!(" at {}", u.format("%H:%M:%S UTC")))
                        .unwrap_or_default()
                ),
                // A shared mailbox, or what only operators can fix: theirs to do (not a quota,
                // whose window passes by itself: its words below).
                (Reader::Operator(_), Health::Held { reason, .. })
                    if *reason != HoldReason::QuotaExceeded
                        && (owner.is_none() || reason.needs_operator_for(owner.is_some())) =>
                {
                    let then = if reason.release_can_help() {
                        "; then Release held mail"
                    } else {
                        ""
                    };
                    format!(
                        "Waiting: the mailbox is held because {} — yours to fix, as its page says{then}. Nothing is lost.",
                        reason.in_words()
                    )
                }
                (Reader::Operator(me), _) => words_of(&health, owner, Some(me))?,
                (Reader::User(viewer), _) => words_of(&health, owner, viewer)?,
            };
            Some((*id, words))
        })
        .collect()
}

/// What a mail waiting on a mailbox in `health` says to `viewer`; `owner`: the mailbox's
/// owner when it is personal.
pub(crate) fn words_of(health: &Health, owner: Option<i64>, viewer: Option<i64>) -> Option<String> {
    let words = match health {
        Health::Ready => return None,
        Health::Throttled { until } => format!(
            "Waiting: Microsoft 365 asked to slow down; it goes out after {}.",
            until.format("%H:%M:%S UTC")
        ),
        // It may pass by itself; the people who can fix it are told only if it lasts.
        Health::Held {
            reason: HoldReason::Unreachable,
            until,
            told,
            ..
        } => {
            let at = until
                .map(|u| format!(" at {}", u.format("%H:%M:%S UTC")))
                .unwrap_or_default();
            let who = match (told, owner) {
                (false, _) => "the CRM's operators are told if it lasts",
                (true, Some(o)) if Some(o) == viewer && health.smtp_out_of_reach() => {
                    "if your mailbox's server settings on My mailbox are right, the CRM's operators have been told"
                }
                (true, _) => "the CRM's operators have been told",
            };
            format!(
                "Waiting: the CRM cannot reach Microsoft's servers at the moment; it tries again by itself{at}, and {who}. Nothing is needed from you; nothing is lost."
            )
        }
        Health::Held { reason, .. } if reason.needs_operator_for(owner.is_some()) => format!(
            "Waiting: the mailbox is held because {} — the CRM's operators have been told and will fix it; nothing is needed from you. Nothing is lost; it goes out once they fix it.",
            reason.in_words()
        ),
        Health::Held {
            reason: HoldReason::QuotaExceeded,
            until,
            ..
        } => format!(
            "Waiting: Exchange's daily sending limit for this mailbox was reached; it goes out by itself{}. Nothing is lost.",
            until
                .map(|u| format!(" after {}", u.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default()
        ),
        Health::Held { reason, .. } => {
            let what = match reason {
                HoldReason::MailboxFull => "the mailbox is full",
                HoldReason::GrantDead => "the mailbox must be connected again",
                _ => "the mailbox's server settings must be corrected",
            };
            let who = match owner {
                None => "the CRM's operators have been told".to_string(),
                Some(o) if Some(o) == viewer => {
                    let what = match reason {
                        HoldReason::MailboxFull => "your mailbox is full: make room in it",
                        HoldReason::GrantDead => {
                            "your mailbox must be connected again: click Connect on My mailbox"
                        }
                        _ => {
                            "your mailbox's server settings must be corrected on My mailbox (see what happened there)"
                        }
                    };
                    return Some(format!(
                        "Waiting: {what}; only you can do this. Nothing is lost; it goes out after that."
                    ));
                }
                Some(_) => "only its owner can fix this, and has been told".to_string(),
            };
            format!("Waiting: {what} — {who}. Nothing is lost.")
        }
    };
    Some(words)
}

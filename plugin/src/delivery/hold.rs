//! Holding a mailbox and telling people: the hold begun once per incident, the notices to the
//! people who can fix it (operators, a personal mailbox's owner) and to the authors whose mail
//! waits, and the words a waiting mail says to each reader. The health state itself, and the
//! end of a hold, are [`crate::delivery::health`].

use crm_sdk::{Audience, ModuleContext, Notification};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};
use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use crate::delivery::classify::{
    HoldReason, UNREACHABLE_PROBE_MAX, UNREACHABLE_TELL_AFTER, Verdict,
};
use crate::delivery::health::{
    Health, all, ensure_row, module_wide, notification_key, settings_key, unreachable_key,
};
use crate::entities::{mail_server, mailbox_health, outbox};
use crate::runtime::Shared;

/// Holds `server`'s mailbox for `reason`, with the verdict's words. The people who can fix it
/// are told once per incident (a hold for the same reason while held is the same incident: its
/// words and probe time are renewed, `since` stays). An unreachable mailbox
/// ([`HoldReason::Unreachable`]) is told of only once it has lasted
/// [`UNREACHABLE_TELL_AFTER`] (a short outage passes unnoticed but for the waiting mail's
/// words), its probes are paced, and it does not replace a hold for another cause
/// ([`pace_unreachable`]).
pub async fn hold(
    ctx: &ModuleContext,
    shared: &Shared,
    server: &mail_server::Model,
    reason: HoldReason,
    verdict: &Verdict,
) -> Result<Held, sea_orm::DbErr> {
    ensure_row(ctx, server.id).await?;
    let now = ctx.clock().now();
    let before = crate::entities::by_key::<mailbox_health::Entity, _>(ctx.db(), server.id).await?;
    let (until, first) = match reason {
        HoldReason::Unreachable => {
            match pace_unreachable(ctx, shared, server.id, before.as_ref(), verdict).await? {
                Paced::Kept(held) => return Ok(held),
                Paced::Until { until, first } => (Some(until), Some(first)),
            }
        }
        _ => (verdict.hold_for.map(|d| now + d), None),
    };
    let detail = verdict.words();
    let update = |until: Option<DateTime<Utc>>| {
        mailbox_health::Entity::update_many()
            .col_expr(mailbox_health::Column::State, Expr::value("held"))
            .col_expr(mailbox_health::Column::Detail, Expr::value(detail.clone()))
            .col_expr(mailbox_health::Column::Until, Expr::value(until))
            .col_expr(mailbox_health::Column::UpdatedAt, Expr::value(now))
            .filter(mailbox_health::Column::ServerId.eq(server.id))
    };
    // Told at once, or (unreachable) not yet: `notified_at` stays empty until it is.
    let told_now = reason != HoldReason::Unreachable;
    // Only the writer that turns the state into this hold begins the incident (a new one
    // starts its probes afresh). Not reaching Microsoft never replaces a hold for another
    // cause, even one set by another process since it was read.
    let replaces = if reason == HoldReason::Unreachable {
        Condition::any()
            .add(mailbox_health::Column::State.ne("held"))
            .add(mailbox_health::Column::Reason.is_null())
    } else {
        Condition::any()
            .add(mailbox_health::Column::State.ne("held"))
            .add(mailbox_health::Column::Reason.is_null())
            .add(mailbox_health::Column::Reason.ne(reason.as_str()))
    };
    let began = update(first.or(until))
        .col_expr(mailbox_health::Column::Reason, Expr::value(reason.as_str()))
        .col_expr(mailbox_health::Column::Since, Expr::value(now))
        .col_expr(
            mailbox_health::Column::NotifiedAt,
            Expr::value(told_now.then_some(now)),
        )
        .filter(replaces)
        .exec(ctx.db())
        .await?
        .rows_affected
        == 1;
    let until = if began { first.or(until) } else { until };
    let mut tell_now = began && told_now;
    if !began {
        update(until)
            .filter(mailbox_health::Column::State.eq("held"))
            .filter(mailbox_health::Column::Reason.eq(reason.as_str()))
            .exec(ctx.db())
            .await?;
        if !told_now {
            // The one writer that finds it untold and lasting long enough tells.
            tell_now = mailbox_health::Entity::update_many()
                .col_expr(mailbox_health::Column::NotifiedAt, Expr::value(now))
                .filter(mailbox_health::Column::ServerId.eq(server.id))
                .filter(mailbox_health::Column::State.eq("held"))
                .filter(mailbox_health::Column::Reason.eq(reason.as_str()))
                .filter(mailbox_health::Column::NotifiedAt.is_null())
                .filter(mailbox_health::Column::Since.lte(now - UNREACHABLE_TELL_AFTER))
                .exec(ctx.db())
                .await?
                .rows_affected
                == 1;
        }
    }
    shared.forget_health(server.id);
    if began {
        tracing::warn!(
            server_id = server.id,
            reason = reason.as_str(),
            "mailbox held"
        );
        // It was the last mailbox out of Microsoft's reach, held now for another cause: that
        // outage's notice is over.
        let was = before.filter(|b| b.state == "held").and_then(|b| b.reason);
        if was.as_deref() == Some(HoldReason::Unreachable.as_str()) {
            crate::delivery::release::end_incident_if_over(
                ctx,
                HoldReason::Unreachable,
                &unreachable_key(),
            )
            .await?;
        }
    }
    if tell_now {
        tell(ctx, server, reason, verdict).await;
    }
    Ok(Held { began, until })
}

/// How an unreachable mailbox's hold goes on.
enum Paced {
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
async fn pace_unreachable(
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

/// What [`hold`] did.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Whether this call began the incident.
    pub began: bool,
    /// When the mailbox is tried again by itself (`None`: only its fix ends the hold).
    pub until: Option<DateTime<Utc>>,
}

/// Who can end a hold: the people told to act, and the only ones a notice asks anything of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fixer {
    /// The owner of a personal mailbox (only they can sign in to it or clean it up).
    Owner(i64),
    /// The CRM's operators (a shared mailbox's owners; an administrator's fix on any mailbox).
    Operators,
    /// Nobody: it ends by itself (the sending quota's window).
    Nobody,
}

/// Who can end `server`'s hold for `reason`.
fn fixer(server: &mail_server::Model, reason: HoldReason) -> Fixer {
    match (reason, server.owner_user_id) {
        (HoldReason::QuotaExceeded, _) => Fixer::Nobody,
        (reason, Some(owner)) if reason.owner_fixes(true) => Fixer::Owner(owner),
        _ => Fixer::Operators,
    }
}

/// The page where operators act on a held mailbox: a shared server's page (Release held mail,
/// Connect), or, for a personal mailbox (not on their server list), the outbox filtered to it, where
/// Release held mail is.
pub fn operators_link(server: &mail_server::Model) -> String {
    if server.owner_user_id.is_some() {
        format!("/microsoft_outlook/outbox?server={}", server.id)
    } else {
        format!("/microsoft_outlook/servers/{}", server.id)
    }
}

/// The page of a personal mailbox as its owner reaches it.
pub const MY_MAILBOX: &str = "/microsoft_outlook/my-mailbox";

/// The operators' step in the CRM once the outside fix is done (the rule's words say what to
/// fix; where to resume depends on the mailbox).
fn operators_step(server: &mail_server::Model, reason: HoldReason) -> &'static str {
    match (fixer(server, reason), server.owner_user_id) {
        (Fixer::Operators, Some(_)) => {
            "It is a user's personal mailbox: once it is fixed, click Release held mail on the outbox filtered to this mailbox (Fix it opens it)."
        }
        (Fixer::Operators, None) if reason.needs_operator() => {
            "Once it is fixed, click Release held mail on the server's page (Fix it opens it): it ends the hold and sends the waiting mail."
        }
        _ => "",
    }
}

/// The notices of a hold: operators when theirs to fix (or the mailbox is shared), the owner
/// of a personal mailbox always (asked to act only when theirs to fix), the other authors
/// whose mail waits (never asked to act). Only a notice that asks its reader to act carries a
/// link (the host shows it as "Fix it").
fn hold_notices(
    server: &mail_server::Model,
    reason: HoldReason,
    v: &Verdict,
    waits: &str,
) -> Vec<Notification> {
    let key = Some(notification_key(server.id));
    let fixer = fixer(server, reason);
    let title = reason.title();
    let mut notices = Vec::new();
    if server.owner_user_id.is_none() || fixer == Fixer::Operators {
        let subject = match server.owner_user_id {
            None => format!(
                "Mail server \"{}\" ({}) is held: {title}",
                server.name, server.mailbox
            ),
            Some(_) => format!("Personal mailbox {} is held: {title}", server.mailbox),
        };
        let step = operators_step(server, reason);
        notices.push(Notification {
            audience: Audience::Operators,
            subject,
            body: join(&[&v.what, &v.fix, step, waits]),
            link: Some(operators_link(server)),
            key: key.clone(),
        });
    }
    if let Some(owner) = server.owner_user_id {
        let (body, link) = match fixer {
            Fixer::Owner(_) => (
                join(&[
                    &v.what,
                    &v.fix,
                    "Only you can do this, on your My mailbox page (the link).",
                    waits,
                ]),
                Some(MY_MAILBOX.to_string()),
            ),
            // The owner's own settings may be the cause (a wrong port or security).
            Fixer::Operators if reason == HoldReason::Unreachable => (
                join(&[
                    &v.what,
                    "If your mailbox's server settings on your My mailbox page (the link) are right, nothing is needed from you: the CRM's operators have been told and will look into it.",
                    waits,
                ]),
                Some(MY_MAILBOX.to_string()),
            ),
            Fixer::Operators => (
                join(&[
                    &v.what,
                    "The CRM's operators have been told and will fix it; nothing is needed from you.",
                    waits,
                ]),
                None,
            ),
            Fixer::Nobody => (
                join(&[
                    &v.what,
                    "Nothing is needed from you: sending resumes by itself.",
                    waits,
                ]),
                None,
            ),
        };
        notices.push(Notification {
            audience: Audience::User(owner),
            subject: format!("Your mailbox {} is held: {title}", server.mailbox),
            body,
            link,
            key,
        });
    }
    notices
}

/// Words joined by a space, the empty ones left out.
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The authors whose mail waits on `server` are told too, once, that nothing is needed from
/// them (the owner of a personal mailbox is told by [`hold_notices`]). Nothing is asked of
/// them, so their notice has no link.
async fn author_notices(
    ctx: &ModuleContext,
    server: &mail_server::Model,
    reason: HoldReason,
    v: &Verdict,
    waits: &str,
) -> Vec<Notification> {
    let authors: Vec<i64> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::AuthorUserId)
        .distinct()
        .filter(outbox::Column::ServerId.eq(server.id))
        .filter(outbox::unsent())
        .into_tuple()
        .all(ctx.db())
        .await
        .unwrap_or_default();
    let nothing_needed = if reason == HoldReason::QuotaExceeded {
        "Nothing is needed from you: sending resumes by itself."
    } else if reason == HoldReason::Unreachable {
        "The CRM's operators have been told; nothing is needed from you: it goes out once Microsoft answers."
    } else {
        "The CRM's operators have been told and will fix it; nothing is needed from you."
    };
    let key = if module_wide(reason) {
        settings_key(reason)
    } else {
        notification_key(server.id)
    };
    authors
        .into_iter()
        // A personal mailbox's owner is told by [`hold_notices`], but of a settings incident.
        .filter(|a| module_wide(reason) || Some(*a) != server.owner_user_id)
        .map(|author| Notification {
            audience: Audience::User(author),
            subject: format!("Your mail waits: {} is held", server.mailbox),
            body: format!(
                "It is held because {}. {nothing_needed} {waits} In detail: {}",
                reason.in_words(),
                v.what_in_brief()
            ),
            link: None,
            key: Some(key.clone()),
        })
        .collect()
}

/// After the mails `cancelled` were cancelled: an author with no mail left waiting on a held
/// mailbox is no longer concerned by its hold, so their "Your mail waits" notice is resolved
/// (for them only; a personal mailbox's owner keeps theirs: they still have to fix it).
pub async fn authors_cancelled(
    ctx: &ModuleContext,
    cancelled: &[outbox::Model],
) -> Result<(), sea_orm::DbErr> {
    let mut authors: HashMap<i64, Vec<i32>> = HashMap::new();
    for mail in cancelled {
        let servers = authors.entry(mail.author_user_id).or_default();
        if !servers.contains(&mail.server_id) {
            servers.push(mail.server_id);
        }
    }
    if authors.is_empty() {
        return Ok(());
    }
    let health = all(ctx).await?;
    let now = ctx.clock().now();
    let reason_of = |server: i32| Health::of(health.get(&server), now).reason();
    let owners: HashMap<i32, Option<i64>> = mail_server::Entity::find()
        .select_only()
        .column(mail_server::Column::Id)
        .column(mail_server::Column::OwnerUserId)
        .filter(mail_server::Column::Id.is_in(authors.values().flatten().copied()))
        .into_tuple()
        .all(ctx.db())
        .await?
        .into_iter()
        .collect();
    for (author, servers) in authors {
        let still_waiting: Vec<i32> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::ServerId)
            .distinct()
            .filter(outbox::Column::AuthorUserId.eq(author))
            .filter(outbox::unsent())
            .into_tuple()
            .all(ctx.db())
            .await?;
        let mut keys = Vec::new();
        for server in servers {
            let Some(reason) = reason_of(server) else {
                continue;
            };
            if module_wide(reason) {
                if !still_waiting.iter().any(|s| reason_of(*s) == Some(reason)) {
                    keys.push(settings_key(reason));
                }
            } else if !still_waiting.contains(&server)
                && owners.get(&server).copied().flatten() != Some(author)
            {
                keys.push(notification_key(server));
            }
        }
        for key in keys {
            if let Err(e) = ctx.notifier().resolve_for(&key, author).await {
                tracing::warn!(error = %e, "resolving an author's hold notice failed");
            }
        }
    }
    Ok(())
}

/// Tells the people who can fix a hold, once.
async fn tell(ctx: &ModuleContext, server: &mail_server::Model, reason: HoldReason, v: &Verdict) {
    let waits = if module_wide(reason) {
        "Mail from the affected mailboxes waits (no attempt is spent, nothing is lost) and goes out in queue order once this is fixed."
    } else {
        "Mail from this mailbox waits (no attempt is spent, nothing is lost) and goes out in queue order once this is fixed."
    };
    let mut notices = Vec::new();
    if module_wide(reason) {
        let first = crate::alerts::remember_once(ctx, &settings_key(reason), &v.what)
            .await
            .unwrap_or(false);
        if first {
            notices.push(Notification {
                audience: Audience::Operators,
                subject: format!("Microsoft Outlook: {}", reason.title().to_lowercase()),
                body: format!("{} {} {waits}", v.what, v.fix),
                link: Some("/settings".into()),
                key: Some(settings_key(reason)),
            });
        }
    } else if reason == HoldReason::Unreachable {
        // One outage (the network, a proxy, Microsoft) reaches every mailbox: the operators
        // are told once, by the first mailbox it lasted for, until no mailbox waits on it.
        let key = unreachable_key();
        let first = crate::alerts::remember_once(ctx, &key, &v.what)
            .await
            .unwrap_or(false);
        if first {
            let mailbox = match server.owner_user_id {
                None => format!("Mail server \"{}\" ({})", server.name, server.mailbox),
                Some(_) => format!("The personal mailbox {}", server.mailbox),
            };
            notices.push(Notification {
                audience: Audience::Operators,
                subject: "Microsoft Outlook: Microsoft cannot be reached".into(),
                body: format!(
                    "{mailbox} has not reached Microsoft for 15 minutes. {} {} Other mailboxes that cannot reach it wait the same way; the server list shows each one's state, and this notice is resolved once none waits.",
                    v.what, v.fix
                ),
                link: Some("/microsoft_outlook/servers".into()),
                key: Some(key),
            });
        }
        // A personal mailbox's owner is told of theirs (their own settings may be the cause).
        notices.extend(
            hold_notices(server, reason, v, waits)
                .into_iter()
                .filter(|n| !matches!(n.audience, Audience::Operators)),
        );
    } else {
        notices.extend(hold_notices(server, reason, v, waits));
    }
    notices.extend(author_notices(ctx, server, reason, v, waits).await);
    for n in notices {
        if let Err(e) = ctx.notifier().notify(n).await {
            tracing::warn!(error = %e, "a hold notification was not recorded");
        }
    }
}

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
                // A shared mailbox, or what only operators can fix: theirs to do.
                (Reader::Operator(_), Health::Held { reason, .. })
                    if owner.is_none() || reason.needs_operator_for(owner.is_some()) =>
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
                (true, Some(o)) if Some(o) == viewer => {
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

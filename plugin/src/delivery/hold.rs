//! Holding a mailbox and telling people: the hold begun once per incident, the notices to the
//! people who can fix it (operators, a personal mailbox's owner) and to the authors whose mail
//! waits. The words a waiting mail says to each reader are [`crate::delivery::waiting`]; an
//! unreachable mailbox's pace, [`crate::delivery::unreachable`]; the health state itself,
//! [`crate::delivery::health`]; the end of a hold, [`crate::delivery::release`].

use crm_sdk::{Audience, ModuleContext, Notification};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};
use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::delivery::classify::{HoldReason, UNREACHABLE_TELL_AFTER, Verdict};
use crate::delivery::health::{
    Health, all, ensure_row, module_wide, notification_key, settings_key, unreachable_key,
};
pub use crate::delivery::unreachable::Held;
use crate::delivery::unreachable::Paced;
use crate::entities::{mail_server, mailbox_health, outbox};
use crate::runtime::Shared;

/// Holds `server`'s mailbox for `reason`, with the verdict's words. The people who can fix it
/// are told once per incident (a hold for the same reason while held is the same incident: its
/// words and probe time are renewed, `since` stays). An unreachable mailbox
/// ([`HoldReason::Unreachable`]) is told of only once it has lasted
/// [`UNREACHABLE_TELL_AFTER`] (a short outage passes unnoticed but for the waiting mail's
/// words), its probes are paced, and it does not replace a hold for another cause
/// ([`crate::delivery::unreachable::pace_unreachable`]).
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
            match crate::delivery::unreachable::pace_unreachable(
                ctx,
                shared,
                server.id,
                before.as_ref(),
                verdict,
            )
            .await?
            {
                Paced::Kept(held) => return Ok(held),
                Paced::Until { until, first } => (Some(until), Some(first)),
            }
        }
        _ => (verdict.hold_for.map(|d| now + d), None),
    };
    let update = |until| held_row(server.id, verdict, until, now);
    // Told at once, or (unreachable) not yet: `notified_at` stays empty until it is.
    let told_now = reason != HoldReason::Unreachable;
    // Only the writer that turns the state into this hold begins the incident (a new one
    // starts its probes afresh).
    let began = update(first.or(until))
        .col_expr(mailbox_health::Column::Reason, Expr::value(reason.as_str()))
        .col_expr(mailbox_health::Column::Since, Expr::value(now))
        .col_expr(
            mailbox_health::Column::NotifiedAt,
            Expr::value(told_now.then_some(now)),
        )
        .filter(replaceable_by(reason))
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
            tell_now = tells_as_it_lasted(ctx, server.id, reason, now).await?;
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
            crate::delivery::release::end_incident_if_over(ctx, HoldReason::Unreachable).await?;
        }
    }
    if tell_now {
        tell(ctx, server, reason, verdict).await;
    }
    Ok(Held { began, until })
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

/// The update that writes `verdict`'s hold of `server_id` (its words and rule, its next probe
/// `until`) at `now`; the caller adds what begins an incident and which rows it may change.
fn held_row(
    server_id: i32,
    verdict: &Verdict,
    until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> sea_orm::UpdateMany<mailbox_health::Entity> {
    mailbox_health::Entity::update_many()
        .col_expr(mailbox_health::Column::State, Expr::value("held"))
        .col_expr(mailbox_health::Column::Detail, Expr::value(verdict.words()))
        .col_expr(mailbox_health::Column::Rule, Expr::value(verdict.rule))
        .col_expr(mailbox_health::Column::Until, Expr::value(until))
        .col_expr(mailbox_health::Column::UpdatedAt, Expr::value(now))
        .filter(mailbox_health::Column::ServerId.eq(server_id))
}

/// The states a hold for `reason` begins a new incident over: any but a hold for the same
/// reason. Not reaching Microsoft never replaces a hold for another cause, even one set by
/// another process since it was read.
fn replaceable_by(reason: HoldReason) -> Condition {
    let other = Condition::any()
        .add(mailbox_health::Column::State.ne("held"))
        .add(mailbox_health::Column::Reason.is_null());
    if reason == HoldReason::Unreachable {
        other
    } else {
        other.add(mailbox_health::Column::Reason.ne(reason.as_str()))
    }
}

/// For a hold told only once it lasts (unreachable): whether this writer is the one that
/// tells, at `now` — the one that finds it untold and held for
/// [`UNREACHABLE_TELL_AFTER`] marks it told; every other finds it told.
async fn tells_as_it_lasted(
    ctx: &ModuleContext,
    server_id: i32,
    reason: HoldReason,
    now: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    Ok(mailbox_health::Entity::update_many()
        .col_expr(mailbox_health::Column::NotifiedAt, Expr::value(now))
        .filter(mailbox_health::Column::ServerId.eq(server_id))
        .filter(mailbox_health::Column::State.eq("held"))
        .filter(mailbox_health::Column::Reason.eq(reason.as_str()))
        .filter(mailbox_health::Column::NotifiedAt.is_null())
        .filter(mailbox_health::Column::Since.lte(now - UNREACHABLE_TELL_AFTER))
        .exec(ctx.db())
        .await?
        .rows_affected
        == 1)
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
            // The owner's own settings may be the cause (a wrong port or security) of an SMTP
            // server out of reach; not of Microsoft Graph or the token endpoint out of reach.
            Fixer::Operators if reason == HoldReason::Unreachable && v.rule == "unreachable" => (
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
    } else if reason == HoldReason::QuotaExceeded {
        // Nothing to fix: the window passes.
        "Mail from this mailbox waits (no attempt is spent, nothing is lost) and goes out by itself, in queue order, once the window has passed."
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

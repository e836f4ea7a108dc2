//! A mail's history (`microsoft_outlook_outbox_events`): each attempt that did not go out,
//! with the reply and what it meant (for a mailbox's problem, only the mail that met it), and
//! each retry, cancel or release by a person. The outbox row says how a mail stands now; its
//! history says how it got there, so that a retry or a new attempt does not hide why it failed
//! before.
//!
//! Sent mail adds no event (the row keeps when it was sent and the reply), so the drains' path
//! for sent mail stays one statement per group; an attempt that did not go out is written in
//! the same transaction as its outcome ([`crate::outbox::record`]).

use chrono::{DateTime, Utc};
use crm_sdk::CurrentUser;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use serde::Serialize;

use crate::entities::{outbox, outbox_event};

/// An attempt that did not go out; the mail is tried again later.
pub const DEFERRED: &str = "deferred";
/// An attempt that did not go out; the mail is not tried again by itself.
pub const FAILED: &str = "failed";
/// An attempt stopped by its mailbox's problem (a hold or the server asking to slow down):
/// no attempt spent; the mail waits for the mailbox.
pub const WAITED: &str = "waited";
/// A person queued a failed mail again (a new round of attempts).
pub const RETRIED: &str = "retried";
/// A person made a queued mail due now.
pub const DUE_NOW: &str = "due_now";
/// An operator released its mailbox's hold (Release held mail).
pub const RELEASED: &str = "released";
/// Its mailbox's hold ended by a fix (a new connection, a passed test, saved settings, a
/// token or a mail that came through): `detail` says which.
pub const HOLD_ENDED: &str = "hold_ended";
/// A person cancelled the mail.
pub const CANCELLED: &str = "cancelled";

/// Stops by its mailbox's problem ([`WAITED`]) a mail keeps at most, the newest: a mailbox
/// held for days meets its probe mail every 15 minutes or hour, and each would add one.
pub const WAITED_KEPT: u64 = 20;

/// Events a mail's page shows at most (the newest; a page says how many older ones it leaves
/// out).
pub const SHOWN: u64 = 200;

/// Writes the events of the attempts of `rows` (outbox rows as an outcome of one shape just
/// wrote them, in the same transaction: `kind` is [`DEFERRED`], [`FAILED`] or [`WAITED`]) at
/// `now`: the attempt's number is the row's count of attempts as the claim made it (the
/// outcome gives a waiting mail's attempt back); `reply` and `words` are the server's reply
/// and what it meant.
pub async fn attempts<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    kind: &'static str,
    rows: &[outbox::Model],
    (reply, words): (Option<&str>, Option<&str>),
) -> Result<(), sea_orm::DbErr> {
    for chunk in rows.chunks(500) {
        let events = chunk.iter().map(|row| outbox_event::ActiveModel {
            outbox_id: Set(row.id),
            at: Set(now),
            kind: Set(kind.to_string()),
            attempt: Set((kind != WAITED).then_some(row.attempts)),
            reply: Set(reply.map(str::to_string)),
            detail: Set(words.map(str::to_string)),
            user_id: Set(None),
            ..Default::default()
        });
        outbox_event::Entity::insert_many(events)
            .exec_without_returning(db)
            .await?;
    }
    if kind == WAITED {
        for row in rows {
            keep_newest_waits(db, row.id).await?;
        }
    }
    Ok(())
}

/// Deletes the stops of mail `id` by its mailbox's problem but the newest [`WAITED_KEPT`].
async fn keep_newest_waits<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), sea_orm::DbErr> {
    let oldest_kept: Option<i64> = outbox_event::Entity::find()
        .select_only()
        .column(outbox_event::Column::Id)
        .filter(outbox_event::Column::OutboxId.eq(id))
        .filter(outbox_event::Column::Kind.eq(WAITED))
        .order_by_desc(outbox_event::Column::Id)
        .offset(WAITED_KEPT - 1)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    if let Some(oldest_kept) = oldest_kept {
        outbox_event::Entity::delete_many()
            .filter(outbox_event::Column::OutboxId.eq(id))
            .filter(outbox_event::Column::Kind.eq(WAITED))
            .filter(outbox_event::Column::Id.lt(oldest_kept))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Writes that `by` took `kind` ([`RETRIED`], [`DUE_NOW`] or [`CANCELLED`]) on
/// each of `ids` at `now`.
pub async fn actions<C: ConnectionTrait>(
    db: &C,
    ids: &[i64],
    kind: &'static str,
    by: &CurrentUser,
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    of_each(db, ids, (kind, &by.name, Some(by.id)), now).await
}

/// Writes one event of `kind` for each of `ids` at `now`, with `detail` (who, or what
/// happened) and the person's `user_id`, 500 rows a statement.
async fn of_each<C: ConnectionTrait>(
    db: &C,
    ids: &[i64],
    (kind, detail, user_id): (&str, &str, Option<i64>),
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    for chunk in ids.chunks(500) {
        let rows = chunk.iter().map(|id| outbox_event::ActiveModel {
            outbox_id: Set(*id),
            at: Set(now),
            kind: Set(kind.to_string()),
            attempt: Set(None),
            reply: Set(None),
            detail: Set(Some(detail.to_string())),
            user_id: Set(user_id),
            ..Default::default()
        });
        outbox_event::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// What ended the hold a mail waited for, as its history says.
#[derive(Debug, Clone, Copy)]
pub enum Ended<'a> {
    /// Release held mail, by this operator.
    ReleasedBy(&'a CurrentUser),
    /// This person connected the mailbox (again).
    ConnectedBy(&'a CurrentUser),
    /// This person tested the mailbox's connection, and it passed.
    TestedBy(&'a CurrentUser),
    /// This operator changed how the mailbox sends (SMTP or Microsoft Graph).
    TransportChangedBy(&'a CurrentUser),
    /// The module's settings were saved.
    SettingsSaved,
    /// A token was obtained again for the mailbox.
    TokenObtained,
    /// A mail went out through the mailbox again, of a batch (these claimed mails) claimed at
    /// the given time; when that was during the hold the batch was its probe, and its mails
    /// that went out get words of their own ([`probe_went_out`]).
    MailWentOut(&'a [i64], DateTime<Utc>),
    /// The mailbox's server was deleted: its mails fail in words of their own, no event.
    ServerDeleted,
}

impl Ended<'_> {
    /// The event's kind, words and person, or `None` when the end is no event.
    fn event(&self) -> Option<(&'static str, String, Option<i64>)> {
        Some(match self {
            Ended::ReleasedBy(by) => (RELEASED, by.name.clone(), Some(by.id)),
            Ended::ConnectedBy(by) => (
                HOLD_ENDED,
                format!("{} connected the mailbox again", by.name),
                Some(by.id),
            ),
            Ended::TestedBy(by) => (
                HOLD_ENDED,
                format!("a test of the connection by {} passed", by.name),
                Some(by.id),
            ),
            Ended::TransportChangedBy(by) => (
                HOLD_ENDED,
                format!("{} changed how the mailbox sends", by.name),
                Some(by.id),
            ),
            Ended::SettingsSaved => (HOLD_ENDED, "the module's settings were saved".into(), None),
            Ended::TokenObtained => (
                HOLD_ENDED,
                "Microsoft gave the mailbox a token again".into(),
                None,
            ),
            Ended::MailWentOut(..) => (
                HOLD_ENDED,
                "a mail went out through the mailbox again".into(),
                None,
            ),
            Ended::ServerDeleted => return None,
        })
    }
}

/// Writes, for each of `ids` (the mails that waited for a hold that just ended), how the
/// hold ended (`ended`) at `now`.
pub async fn hold_ended<C: ConnectionTrait>(
    db: &C,
    ids: &[i64],
    ended: Ended<'_>,
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    let Some((kind, detail, user_id)) = ended.event() else {
        return Ok(());
    };
    of_each(db, ids, (kind, &detail, user_id), now).await
}

/// What ended the hold, in the history of the probe mail whose going out ended it.
const PROBE_WENT_OUT: &str =
    "this mail went out through the mailbox, which showed that it works again";

/// Of `batch` (the mails of the hold's probe: a batch claimed while the mailbox was held),
/// those that went out: each gets, at `now`, that its going out ended the hold (the mails that
/// wait get [`hold_ended`]'s line; one of the batch that did not go out is among those).
pub async fn probe_went_out<C: ConnectionTrait>(
    db: &C,
    batch: &[i64],
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    if batch.is_empty() {
        return Ok(());
    }
    let went: Vec<i64> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .filter(outbox::Column::Id.is_in(batch.iter().copied()))
        .filter(outbox::status_is("sent"))
        .into_tuple()
        .all(db)
        .await?;
    of_each(db, &went, (HOLD_ENDED, PROBE_WENT_OUT, None), now).await
}

/// One line of a mail's history as its viewer reads it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// When.
    pub at: DateTime<Utc>,
    /// `queued`, `deferred`, `failed`, `waited`, `retried`, `due_now`, `released`,
    /// `hold_ended`, `cancelled` or `sent`.
    pub kind: String,
    /// What happened, in words.
    pub what: String,
    /// The server's reply (classified to its codes for a viewer who is not an operator).
    pub reply: Option<String>,
    /// What the reply meant, in words (as the viewer may read them).
    pub words: Option<String>,
    /// Who took the action (retried, made due, released, cancelled).
    pub by: Option<String>,
}

/// The history of `mail` (already as `viewer` may see it) from its events: queued, each
/// event, and sent (from the row) when it was; the newest [`SHOWN`] events and how many older
/// ones were left out.
pub async fn of_mail<C: ConnectionTrait>(
    db: &C,
    mail: &outbox::Model,
    viewer: &CurrentUser,
) -> Result<(Vec<Entry>, u64), sea_orm::DbErr> {
    let mut events = outbox_event::Entity::find()
        .filter(outbox_event::Column::OutboxId.eq(mail.id))
        .order_by_desc(outbox_event::Column::Id)
        .limit(SHOWN)
        .all(db)
        .await?;
    let left_out = if events.len() as u64 == SHOWN {
        outbox_event::Entity::find()
            .filter(outbox_event::Column::OutboxId.eq(mail.id))
            .count(db)
            .await?
            .saturating_sub(SHOWN)
    } else {
        0
    };
    // In the order they happened: a drain's outcome may be written after a retry that came
    // later (the ids give the order of writing).
    events.sort_by_key(|e| (e.at, e.id));
    let mut entries = Vec::with_capacity(events.len() + 2);
    if left_out == 0 {
        entries.push(Entry {
            at: mail.created_at,
            kind: "queued".into(),
            what: "Queued".into(),
            reply: None,
            words: None,
            by: None,
        });
    }
    // A retry of a failed mail starts a new round: its attempts are counted from 1 again.
    let mut rounds = 1;
    for e in events {
        let round = rounds;
        if e.kind == RETRIED {
            rounds += 1;
        }
        entries.push(entry(e, viewer, round));
    }
    if mail.status == "sent"
        && let Some(at) = mail.sent_at
    {
        entries.push(Entry {
            at,
            kind: "sent".into(),
            what: format!(
                "{}: accepted by the server",
                attempt_words(mail.attempts, rounds)
            ),
            reply: mail.last_reply.clone(),
            words: None,
            by: None,
        });
    }
    // In the order things happened; the hold a probe's going out ended, after it went out
    // (also when both have the same time).
    entries.sort_by_key(|e| {
        (
            e.at,
            e.kind == HOLD_ENDED && e.what.ends_with(PROBE_WENT_OUT),
        )
    });
    Ok((entries, left_out))
}

/// "Attempt 2", or "Attempt 1 after a retry" in a later round.
fn attempt_words(attempt: i32, round: usize) -> String {
    if round > 1 {
        format!("Attempt {attempt} after a retry")
    } else {
        format!("Attempt {attempt}")
    }
}

/// An event of round `round` in words for `viewer`.
fn entry(e: outbox_event::Model, viewer: &CurrentUser, round: usize) -> Entry {
    let attempt = attempt_words(e.attempt.unwrap_or_default(), round);
    let person = matches!(e.kind.as_str(), RETRIED | DUE_NOW | RELEASED | CANCELLED);
    let who = e.detail.clone().unwrap_or_else(|| "someone".into());
    let what = match e.kind.as_str() {
        DEFERRED => format!("{attempt}: did not go out; tried again later"),
        FAILED => format!("{attempt}: did not go out; not tried again by itself"),
        WAITED => {
            "Stopped by its mailbox's problem: no attempt spent; it waits for the mailbox".into()
        }
        RETRIED => format!("Queued again by {who}, with a new round of attempts"),
        DUE_NOW => format!("Made due now by {who}"),
        RELEASED => format!("Its mailbox's hold was released by {who}"),
        HOLD_ENDED => format!("Its mailbox's hold ended: {who}"),
        CANCELLED => format!("Cancelled by {who}"),
        other => other.to_string(),
    };
    let (words, reply) = match e.kind.as_str() {
        _ if person || e.kind == HOLD_ENDED => (None, None),
        _ if viewer.is_admin => (e.detail, e.reply),
        FAILED => crate::outbox::user_words::for_user(e.detail, e.reply, "failed"),
        _ => crate::outbox::user_words::for_user(e.detail, e.reply, "queued"),
    };
    Entry {
        at: e.at,
        kind: e.kind,
        what,
        reply,
        words,
        by: person.then_some(who),
    }
}

//! Queued mails of concurrent requests are admitted and stored together (group commit): for
//! the mails that came while the previous group was being written, one record look-up and one
//! server query (`outbox::admit`), then one transaction with one `INSERT` of the outbox rows
//! and one of their bodies. A request is answered only once its group is committed, so a mail
//! the user was told is queued is stored; the writer, not the request, wakes the mailboxes of
//! a committed group, so a request that went away meanwhile still has its mail sent.
//!
//! Why: on SQLite every write takes the database's single write lock; a transaction per
//! request (`BEGIN`, two `INSERT`s, `COMMIT`, each a round trip to the driver's thread) made
//! the queue route answer about 900 requests/s under 16 concurrent requests (BENCHMARKS.md).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crm_sdk::ModuleContext;
use sea_orm::{EntityTrait, Set, TransactionTrait};
use tokio::sync::oneshot;

use actix_web::http::StatusCode;

use crate::entities::{mail_server, outbox, outbox_body};
use crate::outbox::admit::{Admitted, BUILD_APART_BYTES};
use crate::outbox::refusal::{Refusal, refuse};
use crate::runtime::{PendingInsert as Pending, PendingMail, Shared};

/// A request's answer: its stored row and the server it goes through, or why it was refused.
type Answer = Result<(outbox::Model, mail_server::Model), Refusal>;

/// Rows per `INSERT` (about 20 bound values each, far below SQLite's 32,766).
const ROWS_PER_INSERT: usize = 100;

/// Message bytes a group holds at most (a single larger mail goes alone): one `INSERT`'s
/// values stay far below PostgreSQL's 1 GB message limit, and the copies the driver makes of
/// them stay small.
const GROUP_BYTES: usize = 32 * 1024 * 1024;

/// Takes this mail's entry out of the waiting list when its request goes away before a
/// group took it (the client hung up): nothing of it is stored then.
struct Withdraw<'a> {
    shared: &'a Shared,
    message_id: &'a str,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.shared
            .inserts
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.message_id != self.message_id);
    }
}

/// Admits `mail` (unless built already) and stores it, with its message text, in one
/// transaction with the mails of concurrent requests, then wakes the mailbox's drain: the
/// stored row and its server, or why it was refused (503 when the database failed). Either the
/// whole group's admitted mails are stored or none of them.
pub(crate) async fn insert(ctx: &ModuleContext, shared: &Arc<Shared>, mail: PendingMail) -> Answer {
    let message_id = mail.message_id().to_string();
    let (done, mut stored) = oneshot::channel();
    let inserts = &shared.inserts;
    inserts
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Pending {
            message_id: message_id.clone(),
            mail,
            done,
        });
    let _withdraw = Withdraw {
        shared,
        message_id: &message_id,
    };
    loop {
        tokio::select! {
            biased;
            answer = &mut stored => {
                return answer.unwrap_or_else(|_| Err(unavailable("the write of this mail stopped without an answer".into())));
            }
            turn = inserts.turn.clone().lock_owned() => {
                // The turn: write what waits now (this mail, unless an earlier group took it).
                let group = take_group(shared);
                if group.is_empty() {
                    drop(turn);
                    continue;
                }
                let (ctx, shared) = (ctx.clone(), shared.clone());
                // A task of its own that keeps the turn until its group is written: a request
                // that goes away does not take the other requests' mails with it.
                tokio::spawn(async move {
                    write(&ctx, &shared, group).await;
                    drop(turn);
                });
            }
        }
    }
}

/// Mails a group holds at most: its record and server look-ups bind one value per record and
/// author, far below SQLite's 32,766.
const GROUP_MAILS: usize = 500;

/// The waiting mails in arrival order, at most [`GROUP_MAILS`] and [`GROUP_BYTES`] (at least
/// one); a mail of more than [`BUILD_APART_BYTES`] goes in a group of its own, so that the
/// small mails around it do not wait for its files to be encoded. The others wait for the next
/// turn.
fn take_group(shared: &Shared) -> Vec<Pending> {
    let mut pending = shared
        .inserts
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cut = group_end(pending.iter().map(|p| p.mail.bytes()));
    pending.drain(..cut).collect()
}

/// How many of the waiting mails, of these sizes in bytes, the next group takes (see
/// [`take_group`]).
fn group_end(sizes: impl Iterator<Item = usize>) -> usize {
    let mut bytes = 0;
    let mut taken = 0;
    for size in sizes {
        bytes += size;
        let large = size > BUILD_APART_BYTES;
        if taken > 0 && (large || bytes > GROUP_BYTES || taken == GROUP_MAILS) {
            break;
        }
        taken += 1;
        if large {
            break;
        }
    }
    taken
}

fn unavailable(why: String) -> Refusal {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "record",
        format!("the database did not answer; nothing was queued ({why})"),
    )
}

/// Admits a group's mails, stores those admitted, wakes their mailboxes and tells each request
/// its outcome.
async fn write(ctx: &ModuleContext, shared: &Arc<Shared>, group: Vec<Pending>) {
    let mut built = Vec::with_capacity(group.len());
    let mut to_admit = Vec::new();
    let mut waiting_admission = Vec::new();
    for p in group {
        match p.mail {
            PendingMail::Built(a) => built.push((*a, p.done)),
            PendingMail::Admit(r) => {
                to_admit.push(*r);
                waiting_admission.push(p.done);
            }
        }
    }
    if !to_admit.is_empty() {
        let answers = crate::outbox::admit::admit_all(ctx, to_admit).await;
        for (answer, done) in answers.into_iter().zip(waiting_admission) {
            match answer {
                Ok(a) => built.push((a, done)),
                Err(refusal) => {
                    let _ = done.send(Err(refusal));
                }
            }
        }
    }
    if built.is_empty() {
        return;
    }
    // A process that does not deliver pushes a drain job for these mails' mailboxes
    // (`wake_many` below) and marks the mailboxes woken in the group's transaction. One that
    // delivers drains them at once and pushes no job: should that drain die, the sweep wakes
    // the mailbox (its mail came due after its last wake).
    let pushed = (!shared.delivers_here() && shared.queue().is_some()).then(|| ctx.clock().now());
    let mut rows = Vec::with_capacity(built.len());
    let mut raws = Vec::with_capacity(built.len());
    let mut waiting = HashMap::with_capacity(built.len());
    let servers: BTreeSet<i32> = built.iter().map(|(a, _)| a.server.id).collect();
    for (
        Admitted {
            message_id,
            server,
            row,
            raw,
        },
        done,
    ) in built
    {
        rows.push(row);
        raws.push((message_id.clone(), raw));
        waiting.insert(message_id, (server, done));
    }
    let woken: Vec<i32> = if pushed.is_some() {
        servers.iter().copied().collect()
    } else {
        Vec::new()
    };
    match store(ctx, shared, rows, raws, (&woken, pushed)).await {
        Ok(stored) => {
            let servers: Vec<i32> = servers.into_iter().collect();
            shared.wake_many(&servers).await;
            for model in stored {
                if let Some((server, done)) = waiting.remove(&model.message_id) {
                    let _ = done.send(Ok((model, server)));
                }
            }
            for (_, (_, done)) in waiting {
                let _ = done.send(Err(unavailable(
                    "the database did not return the stored row".into(),
                )));
            }
        }
        Err(e) => {
            let words = e.to_string();
            for (_, (_, done)) in waiting {
                let _ = done.send(Err(unavailable(words.clone())));
            }
        }
    }
}

/// One transaction: the rows (`RETURNING` them), then their bodies keyed by the new ids, and
/// the mailboxes `woken` at `at` (a process that pushes their drain jobs).
async fn store(
    ctx: &ModuleContext,
    shared: &Shared,
    rows: Vec<outbox::ActiveModel>,
    raws: Vec<(String, String)>,
    (woken, at): (&[i32], Option<chrono::DateTime<chrono::Utc>>),
) -> Result<Vec<outbox::Model>, sea_orm::DbErr> {
    let turn = shared.write_gate(ctx).await;
    let txn = turn.db().begin().await?;
    let mut stored = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<outbox::ActiveModel> = rows.by_ref().take(ROWS_PER_INSERT).collect();
        stored.extend(
            outbox::Entity::insert_many(chunk)
                .exec_with_returning(&txn)
                .await?,
        );
    }
    let ids: HashMap<&str, i64> = stored
        .iter()
        .map(|m| (m.message_id.as_str(), m.id))
        .collect();
    let mut bodies = Vec::with_capacity(raws.len());
    for (message_id, raw) in raws {
        let Some(&id) = ids.get(message_id.as_str()) else {
            return Err(sea_orm::DbErr::RecordNotInserted);
        };
        bodies.push(outbox_body::ActiveModel {
            outbox_id: Set(id),
            raw: Set(raw),
        });
    }
    let mut bodies = bodies.into_iter().peekable();
    while bodies.peek().is_some() {
        let chunk: Vec<outbox_body::ActiveModel> = bodies.by_ref().take(ROWS_PER_INSERT).collect();
        outbox_body::Entity::insert_many(chunk)
            .exec_without_returning(&txn)
            .await?;
    }
    if let Some(at) = at {
        crate::outbox::sweep::mark_woken(&txn, woken, at).await?;
    }
    txn.commit().await?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KB: usize = 1024;

    #[test]
    fn a_group_takes_small_mails_up_to_its_count_and_bytes() {
        assert_eq!(group_end(std::iter::empty()), 0);
        assert_eq!(group_end([2 * KB; 10].into_iter()), 10);
        assert_eq!(group_end(std::iter::repeat_n(2 * KB, 800)), GROUP_MAILS);
        // 40 mails of 1 MB (at the limit, not over it) fill 32 MB after 32.
        assert_eq!(group_end(std::iter::repeat_n(BUILD_APART_BYTES, 40)), 32);
    }

    #[test]
    fn a_large_mail_goes_alone() {
        let large = BUILD_APART_BYTES + 1;
        // Small mails before it go without it; it goes alone; then the rest.
        assert_eq!(group_end([2 * KB, 2 * KB, large, 2 * KB].into_iter()), 2);
        assert_eq!(group_end([large, 2 * KB, 2 * KB].into_iter()), 1);
        assert_eq!(group_end([40 * 1024 * KB, 2 * KB].into_iter()), 1);
    }
}

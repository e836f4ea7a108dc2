//! Queued mails of concurrent requests are stored together (group commit): one transaction
//! with one `INSERT` of the outbox rows and one of their bodies for the mails that came while
//! the previous group was being written. A request is answered only once its group is
//! committed, so a mail the user was told is queued is stored; the writer, not the request,
//! wakes the mailboxes of a committed group, so a request that went away meanwhile still has
//! its mail sent.
//!
//! Why: on SQLite every write takes the database's single write lock; a transaction per
//! request (`BEGIN`, two `INSERT`s, `COMMIT`, each a round trip to the driver's thread) made
//! the queue route answer about 900 requests/s under 16 concurrent requests (BENCHMARKS.md).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crm_sdk::ModuleContext;
use sea_orm::{EntityTrait, Set, TransactionTrait};
use tokio::sync::oneshot;

use crate::entities::{outbox, outbox_body};
use crate::runtime::{PendingInsert as Pending, Shared};

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

/// Stores `row` (whose `message_id` and `server_id` are given) and its message text `raw`, in
/// one transaction with the mails of concurrent requests, then wakes the mailbox's drain; the
/// stored row, or what the database said. Either the whole group is stored or none of it.
pub async fn insert(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    (message_id, server_id): (String, i32),
    row: outbox::ActiveModel,
    raw: String,
) -> Result<outbox::Model, String> {
    let (done, mut stored) = oneshot::channel();
    let inserts = &shared.inserts;
    inserts
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Pending {
            message_id: message_id.clone(),
            server_id,
            row,
            raw,
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
                return answer
                    .unwrap_or_else(|_| Err("the write of this mail stopped without an answer".into()));
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

/// The waiting mails in arrival order up to [`GROUP_BYTES`] (at least one); the others wait
/// for the next turn.
fn take_group(shared: &Shared) -> Vec<Pending> {
    let mut pending = shared
        .inserts
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut bytes = 0;
    let cut = pending
        .iter()
        .position(|p| {
            bytes += p.raw.len();
            bytes > GROUP_BYTES
        })
        .map_or(pending.len(), |at| Ord::max(at, 1));
    pending.drain(..cut).collect()
}

/// Writes a group, wakes its mailboxes and tells each request its outcome.
async fn write(ctx: &ModuleContext, shared: &Arc<Shared>, group: Vec<Pending>) {
    let mut rows = Vec::with_capacity(group.len());
    let mut raws = Vec::with_capacity(group.len());
    let mut waiting = HashMap::with_capacity(group.len());
    let servers: BTreeSet<i32> = group.iter().map(|p| p.server_id).collect();
    for p in group {
        rows.push(p.row);
        raws.push((p.message_id.clone(), p.raw));
        waiting.insert(p.message_id, p.done);
    }
    match store(ctx, shared, rows, raws).await {
        Ok(stored) => {
            for server_id in servers {
                shared.wake(server_id).await;
            }
            for model in stored {
                if let Some(done) = waiting.remove(&model.message_id) {
                    let _ = done.send(Ok(model));
                }
            }
            for (_, done) in waiting {
                let _ = done.send(Err("the database did not return the stored row".into()));
            }
        }
        Err(e) => {
            let words = e.to_string();
            for (_, done) in waiting {
                let _ = done.send(Err(words.clone()));
            }
        }
    }
}

/// One transaction: the rows (`RETURNING` them), then their bodies keyed by the new ids.
async fn store(
    ctx: &ModuleContext,
    shared: &Shared,
    rows: Vec<outbox::ActiveModel>,
    raws: Vec<(String, String)>,
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
    txn.commit().await?;
    Ok(stored)
}

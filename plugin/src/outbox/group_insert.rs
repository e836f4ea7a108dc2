//! Queued mails of concurrent requests are stored together (group commit): one transaction
//! with one `INSERT` of the outbox rows and one of their bodies for every mail that came while
//! the previous group was being written. A request is answered only once its group is
//! committed, so a mail the user was told is queued is stored.
//!
//! Why: on SQLite every write takes the database's single write lock; a transaction per
//! request (`BEGIN`, two `INSERT`s, `COMMIT`, each a round trip to the driver's thread) made
//! the queue route answer about 900 requests/s under 16 concurrent requests (BENCHMARKS.md).

use std::collections::HashMap;
use std::sync::Arc;

use crm_sdk::ModuleContext;
use sea_orm::{EntityTrait, Set, TransactionTrait};
use tokio::sync::oneshot;

use crate::entities::{outbox, outbox_body};
use crate::runtime::{PendingInsert as Pending, Shared};

/// Outbox rows per `INSERT` (about 20 bound values each, far below SQLite's 32,766).
const ROWS_PER_INSERT: usize = 100;

/// Stores `row` (whose `message_id` is `message_id`) and its message text `raw`, in one
/// transaction with the mails of concurrent requests; the stored row, or what the database
/// said. Either the whole group is stored or none of it.
pub async fn insert(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    message_id: String,
    row: outbox::ActiveModel,
    raw: String,
) -> Result<outbox::Model, String> {
    let (done, stored) = oneshot::channel();
    shared
        .inserts
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Pending {
            message_id,
            row,
            raw,
            done,
        });
    {
        // Whoever gets the turn writes every mail waiting then, this one included unless an
        // earlier group took it.
        let _turn = shared.inserts.turn.lock().await;
        let group = std::mem::take(
            &mut *shared
                .inserts
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if !group.is_empty() {
            let (ctx, shared) = (ctx.clone(), shared.clone());
            // A task of its own: a request that goes away (the client hung up) does not take
            // the other requests' mails with it.
            let _ = tokio::spawn(async move { write(&ctx, &shared, group).await }).await;
        }
    }
    stored
        .await
        .unwrap_or_else(|_| Err("the write of this mail stopped without an answer".into()))
}

/// Writes a group and tells each request its outcome.
async fn write(ctx: &ModuleContext, shared: &Shared, group: Vec<Pending>) {
    let mut rows = Vec::with_capacity(group.len());
    let mut raws = Vec::with_capacity(group.len());
    let mut waiting = HashMap::with_capacity(group.len());
    for p in group {
        rows.push(p.row);
        raws.push((p.message_id.clone(), p.raw));
        waiting.insert(p.message_id, p.done);
    }
    match store(ctx, shared, rows, raws).await {
        Ok(stored) => {
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
    let _gate = shared.write_gate(ctx).await;
    let txn = ctx.db().begin().await?;
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

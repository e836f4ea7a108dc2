//! This process's drains: at most one per mailbox, at most `delivery_concurrency` at once. A
//! wake for a mailbox being drained only raises its "more mail came" flag, which the drain
//! reads before it ends, so a mail queued while its mailbox drains joins the running drain and
//! an idle mailbox costs nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crm_sdk::ModuleContext;

use crate::runtime::Shared;

/// Starts the dispatcher of this process's drains: every wake ([`Shared::wake`]) starts the
/// mailbox's drain as a task, or tells the running one.
pub fn start(ctx: &ModuleContext, shared: &Arc<Shared>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    shared.set_wake(Some(tx));
    let (ctx, shared) = (ctx.clone(), shared.clone());
    tokio::spawn(async move {
        while let Some(server_id) = rx.recv().await {
            if tell_running(&shared, server_id) {
                continue;
            }
            let (ctx, shared) = (ctx.clone(), shared.clone());
            tokio::spawn(async move {
                let _counted = Counted::new(&shared);
                if let Err(e) = run(&ctx, &shared, server_id).await {
                    shared.note_db_error(&e);
                    tracing::warn!(error = %e, server_id, "a drain hit a database error; the sweep will wake it again");
                }
            });
        }
    });
}

/// A drain task of this process, counted while it runs (however it ends, a panic included).
struct Counted<'a>(&'a Shared);

impl<'a> Counted<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.task_started();
        Self(shared)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.task_ended();
    }
}

/// Stops waking drains here; the running ones end after their current batch.
pub fn stop(shared: &Shared) {
    shared.set_wake(None);
}

/// Raises the flag of `server_id`'s running drain, if one runs here.
fn tell_running(shared: &Shared, server_id: i32) -> bool {
    match shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&server_id)
    {
        Some(more) => {
            more.store(true, Ordering::SeqCst);
            true
        }
        None => false,
    }
}

/// Removes a drain's entry when it ends, however it ends (only its own: a new drain of the
/// mailbox may have started meanwhile).
struct Entry<'a> {
    shared: &'a Shared,
    server_id: i32,
    more: Arc<AtomicBool>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
        if active
            .get(&self.server_id)
            .is_some_and(|m| Arc::ptr_eq(m, &self.more))
        {
            active.remove(&self.server_id);
        }
    }
}

/// Drains `server_id` in this process unless a drain of it runs here already (that one is
/// told instead), and again while mail came during the drain.
pub async fn run(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server_id: i32,
) -> Result<(), sea_orm::DbErr> {
    let more = {
        let mut active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(more) = active.get(&server_id) {
            more.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let more = Arc::new(AtomicBool::new(false));
        active.insert(server_id, more.clone());
        more
    };
    let entry = Entry {
        shared,
        server_id,
        more,
    };
    let Ok(_permit) = shared.drain_permits.clone().acquire_owned().await else {
        return Ok(());
    };
    loop {
        entry.more.store(false, Ordering::SeqCst);
        crate::delivery::drain::drain(ctx, shared, server_id).await?;
        let more = {
            let mut active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
            let more = entry.more.load(Ordering::SeqCst);
            if !shared.stopping() && more {
                continue;
            }
            active.remove(&server_id);
            more
        };
        if more {
            // Mail came while the jobs were restarting: the new dispatcher (or, with none, a
            // worker process) takes it.
            shared.wake(server_id).await;
        }
        return Ok(());
    }
}

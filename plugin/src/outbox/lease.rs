//! A drain's claim on its batch, kept alive while the batch is sent: the lease of the mails
//! whose outcome is not written yet is extended every third of its length, and a claim taken
//! over by another worker is noticed so that nothing more is sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::Duration;
use crm_sdk::ModuleContext;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::entities::outbox;
use crate::outbox::claims::Claimed;
use crate::runtime::Shared;

/// Keeps a drain's claim on its batch alive: a task extends the lease of the batch's mails
/// whose outcome is not written yet every third of its length, and says when the claim was
/// lost (another worker took some of them over), so that this drain sends no more. Dropping
/// it stops it.
pub struct LeaseKeeper {
    /// Set once the claim was lost.
    pub lost: Arc<AtomicBool>,
    /// Outcomes written so far (their rows are no longer this claim's).
    pub written: Arc<AtomicUsize>,
    /// Held while outcomes are written and counted, and while the lease is extended and
    /// compared, so that an extension never sees rows written but not yet counted.
    pub writing: Arc<tokio::sync::Mutex<()>>,
    /// When the batch was claimed.
    pub claimed_at: chrono::DateTime<chrono::Utc>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts keeping `claimed` for `length`.
    pub fn start(
        ctx: &ModuleContext,
        shared: &Arc<Shared>,
        claimed: &Claimed,
        length: std::time::Duration,
    ) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        let ids: Vec<i64> = claimed.rows.iter().map(|r| r.id).collect();
        let (ctx, owner, flag) = (ctx.clone(), claimed.owner.clone(), lost.clone());
        let done = written.clone();
        let writing = Arc::new(tokio::sync::Mutex::new(()));
        let busy = writing.clone();
        let shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(length / 3).await;
                let _writes = busy.lock().await;
                let turn = shared.write_gate(&ctx).await;
                let now = ctx.clock().now();
                let until = now + Duration::from_std(length).unwrap_or(Duration::minutes(5));
                let extended = outbox::Entity::update_many()
                    .col_expr(outbox::Column::LeaseUntil, Expr::value(until))
                    .filter(outbox::Column::Id.is_in(ids.iter().copied()))
                    .filter(outbox::Column::LeaseOwner.eq(owner.as_str()))
                    .exec(turn.db())
                    .await;
                // A written outcome clears the owner: every row not written yet must be ours.
                let unwritten = ids.len().saturating_sub(done.load(Ordering::SeqCst));
                match extended {
                    Ok(r) if r.rows_affected as usize >= unwritten => {}
                    Ok(_) => {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    // The database is away: try again; if the lease runs out meanwhile, the
                    // next extension finds it taken over.
                    Err(e) => {
                        shared.note_db_error(&e);
                        tracing::warn!(error = %e, "extending a batch's lease failed");
                    }
                }
            }
        });
        Self {
            lost,
            written,
            writing,
            claimed_at: claimed.claimed_at,
            task,
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! A mailbox's sending slots in the database (table `microsoft_outlook_smtp_slots`): every
//! process on one database together holds at most [`CONNECTIONS_PER_MAILBOX`] of a mailbox's
//! slots (Exchange Online's limit of concurrent connections), each under a lease its process
//! renews while it holds it; a crashed process's slots free themselves when their lease runs
//! out. SMTP connections and Microsoft Graph requests both take them.

use chrono::{DateTime, Utc};
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect, Set};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delivery::smtp_transaction::SendOutcome;
use crate::entities::smtp_slot;

/// Exchange Online's limit of concurrent SMTP connections per mailbox.
pub const CONNECTIONS_PER_MAILBOX: usize = 3;

/// The slots this process holds, and those to free (the upkeep renews and frees them).
#[derive(Default)]
struct Book {
    /// holder → (server, slot, last renewed, lost).
    held: HashMap<String, Held>,
    to_release: Vec<String>,
}

struct Held {
    server_id: i32,
    index: i32,
    renewed: Instant,
    lost: bool,
}

type SharedBook = Arc<Mutex<Book>>;

fn book(b: &SharedBook) -> std::sync::MutexGuard<'_, Book> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// One of a mailbox's slots, held by this process. Dropping it frees it (through the upkeep),
/// whatever path its connection took: an error, a cancelled send, a forgotten pool.
pub(crate) struct Slot {
    holder: String,
    /// When it was taken.
    pub(crate) acquired: Instant,
    book: SharedBook,
}

impl Slot {
    /// Whether the slot's lease was lost (it could not be renewed in time).
    pub(crate) fn lost(&self) -> bool {
        book(&self.book)
            .held
            .get(&self.holder)
            .is_none_or(|h| h.lost)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut b = book(&self.book);
        b.held.remove(&self.holder);
        b.to_release.push(std::mem::take(&mut self.holder));
    }
}

/// A mailbox's sending slot held by a transport other than SMTP; dropping it frees it.
pub struct MailboxSlot(pub(crate) Slot);

impl MailboxSlot {
    /// Whether its lease was lost (another process may take it): stop sending.
    pub fn lost(&self) -> bool {
        self.0.lost()
    }
}

/// This process's slots: taken under `instance`'s name for `lease` at a time.
pub(crate) struct Slots {
    instance: String,
    lease: Duration,
    nonce: AtomicU64,
    book: SharedBook,
    /// The mailboxes whose slot rows this process made sure exist.
    rows_ready: Mutex<HashSet<i32>>,
}

impl Slots {
    /// No slot held yet; `lease` at least 2 s.
    pub(crate) fn new(instance: &str, lease: Duration) -> Self {
        Self {
            instance: instance.to_string(),
            lease: Ord::max(lease, Duration::from_secs(2)),
            nonce: AtomicU64::new(0),
            book: SharedBook::default(),
            rows_ready: Mutex::new(HashSet::new()),
        }
    }

    fn rows_ready(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.rows_ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a slot stays held without being renewed.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Makes sure the mailbox's slot rows exist (once per process and mailbox). The first one
    /// is also the lock of the per-minute throttle.
    pub(crate) async fn ensure_rows(
        &self,
        ctx: &ModuleContext,
        server_id: i32,
    ) -> Result<(), sea_orm::DbErr> {
        if self.rows_ready().contains(&server_id) {
            return Ok(());
        }
        let rows = (0..CONNECTIONS_PER_MAILBOX as i32).map(|slot| smtp_slot::ActiveModel {
            server_id: Set(server_id),
            slot: Set(slot),
            holder: Set(None),
            lease_until: Set(None),
        });
        smtp_slot::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([smtp_slot::Column::ServerId, smtp_slot::Column::Slot])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(ctx.db())
            .await?;
        self.rows_ready().insert(server_id);
        Ok(())
    }

    /// Takes one of the mailbox's slots, waiting (polling) until `deadline` while other
    /// processes hold all of them: [`SendOutcome::Busy`] then; [`SendOutcome::NotTried`] when
    /// the database does not answer.
    pub(crate) async fn acquire(
        &self,
        ctx: &ModuleContext,
        server_id: i32,
        deadline: Instant,
    ) -> Result<Slot, SendOutcome> {
        let unavailable = |e: sea_orm::DbErr| {
            tracing::warn!(error = %e, server_id, "taking a connection slot: the database did not answer");
            SendOutcome::NotTried("the CRM's database did not answer".into())
        };
        self.ensure_rows(ctx, server_id)
            .await
            .map_err(unavailable)?;
        loop {
            let now = ctx.clock().now();
            let free: Vec<i32> = smtp_slot::Entity::find()
                .select_only()
                .column(smtp_slot::Column::Slot)
                .filter(smtp_slot::Column::ServerId.eq(server_id))
                .filter(free_at(now))
                .into_tuple()
                .all(ctx.db())
                .await
                .map_err(unavailable)?;
            for index in free {
                if let Some(slot) = self
                    .take(ctx, (server_id, index), now)
                    .await
                    .map_err(unavailable)?
                {
                    return Ok(slot);
                }
            }
            if Instant::now() >= deadline {
                return Err(busy());
            }
            let wait = Duration::from_millis(rand::random_range(50..250));
            tokio::time::sleep(Ord::min(
                wait,
                deadline.saturating_duration_since(Instant::now()),
            ))
            .await;
        }
    }

    /// Takes slot `index` of `server_id` if it is still free at `now` (another process may
    /// have taken it since it was read).
    async fn take(
        &self,
        ctx: &ModuleContext,
        (server_id, index): (i32, i32),
        now: DateTime<Utc>,
    ) -> Result<Option<Slot>, sea_orm::DbErr> {
        let holder = format!(
            "{}:{server_id}:{index}:{}",
            self.instance,
            self.nonce.fetch_add(1, Ordering::Relaxed)
        );
        let taken = smtp_slot::Entity::update_many()
            .col_expr(smtp_slot::Column::Holder, Expr::value(holder.clone()))
            .col_expr(
                smtp_slot::Column::LeaseUntil,
                Expr::value(until(now, self.lease)),
            )
            .filter(smtp_slot::Column::ServerId.eq(server_id))
            .filter(smtp_slot::Column::Slot.eq(index))
            .filter(free_at(now))
            .exec(ctx.db())
            .await?;
        if taken.rows_affected != 1 {
            return Ok(None);
        }
        let held = Held {
            server_id,
            index,
            renewed: Instant::now(),
            lost: false,
        };
        book(&self.book).held.insert(holder.clone(), held);
        Ok(Some(Slot {
            holder,
            acquired: Instant::now(),
            book: self.book.clone(),
        }))
    }

    /// One round of upkeep: frees the slots let go since the last round, and renews the leases
    /// a third of whose time has passed (a slot another process took over is marked lost; a
    /// database that does not answer is tried again next round).
    pub(crate) async fn upkeep(&self, ctx: &ModuleContext) {
        let (holders, due): (Vec<String>, Vec<(String, i32, i32)>) = {
            let mut b = book(&self.book);
            let due = b
                .held
                .iter()
                .filter(|(_, h)| !h.lost && h.renewed.elapsed() >= self.lease / 3)
                .map(|(k, h)| (k.clone(), h.server_id, h.index))
                .collect();
            (std::mem::take(&mut b.to_release), due)
        };
        release(ctx.db(), holders).await;
        for (holder, server_id, index) in due {
            let now = ctx.clock().now();
            let renewed = smtp_slot::Entity::update_many()
                .col_expr(
                    smtp_slot::Column::LeaseUntil,
                    Expr::value(until(now, self.lease)),
                )
                .filter(smtp_slot::Column::ServerId.eq(server_id))
                .filter(smtp_slot::Column::Slot.eq(index))
                .filter(smtp_slot::Column::Holder.eq(holder.as_str()))
                .exec(ctx.db())
                .await;
            let mut b = book(&self.book);
            if let Some(h) = b.held.get_mut(&holder) {
                match renewed {
                    Ok(r) if r.rows_affected == 1 => h.renewed = Instant::now(),
                    // Taken over by another process: stop using it.
                    Ok(_) => h.lost = true,
                    // The database is away: try again on the next round.
                    Err(_) => {}
                }
            }
        }
    }

    /// Frees at once the slots let go (on shutdown, so that other processes need not wait for
    /// their leases to run out).
    pub(crate) async fn release_let_go(&self, db: &DatabaseConnection) {
        let holders = std::mem::take(&mut book(&self.book).to_release);
        release(db, holders).await;
    }
}

fn until(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60))
}

/// Every slot of the mailbox is held (here or by other processes).
pub(crate) fn busy() -> SendOutcome {
    SendOutcome::Busy(format!(
        "all {CONNECTIONS_PER_MAILBOX} connections to this mailbox are in use"
    ))
}

/// A slot is free when nobody holds it or its holder's lease ran out.
fn free_at(now: DateTime<Utc>) -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(smtp_slot::Column::Holder.is_null())
        .add(smtp_slot::Column::LeaseUntil.lt(now))
}

/// Frees slots (a failure only delays them until their lease runs out).
async fn release(db: &DatabaseConnection, holders: Vec<String>) {
    if holders.is_empty() {
        return;
    }
    let freed = smtp_slot::Entity::update_many()
        .col_expr(
            smtp_slot::Column::Holder,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            smtp_slot::Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(smtp_slot::Column::Holder.is_in(holders))
        .exec(db)
        .await;
    if let Err(e) = freed {
        tracing::warn!(error = %e, "freeing SMTP connection slots failed; their leases will run out");
    }
}

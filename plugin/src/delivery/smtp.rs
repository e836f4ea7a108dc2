//! SMTP submission with SASL XOAUTH2 over connections this module opens itself (TCP_NODELAY on),
//! reused per mailbox and token version. Every connection holds one of the mailbox's three
//! connection slots in the database, so that all processes on one database together never open
//! more than three connections to a mailbox (Exchange Online's limit); a crashed process's slots
//! free themselves when their lease runs out.

use crm_sdk::ModuleContext;
use lettre::transport::smtp::extension::ClientId;
use sea_orm::DatabaseConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::delivery::classify::Stage;
pub use crate::delivery::smtp_open::Reached;
use crate::delivery::smtp_open::open;
pub use crate::delivery::smtp_slots::{CONNECTIONS_PER_MAILBOX, MailboxSlot};
use crate::delivery::smtp_slots::{Slot, Slots, busy};
use crate::delivery::smtp_transaction::{Line, Message, transact};
pub use crate::delivery::smtp_transaction::{SendOutcome, SmtpFailure};
use crate::entities::mail_server;
use crate::tokens::store::AccessToken;

/// How long an idle connection is kept for reuse; then it is closed and its slot freed for
/// other processes.
const IDLE_FOR: Duration = Duration::from_secs(3);
/// How often idle connections are looked at.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// A connection a caller holds between two of its sends: the next mail's commands are
/// pending on it. Dropping it closes the connection and frees its slot.
pub(crate) struct HeldLine {
    line: Line,
    version: i64,
    slot: Slot,
    permit: OwnedSemaphorePermit,
}

struct Idle {
    line: Line,
    version: i64,
    since: Instant,
    slot: Slot,
}

struct MailboxPool {
    server_id: i32,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
}

type Pools = Mutex<HashMap<i32, Arc<MailboxPool>>>;

/// The module's SMTP client: one small pool per mailbox, bounded across processes.
pub struct SmtpSender {
    pools: Arc<Pools>,
    hello: ClientId,
    slots: Arc<Slots>,
    /// How long a slot stays held without being renewed.
    slot_lease: Duration,
    reaper: Mutex<bool>,
    /// How long the server may take to open a connection (connect to AUTH), to answer the
    /// NOOP that checks an idle one, and over one mail's whole transaction.
    timeout: Duration,
}

impl SmtpSender {
    /// A sender with no connections yet. `instance` names this process in slot leases;
    /// `slot_lease` is how long a slot stays held without being renewed (after a crash, how long
    /// other processes wait for it). A connection is also given up after holding its slot that
    /// long, so that busy processes take turns. `timeout` bounds opening a connection, the
    /// check of an idle one, and each mail's transaction
    /// ([`crate::runtime::ModuleOptions::smtp_timeout`]).
    pub fn new(instance: &str, slot_lease: Duration, timeout: Duration) -> Self {
        let slots = Slots::new(instance, slot_lease);
        Self {
            timeout,
            pools: Arc::new(Mutex::new(HashMap::new())),
            hello: ClientId::Domain(hostname()),
            slot_lease: slots.lease(),
            slots: Arc::new(slots),
            reaper: Mutex::new(false),
        }
    }

    fn pool(&self, server_id: i32) -> Arc<MailboxPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(server_id)
            .or_insert_with(|| {
                Arc::new(MailboxPool {
                    server_id,
                    permits: Arc::new(Semaphore::new(CONNECTIONS_PER_MAILBOX)),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// Forgets the idle connections of a server (after its token or settings changed); their
    /// slots are freed by the reaper, and so are those of sends still running on the old pool.
    pub fn forget(&self, server_id: i32) {
        let removed = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&server_id);
        if let Some(pool) = removed {
            drop(std::mem::take(
                &mut *pool.idle.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
    }

    /// Closes every idle connection and frees the slots (on shutdown, so that other processes
    /// need not wait for the leases to run out).
    pub async fn close_all(&self, db: &DatabaseConnection) {
        let pools: Vec<Arc<MailboxPool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for pool in pools {
            drop(std::mem::take(
                &mut *pool.idle.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
        self.slots.release_let_go(db).await;
    }

    /// Starts (once) the task that closes connections idle for [`IDLE_FOR`], frees the slots of
    /// closed connections and renews the leases of the slots held.
    fn start_reaper(&self, ctx: &ModuleContext) {
        let mut started = self.reaper.lock().unwrap_or_else(|e| e.into_inner());
        if *started {
            return;
        }
        *started = true;
        let pools: Weak<Pools> = Arc::downgrade(&self.pools);
        let slots = self.slots.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let Some(pools) = pools.upgrade() else {
                    return;
                };
                let all: Vec<Arc<MailboxPool>> = pools
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                drop(pools);
                for pool in all {
                    let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                    idle.retain(|i| i.since.elapsed() < IDLE_FOR);
                }
                slots.upkeep(&ctx).await;
            }
        });
    }

    /// Makes sure the mailbox's slot rows exist (once per process and mailbox). The first one
    /// is also the lock of the per-minute throttle.
    pub async fn ensure_slot_rows(
        &self,
        ctx: &ModuleContext,
        server_id: i32,
    ) -> Result<(), sea_orm::DbErr> {
        self.slots.ensure_rows(ctx, server_id).await
    }

    /// Takes one of the mailbox's sending slots for another transport (Microsoft Graph): the
    /// same [`CONNECTIONS_PER_MAILBOX`] slots, so that every process together sends at most
    /// that many requests to a mailbox at once. Waits until `deadline`; `Busy` after it.
    pub async fn mailbox_slot(
        &self,
        ctx: &ModuleContext,
        server_id: i32,
        deadline: Instant,
    ) -> Result<MailboxSlot, SendOutcome> {
        self.start_reaper(ctx);
        self.slots
            .acquire(ctx, server_id, deadline)
            .await
            .map(MailboxSlot)
    }

    /// Sends `mail` through `server` with `token`, and with it the commands of `next` (the mail
    /// this caller sends next, if any) where the connection pipelines. Uses `held` (the
    /// connection that has `mail`'s commands pending, from the caller's previous send) or a
    /// connection of the mailbox: waits at most until `deadline` for one (all three may be held
    /// by this or other processes: [`SendOutcome::Busy`] then). A connection left with `next`
    /// pending goes back into `held`; dropping it closes it. Checks `lease_lost` once it has a
    /// connection, just before the message goes out.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        ctx: &ModuleContext,
        server: &mail_server::Model,
        token: &AccessToken,
        (mail, next): (&Message<'_>, Option<&Message<'_>>),
        held: &mut Option<HeldLine>,
        deadline: Instant,
        lease_lost: &AtomicBool,
    ) -> SendOutcome {
        self.start_reaper(ctx);
        let pool = self.pool(server.id);
        let mine = |h: &HeldLine| {
            h.line.pending == Some(mail.id) && h.version == token.version && !h.slot.lost()
        };
        if let Some(mut h) = held.take().filter(mine) {
            if lease_lost.load(Ordering::SeqCst) {
                return SendOutcome::LeaseLost;
            }
            let next = self.within_lease(&h.slot, next);
            let outcome = transact(&mut h.line, mail, next, self.timeout).await;
            let unsent = matches!(&outcome, SendOutcome::Failed(f) if f.code.is_none())
                && !h.line.content_written;
            if !unsent {
                self.keep(&pool, h, &outcome, held);
                return outcome;
            }
            // The line went away before this mail's content: nothing of it went out, so it
            // goes out on another connection.
        }
        let mut h = match self
            .take_line(ctx, server, token, &pool, (deadline, lease_lost))
            .await
        {
            Ok(h) if !lease_lost.load(Ordering::SeqCst) => h,
            Ok(_) => return SendOutcome::LeaseLost,
            Err(outcome) => return outcome,
        };
        let next = self.within_lease(&h.slot, next);
        let outcome = transact(&mut h.line, mail, next, self.timeout).await;
        self.keep(&pool, h, &outcome, held);
        outcome
    }

    /// A connection of the mailbox for one mail, with its permit and slot: an idle one of this
    /// token (asked whether it is still open when it waited a while), else a new one in the
    /// slot of an idle one or in a free slot. Waits at most until `deadline` for a permit or a
    /// slot; opens nothing once `lease_lost` is set.
    async fn take_line(
        &self,
        ctx: &ModuleContext,
        server: &mail_server::Model,
        token: &AccessToken,
        pool: &Arc<MailboxPool>,
        (deadline, lease_lost): (Instant, &AtomicBool),
    ) -> Result<HeldLine, SendOutcome> {
        let permit: OwnedSemaphorePermit =
            match tokio::time::timeout_at(deadline.into(), pool.permits.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => {
                    return Err(SendOutcome::NotTried("the sender is shutting down".into()));
                }
                Err(_) => return Err(busy()),
            };
        let taken = {
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            match idle
                .iter()
                .position(|c| c.version == token.version && c.since.elapsed() < IDLE_FOR)
            {
                Some(at) => Some(idle.swap_remove(at)),
                None => idle.pop(),
            }
        };
        // A connection of an older token is closed; its slot serves the new one.
        let (reused, slot) = match taken {
            Some(i) if i.version == token.version && !i.slot.lost() => (Some(i.line), i.slot),
            Some(i) if !i.slot.lost() => (None, i.slot),
            _ => (None, self.slots.acquire(ctx, server.id, deadline).await?),
        };
        if lease_lost.load(Ordering::SeqCst) {
            return Err(SendOutcome::LeaseLost);
        }
        // The server may have closed a connection that waited, even a moment: ask before
        // sending (after a failure mid-message one cannot know whether the server took it, so
        // the mail would spend an attempt and wait for its retry).
        let mut alive = None;
        if let Some(mut line) = reused
            && tokio::time::timeout(self.timeout, line.conn.test_connected())
                .await
                .unwrap_or(false)
        {
            alive = Some(line);
        }
        let line = match alive {
            Some(line) => line,
            None => {
                open(
                    (&self.hello, self.timeout),
                    ctx,
                    server,
                    token,
                    &mut Reached::Nothing,
                )
                .await?
            }
        };
        Ok(HeldLine {
            line,
            version: token.version,
            slot,
            permit,
        })
    }

    /// `next`, when the slot's lease leaves time for another mail on its connection (else the
    /// connection is closed after this one and its slot freed).
    fn within_lease<'m>(
        &self,
        slot: &Slot,
        next: Option<&'m Message<'m>>,
    ) -> Option<&'m Message<'m>> {
        next.filter(|_| slot.acquired.elapsed() < self.slot_lease)
    }

    /// After a transaction: a connection with the caller's next mail pending stays with the
    /// caller; any other is kept for reuse or closed ([`Self::finish`]).
    fn keep(
        &self,
        pool: &Arc<MailboxPool>,
        h: HeldLine,
        outcome: &SendOutcome,
        held: &mut Option<HeldLine>,
    ) {
        if h.line.pending.is_some() && h.line.reusable() {
            *held = Some(h);
            return;
        }
        let HeldLine {
            line,
            version,
            slot,
            permit,
        } = h;
        self.finish(pool, line, version, slot, outcome);
        drop(permit);
    }

    /// Opens a connection to `server` and authenticates with `token`, then says QUIT: the
    /// "Test connection" of the server page. It takes a connection slot the way a send does
    /// (the slot of an idle connection of this process, else a free one, waiting at most until
    /// `deadline`) and frees it when it returns, so that a test never makes a fourth connection
    /// to the mailbox. Says how far it got, and what failed.
    pub(crate) async fn probe(
        &self,
        ctx: &ModuleContext,
        server: &mail_server::Model,
        token: &AccessToken,
        deadline: Instant,
    ) -> (Reached, Result<(), SendOutcome>) {
        self.start_reaper(ctx);
        let pool = self.pool(server.id);
        let Ok(Ok(permit)) =
            tokio::time::timeout_at(deadline.into(), pool.permits.clone().acquire_owned()).await
        else {
            return (Reached::Nothing, Err(busy()));
        };
        let idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let slot = match idle {
            Some(i) if !i.slot.lost() => i.slot,
            _ => match self.slots.acquire(ctx, server.id, deadline).await {
                Ok(s) => s,
                Err(outcome) => return (Reached::Nothing, Err(outcome)),
            },
        };
        let mut reached = Reached::Nothing;
        let result = match open(
            (&self.hello, self.timeout),
            ctx,
            server,
            token,
            &mut reached,
        )
        .await
        {
            Ok(mut line) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), line.conn.quit()).await;
                Ok(())
            }
            Err(outcome) => Err(outcome),
        };
        drop(slot);
        drop(permit);
        (reached, result)
    }

    /// Keeps a connection for reuse after a complete exchange with the server; drops it (and
    /// frees its slot) when it broke, timed out mid-command, held its slot long enough, or
    /// belongs to a pool that was forgotten meanwhile.
    fn finish(
        &self,
        pool: &Arc<MailboxPool>,
        line: Line,
        version: i64,
        slot: Slot,
        outcome: &SendOutcome,
    ) {
        let answered = match outcome {
            SendOutcome::Sent(_) => true,
            // A reply is an answer; a dropped line or a timeout is not. A mail refused before
            // it went out (it needs SMTPUTF8) leaves the line as it was.
            SendOutcome::Failed(f) => {
                (f.code.is_some() || f.needs_smtputf8) && f.stage == Stage::Transaction
            }
            _ => false,
        };
        let current = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pool.server_id)
            .is_some_and(|p| Arc::ptr_eq(p, pool));
        if answered
            && current
            && line.reusable()
            && line.pending.is_none()
            && slot.acquired.elapsed() < self.slot_lease
        {
            pool.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Idle {
                    line,
                    version,
                    since: Instant::now(),
                    slot,
                });
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "crm.localdomain".into())
}

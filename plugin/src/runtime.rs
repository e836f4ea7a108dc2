//! What the module's routes and jobs share while it is linked: options, the job queue, the SMTP
//! sender and the HTTP client for the identity platform.

use std::sync::{Arc, RwLock};

use microsoft_outlook_jobs::MailQueue;

use crate::smtp::SmtpSender;

/// Tunables that are not operator settings (tests and benchmarks change them).
#[derive(Debug, Clone)]
pub struct ModuleOptions {
    /// When the outbox sweep runs (cron with seconds).
    pub sweep_schedule: String,
    /// Mails this process delivers at once.
    pub delivery_concurrency: usize,
    /// How long a claimed mail belongs to its worker before others may take it over.
    pub lease_secs: i64,
    /// The first retry delay; each further retry doubles it (with jitter), up to an hour.
    pub retry_base_secs: i64,
    /// How the nightly refresh runs.
    pub refresh: crate::jobs::RefreshOptions,
    /// How long one request to the token endpoint may take.
    pub token_timeout: std::time::Duration,
    /// Whether this process delivers mail and runs the scheduled jobs. A web-only process
    /// (false) still queues mail and pushes the delivery jobs for the worker processes.
    pub workers: bool,
}

impl Default for ModuleOptions {
    fn default() -> Self {
        Self {
            sweep_schedule: "*/10 * * * * *".into(),
            delivery_concurrency: 16,
            lease_secs: 300,
            retry_base_secs: 60,
            refresh: crate::jobs::RefreshOptions::default(),
            token_timeout: crate::token_client::TOKEN_TIMEOUT,
            workers: true,
        }
    }
}

/// A cached client-credentials token.
pub struct AppToken {
    /// For which application (client id).
    pub client_id: String,
    /// The bearer token.
    pub token: secrecy::SecretString,
    /// When it expires.
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Bumped on every fetch (connections are reused per version).
    pub version: i64,
}

/// State shared by routes and jobs.
pub struct Shared {
    /// The tunables.
    pub options: ModuleOptions,
    /// The module's metrics (README › Metrics).
    pub metrics: crate::metrics::Metrics,
    /// Where delivery jobs are pushed (set while the jobs run).
    pub queue: RwLock<Option<MailQueue>>,
    /// The SMTP client.
    pub smtp: SmtpSender,
    /// The identity platform's HTTP client.
    pub http: oauth2::reqwest::Client,
    /// This process's name for leases and workers.
    pub instance: String,
    /// Immediate deliveries running now (waited for on stop).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Signalled when an immediate delivery ends.
    in_flight_done: tokio::sync::Notify,
    /// The delivery limits read from settings, and when (read again after two seconds, and
    /// at once after settings are saved in this process).
    pub limits: std::sync::Mutex<Option<(std::time::Instant, crate::deliver::Limits)>>,
    /// Mail server rows read by deliveries, kept two seconds (edits made in this process apply
    /// at once, in others within two seconds).
    servers: std::sync::Mutex<
        std::collections::HashMap<i32, (std::time::Instant, crate::entities::mail_server::Model)>,
    >,
    /// Claims of mails by this process so far (each claim's owner name is unique).
    pub claims: std::sync::atomic::AtomicU64,
    /// How often the jobs were started (worker names must be new each time).
    pub starts: std::sync::atomic::AtomicU32,
    /// The app-only (client credentials) token, shared by every worker of this process.
    pub app_token: tokio::sync::Mutex<Option<AppToken>>,
    /// Mailboxes seen ready, and when (read again after two seconds).
    ready: std::sync::Mutex<std::collections::HashMap<i32, std::time::Instant>>,
    /// Held by a release while it sends a mailbox's waiting mails in queue order; every other
    /// delivery of this process waits for it, so that mail queued later does not overtake them.
    turn: Arc<tokio::sync::RwLock<()>>,
}

/// How many waiting mails a release sends itself, one after another, before the queue's
/// workers take the rest.
const RELEASED_IN_ORDER: usize = 50;
/// How long a release may keep the other deliveries of its process waiting.
const RELEASED_IN_ORDER_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl Shared {
    /// Fresh shared state.
    pub fn new(options: ModuleOptions) -> Arc<Self> {
        let http = crate::token_client::http_client(options.token_timeout);
        let suffix: u32 = rand::random();
        let instance = format!("{}-{suffix:08x}", std::process::id());
        // A crashed process's connection slots come free after this long.
        let slot_lease = std::time::Duration::from_secs(options.lease_secs.clamp(2, 120) as u64);
        Arc::new(Self {
            options,
            metrics: crate::metrics::Metrics::new(),
            queue: RwLock::new(None),
            smtp: SmtpSender::new(&instance, slot_lease),
            http,
            instance,
            starts: std::sync::atomic::AtomicU32::new(0),
            claims: std::sync::atomic::AtomicU64::new(0),
            limits: std::sync::Mutex::new(None),
            servers: std::sync::Mutex::new(std::collections::HashMap::new()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            in_flight_done: tokio::sync::Notify::new(),
            app_token: tokio::sync::Mutex::new(None),
            ready: std::sync::Mutex::new(std::collections::HashMap::new()),
            turn: Arc::new(tokio::sync::RwLock::new(())),
        })
    }

    /// The queue, when the jobs run.
    pub fn queue(&self) -> Option<MailQueue> {
        self.queue.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The mail server `id` (read at most every two seconds).
    pub async fn server(
        &self,
        ctx: &crm_sdk::ModuleContext,
        id: i32,
    ) -> Result<Option<crate::entities::mail_server::Model>, sea_orm::DbErr> {
        use sea_orm::EntityTrait;
        let cached = self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|(at, _)| at.elapsed() < std::time::Duration::from_secs(2))
            .map(|(_, m)| m.clone());
        if let Some(server) = cached {
            return Ok(Some(server));
        }
        let fresh = crate::entities::mail_server::Entity::find_by_id(id)
            .one(ctx.db())
            .await?;
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        match &fresh {
            Some(m) => {
                servers.insert(id, (std::time::Instant::now(), m.clone()));
            }
            None => {
                servers.remove(&id);
            }
        }
        Ok(fresh)
    }

    /// Forgets what this process keeps of the mail server `id` (its row, its connections),
    /// after an operator or its owner changed, disconnected or deleted it.
    pub fn server_changed(&self, id: i32) {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.smtp.forget(id);
    }

    /// Whether `server_id` was seen ready in the last two seconds.
    pub fn known_ready(&self, server_id: i32) -> bool {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&server_id)
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(2))
    }

    /// Notes that `server_id` is ready.
    pub fn remember_ready(&self, server_id: i32) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(server_id, std::time::Instant::now());
    }

    /// Forgets what this process knows of `server_id`'s health (it changed).
    pub fn forget_health(&self, server_id: i32) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&server_id);
    }

    /// Delivers `outbox_id` when no release is sending waiting mails in queue order.
    pub async fn deliver_in_turn(
        self: &Arc<Self>,
        ctx: &crm_sdk::ModuleContext,
        outbox_id: i64,
    ) -> Result<crate::deliver::Delivered, sea_orm::DbErr> {
        let _turn = self.turn.read().await;
        crate::deliver::deliver(ctx, self, outbox_id).await
    }

    /// After a hold ended: in a process that delivers, sends the first of the waiting mails
    /// `ids` (in queue order) one after another before anything queued later, for at most
    /// [`RELEASED_IN_ORDER_FOR`]; the jobs of the others are pushed at once, and those of the
    /// first ones still waiting after that. (Not async: the task it starts delivers, and
    /// delivering may end a hold.)
    pub fn deliver_in_order(self: &Arc<Self>, ctx: &crm_sdk::ModuleContext, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        let shared = self.clone();
        if !self.delivers_here() {
            tokio::spawn(async move { shared.push(&ids).await });
            return;
        }
        // Taken now when nothing is being delivered (a release from a page or the settings),
        // else as soon as the deliveries running now (one of them may be this caller) end.
        let now = self.turn.clone().try_write_owned().ok();
        let ctx = ctx.clone();
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let split = Ord::min(RELEASED_IN_ORDER, ids.len());
            let (first, rest) = ids.split_at(split);
            shared.push(rest).await;
            let turn = match now {
                Some(turn) => turn,
                None => shared.turn.clone().write_owned().await,
            };
            let deadline = tokio::time::Instant::now() + RELEASED_IN_ORDER_FOR;
            for id in first {
                if !shared.delivers_here() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                if let Err(e) = crate::deliver::deliver(&ctx, &shared, *id).await {
                    tracing::warn!(error = %e, outbox_id = id, "a released mail waits for the queue");
                    break;
                }
            }
            drop(turn);
            // Whatever of the first ones is still due goes through the queue (a sent one is
            // skipped at its claim).
            shared.push(first).await;
            shared
                .in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            shared.in_flight_done.notify_waiters();
        });
    }

    /// Whether this process delivers mail now (its workers run).
    pub fn delivers_here(&self) -> bool {
        self.options.workers && self.queue().is_some()
    }

    /// Starts delivering `outbox_id` right away in this process, while the jobs run. The apalis
    /// job pushed with it stays the durable path: whichever claims the row first sends it, the
    /// other finds it taken (a freshly pushed job can wait for the queue's next poll).
    pub fn deliver_soon(self: &Arc<Self>, ctx: &crm_sdk::ModuleContext, outbox_id: i64) {
        if !self.delivers_here() {
            return;
        }
        let (shared, ctx) = (self.clone(), ctx.clone());
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            if let Err(e) = shared.deliver_in_turn(&ctx, outbox_id).await {
                tracing::warn!(error = %e, outbox_id, "immediate delivery failed; the queue will retry");
            }
            shared
                .in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            shared.in_flight_done.notify_waiters();
        });
    }

    /// Waits (at most `limit`) until the immediate deliveries in flight have finished; a mail
    /// cut off after that keeps its lease and is taken over when the lease runs out.
    pub async fn drain_in_flight(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let notified = self.in_flight_done.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    "immediate deliveries still running at shutdown; their leases will expire"
                );
                break;
            }
        }
    }

    /// Pushes delivery jobs; when the jobs are stopped the rows wait for the sweep.
    pub async fn push(&self, ids: &[i64]) {
        if let Some(queue) = self.queue()
            && let Err(e) = queue.push(ids).await
        {
            tracing::warn!(error = %e, "pushing delivery jobs failed; the sweep will pick the mails up");
        }
    }
}

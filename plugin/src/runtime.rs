//! What the module's routes and jobs share while it is linked: options, the job queue, the SMTP
//! sender and the HTTP client for the identity platform.

use std::sync::{Arc, RwLock};

use microsoft_outlook_jobs::MailQueue;

use crate::delivery::smtp::SmtpSender;
pub use crate::sqlite_writer::WriteTurn;

/// Tunables that are not operator settings (tests and benchmarks change them).
#[derive(Debug, Clone)]
pub struct ModuleOptions {
    /// When the outbox sweep runs (cron with seconds).
    pub sweep_schedule: String,
    /// Mailboxes this process drains at once.
    pub delivery_concurrency: usize,
    /// How long a claimed mail belongs to its worker before others may take it over.
    pub lease_secs: i64,
    /// The first retry delay; each further retry doubles it (with jitter), up to an hour.
    pub retry_base_secs: i64,
    /// How the nightly refresh runs.
    pub refresh: RefreshOptions,
    /// How long one request to the token endpoint may take.
    pub token_timeout: std::time::Duration,
    /// How long an SMTP server may take before the connection is given up: to open it (connect,
    /// greeting, EHLO, STARTTLS and AUTH together), and over one mail's whole transaction
    /// (MAIL FROM to the reply after the content) (60 s).
    pub smtp_timeout: std::time::Duration,
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
            refresh: RefreshOptions::default(),
            token_timeout: crate::connect::token_client::TOKEN_TIMEOUT,
            smtp_timeout: crate::delivery::smtp_open::IO_TIMEOUT,
            workers: true,
        }
    }
}

/// How a refresh run behaves.
#[derive(Debug, Clone)]
pub struct RefreshOptions {
    /// Refreshes in flight at once.
    pub concurrency: usize,
    /// Each refresh waits a random time up to this before starting, to spread the load.
    pub max_jitter: std::time::Duration,
    /// Transient failures are retried this many times within the run.
    pub transient_retries: u32,
    /// A token refreshed less than this long ago is skipped (by a delivery, or by the same run
    /// in another process: several processes running the nightly job refresh each token once).
    pub skip_refreshed_within: std::time::Duration,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            max_jitter: std::time::Duration::from_secs(2),
            transient_retries: 2,
            skip_refreshed_within: std::time::Duration::from_secs(3600),
        }
    }
}

/// The delivery limits from settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts before a mail fails (`max_attempts`, 1–100).
    pub max_attempts: i32,
    /// Sends a minute per mailbox (`mailbox_rate_per_minute`; 0 = no limit).
    pub per_minute: usize,
    /// The largest mail accepted at the queue route, in bytes (`max_message_kb` × 1024).
    pub max_bytes: usize,
    /// The files of one mail together, in bytes (`max_attachments_mb` × 1,000,000).
    pub max_attachment_bytes: usize,
    /// Days a sent mail's text is kept (`keep_sent_days`; 0 = deleted once sent).
    pub keep_sent_days: i64,
}

/// A cached client-credentials token.
pub struct AppToken {
    /// For which application (client id).
    pub client_id: String,
    /// For which resource (Outlook for SMTP, Graph).
    pub resource: crate::settings::Resource,
    /// The bearer token.
    pub token: secrecy::SecretString,
    /// When it expires.
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Bumped on every fetch (connections are reused per version).
    pub version: i64,
}

/// The message text all drains of a process hold at once, in KiB: 48 MiB, more than a batch of
/// small mails (16 MiB at most) and more than one message of Exchange Online's largest size
/// (35 MB), so a batch never waits for itself.
pub const IN_FLIGHT_BODY_KIB: u32 = 48 * 1024;

/// State shared by routes and jobs.
pub struct Shared {
    /// The tunables.
    pub options: ModuleOptions,
    /// The module's metrics (README › Metrics).
    pub metrics: crate::metrics::Metrics,
    /// Where delivery jobs are pushed (set while the jobs run).
    pub queue: RwLock<Option<MailQueue>>,
    /// The SMTP client.
    pub smtp: Arc<SmtpSender>,
    /// The Microsoft Graph transport (sharing the SMTP sender's per-mailbox sending slots).
    pub graph: crate::delivery::graph::GraphSender,
    /// The identity platform's HTTP client.
    pub http: oauth2::reqwest::Client,
    /// This process's name for leases and workers.
    pub instance: String,
    /// Drain tasks running now (waited for on stop).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Signalled when a drain task ends.
    in_flight_done: tokio::sync::Notify,
    /// The delivery limits read from settings, and when (read again after two seconds, and
    /// at once after settings are saved in this process).
    pub limits: std::sync::Mutex<Option<(std::time::Instant, Limits)>>,
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
    /// The mailboxes being drained in this process, each with its "more mail came" flag.
    pub active:
        std::sync::Mutex<std::collections::HashMap<i32, Arc<std::sync::atomic::AtomicBool>>>,
    /// Mailboxes drained at once by this process (`delivery_concurrency`).
    pub drain_permits: Arc<tokio::sync::Semaphore>,
    /// The message text this process's drains hold at once, in KiB ([`IN_FLIGHT_BODY_KIB`]):
    /// a batch takes its size before it loads its bodies, so mails with large files go one
    /// or two at a time however many mailboxes drain.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// The dispatcher of this process's drains, while the jobs run here.
    wake_tx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<i32>>>,
    /// Set while the drains are stopped (they end after their current batch).
    stopping: std::sync::atomic::AtomicBool,
    /// On SQLite, the outbox writes of this process (claims, outcomes, lease extensions,
    /// sweeps, queued mails) take turns here: a writer waiting for SQLite's single write lock
    /// would sleep in its busy handler (1 to 100 ms) instead of being woken when the lock frees.
    /// The checkpointer takes a turn too, to finish a checkpoint (see [`crate::sqlite_writer`]).
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// On SQLite, the connection the write turns use (`None` for an in-memory database, whose
    /// turns use the host's pool): see [`crate::sqlite_writer::open_writer`].
    writer: tokio::sync::OnceCell<Option<crate::sqlite_writer::Writer>>,
    /// Since when this process has reached the database without a failure: set by a sweep
    /// that got through, cleared by any error that says the database could not be reached
    /// (`None` at start). The sweep takes no claim over until it has held for a while
    /// ([`Shared::db_steady_for`]).
    reachable_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// When the sweep last deleted the texts of mails past the retention.
    pub last_prune: std::sync::Mutex<Option<std::time::Instant>>,
    /// Queued mails waiting to be stored with those of concurrent requests.
    pub inserts: Inserts,
}

impl Shared {
    /// Fresh shared state.
    pub fn new(options: ModuleOptions) -> Arc<Self> {
        let http = crate::connect::token_client::http_client(options.token_timeout);
        let suffix: u32 = rand::random();
        let instance = format!("{}-{suffix:08x}", std::process::id());
        // A crashed process's connection slots come free after this long.
        let slot_lease = std::time::Duration::from_secs(options.lease_secs.clamp(2, 120) as u64);
        let concurrency = options.delivery_concurrency;
        let smtp = Arc::new(SmtpSender::new(&instance, slot_lease, options.smtp_timeout));
        Arc::new(Self {
            options,
            metrics: crate::metrics::Metrics::new(),
            queue: RwLock::new(None),
            graph: crate::delivery::graph::GraphSender::new(smtp.clone()),
            smtp,
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
            active: std::sync::Mutex::new(std::collections::HashMap::new()),
            drain_permits: Arc::new(tokio::sync::Semaphore::new(Ord::max(concurrency, 1))),
            body_budget: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BODY_KIB as usize)),
            wake_tx: std::sync::Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(true),
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
            writer: tokio::sync::OnceCell::new(),
            reachable_since: std::sync::Mutex::new(None),
            last_prune: std::sync::Mutex::new(None),
            inserts: Default::default(),
        })
    }

    /// Notes `e` if it says the database could not be reached
    /// ([`crate::reach::is_unreachable`]): the steady time starts again from the next sweep
    /// that gets through.
    pub fn note_db_error(&self, e: &sea_orm::DbErr) {
        if crate::reach::is_unreachable(e) {
            *self
                .reachable_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Notes that a sweep reached the database (the steady time starts now if it had not).
    pub fn note_db_reached(&self) {
        self.reachable_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(std::time::Instant::now);
    }

    /// How long this process has reached the database without a failure, counted from the
    /// first sweep that got through after the last failure (zero before any).
    pub fn db_steady_for(&self) -> std::time::Duration {
        self.reachable_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(std::time::Duration::ZERO, |since| since.elapsed())
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
        let fresh =
            crate::entities::by_key::<crate::entities::mail_server::Entity, _>(ctx.db(), id)
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

    /// Whether this process delivers mail now (its workers run).
    pub fn delivers_here(&self) -> bool {
        self.options.workers && self.queue().is_some()
    }

    /// Whether this process is stopping its drains (they end after their current batch).
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for this process's turn to write on SQLite (at once on PostgreSQL, whose writers
    /// do not exclude each other); the turn lasts as long as the value, and its statements go
    /// to [`WriteTurn::db`].
    pub async fn write_gate(&self, ctx: &crm_sdk::ModuleContext) -> WriteTurn {
        if ctx.db().get_database_backend() != sea_orm::DbBackend::Sqlite {
            return WriteTurn::on_pool(ctx.db());
        }
        let turn = self.write_gate.clone().lock_owned().await;
        let writer = self
            .writer
            .get_or_init(|| crate::sqlite_writer::open_writer(ctx.db(), self.write_gate.clone()))
            .await;
        WriteTurn::taken(turn, ctx.db(), writer.as_ref())
    }

    /// Whether mail was queued for `server_id` since its running drain here last looked (its
    /// "more mail came" flag, lowered by this call): the drain's next claim takes that mail.
    pub fn take_more(&self, server_id: i32) -> bool {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active
            .get(&server_id)
            .is_some_and(|more| more.swap(false, std::sync::atomic::Ordering::SeqCst))
    }

    /// The mailboxes with a drain in this process now (running or waiting for its turn).
    pub fn draining_here(&self) -> Vec<i32> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.keys().copied().collect()
    }

    /// The flag [`Shared::stopping`] reads, for senders that check it between messages.
    pub fn stopping_flag(&self) -> &std::sync::atomic::AtomicBool {
        &self.stopping
    }

    /// Wakes the drain of `server_id`: in a process that delivers, its drain here starts (or,
    /// running already, takes the new mail in its next batch); elsewhere a drain job is pushed
    /// for the worker processes. Mail nobody drains is found by the sweep.
    pub async fn wake(&self, server_id: i32) {
        self.wake_many(&[server_id]).await;
    }

    /// [`Shared::wake`] for several mailboxes: those this process's dispatcher cannot take (it
    /// is not running) get their drain jobs in one push.
    pub async fn wake_many(&self, server_ids: &[i32]) {
        let rest: Vec<i32> = {
            let tx = self.wake_tx.lock().unwrap_or_else(|e| e.into_inner());
            server_ids
                .iter()
                .copied()
                .filter(|id| tx.as_ref().is_none_or(|tx| tx.send(*id).is_err()))
                .collect()
        };
        if !rest.is_empty() {
            self.push(&rest).await;
        }
    }

    /// Where the dispatcher of this process's drains listens (`None`: it is not running).
    pub fn set_wake(&self, tx: Option<tokio::sync::mpsc::UnboundedSender<i32>>) {
        let stopping = tx.is_none();
        *self.wake_tx.lock().unwrap_or_else(|e| e.into_inner()) = tx;
        self.stopping
            .store(stopping, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts a drain task started by this process (waited for on stop).
    pub fn task_started(&self) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts a drain task of this process as ended.
    pub fn task_ended(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.in_flight_done.notify_waiters();
    }

    /// Waits (at most `limit`) until the drain tasks of this process have finished their
    /// batches; a mail cut off after that keeps its lease and is taken over when it runs out.
    pub async fn drain_in_flight(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let notified = self.in_flight_done.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("drains still running at shutdown; their leases will expire");
                break;
            }
        }
    }

    /// Pushes drain jobs for the mailboxes `server_ids`; when the jobs are stopped, their
    /// mail waits for the sweep.
    pub async fn push(&self, server_ids: &[i32]) {
        if let Some(queue) = self.queue()
            && let Err(e) = queue.push(server_ids).await
        {
            tracing::warn!(error = %e, "pushing drain jobs failed; the sweep will pick the mails up");
        }
    }
}

/// Queued mails waiting to be stored with those of concurrent requests
/// (`outbox::group_insert`), and the turn of the group being written.
#[derive(Default)]
pub struct Inserts {
    pub(crate) pending: std::sync::Mutex<Vec<PendingInsert>>,
    pub(crate) turn: Arc<tokio::sync::Mutex<()>>,
}

/// A mail waiting for its group: where its stored row and server (or why it was refused) go.
pub(crate) struct PendingInsert {
    pub(crate) message_id: String,
    pub(crate) mail: PendingMail,
    pub(crate) done: tokio::sync::oneshot::Sender<
        Result<
            (
                crate::entities::outbox::Model,
                crate::entities::mail_server::Model,
            ),
            crate::outbox::refusal::Refusal,
        >,
    >,
}

/// A mail to store: built already (a test mail through a given server), or to be admitted
/// with its group (`outbox::admit`).
pub(crate) enum PendingMail {
    Built(Box<crate::outbox::admit::Admitted>),
    Admit(Box<crate::outbox::admit::Request>),
}

impl PendingMail {
    /// Its Message-ID (without angle brackets).
    pub(crate) fn message_id(&self) -> &str {
        match self {
            PendingMail::Built(a) => &a.message_id,
            PendingMail::Admit(r) => &r.message_id,
        }
    }

    /// The bytes it holds for its group (the message text or the mail's files).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            PendingMail::Built(a) => a.raw.len(),
            PendingMail::Admit(r) => r.mail.size_bytes(),
        }
    }
}

//! The module's apalis jobs: the nightly token refresh, the client-secret expiry check, the
//! outbox sweep and the drains of mailboxes with due mail. Generic over [`OutlookJobs`], which the plugin
//! implements; the jobs only schedule, queue and retry.

use apalis::prelude::*;
use apalis_cron::{CronScheduler, Tick};
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::oneshot;

pub use apalis::prelude::BoxDynError;

/// The apalis queue that carries mailboxes to drain.
pub const DRAIN_QUEUE: &str = "microsoft_outlook.drain_mailbox";

/// The work the jobs do, implemented by the plugin.
pub trait OutlookJobs: Clone + Send + Sync + 'static {
    /// Refreshes every connected token; returns the summary line.
    fn refresh_tokens(&self) -> impl Future<Output = Result<String, BoxDynError>> + Send;
    /// Warns operators before the client secret expires.
    fn check_client_secret(&self) -> impl Future<Output = Result<(), BoxDynError>> + Send;
    /// Drains one mailbox: sends its due mails, batch after batch (a mailbox being drained in
    /// this process already is only told that more mail came).
    fn drain(&self, server_id: i32) -> impl Future<Output = Result<(), BoxDynError>> + Send;
    /// Wakes the drains of mailboxes with due mail nobody is draining (retries, expired leases).
    fn sweep_outbox(&self) -> impl Future<Output = Result<(), BoxDynError>> + Send;
}

/// An apalis job: drain this mailbox (a job per mailbox with due mail, not per mail).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainMailbox {
    /// The mailbox (mail server id).
    pub server_id: i32,
}

/// The database pool the queue lives in (the same one sea-orm uses).
#[derive(Debug, Clone)]
pub enum QueuePool {
    /// SQLite (embedded default).
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL (several processes).
    Postgres(sqlx::PgPool),
}

/// Why the queue failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Creating the queue's tables failed.
    #[error("setting up the job queue failed: {0}")]
    Setup(String),
    /// Pushing a job failed.
    #[error("queuing a drain job failed: {0}")]
    Push(String),
}

/// Where drain jobs are pushed.
#[derive(Clone)]
pub enum MailQueue {
    /// apalis-sqlite.
    Sqlite(SqliteStorage<DrainMailbox>),
    /// apalis-postgres.
    Postgres(PostgresStorage<DrainMailbox>),
}

fn sqlite_storage(pool: &sqlx::SqlitePool) -> SqliteStorage<DrainMailbox> {
    SqliteStorage::<DrainMailbox>::new(pool)
        .with_config(apalis_sqlite::Config::default().queue(DRAIN_QUEUE))
}

fn postgres_storage(pool: &sqlx::PgPool) -> PostgresStorage<DrainMailbox> {
    PostgresStorage::<DrainMailbox>::new(pool)
        .with_config(apalis_postgres::Config::default().queue(DRAIN_QUEUE))
}

impl MailQueue {
    /// Creates apalis' tables if needed (idempotent) and returns a pusher.
    pub async fn setup(pool: &QueuePool) -> Result<Self, QueueError> {
        match pool {
            QueuePool::Sqlite(p) => {
                SqliteStorage::<()>::setup(p)
                    .await
                    .map_err(|e| QueueError::Setup(e.to_string()))?;
                Ok(MailQueue::Sqlite(sqlite_storage(p)))
            }
            QueuePool::Postgres(p) => {
                PostgresStorage::<()>::setup(p)
                    .await
                    .map_err(|e| QueueError::Setup(e.to_string()))?;
                Ok(MailQueue::Postgres(postgres_storage(p)))
            }
        }
    }

    /// Pushes one drain job per mailbox.
    pub async fn push(&self, server_ids: &[i32]) -> Result<(), QueueError> {
        let tasks: Vec<_> = server_ids
            .iter()
            .map(|id| {
                TaskBuilder::new(DrainMailbox { server_id: *id })
                    .max_attempts(3)
                    .build()
            })
            .collect();
        let mut stream = futures::stream::iter(tasks);
        match self {
            MailQueue::Sqlite(s) => s
                .clone()
                .push_all(&mut stream)
                .await
                .map_err(|e| QueueError::Push(e.to_string())),
            MailQueue::Postgres(s) => s
                .clone()
                .push_all(&mut stream)
                .await
                .map_err(|e| QueueError::Push(e.to_string())),
        }
    }
}

/// When the scheduled jobs run (cron expressions with a seconds field), and how many mails at once.
#[derive(Debug, Clone)]
pub struct Schedules {
    /// The token refresh (default nightly 03:00).
    pub refresh_tokens: String,
    /// The client-secret expiry check (default daily 08:00).
    pub check_client_secret: String,
    /// The outbox sweep (default every 10 seconds).
    pub sweep_outbox: String,
    /// Mailboxes drained concurrently by this process.
    pub delivery_concurrency: usize,
    /// A unique suffix for this process's worker names.
    pub instance: String,
}

/// Why the jobs could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A schedule is not a cron expression.
    #[error("the schedule of {job} is not a valid cron expression: {message}")]
    Schedule {
        /// The job.
        job: &'static str,
        /// The parser's message.
        message: String,
    },
}

async fn refresh_tick<S: OutlookJobs>(_tick: Tick, svc: Data<S>) -> Result<(), BoxDynError> {
    let summary = svc.refresh_tokens().await?;
    tracing::info!(target: "microsoft_outlook::jobs", "{summary}");
    Ok(())
}

async fn secret_tick<S: OutlookJobs>(_tick: Tick, svc: Data<S>) -> Result<(), BoxDynError> {
    svc.check_client_secret().await
}

async fn sweep_tick<S: OutlookJobs>(_tick: Tick, svc: Data<S>) -> Result<(), BoxDynError> {
    svc.sweep_outbox().await
}

async fn drain_job<S: OutlookJobs>(job: DrainMailbox, svc: Data<S>) -> Result<(), BoxDynError> {
    svc.drain(job.server_id).await
}

/// A worker's name for its `restarts`-th run (names must not repeat within a queue).
fn run_name(name: &str, restarts: usize) -> String {
    if restarts == 0 {
        name.to_string()
    } else {
        format!("{name}.restart{restarts}")
    }
}

fn schedule(job: &'static str, text: &str) -> Result<cron::Schedule, StartError> {
    cron::Schedule::from_str(text).map_err(|e| StartError::Schedule {
        job,
        message: e.to_string(),
    })
}

/// The running jobs; [`RunningJobs::stop`] ends them gracefully.
pub struct RunningJobs {
    names: Vec<String>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl RunningJobs {
    /// The names of the running workers.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Signals shutdown and waits until in-flight jobs have finished.
    pub fn stop(self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = self.stop.send(());
            let _ = self.done.await;
        })
    }
}

/// Starts the cron workers and the drain workers on an apalis monitor.
pub fn start<S: OutlookJobs>(
    svc: S,
    schedules: &Schedules,
    pool: &QueuePool,
) -> Result<RunningJobs, StartError> {
    let refresh = schedule("refresh_tokens", &schedules.refresh_tokens)?;
    let secret = schedule("check_client_secret", &schedules.check_client_secret)?;
    let sweep = schedule("sweep_outbox", &schedules.sweep_outbox)?;
    let name = |job: &str| format!("microsoft_outlook.{job}.{}", schedules.instance);
    let names = vec![
        name("refresh_tokens"),
        name("check_client_secret"),
        name("sweep_outbox"),
        name("drain_mailbox"),
    ];
    let concurrency = schedules.delivery_concurrency.max(1);
    let (stop, stopped) = oneshot::channel::<()>();
    let (n0, n1, n2, n3) = (
        names[0].clone(),
        names[1].clone(),
        names[2].clone(),
        names[3].clone(),
    );
    let (s0, s1, s2, s3) = (svc.clone(), svc.clone(), svc.clone(), svc);
    let monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(run_name(&n0, restarts))
                .backend(CronScheduler::new(refresh.clone()))
                .data(s0.clone())
                .concurrency(1)
                .build(refresh_tick::<S>)
        })
        .register(move |restarts| {
            WorkerBuilder::new(run_name(&n1, restarts))
                .backend(CronScheduler::new(secret.clone()))
                .data(s1.clone())
                .concurrency(1)
                .build(secret_tick::<S>)
        })
        .register(move |restarts| {
            WorkerBuilder::new(run_name(&n2, restarts))
                .backend(CronScheduler::new(sweep.clone()))
                .data(s2.clone())
                .concurrency(1)
                .build(sweep_tick::<S>)
        });
    let monitor = match pool {
        QueuePool::Sqlite(p) => {
            let p = p.clone();
            monitor.register(move |restarts| {
                WorkerBuilder::new(run_name(&n3, restarts))
                    .backend(sqlite_storage(&p).poll_with_interval(Duration::from_millis(200)))
                    .data(s3.clone())
                    .concurrency(concurrency)
                    .parallelize(tokio::spawn)
                    .build(drain_job::<S>)
            })
        }
        QueuePool::Postgres(p) => {
            let p = p.clone();
            monitor.register(move |restarts| {
                WorkerBuilder::new(run_name(&n3, restarts))
                    .backend(postgres_storage(&p).with_pubsub())
                    .data(s3.clone())
                    .concurrency(concurrency)
                    .parallelize(tokio::spawn)
                    .build(drain_job::<S>)
            })
        }
    }
    .shutdown_timeout(Duration::from_secs(30))
    // A cron worker whose job outlasted the interval (a slow or restarting database) finds its
    // next tick in the past and ends with an error; a worker whose backend failed ends too.
    // Either way it starts again: the jobs must never silently stop.
    .should_restart(|worker, error| {
        tracing::warn!(worker = %worker.name(), %error, "a microsoft_outlook worker stopped; restarting it");
        true
    });
    let done = tokio::spawn(async move {
        let signal = async move {
            let _ = stopped.await;
            Ok(())
        };
        if let Err(e) = monitor.run_with_signal(signal).await {
            tracing::error!(error = %e, "the microsoft_outlook jobs stopped with an error");
        }
    });
    Ok(RunningJobs { names, stop, done })
}

//! The module's apalis jobs: the nightly token refresh, the client-secret expiry check, and
//! the outbound mail workers. Generic over [`OutlookJobs`], which the plugin implements.

use apalis::prelude::*;
use apalis_cron::{CronScheduler, Tick};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::oneshot;

pub use apalis::prelude::BoxDynError;

/// The work the jobs do, implemented by the plugin (jobs only schedule and retry).
pub trait OutlookJobs: Clone + Send + Sync + 'static {
    /// Refreshes every connected token; returns the summary line.
    fn refresh_tokens(&self) -> impl Future<Output = Result<String, BoxDynError>> + Send;
    /// Warns operators before the client secret expires.
    fn check_client_secret(&self) -> impl Future<Output = Result<(), BoxDynError>> + Send;
}

/// When the scheduled jobs run (cron expressions with a seconds field).
#[derive(Debug, Clone)]
pub struct Schedules {
    /// The token refresh (default nightly 03:00).
    pub refresh_tokens: String,
    /// The client-secret expiry check (default daily 08:00).
    pub check_client_secret: String,
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

/// A tick of a cron job, as carried through a persistent queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduledRun;

async fn refresh_tick<S: OutlookJobs>(_tick: Tick, svc: Data<S>) -> Result<(), BoxDynError> {
    let summary = svc.refresh_tokens().await?;
    tracing::info!(target: "microsoft_outlook::jobs", "{summary}");
    Ok(())
}

async fn secret_tick<S: OutlookJobs>(_tick: Tick, svc: Data<S>) -> Result<(), BoxDynError> {
    svc.check_client_secret().await
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

/// Starts the cron workers on an apalis monitor.
pub fn start<S: OutlookJobs>(svc: S, schedules: &Schedules) -> Result<RunningJobs, StartError> {
    let refresh = schedule("refresh_tokens", &schedules.refresh_tokens)?;
    let secret = schedule("check_client_secret", &schedules.check_client_secret)?;
    let names = vec![
        "microsoft_outlook.refresh_tokens".to_string(),
        "microsoft_outlook.check_client_secret".to_string(),
    ];
    let (stop, stopped) = oneshot::channel::<()>();
    let refresh_svc = svc.clone();
    let monitor = Monitor::new()
        .register(move |_| {
            WorkerBuilder::new("microsoft_outlook.refresh_tokens")
                .backend(CronScheduler::new(refresh.clone()))
                .data(refresh_svc.clone())
                .build(refresh_tick::<S>)
        })
        .register(move |_| {
            WorkerBuilder::new("microsoft_outlook.check_client_secret")
                .backend(CronScheduler::new(secret.clone()))
                .data(svc.clone())
                .build(secret_tick::<S>)
        })
        .shutdown_timeout(Duration::from_secs(30));
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

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
}

impl Default for ModuleOptions {
    fn default() -> Self {
        Self {
            sweep_schedule: "*/10 * * * * *".into(),
            delivery_concurrency: 16,
            lease_secs: 300,
            retry_base_secs: 60,
        }
    }
}

/// State shared by routes and jobs.
pub struct Shared {
    /// The tunables.
    pub options: ModuleOptions,
    /// Where delivery jobs are pushed (set while the jobs run).
    pub queue: RwLock<Option<MailQueue>>,
    /// The SMTP client.
    pub smtp: SmtpSender,
    /// The identity platform's HTTP client.
    pub http: oauth2::reqwest::Client,
    /// This process's name for leases and workers.
    pub instance: String,
}

impl Shared {
    /// Fresh shared state.
    pub fn new(options: ModuleOptions) -> Arc<Self> {
        let suffix: u32 = rand::random();
        Arc::new(Self {
            options,
            queue: RwLock::new(None),
            smtp: SmtpSender::new(),
            http: crate::token_client::http_client(),
            instance: format!("{}-{suffix:08x}", std::process::id()),
        })
    }

    /// The queue, when the jobs run.
    pub fn queue(&self) -> Option<MailQueue> {
        self.queue.read().unwrap_or_else(|e| e.into_inner()).clone()
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

//! Layered configuration: defaults, then a TOML file, then `CRM_` environment variables.

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The host's configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Address to listen on (`CRM_BIND`).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// `sqlite://...` or `postgres://...` (`CRM_DATABASE_URL`).
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// Connections in the database pool (`CRM_DATABASE_MAX_CONNECTIONS`).
    #[serde(default = "default_max_connections")]
    pub database_max_connections: u32,
    /// The URL people and Microsoft reach the CRM at (`CRM_PUBLIC_BASE_URL`); never guessed.
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// The sealing key, base64 of 32 bytes (`CRM_SEALING_KEY`).
    #[serde(default)]
    pub sealing_key: Option<SecretString>,
    /// A file holding the sealing key (`CRM_SEALING_KEY_FILE`).
    #[serde(default)]
    pub sealing_key_file: Option<PathBuf>,
    /// Log filter, e.g. `info` or `crm_host=debug` (`CRM_LOG`).
    #[serde(default = "default_log")]
    pub log: String,
    /// Worker threads of the HTTP server (`CRM_HTTP_WORKERS`); 0 = one per core.
    #[serde(default)]
    pub http_workers: usize,
    /// Seconds between checks of which modules are enabled, for several processes on one database.
    #[serde(default = "default_module_sync_secs")]
    pub module_sync_secs: u64,
    /// The bearer token a scraper presents to read `GET /metrics` (`CRM_METRICS_TOKEN`); without
    /// it only signed-in operators may read them.
    #[serde(default)]
    pub metrics_token: Option<SecretString>,
    /// Tunables of the microsoft_outlook module's workers (`CRM_OUTLOOK__...`).
    #[serde(default)]
    pub outlook: OutlookTuning,
}

/// Tunables of the microsoft_outlook module's workers; each has a sensible default.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OutlookTuning {
    /// Seconds a worker owns a claimed mail; after a crash others take it over once it ran out
    /// (`CRM_OUTLOOK__LEASE_SECS`, default 300).
    pub lease_secs: Option<i64>,
    /// Mails delivered at once by this process (`CRM_OUTLOOK__DELIVERY_CONCURRENCY`, default 16).
    pub delivery_concurrency: Option<usize>,
    /// When the outbox sweep runs (`CRM_OUTLOOK__SWEEP_SCHEDULE`, default every 10 seconds).
    pub sweep_schedule: Option<String>,
    /// The first retry delay in seconds (`CRM_OUTLOOK__RETRY_BASE_SECS`, default 60).
    pub retry_base_secs: Option<i64>,
    /// Seconds one request to Microsoft's token endpoint may take (`CRM_OUTLOOK__TOKEN_TIMEOUT_SECS`,
    /// default 20).
    pub token_timeout_secs: Option<u64>,
    /// Seconds an SMTP server may take to open a connection (connect to AUTH), and over one
    /// mail's whole transaction including its content, before the connection is given up and
    /// the attempt counts as a network failure (`CRM_OUTLOOK__SMTP_TIMEOUT_SECS`, default 60).
    pub smtp_timeout_secs: Option<u64>,
    /// Whether this process delivers mail and runs the scheduled jobs (`CRM_OUTLOOK__WORKERS`,
    /// default true). `false` makes a web-only process: it serves pages and queues mail, and
    /// the worker processes on the same database deliver it.
    pub workers: Option<bool>,
}

fn default_bind() -> String {
    "127.0.0.1:8080".into()
}
fn default_database_url() -> String {
    "sqlite://data/crm.db?mode=rwc".into()
}
fn default_max_connections() -> u32 {
    8
}
fn default_log() -> String {
    "info".into()
}
fn default_module_sync_secs() -> u64 {
    10
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            database_url: default_database_url(),
            database_max_connections: default_max_connections(),
            public_base_url: None,
            sealing_key: None,
            sealing_key_file: None,
            log: default_log(),
            http_workers: 0,
            module_sync_secs: default_module_sync_secs(),
            metrics_token: None,
            outlook: OutlookTuning::default(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if given and present), then `CRM_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        } else {
            figment = figment.merge(Toml::file("crm.toml"));
        }
        figment
            .merge(Env::prefixed("CRM_").split("__"))
            .extract()
            .map_err(Box::new)
    }

    /// The public base URL, defaulting to `http://` + the bind address.
    pub fn public_base_url(&self) -> Result<url::Url, String> {
        let raw = self
            .public_base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.bind));
        let url = url::Url::parse(&raw)
            .map_err(|e| format!("CRM_PUBLIC_BASE_URL `{raw}` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!(
                "CRM_PUBLIC_BASE_URL `{raw}` must be an http(s) URL with a host"
            ));
        }
        Ok(url)
    }
}

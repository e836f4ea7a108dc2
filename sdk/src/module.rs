use actix_web::web::ServiceConfig;
use async_trait::async_trait;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DbErr};
use std::collections::BTreeMap;

use crate::{CurrentUser, Manifest, ModuleContext, RecordRef};

/// Any error, boxed, for contract methods whose errors the host only reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A settings value refused by a module, for the form to show beside the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's id.
    pub field: String,
    /// What is wrong, for the operator.
    pub message: String,
}

/// A line the settings page shows under a module's section (e.g. the redirect URI to register).
#[derive(Debug, Clone)]
pub struct SettingsHint {
    /// What the value is.
    pub label: String,
    /// The value itself, shown verbatim for copying.
    pub value: String,
}

/// What a module found when it checked saved settings against the outside world (e.g. the
/// client ID and secret against the identity platform's token endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsCheck {
    /// Whether the settings work (`Some(true)`), do not (`Some(false)`), or could not be checked.
    pub verified: Option<bool>,
    /// One line saying what was found.
    pub title: String,
    /// What it means and what to do, in words.
    pub detail: String,
    /// The outside system's code, shown beside the words (e.g. `AADSTS7000215`).
    pub code: Option<String>,
    /// The next step as a link: its words and a path on this CRM (e.g. `("Add the outgoing
    /// mail server", "/microsoft_outlook/servers/new")`).
    pub next: Option<(String, String)>,
}

/// The running jobs of an enabled module; the host stops them on disable or shutdown.
pub struct JobsHandle {
    names: Vec<String>,
    stop: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

impl std::fmt::Debug for JobsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobsHandle")
            .field("names", &self.names)
            .finish()
    }
}

impl JobsHandle {
    /// A handle for jobs named `names`, stopped by running `stop` to completion.
    pub fn new(
        names: Vec<String>,
        stop: impl FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        Self {
            names,
            stop: Some(Box::new(stop)),
        }
    }

    /// A handle for a module without jobs.
    pub fn none() -> Self {
        Self {
            names: Vec::new(),
            stop: None,
        }
    }

    /// The names of the running jobs.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Stops the jobs gracefully: in-flight work finishes or is released.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop().await;
        }
    }
}

/// A static file of a module ([`Module::static_assets`]).
#[derive(Debug, Clone, Copy)]
pub struct StaticAsset {
    /// Its path under the module's route prefix (`/assets/copy.js`).
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its content.
    pub body: &'static str,
}

/// A CRM module, linked into the host and enabled or disabled by an operator at run time.
#[async_trait]
pub trait Module: Send + Sync + 'static {
    /// The module's validated manifest.
    fn manifest(&self) -> &Manifest;

    /// The names of the module's migrations, in order (for the modules page).
    fn migration_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Applies the module's pending migrations; must be idempotent.
    async fn migrate(&self, _db: &DatabaseConnection) -> Result<(), DbErr> {
        Ok(())
    }

    /// Cross-field checks of settings the host has already validated field by field. `values`
    /// holds the plain fields and the secret fields typed in this submission (a secret left
    /// empty to keep the stored one is absent); nothing is saved when errors are returned.
    fn validate_settings(&self, _values: &BTreeMap<String, String>) -> Vec<FieldError> {
        Vec::new()
    }

    /// Called after an operator saved the module's settings, while the module is enabled
    /// (e.g. to release work that waited for a fixed client secret), with what
    /// [`Module::verify_settings`] found just before: work that waits for settings the check
    /// refuted (`verified == Some(false)`) should go on waiting.
    async fn settings_saved(&self, _ctx: &ModuleContext, _check: Option<&SettingsCheck>) {}

    /// Checks the saved settings against the outside world after a save (the host shows the
    /// result on the settings page); `None` when the module has nothing to check.
    async fn verify_settings(&self, _ctx: &ModuleContext) -> Option<SettingsCheck> {
        None
    }

    /// An HTML fragment (escaped by the module) the settings page shows above the module's
    /// fields: a setup guide, warnings such as an expiring secret.
    async fn settings_guide(&self, _ctx: &ModuleContext) -> Option<String> {
        None
    }

    /// What disabling the module leaves behind, in words, for the confirmation page
    /// (e.g. "12 queued mails stay queued until it is enabled again").
    async fn disable_consequences(&self, _ctx: &ModuleContext) -> Vec<String> {
        Vec::new()
    }

    /// Lines the settings page shows under the module's section.
    async fn settings_hints(&self, _ctx: &ModuleContext) -> Vec<SettingsHint> {
        Vec::new()
    }

    /// An HTML fragment the host shows on a record's page (e.g. "send a mail"), if any.
    async fn record_panel(
        &self,
        _ctx: &ModuleContext,
        _record: &RecordRef,
        _user: &CurrentUser,
    ) -> Option<String> {
        None
    }

    /// The module's metrics in the Prometheus text format, for the host's `GET /metrics`
    /// (`None`: the module has none, or they cannot be read now).
    async fn metrics(&self, _ctx: &ModuleContext) -> Option<String> {
        None
    }

    /// Registers the module's routes; the host mounts them under the manifest's prefix.
    fn configure(&self, _cfg: &mut ServiceConfig, _ctx: &ModuleContext) {}

    /// Static files the host serves under the manifest's prefix whether the module is enabled
    /// or not: what the settings page uses before the module is enabled (a script: the
    /// Content-Security-Policy allows no inline one). Paths start with `/`.
    fn static_assets(&self) -> Vec<StaticAsset> {
        Vec::new()
    }

    /// Starts the module's workers and schedules.
    async fn start(&self, _ctx: &ModuleContext) -> Result<JobsHandle, BoxError> {
        Ok(JobsHandle::none())
    }
}

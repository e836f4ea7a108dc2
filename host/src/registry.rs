//! The linked modules and their run-time state: enabled or not, jobs running or not.

use chrono::Utc;
use crm_sdk::{JobsHandle, Module, ModuleContext};
use sea_orm::sea_query::OnConflict;
use sea_orm::{DatabaseConnection, EntityTrait, Set};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Mutex;

use crate::entities::module_state;

/// Why a module could not be enabled or disabled.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No linked module has this id.
    #[error("no module `{0}` is linked into this CRM")]
    Unknown(String),
    /// Its migrations failed.
    #[error("the module's migrations failed: {0}")]
    Migration(String),
    /// Its jobs did not start.
    #[error("the module's jobs did not start: {0}")]
    Start(String),
    /// The database did not answer.
    #[error("the database did not answer: {0}")]
    Database(#[from] sea_orm::DbErr),
}

/// One linked module.
pub struct ModuleEntry {
    /// The module.
    pub module: Arc<dyn Module>,
    /// Its context.
    pub ctx: ModuleContext,
    /// Whether its routes answer and its jobs run.
    pub enabled: Arc<AtomicBool>,
    jobs: Mutex<Option<JobsHandle>>,
}

impl ModuleEntry {
    /// Wraps a module and its context, disabled.
    pub fn new(module: Arc<dyn Module>, ctx: ModuleContext, enabled: Arc<AtomicBool>) -> Self {
        Self {
            module,
            ctx,
            enabled,
            jobs: Mutex::new(None),
        }
    }

    /// The module's id.
    pub fn id(&self) -> &str {
        &self.module.manifest().id
    }

    /// Whether it is enabled now.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// The names of its running jobs (empty when stopped).
    pub async fn running_jobs(&self) -> Vec<String> {
        self.jobs
            .lock()
            .await
            .as_ref()
            .map(|h| h.names().to_vec())
            .unwrap_or_default()
    }

    async fn start(&self) -> Result<(), RegistryError> {
        let mut jobs = self.jobs.lock().await;
        self.module
            .migrate(self.ctx.db())
            .await
            .map_err(|e| RegistryError::Migration(e.to_string()))?;
        if jobs.is_none() {
            let handle = self
                .module
                .start(&self.ctx)
                .await
                .map_err(|e| RegistryError::Start(e.to_string()))?;
            *jobs = Some(handle);
        }
        self.enabled.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        let handle = self.jobs.lock().await.take();
        if let Some(handle) = handle {
            handle.stop().await;
        }
    }
}

/// Every linked module.
pub struct Registry {
    db: DatabaseConnection,
    entries: Vec<ModuleEntry>,
}

impl Registry {
    /// A registry of these entries.
    pub fn new(db: DatabaseConnection, entries: Vec<ModuleEntry>) -> Self {
        Self { db, entries }
    }

    /// All linked modules.
    pub fn entries(&self) -> &[ModuleEntry] {
        &self.entries
    }

    /// The module `id`.
    pub fn get(&self, id: &str) -> Option<&ModuleEntry> {
        self.entries.iter().find(|e| e.id() == id)
    }

    async fn persist(&self, id: &str, enabled: bool) -> Result<(), sea_orm::DbErr> {
        module_state::Entity::insert(module_state::ActiveModel {
            id: Set(id.to_string()),
            enabled: Set(enabled),
            changed_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::column(module_state::Column::Id)
                .update_columns([
                    module_state::Column::Enabled,
                    module_state::Column::ChangedAt,
                ])
                .to_owned(),
        )
        .exec(&self.db)
        .await
        .map(|_| ())
    }

    /// Enables `id`: runs its migrations, starts its jobs, remembers the choice.
    pub async fn enable(&self, id: &str) -> Result<(), RegistryError> {
        let entry = self
            .get(id)
            .ok_or_else(|| RegistryError::Unknown(id.into()))?;
        entry.start().await?;
        self.persist(id, true).await?;
        tracing::info!(module = id, "module enabled");
        Ok(())
    }

    /// Disables `id`: its routes answer 404 and its jobs stop gracefully; its data stays.
    pub async fn disable(&self, id: &str) -> Result<(), RegistryError> {
        let entry = self
            .get(id)
            .ok_or_else(|| RegistryError::Unknown(id.into()))?;
        self.persist(id, false).await?;
        entry.stop().await;
        tracing::info!(module = id, "module disabled");
        Ok(())
    }

    /// Brings every module to the state stored in the database (at start-up, and
    /// periodically so that several processes on one database agree).
    pub async fn sync(&self) -> Result<(), RegistryError> {
        let stored = module_state::Entity::find().all(&self.db).await?;
        for entry in &self.entries {
            let want = stored.iter().any(|s| s.id == entry.id() && s.enabled);
            if want && !entry.is_enabled() {
                entry.start().await?;
                tracing::info!(module = entry.id(), "module resumed");
            } else if !want && entry.is_enabled() {
                entry.stop().await;
                tracing::info!(module = entry.id(), "module stopped (disabled elsewhere)");
            }
        }
        Ok(())
    }

    /// Restarts the jobs of an enabled module, so that changed settings (schedules) apply now.
    pub async fn restart_jobs(&self, id: &str) -> Result<(), RegistryError> {
        let entry = self
            .get(id)
            .ok_or_else(|| RegistryError::Unknown(id.into()))?;
        if !entry.is_enabled() {
            return Ok(());
        }
        let mut jobs = entry.jobs.lock().await;
        if let Some(handle) = jobs.take() {
            handle.stop().await;
        }
        let handle = entry
            .module
            .start(&entry.ctx)
            .await
            .map_err(|e| RegistryError::Start(e.to_string()))?;
        *jobs = Some(handle);
        tracing::info!(module = id, "module jobs restarted with the new settings");
        Ok(())
    }

    /// Stops every module's jobs (shutdown); the stored choices stay.
    pub async fn shutdown(&self) {
        for entry in &self.entries {
            let handle = entry.jobs.lock().await.take();
            if let Some(handle) = handle {
                handle.stop().await;
            }
        }
    }
}

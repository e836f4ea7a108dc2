use sea_orm::DatabaseConnection;
use std::sync::Arc;
use url::Url;

use crate::{Chrome, Clock, CurrentUser, Notifier, RecordDirectory, Sealer, SettingsStore};

/// Everything the host gives a module: database, settings, base URL, records, notifier, clock.
#[derive(Clone)]
pub struct ModuleContext {
    inner: Arc<Inner>,
}

struct Inner {
    module_id: String,
    db: DatabaseConnection,
    public_base_url: Url,
    settings: Arc<dyn SettingsStore>,
    records: Arc<dyn RecordDirectory>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    sealer: Sealer,
    chrome: Arc<dyn Chrome>,
}

impl std::fmt::Debug for ModuleContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleContext")
            .field("module_id", &self.inner.module_id)
            .field("public_base_url", &self.inner.public_base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl ModuleContext {
    /// Assembles a context (the host does this once per module).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        module_id: impl Into<String>,
        db: DatabaseConnection,
        public_base_url: Url,
        settings: Arc<dyn SettingsStore>,
        records: Arc<dyn RecordDirectory>,
        notifier: Arc<dyn Notifier>,
        clock: Arc<dyn Clock>,
        sealer: Sealer,
        chrome: Arc<dyn Chrome>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                module_id: module_id.into(),
                db,
                public_base_url,
                settings,
                records,
                notifier,
                clock,
                sealer,
                chrome,
            }),
        }
    }

    /// A copy of this context that reads its settings from `settings` instead (e.g. settings
    /// being checked before they are stored); everything else is shared with this one.
    pub fn with_settings(&self, settings: Arc<dyn SettingsStore>) -> Self {
        let i = &self.inner;
        Self::new(
            i.module_id.clone(),
            i.db.clone(),
            i.public_base_url.clone(),
            settings,
            i.records.clone(),
            i.notifier.clone(),
            i.clock.clone(),
            i.sealer.clone(),
            i.chrome.clone(),
        )
    }

    /// The module's id.
    pub fn module_id(&self) -> &str {
        &self.inner.module_id
    }

    /// The shared database connection (sea-orm).
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// The CRM's public base URL, from configuration (never from request headers).
    pub fn public_base_url(&self) -> &Url {
        &self.inner.public_base_url
    }

    /// An absolute URL for `path` under the public base URL.
    pub fn public_url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.inner.public_base_url.as_str().trim_end_matches('/'),
            path
        )
    }

    /// The host's settings storage.
    pub fn settings(&self) -> &dyn SettingsStore {
        self.inner.settings.as_ref()
    }

    /// The host's records.
    pub fn records(&self) -> &dyn RecordDirectory {
        self.inner.records.as_ref()
    }

    /// The host's notifier.
    pub fn notifier(&self) -> &dyn Notifier {
        self.inner.notifier.as_ref()
    }

    /// The host's clock.
    pub fn clock(&self) -> &dyn Clock {
        self.inner.clock.as_ref()
    }

    /// The sealer for secrets the module stores in its own tables.
    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// A full HTML page in the host's frame around `body`.
    pub fn page(&self, title: &str, user: Option<&CurrentUser>, body: &str) -> String {
        self.inner.chrome.page(title, user, body)
    }
}

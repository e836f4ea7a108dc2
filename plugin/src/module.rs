//! `impl Module`: what the host sees of the module.

use async_trait::async_trait;
use crm_sdk::{BoxError, FieldError, JobsHandle, Manifest, Module, ModuleContext, SettingsCheck};
use microsoft_outlook_migrations::Migrator;
use sea_orm::{DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;
use std::collections::BTreeMap;

/// The manifest as shipped with the module.
pub const MANIFEST_TOML: &str = include_str!("../../manifest.toml");

/// The path of the OAuth2 redirect (callback) under the public base URL.
pub const CONFIRM_PATH: &str = "/microsoft_outlook/confirm";

/// The module.
pub struct OutlookModule {
    manifest: Manifest,
    shared: std::sync::Arc<crate::runtime::Shared>,
}

impl OutlookModule {
    /// The module with its shipped manifest; panics at start-up if that manifest is invalid.
    pub fn new() -> Self {
        match Self::from_manifest(MANIFEST_TOML) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// The module with another manifest (checked), for hosts that override it and for tests.
    pub fn from_manifest(text: &str) -> Result<Self, crm_sdk::ManifestError> {
        Ok(Self {
            manifest: Manifest::parse(text)?,
            shared: crate::runtime::Shared::new(crate::runtime::ModuleOptions::default()),
        })
    }

    /// The module with other tunables (tests, benchmarks).
    pub fn with_options(options: crate::runtime::ModuleOptions) -> Self {
        let mut module = Self::new();
        module.shared = crate::runtime::Shared::new(options);
        module
    }

    /// The state shared by the module's routes and jobs.
    pub fn shared(&self) -> std::sync::Arc<crate::runtime::Shared> {
        self.shared.clone()
    }
}

impl Default for OutlookModule {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Module for OutlookModule {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn migration_names(&self) -> Vec<String> {
        Migrator::migrations()
            .iter()
            .map(|m| m.name().to_string())
            .collect()
    }

    async fn migrate(&self, db: &DatabaseConnection) -> Result<(), DbErr> {
        Migrator::up(db, None).await
    }

    async fn settings_saved(&self, ctx: &ModuleContext, check: Option<&SettingsCheck>) {
        // Saved settings apply at once in this process (other processes read them within
        // two seconds), and end the holds that waited for them, unless Microsoft just refused
        // them again: the holds (and the notices that told of them) then stay as they are.
        *self.shared.limits.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(refused) = check.filter(|c| c.verified == Some(false)) {
            tracing::info!(code = ?refused.code, "settings saved but refused: held mailboxes stay held");
            return;
        }
        let reasons: Vec<crate::delivery::classify::HoldReason> =
            crate::delivery::classify::HoldReason::ALL
                .into_iter()
                .filter(|r| r.ends_on_settings_saved())
                .collect();
        match crate::delivery::release::release_reasons(ctx, &self.shared, &reasons).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(mailboxes = n, "settings saved: held mailboxes released"),
            Err(e) => {
                tracing::warn!(error = %e, "releasing held mailboxes after a settings save failed")
            }
        }
    }

    fn validate_settings(&self, values: &BTreeMap<String, String>) -> Vec<FieldError> {
        let mut errors = crate::web::setup_guide::secret_field_errors(values);
        if let Some(url) = values.get("authority_url").filter(|u| !u.is_empty())
            && url.starts_with("http://")
            && !is_loopback_url(url)
        {
            errors.push(FieldError {
                field: "authority_url".into(),
                message:
                    "must use https (plain http is only accepted for a loopback test authority)"
                        .into(),
            });
        }
        // Graph gets the bearer tokens: never over plain http beyond this machine.
        if let Some(url) = values.get("graph_url").filter(|u| !u.is_empty())
            && url.starts_with("http://")
            && !is_loopback_url(url)
        {
            errors.push(FieldError {
                field: "graph_url".into(),
                message: "must use https (plain http is only accepted for a loopback test Graph)"
                    .into(),
            });
        }
        if let Some(hosts) = values.get("personal_smtp_hosts")
            && let Err(problem) = crate::settings::PersonalSmtpHosts::parse(hosts)
        {
            errors.push(FieldError {
                field: "personal_smtp_hosts".into(),
                message: problem,
            });
        }
        errors
    }

    fn configure(&self, cfg: &mut actix_web::web::ServiceConfig, ctx: &ModuleContext) {
        cfg.app_data(actix_web::web::Data::new(ctx.clone()))
            .app_data(actix_web::web::Data::from(self.shared.clone()))
            .configure(crate::web::pages::routes)
            .configure(crate::connect::confirm::routes)
            .configure(crate::connect::oauth::routes)
            .configure(crate::web::mail_routes::routes)
            .configure(crate::web::outbox_page::routes)
            .configure(crate::web::test_connection::routes);
    }

    fn static_assets(&self) -> Vec<crm_sdk::StaticAsset> {
        // The settings page's copy buttons work before the module is enabled.
        vec![crm_sdk::StaticAsset {
            path: "/assets/copy.js",
            content_type: "text/javascript; charset=utf-8",
            body: crate::web::setup_guide::COPY_SCRIPT,
        }]
    }

    async fn start(&self, ctx: &ModuleContext) -> Result<JobsHandle, BoxError> {
        // Started after settings were saved: read them afresh.
        *self.shared.limits.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let settings = ctx.settings().load(ctx.module_id()).await.ok();
        let schedule_of = |job: &str| {
            let spec = self.manifest.jobs.iter().find(|j| j.id == job);
            spec.and_then(|j| j.schedule_setting.as_deref())
                .and_then(|field| settings.as_ref().and_then(|s| s.get(field)))
                .map(str::to_string)
                .or_else(|| spec.and_then(|j| j.schedule.clone()))
                .unwrap_or_else(|| crate::settings::DEFAULT_REFRESH_SCHEDULE.to_string())
        };
        let schedules = microsoft_outlook_jobs::Schedules {
            refresh_tokens: schedule_of("refresh_tokens"),
            check_client_secret: schedule_of("check_client_secret"),
            sweep_outbox: self.shared.options.sweep_schedule.clone(),
            delivery_concurrency: self.shared.options.delivery_concurrency,
            instance: format!(
                "{}.{}",
                self.shared.instance,
                self.shared
                    .starts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        let pool = match ctx.db().get_database_backend() {
            sea_orm::DbBackend::Postgres => microsoft_outlook_jobs::QueuePool::Postgres(
                ctx.db().get_postgres_connection_pool().clone(),
            ),
            _ => microsoft_outlook_jobs::QueuePool::Sqlite(
                ctx.db().get_sqlite_connection_pool().clone(),
            ),
        };
        // On SQLite, the writer connection and its checkpointer open here, on the host's
        // runtime, rather than in whichever request or job writes first (an HTTP worker's
        // runtime stops with that worker, and the checkpointer with it).
        drop(self.shared.write_gate(ctx).await);
        let queue = microsoft_outlook_jobs::MailQueue::setup(&pool).await?;
        *self.shared.queue.write().unwrap_or_else(|e| e.into_inner()) = Some(queue);
        if !self.shared.options.workers {
            // Web-only: mail is queued and drain jobs pushed; worker processes deliver it.
            tracing::info!(
                "microsoft_outlook: web-only process, no workers or scheduled jobs here"
            );
            let shared = self.shared.clone();
            return Ok(JobsHandle::new(Vec::new(), move || {
                *shared.queue.write().unwrap_or_else(|e| e.into_inner()) = None;
                Box::pin(async {})
            }));
        }
        let running = microsoft_outlook_jobs::start(
            crate::jobs::JobServices {
                ctx: ctx.clone(),
                shared: self.shared.clone(),
            },
            &schedules,
            &pool,
        )?;
        crate::delivery::drains::start(ctx, &self.shared);
        // The client secret's expiry is checked now too, not only at the daily run: the jobs
        // start with the process and again after every save of the settings, so an operator
        // who enters a date within 30 days is warned at once (each threshold once, across
        // processes).
        let secret_ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::jobs::check_client_secret(&secret_ctx).await {
                tracing::warn!(error = %e, "checking the client secret's expiry failed");
            }
        });
        // Mail that waited while no process delivered goes now, not at the sweep's first tick.
        let (first_ctx, first_shared) = (ctx.clone(), self.shared.clone());
        tokio::spawn(async move {
            match crate::outbox::sweep::with_mail(&first_ctx).await {
                Ok(servers) => {
                    for server_id in servers {
                        first_shared.wake(server_id).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "looking for waiting mail at start failed"),
            }
        });
        let shared = self.shared.clone();
        let db = ctx.db().clone();
        Ok(JobsHandle::new(running.names(), move || {
            *shared.queue.write().unwrap_or_else(|e| e.into_inner()) = None;
            crate::delivery::drains::stop(&shared);
            Box::pin(async move {
                running.stop().await;
                shared
                    .drain_in_flight(std::time::Duration::from_secs(30))
                    .await;
                // Other processes need not wait for this one's connection slots to time out.
                shared.smtp.close_all(&db).await;
            })
        }))
    }

    async fn record_panel(
        &self,
        ctx: &ModuleContext,
        record: &crm_sdk::RecordRef,
        user: &crm_sdk::CurrentUser,
    ) -> Option<String> {
        crate::web::mail_routes::record_panel(ctx, &self.shared, record, user).await
    }

    async fn metrics(&self, ctx: &ModuleContext) -> Option<String> {
        let rendered = match crate::delivery::health::counts(ctx).await {
            Ok(by_health) => self.shared.metrics.render(ctx, &by_health).await,
            Err(e) => Err(e),
        };
        match rendered {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox for the metrics failed");
                None
            }
        }
    }

    async fn settings_guide(&self, ctx: &ModuleContext) -> Option<String> {
        Some(crate::web::setup_guide::guide(ctx).await)
    }

    async fn verify_settings(&self, ctx: &ModuleContext) -> Option<SettingsCheck> {
        crate::web::setup_guide::verify(ctx, &self.shared.http).await
    }

    async fn disable_consequences(&self, ctx: &ModuleContext) -> Vec<String> {
        crate::web::setup_guide::disable_consequences(ctx).await
    }
}

/// Whether `url` points at this machine (127.0.0.0/8, ::1 or localhost).
pub fn is_loopback_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    })
}

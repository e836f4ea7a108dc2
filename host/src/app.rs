//! Building and running the host: database, modules, HTTP server, background sync.

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::middleware::{DefaultHeaders, Next, from_fn};
use actix_web::{App, HttpResponse, HttpServer, guard, web};
use anyhow::Context;
use crm_sdk::{Clock, CurrentUser, Module, ModuleContext, Sealer, SealingKey};
use sea_orm_migration::MigratorTrait;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::db::{HostMigrator, connect};
use crate::html::{HostChrome, ModuleMenu};
use crate::notifier::DbNotifier;
use crate::records::DbRecordDirectory;
use crate::registry::{ModuleEntry, Registry};
use crate::settings::DbSettingsStore;
use crate::state::AppState;

/// Routes a host adds besides its own and its modules' (the demo's page of received mail).
pub type ExtraRoutes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// What the host is built from besides its configuration.
pub struct HostOptions {
    /// The linked modules.
    pub modules: Vec<Arc<dyn Module>>,
    /// The clock (tests pass a manual one).
    pub clock: Arc<dyn Clock>,
    /// The key that seals secrets.
    pub sealing_key: SealingKey,
    /// More routes (the demo's page of received mail).
    pub extra_routes: Vec<ExtraRoutes>,
}

/// A built host, ready to serve.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().clone();
    // The path only: query strings may carry OAuth codes and states.
    let path = req.path().to_string();
    let response = next.call(req).await?;
    tracing::info!(
        target: "crm_host::http",
        %method,
        path = ?path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    Ok(response)
}

/// The security headers of every response. No `form-action` in the policy: the Connect form
/// answers with a redirect to the identity platform, whose origin is a setting.
pub fn security_headers(public_base_url: &url::Url) -> Vec<(&'static str, &'static str)> {
    let mut headers = vec![
        (
            "Content-Security-Policy",
            "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'",
        ),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        // The OAuth callback's URL carries the authorization code.
        ("Referrer-Policy", "no-referrer"),
    ];
    if public_base_url.scheme() == "https" {
        headers.push(("Strict-Transport-Security", "max-age=31536000"));
    }
    headers
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    match state.db.ping().await {
        Ok(()) => HttpResponse::Ok().body("ok"),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database not answering");
            HttpResponse::ServiceUnavailable().body("database not answering")
        }
    }
}

async fn home(user: Option<CurrentUser>) -> HttpResponse {
    let to = if user.is_some() {
        "/contacts"
    } else {
        "/login"
    };
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .finish()
}

/// Connects to the database and applies the host's migrations.
pub async fn open_database(config: &Config) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let db = connect(&config.database_url, config.database_max_connections)
        .await
        .with_context(|| format!("opening the database {}", redact_url(&config.database_url)))?;
    HostMigrator::up(&db, None)
        .await
        .context("applying the host's migrations")?;
    Ok(db)
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The database, the page frame and the registry of linked modules, assembled but not started.
pub struct Assembled {
    /// The database.
    pub db: sea_orm::DatabaseConnection,
    /// The page frame.
    pub chrome: Arc<HostChrome>,
    /// The linked modules.
    pub registry: Arc<Registry>,
    /// The sealer.
    pub sealer: Sealer,
    /// The public base URL.
    pub public_base_url: url::Url,
}

/// Opens the database and builds every module's context (no server, no jobs): for `serve`,
/// `demo` and the operator CLI.
pub async fn assemble(config: &Config, options: HostOptions) -> anyhow::Result<Assembled> {
    let public_base_url = config.public_base_url().map_err(anyhow::Error::msg)?;
    let db = open_database(config).await?;
    let sealer = Sealer::new(&options.sealing_key);
    let flags: Vec<Arc<AtomicBool>> = options
        .modules
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let chrome = Arc::new(HostChrome::new(
        options
            .modules
            .iter()
            .zip(&flags)
            .map(|(m, f)| ModuleMenu {
                enabled: f.clone(),
                items: m.manifest().menu.clone(),
            })
            .collect(),
    ));
    let settings = Arc::new(DbSettingsStore::new(db.clone(), sealer.clone()));
    let records = Arc::new(DbRecordDirectory::new(db.clone()));
    let notifier = Arc::new(DbNotifier::new(db.clone()));
    let entries = options
        .modules
        .into_iter()
        .zip(flags)
        .map(|(module, flag)| {
            let ctx = ModuleContext::new(
                module.manifest().id.clone(),
                db.clone(),
                public_base_url.clone(),
                settings.clone(),
                records.clone(),
                notifier.clone(),
                options.clock.clone(),
                sealer.clone(),
                chrome.clone(),
            );
            ModuleEntry::new(module, ctx, flag)
        })
        .collect();
    let registry = Arc::new(Registry::new(db.clone(), entries));
    Ok(Assembled {
        db,
        chrome,
        registry,
        sealer,
        public_base_url,
    })
}

impl Application {
    /// Opens the database, assembles the modules, restores their enabled state and binds.
    pub async fn build(config: Config, options: HostOptions) -> anyhow::Result<Self> {
        let clock = options.clock.clone();
        let extra_routes = options.extra_routes.clone();
        let Assembled {
            db,
            chrome,
            registry,
            sealer,
            public_base_url,
        } = assemble(&config, options).await?;
        registry
            .sync()
            .await
            .context("resuming the enabled modules")?;
        let state = web::Data::new(AppState {
            db,
            secure_cookies: public_base_url.scheme() == "https",
            config: config.clone(),
            registry: registry.clone(),
            chrome,
            sealer,
            clock,
        });
        let listener =
            TcpListener::bind(&config.bind).with_context(|| format!("binding {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let server_state = state.clone();
        let extra_routes = extra_routes.clone();
        let throttle = web::Data::new(crate::throttle::SignInThrottle::default());
        crate::auth::warm_up();
        let headers = security_headers(&public_base_url);
        let mut server = HttpServer::new(move || {
            let state = server_state.clone();
            let defaults = headers.iter().fold(DefaultHeaders::new(), |d, h| d.add(*h));
            let mut app = App::new()
                .app_data(state.clone())
                .app_data(throttle.clone())
                .wrap(from_fn(crate::auth::session_middleware))
                .wrap(defaults)
                .wrap(from_fn(access_log))
                .route("/health", web::get().to(health))
                .route(
                    crate::html::STYLESHEET_PATH,
                    web::get().to(crate::html::stylesheet),
                )
                .route(crate::html::ICON_PATH, web::get().to(crate::html::icon))
                .route("/", web::get().to(home))
                .configure(crate::auth::routes)
                .configure(crate::settings::routes)
                .configure(crate::modules_page::routes)
                .configure(crate::records::routes)
                .configure(crate::notifier::routes)
                .configure(crate::metrics::routes);
            for extra in &extra_routes {
                let extra = extra.clone();
                app = app.configure(move |cfg| extra(cfg));
            }
            // A module's static files, whether it is enabled or not (before its scope, which
            // would answer for them).
            for entry in state.registry.entries() {
                let prefix = entry.module.manifest().route_prefix.clone();
                for asset in entry.module.static_assets() {
                    app = app.route(
                        &format!("{prefix}{}", asset.path),
                        web::get().to(move || async move {
                            HttpResponse::Ok()
                                .content_type(asset.content_type)
                                .insert_header(("Cache-Control", "public, max-age=3600"))
                                .body(asset.body)
                        }),
                    );
                }
            }
            for entry in state.registry.entries() {
                let flag = entry.enabled.clone();
                let module = entry.module.clone();
                let ctx = entry.ctx.clone();
                app = app.service(
                    web::scope(&module.manifest().route_prefix)
                        .guard(guard::fn_guard(move |_| {
                            flag.load(std::sync::atomic::Ordering::SeqCst)
                        }))
                        .configure(|cfg| module.configure(cfg, &ctx)),
                );
            }
            // While a module is disabled its guarded scope does not match: say so.
            for entry in state.registry.entries() {
                let name = entry.module.manifest().name.clone();
                app = app.service(
                    web::scope(&entry.module.manifest().route_prefix).default_service(web::to(
                        move |req, state, user| {
                            crate::disabled::page(req, state, user, name.clone())
                        },
                    )),
                );
            }
            app.default_service(web::to(crate::not_found::page))
        })
        .shutdown_timeout(30)
        // Idle keep-alive connections stay open 75 s (nginx's default), longer than
        // the idle time clients usually keep them pooled, so a client seldom reuses
        // a connection the server is closing at that instant.
        .keep_alive(Duration::from_secs(75))
        .listen(listener)?;
        if config.http_workers > 0 {
            server = server.workers(config.http_workers);
        }
        let server = server.run();
        let sync_registry = registry.clone();
        let every = Duration::from_secs(config.module_sync_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = sync_registry.sync().await {
                    tracing::warn!(error = %e, "syncing module states failed");
                }
            }
        });
        Ok(Self {
            port,
            server,
            state,
        })
    }

    /// The port the server listens on (useful when binding port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (tests use it to reach the registry and the database).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// A handle that stops the server gracefully.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM / Ctrl-C (or the handle stops it), then stops module jobs.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        tracing::info!("HTTP server stopped; stopping module jobs");
        self.state.registry.shutdown().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsts_only_when_the_public_url_is_https() {
        let names = |url: &str| -> Vec<&'static str> {
            security_headers(&url::Url::parse(url).expect("url"))
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        };
        assert!(names("https://crm.contoso.example").contains(&"Strict-Transport-Security"));
        let plain = names("http://127.0.0.1:8080");
        assert!(!plain.contains(&"Strict-Transport-Security"));
        for name in [
            "Content-Security-Policy",
            "X-Frame-Options",
            "X-Content-Type-Options",
            "Referrer-Policy",
        ] {
            assert!(plain.contains(&name), "{name}");
        }
    }
}

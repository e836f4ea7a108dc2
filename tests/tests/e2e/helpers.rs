//! `spawn_app()`: a running host on a fresh database and a free port, with a cookie-jar client.

use crm_host::{Application, Config, HostOptions};
use crm_sdk::{ManualClock, SealingKey};
use microsoft_outlook::runtime::ModuleOptions;
use microsoft_outlook_tests::testdb::TestDb;
use reqwest::StatusCode;
use sea_orm::DatabaseConnection;
use secrecy::ExposeSecret;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything logged so far by every test in this binary (debug level for our crates).
pub fn captured_logs() -> String {
    let logs = LOGS
        .get()
        .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone());
    String::from_utf8_lossy(&logs.unwrap_or_default()).into_owned()
}

fn init_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                "debug,sqlx=warn,hyper=info,reqwest=info,h2=info,rustls=info,actix_server=info",
            )
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    });
}

pub const ADMIN: (&str, &str) = ("olivia@contoso.example", "operator-pass");
pub const ALICE: (&str, &str) = ("alice@contoso.example", "alice-pass");
pub const BOB: (&str, &str) = ("bob@contoso.example", "bob-pass");

/// A host running for one test.
pub struct TestApp {
    pub base: String,
    pub db: DatabaseConnection,
    pub db_url: String,
    pub key: SealingKey,
    pub clock: Arc<ManualClock>,
    pub app: actix_web::web::Data<crm_host::state::AppState>,
    pub module: Arc<microsoft_outlook::OutlookModule>,
    pub alice_id: i64,
    pub bob_id: i64,
    pub admin_id: i64,
    handle: actix_web::dev::ServerHandle,
    _db: Arc<TestDb>,
}

/// Module tunables for tests: a sweep every second, short retries and leases, no jitter.
pub fn test_options() -> ModuleOptions {
    ModuleOptions {
        sweep_schedule: "*/1 * * * * *".into(),
        delivery_concurrency: 4,
        lease_secs: 20,
        retry_base_secs: 2,
        refresh: microsoft_outlook::jobs::RefreshOptions {
            concurrency: 4,
            max_jitter: std::time::Duration::ZERO,
            transient_retries: 1,
            skip_refreshed_within: std::time::Duration::ZERO,
        },
        token_timeout: std::time::Duration::from_secs(2),
        // The simulated servers answer in milliseconds; a stall is given up sooner than 60 s.
        smtp_timeout: std::time::Duration::from_secs(8),
        workers: true,
    }
}

/// Waits (up to 30 s) until `check` holds; panics with `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("gave up waiting: {what}");
}

/// Starts a host on a fresh database with an operator and two users.
pub async fn spawn_app() -> TestApp {
    let test_db = Arc::new(TestDb::create().await.expect("test database"));
    let key = SealingKey::generate();
    spawn_on(test_db, key, true).await
}

/// Starts a host on an existing test database with `key`.
pub async fn spawn_on(test_db: Arc<TestDb>, key: SealingKey, seed: bool) -> TestApp {
    spawn_with(test_db, key, seed, test_options()).await
}

/// Starts a host on an existing test database with `key` and module `options`.
pub async fn spawn_with(
    test_db: Arc<TestDb>,
    key: SealingKey,
    seed: bool,
    options: ModuleOptions,
) -> TestApp {
    init_logs();
    let config = Config {
        bind: "127.0.0.1:0".into(),
        database_url: test_db.url.clone(),
        database_max_connections: 5,
        public_base_url: Some("https://crm.contoso.example".into()),
        http_workers: 2,
        module_sync_secs: 3600,
        ..Config::default()
    };
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let module = Arc::new(microsoft_outlook::OutlookModule::with_options(options));
    let app = Application::build(
        config,
        HostOptions {
            modules: vec![module.clone()],
            clock: clock.clone(),
            sealing_key: key.clone(),
            extra_routes: Vec::new(),
        },
    )
    .await
    .expect("host builds");
    let state = app.state();
    let db = state.db.clone();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let (mut admin_id, mut alice_id, mut bob_id) = (0, 0, 0);
    if seed {
        admin_id = crm_host::seed::create_user(&db, ADMIN.0, "Olivia Operator", ADMIN.1, true)
            .await
            .expect("admin");
        alice_id = crm_host::seed::create_user(&db, ALICE.0, "Alice Adams", ALICE.1, false)
            .await
            .expect("alice");
        bob_id = crm_host::seed::create_user(&db, BOB.0, "Bob Brown", BOB.1, false)
            .await
            .expect("bob");
    }
    TestApp {
        base,
        db,
        db_url: test_db.url.clone(),
        key,
        clock,
        app: state,
        module,
        admin_id,
        alice_id,
        bob_id,
        handle,
        _db: test_db,
    }
}

impl TestApp {
    /// The module's context as the host gave it, and its shared state: to call the module's
    /// own functions (a sweep, a hold's release) the way its jobs do.
    pub fn module_parts(
        &self,
    ) -> (
        crm_sdk::ModuleContext,
        std::sync::Arc<microsoft_outlook::runtime::Shared>,
    ) {
        let entry = self.app.registry.get("microsoft_outlook").expect("linked");
        (entry.ctx.clone(), self.module.shared())
    }

    /// The test database, to start another host on it.
    pub fn test_db(&self) -> Arc<TestDb> {
        self._db.clone()
    }

    /// A browser-like client (cookie jar, no automatic redirects).
    pub fn browser(&self) -> Browser {
        Browser {
            base: self.base.clone(),
            client: reqwest::Client::builder()
                .cookie_store(true)
                .redirect(reqwest::redirect::Policy::none())
                // Shorter than the host's keep-alive, so a pooled connection is
                // never one the server is closing (hyper's `IncompleteMessage`).
                .pool_idle_timeout(std::time::Duration::from_secs(20))
                .build()
                .expect("client"),
        }
    }

    /// A browser signed in as `who`.
    pub async fn signed_in(&self, who: (&str, &str)) -> Browser {
        let browser = self.browser();
        browser.sign_in(who.0, who.1).await;
        browser
    }

    /// Enables the module as an operator would.
    pub async fn enable_module(&self) {
        let admin = self.signed_in(ADMIN).await;
        let page = admin
            .post_form("/modules/microsoft_outlook/enable", &[])
            .await;
        assert_eq!(page.0, StatusCode::OK, "{}", page.1);
    }

    /// The sealing key in base64.
    pub fn key_base64(&self) -> String {
        self.key.to_base64().expose_secret().to_string()
    }

    /// Stops the server.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

/// A cookie-jar HTTP client pointed at one host.
pub struct Browser {
    pub base: String,
    pub client: reqwest::Client,
}

/// Extracts the first CSRF token found in a page.
pub fn csrf_in(page: &str) -> Option<String> {
    let at = page.find("name=\"csrf_token\" value=\"")? + "name=\"csrf_token\" value=\"".len();
    page[at..].split('"').next().map(str::to_string)
}

impl Browser {
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    /// GET, returning status, body and Location.
    pub async fn get(&self, path: &str) -> (StatusCode, String, Option<String>) {
        let response = self.client.get(self.url(path)).send().await.expect("GET");
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, response.text().await.unwrap_or_default(), location)
    }

    /// The CSRF token of this browser's session (from a page that has a form).
    pub async fn csrf(&self) -> String {
        let (_, page, _) = self.get("/notifications").await;
        csrf_in(&page).expect("a CSRF token on the page")
    }

    /// POSTs a form with the session's CSRF token added.
    pub async fn post_form(
        &self,
        path: &str,
        fields: &[(&str, &str)],
    ) -> (StatusCode, String, Option<String>) {
        let token = self.csrf().await;
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf_token", &token));
        self.post_raw(path, &all).await
    }

    /// POSTs JSON with the session's CSRF token in the header.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let token = self.csrf().await;
        let response = self
            .client
            .post(self.url(path))
            .header("x-csrf-token", token)
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// GETs JSON.
    pub async fn get_json(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let response = self
            .client
            .get(self.url(path))
            .header("accept", "application/json")
            .send()
            .await
            .expect("GET");
        let status = response.status();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// POSTs the compose form's upload (`multipart/form-data`) as a browser without script
    /// does: the CSRF token as a form field, `files` as `attachments` parts (name, type, bytes).
    pub async fn post_upload(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        files: &[(&str, &str, Vec<u8>)],
    ) -> (StatusCode, String, Option<String>) {
        let token = self.csrf().await;
        let mut form = reqwest::multipart::Form::new().text("csrf_token", token);
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        for (name, ty, bytes) in files {
            let part = reqwest::multipart::Part::bytes(bytes.clone())
                .file_name(name.to_string())
                .mime_str(ty)
                .expect("mime");
            form = form.part("attachments", part);
        }
        let response = self
            .client
            .post(self.url(path))
            .multipart(form)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, response.text().await.unwrap_or_default(), location)
    }

    /// POSTs a form exactly as given (no CSRF token added).
    pub async fn post_raw(
        &self,
        path: &str,
        fields: &[(&str, &str)],
    ) -> (StatusCode, String, Option<String>) {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, response.text().await.unwrap_or_default(), location)
    }

    /// Signs in through the login form.
    pub async fn sign_in(&self, email: &str, password: &str) {
        let (_, page, _) = self.get("/login").await;
        let token = csrf_in(&page).expect("login form has a CSRF token");
        let (status, _, location) = self
            .post_raw(
                "/login",
                &[
                    ("email", email),
                    ("password", password),
                    ("csrf_token", &token),
                    ("next", "/contacts"),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(
            location.as_deref(),
            Some("/contacts"),
            "sign-in as {email} failed"
        );
    }
}

/// The kinds of a mail's history entries, in order, from its page's JSON (`history`).
pub fn history_kinds(detail: &serde_json::Value) -> Vec<&str> {
    detail["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or(""))
        .collect()
}

/// Release held mail posted anyway for `server_id` by `operator` (an old form, a script), on
/// the server's page and in the outbox (JSON): both refuse with 409, saying `words`.
pub async fn release_is_refused(operator: &Browser, server_id: i32, words: &str) {
    let path = format!("/microsoft_outlook/servers/{server_id}/retry");
    let (status, page, _) = operator.post_form(&path, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains(words), "{page}");
    let path = format!("/microsoft_outlook/outbox/release/{server_id}");
    let (status, body) = operator.post_json(&path, &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains(words), "{body}");
}

//! The `crm-host` binary as an operator runs it: start-up errors and the outlook CLI.

use crm_sdk::{Sealer, SealingKey};
use microsoft_outlook::entities::{mail_server, mailbox_health, token};
use sea_orm::{ActiveModelTrait, Set};
use secrecy::ExposeSecret;
use std::process::Command;

fn crm_host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crm-host"));
    cmd.env_remove("CRM_SEALING_KEY")
        .env_remove("CRM_SEALING_KEY_FILE")
        .env("RUST_BACKTRACE", "0");
    cmd
}

#[test]
fn serve_without_a_sealing_key_fails_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("crm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = crm_host()
        .current_dir(&dir)
        .env(
            "CRM_DATABASE_URL",
            format!("sqlite://{}/serve.db", dir.display()),
        )
        .env("CRM_BIND", "127.0.0.1:0")
        .arg("serve")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no sealing key"), "{err}");
    assert!(err.contains("CRM_SEALING_KEY"), "{err}");
}

#[tokio::test]
async fn outlook_status_json_lists_every_mail_server() {
    let dir = std::env::temp_dir().join(format!("crm-cli-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("sqlite://{}/crm.db", dir.display());
    let key = SealingKey::generate();
    let key_text = key.to_base64().expose_secret().to_string();
    let run = |args: &[&str]| {
        crm_host()
            .current_dir(&dir)
            .env("CRM_DATABASE_URL", &url)
            .env("CRM_SEALING_KEY", &key_text)
            .args(args)
            .output()
            .expect("run")
    };
    let migrated = run(&["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let db = crm_host::db::connect(&url, 2).await.expect("db");
    let now = chrono::Utc::now();
    let server = mail_server::ActiveModel {
        name: Set("Office 365".into()),
        kind: Set("shared".into()),
        owner_user_id: Set(None),
        smtp_host: Set("smtp.office365.com".into()),
        smtp_port: Set(587),
        security: Set("starttls".into()),
        extra_ca_pem: Set(None),
        mailbox: Set("crm@contoso.example".into()),
        auth: Set("delegated".into()),
        transport: Set("smtp".into()),
        send_as: Set("author".into()),
        from_allow_list: Set(String::new()),
        is_default: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&db)
    .await
    .expect("server");
    let other = mail_server::ActiveModel {
        mailbox: Set("alice@contoso.example".into()),
        kind: Set("personal".into()),
        owner_user_id: Set(Some(2)),
        is_default: Set(false),
        ..server.clone().into()
    };
    let mut other = other;
    other.id = sea_orm::ActiveValue::NotSet;
    other.insert(&db).await.expect("second server");
    let sealer = Sealer::new(&key);
    token::ActiveModel {
        server_id: Set(server.id),
        access_token_sealed: Set(sealer.seal("at", "x")),
        refresh_token_sealed: Set(None),
        access_expires_at: Set(now + chrono::Duration::minutes(70)),
        scopes: Set("https://outlook.office.com/SMTP.Send".into()),
        version: Set(3),
        status: Set("needs_reconnect".into()),
        signed_in_as: Set("crm@contoso.example".into()),
        connected_at: Set(now),
        last_refresh_at: Set(Some(now)),
        last_error: Set(Some("The grant was revoked (AADSTS50173)".into())),
        notified_at: Set(None),
        refresh_lease_until: Set(None),
        smtp_user: Set(None),
    }
    .insert(&db)
    .await
    .expect("token");
    // The dead grant held the mailbox.
    mailbox_health::ActiveModel {
        server_id: Set(server.id),
        state: Set("held".into()),
        reason: Set(Some("grant_dead".into())),
        detail: Set(Some(
            "The grant was revoked (AADSTS50173). The mailbox's user must click Reconnect.".into(),
        )),
        rule: Set(Some("grant-dead".into())),
        since: Set(Some(now)),
        until: Set(None),
        notified_at: Set(Some(now)),
        updated_at: Set(now),
    }
    .insert(&db)
    .await
    .expect("health");

    let out = run(&["outlook", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["mailbox"], "crm@contoso.example");
    assert_eq!(rows[0]["kind"], "shared");
    assert_eq!(rows[0]["status"], "held:grant_dead");
    assert_eq!(rows[0]["health"], "held");
    assert!(
        rows[0]["held_because"]
            .as_str()
            .unwrap_or_default()
            .contains("Reconnect")
    );
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("AADSTS50173")
    );
    assert!(rows[0]["access_expires_at"].is_string());
    assert_eq!(rows[1]["status"], "not_connected");
    assert_eq!(rows[1]["health"], "ready");
    assert_eq!(rows[1]["kind"], "personal");

    let table = run(&["outlook", "status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("MAILBOX") && text.contains("held"), "{text}");
    // Each row names its server and how it sends.
    assert!(text.contains("NAME") && text.contains("VIA"), "{text}");
    assert!(text.contains(" smtp "), "{text}");

    // Refreshing a server that does not exist is an error, not a summary of nothing.
    let out = run(&["outlook", "refresh", "--mailbox", "99"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no mail server with id 99"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("crm-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run_with_stdin(mut cmd: Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("wait")
}

/// `crm-host demo` in `dir`, on `port`.
fn start_demo(dir: &std::path::Path, port: u16) -> Running {
    let child = crm_host()
        .current_dir(dir)
        .env_remove("CRM_DATABASE_URL")
        .env("CRM_LOG", "warn")
        .args(["demo", "--bind", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("demo");
    Running(child)
}

/// Kills the child when the test ends, passing or not.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_healthy(base: &str) {
    for _ in 0..150 {
        if reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("{base} did not become healthy");
}

async fn sign_in(base: &str, email: &str, password: &str) -> (reqwest::StatusCode, String) {
    sign_in_with(&cookie_client(), base, email, password).await
}

/// A client that keeps its cookies and does not follow redirects.
fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The CSRF token of the first form of `page`.
fn csrf_in(page: &str) -> String {
    let marker = "name=\"csrf_token\" value=\"";
    let at = page.find(marker).expect("a CSRF field") + marker.len();
    page[at..].split('"').next().unwrap_or_default().to_string()
}

/// Signs `client` in: the answer's status and Location.
async fn sign_in_with(
    client: &reqwest::Client,
    base: &str,
    email: &str,
    password: &str,
) -> (reqwest::StatusCode, String) {
    let page = client
        .get(format!("{base}/login"))
        .send()
        .await
        .expect("login page")
        .text()
        .await
        .expect("text");
    let csrf = csrf_in(&page);
    let answer = client
        .post(format!("{base}/login"))
        .form(&[
            ("email", email),
            ("password", password),
            ("csrf_token", csrf.as_str()),
        ])
        .send()
        .await
        .expect("sign in");
    let status = answer.status();
    let location = answer
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, location)
}

#[tokio::test]
async fn the_first_operator_is_added_from_the_cli_and_signs_in_on_serve() {
    let dir = fresh_dir("user-add");
    let key = SealingKey::generate()
        .to_base64()
        .expose_secret()
        .to_string();
    let url = format!("sqlite://{}/crm.db", dir.display());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let serve = crm_host()
        .current_dir(&dir)
        .env("CRM_DATABASE_URL", &url)
        .env("CRM_SEALING_KEY", &key)
        .env("CRM_BIND", format!("127.0.0.1:{port}"))
        .env("CRM_LOG", "warn")
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let _serve = Running(serve);
    wait_healthy(&base).await;

    let add = |password: &str| {
        let mut cmd = crm_host();
        cmd.current_dir(&dir).env("CRM_DATABASE_URL", &url).args([
            "user",
            "add",
            "--operator",
            "Olivia@Contoso.example",
            "--name",
            "Olivia",
        ]);
        run_with_stdin(cmd, &format!("{password}\n"))
    };
    // Weak passwords are refused, saying why.
    let short = add("short");
    assert!(!short.status.success());
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(err.contains("too short") && err.contains("12"), "{err}");
    let common = add("Password1234");
    assert!(!common.status.success());
    assert!(String::from_utf8_lossy(&common.stderr).contains("common"));

    let added = add("correct horse battery staple");
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(String::from_utf8_lossy(&added.stdout).contains("as an operator"));
    let again = add("correct horse battery staple");
    assert!(!again.status.success(), "the address is taken");

    let (status, location) = sign_in(
        &base,
        "olivia@contoso.example",
        "correct horse battery staple",
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::SEE_OTHER);
    assert!(!location.contains("error"), "{location}");
    let (_, location) = sign_in(&base, "olivia@contoso.example", "wrong password!!").await;
    assert!(location.contains("/login"), "{location}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_commands_refuse_to_create_a_database() {
    let dir = fresh_dir("no-db");
    for args in [
        vec!["outlook", "status"],
        vec!["user", "add", "--operator", "olivia@contoso.example"],
    ] {
        let out = run_with_stdin(
            {
                let mut cmd = crm_host();
                cmd.current_dir(&dir)
                    .env_remove("CRM_DATABASE_URL")
                    .env(
                        "CRM_SEALING_KEY",
                        SealingKey::generate().to_base64().expose_secret(),
                    )
                    .args(&args);
                cmd
            },
            "correct horse battery staple\n",
        );
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no database at"), "{args:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
    assert!(left.is_empty(), "created {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn demo_restart_keeps_the_settings_and_one_default_server_and_the_cli_finds_its_key() {
    let dir = fresh_dir("demo");
    let start = |port: u16| start_demo(&dir, port);
    let port = free_port();
    let demo = start(port);
    wait_healthy(&format!("http://127.0.0.1:{port}")).await;
    drop(demo);

    // The operator changes things while it is stopped: a tenant, a second server made default.
    let url = format!("sqlite://{}/data/crm.db", dir.display());
    let db = crm_host::db::connect(&url, 1).await.expect("db");
    let key = SealingKey::from_file(&dir.join("data/sealing.key")).expect("key");
    let sealer = Sealer::new(&key);
    let mut tenant = std::collections::BTreeMap::new();
    tenant.insert("tenant".to_string(), "contoso.example".to_string());
    crm_host::settings::store(
        &db,
        &sealer,
        "microsoft_outlook",
        tenant,
        Default::default(),
    )
    .await
    .expect("tenant");
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let servers = mail_server::Entity::find().all(&db).await.expect("servers");
    // The demo's two shared servers: one over SMTP (the default), one over Microsoft Graph.
    assert_eq!(servers.len(), 2, "{servers:?}");
    let smtp = servers
        .iter()
        .find(|s| s.transport == "smtp")
        .expect("the SMTP server");
    let mut renamed: mail_server::ActiveModel = smtp.clone().into();
    renamed.name = Set("Sales mailbox".into());
    renamed.update(&db).await.expect("rename");
    drop(db);

    let port = free_port();
    let demo = start(port);
    wait_healthy(&format!("http://127.0.0.1:{port}")).await;
    let db = crm_host::db::connect(&url, 1).await.expect("db");
    let servers = mail_server::Entity::find().all(&db).await.expect("servers");
    assert_eq!(servers.len(), 2, "no third demo server: {servers:?}");
    let defaults = mail_server::Entity::find()
        .filter(mail_server::Column::IsDefault.eq(true))
        .all(&db)
        .await
        .expect("defaults");
    assert_eq!(defaults.len(), 1);
    assert_eq!(
        defaults[0].name, "Sales mailbox",
        "the operator's name is kept"
    );
    let values = {
        use crm_sdk::SettingsStore;
        crm_host::settings::DbSettingsStore::new(db.clone(), sealer.clone())
            .load("microsoft_outlook")
            .await
            .expect("settings")
    };
    assert_eq!(values.get("tenant"), Some("contoso.example"));
    drop(db);

    // In the demo's folder the CLI finds the database and the key without variables.
    let out = crm_host()
        .current_dir(&dir)
        .env_remove("CRM_DATABASE_URL")
        .args(["outlook", "status", "--json"])
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(2));
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The simulated services' pages show everybody's mail and the app's secret: operators only.
/// The app registration page lists the accounts the simulated sign-in knows. A user's My
/// mailbox form points at the simulated Exchange.
#[tokio::test]
async fn the_demo_pages_of_the_simulated_services_are_for_operators() {
    let port = free_port();
    let _demo = start_demo(&fresh_dir("demo-pages"), port);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let status_of = |client: reqwest::Client, path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            let answer = client.get(url).send().await.expect("GET");
            (answer.status(), answer.text().await.unwrap_or_default())
        }
    };
    let alice = cookie_client();
    let (status, _) = sign_in_with(&alice, &base, "alice@contoso.example", "alice-demo").await;
    assert_eq!(status, reqwest::StatusCode::SEE_OTHER);
    for path in ["/demo/received", "/demo/azure", "/demo/faults"] {
        let (status, _) = status_of(alice.clone(), path).await;
        assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{path}");
    }
    // A user's new mailbox points where the demo's simulated Exchange listens, as the shared
    // server does (not at smtp.office365.com, which the demo's tokens cannot reach).
    let (status, page) = status_of(alice.clone(), "/microsoft_outlook/my-mailbox").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert!(
        page.contains(r#"name="smtp_host" value="localhost""#),
        "{page}"
    );
    assert!(page.contains("BEGIN CERTIFICATE"), "the demo's CA: {page}");
    let admin = cookie_client();
    let (status, _) = sign_in_with(&admin, &base, "admin@contoso.example", "operator-demo").await;
    assert_eq!(status, reqwest::StatusCode::SEE_OTHER);
    let (status, _) = status_of(admin.clone(), "/demo/received").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    // Each press arms one more fault; the page counts those not yet met, and disarms them.
    let play = |fault: &'static str| {
        let (admin, base) = (admin.clone(), base.clone());
        async move {
            let page = admin
                .get(format!("{base}/demo/faults"))
                .send()
                .await
                .expect("faults page")
                .text()
                .await
                .expect("text");
            let csrf = csrf_in(&page);
            let answer = admin
                .post(format!("{base}/demo/faults"))
                .form(&[("fault", fault), ("csrf_token", csrf.as_str())])
                .send()
                .await
                .expect("play");
            assert_eq!(answer.status(), reqwest::StatusCode::SEE_OTHER, "{fault}");
        }
    };
    play("quota").await;
    play("quota").await;
    let (_, page) = status_of(admin.clone(), "/demo/faults?played=quota").await;
    assert!(page.contains("2 armed, not yet met"), "{page}");
    play("disarm").await;
    let (_, page) = status_of(admin.clone(), "/demo/faults?played=disarm").await;
    assert!(
        page.contains("Disarmed") && !page.contains("armed, not yet met"),
        "{page}"
    );
    let (status, page) = status_of(admin.clone(), "/demo/azure").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    for account in [
        "crm@contoso.example",
        "admin@contoso.example",
        "alice@contoso.example",
        "bob@contoso.example",
    ] {
        assert!(page.contains(account), "{account} is listed: {page}");
    }
}

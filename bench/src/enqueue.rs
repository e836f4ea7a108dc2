//! Enqueue: the queue route (`POST /microsoft_outlook/records/contact/{id}/mails`, JSON) of a
//! running host with the module enabled, under `wrk`, versus a trivial actix handler served by
//! this same binary.

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use crm_host::{Application, HostOptions};
use crm_sdk::{SealingKey, SystemClock};
use microsoft_outlook::OutlookModule;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::services::Sink;
use crate::setup::{
    self, App as AzureApp, BenchDb, DbKind, MODULE, RECIPIENT, add_servers, add_tokens,
    configure_module, host_config, module_options, text_of,
};

/// What `wrk` measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Requests answered in all.
    pub requests: u64,
    /// CPU time (user and system) this benchmark's process used per answered request,
    /// microseconds: the host and, where it delivers, its drains and the SMTP sink; not wrk.
    /// NaN where `/proc/self/stat` could not be read.
    pub cpu_us_per_request: f64,
}

/// CPU time (user and system) this process has used, seconds: `/proc/self/stat` fields 14
/// and 15, in clock ticks of `USER_HZ` (`getconf CLK_TCK`, 100 on Linux).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // After the command name in parentheses (which may hold spaces): state is field 3.
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/self/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Every figure of the enqueue benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// The queue route.
    pub route: Load,
    /// A trivial handler on a bare actix server in this binary (the baseline).
    pub trivial: Load,
    /// A trivial handler mounted in the host, behind its session and access-log middleware.
    pub trivial_in_host: Load,
    /// Mails queued by the route during the measured run (rows in the outbox).
    pub queued: u64,
    /// The queue route of a host that does not deliver (`ModuleOptions::workers` off: it
    /// pushes drain jobs for worker processes, none of which runs here), on a database of its
    /// own: the route's own cost (and the job pushes), without the delivery the same process
    /// does otherwise. `None` when that second run failed (its error is printed).
    pub route_web_only: Option<Load>,
}

/// Where `wrk` is, if installed.
pub fn wrk_path() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/bin/wrk")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("wrk")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|n| n * factor)
}

/// Reads `wrk --latency` output.
pub fn parse_wrk(output: &str) -> anyhow::Result<Load> {
    let mut load = Load::default();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => load.rps = n.parse()?,
            ["50%", d] => load.p50_ms = parse_duration_ms(d).context("p50")?,
            ["99%", d] => load.p99_ms = parse_duration_ms(d).context("p99")?,
            [n, "requests", "in", ..] => load.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                anyhow::bail!("{n} answers were not 2xx/3xx:\n{output}")
            }
            _ => {}
        }
    }
    anyhow::ensure!(load.rps > 0.0, "wrk measured nothing:\n{output}");
    Ok(load)
}

/// Runs `wrk` against `url` for `secs` seconds with `connections` connections.
pub async fn wrk(script: &Path, url: &str, connections: usize, secs: u64) -> anyhow::Result<Load> {
    let path = wrk_path()
        .context("wrk is not installed (Debian package wrk; bench/run.sh installs it)")?;
    let cpu_before = cpu_seconds();
    let output = tokio::process::Command::new(path)
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cpu = match (cpu_before, cpu_seconds()) {
        (Ok(before), Ok(after)) => after - before,
        _ => f64::NAN,
    };
    let mut load = parse_wrk(&String::from_utf8_lossy(&output.stdout))?;
    load.cpu_us_per_request = cpu * 1e6 / (load.requests.max(1) as f64);
    Ok(load)
}

fn lua_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn csrf_in(page: &str) -> Option<String> {
    let marker = "name=\"csrf_token\" value=\"";
    let at = page.find(marker)? + marker.len();
    page[at..].split('"').next().map(str::to_string)
}

async fn trivial(body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().json(serde_json::json!({ "received": body.len() }))
}

/// Signs in through the login form; returns the Cookie header and the session's CSRF token.
async fn sign_in(base: &str, email: &str, password: &str) -> anyhow::Result<(String, String)> {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let page = client
        .get(format!("{base}/login"))
        .send()
        .await?
        .text()
        .await?;
    let token = csrf_in(&page).context("no CSRF token on the login page")?;
    let answer = client
        .post(format!("{base}/login"))
        .form(&[
            ("email", email),
            ("password", password),
            ("csrf_token", token.as_str()),
            ("next", "/contacts"),
        ])
        .send()
        .await?;
    anyhow::ensure!(answer.status().is_redirection(), "sign-in refused");
    let page = client
        .get(format!("{base}/notifications"))
        .send()
        .await?
        .text()
        .await?;
    let csrf = csrf_in(&page).context("no CSRF token after signing in")?;
    let url = url::Url::parse(base)?;
    let cookies =
        reqwest::cookie::CookieStore::cookies(jar.as_ref(), &url).context("no session cookie")?;
    Ok((cookies.to_str()?.to_string(), csrf))
}

/// Runs the enqueue benchmark: `secs` seconds of `wrk` (after a one-second warm-up) on each of
/// the trivial handler, the trivial handler in the host, and the queue route.
pub async fn run(sink: &Sink, connections: usize, secs: u64) -> anyhow::Result<Figures> {
    let db = BenchDb::create(DbKind::Sqlite, "").await?;
    let result = run_on(&db, sink, connections, secs, true).await;
    db.remove().await?;
    let mut figures = result?;
    let web_only = async {
        let db = BenchDb::create(DbKind::Sqlite, "").await?;
        let web_only = run_on(&db, sink, connections, secs, false).await;
        db.remove().await?;
        web_only
    }
    .await;
    match web_only {
        Ok(w) => figures.route_web_only = Some(w.route),
        Err(e) => eprintln!("enqueue: the host that does not deliver failed: {e:#}"),
    }
    Ok(figures)
}

async fn run_on(
    db: &BenchDb,
    sink: &Sink,
    connections: usize,
    secs: u64,
    delivers: bool,
) -> anyhow::Result<Figures> {
    let key = SealingKey::generate();
    let module = Arc::new(OutlookModule::with_options(
        microsoft_outlook::runtime::ModuleOptions {
            workers: delivers,
            ..module_options(16, "*/10 * * * * *")
        },
    ));
    let in_host: crm_host::app::ExtraRoutes = Arc::new(|cfg: &mut web::ServiceConfig| {
        cfg.route("/bench/trivial", web::post().to(trivial));
    });
    // Plain http, so that the session cookie is not marked Secure (wrk talks plain http).
    let config = crm_host::Config {
        public_base_url: Some("http://127.0.0.1".into()),
        ..host_config(&db.url)
    };
    let app = Application::build(
        config,
        HostOptions {
            modules: vec![module.clone()],
            clock: Arc::new(SystemClock),
            sealing_key: key.clone(),
            extra_routes: vec![in_host],
        },
    )
    .await?;
    let state = app.state();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());

    let password = "bench-pass";
    let email = "alice@contoso.example";
    let user =
        crm_host::seed::create_user(&state.db, email, "Alice Adams", password, false).await?;
    let contact = crm_host::seed::create_contact(
        &state.db,
        "Dana Fabrikam",
        Some(RECIPIENT),
        Some("Fabrikam"),
        user,
        false,
    )
    .await?;
    let azure = AzureApp::random();
    configure_module(&state.db, &state.sealer, &azure, "http://127.0.0.1:9").await?;
    state
        .registry
        .get(MODULE)
        .context("the module is not linked")?
        .module
        .migrate(&state.db)
        .await?;
    let servers = add_servers(&state.db, 1, sink.port()).await?;
    add_tokens(&state.db, &state.sealer, &servers, None).await?;
    state.registry.enable(MODULE).await?;
    let (cookie, csrf) = sign_in(&base, email, password).await?;

    // One wrk script for all three: the same JSON mail (about 2 KB), session and CSRF header.
    let body = serde_json::json!({
        "to": RECIPIENT,
        "subject": "Quote for the next quarter",
        "text_body": text_of(1900),
    })
    .to_string();
    let dir = std::env::temp_dir().join(format!("crm-bench-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Accept\"] = \"application/json\"\nwrk.headers[\"X-CSRF-Token\"] = {}\nwrk.headers[\"Cookie\"] = {}\n",
            lua_string(&body),
            lua_string(&csrf),
            lua_string(&cookie)
        ),
    )?;

    let bare = HttpServer::new(|| App::new().route("/trivial", web::post().to(trivial)))
        .disable_signals()
        .bind("127.0.0.1:0")?;
    let bare_port = bare
        .addrs()
        .first()
        .map(|a| a.port())
        .context("the trivial server has no address")?;
    let bare = bare.run();
    let bare_handle = bare.handle();
    let bare_task = tokio::spawn(bare);

    let measure = |url: String| {
        let script = script.clone();
        async move {
            wrk(&script, &url, connections, 1).await?;
            wrk(&script, &url, connections, secs).await
        }
    };
    let result = async {
        // The host that does not deliver is measured for its route only.
        let (trivial, trivial_in_host) = if delivers {
            (
                measure(format!("http://127.0.0.1:{bare_port}/trivial")).await?,
                measure(format!("{base}/bench/trivial")).await?,
            )
        } else {
            (Load::default(), Load::default())
        };
        let before = setup::count_status(&state.db, "queued").await?
            + setup::count_status(&state.db, "sending").await?
            + setup::count_status(&state.db, "sent").await?;
        let route_url = format!("{base}/microsoft_outlook/records/contact/{contact}/mails");
        wrk(&script, &route_url, connections, 1).await?;
        let warm = setup::count_status(&state.db, "queued").await?
            + setup::count_status(&state.db, "sending").await?
            + setup::count_status(&state.db, "sent").await?;
        let route = wrk(&script, &route_url, connections, secs).await?;
        let after = setup::count_status(&state.db, "queued").await?
            + setup::count_status(&state.db, "sending").await?
            + setup::count_status(&state.db, "sent").await?;
        anyhow::ensure!(warm > before, "the warm-up queued nothing");
        anyhow::Ok(Figures {
            route,
            trivial,
            trivial_in_host,
            queued: after - warm,
            route_web_only: None,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    bare_handle.stop(true).await;
    let _ = bare_task.await;
    handle.stop(true).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), server).await;
    state.db.clone().close().await?;
    result
}

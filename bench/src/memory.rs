//! Memory: peak RSS (VmHWM) of the real release `crm-host serve` process draining 10,000
//! queued mails from a database the bench prepared.

use anyhow::Context as _;
use crm_sdk::SealingKey;
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::services::Sink;
use crate::setup::{
    App, BenchDb, DbKind, add_servers, add_tokens, assemble, configure_module, host_config,
    mark_enabled, module_options, queue_mails,
};

/// What the memory benchmark measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Peak resident set (VmHWM) in MiB.
    pub peak_mib: f64,
    /// Resident set right after start-up, before the first mail went out, in MiB.
    pub idle_mib: f64,
    /// Seconds from spawning the process until every mail was marked sent.
    pub secs: f64,
    /// Mails drained.
    pub count: usize,
    /// Mails sent whose row stayed `sending` (their status write failed).
    pub unsettled: usize,
}

/// The `crm-host` binary beside this one (the same release build), unless given.
pub fn default_host_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("the bench binary has no directory")?;
    Ok(dir.join("crm-host"))
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Runs the memory benchmark with `count` mails of `size` bytes over `mailboxes` mailboxes.
pub async fn run(
    sink: &Sink,
    host_bin: &Path,
    count: usize,
    mailboxes: usize,
    size: usize,
) -> anyhow::Result<Figures> {
    anyhow::ensure!(
        host_bin.is_file(),
        "{} not found: build it with `cargo build --release -p crm-host`",
        host_bin.display()
    );
    let db = BenchDb::create(DbKind::Sqlite, "").await?;
    let result = run_on(&db, sink, host_bin, count, mailboxes, size).await;
    db.remove().await?;
    result
}

async fn run_on(
    db: &BenchDb,
    sink: &Sink,
    host_bin: &Path,
    count: usize,
    mailboxes: usize,
    size: usize,
) -> anyhow::Result<Figures> {
    let dir = db.dir().context("a SQLite database has a directory")?;
    let key = SealingKey::generate();
    {
        let a = assemble(
            &host_config(&db.url),
            &key,
            module_options(16, "*/10 * * * * *"),
        )
        .await?;
        configure_module(&a.db, &a.sealer, &App::random(), "http://127.0.0.1:9").await?;
        let servers = add_servers(&a.db, mailboxes, sink.port()).await?;
        add_tokens(&a.db, &a.sealer, &servers, None).await?;
        queue_mails(&a.db, &servers, count, size).await?;
        mark_enabled(&a.db).await?;
        a.db.close().await?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(dir.join("crm-host.log"))?;
    let before = sink.received();
    let dups_before = sink.duplicates();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(host_bin)
        .arg("serve")
        .current_dir(dir)
        .env_remove("CRM_CONFIG")
        .env("CRM_DATABASE_URL", &db.url)
        .env("CRM_SEALING_KEY", key.to_base64().expose_secret())
        .env("CRM_BIND", format!("127.0.0.1:{port}"))
        .env("CRM_PUBLIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("CRM_OUTLOOK__SWEEP_SCHEDULE", "*/1 * * * * *")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("crm-host exited at once")?;
    let result = async {
        let client = reqwest::Client::new();
        let health = format!("http://127.0.0.1:{port}/health");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(answer) = client.get(&health).send().await
                && answer.status().is_success()
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "crm-host did not answer /health (see its log)"
            );
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("crm-host exited with {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let idle_kib = status_kib(pid, "VmRSS:")?;
        sink.wait_for(before + count, Duration::from_secs(300))
            .await?;
        let check = crm_host::db::connect(&db.url, 1).await?;
        let unsettled = crate::drain::settle(&check, count, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "the sink got {}, {} duplicates",
                    sink.received() - before,
                    sink.duplicates() - dups_before
                )
            })?;
        let secs = started.elapsed().as_secs_f64();
        check.close().await?;
        let peak_kib = status_kib(pid, "VmHWM:")?;
        Ok(Figures {
            peak_mib: peak_kib as f64 / 1024.0,
            idle_mib: idle_kib as f64 / 1024.0,
            secs,
            count,
            unsettled,
        })
    }
    .await;
    // Stop it as an operator would (SIGTERM), by its id; kill it if it does not stop.
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let keep_log = match &result {
        Ok(f) => f.unsettled > 0,
        Err(_) => true,
    };
    if keep_log && let Ok(log) = std::fs::read_to_string(dir.join("crm-host.log")) {
        let kept = std::env::temp_dir().join("crm-bench-memory-host.log");
        if std::fs::write(&kept, &log).is_ok() {
            eprintln!("crm-host's log is kept at {}", kept.display());
        }
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("locked")
                    || l.contains("fail")
            })
            .take(20)
            .collect();
        eprintln!("crm-host log (last warnings and errors):");
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
    }
    result
}

//! The drain as deployed: the real release `crm-host serve` process (its own apalis workers and
//! drain dispatcher, default settings; the per-minute throttle is off in the module's settings)
//! started on a database the bench prepared with the queued mails, draining them into the sink.
//!
//! Timing, from the database (not from process start): a poller on a connection of its own asks
//! every [`POLL`] for the outbox rows in `sending`; the first time it finds any, the drain has
//! begun, and the start is the earliest `updated_at` among them, which the claim statement wrote
//! with the module's own clock when it ran (so the start is exact, not late by the poll). The
//! poller then stops until the sink has received every mail, and asks again every [`POLL`] how
//! many rows are `sent`; the end is the bench's clock when it first finds all of them (late by
//! at most one poll and one query, so the figure is if anything a little low). The latest
//! `sent_at`, which the last outcome statement wrote with the module's clock, is kept as a
//! check. The peak resident set is the process's VmHWM, read once the outbox was drained.
//!
//! For profiling: `BENCH_PERF=FILE` records the machine with `perf record -a -g` from the first
//! claim seen to the end (only the first run's file survives: each run overwrites it);
//! `BENCH_KEEP_HOST_LOG=1` keeps every run's `crm-host` log.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use crm_sdk::SealingKey;
use microsoft_outlook::entities::outbox;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::drain::Run;
use crate::services::Sink;
use crate::setup::count_status;

/// How often the poller asks the outbox (only before the first claim and after the sink got
/// every mail).
pub const POLL: Duration = Duration::from_millis(2);

/// One drain by a `crm-host serve` process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeRun {
    /// Mails drained.
    pub count: usize,
    /// Seconds from the first claim to the last outcome written.
    pub secs: f64,
    /// Seconds from the first claim to the latest `sent_at` (the module's own timestamps).
    pub stamped_secs: f64,
    /// Seconds from spawning the process to its first claim.
    pub startup_secs: f64,
    /// Peak resident set (VmHWM), MiB.
    pub peak_mib: f64,
    /// Resident set when the first claim was seen, MiB.
    pub claim_rss_mib: f64,
    /// Rows already `sent` when the poller first saw a claim (0 unless the poll came late, in
    /// which case the start may be late too).
    pub sent_when_seen: usize,
    /// Mails the sink got whose row stayed `sending`.
    pub unsettled: usize,
    /// Mails the sink got more than once.
    pub duplicates: usize,
}

impl ServeRun {
    /// As a [`Run`] (for the rates).
    pub fn run(&self) -> Run {
        Run {
            count: self.count,
            secs: self.secs,
            unsettled: self.unsettled,
        }
    }
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

/// The claim times of the rows in `sending` now (empty before the first claim).
async fn claim_times(db: &DatabaseConnection) -> Result<Vec<DateTime<Utc>>, sea_orm::DbErr> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::UpdatedAt)
        .filter(outbox::Column::Status.eq("sending"))
        .limit(5000)
        .into_tuple::<DateTime<Utc>>()
        .all(db)
        .await
}

/// The latest `sent_at`.
async fn last_sent_at(db: &DatabaseConnection) -> anyhow::Result<Option<DateTime<Utc>>> {
    let times: Vec<Option<DateTime<Utc>>> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::SentAt)
        .filter(outbox::Column::Status.eq("sent"))
        .order_by_desc(outbox::Column::SentAt)
        .limit(1)
        .into_tuple()
        .all(db)
        .await?;
    Ok(times.into_iter().flatten().next())
}

fn secs_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// Starts `crm-host serve` on `url` (prepared: the module enabled and configured, `count`
/// mails queued), times its drain into `sink`, and stops it (SIGTERM, by its id). Its log
/// goes to `log_dir/crm-host.log` and is kept on a failure.
pub async fn run(
    url: &str,
    key: &SealingKey,
    host_bin: &Path,
    sink: &Sink,
    count: usize,
    log_dir: &Path,
) -> anyhow::Result<ServeRun> {
    anyhow::ensure!(
        host_bin.is_file(),
        "{} not found: build it with `cargo build --release -p crm-host`",
        host_bin.display()
    );
    std::fs::create_dir_all(log_dir)?;
    let poll = crm_host::db::connect(url, 1).await?;
    anyhow::ensure!(
        count_status(&poll, "queued").await? as usize == count,
        "the outbox does not hold {count} queued mails"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log_path = log_dir.join("crm-host.log");
    let log = std::fs::File::create(&log_path)?;
    let before = sink.received();
    let copies_before = sink.copies();
    let spawned = Utc::now();
    // Default settings: no CRM_OUTLOOK__ tunables, the default pool, log level and workers.
    let mut child = tokio::process::Command::new(host_bin)
        .arg("serve")
        .current_dir(log_dir)
        .env_remove("CRM_CONFIG")
        .env_remove("CRM_LOG")
        .env("CRM_DATABASE_URL", url)
        .env("CRM_SEALING_KEY", key.to_base64().expose_secret())
        .env("CRM_BIND", format!("127.0.0.1:{port}"))
        .env("CRM_PUBLIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("crm-host exited at once")?;
    let result = async {
        // Until the first claim: poll for rows in `sending`.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (first_claim, claim_rss_kib) = loop {
            if let Ok(times) = claim_times(&poll).await
                && let Some(first) = times.iter().min()
            {
                break (*first, status_kib(pid, "VmRSS:").unwrap_or(0));
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("crm-host exited with {status} before claiming a mail");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "crm-host claimed no mail within 60 s"
            );
            tokio::time::sleep(POLL).await;
        };
        let sent_when_seen = count_status(&poll, "sent").await? as usize;
        // For profiling: `BENCH_PERF=FILE` records the whole machine with `perf` from the first
        // claim until the end.
        let perf = match std::env::var_os("BENCH_PERF") {
            Some(file) => Some(
                tokio::process::Command::new("perf")
                    .args(["record", "-a", "-g", "-F", "1999", "-o"])
                    .arg(file)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("starting perf")?,
            ),
            None => None,
        };
        // Until the sink has every mail: only the sink's counter is read.
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut checked = Instant::now();
        while sink.received() < before + count {
            if checked.elapsed() > Duration::from_millis(500) {
                checked = Instant::now();
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("crm-host exited with {status} while draining");
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the sink got {} of {count} mails in 300 s",
                sink.received() - before
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Until every row is `sent`: poll.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (ended, unsettled) = loop {
            let sent = count_status(&poll, "sent").await? as usize;
            let now = Utc::now();
            if sent >= count {
                break (now, 0);
            }
            if Instant::now() >= deadline {
                let sending = count_status(&poll, "sending").await? as usize;
                anyhow::ensure!(
                    sent + sending == count,
                    "the outbox did not settle: {}",
                    crate::setup::statuses(&poll).await
                );
                break (now, sending);
            }
            tokio::time::sleep(POLL).await;
        };
        if let Some(mut perf) = perf
            && let Some(id) = perf.id()
        {
            let _ = tokio::process::Command::new("kill")
                .args(["-INT", &id.to_string()])
                .status()
                .await;
            let _ = perf.wait().await;
        }
        let peak_kib = status_kib(pid, "VmHWM:")?;
        let stamped = last_sent_at(&poll).await?.unwrap_or(ended);
        Ok(ServeRun {
            count,
            secs: secs_between(first_claim, ended),
            stamped_secs: secs_between(first_claim, stamped),
            startup_secs: secs_between(spawned, first_claim),
            peak_mib: peak_kib as f64 / 1024.0,
            claim_rss_mib: claim_rss_kib as f64 / 1024.0,
            sent_when_seen,
            unsettled,
            duplicates: sink.duplicates_since(&copies_before),
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
    poll.close().await?;
    let keep_log = std::env::var_os("BENCH_KEEP_HOST_LOG").is_some()
        || match &result {
            Ok(r) => r.unsettled > 0 || r.duplicates > 0,
            Err(_) => true,
        };
    if keep_log && let Ok(log) = std::fs::read_to_string(&log_path) {
        let kept = std::env::temp_dir().join(format!("crm-bench-serve-{pid}.log"));
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

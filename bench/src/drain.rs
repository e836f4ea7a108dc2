//! Drain: the module's per-mail path (claim, token lookup, XOAUTH2 send, status update) versus
//! a raw lettre loop and Postfix's `smtp-source`, all into the same sink.

use anyhow::Context as _;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use microsoft_outlook::deliver::{Delivered, deliver};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::services::Sink;
use crate::setup::{Assembled, MODULE, count_status};

/// One timed run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Items done.
    pub count: usize,
    /// Wall-clock seconds.
    pub secs: f64,
    /// Mails the sink accepted whose outbox row was not marked sent (the status write failed).
    pub unsettled: usize,
}

impl Run {
    /// A run of `count` items in `secs` seconds.
    pub fn new(count: usize, secs: f64) -> Self {
        Self {
            count,
            secs,
            unsettled: 0,
        }
    }

    /// Items per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.count as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Waits (at most `limit`) until no outbox row is queued and `expected` rows are sent or
/// sending; returns how many are left `sending` (their status write failed after the send).
pub async fn settle(
    db: &sea_orm::DatabaseConnection,
    expected: usize,
    limit: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let sent = count_status(db, "sent").await? as usize;
        if sent >= expected {
            return Ok(0);
        }
        let sending = count_status(db, "sending").await? as usize;
        let queued = count_status(db, "queued").await? as usize;
        if Instant::now() >= deadline {
            anyhow::ensure!(
                queued == 0 && sent + sending == expected,
                "the outbox did not settle: {}",
                crate::setup::statuses(db).await
            );
            return Ok(sending);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Delivers `ids` with the module's `deliver::deliver` from `concurrency` tokio tasks.
pub async fn module_direct(
    a: &Assembled,
    ids: &[i64],
    concurrency: usize,
    sink: &Sink,
) -> anyhow::Result<Run> {
    let before = sink.received();
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ids, next) = (ids.clone(), next.clone());
            let (ctx, shared) = (a.ctx.clone(), a.shared.clone());
            tokio::spawn(async move {
                let mut problems = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    match deliver(&ctx, &shared, *id).await {
                        Ok(Delivered::Sent) => {}
                        Ok(other) => problems.push(format!("mail {id}: {other:?}")),
                        Err(e) => problems.push(format!("mail {id}: {e}")),
                    }
                }
                problems
            })
        })
        .collect();
    let mut problems = Vec::new();
    for task in tasks {
        problems.extend(task.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    sink.wait_for(before + ids.len(), Duration::from_secs(10))
        .await
        .with_context(|| {
            format!(
                "{} deliveries did not end in Sent (first: {})",
                problems.len(),
                problems.first().map_or("none", String::as_str)
            )
        })?;
    let unsettled = settle(&a.db, ids.len(), Duration::from_secs(5)).await?;
    if let Some(first) = problems.first() {
        eprintln!(
            "  {} deliveries returned an error after the send (first: {first})",
            problems.len()
        );
    }
    Ok(Run {
        count: ids.len(),
        secs,
        unsettled,
    })
}

/// Pushes one apalis job per mail while the module is stopped, then enables it (which starts
/// its apalis delivery workers with `delivery_concurrency`) and times until every mail reached
/// the sink and its row was settled.
pub async fn module_apalis(a: &Assembled, ids: &[i64], sink: &Sink) -> anyhow::Result<Run> {
    let before = sink.received();
    let pool = match a.db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            microsoft_outlook_jobs::QueuePool::Postgres(a.db.get_postgres_connection_pool().clone())
        }
        _ => microsoft_outlook_jobs::QueuePool::Sqlite(a.db.get_sqlite_connection_pool().clone()),
    };
    let queue = microsoft_outlook_jobs::MailQueue::setup(&pool).await?;
    queue.push(ids).await?;
    let started = Instant::now();
    a.registry.enable(MODULE).await?;
    sink.wait_for(before + ids.len(), Duration::from_secs(300))
        .await?;
    let unsettled = settle(&a.db, ids.len(), Duration::from_secs(10)).await?;
    let secs = started.elapsed().as_secs_f64();
    a.registry.disable(MODULE).await?;
    anyhow::ensure!(
        sink.received() - before == ids.len(),
        "the sink received {} messages, {} expected",
        sink.received() - before,
        ids.len()
    );
    Ok(Run {
        count: ids.len(),
        secs,
        unsettled,
    })
}

/// Baseline (a): the same messages, prebuilt, sent by `concurrency` tokio tasks over reused
/// lettre connections opened with `TCP_NODELAY` (XOAUTH2 as the module does), no database.
pub async fn raw_loop(
    messages: Arc<Vec<(Envelope, Vec<u8>)>>,
    mailboxes: &[String],
    port: u16,
    concurrency: usize,
    sink: &Sink,
) -> anyhow::Result<Run> {
    let before = sink.received();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (messages, next) = (messages.clone(), next.clone());
            let mailbox = mailboxes[t % mailboxes.len()].clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                tcp.set_nodelay(true)?;
                let hello = ClientId::Domain("bench.localdomain".into());
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await?;
                conn.auth(
                    &[Mechanism::Xoauth2],
                    &Credentials::new(mailbox, "bench-access-token".into()),
                )
                .await?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((envelope, raw)) = messages.get(i) else {
                        break;
                    };
                    conn.send(envelope, raw).await?;
                }
                let _ = conn.quit().await;
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    sink.wait_for(before + messages.len(), Duration::from_secs(10))
        .await?;
    Ok(Run::new(messages.len(), secs))
}

/// Where Postfix's `smtp-source` is, if installed.
pub fn smtp_source_path() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/sbin/smtp-source")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("smtp-source")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Baseline (b): `smtp-source -d -s CONCURRENCY -m COUNT -l SIZE` into the sink.
pub async fn smtp_source(
    count: usize,
    concurrency: usize,
    size: usize,
    sink: &Sink,
) -> anyhow::Result<Run> {
    let path = smtp_source_path().context(
        "smtp-source is not installed (Debian package postfix; bench/run.sh installs it)",
    )?;
    let before = sink.received();
    let started = Instant::now();
    let output = tokio::process::Command::new(&path)
        .args([
            "-d",
            "-s",
            &concurrency.to_string(),
            "-m",
            &count.to_string(),
            "-l",
            &size.to_string(),
            &format!("127.0.0.1:{}", sink.port()),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        output.status.success(),
        "smtp-source failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    sink.wait_for(before + count, Duration::from_secs(10))
        .await?;
    Ok(Run::new(count, secs))
}

//! Drain: the module's drain (claim a batch of one mailbox's due mails, token once per batch,
//! XOAUTH2 sends over up to three connections, outcomes written per kind) versus a raw lettre
//! loop and Postfix's `smtp-source`, all into the same sink.

use anyhow::Context as _;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use microsoft_outlook::delivery::drains;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::services::Sink;
use crate::setup::{Assembled, count_status};

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

/// The module's real drain, in this process: `delivery::drains::run` for every mailbox at
/// once (one tokio task per mailbox, as the dispatcher starts them), each claiming batches of
/// its mailbox's due mails, taking the token once per batch, sending over up to three
/// connections and writing the outcomes per kind. Timed until every task ended (no mail of its
/// mailbox due), every mail reached the sink and every row is `sent`.
pub async fn module_drains(
    a: &Assembled,
    server_ids: &[i32],
    count: usize,
    sink: &Sink,
) -> anyhow::Result<Run> {
    let before = sink.received();
    let copies_before = sink.copies();
    // The drains run only while the module is started (`stopping` is false): a wake channel
    // does that without starting the apalis workers or the sweep. Wakes sent to it (a mailbox
    // at its per-minute limit; none here) are dropped.
    let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    a.shared.set_wake(Some(wake_tx));
    let started = Instant::now();
    let tasks: Vec<_> = server_ids
        .iter()
        .map(|&server_id| {
            let (ctx, shared) = (a.ctx.clone(), a.shared.clone());
            tokio::spawn(async move { drains::run(&ctx, &shared, server_id).await })
        })
        .collect();
    let mut problems = Vec::new();
    for task in tasks {
        if let Err(e) = task.await? {
            problems.push(e.to_string());
        }
    }
    let waited = async {
        sink.wait_for(before + count, Duration::from_secs(60))
            .await
            .context("the sink did not get every mail")?;
        settle(&a.db, count, Duration::from_secs(10)).await
    }
    .await;
    let secs = started.elapsed().as_secs_f64();
    a.shared.set_wake(None);
    drop(wake_rx);
    // Its connections' slots are given back, so that the next path (a serve process on the same
    // database) finds every slot free.
    a.shared.smtp.close_all(&a.db).await;
    if let Some(first) = problems.first() {
        anyhow::bail!(
            "{} drain(s) ended with a database error (first: {first})",
            problems.len()
        );
    }
    let unsettled = waited?;
    let duplicates = sink.duplicates_since(&copies_before);
    if duplicates > 0 {
        eprintln!("  the sink received {duplicates} mail(s) of the module's drains twice");
    }
    Ok(Run {
        count,
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

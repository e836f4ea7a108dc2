//! `crm-bench`: how close the microsoft_outlook module runs to the limits of its parts. Every
//! figure is a ratio against a baseline measured in the same run on the same machine.
//!
//! `crm-bench all` runs every benchmark and rewrites BENCHMARKS.md; the other subcommands run
//! one benchmark and only print (for profiling).

mod drain;
mod enqueue;
mod probe;
mod refresh;
mod report;
mod serve;
mod services;
mod setup;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use crm_sdk::SealingKey;
use microsoft_outlook::runtime::ModuleOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use report::{Drain, Refresh, Results, median_rate, rates};
use services::{Idp, Sink};
use setup::{
    App, BenchDb, DbKind, add_servers, add_tokens, assemble, configure_module, host_config,
    mailbox_address, mark_enabled, module_options, queue_afresh, queue_mails,
};

/// What BENCHMARKS.md says besides the figures (profiling notes, what was tried).
const FINDINGS: &str = include_str!("findings.md");

#[derive(Parser, Debug)]
#[command(
    name = "crm-bench",
    about = "Benchmarks of the microsoft_outlook module"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Mails per drain (the serve runs' figure is also the memory benchmark's).
    #[arg(long, global = true, default_value_t = 10_000)]
    messages: usize,
    /// Mailboxes the mails are spread over.
    #[arg(long, global = true, default_value_t = 10)]
    mailboxes: usize,
    /// Concurrent sends of the baselines (raw-loop tasks, smtp-source sessions) and wrk
    /// connections. The module's drains send over up to 3 connections per mailbox.
    #[arg(long, global = true, default_value_t = 16)]
    concurrency: usize,
    /// Bytes per mail (the whole message).
    #[arg(long, global = true, default_value_t = 2048)]
    size: usize,
    /// Runs per figure (the median is reported).
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// PostgreSQL URL of a role that may create databases (a fresh `bench_<random>` is made).
    #[arg(
        long,
        global = true,
        env = "BENCH_PG",
        default_value = "postgres://crm:crm@127.0.0.1:5432/crm_test"
    )]
    pg: String,
    /// Worker threads of the SMTP sink's runtime.
    #[arg(long, global = true, default_value_t = 2)]
    sink_threads: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every benchmark; rewrites BENCHMARKS.md.
    All {
        /// Where to write the report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// The release crm-host binary (default: beside this one).
        #[arg(long)]
        host_bin: Option<PathBuf>,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        enqueue_secs: u64,
        /// Mailboxes in the refresh benchmark.
        #[arg(long, default_value_t = 10_000)]
        refresh_mailboxes: usize,
    },
    /// Drain: the module (in this process, and as `crm-host serve`) versus the raw loop (and
    /// smtp-source on SQLite).
    Drain {
        /// The database.
        #[arg(long, value_enum, default_value = "sqlite")]
        db: DbKind,
        /// Only the module's paths (no baselines), for profiling.
        #[arg(long)]
        module_only: bool,
        /// Leave out the `crm-host serve` path.
        #[arg(long)]
        no_serve: bool,
        /// Leave out the in-process drain.
        #[arg(long)]
        no_in_process: bool,
        /// The release crm-host binary (default: beside this one).
        #[arg(long)]
        host_bin: Option<PathBuf>,
    },
    /// Memory with large files: `crm-host serve` draining 100 mails of 20 MB files.
    Attachments {
        /// The release crm-host binary (default: beside this one).
        #[arg(long)]
        host_bin: Option<PathBuf>,
    },
    /// Refresh: refresh_all versus a raw loop of the same POSTs.
    Refresh {
        /// Connected mailboxes.
        #[arg(long, default_value_t = 10_000)]
        mailboxes: usize,
    },
    /// Enqueue: the queue route versus a trivial handler, under wrk.
    Enqueue {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
    /// Profiling: the latency of each database step of the drain, batch by batch, no sending.
    Probe {
        /// The database.
        #[arg(long, value_enum, default_value = "sqlite")]
        db: DbKind,
        /// Connections in the pool.
        #[arg(long, default_value_t = 8)]
        conns: u32,
    },
}

/// Which paths a drain benchmark runs.
#[derive(Debug, Clone, Copy)]
struct Paths<'a> {
    /// The raw lettre loop (a).
    raw: bool,
    /// smtp-source (b).
    source: bool,
    /// The module's drains in this process.
    in_process: bool,
    /// `crm-host serve`, with this binary.
    serve: Option<&'a Path>,
}

async fn drain_bench(
    cli: &Cli,
    kind: DbKind,
    sink: &Sink,
    paths: Paths<'_>,
) -> anyhow::Result<Drain> {
    let db = BenchDb::create(kind, &cli.pg).await?;
    let result = drain_on(cli, &db, sink, paths).await;
    db.remove().await?;
    result
}

async fn drain_on(cli: &Cli, db: &BenchDb, sink: &Sink, paths: Paths<'_>) -> anyhow::Result<Drain> {
    let key = SealingKey::generate();
    // The in-process drains need neither the sweep nor the apalis workers (the module is not
    // enabled in this process); `delivery_concurrency` is the default, 16 (>= the mailboxes).
    let a = assemble(
        &host_config(&db.url),
        &key,
        module_options(ModuleOptions::default().delivery_concurrency, "0 0 0 1 1 *"),
    )
    .await?;
    configure_module(&a.db, &a.sealer, &App::random(), "http://127.0.0.1:9").await?;
    let servers = add_servers(&a.db, cli.mailboxes, sink.port()).await?;
    add_tokens(&a.db, &a.sealer, &servers, None).await?;
    let ids = queue_mails(&a.db, &servers, cli.messages, cli.size).await?;
    // A `crm-host serve` started on this database resumes the module.
    mark_enabled(&a.db).await?;
    let messages = Arc::new(setup::prebuilt_messages(&a.db).await?);
    let mailboxes: Vec<String> = servers.iter().map(|s| s.mailbox.clone()).collect();
    let server_ids: Vec<i32> = servers.iter().map(|s| s.id).collect();
    let log_dir = match db.dir() {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!(
            "crm-bench-serve-{}-{}",
            db.kind.name(),
            std::process::id()
        )),
    };
    let mut figures = Drain::default();
    let name = db.kind.name();
    // Whether the outbox holds the mails just queued (each module path drains a fresh queue).
    let mut fresh = true;
    let result = async {
        for round in 0..cli.runs.max(1) {
            let n = round + 1;
            if paths.raw {
                let raw = drain::raw_loop(
                    messages.clone(),
                    &mailboxes,
                    sink.port(),
                    cli.concurrency,
                    sink,
                )
                .await
                .context("raw loop")?;
                println!("drain-{name} run {n}: raw loop {:.0} mails/s", raw.rate());
                figures.raw.push(raw);
            }
            if paths.source {
                let source = drain::smtp_source(cli.messages, cli.concurrency, cli.size, sink)
                    .await
                    .context("smtp-source")?;
                println!(
                    "drain-{name} run {n}: smtp-source {:.0} mails/s",
                    source.rate()
                );
                figures.source.push(source);
            }
            if paths.in_process {
                if !fresh {
                    queue_afresh(&a.db, &servers, cli.messages, cli.size).await?;
                }
                fresh = false;
                let module = drain::module_drains(&a, &server_ids, ids.len(), sink)
                    .await
                    .context("the module's drains in this process")?;
                println!(
                    "drain-{name} run {n}: module in process {:.0} mails/s",
                    module.rate()
                );
                figures.module.push(module);
            }
            if let Some(host_bin) = paths.serve {
                if !fresh {
                    queue_afresh(&a.db, &servers, cli.messages, cli.size).await?;
                }
                fresh = false;
                let serve = serve::run(&db.url, &key, host_bin, sink, ids.len(), &log_dir)
                    .await
                    .context("crm-host serve")?;
                println!(
                    "drain-{name} run {n}: crm-host serve {:.0} mails/s (first claim to last \
                     outcome {:.3} s; by the module's timestamps {:.3} s; first claim {:.2} s \
                     after spawn; {} sent when it was seen), peak RSS {:.1} MiB (at the first claim \
                     {:.1} MiB)",
                    serve.run().rate(),
                    serve.secs,
                    serve.stamped_secs,
                    serve.startup_secs,
                    serve.sent_when_seen,
                    serve.peak_mib,
                    serve.claim_rss_mib
                );
                figures.serve.push(serve);
            }
        }
        anyhow::Ok(())
    }
    .await;
    if db.dir().is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    a.db.close().await?;
    result.map(|()| figures)
}

/// Mails in the attachments benchmark, and the size of each one's file (the issue's figure).
const FILE_MAILS: usize = 100;
const FILE_BYTES: usize = 20_000_000;

/// Memory with large files: a release `crm-host serve` on SQLite draining [`FILE_MAILS`] mails
/// that each carry a [`FILE_BYTES`] file, with its peak RSS.
async fn attachments_bench(
    cli: &Cli,
    sink: &Sink,
    host_bin: &Path,
) -> anyhow::Result<report::Attach> {
    let db = BenchDb::create(DbKind::Sqlite, &cli.pg).await?;
    let result = async {
        let key = SealingKey::generate();
        let a = assemble(
            &host_config(&db.url),
            &key,
            module_options(ModuleOptions::default().delivery_concurrency, "0 0 0 1 1 *"),
        )
        .await?;
        configure_module(&a.db, &a.sealer, &App::random(), "http://127.0.0.1:9").await?;
        let servers = add_servers(&a.db, cli.mailboxes.min(FILE_MAILS), sink.port()).await?;
        add_tokens(&a.db, &a.sealer, &servers, None).await?;
        let message_bytes = setup::queue_with_file(&a.db, &servers, FILE_MAILS, FILE_BYTES).await?;
        mark_enabled(&a.db).await?;
        a.db.close().await?;
        let log_dir = db.dir().map_or_else(std::env::temp_dir, Path::to_path_buf);
        let run = serve::run(&db.url, &key, host_bin, sink, FILE_MAILS, &log_dir)
            .await
            .context("crm-host serve")?;
        println!(
            "attachments: {FILE_MAILS} mails of {:.1} MB ({} MB files) drained by crm-host serve in \
             {:.1} s, peak RSS {:.1} MiB",
            message_bytes as f64 / 1e6,
            FILE_BYTES / 1_000_000,
            run.secs,
            run.peak_mib
        );
        anyhow::Ok(report::Attach {
            mails: FILE_MAILS,
            file_bytes: FILE_BYTES,
            message_bytes,
            run,
        })
    }
    .await;
    db.remove().await?;
    result
}

async fn refresh_bench(cli: &Cli, mailboxes: usize) -> anyhow::Result<Refresh> {
    let db = BenchDb::create(DbKind::Sqlite, &cli.pg).await?;
    let result = refresh_on(cli, &db, mailboxes).await;
    db.remove().await?;
    result
}

async fn refresh_on(cli: &Cli, db: &BenchDb, mailboxes: usize) -> anyhow::Result<Refresh> {
    let key = SealingKey::generate();
    let app = App::random();
    let redirect_uri = format!(
        "{}{}",
        setup::PUBLIC_BASE_URL,
        microsoft_outlook::CONFIRM_PATH
    );
    let idp = Idp::start(&app.client_id, &app.client_secret, &redirect_uri).await?;
    let result = async {
        let a = assemble(
            &host_config(&db.url),
            &key,
            module_options(cli.concurrency, "0 0 0 1 1 *"),
        )
        .await?;
        configure_module(&a.db, &a.sealer, &app, &idp.platform.authority_url()).await?;
        let servers = add_servers(&a.db, mailboxes, 9).await?;
        let names: Vec<String> = (0..mailboxes).map(mailbox_address).collect();
        let started = Instant::now();
        let refresh_tokens =
            refresh::issue_refresh_tokens(&idp, &app, &redirect_uri, &names).await?;
        add_tokens(&a.db, &a.sealer, &servers, Some(&refresh_tokens)).await?;
        println!(
            "refresh: {mailboxes} mailboxes connected in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let mut figures = Refresh {
            mailboxes,
            ..Refresh::default()
        };
        for round in 0..cli.runs.max(1) {
            let raw = refresh::raw_loop(&a, &idp, &app, &refresh_tokens).await?;
            println!("refresh run {}: raw loop {:.0} /s", round + 1, raw.rate());
            figures.raw.push(raw);
            let module = refresh::module(&a, mailboxes).await?;
            println!("refresh run {}: module {:.0} /s", round + 1, module.rate());
            figures.module.push(module);
        }
        a.db.close().await?;
        anyhow::Ok(figures)
    }
    .await;
    idp.stop().await;
    result
}

fn print_drain(name: &str, d: &Drain) {
    let stuck = report::unsettled(&d.module) + d.serve.iter().map(|r| r.unsettled).sum::<usize>();
    if stuck > 0 {
        println!("drain-{name}: {stuck} mails sent but left `sending` (status write failed)");
    }
    let raw = median_rate(&d.raw);
    let ratio = |x: f64, base: f64| if base > 0.0 { x / base } else { 0.0 };
    println!(
        "drain-{name}: raw loop {raw:.0} mails/s [{}]",
        rates(&d.raw)
    );
    if !d.module.is_empty() {
        let module = median_rate(&d.module);
        println!(
            "drain-{name}: module in process {module:.0} mails/s [{}], ratio {:.2}",
            rates(&d.module),
            ratio(module, raw)
        );
    }
    if !d.serve.is_empty() {
        let serve = median_rate(&d.serve_runs());
        let peaks: Vec<String> = d
            .serve
            .iter()
            .map(|r| format!("{:.1}", r.peak_mib))
            .collect();
        println!(
            "drain-{name}: crm-host serve {serve:.0} mails/s [{}], ratio {:.2}; peak RSS MiB [{}]",
            rates(&d.serve_runs()),
            ratio(serve, raw),
            peaks.join(", ")
        );
    }
    if !d.source.is_empty() {
        let source = median_rate(&d.source);
        println!(
            "drain-{name}: smtp-source {source:.0} mails/s [{}], module in process / smtp-source {:.2}",
            rates(&d.source),
            ratio(median_rate(&d.module), source)
        );
    }
}

fn print_enqueue(e: &enqueue::Figures) {
    for (name, l) in [
        ("queue route", e.route),
        ("trivial (bare actix)", e.trivial),
        ("trivial in host", e.trivial_in_host),
    ]
    .into_iter()
    .chain(
        e.route_web_only
            .map(|l| ("queue route, host that does not deliver", l)),
    ) {
        println!(
            "enqueue: {name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, CPU {:.0} µs/request",
            l.rps, l.p50_ms, l.p99_ms, l.cpu_us_per_request
        );
    }
    println!(
        "enqueue: route / trivial in host {:.2}, route / bare actix {:.2} (queued {} mails)",
        e.route.rps / e.trivial_in_host.rps.max(1e-9),
        e.route.rps / e.trivial.rps.max(1e-9),
        e.queued
    );
}

/// Keeps a benchmark's error as text (the others still run).
fn keep<T>(result: anyhow::Result<T>, what: &str) -> Result<T, String> {
    result.map_err(|e| {
        eprintln!("{what} FAILED: {e:#}");
        format!("{e:#}")
    })
}

async fn all(
    cli: &Cli,
    out: &PathBuf,
    host_bin: Option<PathBuf>,
    enqueue_secs: u64,
    refresh_mailboxes: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let host_bin = match host_bin {
        Some(p) => p,
        None => serve::default_host_bin()?,
    };
    let sink = Sink::start(cli.sink_threads).await?;
    let paths = Paths {
        raw: true,
        source: true,
        in_process: true,
        serve: Some(&host_bin),
    };
    let mut results = Results::default();
    println!("== drain on SQLite");
    let r = keep(
        drain_bench(cli, DbKind::Sqlite, &sink, paths).await,
        "drain-sqlite",
    );
    if let Ok(d) = &r {
        print_drain("sqlite", d);
    }
    results.drain_sqlite = Some(r);
    println!("== drain on PostgreSQL");
    let r = keep(
        drain_bench(cli, DbKind::Postgres, &sink, paths).await,
        "drain-postgres",
    );
    if let Ok(d) = &r {
        print_drain("postgres", d);
    }
    results.drain_postgres = Some(r);
    println!(
        "== attachments (memory with {FILE_MAILS} mails of {} MB files)",
        FILE_BYTES / 1_000_000
    );
    results.attachments = Some(keep(
        attachments_bench(cli, &sink, &host_bin).await,
        "attachments",
    ));
    println!("== refresh");
    results.refresh = Some(keep(refresh_bench(cli, refresh_mailboxes).await, "refresh"));
    println!("== enqueue");
    let r = keep(
        enqueue::run(&sink, cli.concurrency, enqueue_secs).await,
        "enqueue",
    );
    if let Ok(e) = &r {
        print_enqueue(e);
    }
    results.enqueue = Some(r);
    sink.stop().await;
    let setup = report::Setup {
        messages: cli.messages,
        mailboxes: cli.mailboxes,
        concurrency: cli.concurrency,
        size: cli.size,
        runs: cli.runs.max(1),
        enqueue_secs,
        connections: cli.concurrency,
        total_secs: started.elapsed().as_secs_f64(),
    };
    let text = report::render(&results, &setup, FINDINGS);
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {} in {:.0} s", out.display(), setup.total_secs);
    if let Some(table) = text.rfind("| benchmark |") {
        print!("{}", &text[table..]);
    }
    let failures = [
        results.drain_sqlite.as_ref().map(|r| r.is_err()),
        results.drain_postgres.as_ref().map(|r| r.is_err()),
        results.refresh.as_ref().map(|r| r.is_err()),
        results.enqueue.as_ref().map(|r| r.is_err()),
        results.attachments.as_ref().map(|r| r.is_err()),
    ]
    .into_iter()
    .filter(|f| *f == Some(true))
    .count();
    anyhow::ensure!(failures == 0, "{failures} benchmark(s) failed");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn,sqlx=error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match &cli.command {
        Command::All {
            out,
            host_bin,
            enqueue_secs,
            refresh_mailboxes,
        } => {
            all(
                &cli,
                out,
                host_bin.clone(),
                *enqueue_secs,
                *refresh_mailboxes,
            )
            .await
        }
        Command::Drain {
            db,
            module_only,
            no_serve,
            no_in_process,
            host_bin,
        } => {
            let host_bin = match host_bin {
                Some(p) => p.clone(),
                None => serve::default_host_bin()?,
            };
            let paths = Paths {
                raw: !module_only,
                source: !module_only,
                in_process: !no_in_process,
                serve: (!no_serve).then_some(host_bin.as_path()),
            };
            let sink = Sink::start(cli.sink_threads).await?;
            let d = drain_bench(&cli, *db, &sink, paths).await;
            sink.stop().await;
            print_drain(db.name(), &d?);
            Ok(())
        }
        Command::Attachments { host_bin } => {
            let host_bin = match host_bin {
                Some(p) => p.clone(),
                None => serve::default_host_bin()?,
            };
            let sink = Sink::start(cli.sink_threads).await?;
            let r = attachments_bench(&cli, &sink, &host_bin).await;
            sink.stop().await;
            r.map(|_| ())
        }
        Command::Refresh { mailboxes } => {
            let r = refresh_bench(&cli, *mailboxes).await?;
            let (module, raw) = (median_rate(&r.module), median_rate(&r.raw));
            println!(
                "refresh: module {module:.0}/s [{}], raw loop {raw:.0}/s [{}], ratio {:.2}",
                rates(&r.module),
                rates(&r.raw),
                module / raw.max(1e-9)
            );
            Ok(())
        }
        Command::Enqueue { secs } => {
            let sink = Sink::start(cli.sink_threads).await?;
            let e = enqueue::run(&sink, cli.concurrency, *secs).await;
            sink.stop().await;
            print_enqueue(&e?);
            Ok(())
        }
        Command::Probe { db, conns } => {
            probe::run(*db, &cli.pg, cli.messages, cli.mailboxes, *conns).await
        }
    }
}

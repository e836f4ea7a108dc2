//! BENCHMARKS.md: the command, the machine, the date, every figure, the findings, and the
//! closing table a script can read.

use std::fmt::Write as _;

use crate::drain::Run;

/// The memory budget, MiB.
pub const MEMORY_BUDGET_MIB: f64 = 64.0;

/// The median rate of some runs (0 when there are none).
pub fn median_rate(runs: &[Run]) -> f64 {
    let mut rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        n if n % 2 == 1 => rates[n / 2],
        n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
    }
}

/// Each run's rate, for the detail lines.
pub fn rates(runs: &[Run]) -> String {
    runs.iter()
        .map(|r| format!("{:.0}", r.rate()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mails left `sending` after their send, over some runs.
pub fn unsettled(runs: &[Run]) -> usize {
    runs.iter().map(|r| r.unsettled).sum()
}

/// Figures of one drain benchmark.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// The module through `deliver::deliver` from N tasks.
    pub module: Vec<Run>,
    /// Baseline (a).
    pub raw: Vec<Run>,
    /// Baseline (b).
    pub source: Vec<Run>,
    /// The module through its apalis workers (extra figure).
    pub apalis: Option<Run>,
    /// The batched design sketched in `prototype.rs` (not the module; extra figure).
    pub prototype: Option<Run>,
}

/// Figures of the refresh benchmark.
#[derive(Debug, Clone, Default)]
pub struct Refresh {
    /// `refresh_all`.
    pub module: Vec<Run>,
    /// The raw loop.
    pub raw: Vec<Run>,
    /// Mailboxes.
    pub mailboxes: usize,
}

/// Everything one `crm-bench all` measured; a benchmark that failed keeps its error.
#[derive(Debug, Default)]
pub struct Results {
    /// Drain on SQLite.
    pub drain_sqlite: Option<Result<Drain, String>>,
    /// Drain on PostgreSQL.
    pub drain_postgres: Option<Result<Drain, String>>,
    /// Refresh.
    pub refresh: Option<Result<Refresh, String>>,
    /// Enqueue.
    pub enqueue: Option<Result<crate::enqueue::Figures, String>>,
    /// Memory.
    pub memory: Option<Result<crate::memory::Figures, String>>,
}

/// How the run was set up.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Mails per drain.
    pub messages: usize,
    /// Mailboxes in the drain.
    pub mailboxes: usize,
    /// Concurrent sends.
    pub concurrency: usize,
    /// Bytes per mail.
    pub size: usize,
    /// Runs per figure.
    pub runs: usize,
    /// Seconds per wrk run.
    pub enqueue_secs: u64,
    /// wrk connections.
    pub connections: usize,
    /// Seconds the whole `all` took.
    pub total_secs: f64,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown memory".into(),
            |kib| format!("{:.0} GiB memory", kib / 1024.0 / 1024.0),
        );
    format!("{cores} cores ({cpu}), {memory}")
}

fn ratio(module: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        return "n/a".into();
    }
    let r = module / baseline;
    if r >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.3}")
    }
}

struct Row {
    name: &'static str,
    module: String,
    baseline: String,
    ratio: String,
    target: &'static str,
}

fn failed(name: &'static str, target: &'static str) -> Row {
    Row {
        name,
        module: "error".into(),
        baseline: "error".into(),
        ratio: "n/a".into(),
        target,
    }
}

fn row(name: &'static str, module: f64, baseline: f64, target: &'static str) -> Row {
    Row {
        name,
        module: format!("{module:.0}"),
        baseline: format!("{baseline:.0}"),
        ratio: ratio(module, baseline),
        target,
    }
}

fn drain_section(out: &mut String, db: &str, drain: &Option<Result<Drain, String>>, s: &Setup) {
    let _ = writeln!(out, "### {db}\n");
    match drain {
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
        }
        Some(Ok(d)) => {
            let module = median_rate(&d.module);
            let raw = median_rate(&d.raw);
            let _ = writeln!(
                out,
                "| path | mails/s (median of {}) | runs |\n|---|---|---|",
                s.runs
            );
            let _ = writeln!(
                out,
                "| module: `deliver::deliver` from {} tasks | {module:.0} | {} |",
                s.concurrency,
                rates(&d.module)
            );
            let _ = writeln!(
                out,
                "| (a) raw lettre loop, {} tasks, `TCP_NODELAY`, no database | {raw:.0} | {} |",
                s.concurrency,
                rates(&d.raw)
            );
            if !d.source.is_empty() {
                let _ = writeln!(
                    out,
                    "| (b) `smtp-source -d -s {} -m {} -l {}` | {:.0} | {} |",
                    s.concurrency,
                    s.messages,
                    s.size,
                    median_rate(&d.source),
                    rates(&d.source)
                );
            }
            if let Some(apalis) = &d.apalis {
                let _ = writeln!(
                    out,
                    "| module through its apalis workers (`delivery_concurrency` {}; extra figure) | {:.0} | one run |",
                    s.concurrency,
                    apalis.rate()
                );
            }
            if let Some(p) = &d.prototype {
                let _ = writeln!(
                    out,
                    "| not the module: the batched design of Findings, sketched in `bench/src/prototype.rs` ({} mails per claim and per status write; extra figure) | {:.0} | one run |",
                    crate::prototype::BATCH,
                    p.rate()
                );
            }
            let _ = write!(out, "\nmodule / (a) = {}", ratio(module, raw));
            if !d.source.is_empty() {
                let _ = write!(
                    out,
                    "; module / (b) = {}",
                    ratio(module, median_rate(&d.source))
                );
            }
            let _ = writeln!(out, "\n");
            let stuck = unsettled(&d.module) + d.apalis.map_or(0, |r| r.unsettled);
            if stuck > 0 {
                let _ = writeln!(
                    out,
                    "**{stuck} mail(s)** reached the sink but their outbox row stayed `sending`: the \
                     status write after the `250` failed (SQLite `database is locked`); such a mail \
                     is sent again when its lease runs out. See Findings.\n"
                );
            }
        }
    }
}

/// The whole BENCHMARKS.md.
pub fn render(results: &Results, s: &Setup, findings: &str) -> String {
    let mut out = String::new();
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let _ = writeln!(out, "# Benchmarks\n");
    let whole = std::env::var("BENCH_STARTED")
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
        .map(|t| chrono::Utc::now().timestamp() - t);
    let _ = writeln!(
        out,
        "Written by `bash bench/run.sh` on {now}, on {}. The script installs what is missing, \
         starts PostgreSQL, builds the release binaries and runs `crm-bench all`; the benchmarks \
         took {:.0} s{}.\n",
        machine(),
        s.total_secs,
        whole.map_or(String::new(), |w| format!(
            ", the whole command {w} s up to writing this file"
        ))
    );
    let _ = writeln!(
        out,
        "Every ratio is the module's figure over a baseline measured **in the same run on the same \
         machine**; each figure is the median of {} runs (every run's figure is listed), the \
         module's runs interleaved with its baselines' so that both see the same load. Release \
         builds; the simulated services are the `simulators` crate's, each on a tokio runtime of \
         its own.\n",
        s.runs
    );
    let _ = writeln!(out, "## Drain\n");
    let _ = writeln!(
        out,
        "{} queued mails of {} bytes (whole message) over {} mailboxes, per-mailbox throttling off \
         (`mailbox_rate_per_minute` = 0; the 3-connection cap stays), {} concurrent sends into the \
         `simulators` crate's SMTP sink on loopback (plain text, any XOAUTH2 accepted, bodies not \
         kept). The module's figure goes through `deliver::deliver` (claim with a lease, token \
         lookup and unsealing, XOAUTH2 over its own `TCP_NODELAY` connections reused per mailbox, \
         status update) from {} tokio tasks over the queued ids; the apalis line drives the same \
         function through the module's apalis delivery workers.\n",
        s.messages, s.size, s.mailboxes, s.concurrency, s.concurrency
    );
    drain_section(&mut out, "SQLite", &results.drain_sqlite, s);
    drain_section(&mut out, "PostgreSQL", &results.drain_postgres, s);

    let _ = writeln!(out, "## Refresh\n");
    match &results.refresh {
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
        }
        Some(Ok(r)) => {
            let module = median_rate(&r.module);
            let raw = median_rate(&r.raw);
            let _ = writeln!(
                out,
                "{} connected mailboxes (SQLite) refreshed by `jobs::refresh_all` (the nightly job's \
                 code: default concurrency {}, no jitter) against the simulated token endpoint, versus \
                 a raw loop of the same refresh-token POSTs with the module's HTTP client at the \
                 same concurrency.\n",
                r.mailboxes,
                crate::refresh::options().concurrency
            );
            let _ = writeln!(
                out,
                "| path | refreshes/s (median of {}) | runs |\n|---|---|---|\n| module | {module:.0} | {} |\n| raw loop | {raw:.0} | {} |\n\nmodule / raw = {}\n",
                s.runs,
                rates(&r.module),
                rates(&r.raw),
                ratio(module, raw)
            );
        }
    }

    let _ = writeln!(out, "## Enqueue\n");
    match &results.enqueue {
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
        }
        Some(Ok(e)) => {
            let _ = writeln!(
                out,
                "`wrk -t1 -c{} -d{}s --latency` (after a 1 s warm-up) posting the same 2 KB JSON mail \
                 with a signed-in session and its CSRF header. The route is \
                 `POST /microsoft_outlook/records/contact/{{id}}/mails` of a host running in this \
                 binary on SQLite with the module enabled (so each queued mail is also delivered at \
                 once into the sink by the same process, as in production). The baseline is a \
                 trivial actix handler (reads the body, answers JSON) on a bare actix server in the \
                 same binary with the same worker count.\n",
                s.connections, s.enqueue_secs
            );
            let _ = writeln!(
                out,
                "| target | requests/s | p50 ms | p99 ms |\n|---|---|---|---|"
            );
            for (name, load) in [
                ("queue route (module)", e.route),
                ("trivial handler, bare actix (baseline)", e.trivial),
                (
                    "trivial handler mounted in the host (session lookup, access log)",
                    e.trivial_in_host,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "| {name} | {:.0} | {:.2} | {:.2} |",
                    load.rps, load.p50_ms, load.p99_ms
                );
            }
            let _ = writeln!(
                out,
                "\nmodule / trivial = {}; module / trivial-in-host = {}; the route queued {} mails in the measured {} s.\n",
                ratio(e.route.rps, e.trivial.rps),
                ratio(e.route.rps, e.trivial_in_host.rps),
                e.queued,
                s.enqueue_secs
            );
        }
    }

    let _ = writeln!(out, "## Memory\n");
    match &results.memory {
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
        }
        Some(Ok(m)) => {
            let _ = writeln!(
                out,
                "The release `crm-host serve` (SQLite, default pool of 8, default delivery \
                 concurrency 16, sweep every second) started on a database holding {} queued mails \
                 over {} mailboxes, drained them through its apalis workers into the sink in {:.1} s \
                 from process start ({:.0} mails/s including start-up). RSS after start-up: {:.1} MiB; \
                 peak (VmHWM, read once the outbox was drained): **{:.1} MiB** of a {:.0} MiB budget.\n",
                m.count,
                s.mailboxes,
                m.secs,
                m.count as f64 / m.secs.max(1e-9),
                m.idle_mib,
                m.peak_mib,
                MEMORY_BUDGET_MIB
            );
            if m.unsettled > 0 {
                let _ = writeln!(
                    out,
                    "**{} mail(s)** reached the sink but their outbox row stayed `sending` (the \
                     status write after the `250` failed with SQLite `database is locked`); they \
                     would be sent again once their lease runs out. See Findings.\n",
                    m.unsettled
                );
            }
        }
    }

    let _ = writeln!(out, "## Findings\n");
    let _ = writeln!(out, "{}\n", findings.trim());

    let _ = writeln!(out, "## Summary\n");
    let _ = writeln!(
        out,
        "Units: drain rows in mails/s, refresh in refreshes/s, enqueue in requests/s, memory in MiB \
         (baseline = the budget). ratio = module / baseline.\n"
    );
    let mut rows = Vec::new();
    match &results.drain_sqlite {
        Some(Ok(d)) => {
            let module = median_rate(&d.module);
            rows.push(row("drain-sqlite", module, median_rate(&d.raw), ">= 0.9"));
            rows.push(row(
                "drain-sqlite-vs-smtp-source",
                module,
                median_rate(&d.source),
                ">= 0.5",
            ));
        }
        _ => {
            rows.push(failed("drain-sqlite", ">= 0.9"));
            rows.push(failed("drain-sqlite-vs-smtp-source", ">= 0.5"));
        }
    }
    rows.push(match &results.drain_postgres {
        Some(Ok(d)) => row(
            "drain-postgres",
            median_rate(&d.module),
            median_rate(&d.raw),
            ">= 0.8",
        ),
        _ => failed("drain-postgres", ">= 0.8"),
    });
    rows.push(match &results.refresh {
        Some(Ok(r)) => row(
            "refresh",
            median_rate(&r.module),
            median_rate(&r.raw),
            ">= 0.9",
        ),
        _ => failed("refresh", ">= 0.9"),
    });
    rows.push(match &results.enqueue {
        Some(Ok(e)) => row("enqueue", e.route.rps, e.trivial.rps, ">= 0.5"),
        _ => failed("enqueue", ">= 0.5"),
    });
    rows.push(match &results.memory {
        Some(Ok(m)) => Row {
            name: "memory",
            module: format!("{:.1}", m.peak_mib),
            baseline: format!("{MEMORY_BUDGET_MIB:.0}"),
            ratio: format!("{:.2}", m.peak_mib / MEMORY_BUDGET_MIB),
            target: "<= 1.0",
        },
        _ => failed("memory", "<= 1.0"),
    });
    let _ = writeln!(out, "| benchmark | module | baseline | ratio | target |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.name, r.module, r.baseline, r.ratio, r.target
        );
    }
    out
}

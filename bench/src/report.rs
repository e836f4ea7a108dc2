//! BENCHMARKS.md: the command, the machine, the date, every figure, the findings, and the
//! closing table a script can read.

use std::fmt::Write as _;

use crate::drain::Run;
use crate::serve::ServeRun;

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
    /// The module's drains in the bench's process (`delivery::drains::run`, one task per
    /// mailbox).
    pub module: Vec<Run>,
    /// Baseline (a).
    pub raw: Vec<Run>,
    /// Baseline (b).
    pub source: Vec<Run>,
    /// The module as deployed: a release `crm-host serve` process.
    pub serve: Vec<ServeRun>,
}

impl Drain {
    /// The serve runs as plain runs (for the rates).
    pub fn serve_runs(&self) -> Vec<Run> {
        self.serve.iter().map(ServeRun::run).collect()
    }

    /// The highest peak RSS of the serve runs, MiB.
    pub fn serve_peak_mib(&self) -> Option<f64> {
        self.serve.iter().map(|r| r.peak_mib).reduce(f64::max)
    }
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

/// What the CPU the benchmark's process used per request says of the Enqueue ratio: a
/// paragraph for the Enqueue section, with the figures of this run (microseconds per request;
/// busy cores = CPU per request × requests/s).
fn enqueue_cpu_words(e: &crate::enqueue::Figures) -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let busy = |l: &crate::enqueue::Load| l.cpu_us_per_request * l.rps / 1e6;
    let trivial = e.trivial_in_host.cpu_us_per_request;
    let route = e.route.cpu_us_per_request;
    let mut words = format!(
        "CPU time of the benchmark's process per answered request (host, drains and sink; not \
         wrk): trivial handler in the host {trivial:.0} µs, queue route {route:.0} µs. The \
         process kept {:.2} of the {cores} cores busy during the trivial handler's run and {:.2} \
         during the route's (wrk had the rest, or they were idle: a run that leaves cores idle \
         waits as well as computes). Per request the route costs {:.1} times the trivial \
         handler; at their CPU alone it would answer {} of the trivial handler's rate, against \
         the measured {}. For 0.5 at the trivial handler's use of the cores, the route may cost \
         at most {:.0} µs per request, delivery included.",
        busy(&e.trivial_in_host),
        busy(&e.route),
        route / trivial,
        ratio(trivial, route),
        ratio(e.route.rps, e.trivial_in_host.rps),
        2.0 * trivial,
    );
    if let Some(w) = &e.route_web_only {
        let web_only = w.cpu_us_per_request;
        words.push_str(&format!(
            " In the host that does not deliver the route costs {web_only:.0} µs ({:.2} cores \
             busy), {:.0} µs beyond the trivial handler: its own work and the drain jobs it \
             pushes.",
            busy(w),
            web_only - trivial,
        ));
        words.push_str(&if route >= web_only {
            format!(
                " Delivering what it queued adds about {:.0} µs where the host delivers, less \
                 those pushes (the difference of two runs, so only roughly).",
                route - web_only
            )
        } else {
            " In this run it cost more per request than the route of the host that delivers, \
             so these two runs do not tell delivery's share apart."
                .to_string()
        });
    }
    words
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
    /// Memory with large files.
    pub attachments: Option<Result<Attach, String>>,
}

/// The drain of mails carrying large files by `crm-host serve`.
#[derive(Debug, Clone, Copy)]
pub struct Attach {
    /// Mails drained.
    pub mails: usize,
    /// Bytes of each mail's file.
    pub file_bytes: usize,
    /// Bytes of each message as stored and sent (the file in base64, and the text).
    pub message_bytes: usize,
    /// The drain.
    pub run: crate::serve::ServeRun,
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

/// `module / baseline`, rounded down (two decimals, three below 0.1), so that a ratio shown
/// as meeting a `>=` target meets it: 0.498 is shown as 0.49, not 0.50.
fn ratio(module: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        return "n/a".into();
    }
    let r = module / baseline;
    if r >= 0.1 {
        format!("{:.2}", (r * 100.0).floor() / 100.0)
    } else {
        format!("{:.3}", (r * 1000.0).floor() / 1000.0)
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
            let serve = median_rate(&d.serve_runs());
            let raw = median_rate(&d.raw);
            let _ = writeln!(
                out,
                "| path | mails/s (median of {}) | runs |\n|---|---|---|",
                s.runs
            );
            if !d.serve.is_empty() {
                let _ = writeln!(
                    out,
                    "| module as deployed: release `crm-host serve`, first claim to last outcome | {serve:.0} | {} |",
                    rates(&d.serve_runs())
                );
            }
            if !d.module.is_empty() {
                let _ = writeln!(
                    out,
                    "| module in this process: `delivery::drains::run`, one task per mailbox | {module:.0} | {} |",
                    rates(&d.module)
                );
            }
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
            let _ = write!(
                out,
                "\nserve / (a) = {}; in process / (a) = {}",
                ratio(serve, raw),
                ratio(module, raw)
            );
            if !d.source.is_empty() {
                let _ = write!(
                    out,
                    "; in process / (b) = {}",
                    ratio(module, median_rate(&d.source))
                );
            }
            let _ = writeln!(out, "\n");
            if !d.serve.is_empty() {
                let _ = writeln!(
                    out,
                    "Each `crm-host serve` run (\"sent when seen\": rows already `sent` when the poller first saw a claim; 0 means the first batch was still in flight, so the start was not missed):\n\n| run | first claim to last outcome, s | mails/s | by the module's own timestamps, s | spawn to first claim, s | sent when seen | RSS at first claim, MiB | peak RSS (VmHWM), MiB |\n|---|---|---|---|---|---|---|---|"
                );
                for (i, r) in d.serve.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "| {} | {:.3} | {:.0} | {:.3} | {:.2} | {} | {:.1} | {:.1} |",
                        i + 1,
                        r.secs,
                        r.run().rate(),
                        r.stamped_secs,
                        r.startup_secs,
                        r.sent_when_seen,
                        r.claim_rss_mib,
                        r.peak_mib
                    );
                }
                let _ = writeln!(out);
                let dups: usize = d.serve.iter().map(|r| r.duplicates).sum();
                if dups > 0 {
                    let _ = writeln!(
                        out,
                        "**The sink received {dups} mail(s) twice** during the serve runs.\n"
                    );
                }
            }
            let stuck = unsettled(&d.module) + d.serve.iter().map(|r| r.unsettled).sum::<usize>();
            if stuck > 0 {
                let _ = writeln!(
                    out,
                    "**{stuck} mail(s)** reached the sink but their outbox row stayed `sending`: the \
                     outcome write after the `250` failed; such a mail is sent again when its \
                     lease runs out.\n"
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
         module's runs interleaved with its baselines' so that both see the same load; ratios \
         are rounded down (0.498 shows as 0.49). Release \
         builds; the simulated services are the `simulators` crate's, each on a tokio runtime of \
         its own.\n",
        s.runs
    );
    let _ = writeln!(out, "## Drain\n");
    let _ = writeln!(
        out,
        "{} queued mails of {} bytes (whole message; the outbox rows and, in \
         `microsoft_outlook_outbox_bodies`, their bodies, written in bulk) over {} mailboxes, \
         per-mailbox throttling off (`mailbox_rate_per_minute` = 0; the cap of 3 connections per \
         mailbox stays), into the `simulators` crate's SMTP sink on loopback (plain text, any \
         XOAUTH2 accepted, bodies not kept).\n",
        s.messages, s.size, s.mailboxes
    );
    let _ = writeln!(
        out,
        "The module delivers per mailbox: a drain claims up to {} due mails of one mailbox in one \
         `UPDATE … RETURNING` (with `SKIP LOCKED` on PostgreSQL), reads their bodies in one \
         `SELECT`, takes the mailbox's token once, sends the batch over up to 3 reused XOAUTH2 \
         connections, and writes the outcomes in one statement per kind (every sent mail in \
         one), then claims the next batch until none is due. Two figures of the module:\n\n\
         - **as deployed**: the release `crm-host serve` process (its own apalis workers and \
         drain dispatcher; default settings: pool of 8, `delivery_concurrency` 16, sweep every \
         10 s, log level info) started on the prepared database, which wakes every mailbox with \
         due mail at start. Timed from the database, not from process start: a poller on its own \
         connection asks every {} ms for rows in `sending` until it finds some; the start is the \
         earliest `updated_at` among them, written by the claim statement with the module's own \
         clock. The poller then waits (reading only the sink's counter) until the sink has every \
         mail, and asks every {} ms how many rows are `sent`; the end is the bench's clock when \
         all {} are. The end is late by at most one poll and one query, so the rate is if \
         anything a little low; the latest `sent_at` (the last outcome statement's own \
         timestamp) is listed as a check. The peak RSS is the process's VmHWM once the outbox \
         was drained.\n\
         - **in this process**: `delivery::drains::run` (what the apalis drain job and the \
         in-process wake call) started for every mailbox at once, one tokio task per mailbox, in \
         the bench's own process (host assembled around the module, pool of 8), timed until \
         every task ended, the sink had every mail and every row was `sent`.\n\n\
         Baselines, in the same run: (a) the same prebuilt messages sent by {} tokio tasks over \
         reused lettre connections (XOAUTH2, `TCP_NODELAY`) with no database at all; (b) \
         Postfix's `smtp-source`. Each round runs (a), (b), the module in this process, then \
         `crm-host serve`; each module path drains a freshly queued outbox (the previous rows and \
         bodies deleted, the mails queued again in bulk, so the rows lie in insertion order).\n",
        microsoft_outlook::outbox::claims::BATCH,
        crate::serve::POLL.as_millis(),
        crate::serve::POLL.as_millis(),
        s.messages,
        s.concurrency
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
                 binary on SQLite with the module enabled: it stores the outbox row and its body in \
                 one transaction and wakes the mailbox's drain, so the same process also delivers \
                 the queued mails into the sink meanwhile, as in production. The baseline is a \
                 trivial handler (reads the body, answers JSON) mounted in the same host, behind the \
                 same session lookup and access log; a bare actix server with the same handler and \
                 worker count is listed for reference, and so is the route of a second host, on a \
                 database of its own, whose module does not deliver (`workers` off, as in a web \
                 process beside worker processes; it pushes a drain job per group of mails \
                 instead): the route's own cost. The CPU column is the \
                 user and system time the benchmark's process (host, drains, sink; not wrk) used \
                 during the measured run, per answered request.\n",
                s.connections, s.enqueue_secs
            );
            let _ = writeln!(
                out,
                "| target | requests/s | p50 ms | p99 ms | CPU µs per request |\n|---|---|---|---|---|"
            );
            for (name, load) in [
                ("queue route (module)", e.route),
                (
                    "trivial handler mounted in the host (session lookup, access log; baseline)",
                    e.trivial_in_host,
                ),
                ("trivial handler, bare actix (reference)", e.trivial),
            ]
            .into_iter()
            .chain(e.route_web_only.map(|l| {
                (
                    "queue route of a host that does not deliver (reference: the route's own cost and its job pushes)",
                    l,
                )
            })) {
                let _ = writeln!(
                    out,
                    "| {name} | {:.0} | {:.2} | {:.2} | {:.0} |",
                    load.rps, load.p50_ms, load.p99_ms, load.cpu_us_per_request
                );
            }
            let _ = writeln!(
                out,
                "\nmodule / trivial-in-host = {}; module / bare actix = {}; the route queued {} mails in the measured {} s.\n",
                ratio(e.route.rps, e.trivial_in_host.rps),
                ratio(e.route.rps, e.trivial.rps),
                e.queued,
                s.enqueue_secs
            );
            let _ = writeln!(out, "{}\n", enqueue_cpu_words(e));
        }
    }

    let _ = writeln!(out, "## Memory\n");
    match &results.drain_sqlite {
        Some(Ok(d)) if !d.serve.is_empty() => {
            let peaks: Vec<String> = d
                .serve
                .iter()
                .map(|r| format!("{:.1}", r.peak_mib))
                .collect();
            let peak = d.serve_peak_mib().unwrap_or(0.0);
            let _ = writeln!(
                out,
                "The peak resident set (VmHWM) of the release `crm-host serve` process of the SQLite \
                 drain above, started on a database holding {} queued mails and read once it had \
                 drained them: {} MiB in its {} runs; the highest, **{peak:.1} MiB**, is the figure \
                 against the {:.0} MiB budget{}.\n",
                s.messages,
                peaks.join(", "),
                d.serve.len(),
                MEMORY_BUDGET_MIB,
                if d.serve.iter().all(|r| r.peak_mib <= MEMORY_BUDGET_MIB) {
                    " (every run within it)"
                } else {
                    " (**not every run within it**)"
                }
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed with the SQLite drain: `{e}`\n");
        }
        _ => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "### Mails with large files\n");
    let baseline_peak = results
        .drain_sqlite
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .and_then(Drain::serve_peak_mib);
    match &results.attachments {
        Some(Ok(a)) => {
            let file_mib = a.file_bytes as f64 / 1024.0 / 1024.0;
            let growth = baseline_peak.map(|b| a.run.peak_mib - b);
            let _ = writeln!(
                out,
                "The same release `crm-host serve` on SQLite, started on a database holding {} \
                 queued mails that each carry one file of {} MB ({:.1} MB per message once \
                 encoded), drained them in {:.1} s; its peak resident set was **{:.1} MiB**{}.\n",
                a.mails,
                a.file_bytes / 1_000_000,
                a.message_bytes as f64 / 1e6,
                a.run.secs,
                a.run.peak_mib,
                match growth {
                    Some(g) => format!(
                        ", {g:.1} MiB above the peak of the 2 KB drain in this run, i.e. {:.1} times one \
                         file ({file_mib:.1} MiB): a batch holds one such message (the 16 MiB batch \
                         cap), and it is in memory as the stored text, the row the database \
                         driver decoded and the dot-stuffed copy lettre writes to the socket",
                        g / file_mib
                    ),
                    None => String::new(),
                }
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
        }
        None => {
            let _ = writeln!(out, "Not run.\n");
        }
    }

    let _ = writeln!(out, "{}\n", findings.trim());

    let _ = writeln!(out, "## Summary\n");
    let _ = writeln!(
        out,
        "Units: drain rows in mails/s, refresh in refreshes/s, enqueue in requests/s, memory in MiB \
         (baseline = the budget). ratio = module / baseline. `drain-sqlite` and `drain-postgres`: \
         the module's drains in this process against the raw loop (a); `drain-*-serve`: the \
         release `crm-host serve` against (a) of the same database's section; `enqueue`: against \
         the trivial handler mounted in the host; `memory`: the highest peak RSS of the SQLite \
         serve runs.\n"
    );
    let mut rows = Vec::new();
    let serve_row = |name: &'static str, d: &Drain| {
        if d.serve.is_empty() {
            failed(name, ">= 0.5")
        } else {
            row(
                name,
                median_rate(&d.serve_runs()),
                median_rate(&d.raw),
                ">= 0.5",
            )
        }
    };
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
            rows.push(serve_row("drain-sqlite-serve", d));
        }
        _ => {
            rows.push(failed("drain-sqlite", ">= 0.9"));
            rows.push(failed("drain-sqlite-vs-smtp-source", ">= 0.5"));
            rows.push(failed("drain-sqlite-serve", ">= 0.5"));
        }
    }
    match &results.drain_postgres {
        Some(Ok(d)) => {
            rows.push(row(
                "drain-postgres",
                median_rate(&d.module),
                median_rate(&d.raw),
                ">= 0.8",
            ));
            rows.push(serve_row("drain-postgres-serve", d));
        }
        _ => {
            rows.push(failed("drain-postgres", ">= 0.8"));
            rows.push(failed("drain-postgres-serve", ">= 0.5"));
        }
    }
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
        Some(Ok(e)) => row("enqueue", e.route.rps, e.trivial_in_host.rps, ">= 0.5"),
        _ => failed("enqueue", ">= 0.5"),
    });
    rows.push(
        match results
            .drain_sqlite
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .and_then(Drain::serve_peak_mib)
        {
            Some(peak) => Row {
                name: "memory",
                module: format!("{peak:.1}"),
                baseline: format!("{MEMORY_BUDGET_MIB:.0}"),
                ratio: format!("{:.2}", peak / MEMORY_BUDGET_MIB),
                target: "<= 1.0",
            },
            None => failed("memory", "<= 1.0"),
        },
    );
    rows.push(match (&results.attachments, baseline_peak) {
        (Some(Ok(a)), Some(base)) => Row {
            name: "memory-20mb-files",
            module: format!("{:.1}", a.run.peak_mib),
            baseline: format!("{base:.1}"),
            ratio: format!("{:.2}", a.run.peak_mib / base),
            target: "(no target; growth / file size in Memory)",
        },
        _ => failed("memory-20mb-files", "(no target)"),
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

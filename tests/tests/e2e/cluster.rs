//! Several real `crm-host` processes on one PostgreSQL database (data and apalis queue), with the
//! simulated Microsoft services on loopback: every mail exactly once, at most three connections
//! per mailbox across processes, one refresh per mailbox when three nightly runs start at once,
//! `kill -9` in the middle of a drain, and faults of every peer. Each test prints one summary
//! line. PostgreSQL only: on SQLite (no `TEST_DATABASE_URL`) they say so and return. One test is
//! the other way round: a web-only process and a worker process on one SQLite file.

use crate::connect::{CLIENT_ID, CLIENT_SECRET, REDIRECT, connect_through, user};
use crate::helpers::{ADMIN, Browser, TestApp, spawn_with, test_options};
use chrono::Timelike;
use crm_sdk::SealingKey;
use futures::StreamExt;
use microsoft_outlook::entities::{outbox, token};
use microsoft_outlook::runtime::ModuleOptions;
use microsoft_outlook_tests::cluster::{HostProcess, pg_ctl};
use microsoft_outlook_tests::testdb::TestDb;
use microsoft_simulators::graph::GraphServer;
use microsoft_simulators::identity::{AppRegistration, IdentityPlatform, TokenFault};
use microsoft_simulators::smtp::{Injected, SmtpConfig, SmtpServer, Stage};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether to skip: several processes share one PostgreSQL database.
fn skip(test: &str) -> bool {
    if TestDb::is_postgres() {
        return false;
    }
    println!(
        "{test}: skipped: several processes need PostgreSQL (TEST_DATABASE_URL; .ci/run sets it)"
    );
    true
}

/// Whether to skip: the test is of several processes on one SQLite file.
fn skip_unless_sqlite(test: &str) -> bool {
    if !TestDb::is_postgres() {
        return false;
    }
    println!("{test}: skipped: this test is of several processes on one SQLite file");
    true
}

/// A sender: a CRM user whose personal mailbox is connected.
struct Sender {
    address: String,
    browser: Browser,
    csrf: String,
}

/// The database, the simulated services, the senders, and the `crm-host` processes.
struct Cluster {
    /// An in-process host that only serves and queues (no workers): mail is queued through the
    /// real route, and only the `crm-host` processes deliver it.
    app: TestApp,
    idp: IdentityPlatform,
    smtp: SmtpServer,
    /// The simulated Graph, when the mailboxes send through it.
    graph: Option<GraphServer>,
    senders: Vec<Sender>,
    contact: i64,
    procs: Vec<HostProcess>,
    /// Keeps the in-process host's clock on real time (the processes use the system clock).
    _clock: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The configuration every worker process gets, as an operator would set it.
const LEASE_SECS: &str = "10";

/// How long the database-restart fault keeps PostgreSQL stopped.
const DATABASE_AWAY: Duration = Duration::from_secs(40);

async fn cluster(mailboxes: usize) -> Cluster {
    cluster_over(mailboxes, "smtp").await
}

/// A cluster whose mailboxes send through `transport` (`smtp` or `graph`).
async fn cluster_over(mailboxes: usize, transport: &str) -> Cluster {
    let test_db = Arc::new(TestDb::create().await.expect("test database"));
    let web_only = ModuleOptions {
        workers: false,
        ..test_options()
    };
    let app = spawn_with(test_db, SealingKey::generate(), true, web_only).await;
    let clock = app.clock.clone();
    let follow = tokio::spawn(async move {
        loop {
            clock.set(chrono::Utc::now());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    app.enable_module().await;
    let idp = IdentityPlatform::start().await.expect("identity platform");
    idp.register_app(AppRegistration {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        secret_expired: false,
        redirect_uris: vec![REDIRECT.into()],
    });
    let smtp = SmtpServer::start(SmtpConfig {
        validator: Some(idp.smtp_validator()),
        ..SmtpConfig::default()
    })
    .await
    .expect("smtp");
    let graph = if transport == "graph" {
        Some(
            GraphServer::start(idp.graph_validator())
                .await
                .expect("graph"),
        )
    } else {
        None
    };
    let mut c = Cluster {
        app,
        idp,
        smtp,
        graph,
        senders: Vec::new(),
        contact: 0,
        procs: Vec::new(),
        _clock: AbortOnDrop(follow),
    };
    let graph_url = c
        .graph
        .as_ref()
        .map(GraphServer::base_url)
        .unwrap_or_default();
    c.settings(&[
        ("client_secret", CLIENT_SECRET),
        ("graph_url", graph_url.as_str()),
    ])
    .await;
    let port = c.smtp.port().to_string();
    let pem = c.smtp.ca_pem();
    for i in 1..=mailboxes {
        let address = format!("mailbox{i:02}@contoso.example");
        crm_host::seed::create_user(
            &c.app.db,
            &address,
            &format!("Mailbox {i}"),
            "mailbox-pass",
            false,
        )
        .await
        .expect("user");
        c.idp.add_user(user(&address));
        let browser = c.app.signed_in((address.as_str(), "mailbox-pass")).await;
        let (status, page, location) = browser
            .post_form(
                "/microsoft_outlook/my-mailbox",
                &[
                    ("name", "Personal"),
                    ("mailbox", address.as_str()),
                    ("smtp_host", "localhost"),
                    ("smtp_port", port.as_str()),
                    ("security", "starttls"),
                    ("extra_ca_pem", pem.as_str()),
                    ("send_as", "mailbox"),
                    ("transport", transport),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
        let server_id: i32 = location
            .expect("server page")
            .trim_start_matches("/microsoft_outlook/servers/")
            .split('?')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("server id");
        c.idp.sign_in_as(&address);
        let (status, page, _) = connect_through(&browser, server_id).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
        let csrf = browser.csrf().await;
        c.senders.push(Sender {
            address,
            browser,
            csrf,
        });
    }
    c.contact = crm_host::seed::create_contact(
        &c.app.db,
        "Dana Fabrikam",
        Some("dana@fabrikam.example"),
        Some("Fabrikam"),
        c.app.admin_id,
        false,
    )
    .await
    .expect("contact");
    c
}

/// What the sink and the outbox say about a set of mails.
#[derive(Debug)]
struct Tally {
    mails: usize,
    sent: usize,
    lost: usize,
    duplicates: usize,
}

impl Cluster {
    /// Saves module settings as the operator (no per-minute throttle; enough attempts to ride
    /// out every fault).
    async fn settings(&self, extra: &[(&str, &str)]) {
        let admin = self.app.signed_in(ADMIN).await;
        let authority = self.idp.authority_url();
        // The senders' personal mailboxes use the simulated server on loopback.
        let hosts = format!("localhost:{}", self.smtp.port());
        let mut fields = vec![
            ("personal_smtp_hosts", hosts.as_str()),
            ("client_id", CLIENT_ID),
            ("tenant", "common"),
            ("authority_url", authority.as_str()),
            ("mailbox_rate_per_minute", "0"),
            ("max_attempts", "30"),
        ];
        for (k, v) in extra {
            fields.retain(|(f, _)| f != k);
            fields.push((k, v));
        }
        let (status, page, _) = admin
            .post_form("/settings/microsoft_outlook", &fields)
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(!page.contains("class=\"error\""), "{page}");
    }

    /// The `CRM_` configuration of a worker process.
    fn process_env(&self) -> Vec<(String, String)> {
        [
            ("CRM_DATABASE_URL", self.app.db_url.as_str()),
            ("CRM_SEALING_KEY", self.app.key_base64().as_str()),
            ("CRM_PUBLIC_BASE_URL", "https://crm.contoso.example"),
            ("CRM_LOG", "info,sqlx=warn,apalis=warn,actix_server=warn"),
            ("CRM_HTTP_WORKERS", "1"),
            ("CRM_DATABASE_MAX_CONNECTIONS", "20"),
            ("CRM_OUTLOOK__LEASE_SECS", LEASE_SECS),
            ("CRM_OUTLOOK__SWEEP_SCHEDULE", "*/1 * * * * *"),
            ("CRM_OUTLOOK__RETRY_BASE_SECS", "1"),
            ("CRM_OUTLOOK__TOKEN_TIMEOUT_SECS", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Starts `n` worker processes at once.
    async fn start_processes(&mut self, n: usize) {
        let env = self.process_env();
        let names: Vec<String> = (1..=n).map(|i| format!("worker-{i}")).collect();
        let started =
            futures::future::join_all(names.iter().map(|name| HostProcess::start(name, &env)))
                .await;
        for p in started {
            self.procs.push(p.expect("a crm-host process starts"));
        }
    }

    /// Queues `count` mails through the queue route, spread over the senders; returns their ids.
    async fn queue(&self, count: usize, tag: &str) -> Vec<i64> {
        let path = format!(
            "{}/microsoft_outlook/records/contact/{}/mails",
            self.app.base, self.contact
        );
        let requests = (0..count).map(|i| {
            let sender = &self.senders[i % self.senders.len()];
            let path = path.clone();
            async move {
                let response = sender
                    .browser
                    .client
                    .post(path)
                    .header("x-csrf-token", sender.csrf.as_str())
                    .json(&json!({
                        "to": "Dana <dana@fabrikam.example>",
                        "subject": format!("{tag} {i}"),
                        "text_body": format!("Hello Dana, this is mail {i} of {tag}."),
                    }))
                    .send()
                    .await
                    .expect("POST");
                assert_eq!(response.status(), StatusCode::CREATED);
                let body: serde_json::Value = response.json().await.expect("JSON");
                body["id"].as_i64().expect("id")
            }
        });
        futures::stream::iter(requests)
            .buffer_unordered(16)
            .collect()
            .await
    }

    /// Status counts of the mails `ids`.
    async fn statuses(&self, ids: &[i64]) -> BTreeMap<String, usize> {
        let (lo, hi) = (
            ids.iter().min().copied().unwrap_or(0),
            ids.iter().max().copied().unwrap_or(0),
        );
        let rows: Vec<(i64, String)> = match outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .column(outbox::Column::Status)
            .filter(outbox::Column::Id.between(lo, hi))
            .into_tuple()
            .all(&self.app.db)
            .await
        {
            Ok(rows) => rows,
            Err(_) => return BTreeMap::from([("database unreachable".to_string(), 0)]),
        };
        let wanted: std::collections::HashSet<i64> = ids.iter().copied().collect();
        let mut counts = BTreeMap::new();
        for (id, status) in rows {
            if wanted.contains(&id) {
                *counts.entry(status).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Waits until every mail of `ids` is sent (at most `limit`), with what was seen on failure.
    async fn wait_all_sent(&self, ids: &[i64], limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        loop {
            let counts = self.statuses(ids).await;
            if counts.get("sent") == Some(&ids.len()) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .procs
                    .iter()
                    .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(30)))
                    .collect();
                panic!(
                    "{what}: not all {} mails were sent within {limit:?}: {counts:?}\n{}",
                    ids.len(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The mails of `ids` as the sink and the outbox see them.
    async fn tally(&self, ids: &[i64]) -> Tally {
        let rows = outbox::Entity::find()
            .filter(outbox::Column::Id.is_in(ids.to_vec()))
            .all(&self.app.db)
            .await
            .expect("outbox");
        let at_sink = match &self.graph {
            Some(graph) => graph.count_by_message_id(),
            None => self.smtp.count_by_message_id(),
        };
        let mut tally = Tally {
            mails: ids.len(),
            sent: 0,
            lost: ids.len() - rows.len(),
            duplicates: 0,
        };
        for row in rows {
            let seen = at_sink.get(&row.message_id).copied().unwrap_or(0);
            if row.status == "sent" {
                tally.sent += 1;
            }
            if row.status != "sent" || seen == 0 {
                tally.lost += 1;
            }
            tally.duplicates += seen.saturating_sub(1);
        }
        tally
    }

    /// The highest number of connections one mailbox had open at once.
    fn max_connections_per_mailbox(&self) -> usize {
        self.senders
            .iter()
            .map(|s| match &self.graph {
                Some(graph) => graph.max_concurrent_for(&s.address),
                None => self.smtp.max_concurrent_connections_for(&s.address),
            })
            .max()
            .unwrap_or(0)
    }

    /// Asserts every process is alive and has not panicked.
    fn assert_healthy(&mut self) {
        for p in &mut self.procs {
            let log = p.log();
            assert!(!log.contains("panicked"), "{} panicked:\n{log}", p.name);
            assert!(p.is_running(), "{} exited:\n{}", p.name, p.log_tail(40));
        }
    }

    /// Stops every process gracefully; each must exit 0.
    async fn stop_all(&mut self) {
        for p in &mut self.procs {
            let name = p.name.clone();
            let tail = p.log_tail(20);
            assert!(p.terminate().await, "{name} did not stop cleanly:\n{tail}");
        }
    }

    /// Makes every access token expire now, so that the next delivery must refresh it.
    async fn expire_access_tokens(&self) {
        token::Entity::update_many()
            .col_expr(
                token::Column::AccessExpiresAt,
                Expr::value(chrono::Utc::now() - chrono::Duration::minutes(1)),
            )
            .exec(&self.app.db)
            .await
            .expect("expire tokens");
    }
}

/// The `token refresh: refreshed=N ...` lines a process logged, as the numbers refreshed.
fn refresh_runs(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| l.split("token refresh: refreshed=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_send_3000_mails_over_graph_exactly_once_within_its_limits() {
    if skip("graph-scale") {
        return;
    }
    const PROCESSES: usize = 3;
    const MAILS: usize = 3000;
    const MAILBOXES: usize = 10;
    let mut c = cluster_over(MAILBOXES, "graph").await;
    // Each request takes a while, as at Microsoft: a mailbox's requests overlap.
    if let Some(graph) = &c.graph {
        graph.set_processing_time(Duration::from_millis(20));
    }
    let ids = c.queue(MAILS, "graph-scale").await;
    c.start_processes(PROCESSES).await;
    c.wait_all_sent(&ids, Duration::from_secs(600), "graph-scale")
        .await;
    c.assert_healthy();
    let tally = c.tally(&ids).await;
    let max_requests = c.max_connections_per_mailbox();
    println!(
        "graph-scale: processes={PROCESSES} mails={} sent={} duplicates={} lost={} max_requests_per_mailbox={max_requests}",
        tally.mails, tally.sent, tally.duplicates, tally.lost
    );
    assert_eq!(
        (tally.sent, tally.lost, tally.duplicates),
        (MAILS, 0, 0),
        "{tally:?}"
    );
    assert!(
        (2..=microsoft_outlook::delivery::smtp::CONNECTIONS_PER_MAILBOX).contains(&max_requests),
        "a mailbox had at most {max_requests} Graph requests at once (Graph allows 4; the drains use several)"
    );
    assert_eq!(c.smtp.received_count(), 0, "nothing went over SMTP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_send_5000_mails_over_20_mailboxes_exactly_once() {
    if skip("scale") {
        return;
    }
    const PROCESSES: usize = 3;
    const MAILS: usize = 5000;
    const MAILBOXES: usize = 20;
    let mut c = cluster(MAILBOXES).await;
    let ids = c.queue(MAILS, "scale").await;
    assert_eq!(c.statuses(&ids).await.get("queued"), Some(&MAILS));
    // The nightly refresh, due at the same second in all three processes.
    let refresh_at = chrono::Utc::now() + chrono::Duration::seconds(12);
    let schedule = format!(
        "{} {} {} * * *",
        refresh_at.second(),
        refresh_at.minute(),
        refresh_at.hour()
    );
    c.settings(&[("refresh_schedule", schedule.as_str())]).await;
    c.start_processes(PROCESSES).await;
    c.wait_all_sent(&ids, Duration::from_secs(600), "scale")
        .await;
    // Every process's refresh run has reported (they start at the same second; jitter ≤ 2 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.procs.iter().any(|p| refresh_runs(&p.log()).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "not every process ran the refresh: {:?}",
            c.procs
                .iter()
                .map(|p| refresh_runs(&p.log()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    c.assert_healthy();
    let tally = c.tally(&ids).await;
    let max_conn = c.max_connections_per_mailbox();
    let refreshes: usize = c
        .idp
        .token_requests()
        .iter()
        .filter(|r| r.grant_type == "refresh_token" && r.status == 200)
        .count();
    let versions: Vec<i64> = token::Entity::find()
        .all(&c.app.db)
        .await
        .expect("tokens")
        .iter()
        .map(|t| t.version)
        .collect();
    let runs: Vec<Vec<usize>> = c.procs.iter().map(|p| refresh_runs(&p.log())).collect();
    // Drain jobs: at most one per mail queued by a web-only process (mails stored in one group
    // wake their mailbox once), at least one per mailbox; the workers' own mail wakes their
    // drains without a job.
    let jobs: i64 = {
        use sea_orm::ConnectionTrait;
        c.app
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM apalis.jobs WHERE job_type = 'microsoft_outlook.drain_mailbox'",
            ))
            .await
            .expect("apalis jobs")
            .and_then(|r| r.try_get::<i64>("", "n").ok())
            .unwrap_or(-1)
    };
    let refreshed_by_runs: usize = runs.iter().flatten().sum();
    println!(
        "scale: processes={PROCESSES} mails={} sent={} duplicates={} lost={} max_conn_per_mailbox={max_conn} refreshes={refreshes} mailboxes={MAILBOXES} refreshes_per_mailbox={} refresh_runs={} drain_jobs={jobs}",
        tally.mails,
        tally.sent,
        tally.duplicates,
        tally.lost,
        refreshes as f64 / MAILBOXES as f64,
        runs.iter().filter(|r| !r.is_empty()).count()
    );
    assert_eq!(
        (tally.sent, tally.lost, tally.duplicates),
        (MAILS, 0, 0),
        "{tally:?}"
    );
    assert!(
        max_conn <= 3,
        "a mailbox had {max_conn} connections at once"
    );
    assert!(max_conn >= 1);
    assert!(
        (MAILBOXES as i64..=MAILS as i64 * 3 / 2).contains(&jobs),
        "{jobs} delivery jobs for {MAILS} mails"
    );
    assert_eq!(
        refreshes, MAILBOXES,
        "each mailbox refreshed once by three runs at once: {runs:?}"
    );
    assert_eq!(refreshed_by_runs, MAILBOXES, "{runs:?}");
    assert!(
        versions.iter().all(|v| *v == versions[0]),
        "every token was rotated the same number of times: {versions:?}"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_killed_mid_drain_loses_nothing() {
    if skip("crash") {
        return;
    }
    const MAILS: usize = 3000;
    let mut c = cluster(10).await;
    let ids = c.queue(MAILS, "crash").await;
    c.start_processes(3).await;
    // Wait until the drain is well under way, then kill -9 one process.
    let deadline = Instant::now() + Duration::from_secs(300);
    while c.statuses(&ids).await.get("sent").copied().unwrap_or(0) < MAILS / 4 {
        assert!(Instant::now() < deadline, "the drain did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = c.procs.remove(0);
    let mut victim = victim;
    victim.kill9();
    // What it had claimed and not finished: in flight when it died.
    let in_flight = outbox::Entity::find()
        .filter(outbox::Column::Status.eq("sending"))
        .filter(outbox::Column::LeaseOwner.starts_with(victim.lease_owner_prefix()))
        .all(&c.app.db)
        .await
        .expect("outbox")
        .len();
    let sent_at_kill = c.statuses(&ids).await.get("sent").copied().unwrap_or(0);
    // The others take its mails over once their leases run out.
    c.wait_all_sent(&ids, Duration::from_secs(600), "crash")
        .await;
    c.assert_healthy();
    let tally = c.tally(&ids).await;
    println!(
        "crash: mails={} sent={} lost={} duplicates={} in_flight={in_flight} sent_before_kill={sent_at_kill} lease_secs={LEASE_SECS} max_conn_per_mailbox={}",
        tally.mails,
        tally.sent,
        tally.lost,
        tally.duplicates,
        c.max_connections_per_mailbox()
    );
    assert_eq!((tally.sent, tally.lost), (MAILS, 0), "{tally:?}");
    assert!(
        tally.duplicates <= in_flight,
        "{} duplicates, but only {in_flight} mails were in flight",
        tally.duplicates
    );
    // A mail is sent only with a turn that comes back once its outcome is written: the victim
    // cannot have had more than UNWRITTEN_PER_MAILBOX mails per mailbox accepted and not
    // recorded, however slow its writes were when it died.
    let bound = microsoft_outlook::delivery::transport::UNWRITTEN_PER_MAILBOX * 10;
    assert!(
        tally.duplicates <= bound,
        "{} duplicates: more than the {bound} the victim could have had accepted unwritten",
        tally.duplicates
    );
    assert!(c.max_connections_per_mailbox() <= 3);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_web_only_process_on_sqlite_hands_its_mail_to_a_worker_process() {
    if skip_unless_sqlite("sqlite-web-only") {
        return;
    }
    const MAILS: usize = 20;
    let mut c = cluster(2).await;
    c.start_processes(1).await;
    let ids = c.queue(MAILS, "sqlite-web-only").await;
    // They go out in about a second, on the drain jobs the web-only process pushed. The limit
    // stays under a minute: a job the worker never got is made up for only when the sweep
    // pushes again, twice the lease later (at least a minute; ten with the default lease).
    c.wait_all_sent(&ids, Duration::from_secs(30), "sqlite-web-only")
        .await;
    c.assert_healthy();
    let tally = c.tally(&ids).await;
    println!(
        "sqlite-web-only: mails={} sent={} duplicates={} lost={}",
        tally.mails, tally.sent, tally.duplicates, tally.lost
    );
    assert_eq!(
        (tally.sent, tally.lost, tally.duplicates),
        (MAILS, 0, 0),
        "{tally:?}"
    );
    c.stop_all().await;
}

/// One fault: queue `mails`, let the fault play, end it, and check that the queue drains with
/// every mail sent once.
async fn phase(
    c: &mut Cluster,
    name: &str,
    mails: usize,
    during: Duration,
    start: impl AsyncFnOnce(&Cluster),
    end: impl AsyncFnOnce(&Cluster),
) -> (Tally, BTreeMap<String, usize>, i32) {
    start(c).await;
    let ids = c.queue(mails, name).await;
    tokio::time::sleep(during).await;
    let during_fault = c.statuses(&ids).await;
    end(c).await;
    c.wait_all_sent(&ids, Duration::from_secs(180), name).await;
    let tally = c.tally(&ids).await;
    let most_attempts = outbox::Entity::find()
        .filter(outbox::Column::Id.is_in(ids.clone()))
        .all(&c.app.db)
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.attempts)
        .max()
        .unwrap_or(0);
    println!(
        "fault {name}: mails={} sent={} lost={} duplicates={} statuses_during_fault={during_fault:?} most_attempts={most_attempts}",
        tally.mails, tally.sent, tally.lost, tally.duplicates
    );
    assert_eq!((tally.sent, tally.lost), (mails, 0), "{name}: {tally:?}");
    (tally, during_fault, most_attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_of_every_peer_lose_nothing_and_the_queue_drains_after_each() {
    if skip("faults") {
        return;
    }
    let mut c = cluster(4).await;
    c.start_processes(2).await;
    let refresh_requests = |c: &Cluster, status: u16| {
        c.idp
            .token_requests()
            .iter()
            .filter(|r| r.grant_type == "refresh_token" && r.status == status)
            .count()
    };

    // The per-minute limit holds across processes: 3 a minute per mailbox, 6 queued for each.
    c.settings(&[("mailbox_rate_per_minute", "3")]).await;
    // Other processes read saved settings within two seconds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ids = c.queue(24, "throttle").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rows = outbox::Entity::find()
        .filter(outbox::Column::Id.is_in(ids.clone()))
        .all(&c.app.db)
        .await
        .expect("outbox");
    let mut sent_per_mailbox: BTreeMap<i32, usize> = BTreeMap::new();
    for r in &rows {
        *sent_per_mailbox.entry(r.server_id).or_insert(0) += usize::from(r.status == "sent");
    }
    let held_back_spent_attempts = rows
        .iter()
        .filter(|r| r.status == "queued" && r.attempts > 0)
        .count();
    println!(
        "throttle: processes=2 per_minute=3 queued=24 sent_in_the_first_minute_per_mailbox={:?} held_back_with_attempts_spent={held_back_spent_attempts}",
        sent_per_mailbox.values().collect::<Vec<_>>()
    );
    assert!(
        sent_per_mailbox.values().all(|n| *n == 3),
        "{sent_per_mailbox:?}"
    );
    assert_eq!(held_back_spent_attempts, 0);
    // A minute later (moved forward here) the rest goes out.
    c.settings(&[("mailbox_rate_per_minute", "0")]).await;
    outbox::Entity::update_many()
        .col_expr(
            outbox::Column::NextAttemptAt,
            Expr::value(chrono::Utc::now()),
        )
        .filter(outbox::Column::Id.is_in(ids.clone()))
        .filter(outbox::Column::Status.eq("queued"))
        .exec(&c.app.db)
        .await
        .expect("a minute later");
    c.wait_all_sent(&ids, Duration::from_secs(60), "throttle")
        .await;
    let t = c.tally(&ids).await;
    assert_eq!((t.sent, t.lost, t.duplicates), (24, 0, 0), "{t:?}");

    // The token endpoint is down (connections refused) while the tokens need a refresh.
    let (t, during, attempts) = phase(
        &mut c,
        "token-endpoint-down",
        40,
        Duration::from_secs(4),
        async |c| {
            c.expire_access_tokens().await;
            c.idp.go_down().await;
        },
        async |c| c.idp.come_back().expect("the identity platform is back"),
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert!(
        !during.contains_key("sent"),
        "nothing sent without a token: {during:?}"
    );
    // An endpoint that is away holds the mailboxes: no mail spends an attempt on it.
    assert_eq!(attempts, 1, "only the attempt that sent each mail");

    // The token endpoint answers 503 (temporarily_unavailable) a few times.
    let before = refresh_requests(&c, 503);
    let (t, _, attempts) = phase(
        &mut c,
        "token-endpoint-503",
        40,
        Duration::from_secs(2),
        async |c| {
            c.expire_access_tokens().await;
            c.idp
                .fail_next_token_requests(TokenFault::ServerError { status: 503 }, 6);
        },
        async |_| {},
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert!(refresh_requests(&c, 503) > before, "the 503s were answered");
    assert_eq!(attempts, 1, "the 503s spent no attempt");

    // The token endpoint answers slower than the 2-second timeout.
    let (t, _, attempts) = phase(
        &mut c,
        "token-endpoint-slow",
        40,
        Duration::from_secs(3),
        async |c| {
            c.expire_access_tokens().await;
            c.idp.fail_next_token_requests(
                TokenFault::Slow {
                    delay: Duration::from_secs(5),
                },
                4,
            );
        },
        async |c| c.idp.clear_faults(),
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert_eq!(attempts, 1, "the timed-out refreshes spent no attempt");

    // The SMTP server drops the line in the middle of DATA (nothing was accepted).
    let (t, _, attempts) = phase(
        &mut c,
        "smtp-drop-mid-data",
        40,
        Duration::from_secs(2),
        async |c| c.smtp.inject(Injected::DropMidData, 5),
        async |_| {},
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert_eq!(c.smtp.injections_left(), 0, "every drop was played");
    // A line dropped on a reused connection is retried at once on a new one (the message was
    // not complete, so the server cannot have taken it); on a new connection, in a later attempt.
    assert!(attempts >= 1);

    // 421: the server is closing the channel; later it recovers.
    let (t, _, attempts) = phase(
        &mut c,
        "smtp-421",
        40,
        Duration::from_secs(2),
        async |c| {
            c.smtp.inject(
                Injected::Reply {
                    stage: Stage::MailFrom,
                    reply: "421 4.3.2 Service not available, closing transmission channel".into(),
                },
                8,
            )
        },
        async |_| {},
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert_eq!(c.smtp.injections_left(), 0, "every 421 was played");
    assert!(attempts >= 2, "a 421 is retried in a later attempt");

    // The server refuses new connections for a while (idle connections are closed first).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (t, during, attempts) = phase(
        &mut c,
        "smtp-refuses-connections",
        40,
        Duration::from_secs(3),
        async |c| c.smtp.inject(Injected::RefuseConnection, 1_000_000),
        async |c| c.smtp.clear_injections(),
    )
    .await;
    assert_eq!(t.duplicates, 0);
    assert!(!during.contains_key("sent"), "{during:?}");
    // Nothing reached the server: the mailboxes waited, no mail spent an attempt.
    assert_eq!(attempts, 1);

    // The database restarts in the middle of a drain: the workers stop (gracefully), a backlog
    // is queued, new workers start on it, and PostgreSQL is stopped and started under them.
    c.assert_healthy();
    c.stop_all().await;
    c.procs.clear();
    const BACKLOG: usize = 600;
    let ids = c.queue(BACKLOG, "database-restart").await;
    c.start_processes(2).await;
    if std::env::var_os("TEST_PG_CTL").is_some() {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sent_before = 0;
        while sent_before < BACKLOG / 5 {
            assert!(Instant::now() < deadline, "the drain did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
            sent_before = c.statuses(&ids).await.get("sent").copied().unwrap_or(0);
        }
        let in_flight = outbox::Entity::find()
            .filter(outbox::Column::Id.is_in(ids.clone()))
            .filter(outbox::Column::Status.eq("sending"))
            .all(&c.app.db)
            .await
            .expect("outbox")
            .len();
        pg_ctl("stop -m fast")
            .expect("TEST_PG_CTL")
            .expect("PostgreSQL stops");
        // Away for longer than the lease (10 s) and than a drain once tried to write its
        // outcomes (30 s): every claim runs out while its owner, alive, holds outcomes of mails
        // the server took. (A CI run saw the database away for about 35 s under load.)
        tokio::time::sleep(DATABASE_AWAY).await;
        pg_ctl("start")
            .expect("TEST_PG_CTL")
            .expect("PostgreSQL starts");
        c.wait_all_sent(&ids, Duration::from_secs(240), "database-restart")
            .await;
        let t = c.tally(&ids).await;
        println!(
            "fault database-restart: mails={} sent={} lost={} duplicates={} sent_before_stop={sent_before} in_flight_at_stop={in_flight}",
            t.mails, t.sent, t.lost, t.duplicates
        );
        assert_eq!((t.sent, t.lost), (BACKLOG, 0), "{t:?}");
        // No process died: a mail accepted just as the database went away has its outcome
        // written once the database is back (its drain tries for as long as it lives), before
        // any sweep may give it to another drain (a sweep takes claims over only after it has
        // reached the database for 35 s).
        assert_eq!(
            t.duplicates, 0,
            "mails sent twice ({in_flight} were in flight at the stop)"
        );
    } else {
        c.wait_all_sent(&ids, Duration::from_secs(120), "drain")
            .await;
        println!(
            "fault database-restart: skipped (set TEST_PG_CTL, e.g. `pg_ctlcluster 15 main`; .ci/run does)"
        );
    }
    c.assert_healthy();
    c.stop_all().await;
}

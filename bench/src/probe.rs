//! `crm-bench probe`: the latency of each database step of the module's drain, one at a time,
//! on a drain-sized database (for profiling; not in BENCHMARKS.md). Per batch, as
//! `delivery::drain` runs them: the limits (kept 2 s), the claim (`claims::claim_batch`: one
//! `UPDATE … RETURNING`), the server row (kept 2 s), the bodies (`claims::bodies`: one
//! `SELECT … IN`), the token (`token_service::fresh_access_token`: a read and an unsealing),
//! and the outcomes (`record::record`: one `UPDATE` for every sent mail). No mail is sent.

use crate::setup::*;
use microsoft_outlook::delivery::limits::limits;
use microsoft_outlook::outbox::claims::{self, Claim};
use microsoft_outlook::outbox::record::{self, Outcome};
use microsoft_outlook::tokens::service::fresh_access_token;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Step {
    total: Duration,
    times: usize,
}

impl Step {
    fn add(&mut self, since: Instant) {
        self.total += since.elapsed();
        self.times += 1;
    }

    fn line(&self, name: &str, mails: usize) {
        if self.times == 0 {
            return;
        }
        println!(
            "{name:<24} {:>9.1} us/batch {:>7.2} us/mail ({} times)",
            self.total.as_secs_f64() * 1e6 / self.times as f64,
            self.total.as_secs_f64() * 1e6 / mails.max(1) as f64,
            self.times
        );
    }
}

/// Claims, reads and records every one of `n` queued mails over `mailboxes` mailboxes batch
/// by batch (mailbox after mailbox), timing each step.
pub async fn run(
    kind: DbKind,
    pg: &str,
    n: usize,
    mailboxes: usize,
    max_conns: u32,
) -> anyhow::Result<()> {
    let db = BenchDb::create(kind, pg).await?;
    let result = run_on(&db, n, mailboxes, max_conns).await;
    db.remove().await?;
    result
}

async fn run_on(db: &BenchDb, n: usize, mailboxes: usize, max_conns: u32) -> anyhow::Result<()> {
    let key = crm_sdk::SealingKey::generate();
    let mut config = host_config(&db.url);
    config.database_max_connections = max_conns;
    let a = assemble(&config, &key, module_options(16, "0 0 0 1 1 *")).await?;
    configure_module(&a.db, &a.sealer, &App::random(), "http://127.0.0.1:9").await?;
    let servers = add_servers(&a.db, mailboxes, 9).await?;
    add_tokens(&a.db, &a.sealer, &servers, None).await?;
    queue_mails(&a.db, &servers, n, 2048).await?;
    let (ctx, shared) = (&a.ctx, &a.shared);
    let (mut limit, mut claim, mut server, mut bodies, mut token, mut record) = (
        Step::default(),
        Step::default(),
        Step::default(),
        Step::default(),
        Step::default(),
        Step::default(),
    );
    let mut mails = 0;
    let started = Instant::now();
    for s in &servers {
        loop {
            let t = Instant::now();
            let limits = limits(ctx, shared).await;
            limit.add(t);
            let t = Instant::now();
            let claimed = match claims::claim_batch(ctx, shared, s.id, limits.per_minute).await? {
                Claim::Batch(c) => c,
                _ => break,
            };
            claim.add(t);
            mails += claimed.rows.len();
            let t = Instant::now();
            let row = shared
                .server(ctx, s.id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("server {} is gone", s.id))?;
            server.add(t);
            let ids: Vec<i64> = claimed.rows.iter().map(|r| r.id).collect();
            let t = Instant::now();
            let got = claims::bodies(ctx, &ids).await?;
            bodies.add(t);
            anyhow::ensure!(got.len() == ids.len(), "bodies missing");
            let t = Instant::now();
            fresh_access_token(ctx, shared, &row, false)
                .await
                .map_err(|e| anyhow::anyhow!("token: {e}"))?;
            token.add(t);
            let outcomes: Vec<Outcome> = ids
                .iter()
                .map(|id| Outcome {
                    id: *id,
                    status: "sent",
                    next_attempt_at: None,
                    last_reply: Some(format!("250 2.0.0 OK <{id}@probe> [Hostname=bench]")),
                    last_error: None,
                    uncount: false,
                    tried: true,
                })
                .collect();
            let t = Instant::now();
            let turn = shared.write_gate(ctx).await;
            record::record(ctx, &turn, &claimed.owner, &outcomes, false).await?;
            drop(turn);
            record.add(t);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} on {}: {mails} mails in {} batches, {secs:.2} s of database work ({:.0} mails/s without sending)",
        db.kind.name(),
        if max_conns == 1 {
            "1 connection".to_string()
        } else {
            format!("a pool of {max_conns}")
        } + if db.kind.name() == "sqlite" {
            " (and the module's writer connection)"
        } else {
            ""
        },
        claim.times,
        mails as f64 / secs.max(1e-9)
    );
    limit.line("limits (kept 2 s)", mails);
    claim.line("claim_batch", mails);
    server.line("server (kept 2 s)", mails);
    bodies.line("bodies", mails);
    token.line("fresh_access_token", mails);
    record.line("record (sent)", mails);
    a.db.close().await?;
    Ok(())
}

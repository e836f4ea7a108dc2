//! Not the module: a sketch of the delivery design the findings recommend, measured beside it
//! to show what the same database and sink allow. Each task owns one mailbox's connection,
//! claims up to [`BATCH`] due mails of that mailbox in one `UPDATE ... RETURNING` (with
//! `SKIP LOCKED` on PostgreSQL), reads and unseals the token once per batch, sends the mails
//! over its reused `TCP_NODELAY` connection and marks the sent ones in one `UPDATE`; an index on
//! `(server_id, status, next_attempt_at)` serves the claims.

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use microsoft_outlook::entities::{outbox, token};
use microsoft_outlook::tokens::store::access_context;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait};
use secrecy::ExposeSecret;
use std::time::{Duration, Instant};

use crate::drain::{Run, settle};
use crate::services::Sink;
use crate::setup::Assembled;

/// Mails claimed (and marked) per statement.
pub const BATCH: u64 = 50;

async fn claim(
    a: &Assembled,
    server_id: i32,
    owner: &str,
) -> anyhow::Result<Vec<(i64, Envelope, Vec<u8>)>> {
    let now = chrono::Utc::now();
    let mut pick = Query::select();
    pick.column(outbox::Column::Id)
        .from(outbox::Entity)
        .and_where(outbox::Column::ServerId.eq(server_id))
        .and_where(outbox::Column::Status.eq("queued"))
        .and_where(outbox::Column::NextAttemptAt.lte(now))
        .order_by(outbox::Column::Id, sea_orm::Order::Asc)
        .limit(BATCH);
    if a.db.get_database_backend() == DbBackend::Postgres {
        pick.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let update = Query::update()
        .table(outbox::Entity)
        .value(outbox::Column::Status, "sending")
        .value(outbox::Column::LeaseOwner, owner)
        .value(
            outbox::Column::LeaseUntil,
            now + chrono::Duration::seconds(300),
        )
        .value(
            outbox::Column::Attempts,
            Expr::col(outbox::Column::Attempts).add(1),
        )
        .and_where(outbox::Column::Id.in_subquery(pick))
        .returning(Query::returning().columns([
            outbox::Column::Id,
            outbox::Column::EnvelopeFrom,
            outbox::Column::Recipients,
            outbox::Column::RawMessage,
        ]))
        .to_owned();
    let rows = a.db.query_all(&update).await?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.try_get("", "id")?;
            let from: String = r.try_get("", "envelope_from")?;
            let to: String = r.try_get("", "recipients")?;
            let raw: String = r.try_get("", "raw_message")?;
            let to: Vec<lettre::Address> = to.lines().map(str::parse).collect::<Result<_, _>>()?;
            Ok((
                id,
                Envelope::new(Some(from.parse()?), to)?,
                raw.into_bytes(),
            ))
        })
        .collect()
}

async fn mark_sent(a: &Assembled, ids: Vec<i64>, owner: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let update = Query::update()
        .table(outbox::Entity)
        .value(outbox::Column::Status, "sent")
        .value(outbox::Column::SentAt, now)
        .value(outbox::Column::UpdatedAt, now)
        .value(outbox::Column::LastReply, "250 2.0.0 OK")
        .value(outbox::Column::LeaseOwner, Option::<String>::None)
        .value(
            outbox::Column::LeaseUntil,
            Option::<chrono::DateTime<chrono::Utc>>::None,
        )
        .and_where(outbox::Column::Id.is_in(ids))
        .and_where(outbox::Column::LeaseOwner.eq(owner))
        .to_owned();
    a.db.execute(&update).await?;
    Ok(())
}

/// Drains every queued mail the batched way with `concurrency` tasks (mailbox `t % n` each).
pub async fn drain(
    a: &Assembled,
    servers: &[microsoft_outlook::entities::mail_server::Model],
    expected: usize,
    port: u16,
    concurrency: usize,
    sink: &Sink,
) -> anyhow::Result<Run> {
    // Part of the design: claims by mailbox read an index, not the whole outbox.
    a.db.execute_unprepared(
        "CREATE INDEX IF NOT EXISTS bench_outbox_claim ON microsoft_outlook_outbox (server_id, status, next_attempt_at)",
    )
    .await?;
    let before = sink.received();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let server = servers[t % servers.len()].clone();
            let a = a.clone();
            tokio::spawn(async move {
                let owner = format!("prototype-{t}");
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                tcp.set_nodelay(true)?;
                let hello = ClientId::Domain("bench.localdomain".into());
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await?;
                let mut authed = false;
                loop {
                    let batch = claim(&a, server.id, &owner).await?;
                    if batch.is_empty() {
                        break;
                    }
                    // The token, once per batch.
                    let row = token::Entity::find_by_id(server.id)
                        .one(&a.db)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("no token"))?;
                    let access = a
                        .sealer
                        .unseal(&row.access_token_sealed, &access_context(server.id))?;
                    if !authed {
                        conn.auth(
                            &[Mechanism::Xoauth2],
                            &Credentials::new(
                                server.mailbox.clone(),
                                access.expose_secret().to_string(),
                            ),
                        )
                        .await?;
                        authed = true;
                    }
                    let mut sent = Vec::with_capacity(batch.len());
                    for (id, envelope, raw) in &batch {
                        conn.send(envelope, raw).await?;
                        sent.push(*id);
                    }
                    mark_sent(&a, sent, &owner).await?;
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
    sink.wait_for(before + expected, Duration::from_secs(10))
        .await?;
    let unsettled = settle(&a.db, expected, Duration::from_secs(5)).await?;
    Ok(Run {
        count: expected,
        secs,
        unsettled,
    })
}

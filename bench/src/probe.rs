//! `crm-bench probe`: the latency of each database statement of the module's delivery path,
//! one at a time, on a drain-sized database (for profiling; not in BENCHMARKS.md).

use crate::setup::*;
use microsoft_outlook::entities::{mail_server, outbox};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use std::time::Instant;

/// Times each statement `n` times over a database with `n` queued mails.
pub async fn run(kind: DbKind, pg: &str, n: usize, max_conns: u32) -> anyhow::Result<()> {
    let db = BenchDb::create(kind, pg).await?;
    let key = crm_sdk::SealingKey::generate();
    let mut config = host_config(&db.url);
    config.database_max_connections = max_conns;
    let a = assemble(&config, &key, module_options(16, "0 0 0 1 1 *")).await?;
    configure_module(&a.db, &a.sealer, &App::random(), "http://127.0.0.1:9").await?;
    let servers = add_servers(&a.db, 10, 9).await?;
    add_tokens(&a.db, &a.sealer, &servers, None).await?;
    let ids = queue_mails(&a.db, &servers, n, 2048).await?;
    let ctx = &a.ctx;
    macro_rules! time {
        ($name:expr, |$i:ident, $id:ident| $body:expr) => {{
            let t = Instant::now();
            for $i in 0..n {
                let $id = ids[$i];
                let _ = $id;
                $body;
            }
            println!(
                "{:<28} {:>8.1} us/op",
                $name,
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }};
    }
    time!("update by id", |i, id| {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::Status, Expr::value("sending"))
            .filter(outbox::Column::Id.eq(id))
            .exec(ctx.db())
            .await?;
    });
    time!("select outbox by id", |i, id| {
        outbox::Entity::find_by_id(id).one(ctx.db()).await?;
    });
    time!("select server by id", |i, id| {
        mail_server::Entity::find_by_id(servers[i % 10].id)
            .one(ctx.db())
            .await?;
    });
    time!("settings load", |i, id| {
        ctx.settings().load(ctx.module_id()).await?;
    });
    time!("fresh_access_token", |i, id| {
        let _ = microsoft_outlook::tokens::service::fresh_access_token(
            ctx,
            &a.shared,
            &servers[i % 10],
            false,
        )
        .await;
    });
    time!("ping", |i, id| {
        ctx.db().ping().await?;
    });
    a.db.close().await?;
    db.remove().await?;
    Ok(())
}

//! This process's SQLite writer: the write turns of the module (claims, outcomes, lease
//! extensions, sweeps, queued mails) go to one connection of their own, in turns taken at
//! [`crate::runtime::Shared::write_gate`], and a second connection copies the write-ahead log
//! back into the database file beside it. On PostgreSQL a turn is the host's pool, at once.

use std::sync::Arc;

/// A turn to write, from [`crate::runtime::Shared::write_gate`].
pub struct WriteTurn {
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    db: sea_orm::DatabaseConnection,
    /// On SQLite, counts the turn for the checkpointer (see [`Writer`]).
    checkpoints: Option<Arc<Checkpoints>>,
}

impl Drop for WriteTurn {
    fn drop(&mut self) {
        if let Some(c) = &self.checkpoints {
            let turns = c.turns.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if turns % CHECKPOINT_EVERY_TURNS == 0 {
                // Full: the checkpointer has a wake-up pending already.
                let _ = c.wake.try_send(());
            }
        }
    }
}

/// This process's SQLite writer connection (see [`open_writer`]) and what wakes its
/// checkpointer.
pub(crate) struct Writer {
    db: sea_orm::DatabaseConnection,
    checkpoints: Arc<Checkpoints>,
}

/// The write turns ended so far, and the channel that wakes the checkpointer.
struct Checkpoints {
    turns: std::sync::atomic::AtomicU32,
    wake: tokio::sync::mpsc::Sender<()>,
}

impl WriteTurn {
    /// A turn on the host's pool, taken at once (PostgreSQL, whose writers do not exclude each
    /// other).
    pub(crate) fn on_pool(db: &sea_orm::DatabaseConnection) -> Self {
        Self {
            _turn: None,
            db: db.clone(),
            checkpoints: None,
        }
    }

    /// The SQLite turn `turn` of the process's write gate, on its writer connection (on the
    /// host's pool `db` when there is none, for an in-memory database).
    pub(crate) fn taken(
        turn: tokio::sync::OwnedMutexGuard<()>,
        db: &sea_orm::DatabaseConnection,
        writer: Option<&Writer>,
    ) -> Self {
        Self {
            _turn: Some(turn),
            db: writer.map_or(db, |w| &w.db).clone(),
            checkpoints: writer.map(|w| w.checkpoints.clone()),
        }
    }

    /// Where the turn's statements go: on SQLite the process's writer connection, otherwise
    /// the host's pool.
    pub fn db(&self) -> &sea_orm::DatabaseConnection {
        &self.db
    }
}

/// Opens the connection this process's SQLite write turns use, to the host's database file
/// with the host pool's settings (WAL, busy timeout, page cache), and a second one for its
/// checkpointer ([`checkpoint_when_due`], started on the calling task's runtime: the module
/// opens it when its jobs start). `None` for an in-memory database (a second pool would open
/// another database) or when either cannot be opened.
///
/// Why one connection: in WAL mode a connection that finds the database changed by another
/// connection since its last statement drops its whole page cache. When the turns took any of
/// the pool's connections, nearly every claim and outcome write started from an empty cache,
/// reading the pages it was about to change again (`pread`) and freeing and allocating the
/// cache anew (a perf capture of `crm-host serve`: `pcache1TruncateUnsafe`, `malloc`, `free`
/// and `pread` in the SQLite threads). The turns' own connection keeps its cache as long as
/// other connections write little meanwhile (the host's own writes, and those of the module
/// that take no turn: health, connection slots, tokens, the pages' actions).
///
/// The writer checkpoints by itself only past [`WRITER_AUTOCHECKPOINT_PAGES`], a backstop should
/// the checkpointer fall behind (a burst of large mails, other processes writing the same file)
/// or be gone; and a log that grew past [`JOURNAL_SIZE_LIMIT`] is cut back to it when it
/// starts again.
pub(crate) async fn open_writer(
    db: &sea_orm::DatabaseConnection,
    gate: Arc<tokio::sync::Mutex<()>>,
) -> Option<Writer> {
    let options = db.get_sqlite_connection_pool().connect_options();
    let name = options.get_filename().to_string_lossy();
    if name.starts_with("file:") || name.contains(":memory:") || !options.get_filename().is_file() {
        return None;
    }
    let one = || {
        sea_orm::sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    };
    // The writer leaves checkpoints to the checkpointer, but for the backstop.
    let writer_options = (*options)
        .clone()
        .pragma(
            "wal_autocheckpoint",
            WRITER_AUTOCHECKPOINT_PAGES.to_string(),
        )
        .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string());
    let pool = one().connect_with(writer_options).await;
    let checkpointer = one().connect_with((*options).clone()).await;
    match (pool, checkpointer) {
        (Ok(pool), Ok(checkpointer)) => {
            let (wake, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(checkpoint_when_due(checkpointer, gate, rx));
            Some(Writer {
                db: sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool),
                checkpoints: Arc::new(Checkpoints {
                    turns: std::sync::atomic::AtomicU32::new(0),
                    wake,
                }),
            })
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot open the SQLite writer or checkpointer connection; writes use the host's pool");
            None
        }
    }
}

/// Pages in the log past which the writer checkpoints by itself ([`open_writer`]): ten times
/// SQLite's default, about 40 MB.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// Bytes the log file is cut back to when it starts again (SQLite's `journal_size_limit`).
const JOURNAL_SIZE_LIMIT: u64 = 32 * 1024 * 1024;

/// Write turns between two checkpoints. A turn (a claim of 100 or an outcome statement) adds
/// 20 to 80 pages to the log: about SQLite's own `wal_autocheckpoint` of 1,000 pages.
const CHECKPOINT_EVERY_TURNS: u32 = 32;

/// Copies the write-ahead log back into the database file every [`CHECKPOINT_EVERY_TURNS`]
/// write turns, on a connection of its own. SQLite's automatic checkpoint ran inside the
/// commit of whichever write turn crossed its threshold while every other writer of the
/// process waited: in a perf capture of the drain, checkpoints took 12 % of the writer thread.
///
/// A passive checkpoint copies the bulk beside the writer and the readers; then a second one,
/// during a write turn of its own, copies the few pages written meanwhile. The log is then
/// wholly copied while this process's turns append nothing, so the next turn starts it again
/// from its beginning (SQLite restarts the log only then, and only when no reader is still on
/// it): checkpoints that only ran beside the writer never caught up under steady load, and the
/// log grew by every page written (99 MB for 10,000 mails, against 5 MB with the automatic
/// checkpoint and 15 MB this way). Writes outside the turns (other processes on the same file,
/// the module's health and slot rows, the host's own) can still keep a round from finishing;
/// the writer's backstop ([`WRITER_AUTOCHECKPOINT_PAGES`]) bounds the log then. Ends when the
/// writer is dropped.
async fn checkpoint_when_due(
    pool: sea_orm::sqlx::SqlitePool,
    gate: Arc<tokio::sync::Mutex<()>>,
    mut wake: tokio::sync::mpsc::Receiver<()>,
) {
    // (busy, pages in the log, pages copied): a reader still on older pages stops the copy
    // short, which is no error; the next round goes on from there.
    let checkpoint = || async {
        match sea_orm::sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok((_, log, copied)) if copied < log => {
                tracing::debug!(log, copied, "a checkpoint copied part of the log");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "a checkpoint failed"),
        }
    };
    while wake.recv().await.is_some() {
        checkpoint().await;
        let _turn = gate.lock().await;
        checkpoint().await;
    }
    pool.close().await;
}

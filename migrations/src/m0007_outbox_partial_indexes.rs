use sea_orm_migration::prelude::*;

/// The outbox's indexes on `status` become partial: they hold only the mails still to send
/// (queued, or sending under a lease) and the few failed ones, not the history of sent mail.
///
/// Before, every claim and every outcome moved each mail's entries in two indexes that
/// contain `status` ((status, next_attempt_at) and (server_id, status, id)), and those indexes
/// kept an entry for every sent mail. Now a claim removes the mail from the queued indexes and
/// adds it to the leased one, and its outcome removes it from there: half the index writes per
/// mail, and indexes the size of the queue. SQLite and PostgreSQL use a partial index only when
/// the query names the status as written here (`outbox::status_is`), not as a bound parameter.
///
/// On PostgreSQL the new indexes are built in the migration's transaction, which blocks writes
/// to the outbox while it reads the table once (seconds for a million mails): run it in a
/// quiet moment on a large outbox.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// (name, columns, condition) of the partial indexes.
const PARTIAL: [(&str, &str, &str); 4] = [
    // A mailbox's queued mails in queue order: the drain's claim, the probe of a hold.
    (
        "microsoft_outlook_outbox_queued",
        "server_id, id",
        "status = 'queued'",
    ),
    // Queued mails by when they are due: the sweep.
    (
        "microsoft_outlook_outbox_waiting",
        "next_attempt_at",
        "status = 'queued'",
    ),
    // A mailbox's claimed mails (the probe of a hold in flight), and by when their lease runs
    // out (the sweep takes back the expired ones: a scan of the claimed mails only).
    (
        "microsoft_outlook_outbox_leased",
        "server_id, lease_until",
        "status = 'sending'",
    ),
    // Failed mails, newest first on the outbox page.
    ("microsoft_outlook_outbox_failed", "id", "status = 'failed'"),
];

/// The indexes the partial ones replace: (name, columns).
const REPLACED: [(&str, &str); 2] = [
    ("microsoft_outlook_outbox_due", "status, next_attempt_at"),
    (
        "microsoft_outlook_outbox_server_status_id",
        "server_id, status, id",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (name, columns, condition) in PARTIAL {
            db.execute_unprepared(&format!(
                "CREATE INDEX IF NOT EXISTS {name} ON microsoft_outlook_outbox ({columns}) WHERE {condition}"
            ))
            .await?;
        }
        for (name, _) in REPLACED {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (name, columns) in REPLACED {
            db.execute_unprepared(&format!(
                "CREATE INDEX IF NOT EXISTS {name} ON microsoft_outlook_outbox ({columns})"
            ))
            .await?;
        }
        for (name, _, _) in PARTIAL {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                .await?;
        }
        Ok(())
    }
}

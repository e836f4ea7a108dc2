use sea_orm_migration::prelude::*;

/// Two outbox indexes stop taking an entry for every version of every row.
///
/// - `microsoft_outlook_outbox_pushed` (on `pushed_at`) is dropped: no query reads it since
///   the sweep looks for waiting mail through the partial index of queued mail (m0007).
/// - `microsoft_outlook_outbox_server_sent` (server, `sent_at`: the per-minute count of a
///   mailbox's sends) holds only rows with a `sent_at`: the count asks for `sent_at` after a
///   time, which both databases know implies that it is set.
///
/// On PostgreSQL an update that changes an indexed column (a claim and an outcome change
/// `status`) adds an entry to every index whose condition the new row meets; the claim of a
/// mail without a per-minute limit now adds none to these two, and its outcome one instead of
/// two. The index is built in the migration's transaction (see m0007 for what that blocks).
#[derive(DeriveMigrationName)]
pub struct Migration;

const SENT: &str = "microsoft_outlook_outbox_server_sent";
const PUSHED: &str = "microsoft_outlook_outbox_pushed";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {PUSHED}"))
            .await?;
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {SENT}"))
            .await?;
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {SENT} ON microsoft_outlook_outbox (server_id, sent_at) WHERE sent_at IS NOT NULL"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {SENT}"))
            .await?;
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {SENT} ON microsoft_outlook_outbox (server_id, sent_at)"
        ))
        .await?;
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {PUSHED} ON microsoft_outlook_outbox (pushed_at)"
        ))
        .await?;
        Ok(())
    }
}

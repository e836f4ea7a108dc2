use sea_orm_migration::{prelude::*, schema::*};

/// The sweep's bookkeeping moves from every mail to every mailbox: when a drain of the mailbox
/// was last asked for (`microsoft_outlook_mailbox_wakes.pushed_at`), instead of a `pushed_at`
/// written on each of its queued mails.
///
/// A drain takes all of its mailbox's due mail, so one time per mailbox says as much as one per
/// mail: a queued mail that became due after its mailbox's last push (or whose push is older
/// than the sweep's repush interval) is waiting for a wake. Before, a sweep marked every such
/// mail: its first run after a start rewrote a whole backlog (8,400 rows, 196 ms, in a
/// PostgreSQL serve run), and a mailbox at its per-minute limit had its waiting mails rewritten
/// each minute. The outbox's `pushed_at` column stays, no longer written.
#[derive(DeriveMigrationName)]
pub struct Migration;

const WAKES: &str = "microsoft_outlook_mailbox_wakes";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WAKES)
                    .if_not_exists()
                    .col(integer("server_id").primary_key())
                    .col(timestamp_with_time_zone("pushed_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(WAKES).if_exists().to_owned())
            .await
    }
}

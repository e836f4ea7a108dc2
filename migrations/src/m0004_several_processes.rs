use sea_orm_migration::{prelude::*, schema::*};

/// For several processes on one database:
/// - connection slots per mailbox: an SMTP connection to a mailbox holds one slot under a lease,
///   so that all processes together keep to Exchange's limit of three concurrent connections
///   per mailbox, and a crashed process's slots free themselves;
/// - `outbox.pushed_at`: when a delivery job was last pushed for a mail, so that the sweeps of
///   every process push a job for a due mail once, not on every tick.
#[derive(DeriveMigrationName)]
pub struct Migration;

const SLOTS: &str = "microsoft_outlook_smtp_slots";
const OUTBOX: &str = "microsoft_outlook_outbox";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SLOTS)
                    .if_not_exists()
                    .col(integer("server_id"))
                    .col(integer("slot"))
                    .col(string_null("holder"))
                    .col(timestamp_with_time_zone_null("lease_until"))
                    .primary_key(Index::create().col("server_id").col("slot"))
                    .to_owned(),
            )
            .await?;
        // The per-minute throttle counts a mailbox's recent sends across processes.
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_server_sent")
                    .table(OUTBOX)
                    .col("server_id")
                    .col("sent_at")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        if !manager.has_column(OUTBOX, "pushed_at").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(OUTBOX)
                        .add_column(timestamp_with_time_zone_null("pushed_at"))
                        .to_owned(),
                )
                .await?;
        }
        // The sweep looks for the newest push a worker took (an index scan, not a table scan).
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_pushed")
                    .table(OUTBOX)
                    .col("pushed_at")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("microsoft_outlook_outbox_pushed")
                    .table(OUTBOX)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("microsoft_outlook_outbox_server_sent")
                    .table(OUTBOX)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(OUTBOX)
                    .drop_column("pushed_at")
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(SLOTS).to_owned())
            .await
    }
}

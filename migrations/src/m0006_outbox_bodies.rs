use sea_orm_migration::{prelude::*, schema::*};

/// The message bytes move out of the outbox into `microsoft_outlook_outbox_bodies` (one row per
/// mail, keyed by the outbox id), so that claims, scans and outcome writes move small rows; the
/// drain reads a batch's bodies in one statement. Bodies of sent mails are deleted after the
/// retention the operators set (`keep_sent_days`).
#[derive(DeriveMigrationName)]
pub struct Migration;

const OUTBOX: &str = "microsoft_outlook_outbox";
const BODIES: &str = "microsoft_outlook_outbox_bodies";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// In one transaction on SQLite too (its DDL is transactional): the copy and the dropped
    /// column go together or not at all.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(BODIES)
                    .if_not_exists()
                    .col(big_integer("outbox_id").primary_key())
                    .col(text("raw"))
                    .to_owned(),
            )
            .await?;
        if manager.has_column(OUTBOX, "raw_message").await? {
            let db = manager.get_connection();
            db.execute_unprepared(&format!(
                "INSERT INTO {BODIES} (outbox_id, raw) SELECT id, raw_message FROM {OUTBOX} WHERE true \
                 ON CONFLICT (outbox_id) DO NOTHING"
            ))
            .await?;
            manager
                .alter_table(
                    Table::alter()
                        .table(OUTBOX)
                        .drop_column("raw_message")
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OUTBOX)
                    .add_column(text("raw_message").default(""))
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "UPDATE {OUTBOX} SET raw_message = (SELECT raw FROM {BODIES} WHERE outbox_id = {OUTBOX}.id) \
             WHERE id IN (SELECT outbox_id FROM {BODIES})"
        ))
        .await?;
        manager
            .drop_table(Table::drop().table(BODIES).to_owned())
            .await
    }
}

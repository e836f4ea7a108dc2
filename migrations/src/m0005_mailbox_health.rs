use sea_orm_migration::{prelude::*, schema::*};

/// One health state per mailbox (mail server or personal mailbox): `ready`, `throttled` until a
/// time, or `held` with a reason and since when. The drains, pages, CLI and notifications read
/// it. Also:
/// - `tokens.smtp_user`: the identity SMTP AUTH accepted for the mailbox (the mailbox address or
///   the signed-in UPN), remembered once found;
/// - mails that waited in the old per-mail `needs_reconnect` status go back to `queued`: a held
///   mailbox now keeps its mails from being claimed instead.
#[derive(DeriveMigrationName)]
pub struct Migration;

const HEALTH: &str = "microsoft_outlook_mailbox_health";
const TOKENS: &str = "microsoft_outlook_tokens";
const OUTBOX: &str = "microsoft_outlook_outbox";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(HEALTH)
                    .if_not_exists()
                    .col(integer("server_id").primary_key())
                    .col(string("state").default("ready"))
                    .col(string_null("reason"))
                    .col(text_null("detail"))
                    .col(timestamp_with_time_zone_null("since"))
                    .col(timestamp_with_time_zone_null("until"))
                    .col(timestamp_with_time_zone_null("notified_at"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .to_owned(),
            )
            .await?;
        if !manager.has_column(TOKENS, "smtp_user").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(TOKENS)
                        .add_column(string_null("smtp_user"))
                        .to_owned(),
                )
                .await?;
        }
        // A mailbox's oldest waiting mail (the probe of a hold) is found by index.
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_server_status_id")
                    .table(OUTBOX)
                    .col("server_id")
                    .col("status")
                    .col("id")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "UPDATE {OUTBOX} SET status = 'queued' WHERE status = 'needs_reconnect'"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(HEALTH).to_owned())
            .await
    }
}

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

const OUTBOX: &str = "microsoft_outlook_outbox";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(OUTBOX)
                    .if_not_exists()
                    .col(big_pk_auto("id"))
                    .col(string_uniq("message_id"))
                    .col(string("status"))
                    .col(integer("server_id"))
                    .col(big_integer("author_user_id"))
                    .col(string("record_model"))
                    .col(big_integer("record_id"))
                    .col(text("from_header"))
                    .col(text("envelope_from"))
                    .col(text("recipients"))
                    .col(text("subject"))
                    .col(text("raw_message"))
                    .col(big_integer("size_bytes"))
                    .col(integer("attempts"))
                    .col(timestamp_with_time_zone("next_attempt_at"))
                    .col(timestamp_with_time_zone_null("lease_until"))
                    .col(string_null("lease_owner"))
                    .col(text_null("last_reply"))
                    .col(text_null("last_error"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .col(timestamp_with_time_zone_null("sent_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_due")
                    .table(OUTBOX)
                    .col("status")
                    .col("next_attempt_at")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_record")
                    .table(OUTBOX)
                    .col("record_model")
                    .col("record_id")
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(OUTBOX).if_exists().to_owned())
            .await
    }
}

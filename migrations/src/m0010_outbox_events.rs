use sea_orm_migration::{prelude::*, schema::*};

/// A mail's history: each attempt the server did not accept (its reply and what it meant),
/// and each retry or cancel by a person, in `microsoft_outlook_outbox_events`. Before, a retry
/// or a new attempt overwrote the outbox row's `last_reply` and `last_error`, so an operator
/// could no longer see why a mail had failed before it was retried. Sent mail adds no row (the
/// outbox row keeps when it was sent and the server's reply): the drains' path stays one
/// statement per batch of sent mails.
#[derive(DeriveMigrationName)]
pub struct Migration;

const EVENTS: &str = "microsoft_outlook_outbox_events";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EVENTS)
                    .if_not_exists()
                    .col(big_pk_auto("id"))
                    .col(big_integer("outbox_id"))
                    .col(timestamp_with_time_zone("at"))
                    .col(string("kind"))
                    .col(integer_null("attempt"))
                    .col(text_null("reply"))
                    .col(text_null("detail"))
                    .col(big_integer_null("user_id"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_outbox_events_mail")
                    .table(EVENTS)
                    .col("outbox_id")
                    .col("id")
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(EVENTS).if_exists().to_owned())
            .await
    }
}

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

const SERVERS: &str = "microsoft_outlook_mail_servers";
const TOKENS: &str = "microsoft_outlook_tokens";
const STATES: &str = "microsoft_outlook_oauth_states";
const ALERTS: &str = "microsoft_outlook_alerts";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SERVERS)
                    .if_not_exists()
                    .col(pk_auto("id"))
                    .col(string("name"))
                    .col(string("kind"))
                    .col(big_integer_null("owner_user_id"))
                    .col(string("smtp_host"))
                    .col(integer("smtp_port"))
                    .col(string("security"))
                    .col(text_null("extra_ca_pem"))
                    .col(string("mailbox"))
                    .col(string("auth"))
                    .col(string("transport"))
                    .col(string("send_as"))
                    .col(text("from_allow_list"))
                    .col(boolean("is_default"))
                    .col(timestamp_with_time_zone("created_at"))
                    .col(timestamp_with_time_zone("updated_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("microsoft_outlook_mail_servers_owner")
                    .table(SERVERS)
                    .col("owner_user_id")
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TOKENS)
                    .if_not_exists()
                    .col(integer("server_id").primary_key())
                    .col(text("access_token_sealed"))
                    .col(text_null("refresh_token_sealed"))
                    .col(timestamp_with_time_zone("access_expires_at"))
                    .col(text("scopes"))
                    .col(big_integer("version"))
                    .col(string("status"))
                    .col(string("signed_in_as"))
                    .col(timestamp_with_time_zone("connected_at"))
                    .col(timestamp_with_time_zone_null("last_refresh_at"))
                    .col(text_null("last_error"))
                    .col(timestamp_with_time_zone_null("notified_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from(TOKENS, "server_id")
                            .to(SERVERS, "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(STATES)
                    .if_not_exists()
                    .col(string("state_hash").primary_key())
                    .col(big_integer("user_id"))
                    .col(integer("server_id"))
                    .col(text("pkce_verifier_sealed"))
                    .col(timestamp_with_time_zone("expires_at"))
                    .col(timestamp_with_time_zone("created_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ALERTS)
                    .if_not_exists()
                    .col(string("key").primary_key())
                    .col(text("value"))
                    .col(timestamp_with_time_zone("at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [ALERTS, STATES, TOKENS, SERVERS] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

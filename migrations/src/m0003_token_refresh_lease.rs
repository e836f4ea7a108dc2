use sea_orm_migration::{prelude::*, schema::*};

/// A short lease on a token's refresh, so that one worker (in any process) refreshes and the
/// others wait for its result instead of spending the rotating refresh token again.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager
            .has_column("microsoft_outlook_tokens", "refresh_lease_until")
            .await?
        {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table("microsoft_outlook_tokens")
                    .add_column(timestamp_with_time_zone_null("refresh_lease_until"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("microsoft_outlook_tokens")
                    .drop_column("refresh_lease_until")
                    .to_owned(),
            )
            .await
    }
}

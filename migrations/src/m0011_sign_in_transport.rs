use sea_orm_migration::{prelude::*, schema::*};

/// The transport a server takes when a pending sign-in completes (`graph` for "Switch to
/// Microsoft Graph"), so that a sign-in abandoned at Microsoft leaves the server as it was.
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLE: &str = "microsoft_outlook_oauth_states";
const COLUMN: &str = "transport";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.has_column(TABLE, COLUMN).await? {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(TABLE)
                    .add_column(string_null(COLUMN))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(TABLE).drop_column(COLUMN).to_owned())
            .await
    }
}

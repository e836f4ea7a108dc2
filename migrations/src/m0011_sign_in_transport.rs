use sea_orm_migration::prelude::*;

/// The transport a server takes when a pending sign-in completes (`graph` for "Switch to
/// Microsoft Graph"), so that a sign-in abandoned at Microsoft leaves the server as it was.
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLE: &str = "microsoft_outlook_oauth_states";
const COLUMN: &str = "transport";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::add_text_column(manager, TABLE, COLUMN).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::drop_column(manager, TABLE, COLUMN).await
    }
}

use sea_orm_migration::prelude::*;

/// The classification rule whose verdict a mailbox's hold now stands on (beside its reason and
/// words), so that pages can tell apart causes that share a reason: an SMTP server out of
/// reach (whose settings a mailbox owner may have wrong) from Microsoft Graph or the token
/// endpoint out of reach (nothing of the owner's).
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLE: &str = "microsoft_outlook_mailbox_health";
const COLUMN: &str = "rule";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::add_text_column(manager, TABLE, COLUMN).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::drop_column(manager, TABLE, COLUMN).await
    }
}

use sea_orm_migration::{prelude::*, schema::*};

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

//! The `microsoft_outlook` module's schema, for SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;

mod m0001_mail_servers_and_tokens;
mod m0002_outbox;
mod m0003_token_refresh_lease;
mod m0004_several_processes;
mod m0005_mailbox_health;
mod m0006_outbox_bodies;
mod m0007_outbox_partial_indexes;
mod m0008_outbox_fewer_index_writes;
mod m0009_mailbox_wakes;
mod m0010_outbox_events;
mod m0011_sign_in_transport;
mod m0012_hold_rule;

/// The module's migrator; it keeps its own history table beside the host's.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_mail_servers_and_tokens::Migration),
            Box::new(m0002_outbox::Migration),
            Box::new(m0003_token_refresh_lease::Migration),
            Box::new(m0004_several_processes::Migration),
            Box::new(m0005_mailbox_health::Migration),
            Box::new(m0006_outbox_bodies::Migration),
            Box::new(m0007_outbox_partial_indexes::Migration),
            Box::new(m0008_outbox_fewer_index_writes::Migration),
            Box::new(m0009_mailbox_wakes::Migration),
            Box::new(m0010_outbox_events::Migration),
            Box::new(m0011_sign_in_transport::Migration),
            Box::new(m0012_hold_rule::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "microsoft_outlook_migrations".into_iden()
    }
}

/// Adds the nullable text column `column` to `table`, unless it is there already (a later
/// migration's upgrade of a table an earlier one made).
async fn add_text_column(
    manager: &SchemaManager<'_>,
    table: &str,
    column: &str,
) -> Result<(), DbErr> {
    if manager.has_column(table, column).await? {
        return Ok(());
    }
    manager
        .alter_table(
            Table::alter()
                .table(Alias::new(table))
                .add_column(sea_orm_migration::schema::string_null(Alias::new(column)))
                .to_owned(),
        )
        .await
}

/// Drops `column` of `table` (the way down of [`add_text_column`]).
async fn drop_column(manager: &SchemaManager<'_>, table: &str, column: &str) -> Result<(), DbErr> {
    manager
        .alter_table(
            Table::alter()
                .table(Alias::new(table))
                .drop_column(Alias::new(column))
                .to_owned(),
        )
        .await
}

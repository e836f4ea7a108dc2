//! The database: connecting (SQLite in WAL mode, or PostgreSQL) and the host's own schema.

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use sea_orm_migration::{prelude::*, schema::*};
use std::time::Duration;

/// Opens the database at `url`; SQLite files get WAL, a busy timeout and foreign keys.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    let mut url = url.to_string();
    if url.starts_with("sqlite:") && !url.contains(":memory:") {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .map(|p| p.split('?').next().unwrap_or(p))
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| DbErr::Custom(format!("cannot create {}: {e}", dir.display())))?;
        }
        if !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            });
        }
    }
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(Ord::max(max_connections, 1))
        .min_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        // On every pooled connection, not only the first: WAL, no fsync per commit (WAL's
        // NORMAL is still safe against corruption), waiting for the writer instead of failing,
        // foreign keys, and a 2 MiB page cache each.
        .map_sqlx_sqlite_opts(|o| {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .pragma("cache_size", "-2048")
        });
    Database::connect(options).await
}

/// The first of `rows`: for lookups by key, read with `.all()` rather than `.one()`. SQLite
/// (3.46 on, as bundled) reads the value bound to `.one()`'s `LIMIT ?` while planning and then
/// marks the statement to be compiled again whenever that parameter is bound anew, so every
/// request's cached session lookup was parsed and planned again (`sqlite3Reprepare` in perf).
pub fn first<T>(rows: Vec<T>) -> Option<T> {
    rows.into_iter().next()
}

/// The host's migrator (users, sessions, contacts, settings, modules, notifications).
pub struct HostMigrator;

#[async_trait::async_trait]
impl MigratorTrait for HostMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001HostTables),
            Box::new(M0002NotificationIncidents),
            Box::new(M0003NotificationReads),
        ]
    }

    fn migration_table_name() -> DynIden {
        "crm_host_migrations".into_iden()
    }
}

struct M0001HostTables;

/// Which notifications each person has read.
struct M0003NotificationReads;

impl MigrationName for M0003NotificationReads {
    fn name(&self) -> &str {
        "m0003_notification_reads"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0003NotificationReads {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("crm_notification_reads")
                    .if_not_exists()
                    .col(big_integer("notification_id"))
                    .col(big_integer("user_id"))
                    .col(timestamp_with_time_zone("read_at"))
                    .primary_key(Index::create().col("notification_id").col("user_id"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table("crm_notification_reads")
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Notifications name the incident they belong to (`key`) and when it was resolved.
struct M0002NotificationIncidents;

impl MigrationName for M0002NotificationIncidents {
    fn name(&self) -> &str {
        "m0002_notification_incidents"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002NotificationIncidents {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (column, def) in [
            ("incident_key", string_null("incident_key")),
            ("resolved_at", timestamp_with_time_zone_null("resolved_at")),
        ] {
            if !manager.has_column("crm_notifications", column).await? {
                manager
                    .alter_table(
                        Table::alter()
                            .table("crm_notifications")
                            .add_column(def)
                            .to_owned(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}

impl MigrationName for M0001HostTables {
    fn name(&self) -> &str {
        "m0001_host_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001HostTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            Table::create()
                .table("crm_users")
                .if_not_exists()
                .col(big_pk_auto("id"))
                .col(string_uniq("email"))
                .col(string("name"))
                .col(string("password_hash"))
                .col(boolean("is_admin"))
                .col(timestamp_with_time_zone("created_at"))
                .to_owned(),
            Table::create()
                .table("crm_sessions")
                .if_not_exists()
                .col(string("token_hash").primary_key())
                .col(big_integer("user_id"))
                .col(string("csrf_token"))
                .col(timestamp_with_time_zone("expires_at"))
                .col(timestamp_with_time_zone("created_at"))
                .to_owned(),
            Table::create()
                .table("crm_contacts")
                .if_not_exists()
                .col(big_pk_auto("id"))
                .col(string("name"))
                .col(string_null("email"))
                .col(string_null("company"))
                .col(big_integer("owner_user_id"))
                .col(boolean("private"))
                .col(timestamp_with_time_zone("created_at"))
                .to_owned(),
            Table::create()
                .table("crm_settings")
                .if_not_exists()
                .col(string("module"))
                .col(string("key"))
                .col(text("value"))
                .col(boolean("sealed"))
                .col(timestamp_with_time_zone("updated_at"))
                .primary_key(Index::create().col("module").col("key"))
                .to_owned(),
            Table::create()
                .table("crm_modules")
                .if_not_exists()
                .col(string("id").primary_key())
                .col(boolean("enabled"))
                .col(timestamp_with_time_zone("changed_at"))
                .to_owned(),
            Table::create()
                .table("crm_notifications")
                .if_not_exists()
                .col(big_pk_auto("id"))
                .col(big_integer_null("user_id"))
                .col(boolean("for_operators"))
                .col(string("subject"))
                .col(text("body"))
                .col(string_null("link"))
                .col(timestamp_with_time_zone("created_at"))
                .to_owned(),
        ];
        for table in tables {
            manager.create_table(table).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "crm_notifications",
            "crm_modules",
            "crm_settings",
            "crm_contacts",
            "crm_sessions",
            "crm_users",
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

//! The module's tables as sea-orm entities.

pub mod alert;
pub mod mail_server;
pub mod mailbox_health;
pub mod mailbox_wake;
pub mod oauth_state;
pub mod outbox;
pub mod outbox_body;
pub mod outbox_event;
pub mod smtp_slot;
pub mod token;

use sea_orm::{ConnectionTrait, DbErr, EntityTrait, PrimaryKeyTrait};

/// The row of `E` whose primary key is `key`, if there is one: what `find_by_id(key).one(db)`
/// gives, without the `LIMIT ?` that `one` binds.
///
/// SQLite (3.46 on, as bundled) reads the value bound to a `LIMIT ?` while it plans the
/// statement and then marks the statement to be compiled again whenever that parameter is
/// bound anew: every run of a cached statement with a bound limit parses and plans it again
/// (`sqlite3Reprepare`, found in a perf capture of the drain: once per claim, health read and
/// token read). A lookup by primary key needs no limit. Errors: the database's.
pub async fn by_key<E, C>(
    db: &C,
    key: <E::PrimaryKey as PrimaryKeyTrait>::ValueType,
) -> Result<Option<E::Model>, DbErr>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    Ok(E::find_by_id(key).all(db).await?.into_iter().next())
}

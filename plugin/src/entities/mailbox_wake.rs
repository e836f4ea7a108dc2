//! When a drain of each mailbox was last asked for (by a sweep, or by a process that queues
//! mail without delivering it): the sweep wakes a mailbox whose due mail came due after that.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_mailbox_wakes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub server_id: i32,
    /// When a drain job was last pushed (or a drain started) for the mailbox.
    pub pushed_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

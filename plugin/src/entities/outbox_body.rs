//! A mail's bytes, apart from its outbox row: written once at queue time, read by the drain,
//! deleted after the retention for sent mail (`keep_sent_days`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_outbox_bodies")]
pub struct Model {
    /// The outbox row's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub outbox_id: i64,
    /// The message as sent (RFC 5322), built at queue time.
    pub raw: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

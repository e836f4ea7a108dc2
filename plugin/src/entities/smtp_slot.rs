//! Connection slots per mailbox, shared by every process: an open SMTP connection holds one.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_smtp_slots")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub server_id: i32,
    #[sea_orm(primary_key, auto_increment = false)]
    pub slot: i32,
    /// Who holds it (a process and connection), or nobody.
    pub holder: Option<String>,
    /// Until when the holder owns it unless it renews; after that anyone may take it.
    pub lease_until: Option<ChronoDateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

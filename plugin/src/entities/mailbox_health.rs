//! The health state of a mailbox (mail server or personal mailbox): one row per server.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_mailbox_health")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub server_id: i32,
    /// `ready`, `throttled` or `held`.
    pub state: String,
    /// Why it is held (a [`crate::delivery::classify::HoldReason`] name), or throttled.
    pub reason: Option<String>,
    /// What happened and what to do, in words.
    pub detail: Option<String>,
    /// The classification rule whose verdict the hold stands on (its id in
    /// [`crate::delivery::classify`]'s table), beside `reason`; `None` when not held.
    pub rule: Option<String>,
    /// Since when it is held or throttled.
    pub since: Option<ChronoDateTimeUtc>,
    /// Until when (throttled, quota); `None` while held until someone fixes the cause.
    pub until: Option<ChronoDateTimeUtc>,
    /// When the people who can fix it were told of this incident.
    pub notified_at: Option<ChronoDateTimeUtc>,
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

//! OAuth tokens of a mail server, sealed; one row per server.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub server_id: i32,
    pub access_token_sealed: String,
    pub refresh_token_sealed: Option<String>,
    pub access_expires_at: ChronoDateTimeUtc,
    pub scopes: String,
    /// Bumped on every write; writers compare-and-swap on it.
    pub version: i64,
    /// `valid` or `needs_reconnect`.
    pub status: String,
    pub signed_in_as: String,
    pub connected_at: ChronoDateTimeUtc,
    pub last_refresh_at: Option<ChronoDateTimeUtc>,
    pub last_error: Option<String>,
    pub notified_at: Option<ChronoDateTimeUtc>,
    /// While set and in the future, one worker is refreshing this token; others wait for it.
    pub refresh_lease_until: Option<ChronoDateTimeUtc>,
    /// The `user=` SMTP AUTH accepted (the mailbox or the signed-in UPN), once found.
    pub smtp_user: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

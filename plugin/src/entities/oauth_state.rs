//! Pending OAuth `state` values: stored hashed, single use, ten minutes.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_oauth_states")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub state_hash: String,
    pub user_id: i64,
    pub server_id: i32,
    pub pkce_verifier_sealed: String,
    pub expires_at: ChronoDateTimeUtc,
    pub created_at: ChronoDateTimeUtc,
    /// The transport the server takes when this sign-in completes (`graph`: a switch to
    /// Microsoft Graph), or `None` to keep its own.
    pub transport: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

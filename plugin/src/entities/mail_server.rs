//! Outgoing mail servers: shared ones (operators) and personal mailboxes (one per user).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_mail_servers")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub name: String,
    /// `shared` or `personal`.
    pub kind: String,
    pub owner_user_id: Option<i64>,
    pub smtp_host: String,
    pub smtp_port: i32,
    /// `starttls`, `tls` or `none`.
    pub security: String,
    pub extra_ca_pem: Option<String>,
    pub mailbox: String,
    /// `delegated` (a user signs in) or `app_only` (client credentials).
    pub auth: String,
    /// `smtp` or `graph`.
    pub transport: String,
    /// `author` (send as the CRM user) or `mailbox` (send as the mailbox itself).
    pub send_as: String,
    /// Addresses (or `@domain`) this server may send as, one per line; empty = the mailbox only,
    /// or any author when sending as the author.
    pub from_allow_list: String,
    pub is_default: bool,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

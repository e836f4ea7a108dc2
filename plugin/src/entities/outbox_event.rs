//! A mail's history beside its outbox row: each attempt the server did not accept, and each
//! retry or cancel by a person (`outbox::history`). Sent mail adds no row: its outbox row
//! keeps when it was sent and the server's reply.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_outbox_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The outbox row's id.
    pub outbox_id: i64,
    /// When it happened (the module's clock).
    pub at: ChronoDateTimeUtc,
    /// `deferred` (an attempt that did not go out; tried again later), `failed` (one that did
    /// not go out; not tried again), `waited` (stopped by its mailbox's problem), `retried`,
    /// `due_now`, `released` or `cancelled` (by a person).
    pub kind: String,
    /// The attempt's number (attempts only).
    pub attempt: Option<i32>,
    /// The server's reply to the attempt, as it came (attempts only).
    pub reply: Option<String>,
    /// What it meant, in words; for a person's action, who took it.
    pub detail: Option<String>,
    /// The user who retried or cancelled it.
    pub user_id: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

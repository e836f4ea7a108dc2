//! The outbox: one row per mail, the truth about what was sent.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "microsoft_outlook_outbox")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The Message-ID (without angle brackets), fixed at queue time.
    pub message_id: String,
    /// `queued`, `sending`, `sent`, `failed` or `cancelled` (by a person, from the outbox: never
    /// claimed, never sent).
    pub status: String,
    pub server_id: i32,
    pub author_user_id: i64,
    pub record_model: String,
    pub record_id: i64,
    /// The From header as shown to people.
    pub from_header: String,
    /// The envelope sender (MAIL FROM).
    pub envelope_from: String,
    /// Envelope recipients (to, cc and bcc), one per line.
    pub recipients: String,
    pub subject: String,
    pub size_bytes: i64,
    pub attempts: i32,
    pub next_attempt_at: ChronoDateTimeUtc,
    /// Until when the worker that claimed it owns it.
    pub lease_until: Option<ChronoDateTimeUtc>,
    pub lease_owner: Option<String>,
    /// The last SMTP (or Graph) reply.
    pub last_reply: Option<String>,
    /// The last failure, in words.
    pub last_error: Option<String>,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
    pub sent_at: Option<ChronoDateTimeUtc>,
    /// No longer written (migration m0009): the sweep keeps one wake time per mailbox in
    /// `microsoft_outlook_mailbox_wakes`. Rows queued before that may still hold a time.
    pub pushed_at: Option<ChronoDateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Every status an outbox row can have.
pub const STATUSES: [&str; 5] = ["queued", "sending", "sent", "failed", "cancelled"];

/// [`status_is`] for a status given at run time (a filter's value): `None` when it is not one
/// of [`STATUSES`].
pub fn status_named(status: &str) -> Option<sea_orm::sea_query::SimpleExpr> {
    STATUSES
        .iter()
        .find(|s| **s == status)
        .map(|s| status_is(s))
}

/// `status = '<status>'` with the status written into the SQL rather than bound: SQLite and
/// PostgreSQL use the outbox's partial indexes (on queued, sending and failed mails, migration
/// m0007) only for a query that names the status as the index does. `status` is a constant
/// of the code (`queued`, `sending`, `sent`, `failed` or `cancelled`), never user input.
pub fn status_is(status: &'static str) -> sea_orm::sea_query::SimpleExpr {
    debug_assert!(status.bytes().all(|b| b.is_ascii_lowercase()));
    Expr::cust(format!(
        "\"microsoft_outlook_outbox\".\"status\" = '{status}'"
    ))
}

/// Queued or sending, each named as its partial index is (see [`status_is`]).
pub fn unsent() -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(status_is("queued"))
        .add(status_is("sending"))
}

//! The module's tables as sea-orm entities.

pub mod alert;
pub mod mail_server;
pub mod mailbox_health;
pub mod oauth_state;
pub mod outbox;
pub mod outbox_body;
pub mod smtp_slot;
pub mod token;

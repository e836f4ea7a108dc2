//! The `microsoft_outlook` CRM module: connect Microsoft 365 / Exchange Online mailboxes with
//! OAuth2 and send CRM mail through them.
//!
//! The rooms, top to bottom (no module imports one above it):
//! - [`web`]: pages and routes; [`jobs`]: what the scheduled jobs do;
//! - [`delivery`]: drains, mailbox health, classification, transports (SMTP);
//! - [`outbox`]: compose, queue, claims and outcomes; [`connect`]: the OAuth2 flow;
//!   [`tokens`]: the sealed token store and fresh tokens;
//! - [`runtime`]: what routes and jobs share, [`sqlite_writer`] their turns to write on
//!   SQLite; [`settings`], [`alerts`], [`metrics`], [`entities`]: the tables.

pub mod alerts;
pub mod connect;
pub mod delivery;
pub mod entities;
pub mod jobs;
pub mod metrics;
mod module;
pub mod outbox;
pub mod reach;
pub mod runtime;
pub mod settings;
pub mod sqlite_writer;
pub mod tokens;
pub mod web;

pub use module::{CONFIRM_PATH, MANIFEST_TOML, OutlookModule, is_loopback_url};

#[cfg(test)]
mod structure_test;

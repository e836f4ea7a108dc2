//! The `microsoft_outlook` CRM module: connect Microsoft 365 / Exchange Online mailboxes with
//! OAuth2 and send CRM mail through them.

pub mod aad;
pub mod alerts;
pub mod classify;
pub mod compose;
pub mod confirm;
pub mod delivery;
pub mod entities;
pub mod failed_notice;
pub mod health;
pub mod jobs;
pub mod layout;
pub mod mail_routes;
pub mod metrics;
mod module;
pub mod oauth;
pub mod outbox;
pub mod outbox_page;
pub mod pages;
pub mod queue;
pub mod runtime;
pub mod servers;
pub mod settings;
pub mod setup_guide;
pub mod smtp;
pub mod status;
pub mod test_connection;
pub mod token_client;
pub mod token_service;
pub mod token_store;
pub mod xoauth2;

pub use module::{CONFIRM_PATH, MANIFEST_TOML, OutlookModule, is_loopback_url};

#[cfg(test)]
mod structure_test;

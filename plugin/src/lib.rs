//! The `microsoft_outlook` CRM module: connect Microsoft 365 / Exchange Online mailboxes with
//! OAuth2 and send CRM mail through them.

pub mod entities;
pub mod jobs;
mod module;
pub mod pages;
pub mod servers;
pub mod settings;

pub use module::{CONFIRM_PATH, MANIFEST_TOML, OutlookModule};

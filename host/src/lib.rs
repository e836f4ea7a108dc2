//! The reference CRM host: users and sign-in, contact records, settings and modules pages, and
//! the run-time enabling of linked modules such as `microsoft_outlook`.

pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod demo;
pub mod entities;
pub mod html;
pub mod modules_page;
pub mod notifier;
pub mod records;
pub mod registry;
pub mod seed;
pub mod settings;
pub mod state;

pub use app::{Application, HostOptions};
pub use config::Config;

/// The modules this host links.
pub fn linked_modules() -> Vec<std::sync::Arc<dyn crm_sdk::Module>> {
    vec![std::sync::Arc::new(microsoft_outlook::OutlookModule::new())]
}

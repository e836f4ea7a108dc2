//! The reference CRM host: users and sign-in, contact records, settings and modules pages, and
//! the run-time enabling of linked modules such as `microsoft_outlook`.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod disabled;
pub mod entities;
pub mod html;
pub mod inbox;
pub mod metrics;
pub mod modules_page;
pub mod not_found;
pub mod notifier;
pub mod records;
pub mod registry;
pub mod seed;
pub mod settings;
pub mod state;
pub mod throttle;

pub use app::{Application, HostOptions};
pub use config::Config;

/// The modules this host links, tuned by the configuration.
pub fn linked_modules(config: &Config) -> Vec<std::sync::Arc<dyn crm_sdk::Module>> {
    let defaults = microsoft_outlook::runtime::ModuleOptions::default();
    let tuning = &config.outlook;
    let options = microsoft_outlook::runtime::ModuleOptions {
        lease_secs: tuning.lease_secs.unwrap_or(defaults.lease_secs).max(10),
        delivery_concurrency: tuning
            .delivery_concurrency
            .unwrap_or(defaults.delivery_concurrency)
            .max(1),
        sweep_schedule: tuning
            .sweep_schedule
            .clone()
            .unwrap_or(defaults.sweep_schedule.clone()),
        retry_base_secs: tuning
            .retry_base_secs
            .unwrap_or(defaults.retry_base_secs)
            .max(1),
        token_timeout: tuning
            .token_timeout_secs
            .map_or(defaults.token_timeout, |s| {
                std::time::Duration::from_secs(s.max(1))
            }),
        smtp_timeout: tuning.smtp_timeout_secs.map_or(defaults.smtp_timeout, |s| {
            std::time::Duration::from_secs(s.max(1))
        }),
        workers: tuning.workers.unwrap_or(defaults.workers),
        ..defaults
    };
    vec![std::sync::Arc::new(
        microsoft_outlook::OutlookModule::with_options(options),
    )]
}

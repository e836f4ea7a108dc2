//! What every host handler shares.

use crm_sdk::{Clock, Sealer};
use sea_orm::DatabaseConnection;
use std::sync::Arc;

use crate::config::Config;
use crate::html::HostChrome;
use crate::registry::Registry;

/// The host's shared state (actix app data).
pub struct AppState {
    /// The database.
    pub db: DatabaseConnection,
    /// The configuration it started with.
    pub config: Config,
    /// The linked modules and whether each is enabled.
    pub registry: Arc<Registry>,
    /// The page frame.
    pub chrome: Arc<HostChrome>,
    /// Seals secret settings.
    pub sealer: Sealer,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Whether cookies need HTTPS (the public base URL is https).
    pub secure_cookies: bool,
}

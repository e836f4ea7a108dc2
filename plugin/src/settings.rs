//! The module's settings, typed.

use chrono::NaiveDate;
use crm_sdk::ModuleContext;
use secrecy::SecretString;

/// The default authority (Microsoft's global cloud).
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The default nightly refresh schedule.
pub const DEFAULT_REFRESH_SCHEDULE: &str = "0 0 3 * * *";

/// What the operator configured in the settings page.
#[derive(Debug, Clone)]
pub struct OutlookSettings {
    /// The Azure application (client) id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: SecretString,
    /// When the client secret expires, if the operator said.
    pub secret_expires_on: Option<NaiveDate>,
    /// `common`, `organizations`, a tenant id or domain.
    pub tenant: String,
    /// The identity platform's base URL.
    pub authority_url: String,
    /// When tokens are refreshed.
    pub refresh_schedule: String,
}

/// Why the module cannot act on its settings.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotConfigured {
    /// Required fields are empty.
    #[error("the Microsoft Outlook settings are incomplete: {} missing. An operator must fill them in under Settings › Microsoft Outlook.", .0.join(" and "))]
    Missing(Vec<&'static str>),
    /// Stored settings could not be read (e.g. the sealing key changed).
    #[error(
        "the Microsoft Outlook settings cannot be read ({0}). An operator must re-enter the client secret under Settings › Microsoft Outlook."
    )]
    Unreadable(String),
}

impl OutlookSettings {
    /// Loads and checks the settings.
    pub async fn load(ctx: &ModuleContext) -> Result<Self, NotConfigured> {
        let values = ctx
            .settings()
            .load(ctx.module_id())
            .await
            .map_err(|e| NotConfigured::Unreadable(e.to_string()))?;
        let client_id = values.get("client_id").map(str::to_string);
        let client_secret = values.secret("client_secret").cloned();
        match (client_id, client_secret) {
            (Some(client_id), Some(client_secret)) => Ok(Self {
                client_id,
                client_secret,
                secret_expires_on: values
                    .get("client_secret_expires_on")
                    .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()),
                tenant: values.get("tenant").unwrap_or("common").to_string(),
                authority_url: values
                    .get("authority_url")
                    .unwrap_or(DEFAULT_AUTHORITY)
                    .trim_end_matches('/')
                    .to_string(),
                refresh_schedule: values
                    .get("refresh_schedule")
                    .unwrap_or(DEFAULT_REFRESH_SCHEDULE)
                    .to_string(),
            }),
            (id, secret) => {
                let mut missing = Vec::new();
                if id.is_none() {
                    missing.push("the application (client) ID");
                }
                if secret.is_none() {
                    missing.push("the client secret");
                }
                Err(NotConfigured::Missing(missing))
            }
        }
    }

    /// `{authority}/{tenant}/oauth2/v2.0/authorize`.
    pub fn authorize_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/authorize",
            self.authority_url, self.tenant
        )
    }

    /// `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.authority_url, self.tenant)
    }
}

use async_trait::async_trait;
use secrecy::SecretString;
use std::collections::BTreeMap;

/// Why settings could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The database did not answer.
    #[error("settings storage failed: {0}")]
    Storage(String),
    /// A secret could not be unsealed (wrong key, altered value).
    #[error("the secret setting `{field}` cannot be unsealed: {source}")]
    Unseal {
        /// The field's id.
        field: String,
        /// Why.
        source: crate::SealError,
    },
}

/// A module's settings as stored by the host; secret fields come back unsealed but wrapped.
#[derive(Debug, Default, Clone)]
pub struct SettingsValues {
    plain: BTreeMap<String, String>,
    secrets: BTreeMap<String, SecretString>,
}

impl SettingsValues {
    /// Builds the values from plain and secret maps.
    pub fn new(plain: BTreeMap<String, String>, secrets: BTreeMap<String, SecretString>) -> Self {
        Self { plain, secrets }
    }

    /// A plain field's value, if set and not empty.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.plain
            .get(field)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A secret field's value, if set.
    pub fn secret(&self, field: &str) -> Option<&SecretString> {
        self.secrets.get(field)
    }

    /// Whether a secret field has a stored value.
    pub fn has_secret(&self, field: &str) -> bool {
        self.secrets.contains_key(field)
    }
}

/// Where the host keeps module settings (secret fields sealed at rest).
#[async_trait]
pub trait SettingsStore: Send + Sync + 'static {
    /// Loads every stored setting of `module`.
    async fn load(&self, module: &str) -> Result<SettingsValues, SettingsError>;
}

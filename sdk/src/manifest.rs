use serde::Deserialize;
use std::collections::HashSet;
use std::str::FromStr;

/// The version of the host contract this crate describes.
pub const HOST_API_VERSION: u32 = 1;

/// What a module declares to the host (parsed from its `manifest.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The module's id, e.g. `microsoft_outlook`.
    pub id: String,
    /// The name shown to operators.
    pub name: String,
    /// The module's version.
    pub version: String,
    /// The host contract version the module was built for.
    pub host_api: u32,
    /// One sentence on what the module does.
    pub description: String,
    /// Where its routes live, `/` + id.
    pub route_prefix: String,
    /// The settings section's title.
    pub settings_section: String,
    /// Its settings fields.
    #[serde(default, rename = "setting")]
    pub settings: Vec<SettingField>,
    /// Its scheduled jobs.
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobSpec>,
    /// Entries the host adds to its menu while the module is enabled.
    #[serde(default, rename = "menu")]
    pub menu: Vec<MenuItem>,
    /// The tables it owns.
    #[serde(default)]
    pub tables: Vec<String>,
}

/// A settings field a module declares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingField {
    /// The field's id (snake_case).
    pub id: String,
    /// Its label.
    pub label: String,
    /// What it holds, which decides how it is validated.
    pub kind: FieldKind,
    /// Whether the module cannot work without it.
    #[serde(default)]
    pub required: bool,
    /// Whether it is write-only and sealed at rest.
    #[serde(default)]
    pub secret: bool,
    /// A sentence that helps fill it in.
    #[serde(default)]
    pub help: String,
    /// The value used when none is stored.
    #[serde(default)]
    pub default: Option<String>,
    /// The values allowed, each with its label (`[["global", "Global"], ...]`); shown as a
    /// choice, anything else refused.
    #[serde(default)]
    pub choices: Vec<(String, String)>,
}

impl SettingField {
    /// Checks `raw` against the field's kind and choices; the value to store, or a message.
    pub fn normalize(&self, raw: &str) -> Result<String, String> {
        let value = self.kind.normalize(raw)?;
        if self.choices.is_empty() || self.choices.iter().any(|(v, _)| *v == value) {
            Ok(value)
        } else {
            let allowed: Vec<&str> = self.choices.iter().map(|(v, _)| v.as_str()).collect();
            Err(format!("must be one of: {}", allowed.join(", ")))
        }
    }
}

/// The kinds of settings fields, each with its own validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Free text.
    Text,
    /// A secret (write-only).
    Secret,
    /// A GUID such as an Azure application id.
    Guid,
    /// An Entra tenant: `common`, `organizations`, `consumers`, a GUID or a domain.
    Tenant,
    /// An absolute http(s) URL.
    Url,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// A cron expression with a seconds field.
    Cron,
    /// A whole number.
    Integer,
}

/// A menu entry a module adds to the host's frame.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MenuItem {
    /// The entry's text.
    pub label: String,
    /// The path it links to, under the module's prefix.
    pub path: String,
    /// Whether only operators see it.
    #[serde(default)]
    pub operators_only: bool,
}

/// A job the module runs, with its default schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's id.
    pub id: String,
    /// What it does.
    pub description: String,
    /// Its default schedule (cron, with seconds), or absent for queue workers.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The settings field that overrides the schedule, if any.
    #[serde(default)]
    pub schedule_setting: Option<String>,
}

/// A manifest that cannot be used, naming the field and the problem.
#[derive(Debug, thiserror::Error)]
#[error("invalid module manifest: {field}: {problem}")]
pub struct ManifestError {
    /// The offending field (a TOML path).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError {
        field: field.into(),
        problem: problem.into(),
    }
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Manifest {
    /// Parses and validates a manifest.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            let field = message
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "(document)".to_string());
            bad(field, message.trim().to_string())
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what TOML's types cannot.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !is_identifier(&self.id) {
            return Err(bad("id", "must be snake_case letters, digits and _"));
        }
        if self.host_api != HOST_API_VERSION {
            return Err(bad(
                "host_api",
                format!(
                    "the module needs host API {}, this host provides {HOST_API_VERSION}",
                    self.host_api
                ),
            ));
        }
        if self.route_prefix != format!("/{}", self.id) {
            return Err(bad(
                "route_prefix",
                format!("must be \"/{}\" (slash + id)", self.id),
            ));
        }
        if self.version.split('.').count() != 3
            || self.version.split('.').any(|p| p.parse::<u64>().is_err())
        {
            return Err(bad("version", "must be a semantic version like 1.2.3"));
        }
        let mut seen = HashSet::new();
        for (i, field) in self.settings.iter().enumerate() {
            let at = format!("setting[{i}]");
            if !is_identifier(&field.id) {
                return Err(bad(format!("{at}.id"), "must be snake_case"));
            }
            if !seen.insert(field.id.as_str()) {
                return Err(bad(
                    format!("{at}.id"),
                    format!("`{}` is declared twice", field.id),
                ));
            }
            if field.label.trim().is_empty() {
                return Err(bad(format!("{at}.label"), "must not be empty"));
            }
            if field.secret != (field.kind == FieldKind::Secret) {
                return Err(bad(
                    format!("{at}.secret"),
                    "secret = true goes with kind = \"secret\", and only with it",
                ));
            }
            if let Some(default) = &field.default {
                field
                    .kind
                    .normalize(default)
                    .map_err(|p| bad(format!("{at}.default"), p))?;
            }
        }
        for (i, item) in self.menu.iter().enumerate() {
            if !item.path.starts_with(&self.route_prefix) {
                return Err(bad(
                    format!("menu[{i}].path"),
                    format!("must start with the route prefix {}", self.route_prefix),
                ));
            }
        }
        for (i, job) in self.jobs.iter().enumerate() {
            let at = format!("job[{i}]");
            if !is_identifier(&job.id) {
                return Err(bad(format!("{at}.id"), "must be snake_case"));
            }
            if let Some(schedule) = &job.schedule {
                FieldKind::Cron
                    .normalize(schedule)
                    .map_err(|p| bad(format!("{at}.schedule"), p))?;
            }
            if let Some(setting) = &job.schedule_setting
                && !self
                    .settings
                    .iter()
                    .any(|f| &f.id == setting && f.kind == FieldKind::Cron)
            {
                return Err(bad(
                    format!("{at}.schedule_setting"),
                    format!("no cron setting named `{setting}`"),
                ));
            }
        }
        Ok(())
    }

    /// The declared field `id`.
    pub fn field(&self, id: &str) -> Option<&SettingField> {
        self.settings.iter().find(|f| f.id == id)
    }
}

fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_domain(text: &str) -> bool {
    text.len() <= 253
        && text.contains('.')
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl FieldKind {
    /// Checks `raw` and returns the value to store, or a message for the person who typed it.
    pub fn normalize(self, raw: &str) -> Result<String, String> {
        let value = raw.trim();
        match self {
            FieldKind::Text | FieldKind::Secret => {
                if value.chars().any(char::is_control) {
                    Err("must not contain control characters".into())
                } else {
                    Ok(value.to_string())
                }
            }
            FieldKind::Guid => {
                if is_guid(value) {
                    Ok(value.to_ascii_lowercase())
                } else {
                    Err("must be a GUID like 00000000-0000-0000-0000-000000000000 (the Application (client) ID on the app's Overview page in Azure)".into())
                }
            }
            FieldKind::Tenant => {
                let lower = value.to_ascii_lowercase();
                if matches!(lower.as_str(), "common" | "organizations" | "consumers")
                    || is_guid(&lower)
                    || is_domain(&lower)
                {
                    Ok(lower)
                } else {
                    Err("must be common, organizations, consumers, a tenant ID (GUID) or a domain such as contoso.onmicrosoft.com".into())
                }
            }
            FieldKind::Url => match url::Url::parse(value) {
                Ok(url)
                    if matches!(url.scheme(), "http" | "https")
                        && url.host().is_some()
                        && url.query().is_none() =>
                {
                    Ok(value.trim_end_matches('/').to_string())
                }
                Ok(_) => Err("must be an http(s) URL with a host and no query".into()),
                Err(e) => Err(format!("is not a URL ({e})")),
            },
            FieldKind::Date => chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
                .map(|d| d.to_string())
                .map_err(|_| "must be a date as YYYY-MM-DD".into()),
            FieldKind::Cron => cron::Schedule::from_str(value)
                .map(|_| value.to_string())
                .map_err(|e| {
                    format!("is not a cron expression with seconds, e.g. \"0 0 3 * * *\" ({e})")
                }),
            FieldKind::Integer => value
                .parse::<i64>()
                .map(|n| n.to_string())
                .map_err(|_| "must be a whole number".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_validate() {
        assert!(
            FieldKind::Guid
                .normalize("0f8fad5b-d9cb-469f-a165-70867728950e")
                .is_ok()
        );
        assert!(FieldKind::Guid.normalize("not-a-guid").is_err());
        assert_eq!(
            FieldKind::Tenant
                .normalize("Contoso.onmicrosoft.com")
                .ok()
                .as_deref(),
            Some("contoso.onmicrosoft.com")
        );
        assert!(FieldKind::Tenant.normalize("bad tenant").is_err());
        assert!(FieldKind::Url.normalize("ftp://x").is_err());
        assert!(FieldKind::Cron.normalize("0 0 3 * * *").is_ok());
        assert!(FieldKind::Cron.normalize("every night").is_err());
        assert!(FieldKind::Date.normalize("2027-02-30").is_err());
    }
}

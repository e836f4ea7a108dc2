//! The module's settings, typed.

use chrono::NaiveDate;
use crm_sdk::ModuleContext;
use secrecy::SecretString;

/// The default authority (Microsoft's global cloud).
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// The resource an access token is for: one token cannot serve both (MICROSOFT.md › Microsoft
/// Graph mail). A mail server's transport decides which it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resource {
    /// Exchange Online's Outlook resource (`SMTP.Send`), for SMTP with XOAUTH2.
    #[default]
    Outlook,
    /// Microsoft Graph (`Mail.Send`, `Mail.Send.Shared`, `Mail.ReadWrite`), for Graph sendMail.
    Graph,
}

impl Resource {
    /// Whether a token granted `scopes` (space-separated, as stored) is for this resource. Every
    /// cloud's Graph host names "graph" and every Outlook resource "outlook"; a bare scope name
    /// (`Mail.Send`) is Graph's, as Microsoft reads it.
    pub fn granted_in(self, scopes: &str) -> bool {
        let graph = |s: &str| s.contains("graph") || !s.contains("://");
        scopes
            .split_whitespace()
            .filter(|s| !matches!(*s, "openid" | "email" | "profile" | "offline_access"))
            .any(|s| match self {
                Resource::Graph => graph(s),
                Resource::Outlook => !graph(s),
            })
    }

    /// The resource a server's transport (`smtp` or `graph`) sends with.
    pub fn of_transport(transport: &str) -> Self {
        if transport == "graph" {
            Resource::Graph
        } else {
            Resource::Outlook
        }
    }
}

/// A Microsoft cloud: every endpoint and resource the module uses follows one choice
/// (MICROSOFT.md › National clouds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cloud {
    /// Microsoft's global cloud.
    #[default]
    Global,
    /// US Government GCC High.
    UsGov,
    /// US Government DoD.
    UsDod,
    /// China, operated by 21Vianet.
    China,
}

impl Cloud {
    /// Every cloud.
    pub const ALL: [Cloud; 4] = [Cloud::Global, Cloud::UsGov, Cloud::UsDod, Cloud::China];

    /// The cloud stored as `name` (`global`, `usgov`, `usdod`, `china`); global otherwise.
    pub fn parse(name: &str) -> Self {
        match name {
            "usgov" => Cloud::UsGov,
            "usdod" => Cloud::UsDod,
            "china" => Cloud::China,
            _ => Cloud::Global,
        }
    }

    /// The identity platform's authority.
    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Global => DEFAULT_AUTHORITY,
            Cloud::UsGov | Cloud::UsDod => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
        }
    }

    /// The Outlook resource of the SMTP, IMAP and POP scopes (with its trailing slash).
    pub fn outlook_resource(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office.com/",
            Cloud::UsGov | Cloud::UsDod => "https://outlook.office365.us/",
            Cloud::China => "https://partner.outlook.cn/",
        }
    }

    /// The app-only (client credentials) scope of Exchange Online.
    pub fn app_only_scope(self, resource: Resource) -> String {
        if resource == Resource::Graph {
            return format!("{}/.default", self.graph());
        }
        match self {
            Cloud::Global => "https://outlook.office365.com/.default",
            Cloud::UsGov | Cloud::UsDod => "https://outlook.office365.us/.default",
            Cloud::China => "https://partner.outlook.cn/.default",
        }
        .into()
    }

    /// The SMTP submission host.
    pub fn smtp_host(self) -> &'static str {
        match self {
            Cloud::Global => "smtp.office365.com",
            Cloud::UsGov | Cloud::UsDod => "smtp.office365.us",
            Cloud::China => "smtp.partner.outlook.cn",
        }
    }

    /// Microsoft Graph.
    pub fn graph(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::UsGov => "https://graph.microsoft.us",
            Cloud::UsDod => "https://dod-graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }

    /// The scopes of `resource` a mailbox's grant needs: SMTP sending; or Graph sending (its own
    /// mailbox and shared ones) and reading Sent Items (to find a mail whose answer was lost).
    pub fn resource_scopes(self, resource: Resource) -> Vec<String> {
        match resource {
            Resource::Outlook => vec![format!("{}SMTP.Send", self.outlook_resource())],
            Resource::Graph => ["Mail.Send", "Mail.Send.Shared", "Mail.ReadWrite"]
                .iter()
                .map(|s| format!("{}/{s}", self.graph()))
                .collect(),
        }
    }

    /// The delegated scopes of the connect flow: sign-in, a refresh token, and `resource`'s.
    pub fn delegated_scopes(self, resource: Resource) -> Vec<String> {
        let mut scopes: Vec<String> =
            vec!["openid".into(), "email".into(), "offline_access".into()];
        scopes.extend(self.resource_scopes(resource));
        scopes
    }

    /// The scope sent with every refresh, for a token of `resource` (Microsoft refuses a
    /// refresh without one, AADSTS900144, and one token request is for one resource).
    pub fn refresh_scope(self, resource: Resource) -> String {
        let mut scope = String::from("offline_access");
        for s in self.resource_scopes(resource) {
            scope.push(' ');
            scope.push_str(&s);
        }
        scope
    }
}
/// The default nightly refresh schedule.
pub const DEFAULT_REFRESH_SCHEDULE: &str = "0 0 3 * * *";

/// The SMTP submission host of the global cloud (the pages and [`PersonalSmtpHosts::load`] use
/// the chosen cloud's, [`Cloud::smtp_host`]).
pub fn default_smtp_host() -> &'static str {
    Cloud::Global.smtp_host()
}

/// The SMTP submission ports a personal mailbox may use on an allowed host named without a port.
pub const PERSONAL_SMTP_PORTS: [u16; 2] = [587, 465];

/// The hosts (and ports) the operator allows for personal mailboxes
/// (`personal_smtp_hosts`: `host` for ports 587 and 465, or `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalSmtpHosts(Vec<(String, Option<u16>)>);

impl PersonalSmtpHosts {
    /// Parses the setting; empty means [`default_smtp_host`]. An invalid entry is named.
    pub fn parse(setting: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for entry in setting
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (host, port) = match entry.rsplit_once(':') {
                Some((host, port)) => match port.parse::<u16>() {
                    Ok(p) if p > 0 => (host, Some(p)),
                    _ => {
                        return Err(format!(
                            "\"{entry}\": the port must be a number from 1 to 65535"
                        ));
                    }
                },
                None => (entry, None),
            };
            let host = host.to_ascii_lowercase();
            if !valid_host(&host) {
                return Err(format!("\"{entry}\" is not a host name or host:port"));
            }
            entries.push((host, port));
        }
        if entries.is_empty() {
            entries.push((default_smtp_host().to_string(), None));
        }
        Ok(Self(entries))
    }

    /// The setting as stored, or the default when it is unreadable.
    pub async fn load(ctx: &ModuleContext) -> Self {
        let values = ctx
            .settings()
            .load(ctx.module_id())
            .await
            .unwrap_or_default();
        // Unset or unreadable: the SMTP host of the chosen cloud.
        let cloud_host = Self(vec![(
            Cloud::parse(values.get("cloud").unwrap_or("global"))
                .smtp_host()
                .to_string(),
            None,
        )]);
        match values.get("personal_smtp_hosts").map(str::trim) {
            None | Some("") => cloud_host,
            Some(setting) => Self::parse(setting).unwrap_or(cloud_host),
        }
    }

    /// Whether a personal mailbox may connect to `host` on `port`.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.0.iter().any(|(h, p)| {
            h.eq_ignore_ascii_case(host)
                && match p {
                    Some(p) => *p == port,
                    None => PERSONAL_SMTP_PORTS.contains(&port),
                }
        })
    }

    /// Whether `host` is allowed on some port.
    pub fn lists(&self, host: &str) -> bool {
        self.0.iter().any(|(h, _)| h.eq_ignore_ascii_case(host))
    }

    /// The allowed entries, for messages.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(h, p)| match p {
                Some(p) => format!("{h}:{p}"),
                None => format!("{h} (port 587 or 465)"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

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
    /// The cloud the tenant lives in.
    pub cloud: Cloud,
    /// The identity platform's base URL.
    pub authority_url: String,
    /// Microsoft Graph's base URL (the cloud's, unless the operator set another address).
    pub graph_url: String,
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

/// The authority to use: the configured URL when it is not one of the clouds' own (a proxy, the
/// simulated platform), else the chosen cloud's.
fn authority(cloud: Cloud, configured: Option<&str>) -> String {
    let configured = configured
        .map(|u| u.trim().trim_end_matches('/'))
        .unwrap_or("");
    if configured.is_empty() || Cloud::ALL.iter().any(|c| c.authority() == configured) {
        cloud.authority().to_string()
    } else {
        configured.to_string()
    }
}

/// The Graph base URL to use: the configured one when set (a proxy, the simulated Graph), else
/// the chosen cloud's.
fn graph_url(cloud: Cloud, configured: Option<&str>) -> String {
    match configured.map(|u| u.trim().trim_end_matches('/')) {
        Some(url) if !url.is_empty() => url.to_string(),
        _ => cloud.graph().to_string(),
    }
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
                cloud: Cloud::parse(values.get("cloud").unwrap_or("global")),
                authority_url: authority(
                    Cloud::parse(values.get("cloud").unwrap_or("global")),
                    values.get("authority_url"),
                ),
                graph_url: graph_url(
                    Cloud::parse(values.get("cloud").unwrap_or("global")),
                    values.get("graph_url"),
                ),
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

/// Whether `host` is a DNS name (letters, digits and hyphens between dots) or an IP address.
pub(crate) fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_hosts_allow_only_what_the_operator_listed() {
        let default = PersonalSmtpHosts::parse("").expect("default");
        assert!(default.allows(default_smtp_host(), 587));
        assert!(default.allows(default_smtp_host(), 465));
        assert!(!default.allows(default_smtp_host(), 25));
        assert!(!default.allows("127.0.0.1", 587));
        assert!(!default.allows("localhost", 587));
        let listed =
            PersonalSmtpHosts::parse("smtp.office365.com, LocalHost:2525").expect("parsed");
        assert!(listed.allows("localhost", 2525));
        assert!(!listed.allows("localhost", 587));
        assert!(!listed.allows("127.0.0.1", 2525));
        assert!(PersonalSmtpHosts::parse("smtp.example:x").is_err());
        assert!(PersonalSmtpHosts::parse("evil example").is_err());
    }
}

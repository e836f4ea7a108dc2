//! Mail servers: the input an operator or user gives, validated into a server to store.

use chrono::Utc;
use crm_sdk::{CurrentUser, FieldError, ModuleContext};
use lettre::Address;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Set,
};
use serde::Deserialize;

use crate::delivery::classify::HoldReason;
use crate::entities::mail_server;

/// The server's page (`/microsoft_outlook/servers/{id}`).
pub fn server_url(server: &mail_server::Model) -> String {
    format!("/microsoft_outlook/servers/{}", server.id)
}

/// Who a server belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// A shared outgoing server, managed by operators.
    Shared,
    /// A user's own mailbox.
    Personal,
}

impl ServerKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Shared => "shared",
            ServerKind::Personal => "personal",
        }
    }
}

/// The server form as posted.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServerForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub smtp_host: String,
    #[serde(default)]
    pub smtp_port: String,
    #[serde(default)]
    pub security: String,
    #[serde(default)]
    pub extra_ca_pem: String,
    #[serde(default)]
    pub mailbox: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub auth: String,
    #[serde(default)]
    pub transport: String,
    #[serde(default)]
    pub send_as: String,
    #[serde(default)]
    pub from_allow_list: String,
    #[serde(default)]
    pub is_default: Option<String>,
}

impl ServerForm {
    /// The form pre-filled for a new server.
    pub fn new_defaults(kind: ServerKind, user: &CurrentUser) -> Self {
        Self {
            name: match kind {
                ServerKind::Shared => "Office 365".into(),
                ServerKind::Personal => format!("{}'s mailbox", user.name),
            },
            smtp_host: crate::settings::default_smtp_host().into(),
            smtp_port: "587".into(),
            security: "starttls".into(),
            mailbox: match kind {
                ServerKind::Shared => String::new(),
                ServerKind::Personal => user.email.clone(),
            },
            auth: "delegated".into(),
            transport: "smtp".into(),
            send_as: match kind {
                ServerKind::Shared => "author".into(),
                ServerKind::Personal => "mailbox".into(),
            },
            ..Self::default()
        }
    }

    /// The form showing a stored server.
    pub fn from_model(m: &mail_server::Model) -> Self {
        Self {
            name: m.name.clone(),
            smtp_host: m.smtp_host.clone(),
            smtp_port: m.smtp_port.to_string(),
            security: m.security.clone(),
            extra_ca_pem: m.extra_ca_pem.clone().unwrap_or_default(),
            mailbox: m.mailbox.clone(),
            password: String::new(),
            auth: m.auth.clone(),
            transport: m.transport.clone(),
            send_as: m.send_as.clone(),
            from_allow_list: m.from_allow_list.clone(),
            is_default: m.is_default.then(|| "on".to_string()),
        }
    }
}

/// A validated server.
#[derive(Debug, Clone)]
pub struct ServerInput {
    pub name: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub security: String,
    pub extra_ca_pem: Option<String>,
    pub mailbox: Address,
    pub auth: String,
    pub transport: String,
    pub send_as: String,
    pub from_allow_list: Vec<String>,
    pub is_default: bool,
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses an allow-list entry: an address or `@domain`.
fn allow_entry(entry: &str) -> Option<String> {
    let entry = entry.trim().to_ascii_lowercase();
    if let Some(domain) = entry.strip_prefix('@') {
        return (crate::settings::valid_host(domain) && domain.contains('.')).then_some(entry);
    }
    entry
        .parse::<Address>()
        .ok()
        .map(|a| a.to_string().to_ascii_lowercase())
}

/// What is wrong with a server's name, in words (`None`: nothing).
fn name_problem(name: &str) -> Option<String> {
    let length = name.chars().count();
    if name.is_empty() {
        Some("Give the server a name.".into())
    } else if length > 120 {
        Some(format!(
            "The name is {length} characters long; at most 120 are allowed."
        ))
    } else if name.chars().any(char::is_control) {
        Some("The name must not contain line breaks or control characters.".into())
    } else {
        None
    }
}

impl ServerInput {
    /// Validates a posted form; every problem is reported against its field.
    pub fn parse(form: &ServerForm, kind: ServerKind) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = form.name.trim().to_string();
        if let Some(problem) = name_problem(&name) {
            errors.push(err("name", problem));
        }
        let smtp_host = form.smtp_host.trim().to_ascii_lowercase();
        if !crate::settings::valid_host(&smtp_host) {
            errors.push(err(
                "smtp_host",
                "SMTP host must be a host name such as smtp.office365.com.",
            ));
        }
        let smtp_port = match form.smtp_port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                errors.push(err(
                    "smtp_port",
                    "Port must be a number from 1 to 65535 (587 for Office 365).",
                ));
                587
            }
        };
        let security = form.security.trim().to_string();
        match security.as_str() {
            "starttls" | "tls" => {}
            "none" if is_loopback_host(&smtp_host) => {}
            "none" => errors.push(err(
                "security",
                "Security \"none\" sends tokens in clear text; it is only allowed for a relay on this machine (localhost, 127.0.0.1). Use STARTTLS for Office 365.",
            )),
            _ => errors.push(err("security", "Security must be STARTTLS, TLS or none.")),
        }
        let pem = form.extra_ca_pem.trim();
        let extra_ca_pem = if pem.is_empty() {
            None
        } else if pem.starts_with("-----BEGIN CERTIFICATE-----")
            && pem.ends_with("-----END CERTIFICATE-----")
        {
            Some(pem.to_string())
        } else {
            errors.push(err("extra_ca_pem", "The extra CA certificate must be PEM text, from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----."));
            None
        };
        let mailbox = match form.mailbox.trim().parse::<Address>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(err("mailbox", "Mailbox must be an e-mail address, e.g. crm@contoso.com (it is the SMTP username)."));
                None
            }
        };
        if !form.password.is_empty() {
            errors.push(err(
                "password",
                "Leave the password empty: Office 365 no longer accepts passwords; this server signs in with Outlook OAuth (Connect).",
            ));
        }
        let auth = match form.auth.trim() {
            "" | "delegated" => "delegated",
            "app_only" if kind == ServerKind::Shared => "app_only",
            "app_only" => {
                errors.push(err(
                    "auth",
                    "App-only sign-in is for shared servers configured by an operator.",
                ));
                "delegated"
            }
            _ => {
                errors.push(err(
                    "auth",
                    "Authentication must be Outlook OAuth (delegated) or app-only.",
                ));
                "delegated"
            }
        }
        .to_string();
        let transport = match form.transport.trim() {
            "" | "smtp" => "smtp",
            "graph" => "graph",
            _ => {
                errors.push(err(
                    "transport",
                    "Transport must be SMTP or Microsoft Graph.",
                ));
                "smtp"
            }
        }
        .to_string();
        let send_as = match form.send_as.trim() {
            "" | "author" => "author",
            "mailbox" => "mailbox",
            _ => {
                errors.push(err("send_as", "Send as must be the author or the mailbox."));
                "author"
            }
        }
        .to_string();
        let mut from_allow_list = Vec::new();
        for line in form
            .from_allow_list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            match allow_entry(line) {
                Some(entry) => from_allow_list.push(entry),
                None => errors.push(err(
                    "from_allow_list",
                    format!("\"{line}\" is neither an e-mail address nor @domain."),
                )),
            }
        }
        match (errors.is_empty(), mailbox) {
            (true, Some(mailbox)) => Ok(Self {
                name,
                smtp_host,
                smtp_port,
                security,
                extra_ca_pem,
                mailbox,
                auth,
                transport,
                send_as,
                from_allow_list,
                is_default: kind == ServerKind::Shared && form.is_default.is_some(),
            }),
            _ => Err(errors),
        }
    }
}

/// Who saves a server, and where personal mailboxes may connect.
pub struct OutboundRules<'a> {
    /// Whether the person saving is an operator.
    pub operator: bool,
    /// The hosts the operator allows for personal mailboxes.
    pub personal_hosts: &'a crate::settings::PersonalSmtpHosts,
}

/// What is wrong with where a personal mailbox would connect: users never choose the host
/// (only the operator's list), the port is one the list allows, security `none` is an
/// operator's choice. Every reason is about the stored server, so shared servers (operators
/// only) are not limited.
pub fn personal_outbound_errors(
    host: &str,
    port: Option<u16>,
    security: &str,
    rules: &OutboundRules<'_>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let host = host.trim().to_ascii_lowercase();
    if !rules.personal_hosts.lists(&host) {
        errors.push(err(
            "smtp_host",
            format!(
                "A personal mailbox connects only to the SMTP hosts the operator allows: {}.",
                rules.personal_hosts.describe()
            ),
        ));
    } else if let Some(port) = port
        && !rules.personal_hosts.allows(&host, port)
    {
        errors.push(err(
            "smtp_port",
            format!(
                "Port {port} is not allowed for {host}; allowed: {}.",
                rules.personal_hosts.describe()
            ),
        ));
    }
    if security.trim() == "none" && !rules.operator {
        errors.push(err(
            "security",
            "Security \"none\" sends your token in clear text; only operators may choose it. Use STARTTLS (port 587) or TLS (port 465).",
        ));
    }
    errors
}

impl ServerInput {
    /// [`ServerInput::parse`], then, for a personal mailbox, [`personal_outbound_errors`];
    /// a field gets at most the first of its problems.
    pub fn parse_with(
        form: &ServerForm,
        kind: ServerKind,
        rules: &OutboundRules<'_>,
    ) -> Result<Self, Vec<FieldError>> {
        let parsed = Self::parse(form, kind);
        if kind == ServerKind::Shared {
            return parsed;
        }
        let port = form.smtp_port.trim().parse::<u16>().ok();
        let extra = personal_outbound_errors(&form.smtp_host, port, &form.security, rules);
        match parsed {
            Ok(input) if extra.is_empty() => Ok(input),
            Ok(_) => Err(extra),
            Err(mut errors) => {
                for e in extra {
                    if !errors.iter().any(|known| known.field == e.field) {
                        errors.push(e);
                    }
                }
                Err(errors)
            }
        }
    }
}

/// Stores a new server or updates `existing`; making one default clears the others.
pub async fn save(
    db: &DatabaseConnection,
    existing: Option<mail_server::Model>,
    input: ServerInput,
    kind: ServerKind,
    owner: Option<i64>,
) -> Result<mail_server::Model, DbErr> {
    let now = Utc::now();
    let mailbox_changed = existing
        .as_ref()
        .is_some_and(|m| !m.mailbox.eq_ignore_ascii_case(input.mailbox.as_ref()));
    let mut model: mail_server::ActiveModel = match existing {
        Some(m) => m.into(),
        None => mail_server::ActiveModel {
            kind: Set(kind.as_str().into()),
            owner_user_id: Set(owner),
            created_at: Set(now),
            ..Default::default()
        },
    };
    model.name = Set(input.name);
    model.smtp_host = Set(input.smtp_host);
    model.smtp_port = Set(i32::from(input.smtp_port));
    model.security = Set(input.security);
    model.extra_ca_pem = Set(input.extra_ca_pem);
    model.mailbox = Set(input.mailbox.to_string());
    model.auth = Set(input.auth);
    model.transport = Set(input.transport);
    model.send_as = Set(input.send_as);
    model.from_allow_list = Set(input.from_allow_list.join("\n"));
    model.is_default = Set(input.is_default);
    model.updated_at = Set(now);
    let saved = model.save(db).await?;
    let saved: mail_server::Model = saved.try_into()?;
    if saved.is_default {
        mail_server::Entity::update_many()
            .col_expr(
                mail_server::Column::IsDefault,
                sea_orm::sea_query::Expr::value(false),
            )
            .filter(mail_server::Column::Id.ne(saved.id))
            .filter(mail_server::Column::Kind.eq("shared"))
            .exec(db)
            .await?;
    }
    if mailbox_changed {
        // Tokens belong to the old mailbox's sign-in.
        crate::entities::token::Entity::delete_by_id(saved.id)
            .exec(db)
            .await?;
    }
    Ok(saved)
}

/// The holds that belong to one transport and end when a server switches to the other.
pub const TRANSPORT_HOLDS: [HoldReason; 9] = [
    HoldReason::Unreachable,
    HoldReason::TokenRefused,
    HoldReason::SmtpAuthDisabled,
    HoldReason::NoUsableAuth,
    HoldReason::ServerRefused,
    HoldReason::TlsRefused,
    HoldReason::GraphAccessDenied,
    HoldReason::NotExchangeOnline,
    HoldReason::MailboxFull,
];

/// After `by` changed `server_id`'s transport: a hold of the old transport (SMTP AUTH
/// disabled, Graph denied...) says nothing of the new one, so it ends and the waiting mail is
/// tried.
pub async fn transport_switched(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<crate::runtime::Shared>,
    server_id: i32,
    by: &crm_sdk::CurrentUser,
) -> Result<bool, DbErr> {
    shared.server_changed(server_id);
    crate::delivery::release::release(
        ctx,
        shared,
        server_id,
        (
            Some(&TRANSPORT_HOLDS),
            crate::delivery::release::Release::Forced,
        ),
        crate::outbox::history::Ended::TransportChangedBy(by),
    )
    .await
}

/// Every shared server, default first.
pub async fn shared(db: &DatabaseConnection) -> Result<Vec<mail_server::Model>, DbErr> {
    mail_server::Entity::find()
        .filter(mail_server::Column::Kind.eq("shared"))
        .order_by_desc(mail_server::Column::IsDefault)
        .order_by_asc(mail_server::Column::Id)
        .all(db)
        .await
}

/// Where a new personal mailbox connects by default: the connection of the first shared
/// server (the default one first) whose host and port the operator allows for personal
/// mailboxes (its host, port, security and extra CA: a user's mailbox is usually in the same
/// tenant, behind the same host), else the chosen cloud's SMTP host on port 587 as given.
pub fn personal_connection_defaults(
    form: &mut ServerForm,
    shared: &[mail_server::Model],
    hosts: &crate::settings::PersonalSmtpHosts,
) {
    let Some(server) = shared.iter().find(|s| {
        s.security != "none"
            && u16::try_from(s.smtp_port).is_ok_and(|port| hosts.allows(&s.smtp_host, port))
    }) else {
        return;
    };
    form.smtp_host = server.smtp_host.clone();
    form.smtp_port = server.smtp_port.to_string();
    form.security = server.security.clone();
    form.extra_ca_pem = server.extra_ca_pem.clone().unwrap_or_default();
}

/// The personal mailbox of `user_id`, if any.
pub async fn personal_of(
    db: &DatabaseConnection,
    user_id: i64,
) -> Result<Option<mail_server::Model>, DbErr> {
    mail_server::Entity::find()
        .filter(mail_server::Column::Kind.eq("personal"))
        .filter(mail_server::Column::OwnerUserId.eq(user_id))
        .one(db)
        .await
}

/// Whether `user` may manage `server`: operators the shared ones, owners their own.
pub fn may_manage(user: &CurrentUser, server: &mail_server::Model) -> bool {
    match server.kind.as_str() {
        "shared" => user.is_admin,
        _ => server.owner_user_id == Some(user.id),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A shared server at `host:port` with `security` (and an extra CA), for unit tests.
    pub(crate) fn shared_at(
        host: &str,
        port: i32,
        security: &str,
        ca: Option<&str>,
    ) -> mail_server::Model {
        let now = Utc::now();
        mail_server::Model {
            id: 1,
            name: "Office 365".into(),
            kind: "shared".into(),
            owner_user_id: None,
            smtp_host: host.into(),
            smtp_port: port,
            security: security.into(),
            extra_ca_pem: ca.map(str::to_string),
            mailbox: "crm@contoso.example".into(),
            auth: "delegated".into(),
            transport: "smtp".into(),
            send_as: "author".into(),
            from_allow_list: String::new(),
            is_default: true,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn a_new_personal_mailbox_connects_where_a_shared_server_may_that_users_may_use() {
        let user = CurrentUser {
            id: 2,
            name: "Alice".into(),
            email: "alice@contoso.example".into(),
            is_admin: false,
            csrf_token: String::new(),
        };
        let hosts = crate::settings::PersonalSmtpHosts::parse(
            "smtp.office365.com, relay.contoso.example:2525",
        )
        .expect("hosts");
        let fresh = || {
            let mut form = ServerForm::new_defaults(ServerKind::Personal, &user);
            form.smtp_host = "smtp.office365.com".into();
            form
        };
        // A shared relay users may use: its connection, CA included.
        let mut form = fresh();
        let relay = shared_at("relay.contoso.example", 2525, "starttls", Some("PEM"));
        personal_connection_defaults(&mut form, &[relay], &hosts);
        assert_eq!(
            (
                form.smtp_host.as_str(),
                form.smtp_port.as_str(),
                form.extra_ca_pem.as_str()
            ),
            ("relay.contoso.example", "2525", "PEM")
        );
        // A host users may not use, or security "none": the cloud's host as before.
        for other in [
            shared_at("internal.contoso.example", 587, "starttls", None),
            shared_at("relay.contoso.example", 2525, "none", None),
        ] {
            let mut form = fresh();
            personal_connection_defaults(&mut form, &[other], &hosts);
            assert_eq!(
                (
                    form.smtp_host.as_str(),
                    form.smtp_port.as_str(),
                    form.security.as_str()
                ),
                ("smtp.office365.com", "587", "starttls")
            );
        }
    }

    #[test]
    fn a_server_name_problem_is_said_as_it_is() {
        assert_eq!(name_problem("Sales"), None);
        assert_eq!(name_problem(&"é".repeat(120)), None);
        assert_eq!(name_problem("").as_deref(), Some("Give the server a name."));
        assert_eq!(
            name_problem(&"x".repeat(5000)).as_deref(),
            Some("The name is 5000 characters long; at most 120 are allowed.")
        );
        assert_eq!(
            name_problem("Sales\nteam").as_deref(),
            Some("The name must not contain line breaks or control characters.")
        );
    }
}

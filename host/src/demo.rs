//! `crm-host demo` without an Azure account: the simulated Microsoft identity platform,
//! Exchange submission server and Microsoft Graph on loopback, the module pointed at them, a
//! shared server for each transport, and a page that shows the mails they received.

use actix_web::{HttpResponse, web};
use anyhow::Context;
use crm_sdk::CurrentUser;
use maud::html;
use microsoft_outlook::entities::{mail_server, token};
use microsoft_simulators::graph::{GraphFault, GraphServer, SendPath};
use microsoft_simulators::identity::{AppRegistration, AuthorizeMode, IdentityPlatform, TestUser};
use microsoft_simulators::smtp::{SmtpConfig, SmtpServer};
use rand::Rng;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::html::ok;
use crate::seed::DEMO_LOGINS;
use crate::state::AppState;

/// The shared mailbox the demo's outgoing server signs in as.
pub const DEMO_MAILBOX: &str = "crm@contoso.example";
pub const DEMO_SERVER_NAME: &str = "Office 365 (simulated)";
/// The demo's shared server that sends through the simulated Microsoft Graph.
pub const DEMO_GRAPH_SERVER_NAME: &str = "Office 365 via Graph (simulated)";

/// The running simulated services.
#[derive(Clone)]
pub struct DemoServices {
    /// The identity platform.
    pub idp: IdentityPlatform,
    /// The SMTP submission server.
    pub smtp: Arc<SmtpServer>,
    /// The Microsoft Graph mail API.
    pub graph: Arc<GraphServer>,
    /// The simulated app registration, as the portal shows it (for /demo/azure).
    pub app: DemoApp,
}

/// The demo's simulated app registration, as the Entra ID portal would show it.
#[derive(Clone)]
pub struct DemoApp {
    /// The application (client) ID.
    pub client_id: String,
    /// The client secret's Value.
    pub secret_value: String,
    /// The client secret's Secret ID (a GUID; pasting it instead of the Value is refused).
    pub secret_id: String,
    /// The redirect URI registered.
    pub redirect_uri: String,
}

fn random_guid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The accounts the demo's simulated identity platform knows: the shared mailbox and the
/// seeded sign-ins.
fn tenant_accounts() -> impl Iterator<Item = &'static str> {
    std::iter::once(DEMO_MAILBOX).chain(DEMO_LOGINS.iter().map(|l| l.email))
}

/// Creates `dir` readable by its owner only (0700) and the sealing key in it, written 0600 from
/// the start; an existing key is read.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<crm_sdk::SealingKey> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // Made by an older version, or by hand.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("sealing.key");
    if path.exists() {
        return Ok(crm_sdk::SealingKey::from_file(&path)?);
    }
    let key = crm_sdk::SealingKey::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(key.to_base64().expose_secret().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Makes the demo's SQLite file readable by its owner only (SQLite creates it with the umask).
pub fn restrict_database_file(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if path.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// Whether the module is configured for a real Azure app (then the demo leaves it alone).
fn configured_for_azure(values: &crm_sdk::SettingsValues) -> bool {
    values.get("client_id").is_some()
        && values
            .get("authority_url")
            .is_none_or(|a| !microsoft_outlook::is_loopback_url(a))
}

/// Starts the simulated services and points the module at them, unless an Azure app is configured.
pub async fn start(
    db: &sea_orm::DatabaseConnection,
    sealer: &crm_sdk::Sealer,
    public_base_url: &url::Url,
) -> anyhow::Result<Option<DemoServices>> {
    use crm_sdk::SettingsStore;
    let values = crate::settings::DbSettingsStore::new(db.clone(), sealer.clone())
        .load("microsoft_outlook")
        .await
        .unwrap_or_default();
    let redirect_uri = format!(
        "{}{}",
        public_base_url.as_str().trim_end_matches('/'),
        microsoft_outlook::CONFIRM_PATH
    );
    if configured_for_azure(&values) {
        return Ok(None);
    }
    let idp = IdentityPlatform::start().await?;
    idp.set_authorize_mode(AuthorizeMode::ConsentPage);
    let client_id = values
        .get("client_id")
        .map(str::to_string)
        .unwrap_or_else(random_guid);
    let secret = values
        .secret("client_secret")
        .map(|s| secrecy::ExposeSecret::expose_secret(s).to_string())
        .unwrap_or_else(crate::auth::random_token);
    idp.register_app(AppRegistration {
        client_id: client_id.clone(),
        client_secret: secret.clone(),
        secret_expired: false,
        redirect_uris: vec![redirect_uri.clone()],
    });
    let app = DemoApp {
        client_id: client_id.clone(),
        secret_value: secret.clone(),
        secret_id: random_guid(),
        redirect_uri,
    };
    for (i, address) in tenant_accounts().enumerate() {
        idp.add_user(TestUser {
            username: address.to_string(),
            email: Some(address.to_string()),
            oid: format!("00000000-0000-0000-0000-{i:012}"),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        });
    }
    let graph = GraphServer::start_on("127.0.0.1:0", idp.graph_validator()).await?;
    // A restart keeps what the operator changed: only what is unset, and the simulated
    // services' addresses (new ports on every run), are written.
    let mut plain = BTreeMap::new();
    if values.get("client_id").is_none() {
        plain.insert("client_id".to_string(), client_id);
    }
    plain.insert("authority_url".to_string(), idp.authority_url());
    plain.insert("graph_url".to_string(), graph.base_url());
    if values.get("tenant").is_none() {
        plain.insert("tenant".to_string(), "common".to_string());
    }
    if values.get("client_secret_expires_on").is_none() {
        let expires = (chrono::Utc::now() + chrono::Duration::days(180))
            .date_naive()
            .to_string();
        plain.insert("client_secret_expires_on".to_string(), expires);
    }
    let mut secrets = BTreeMap::new();
    if !values.has_secret("client_secret") {
        secrets.insert("client_secret".to_string(), secret);
    }
    crate::settings::store(db, sealer, "microsoft_outlook", plain, secrets).await?;

    let smtp = SmtpServer::start(SmtpConfig {
        validator: Some(idp.smtp_validator()),
        ..SmtpConfig::default()
    })
    .await?;
    // Users may point their own mailbox at the simulated server too.
    let mut hosts = BTreeMap::new();
    hosts.insert(
        "personal_smtp_hosts".to_string(),
        demo_personal_hosts(values.get("personal_smtp_hosts"), smtp.port()),
    );
    crate::settings::store(db, sealer, "microsoft_outlook", hosts, BTreeMap::new()).await?;

    seed_servers(db, &smtp).await?;
    Ok(Some(DemoServices {
        idp,
        smtp: Arc::new(smtp),
        graph: Arc::new(graph),
        app,
    }))
}

/// The demo's shared servers, created or (from an earlier run) pointed at the new simulated
/// services: one sending over SMTP, one through Microsoft Graph, both from [`DEMO_MAILBOX`].
/// The simulated services forget their tokens when the demo stops, so each asks for a fresh
/// Connect.
async fn seed_servers(db: &sea_orm::DatabaseConnection, smtp: &SmtpServer) -> anyhow::Result<()> {
    let over_smtp = demo_server(db, DEMO_SERVER_NAME, "smtp", DEMO_GRAPH_SERVER_NAME, None).await?;
    let over_graph = demo_server(
        db,
        DEMO_GRAPH_SERVER_NAME,
        "graph",
        DEMO_SERVER_NAME,
        over_smtp.as_ref().map(|m| m.id),
    )
    .await?;
    // Exactly one default: a new SMTP server is the default only when there is none; the
    // Graph server is made default by the operator only.
    let has_default = mail_server::Entity::find()
        .filter(mail_server::Column::Kind.eq("shared"))
        .filter(mail_server::Column::IsDefault.eq(true))
        .one(db)
        .await?
        .is_some();
    save_demo_server(db, over_smtp, DEMO_SERVER_NAME, "smtp", !has_default, smtp).await?;
    save_demo_server(db, over_graph, DEMO_GRAPH_SERVER_NAME, "graph", false, smtp).await?;
    Ok(())
}

/// Stores the demo server `existing` (its token forgotten), or a new one named `name` with
/// `transport`; either way its SMTP settings point at the simulated Exchange (a Graph server
/// keeps them for a switch back to SMTP).
async fn save_demo_server(
    db: &sea_orm::DatabaseConnection,
    existing: Option<mail_server::Model>,
    name: &str,
    transport: &str,
    is_default: bool,
    smtp: &SmtpServer,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let mut model: mail_server::ActiveModel = match existing {
        Some(m) => {
            token::Entity::delete_by_id(m.id).exec(db).await?;
            m.into()
        }
        None => mail_server::ActiveModel {
            name: Set(name.into()),
            kind: Set("shared".into()),
            owner_user_id: Set(None),
            mailbox: Set(DEMO_MAILBOX.into()),
            auth: Set("delegated".into()),
            transport: Set(transport.into()),
            send_as: Set("author".into()),
            from_allow_list: Set(String::new()),
            is_default: Set(is_default),
            created_at: Set(now),
            ..Default::default()
        },
    };
    model.smtp_host = Set("localhost".into());
    model.smtp_port = Set(i32::from(smtp.port()));
    model.security = Set("starttls".into());
    model.extra_ca_pem = Set(Some(smtp.ca_pem()));
    model.updated_at = Set(now);
    model.save(db).await?;
    Ok(())
}

/// The demo's shared server `name` from an earlier run: by its name, or (renamed by the
/// operator) by its mailbox on the simulated server and its `transport`, never the one named
/// `other` nor the row `except` (the other demo server).
async fn demo_server(
    db: &sea_orm::DatabaseConnection,
    name: &str,
    transport: &str,
    other: &str,
    except: Option<i32>,
) -> Result<Option<mail_server::Model>, sea_orm::DbErr> {
    if let Some(found) = mail_server::Entity::find()
        .filter(mail_server::Column::Name.eq(name))
        .one(db)
        .await?
    {
        return Ok(Some(found));
    }
    let mut query = mail_server::Entity::find()
        .filter(mail_server::Column::Kind.eq("shared"))
        .filter(mail_server::Column::Mailbox.eq(DEMO_MAILBOX))
        .filter(mail_server::Column::SmtpHost.eq("localhost"))
        .filter(mail_server::Column::Transport.eq(transport))
        .filter(mail_server::Column::Name.ne(other));
    if let Some(id) = except {
        query = query.filter(mail_server::Column::Id.ne(id));
    }
    query.one(db).await
}

/// The personal SMTP hosts setting with the simulated server's new port: the operator's
/// entries are kept, an earlier run's `localhost:PORT` is replaced.
fn demo_personal_hosts(stored: Option<&str>, port: u16) -> String {
    let mut entries: Vec<String> = stored
        .unwrap_or(microsoft_outlook::settings::default_smtp_host())
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty() && !e.to_ascii_lowercase().starts_with("localhost:"))
        .collect();
    entries.push(format!("localhost:{port}"));
    entries.join(", ")
}

async fn received(
    state: web::Data<AppState>,
    demo: web::Data<DemoServices>,
    user: CurrentUser,
) -> HttpResponse {
    // What the simulated Exchange received is everybody's mail: for operators, like the rest
    // of the simulated services' pages.
    if let Err(refused) = crate::auth::require_admin(&user, &state.chrome) {
        return *refused;
    }
    let mut mails = demo.smtp.received();
    mails.reverse();
    let mut through_graph = demo.graph.all_sent();
    through_graph.reverse();
    let body = html! {
        h1 { "Simulated Exchange: received mail" }
        section.card id="received-smtp" {
            h2 { "Over SMTP" }
            p.help { "Every message the simulated smtp.office365.com accepted in this demo run, newest first." }
            @if mails.is_empty() { p { "Nothing yet. Open a contact and send a mail; it appears here within seconds." } }
            @else {
                table {
                    thead { tr { th { "Authenticated as" } th { "From (envelope)" } th { "To" } th { "Message-ID" } th { "Size" } } }
                    tbody {
                        @for m in &mails {
                            tr {
                                td { (m.auth_user.as_deref().unwrap_or("-")) }
                                td { (m.mail_from) }
                                td { (m.rcpt_to.join(", ")) }
                                td { code { (m.message_id.as_deref().unwrap_or("-")) } }
                                td { (m.data.len()) " bytes" }
                            }
                        }
                    }
                }
            }
        }
        section.card id="received-graph" {
            h2 { "Through Microsoft Graph" }
            p.help { "Every message the simulated graph.microsoft.com sent in this demo run (its senders' Sent Items), newest first." }
            @if through_graph.is_empty() { p { "Nothing yet. Make " strong { (DEMO_GRAPH_SERVER_NAME) } " the default server, or send its test mail; it appears here within seconds." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "Mailbox" } th { "Message-ID" } th { "Subject" } th { "Size" } th { "Received" } } }
                    tbody {
                        @for m in &through_graph {
                            tr {
                                td { (m.mailbox) }
                                td { code { (m.internet_message_id.as_deref().unwrap_or("-")) } }
                                td { (m.subject) }
                                td { (m.mime.len()) " bytes" }
                                td { @match m.via {
                                    SendPath::SendMail => "via Graph (sendMail)",
                                    SendPath::DraftSend => "via Graph (draft, then send)",
                                } }
                            }
                        }
                    }
                } }
            }
        }
    };
    ok(state.chrome.render("Received mail", Some(&user), body))
}

/// The simulated Entra ID app registration, as the portal shows it (operators only): where the
/// setup guide's values come from in the demo.
async fn azure_page(
    state: web::Data<AppState>,
    demo: web::Data<DemoServices>,
    user: CurrentUser,
) -> HttpResponse {
    if let Err(refused) = crate::auth::require_admin(&user, &state.chrome) {
        return *refused;
    }
    let app = &demo.app;
    let body = html! {
        h1 { "Simulated Entra ID: app registration" }
        section.card {
            p.help { "What the Azure portal would show for the demo's app. The simulated identity platform runs at " code { (demo.idp.authority_url()) } "." }
            dl.azure {
                dt { "Application (client) ID" } dd { code id="client-id" { (app.client_id) } }
                dt { "Redirect URI (Web)" } dd { code { (app.redirect_uri) } }
                dt { "Supported account types" } dd { "Multi-tenant (tenant common)" }
            }
            h2 { "Certificates & secrets" }
            div.scroll { table {
                thead { tr { th { "Description" } th { "Expires" } th { "Value" } th { "Secret ID" } } }
                tbody { tr {
                    td { "CRM demo" } td { "in 180 days" }
                    td { code id="secret-value" { (app.secret_value) } }
                    td { code id="secret-id" { (app.secret_id) } }
                } }
            } }
            p.help { "Paste the Value in Settings › Microsoft Outlook › Client secret; the Secret ID is refused." }
            h2 { "Accounts of the simulated tenant" }
            p.help { "The simulated sign-in knows these accounts only (it asks no password): Connect works for a mail server whose mailbox is one of them, and a user's own mailbox connects as that user." }
            ul id="tenant-accounts" { @for address in tenant_accounts() { li { code { (address) } } } }
        }
    };
    ok(state.chrome.render("Simulated Entra ID", Some(&user), body))
}

/// The faults the demo's simulated Exchange can be told to play over SMTP (operators only), so
/// that an operator can see what the module shows when Exchange refuses.
const FAULTS: [(&str, &str); 3] = [
    (
        "smtp-auth-disabled",
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
    ),
    (
        "quota",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception",
    ),
    (
        "recipient-unknown",
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    ),
];

/// The faults the demo's simulated Microsoft Graph can be told to play (operators only).
const GRAPH_FAULTS: [&str; 3] = [
    "graph-invalid-recipients",
    "graph-access-denied",
    "graph-throttled",
];

/// The fault that makes the demo's simulated SMTP server unreachable for a moment: it drops
/// the next connection before any reply (as an outage, or a proxy that accepts and drops, does). The mail that meets it
/// waits; the mailbox's probe, after the retry base (a minute), sends it.
const SMTP_UNREACHABLE: &str = "smtp-unreachable";

/// Disarms every fault armed over SMTP and through Microsoft Graph and not yet met.
const DISARM: &str = "disarm";

/// The fault the demo's simulated sign-in can be told to play: the shared mailbox's grant
/// revoked (as a password change does), so that its next mail meets AADSTS50173.
const REVOKE_GRANT: &str = "revoke-grant";

/// The Graph fault played by the id `id` of [`GRAPH_FAULTS`].
fn graph_fault(id: &str) -> Option<GraphFault> {
    match id {
        "graph-invalid-recipients" => Some(GraphFault::InvalidRecipients),
        "graph-access-denied" => Some(GraphFault::AccessDenied),
        "graph-throttled" => Some(GraphFault::Throttled {
            retry_after_secs: 30,
        }),
        _ => None,
    }
}

/// One button of the faults page.
fn fault_form(user: &CurrentUser, id: &str, answer: &str) -> maud::Markup {
    html! {
        form method="post" action="/demo/faults" {
            input type="hidden" name="csrf_token" value=(user.csrf_token);
            input type="hidden" name="fault" value=(id);
            p { button type="submit" { "Play " (id) } " " code { (answer) } }
        }
    }
}

#[derive(serde::Deserialize)]
struct Played {
    played: Option<String>,
}

async fn faults_page(
    state: web::Data<AppState>,
    demo: web::Data<DemoServices>,
    user: CurrentUser,
    played: web::Query<Played>,
) -> HttpResponse {
    if let Err(refused) = crate::auth::require_admin(&user, &state.chrome) {
        return *refused;
    }
    let known = |id: &str| {
        id == REVOKE_GRANT
            || id == DISARM
            || id == SMTP_UNREACHABLE
            || FAULTS.iter().any(|(f, _)| *f == id)
            || GRAPH_FAULTS.contains(&id)
    };
    let played = played.into_inner().played.filter(|id| known(id));
    let graph_faults = GRAPH_FAULTS.iter().filter_map(|id| {
        let fault = graph_fault(id)?;
        let answer = format!(
            "{} {}",
            fault.status().unwrap_or_default(),
            fault.code().unwrap_or_default()
        );
        Some((*id, answer))
    });
    // Each button press arms one more: how many wait to be met, so that none surprises later.
    let armed = |n: usize| {
        html! {
            @if n > 0 {
                p.armed role="status" { strong { (n) " armed, not yet met" } ": each is met once, at the first point of a mail's dialogue it fits." }
            }
        }
    };
    let (armed_smtp, armed_graph) = (demo.smtp.injections_left(), demo.graph.injections_left());
    let body = html! {
        h1 { "Simulated Exchange: play a fault" }
        @if let Some(id) = &played {
            @if id == REVOKE_GRANT {
                p.flash.ok role="status" { "Revoked: the sign-in of " (DEMO_MAILBOX) ". Its next mail or token refresh meets it." }
            } @else if id == DISARM {
                p.flash.ok role="status" { "Disarmed: no fault waits to be met." }
            } @else if id == SMTP_UNREACHABLE {
                p.flash.ok role="status" { "Unreachable: the next connection to the simulated SMTP server is dropped before any reply. Send a mail to meet it." }
            } @else {
                p.flash.ok role="status" { "Armed: " (id) ". Send a mail (or test the connection) to meet it." }
            }
        }
        section.card {
            h2 { "Over SMTP" }
            p.help { "The next attempt of the simulated smtp.office365.com answers with the reply chosen here, once." }
            @for (id, reply) in FAULTS { (fault_form(&user, id, reply)) }
            p.help { "Or the server cannot be reached: its next connection is dropped before any reply (as an outage or a proxy that accepts and drops does). The mailbox waits as unreachable (no mail spends an attempt); one mail probes it again after the retry base (a minute), then after as long as it has lasted, and the mail goes once the server answers; Release held mail tries at once." }
            (fault_form(&user, SMTP_UNREACHABLE, "connection dropped before any reply"))
            (armed(armed_smtp))
        }
        section.card {
            h2 { "Through Microsoft Graph" }
            p.help { "The next request of the simulated graph.microsoft.com that the answer fits (a send for invalid recipients, any request for the others, a Test connection too) gets the answer chosen here, once." }
            @for (id, answer) in graph_faults { (fault_form(&user, id, &answer)) }
            (armed(armed_graph))
        }
        @if armed_smtp + armed_graph > 0 {
            section.card {
                h2 { "Armed faults" }
                (fault_form(&user, DISARM, "every fault armed and not yet met, over SMTP and through Graph"))
            }
        }
        section.card {
            h2 { "At Microsoft's sign-in" }
            p.help { "The sign-in of " code { (DEMO_MAILBOX) } " is revoked, as a password change does: its next mail or token refresh meets AADSTS50173, and only connecting it again (Reconnect, on its mail server's page) ends that." }
            (fault_form(&user, REVOKE_GRANT, "invalid_grant AADSTS50173"))
        }
    };
    ok(state.chrome.render("Faults", Some(&user), body))
}

#[derive(serde::Deserialize)]
struct FaultForm {
    fault: String,
}

async fn play_fault(
    state: web::Data<AppState>,
    demo: web::Data<DemoServices>,
    user: CurrentUser,
    form: web::Form<FaultForm>,
) -> HttpResponse {
    use microsoft_simulators::smtp::{Injected, Stage};
    if let Err(refused) = crate::auth::require_admin(&user, &state.chrome) {
        return *refused;
    }
    if form.fault == REVOKE_GRANT {
        demo.idp.revoke_grants_of(DEMO_MAILBOX);
        demo.idp.expire_access_tokens_of(DEMO_MAILBOX);
        // The next mail signs in again: end the connections the module keeps for reuse.
        demo.smtp.close_connections().await;
        return played(REVOKE_GRANT);
    }
    if form.fault == DISARM {
        demo.smtp.clear_injections();
        demo.graph.clear_injections();
        return played(DISARM);
    }
    if form.fault == SMTP_UNREACHABLE {
        // Connections kept for reuse would not meet it: end them.
        demo.smtp.close_connections().await;
        demo.smtp.inject(Injected::RefuseConnection, 1);
        return played(SMTP_UNREACHABLE);
    }
    if let Some(fault) = graph_fault(&form.fault) {
        demo.graph.inject(fault, 1);
        return played(&form.fault);
    }
    let Some((id, reply)) = FAULTS.iter().find(|(id, _)| *id == form.fault) else {
        return HttpResponse::BadRequest().body("No such fault.");
    };
    let stage = match *id {
        "smtp-auth-disabled" => Stage::Auth,
        "recipient-unknown" => Stage::RcptTo,
        _ => Stage::EndOfData,
    };
    demo.smtp.inject(
        Injected::Reply {
            stage,
            reply: (*reply).to_string(),
        },
        1,
    );
    // A fault at AUTH needs a new connection: end the ones the module keeps for reuse.
    if stage == Stage::Auth {
        demo.smtp.close_connections().await;
    }
    played(id)
}

/// Back to the faults page, which says that the fault `id` was played.
fn played(id: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", format!("/demo/faults?played={id}")))
        .finish()
}

/// The demo's routes.
pub fn routes(
    demo: DemoServices,
) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + Sync + 'static {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(demo.clone()))
            .route("/demo/received", web::get().to(received))
            .route("/demo/azure", web::get().to(azure_page))
            .route("/demo/faults", web::get().to(faults_page))
            .route("/demo/faults", web::post().to(play_fault));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_data_dir_and_the_key_are_private_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("crm-demo-modes-{}", std::process::id()));
        let dir = root.join("data");
        let key = prepare_data_dir(&dir).expect("prepared");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sealing.key")), 0o600);
        // Read back, not replaced.
        let again = prepare_data_dir(&dir).expect("again");
        assert_eq!(
            again.to_base64().expose_secret(),
            key.to_base64().expose_secret()
        );
        std::fs::write(dir.join("crm.db"), b"").expect("db");
        restrict_database_file(&dir.join("crm.db")).expect("restricted");
        assert_eq!(mode(&dir.join("crm.db")), 0o600);
        let _ = std::fs::remove_dir_all(&root);
    }
}

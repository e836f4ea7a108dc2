//! Fresh databases, the host assembled around the real module, and seed data (settings,
//! mailboxes, tokens, queued mails) written the way the module stores them.

use anyhow::Context as _;
use chrono::{Duration, Utc};
use crm_host::{Config, HostOptions};
use crm_sdk::{ModuleContext, Sealer, SealingKey, SystemClock};
use microsoft_outlook::OutlookModule;
use microsoft_outlook::entities::{mail_server, outbox, outbox_body, token};
use microsoft_outlook::outbox::compose::{AddressInput, MailRequest, OutgoingMail};
use microsoft_outlook::runtime::{ModuleOptions, Shared};
use microsoft_outlook::tokens::store::{access_context, refresh_context};
use rand::Rng;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The module's id.
pub const MODULE: &str = "microsoft_outlook";
/// The recipient of every benchmark mail.
pub const RECIPIENT: &str = "dana@fabrikam.example";
/// The public base URL the bench's hosts claim.
pub const PUBLIC_BASE_URL: &str = "https://crm.contoso.example";

/// Which database a benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DbKind {
    /// A SQLite file in a temporary directory (WAL, as the host opens it).
    Sqlite,
    /// A fresh database on the PostgreSQL server named by `--pg`.
    Postgres,
}

impl DbKind {
    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        }
    }
}

/// A database made for one benchmark; [`BenchDb::remove`] drops it.
pub struct BenchDb {
    /// The URL to open it with.
    pub url: String,
    /// Its kind.
    pub kind: DbKind,
    dir: Option<PathBuf>,
    pg: Option<(String, String)>,
}

fn suffix() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

impl BenchDb {
    /// A fresh, empty database: a SQLite file under the temporary directory, or
    /// `bench_<random>` on the PostgreSQL server of `pg_admin`.
    pub async fn create(kind: DbKind, pg_admin: &str) -> anyhow::Result<Self> {
        let suffix = suffix();
        match kind {
            DbKind::Sqlite => {
                let dir = std::env::temp_dir().join(format!("crm-bench-{suffix}"));
                std::fs::create_dir_all(&dir)?;
                Ok(Self {
                    url: format!("sqlite://{}/crm.db?mode=rwc", dir.display()),
                    kind,
                    dir: Some(dir),
                    pg: None,
                })
            }
            DbKind::Postgres => {
                let name = format!("bench_{suffix}");
                let admin = Database::connect(pg_admin).await.with_context(|| {
                    format!(
                        "connecting to PostgreSQL at {} (start it with `bash .ci/postgres.sh`)",
                        crm_host::app::redact_url(pg_admin)
                    )
                })?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                admin.close().await?;
                let mut url = url::Url::parse(pg_admin)?;
                url.set_path(&format!("/{name}"));
                Ok(Self {
                    url: url.to_string(),
                    kind,
                    dir: None,
                    pg: Some((pg_admin.to_string(), name)),
                })
            }
        }
    }

    /// The directory of a SQLite database.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// Drops the database (close every connection to it first).
    pub async fn remove(self) -> anyhow::Result<()> {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((admin, name)) = &self.pg {
            let admin = Database::connect(admin.as_str()).await?;
            // `WITH (FORCE)` ends the database's other sessions; an autovacuum worker on it
            // (which runs as no role) can only be ended by a member of `pg_signal_backend`
            // (`.ci/postgres.sh` grants it), and it finishes by itself: tried a few times.
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let mut tries = 0;
            while let Err(e) = admin.execute_unprepared(&drop).await {
                tries += 1;
                if tries == 5 {
                    return Err(e.into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            admin.close().await?;
        }
        Ok(())
    }
}

/// The module's tunables for the benchmarks: the defaults, with no refresh jitter.
pub fn module_options(delivery_concurrency: usize, sweep_schedule: &str) -> ModuleOptions {
    let defaults = ModuleOptions::default();
    ModuleOptions {
        delivery_concurrency,
        sweep_schedule: sweep_schedule.to_string(),
        refresh: microsoft_outlook::jobs::RefreshOptions {
            max_jitter: std::time::Duration::ZERO,
            ..defaults.refresh.clone()
        },
        ..defaults
    }
}

/// The host's configuration for an in-process host on `url`.
pub fn host_config(url: &str) -> Config {
    Config {
        bind: "127.0.0.1:0".into(),
        database_url: url.to_string(),
        public_base_url: Some(PUBLIC_BASE_URL.into()),
        module_sync_secs: 3600,
        ..Config::default()
    }
}

/// The host's parts around the real module, without an HTTP server.
#[derive(Clone)]
pub struct Assembled {
    /// The module's context, as the host builds it.
    pub ctx: ModuleContext,
    /// The module's shared state (SMTP sender, HTTP client, queue).
    pub shared: Arc<Shared>,
    /// The database.
    pub db: DatabaseConnection,
    /// The sealer of `key`.
    pub sealer: Sealer,
}

/// For experiments with the schema (BENCHMARKS.md's findings, e.g. an index dropped):
/// `BENCH_SQL`, statements separated by `;`, run on a PostgreSQL bench database after the
/// migrations. `bench/run.sh` never sets it; SQLite databases ignore it.
async fn schema_experiment(db: &DatabaseConnection) -> anyhow::Result<()> {
    use sea_orm::ConnectionTrait;
    let Ok(sql) = std::env::var("BENCH_SQL") else {
        return Ok(());
    };
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        db.execute_unprepared(statement)
            .await
            .with_context(|| format!("BENCH_SQL: {statement}"))?;
    }
    Ok(())
}

/// Opens `url` as the host does (host migrations), links the module and applies its migrations.
pub async fn assemble(
    config: &Config,
    key: &SealingKey,
    options: ModuleOptions,
) -> anyhow::Result<Assembled> {
    let module = Arc::new(OutlookModule::with_options(options));
    let assembled = crm_host::app::assemble(
        config,
        HostOptions {
            modules: vec![module.clone()],
            clock: Arc::new(SystemClock),
            sealing_key: key.clone(),
            extra_routes: Vec::new(),
        },
    )
    .await?;
    let entry = assembled
        .registry
        .get(MODULE)
        .context("the module is not linked")?;
    entry.module.migrate(&assembled.db).await?;
    schema_experiment(&assembled.db).await?;
    Ok(Assembled {
        ctx: entry.ctx.clone(),
        shared: module.shared(),
        db: assembled.db,
        sealer: assembled.sealer,
    })
}

/// The Azure application the bench configures (the simulated identity platform knows it).
pub struct App {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
}

impl App {
    /// A random application.
    pub fn random() -> Self {
        Self {
            client_id: microsoft_simulators::identity::guid(),
            client_secret: format!("bench~{}", suffix()),
        }
    }
}

/// Stores the module's settings as the settings page does (secret sealed), with the per-mailbox
/// throttle off.
pub async fn configure_module(
    db: &DatabaseConnection,
    sealer: &Sealer,
    app: &App,
    authority_url: &str,
) -> anyhow::Result<()> {
    let mut plain = BTreeMap::new();
    plain.insert("client_id".to_string(), app.client_id.clone());
    plain.insert("tenant".to_string(), "common".to_string());
    plain.insert("authority_url".to_string(), authority_url.to_string());
    plain.insert("mailbox_rate_per_minute".to_string(), "0".to_string());
    plain.insert(
        "client_secret_expires_on".to_string(),
        (Utc::now() + Duration::days(180)).date_naive().to_string(),
    );
    let mut secrets = BTreeMap::new();
    secrets.insert("client_secret".to_string(), app.client_secret.clone());
    crm_host::settings::store(db, sealer, MODULE, plain, secrets).await?;
    Ok(())
}

/// Marks the module enabled in the database (a host started on it resumes it).
pub async fn mark_enabled(db: &DatabaseConnection) -> anyhow::Result<()> {
    use crm_host::entities::module_state;
    module_state::Entity::insert(module_state::ActiveModel {
        id: Set(MODULE.to_string()),
        enabled: Set(true),
        changed_at: Set(Utc::now()),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The mailbox address of mailbox `i`.
pub fn mailbox_address(i: usize) -> String {
    format!("mailbox{i:05}@contoso.example")
}

/// Adds `n` shared, delegated mail servers (plain SMTP on loopback `smtp_port`, as the sink
/// speaks it); returns them in id order.
pub async fn add_servers(
    db: &DatabaseConnection,
    n: usize,
    smtp_port: u16,
) -> anyhow::Result<Vec<mail_server::Model>> {
    let now = Utc::now();
    let rows: Vec<mail_server::ActiveModel> = (0..n)
        .map(|i| mail_server::ActiveModel {
            name: Set(format!("Mailbox {i}")),
            kind: Set("shared".into()),
            owner_user_id: Set(None),
            smtp_host: Set("127.0.0.1".into()),
            smtp_port: Set(i32::from(smtp_port)),
            security: Set("none".into()),
            extra_ca_pem: Set(None),
            mailbox: Set(mailbox_address(i)),
            auth: Set("delegated".into()),
            transport: Set("smtp".into()),
            send_as: Set("mailbox".into()),
            from_allow_list: Set(String::new()),
            is_default: Set(i == 0),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        })
        .collect();
    for chunk in rows.chunks(1000) {
        mail_server::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(mail_server::Entity::find()
        .order_by_asc(mail_server::Column::Id)
        .all(db)
        .await?)
}

/// Stores a connected token per server: the access token valid for 75 minutes (no refresh
/// needed to send), the refresh token given (or a made-up one), both sealed as the module seals
/// them; never refreshed yet.
pub async fn add_tokens(
    db: &DatabaseConnection,
    sealer: &Sealer,
    servers: &[mail_server::Model],
    refresh_tokens: Option<&[String]>,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let rows: Vec<token::ActiveModel> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let access = format!("eyJ0eXAiOiJKV1Qi.bench.{}", suffix());
            let refresh = refresh_tokens
                .and_then(|r| r.get(i).cloned())
                .unwrap_or_else(|| format!("1.Abench{}", suffix()));
            token::ActiveModel {
                server_id: Set(server.id),
                access_token_sealed: Set(sealer.seal(&access, &access_context(server.id))),
                refresh_token_sealed: Set(Some(sealer.seal(&refresh, &refresh_context(server.id)))),
                access_expires_at: Set(now + Duration::minutes(75)),
                scopes: Set("https://outlook.office.com/SMTP.Send".into()),
                version: Set(1),
                status: Set("valid".into()),
                signed_in_as: Set(server.mailbox.clone()),
                connected_at: Set(now - Duration::days(2)),
                last_refresh_at: Set(None),
                last_error: Set(None),
                notified_at: Set(None),
                refresh_lease_until: Set(None),
                smtp_user: Set(None),
            }
        })
        .collect();
    for chunk in rows.chunks(1000) {
        token::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// A mail request whose built message is about `size` bytes.
pub fn mail_request(subject: &str, text_body: String) -> MailRequest {
    MailRequest {
        to: AddressInput::One(RECIPIENT.into()),
        subject: subject.to_string(),
        text_body,
        ..MailRequest::default()
    }
}

/// Plain text of `len` bytes in lines of 72 characters (so it is sent as 7bit, unencoded).
pub fn text_of(len: usize) -> String {
    let line = "Thank you for your order; the quote for the next quarter follows here.\r\n";
    let mut text = String::with_capacity(len + line.len());
    while text.len() + line.len() <= len {
        text.push_str(line);
    }
    while text.len() < len {
        text.push('.');
    }
    text
}

fn build_raw(
    server: &mail_server::Model,
    subject: &str,
    body: String,
    message_id: &str,
) -> anyhow::Result<(String, String)> {
    let mail = OutgoingMail::parse(
        mail_request(subject, body),
        microsoft_outlook::outbox::compose::SizeLimits::text_only(
            microsoft_outlook::outbox::compose::DEFAULT_MAX_BYTES,
        ),
    )
    .map_err(|e| anyhow::anyhow!("the bench mail is invalid: {e:?}"))?;
    let from = lettre::message::Mailbox::new(Some("Bench Author".into()), server.mailbox.parse()?);
    let message = mail.build(from.clone(), None, message_id, std::time::SystemTime::now())?;
    Ok((
        String::from_utf8_lossy(&message.formatted()).into_owned(),
        from.to_string(),
    ))
}

/// Queues `n` mails of about `size` bytes (the whole RFC 5322 message), round-robin over
/// `servers`, as `queue_mail` stores them (built with the module's composer): the outbox rows
/// in bulk, then their bodies in `outbox_body` in bulk; returns their ids.
pub async fn queue_mails(
    db: &DatabaseConnection,
    servers: &[mail_server::Model],
    n: usize,
    size: usize,
) -> anyhow::Result<Vec<i64>> {
    anyhow::ensure!(!servers.is_empty(), "no mail servers");
    let now = Utc::now();
    let host = "crm.contoso.example";
    // The headers' size, to pad the body to `size` in all.
    let (probe, _) = build_raw(
        &servers[0],
        "Quote 00000",
        ".".into(),
        &format!("{:032x}@{host}", 0),
    )?;
    let body_len = (size + 1).saturating_sub(probe.len()).max(1);
    let mut rows = Vec::with_capacity(n);
    let mut raws = std::collections::HashMap::with_capacity(n);
    for i in 0..n {
        let server = &servers[i % servers.len()];
        let id: u128 = rand::rng().random();
        let message_id = format!("{id:032x}@{host}");
        let subject = format!("Quote {i:05}");
        let (raw, from_header) = build_raw(server, &subject, text_of(body_len), &message_id)?;
        rows.push(outbox::ActiveModel {
            message_id: Set(message_id.clone()),
            status: Set("queued".into()),
            server_id: Set(server.id),
            author_user_id: Set(1),
            record_model: Set("contact".into()),
            record_id: Set(1),
            from_header: Set(from_header),
            envelope_from: Set(server.mailbox.clone()),
            recipients: Set(RECIPIENT.into()),
            subject: Set(subject),
            size_bytes: Set(raw.len() as i64),
            attempts: Set(0),
            next_attempt_at: Set(now - Duration::seconds(1)),
            lease_until: Set(None),
            lease_owner: Set(None),
            last_reply: Set(None),
            last_error: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
            sent_at: Set(None),
            // As the route of a process that delivers stores it (the wake is in-process).
            pushed_at: Set(None),
            ..Default::default()
        });
        raws.insert(message_id, raw);
    }
    for chunk in rows.chunks(500) {
        outbox::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    let stored: Vec<(i64, String)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .column(outbox::Column::MessageId)
        .filter(outbox::Column::Status.eq("queued"))
        .order_by_asc(outbox::Column::Id)
        .into_tuple()
        .all(db)
        .await?;
    let mut bodies = Vec::with_capacity(stored.len());
    for (id, message_id) in &stored {
        if let Some(raw) = raws.remove(message_id) {
            bodies.push(outbox_body::ActiveModel {
                outbox_id: Set(*id),
                raw: Set(raw),
            });
        }
    }
    anyhow::ensure!(
        bodies.len() == n,
        "{} bodies for {n} queued mails",
        bodies.len()
    );
    for chunk in bodies.chunks(500) {
        outbox_body::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(stored.into_iter().map(|(id, _)| id).collect())
}

/// Queues `n` mails, each carrying one file of `file_bytes` random bytes, built by the module's
/// composer as the queue route builds them (base64 in `multipart/mixed`), a row and its body at
/// a time (the bench never holds more than one message); returns the size of one message as
/// stored, in bytes.
pub async fn queue_with_file(
    db: &DatabaseConnection,
    servers: &[mail_server::Model],
    n: usize,
    file_bytes: usize,
) -> anyhow::Result<usize> {
    anyhow::ensure!(!servers.is_empty(), "no mail servers");
    let host = "crm.contoso.example";
    let mut file = vec![0u8; file_bytes];
    rand::rng().fill(&mut file[..]);
    let mut size = 0;
    for i in 0..n {
        let server = &servers[i % servers.len()];
        let id: u128 = rand::rng().random();
        let message_id = format!("{id:032x}@{host}");
        let subject = format!("Contract {i:03}");
        let mut request = mail_request(&subject, "The signed contract is attached.".into());
        request.uploads = vec![microsoft_outlook::outbox::attachments::Upload {
            filename: format!("Contract {i:03}.pdf"),
            content_type: Some("application/pdf".into()),
            bytes: file.clone(),
        }];
        let limits = microsoft_outlook::outbox::compose::SizeLimits {
            text: microsoft_outlook::outbox::compose::DEFAULT_MAX_BYTES,
            attachments: file_bytes,
        };
        let mail = OutgoingMail::parse(request, limits)
            .map_err(|e| anyhow::anyhow!("the bench mail is invalid: {e:?}"))?;
        let from =
            lettre::message::Mailbox::new(Some("Bench Author".into()), server.mailbox.parse()?);
        let raw = String::from_utf8(
            mail.build(
                from.clone(),
                None,
                &message_id,
                std::time::SystemTime::now(),
            )?
            .formatted(),
        )?;
        size = raw.len();
        let now = Utc::now();
        let row = outbox::ActiveModel {
            message_id: Set(message_id),
            status: Set("queued".into()),
            server_id: Set(server.id),
            author_user_id: Set(1),
            record_model: Set("contact".into()),
            record_id: Set(1),
            from_header: Set(from.to_string()),
            envelope_from: Set(server.mailbox.clone()),
            recipients: Set(RECIPIENT.into()),
            subject: Set(subject),
            size_bytes: Set(raw.len() as i64),
            attempts: Set(0),
            next_attempt_at: Set(now - Duration::seconds(1)),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        }
        .insert(db)
        .await?;
        outbox_body::Entity::insert(outbox_body::ActiveModel {
            outbox_id: Set(row.id),
            raw: Set(raw),
        })
        .exec_without_returning(db)
        .await?;
    }
    Ok(size)
}

/// Deletes every outbox row and body, then queues `n` new mails as [`queue_mails`] does (the
/// rows in insertion order, as mail queued over time lies, rather than in the order the last
/// drain left the rewritten rows); returns their ids.
pub async fn queue_afresh(
    db: &DatabaseConnection,
    servers: &[mail_server::Model],
    n: usize,
    size: usize,
) -> anyhow::Result<Vec<i64>> {
    outbox_body::Entity::delete_many().exec(db).await?;
    outbox::Entity::delete_many().exec(db).await?;
    queue_mails(db, servers, n, size).await
}

/// How many outbox rows have `status`.
pub async fn count_status(db: &DatabaseConnection, status: &str) -> anyhow::Result<u64> {
    Ok(outbox::Entity::find()
        .filter(outbox::Column::Status.eq(status))
        .count(db)
        .await?)
}

/// How many outbox rows are in each status, for messages.
pub async fn statuses(db: &DatabaseConnection) -> String {
    let mut parts = Vec::new();
    for status in ["queued", "sending", "sent", "failed", "needs_reconnect"] {
        match count_status(db, status).await {
            Ok(n) if n > 0 => parts.push(format!("{status} {n}")),
            Ok(_) => {}
            Err(e) => parts.push(format!("{status}: {e}")),
        }
    }
    parts.join(", ")
}

/// The queued mails as the raw loop sends them: envelope (from the outbox row) and message
/// bytes (from `outbox_body`), prebuilt, in id order.
pub async fn prebuilt_messages(
    db: &DatabaseConnection,
) -> anyhow::Result<Vec<(lettre::address::Envelope, Vec<u8>)>> {
    let rows = outbox::Entity::find()
        .order_by_asc(outbox::Column::Id)
        .all(db)
        .await?;
    let mut bodies: std::collections::HashMap<i64, String> = outbox_body::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .map(|b| (b.outbox_id, b.raw))
        .collect();
    rows.into_iter()
        .map(|row| {
            let from: lettre::Address = row.envelope_from.parse()?;
            let to: Vec<lettre::Address> = row
                .recipients
                .lines()
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            let raw = bodies
                .remove(&row.id)
                .with_context(|| format!("mail {} has no body", row.id))?;
            Ok((
                lettre::address::Envelope::new(Some(from), to)?,
                raw.into_bytes(),
            ))
        })
        .collect()
}

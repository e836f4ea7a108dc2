//! SMTP submission with SASL XOAUTH2 over connections this module opens itself (TCP_NODELAY on),
//! reused per mailbox and token version, at most three at once per mailbox.

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::entities::mail_server;
use crate::token_service::AccessToken;

/// Exchange Online's limit of concurrent SMTP connections per mailbox.
pub const CONNECTIONS_PER_MAILBOX: usize = 3;
/// How long an idle connection is kept for reuse.
const IDLE_FOR: Duration = Duration::from_secs(30);
/// How long connecting, the handshake and each command may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// `250`: the server took it.
    Sent(String),
    /// 4xx, a dropped line, a timeout: try again later.
    Transient(String),
    /// 5xx: it will not be accepted as it is.
    Permanent(String),
    /// `535 5.7.3`: the token was refused.
    AuthFailed(String),
    /// `535 5.7.139`: SMTP AUTH is disabled for the tenant or the mailbox.
    AuthDisabled(String),
}

struct Idle {
    conn: AsyncSmtpConnection,
    version: i64,
    since: Instant,
}

struct MailboxPool {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
}

/// The module's SMTP client: one small pool per mailbox.
pub struct SmtpSender {
    pools: Mutex<HashMap<i32, Arc<MailboxPool>>>,
    hello: ClientId,
}

impl Default for SmtpSender {
    fn default() -> Self {
        Self::new()
    }
}

/// The server's reply as it was on the wire (`432 4.3.2 ...`), else lettre's description.
fn error_text(e: &lettre::transport::smtp::Error) -> String {
    let text = e.to_string();
    match (e.status(), text.split_once("): ")) {
        (Some(code), Some((_, message))) => format!("{code} {message}"),
        _ => text,
    }
}

fn classify_error(e: &lettre::transport::smtp::Error) -> SendOutcome {
    let text = error_text(e);
    if e.is_permanent() {
        if e.status().is_some_and(|c| c.to_string() == "535") {
            if text.contains("5.7.139") {
                return SendOutcome::AuthDisabled(text);
            }
            return SendOutcome::AuthFailed(text);
        }
        SendOutcome::Permanent(text)
    } else {
        SendOutcome::Transient(text)
    }
}

/// Whether an error is about the connection rather than an answer of the server.
fn is_connection_error(e: &lettre::transport::smtp::Error) -> bool {
    !e.is_transient() && !e.is_permanent()
}

impl SmtpSender {
    /// A sender with no connections yet.
    pub fn new() -> Self {
        Self {
            pools: Mutex::new(HashMap::new()),
            hello: ClientId::Domain(hostname()),
        }
    }

    fn pool(&self, server_id: i32) -> Arc<MailboxPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(server_id)
            .or_insert_with(|| {
                Arc::new(MailboxPool {
                    permits: Arc::new(Semaphore::new(CONNECTIONS_PER_MAILBOX)),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// Forgets the idle connections of a server (after its token or settings changed).
    pub fn forget(&self, server_id: i32) {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&server_id);
    }

    async fn open(
        &self,
        server: &mail_server::Model,
        token: &AccessToken,
    ) -> Result<AsyncSmtpConnection, SendOutcome> {
        let smtp = |e: lettre::transport::smtp::Error| classify_error(&e);
        let tls = || -> Result<TlsParameters, lettre::transport::smtp::Error> {
            let mut builder = TlsParameters::builder(server.smtp_host.clone());
            if let Some(pem) = &server.extra_ca_pem {
                builder = builder.add_root_certificate(Certificate::from_pem(pem.as_bytes())?);
            }
            builder.build_rustls()
        };
        let mut conn = if server.security == "tls" {
            AsyncSmtpConnection::connect_tokio1(
                (server.smtp_host.as_str(), server.smtp_port as u16),
                Some(IO_TIMEOUT),
                &self.hello,
                Some(tls().map_err(smtp)?),
                None,
            )
            .await
            .map_err(smtp)?
        } else {
            let address = format!("{}:{}", server.smtp_host, server.smtp_port);
            let tcp = match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(address.as_str()))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    return Err(SendOutcome::Transient(format!(
                        "cannot connect to {address}: {e}"
                    )));
                }
                Err(_) => {
                    return Err(SendOutcome::Transient(format!(
                        "connecting to {address} timed out"
                    )));
                }
            };
            // lettre never sets TCP_NODELAY; without it each message waits ~40 ms for a delayed ACK.
            tcp.set_nodelay(true)
                .map_err(|e| SendOutcome::Transient(format!("setting TCP_NODELAY: {e}")))?;
            let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                .await
                .map_err(smtp)?;
            if server.security == "starttls" {
                conn.starttls(tls().map_err(smtp)?, &self.hello)
                    .await
                    .map_err(smtp)?;
            }
            conn
        };
        let credentials = Credentials::new(
            server.mailbox.clone(),
            token.token.expose_secret().to_string(),
        );
        conn.auth(&[Mechanism::Xoauth2], &credentials)
            .await
            .map_err(smtp)?;
        Ok(conn)
    }

    /// Sends one message through `server` with `token`; never more than three connections to
    /// one mailbox from this process.
    pub async fn send(
        &self,
        server: &mail_server::Model,
        token: &AccessToken,
        envelope: &Envelope,
        raw: &[u8],
    ) -> SendOutcome {
        let pool = self.pool(server.id);
        let permit: OwnedSemaphorePermit = match pool.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return SendOutcome::Transient("the sender is shutting down".into()),
        };
        let reused = {
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| c.version == token.version && c.since.elapsed() < IDLE_FOR);
            idle.pop()
        };
        if let Some(mut idle) = reused {
            match tokio::time::timeout(IO_TIMEOUT, idle.conn.send(envelope, raw)).await {
                Ok(Ok(response)) => {
                    self.give_back(&pool, idle.conn, token.version);
                    drop(permit);
                    return SendOutcome::Sent(response_text(&response));
                }
                Ok(Err(e)) if !is_connection_error(&e) => {
                    let outcome = classify_error(&e);
                    if !idle.conn.has_broken() {
                        self.give_back(&pool, idle.conn, token.version);
                    }
                    return outcome;
                }
                // The reused connection was dead before the message went out: use a new one.
                _ => {}
            }
        }
        let mut conn = match self.open(server, token).await {
            Ok(c) => c,
            Err(outcome) => return outcome,
        };
        let outcome = match tokio::time::timeout(IO_TIMEOUT, conn.send(envelope, raw)).await {
            Ok(Ok(response)) => SendOutcome::Sent(response_text(&response)),
            Ok(Err(e)) => classify_error(&e),
            Err(_) => SendOutcome::Transient("the SMTP server did not answer in time".into()),
        };
        if matches!(
            outcome,
            SendOutcome::Sent(_) | SendOutcome::Permanent(_) | SendOutcome::Transient(_)
        ) && !conn.has_broken()
        {
            self.give_back(&pool, conn, token.version);
        }
        drop(permit);
        outcome
    }

    fn give_back(&self, pool: &MailboxPool, conn: AsyncSmtpConnection, version: i64) {
        pool.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Idle {
                conn,
                version,
                since: Instant::now(),
            });
    }
}

fn response_text(response: &lettre::transport::smtp::response::Response) -> String {
    format!(
        "{} {}",
        response.code(),
        response.message().collect::<Vec<_>>().join(" ")
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "crm.localdomain".into())
}

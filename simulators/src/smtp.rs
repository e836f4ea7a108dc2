//! A simulated Exchange Online SMTP submission server (`smtp.office365.com`) for the end-to-end
//! tests, the benchmarks and the demo.
//!
//! It speaks ESMTP with STARTTLS (or implicit TLS, or plain text for tests and benchmarks),
//! authenticates with SASL XOAUTH2 only, answers with Exchange Online's reply texts, records
//! what it accepted, and can be told to misbehave (`inject`) the ways Exchange does: throttling
//! replies, refused authentication, dropped connections before or after the final reply.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The front-end host name the simulator gives in its greeting and EHLO reply.
pub const SERVER_HOSTNAME: &str = "SIM01PR01CA0001.outlook.office365.com";
/// The mailbox server named in `[Hostname=...]` of the final `250` reply.
pub const MAILBOX_HOSTNAME: &str = "SIM01PR01MB0001.namprd01.prod.outlook.com";
/// Exchange Online's fixed maximum message size, as advertised in `SIZE`.
pub const EXCHANGE_MAX_MESSAGE_BYTES: usize = 35_882_577;
/// Exchange Online's limit of recipients per message.
pub const MAX_RECIPIENTS_PER_MESSAGE: usize = 500;
/// The reply Exchange gives beyond the concurrent-connection limit of a mailbox.
pub const SENDER_THREAD_LIMIT_REPLY: &str =
    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded";

/// Longest line read in one piece (XOAUTH2 initial responses carry a whole access token); a
/// longer one ends the connection. [`SmtpConfig::max_command_line`] sets the limit a server
/// enforces with a `500` reply.
const MAX_COMMAND_LINE: u64 = 64 * 1024;
/// RFC 5321 §4.5.3.1.4 and RFC 4954 §4: a command line is at most 1,000 octets, CRLF included.
pub const RFC_COMMAND_LINE_LIMIT: usize = 1000;
/// The error challenge Gmail and Dovecot send when they refuse an XOAUTH2 token: base64 of
/// `{"status":"401","schemes":"bearer","scope":"mail"}`.
pub const XOAUTH2_ERROR_CHALLENGE: &str =
    "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=";
/// The final reply after an acknowledged error challenge (Gmail's words).
pub const XOAUTH2_CHALLENGE_FINAL_REPLY: &str = "535 5.7.8 Username and Password not accepted";
/// Longest DATA line read in one piece (longer lines are read in several pieces).
const MAX_DATA_LINE: u64 = 1024 * 1024;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Decides whether a bearer token may send as a mailbox: `(user=, token)`.
pub type TokenValidator = Arc<dyn Fn(&str, &str) -> AuthVerdict + Send + Sync>;

/// The validator's answer to one XOAUTH2 attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthVerdict {
    /// `235 2.7.0 Authentication successful`.
    Accept,
    /// `535 5.7.3 Authentication unsuccessful`.
    Reject,
}

/// How the server uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Port 587 style: plain greeting, STARTTLS required before AUTH.
    StartTls,
    /// No TLS offered, AUTH allowed in clear (tests and benchmarks).
    Plain,
    /// TLS from the first byte.
    Implicit,
}

/// How a simulated server behaves.
#[derive(Clone)]
pub struct SmtpConfig {
    /// STARTTLS, plain text or implicit TLS.
    pub tls: TlsMode,
    /// Checks XOAUTH2 tokens; `None` accepts any well-formed XOAUTH2 (a benchmark sink).
    pub validator: Option<TokenValidator>,
    /// Whether MAIL FROM needs a successful AUTH first.
    pub require_auth: bool,
    /// The `SIZE` advertised and enforced.
    pub max_message_bytes: usize,
    /// Whether to keep message bodies (and the XOAUTH2 bytes); off for benchmarks.
    pub record_bodies: bool,
    /// Refuse a token the Gmail/Dovecot way: the error challenge [`XOAUTH2_ERROR_CHALLENGE`],
    /// then, after the client's empty line, [`XOAUTH2_CHALLENGE_FINAL_REPLY`]. Off: Exchange's
    /// immediate `535 5.7.3`.
    pub xoauth2_error_challenge: bool,
    /// Enforce a command-line limit (octets, CRLF included; e.g. [`RFC_COMMAND_LINE_LIMIT`]):
    /// a longer command gets `500 5.5.2 Line too long` and is discarded. The SASL response that
    /// follows a `334` is not a command line and may be longer (RFC 4954 §4). `None`: no limit.
    pub max_command_line: Option<usize>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            tls: TlsMode::StartTls,
            validator: None,
            require_auth: true,
            max_message_bytes: EXCHANGE_MAX_MESSAGE_BYTES,
            record_bodies: true,
            xoauth2_error_challenge: false,
            max_command_line: None,
        }
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("tls", &self.tls)
            .field(
                "validator",
                &self.validator.as_ref().map(|_| "Fn(user, token)"),
            )
            .field("require_auth", &self.require_auth)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("record_bodies", &self.record_bodies)
            .field("xoauth2_error_challenge", &self.xoauth2_error_challenge)
            .field("max_command_line", &self.max_command_line)
            .finish()
    }
}

/// One message the server accepted (or may have accepted, after `DropAfterData`).
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    /// The `user=` of the XOAUTH2 that authenticated the session.
    pub auth_user: Option<String>,
    /// The decoded XOAUTH2 initial response, byte for byte (`None` when bodies are not kept).
    pub auth_raw: Option<Vec<u8>>,
    /// The reverse path of MAIL FROM, without `<>`.
    pub mail_from: String,
    /// The forward paths of the RCPT TO commands, without `<>`.
    pub rcpt_to: Vec<String>,
    /// The message after dot-unstuffing, without the final `.` line; empty if bodies are not kept.
    pub data: Vec<u8>,
    /// The `Message-ID` header, without `<>`.
    pub message_id: Option<String>,
    /// Which connection it came on (1, 2, ... in the order of acceptance).
    pub connection_id: u64,
    /// Whether the connection was under TLS.
    pub tls: bool,
}

/// One XOAUTH2 exchange as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthAttempt {
    /// The `user=` of the initial response (`None` when it did not parse).
    pub user: Option<String>,
    /// Whether the initial response came on its own line after `334 ` (the two-step form)
    /// rather than on the `AUTH XOAUTH2` line.
    pub two_step: bool,
    /// Octets of the `AUTH` command line as received, CRLF included.
    pub auth_line_octets: usize,
    /// Whether an error challenge was sent, and then whether the client answered it with
    /// the empty line it must send (`Some(false)`: it sent something else or hung up).
    pub challenge_acknowledged: Option<bool>,
    /// The final reply (first line), or empty when the client hung up before it.
    pub reply: String,
}

/// A misbehaviour to play at the next matching opportunities.
#[derive(Clone, Debug)]
pub enum Injected {
    /// Answer `reply` (one or more full lines) instead of the normal reply at `stage`.
    Reply {
        /// Where to answer it.
        stage: Stage,
        /// The full reply, e.g. `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`.
        reply: String,
    },
    /// Take the DATA content, then close without the final reply (the mail is recorded).
    DropAfterData,
    /// Close the connection halfway through the DATA content (nothing is recorded).
    DropMidData,
    /// Accept the TCP connection, then close it at once without a greeting.
    RefuseConnection,
    /// Accept the TCP connection and never answer (no greeting: a server that hangs); the
    /// connection stays open until the client closes it.
    StallConnection,
}

/// A point of the SMTP dialogue where a reply can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The `220` greeting (once per connection).
    Greeting,
    /// The reply to the first EHLO or HELO of a connection.
    Ehlo,
    /// The final reply to an AUTH command (once per AUTH).
    Auth,
    /// The reply to MAIL FROM (once per message).
    MailFrom,
    /// The reply to the first RCPT TO of a message.
    RcptTo,
    /// The reply to the DATA command.
    Data,
    /// The reply after the final `.` of the content.
    EndOfData,
}

/// Where an injection may apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opportunity {
    Connect,
    Stage(Stage),
}

fn matches(what: &Injected, at: Opportunity) -> bool {
    match (what, at) {
        (Injected::RefuseConnection | Injected::StallConnection, Opportunity::Connect) => true,
        (Injected::Reply { stage, .. }, Opportunity::Stage(s)) => *stage == s,
        (Injected::DropMidData, Opportunity::Stage(Stage::Data)) => true,
        (Injected::DropAfterData, Opportunity::Stage(Stage::EndOfData)) => true,
        _ => false,
    }
}

#[derive(Default)]
struct UserSessions {
    current: usize,
    peak: usize,
}

#[derive(Default)]
struct State {
    received: Vec<ReceivedMail>,
    auth_attempts: Vec<AuthAttempt>,
    long_lines_refused: usize,
    by_message_id: HashMap<String, usize>,
    injections: VecDeque<(Injected, usize)>,
    users: HashMap<String, UserSessions>,
    limit_per_user: Option<usize>,
}

struct Shared {
    config: SmtpConfig,
    acceptor: TlsAcceptor,
    ca_pem: String,
    state: Mutex<State>,
    has_injections: AtomicBool,
    next_connection: AtomicU64,
    current: AtomicUsize,
    opened: AtomicU64,
    /// Connections held open without an answer ([`Injected::StallConnection`]).
    stalled: Arc<AtomicUsize>,
    next_queue_id: AtomicU64,
    trailer_base: u64,
    shutdown: watch::Sender<bool>,
    /// Bumped to close every open connection (the listener stays).
    kick: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one use of the first queued injection that applies at `at`.
    fn take_injection(&self, at: Opportunity) -> Option<Injected> {
        if !self.has_injections.load(Ordering::Acquire) {
            return None;
        }
        let mut state = self.state();
        let index = state
            .injections
            .iter()
            .position(|(what, _)| matches(what, at))?;
        let (what, left) = &mut state.injections[index];
        let taken = what.clone();
        *left -= 1;
        if *left == 0 {
            state.injections.remove(index);
        }
        if state.injections.is_empty() {
            self.has_injections.store(false, Ordering::Release);
        }
        Some(taken)
    }

    /// The `[host timestamp id]` trailer Exchange puts on its error replies.
    fn trailer(&self, connection: u64) -> String {
        format!(
            "[{} {} {:016X}]",
            SERVER_HOSTNAME.to_ascii_uppercase(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.trailer_base ^ connection
        )
    }

    /// Counts a newly authenticated session; true when it is over the per-user limit.
    fn open_user_session(&self, key: &str) -> bool {
        let mut state = self.state();
        let limit = state.limit_per_user;
        let entry = state.users.entry(key.to_string()).or_default();
        entry.current += 1;
        entry.peak = entry.peak.max(entry.current);
        limit.is_some_and(|n| entry.current > n)
    }

    fn close_user_session(&self, key: &str) {
        let mut state = self.state();
        if let Some(entry) = state.users.get_mut(key) {
            entry.current = entry.current.saturating_sub(1);
        }
    }

    /// Whether a session of `key` is (still) over the per-user limit.
    fn over_user_limit(&self, key: &str) -> bool {
        let state = self.state();
        match state.limit_per_user {
            Some(n) => state.users.get(key).is_some_and(|u| u.current > n),
            None => false,
        }
    }

    fn record(&self, mail: ReceivedMail) {
        let mut state = self.state();
        if let Some(id) = &mail.message_id {
            match state.by_message_id.get_mut(id) {
                Some(count) => *count += 1,
                None => {
                    state.by_message_id.insert(id.clone(), 1);
                }
            }
        }
        state.received.push(mail);
    }
}

/// A running simulated Exchange Online submission server; stops when dropped.
pub struct SmtpServer {
    shared: Arc<Shared>,
    port: u16,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl SmtpServer {
    /// Starts a server on `127.0.0.1` and a free port.
    pub async fn start(config: SmtpConfig) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", config).await
    }

    /// Starts a server on `bind` (`host:port`).
    pub async fn start_on(bind: &str, config: SmtpConfig) -> anyhow::Result<Self> {
        let (ca_pem, server_config) = tls_material()?;
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the simulated SMTP server to {bind}"))?;
        let port = listener.local_addr()?.port();
        let (shutdown, _) = watch::channel(false);
        let (kick, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            config,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            ca_pem,
            state: Mutex::new(State::default()),
            has_injections: AtomicBool::new(false),
            next_connection: AtomicU64::new(0),
            current: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            stalled: Arc::new(AtomicUsize::new(0)),
            next_queue_id: AtomicU64::new(0),
            trailer_base: rand::random::<u64>() | (1 << 63),
            shutdown,
            kick,
        });
        let task = tokio::spawn(accept_loop(shared.clone(), listener));
        tracing::debug!(port, "simulated Exchange Online SMTP server started");
        Ok(Self {
            shared,
            port,
            accept_task: Mutex::new(Some(task)),
        })
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PEM of the CA that signed the server certificate (valid for `localhost` and 127.0.0.1).
    pub fn ca_pem(&self) -> String {
        self.shared.ca_pem.clone()
    }

    /// Queues `what` for the next `times` matching opportunities.
    pub fn inject(&self, what: Injected, times: usize) {
        if times == 0 {
            return;
        }
        let mut state = self.shared.state();
        state.injections.push_back((what, times));
        self.shared.has_injections.store(true, Ordering::Release);
    }

    /// Forgets every queued injection.
    pub fn clear_injections(&self) {
        let mut state = self.shared.state();
        state.injections.clear();
        self.shared.has_injections.store(false, Ordering::Release);
    }

    /// How many injected misbehaviours are still to be played.
    pub fn injections_left(&self) -> usize {
        self.shared.state().injections.iter().map(|(_, n)| n).sum()
    }

    /// Every message recorded so far, in order.
    pub fn received(&self) -> Vec<ReceivedMail> {
        self.shared.state().received.clone()
    }

    /// Every XOAUTH2 exchange so far, in order.
    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        self.shared.state().auth_attempts.clone()
    }

    /// How many command lines were refused as longer than [`SmtpConfig::max_command_line`].
    pub fn long_lines_refused(&self) -> usize {
        self.shared.state().long_lines_refused
    }

    /// How many messages were recorded.
    pub fn received_count(&self) -> usize {
        self.shared.state().received.len()
    }

    /// How many times each Message-ID was recorded (duplicates show as counts above 1).
    pub fn count_by_message_id(&self) -> HashMap<String, usize> {
        self.shared.state().by_message_id.clone()
    }

    /// Peak number of simultaneously open sessions authenticated as `user`.
    pub fn max_concurrent_connections_for(&self, user: &str) -> usize {
        self.shared
            .state()
            .users
            .get(&user.to_ascii_lowercase())
            .map_or(0, |u| u.peak)
    }

    /// How many connections are open now.
    pub fn current_connections(&self) -> usize {
        self.shared.current.load(Ordering::Acquire)
    }

    /// Sets the per-user limit of concurrent authenticated sessions (`None`: no limit).
    pub fn set_connection_limit_per_user(&self, limit: Option<usize>) {
        self.shared.state().limit_per_user = limit;
    }

    /// How many TCP connections were accepted so far.
    pub fn connections_opened(&self) -> u64 {
        self.shared.opened.load(Ordering::Acquire)
    }

    /// How many connections [`Injected::StallConnection`] holds open now (the client has not
    /// given up on them yet). They are not among [`SmtpServer::current_connections`].
    pub fn stalled_connections(&self) -> usize {
        self.shared.stalled.load(Ordering::Acquire)
    }

    /// Closes every open connection without a word, as Exchange does with idle sessions (or a
    /// restart does); the server keeps listening. Returns once they are closed.
    pub async fn close_connections(&self) {
        self.shared.kick.send_modify(|n| *n += 1);
        for _ in 0..200 {
            if self.current_connections() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops listening and closes every open connection.
    pub async fn stop(&self) {
        self.shared.shutdown.send_replace(true);
        let task = self
            .accept_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        for _ in 0..200 {
            if self.current_connections() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// A fresh CA and a server certificate it signed for `localhost`, 127.0.0.1 and ::1.
fn tls_material() -> anyhow::Result<(String, rustls::ServerConfig)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Simulated Exchange Online test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )?;
    Ok((ca_cert.pem(), config))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "simulated SMTP server: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.opened.fetch_add(1, Ordering::AcqRel);
        match shared.take_injection(Opportunity::Connect) {
            Some(Injected::RefuseConnection) => {
                drop(tcp);
                continue;
            }
            Some(Injected::StallConnection) => {
                let stalled = shared.stalled.clone();
                stalled.fetch_add(1, Ordering::AcqRel);
                let mut shutdown = shared.shutdown.subscribe();
                let mut kick = shared.kick.subscribe();
                tokio::spawn(async move {
                    // Reads whatever comes and answers nothing, until the client closes (or the
                    // server stops or closes its connections).
                    let mut tcp = tcp;
                    let mut sink = [0_u8; 512];
                    tokio::select! {
                        _ = async {
                            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                        } => {}
                        _ = shutdown.wait_for(|stop| *stop) => {}
                        _ = kick.changed() => {}
                    }
                    stalled.fetch_sub(1, Ordering::AcqRel);
                });
                continue;
            }
            _ => {}
        }
        let _ = tcp.set_nodelay(true);
        shared.current.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            let id = shared.next_connection.fetch_add(1, Ordering::AcqRel) + 1;
            let mut session = Session::new(id, peer.ip());
            let mut shutdown = shared.shutdown.subscribe();
            let mut kick = shared.kick.subscribe();
            tokio::select! {
                _ = run_connection(&shared, &mut session, tcp) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
                _ = kick.changed() => {}
            }
            if let Some(key) = session.counted_user.take() {
                shared.close_user_session(&key);
            }
            shared.current.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// What one authenticated session knows of its AUTH.
struct AuthInfo {
    user: Option<String>,
    raw: Vec<u8>,
}

/// One message being submitted.
#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    size_hint: Option<usize>,
    rcpt_injection_checked: bool,
}

/// What a connection remembers, across STARTTLS too.
struct Session {
    id: u64,
    peer: IpAddr,
    tls: bool,
    hello: bool,
    ehlo_injection_checked: bool,
    auth: Option<AuthInfo>,
    counted_user: Option<String>,
    throttled: bool,
    txn: Transaction,
    line: Vec<u8>,
    data: Vec<u8>,
}

impl Session {
    fn new(id: u64, peer: IpAddr) -> Self {
        Self {
            id,
            peer,
            tls: false,
            hello: false,
            ehlo_injection_checked: false,
            auth: None,
            counted_user: None,
            throttled: false,
            txn: Transaction::default(),
            line: Vec::with_capacity(256),
            data: Vec::new(),
        }
    }
}

async fn run_connection(shared: &Shared, session: &mut Session, tcp: TcpStream) {
    if shared.config.tls == TlsMode::Implicit {
        let Some(tls) = handshake(shared, tcp).await else {
            return;
        };
        session.tls = true;
        let _ = serve(shared, session, tls, true).await;
        return;
    }
    let Some(tcp) = serve(shared, session, tcp, true).await else {
        return;
    };
    let Some(tls) = handshake(shared, tcp).await else {
        return;
    };
    // RFC 3207: after TLS the client starts over with EHLO.
    session.tls = true;
    session.hello = false;
    session.txn = Transaction::default();
    let _ = serve(shared, session, tls, false).await;
}

async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "simulated SMTP server: TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// The buffered connection: reads by line, collects replies and writes them when the client
/// has nothing more pipelined.
struct Io<S> {
    reader: BufReader<S>,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Queues an injected reply: one or more lines, each ended with CRLF.
    fn reply_lines(&mut self, text: &str) {
        for line in text.trim_end_matches(['\r', '\n']).split('\n') {
            self.reply(line.trim_end_matches('\r'));
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let stream = self.reader.get_mut();
            stream.write_all(&self.out).await?;
            stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads one line (with its line end) into `line`; 0 at the end of the stream.
    async fn read_line(&mut self, line: &mut Vec<u8>, limit: u64) -> std::io::Result<usize> {
        if !self.out.is_empty() && !self.reader.buffer().contains(&b'\n') {
            self.flush().await?;
        }
        line.clear();
        (&mut self.reader).take(limit).read_until(b'\n', line).await
    }
}

enum Flow {
    Continue,
    Close,
    StartTls,
}

/// Serves commands until the connection ends, or until STARTTLS (then gives the stream back).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    stream: S,
    greet: bool,
) -> Option<S> {
    let mut io = Io {
        reader: BufReader::with_capacity(16 * 1024, stream),
        out: Vec::with_capacity(512),
    };
    if greet {
        match shared.take_injection(Opportunity::Stage(Stage::Greeting)) {
            Some(Injected::Reply { reply, .. }) => {
                io.reply_lines(&reply);
                if !reply.starts_with('2') {
                    let _ = io.flush().await;
                    return None;
                }
            }
            _ => {
                let greeting = format!(
                    "220 {SERVER_HOSTNAME} Microsoft ESMTP MAIL Service ready at {}",
                    chrono::Utc::now().to_rfc2822()
                );
                io.reply(&greeting);
            }
        }
        if io.flush().await.is_err() {
            return None;
        }
    }
    loop {
        let mut line = std::mem::take(&mut session.line);
        let read = io.read_line(&mut line, MAX_COMMAND_LINE).await;
        let flow = match read {
            Ok(0) | Err(_) => Flow::Close,
            Ok(_) if !line.ends_with(b"\n") => Flow::Close,
            Ok(n) if shared.config.max_command_line.is_some_and(|max| n > max) => {
                shared.state().long_lines_refused += 1;
                io.reply("500 5.5.2 Line too long");
                Flow::Continue
            }
            Ok(_) => command(shared, session, &mut io, &line).await,
        };
        session.line = line;
        match flow {
            Flow::Continue => {}
            Flow::Close => {
                let _ = io.flush().await;
                return None;
            }
            Flow::StartTls => {
                if io.flush().await.is_err() {
                    return None;
                }
                // Anything pipelined after STARTTLS is dropped, as a server must (RFC 3207).
                return Some(io.reader.into_inner());
            }
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits `VERB rest` and gives the verb and what follows the first space.
fn split_verb(line: &str) -> (&str, &str) {
    match line.find(' ') {
        Some(i) => (&line[..i], line[i + 1..].trim_start()),
        None => (line, ""),
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    raw: &[u8],
) -> Flow {
    let Ok(line) = std::str::from_utf8(trim_line_end(raw)) else {
        io.reply("500 5.3.3 Unrecognized command");
        return Flow::Continue;
    };
    let (verb, rest) = split_verb(line);
    if verb.eq_ignore_ascii_case("EHLO") || verb.eq_ignore_ascii_case("HELO") {
        return hello(shared, session, io, verb.eq_ignore_ascii_case("EHLO"), rest);
    }
    if verb.eq_ignore_ascii_case("MAIL") {
        return mail_from(shared, session, io, rest);
    }
    if verb.eq_ignore_ascii_case("RCPT") {
        return rcpt_to(shared, session, io, rest);
    }
    if verb.eq_ignore_ascii_case("DATA") {
        return data(shared, session, io).await;
    }
    if verb.eq_ignore_ascii_case("AUTH") {
        return auth(shared, session, io, rest, raw.len()).await;
    }
    if verb.eq_ignore_ascii_case("RSET") {
        session.txn = Transaction::default();
        io.reply("250 2.0.0 Resetting");
        return Flow::Continue;
    }
    if verb.eq_ignore_ascii_case("NOOP") {
        io.reply("250 2.0.0 OK");
        return Flow::Continue;
    }
    if verb.eq_ignore_ascii_case("QUIT") {
        io.reply("221 2.0.0 Service closing transmission channel");
        return Flow::Close;
    }
    if verb.eq_ignore_ascii_case("STARTTLS")
        && shared.config.tls == TlsMode::StartTls
        && !session.tls
    {
        io.reply("220 2.0.0 SMTP server ready");
        return Flow::StartTls;
    }
    let shown: String = verb.chars().take(32).collect();
    io.reply(&format!("500 5.3.3 Unrecognized command '{shown}'"));
    Flow::Continue
}

/// Whether AUTH is offered now: under TLS, or in plain mode.
fn auth_offered(shared: &Shared, session: &Session) -> bool {
    session.tls || shared.config.tls == TlsMode::Plain
}

fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    extended: bool,
    domain: &str,
) -> Flow {
    if !session.ehlo_injection_checked {
        session.ehlo_injection_checked = true;
        if let Some(Injected::Reply { reply, .. }) =
            shared.take_injection(Opportunity::Stage(Stage::Ehlo))
        {
            io.reply_lines(&reply);
            if reply.starts_with('2') {
                session.hello = true;
                session.txn = Transaction::default();
            }
            return if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
        }
    }
    if domain.trim().is_empty() {
        io.reply("501 5.5.4 Invalid domain name");
        return Flow::Continue;
    }
    session.hello = true;
    session.txn = Transaction::default();
    let peer = session.peer;
    if !extended {
        io.reply(&format!("250 {SERVER_HOSTNAME} Hello [{peer}]"));
        return Flow::Continue;
    }
    let _ = write!(
        io.out,
        "250-{SERVER_HOSTNAME} Hello [{peer}]\r\n250-SIZE {}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n",
        shared.config.max_message_bytes
    );
    if shared.config.tls == TlsMode::StartTls && !session.tls {
        io.out.extend_from_slice(b"250-STARTTLS\r\n");
    }
    if auth_offered(shared, session) {
        io.out.extend_from_slice(b"250-AUTH LOGIN XOAUTH2\r\n");
    }
    io.out.extend_from_slice(b"250 8BITMIME\r\n");
    Flow::Continue
}

/// Parses `user=<mailbox>\x01auth=Bearer <token>\x01\x01` strictly.
fn parse_xoauth2(raw: &[u8]) -> Option<(&str, &str)> {
    let rest = raw.strip_prefix(b"user=")?;
    let end = rest.iter().position(|&b| b == 0x01)?;
    let user = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = rest[end + 1..].strip_prefix(b"auth=Bearer ")?;
    let end = rest.iter().position(|&b| b == 0x01)?;
    let token = std::str::from_utf8(&rest[..end]).ok()?;
    if &rest[end..] != b"\x01\x01" || user.is_empty() || token.is_empty() {
        return None;
    }
    if user.contains(char::is_whitespace) || token.contains(char::is_whitespace) {
        return None;
    }
    Some((user, token))
}

/// Reads one SASL response line after a `334` challenge; `None` when the connection ended.
async fn sasl_line<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session,
    io: &mut Io<S>,
    challenge: &str,
) -> Option<String> {
    io.reply(challenge);
    let mut line = std::mem::take(&mut session.line);
    let read = io.read_line(&mut line, MAX_COMMAND_LINE).await;
    let answer = match read {
        Ok(n) if n > 0 && line.ends_with(b"\n") => Some(
            String::from_utf8_lossy(trim_line_end(&line))
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    session.line = line;
    answer
}

async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    rest: &str,
    line_octets: usize,
) -> Flow {
    if !session.hello {
        io.reply("503 5.5.2 Send hello first");
        return Flow::Continue;
    }
    if session.auth.is_some() {
        io.reply("503 5.5.2 Already authenticated");
        return Flow::Continue;
    }
    if session.txn.mail_from.is_some() {
        io.reply("503 5.5.2 Bad sequence of commands");
        return Flow::Continue;
    }
    let (mechanism, initial) = split_verb(rest);
    let offered = auth_offered(shared, session);
    if offered && mechanism.eq_ignore_ascii_case("XOAUTH2") {
        let encoded = if initial.is_empty() {
            match sasl_line(session, io, "334 ").await {
                Some(line) => line,
                None => return Flow::Close,
            }
        } else {
            initial.trim().to_string()
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .ok();
        let parsed = raw
            .as_deref()
            .and_then(parse_xoauth2)
            .map(|(u, t)| (u.to_string(), t.to_string()));
        let mut attempt = AuthAttempt {
            user: parsed.as_ref().map(|(u, _)| u.clone()),
            two_step: initial.is_empty(),
            auth_line_octets: line_octets,
            challenge_acknowledged: None,
            reply: String::new(),
        };
        if let Some(Injected::Reply { reply, .. }) =
            shared.take_injection(Opportunity::Stage(Stage::Auth))
        {
            io.reply_lines(&reply);
            attempt.reply = reply
                .lines()
                .next()
                .unwrap_or_default()
                .trim_end()
                .to_string();
            shared.state().auth_attempts.push(attempt);
            if reply.starts_with("235") {
                let user = parsed.map(|(u, _)| u);
                authenticated(shared, session, user, raw.unwrap_or_default());
            }
            return if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
        }
        let verdict = match (&parsed, &shared.config.validator) {
            (None, _) => AuthVerdict::Reject,
            (Some(_), None) => AuthVerdict::Accept,
            (Some((user, token)), Some(validator)) => validator(user, token),
        };
        let mut flow = Flow::Continue;
        match (verdict, parsed) {
            (AuthVerdict::Accept, Some((user, _))) => {
                attempt.reply = "235 2.7.0 Authentication successful".into();
                io.reply(&attempt.reply);
                authenticated(shared, session, Some(user), raw.unwrap_or_default());
            }
            _ if shared.config.xoauth2_error_challenge => {
                // Gmail and Dovecot: an error challenge first; the client must answer it with
                // an empty line, then comes the final reply.
                match sasl_line(session, io, XOAUTH2_ERROR_CHALLENGE).await {
                    None => {
                        attempt.challenge_acknowledged = Some(false);
                        flow = Flow::Close;
                    }
                    Some(answer) if answer == "*" => {
                        attempt.challenge_acknowledged = Some(false);
                        attempt.reply = "501 5.5.4 Authentication cancelled".into();
                        io.reply(&attempt.reply);
                    }
                    Some(answer) => {
                        attempt.challenge_acknowledged = Some(answer.is_empty());
                        attempt.reply = XOAUTH2_CHALLENGE_FINAL_REPLY.into();
                        io.reply(&attempt.reply);
                    }
                }
            }
            _ => {
                let trailer = shared.trailer(session.id);
                attempt.reply = "535 5.7.3 Authentication unsuccessful".into();
                io.reply(&format!("535 5.7.3 Authentication unsuccessful {trailer}"));
            }
        }
        shared.state().auth_attempts.push(attempt);
        return flow;
    }
    if offered && mechanism.eq_ignore_ascii_case("LOGIN") {
        // Basic authentication is retired in Exchange Online: the exchange runs, then fails.
        if initial.is_empty() && sasl_line(session, io, "334 VXNlcm5hbWU6").await.is_none() {
            return Flow::Close;
        }
        if sasl_line(session, io, "334 UGFzc3dvcmQ6").await.is_none() {
            return Flow::Close;
        }
        if let Some(Injected::Reply { reply, .. }) =
            shared.take_injection(Opportunity::Stage(Stage::Auth))
        {
            io.reply_lines(&reply);
            return if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
        }
        let trailer = shared.trailer(session.id);
        io.reply(&format!(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. {trailer}"
        ));
        return Flow::Continue;
    }
    io.reply("504 5.7.4 Unrecognized authentication type");
    Flow::Continue
}

fn authenticated(shared: &Shared, session: &mut Session, user: Option<String>, raw: Vec<u8>) {
    if let Some(user) = &user {
        let key = user.to_ascii_lowercase();
        session.throttled = shared.open_user_session(&key);
        session.counted_user = Some(key);
    }
    session.auth = Some(AuthInfo { user, raw });
}

/// Parses `FROM:<path> params` / `TO:<path> params`: the path without `<>` and the parameters.
fn parse_path<'a>(rest: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    if rest.len() < keyword.len() || !rest[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        let path = &inner[..end];
        if path.contains(char::is_whitespace) {
            return None;
        }
        Some((path, inner[end + 1..].trim()))
    } else {
        let (path, params) = split_verb(rest);
        if path.is_empty() {
            return None;
        }
        Some((path, params))
    }
}

fn mail_from<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    rest: &str,
) -> Flow {
    if !session.hello {
        io.reply("503 5.5.2 Send hello first");
        return Flow::Continue;
    }
    if shared.config.require_auth && session.auth.is_none() {
        let trailer = shared.trailer(session.id);
        io.reply(&format!(
            "530 5.7.57 Client not authenticated to send mail. {trailer}"
        ));
        return Flow::Continue;
    }
    if session.txn.mail_from.is_some() {
        io.reply("503 5.5.2 Sender already specified");
        return Flow::Continue;
    }
    let Some((path, params)) = parse_path(rest, "FROM:") else {
        io.reply("501 5.5.4 Invalid arguments");
        return Flow::Continue;
    };
    let mut size = None;
    for param in params.split_ascii_whitespace() {
        if param.len() > 5 && param[..5].eq_ignore_ascii_case("SIZE=") {
            match param[5..].parse::<usize>() {
                Ok(n) => size = Some(n),
                Err(_) => {
                    io.reply("501 5.5.4 Invalid arguments");
                    return Flow::Continue;
                }
            }
        }
    }
    if let Some(Injected::Reply { reply, .. }) =
        shared.take_injection(Opportunity::Stage(Stage::MailFrom))
    {
        io.reply_lines(&reply);
        if reply.starts_with('2') {
            session.txn.mail_from = Some(path.to_string());
            session.txn.size_hint = size;
        }
        return if reply.starts_with("421") {
            Flow::Close
        } else {
            Flow::Continue
        };
    }
    if size.is_some_and(|n| n > shared.config.max_message_bytes) {
        io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
        return Flow::Continue;
    }
    if session.throttled {
        let over = session
            .counted_user
            .as_deref()
            .is_some_and(|key| shared.over_user_limit(key));
        if over {
            io.reply(SENDER_THREAD_LIMIT_REPLY);
            return Flow::Continue;
        }
        session.throttled = false;
    }
    session.txn.mail_from = Some(path.to_string());
    session.txn.size_hint = size;
    io.reply("250 2.1.0 Sender OK");
    Flow::Continue
}

fn rcpt_to<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    rest: &str,
) -> Flow {
    if session.txn.mail_from.is_none() {
        io.reply("503 5.5.2 Need mail command");
        return Flow::Continue;
    }
    let Some((path, _params)) = parse_path(rest, "TO:") else {
        io.reply("501 5.5.4 Invalid arguments");
        return Flow::Continue;
    };
    if path.is_empty() || !path.contains('@') {
        io.reply("501 5.1.3 Invalid address");
        return Flow::Continue;
    }
    if !session.txn.rcpt_injection_checked {
        session.txn.rcpt_injection_checked = true;
        if let Some(Injected::Reply { reply, .. }) =
            shared.take_injection(Opportunity::Stage(Stage::RcptTo))
        {
            io.reply_lines(&reply);
            if reply.starts_with('2') {
                session.txn.rcpt_to.push(path.to_string());
            }
            return if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
        }
    }
    if session.txn.rcpt_to.len() >= MAX_RECIPIENTS_PER_MESSAGE {
        io.reply("452 4.5.3 Too many recipients");
        return Flow::Continue;
    }
    session.txn.rcpt_to.push(path.to_string());
    io.reply("250 2.1.5 Recipient OK");
    Flow::Continue
}

/// How reading the DATA content ended.
enum DataEnd {
    /// The final `.` line came; `oversize` when the content went over the limit.
    Complete { oversize: bool },
    /// The connection ended (or failed) first.
    Broken,
    /// `stop_after` bytes were read (DropMidData).
    Stopped,
}

/// Reads the content up to CRLF.CRLF into `session.data`, undoing dot-stuffing.
async fn read_content<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
    stop_after: Option<usize>,
) -> DataEnd {
    let max = shared.config.max_message_bytes;
    let mut line = std::mem::take(&mut session.line);
    let data = &mut session.data;
    data.clear();
    let mut oversize = false;
    let mut at_line_start = true;
    // A piece of a line longer than the read limit may end in the CR of its CRLF.
    let mut ended_in_cr = false;
    let mut seen = 0usize;
    let end = loop {
        match io.read_line(&mut line, MAX_DATA_LINE).await {
            Ok(0) | Err(_) => break DataEnd::Broken,
            Ok(_) => {}
        }
        // Only CRLF ends a line (RFC 5321 §2.3.8, §4.1.1.4): a bare LF, or a `.` after one, is
        // content, as Exchange Online takes it.
        if at_line_start && line == b".\r\n" {
            break DataEnd::Complete { oversize };
        }
        let content = if at_line_start && line.first() == Some(&b'.') {
            &line[1..]
        } else {
            &line[..]
        };
        if !oversize {
            if data.len() + content.len() > max {
                oversize = true;
                data.clear();
            } else {
                data.extend_from_slice(content);
            }
        }
        at_line_start = line.ends_with(b"\r\n") || (ended_in_cr && line == b"\n");
        ended_in_cr = line.ends_with(b"\r");
        seen += line.len();
        if stop_after.is_some_and(|n| seen >= n) {
            break DataEnd::Stopped;
        }
    };
    session.line = line;
    end
}

/// The first header `name` (without the colon, case-insensitive) of a message, unfolded and
/// trimmed; `None` when the header section has none.
pub(crate) fn header_value(data: &[u8], name: &str) -> Option<String> {
    let name = name.as_bytes();
    let mut lines = data.split(|&b| b == b'\n').map(trim_line_end).peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        let matches = line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':';
        if !matches {
            continue;
        }
        let mut value = String::from_utf8_lossy(&line[name.len() + 1..]).into_owned();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                value.push_str(&String::from_utf8_lossy(next));
                lines.next();
            } else {
                break;
            }
        }
        return Some(value.trim().to_string());
    }
    None
}

/// The `Message-ID` header of a message (unfolded, without `<>`).
pub(crate) fn parse_message_id(data: &[u8]) -> Option<String> {
    let value = header_value(data, "message-id")?;
    let id = match value.strip_prefix('<') {
        Some(inner) => inner.split('>').next().unwrap_or_default(),
        None => value.as_str(),
    }
    .trim();
    (!id.is_empty()).then(|| id.to_string())
}

async fn data<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    session: &mut Session,
    io: &mut Io<S>,
) -> Flow {
    if session.txn.mail_from.is_none() {
        io.reply("503 5.5.2 Need mail command");
        return Flow::Continue;
    }
    if session.txn.rcpt_to.is_empty() {
        io.reply("503 5.5.2 Need rcpt command");
        return Flow::Continue;
    }
    let mut stop_after = None;
    match shared.take_injection(Opportunity::Stage(Stage::Data)) {
        Some(Injected::Reply { reply, .. }) if !reply.starts_with("354") => {
            io.reply_lines(&reply);
            return if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
        }
        Some(Injected::Reply { reply, .. }) => io.reply_lines(&reply),
        Some(Injected::DropMidData) => {
            io.reply("354 Start mail input; end with <CRLF>.<CRLF>");
            stop_after = Some(session.txn.size_hint.map_or(1, |n| (n / 2).max(1)));
        }
        _ => io.reply("354 Start mail input; end with <CRLF>.<CRLF>"),
    }
    let end = read_content(shared, session, io, stop_after).await;
    let txn = std::mem::take(&mut session.txn);
    let oversize = match end {
        DataEnd::Broken | DataEnd::Stopped => return Flow::Close,
        DataEnd::Complete { oversize } => oversize,
    };
    if oversize {
        io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
        return Flow::Continue;
    }
    let message_id = parse_message_id(&session.data);
    let (record, flow) = match shared.take_injection(Opportunity::Stage(Stage::EndOfData)) {
        Some(Injected::DropAfterData) => (true, Flow::Close),
        Some(Injected::Reply { reply, .. }) => {
            io.reply_lines(&reply);
            let flow = if reply.starts_with("421") {
                Flow::Close
            } else {
                Flow::Continue
            };
            (reply.starts_with('2'), flow)
        }
        _ => {
            let _ = match &message_id {
                Some(id) => write!(
                    io.out,
                    "250 2.0.0 OK <{id}> [Hostname={MAILBOX_HOSTNAME}]\r\n"
                ),
                None => {
                    let n = shared.next_queue_id.fetch_add(1, Ordering::AcqRel);
                    write!(
                        io.out,
                        "250 2.0.0 OK <{:016X}{n:08X}@{MAILBOX_HOSTNAME}> [Hostname={MAILBOX_HOSTNAME}]\r\n",
                        shared.trailer_base
                    )
                }
            };
            (true, Flow::Continue)
        }
    };
    if record {
        let keep = shared.config.record_bodies;
        let auth = session.auth.as_ref();
        shared.record(ReceivedMail {
            auth_user: auth.and_then(|a| a.user.clone()),
            auth_raw: if keep {
                auth.map(|a| a.raw.clone())
            } else {
                None
            },
            mail_from: txn.mail_from.unwrap_or_default(),
            rcpt_to: txn.rcpt_to,
            data: if keep {
                session.data.clone()
            } else {
                Vec::new()
            },
            message_id,
            connection_id: session.id,
            tls: session.tls,
        });
    }
    flow
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    const USER: &str = "alice@contoso.example";
    const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access.token";

    struct Client {
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    }

    impl Client {
        async fn connect(server: &SmtpServer) -> Self {
            let tcp = TcpStream::connect(("127.0.0.1", server.port()))
                .await
                .expect("connect");
            let (r, w) = tcp.into_split();
            Self {
                reader: BufReader::new(r),
                writer: w,
            }
        }

        /// Reads one whole reply (all its lines); empty at the end of the stream.
        async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                match self.reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return all,
                    Ok(_) => {}
                }
                all.push_str(&line);
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return all.trim_end().to_string();
                }
            }
        }

        async fn send(&mut self, text: &str) {
            self.writer.write_all(text.as_bytes()).await.expect("write");
        }

        async fn cmd(&mut self, line: &str) -> String {
            self.send(&format!("{line}\r\n")).await;
            self.reply().await
        }

        async fn greeted(server: &SmtpServer) -> Self {
            let mut c = Self::connect(server).await;
            let greeting = c.reply().await;
            assert!(
                greeting.starts_with(&format!(
                    "220 {SERVER_HOSTNAME} Microsoft ESMTP MAIL Service ready at "
                )),
                "{greeting}"
            );
            let ehlo = c.cmd("EHLO client.example").await;
            assert!(ehlo.starts_with("250-"), "{ehlo}");
            c
        }
    }

    fn xoauth2(user: &str, token: &str) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
    }

    fn plain(validator: Option<TokenValidator>) -> SmtpConfig {
        SmtpConfig {
            tls: TlsMode::Plain,
            validator,
            ..SmtpConfig::default()
        }
    }

    fn strict() -> TokenValidator {
        Arc::new(|user: &str, token: &str| {
            if user == USER && token == TOKEN {
                AuthVerdict::Accept
            } else {
                AuthVerdict::Reject
            }
        })
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..400 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    const MESSAGE: &str = "From: Alice <alice@contoso.example>\r\nTo: dana@fabrikam.example\r\nMessage-ID:\r\n <quote-1@contoso.example>\r\nSubject: Quote\r\n\r\nHello Dana,\r\n..stuffed line\r\n.\r\n";

    #[tokio::test]
    async fn xoauth2_then_one_message_is_recorded() {
        let server = SmtpServer::start(plain(Some(strict())))
            .await
            .expect("start");
        let mut c = Client::greeted(&server).await;
        assert_eq!(
            c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
                .await,
            "235 2.7.0 Authentication successful"
        );
        assert_eq!(
            c.cmd("MAIL FROM:<alice@contoso.example> SIZE=300").await,
            "250 2.1.0 Sender OK"
        );
        assert_eq!(
            c.cmd("RCPT TO:<dana@fabrikam.example>").await,
            "250 2.1.5 Recipient OK"
        );
        assert_eq!(
            c.cmd("DATA").await,
            "354 Start mail input; end with <CRLF>.<CRLF>"
        );
        c.send(MESSAGE).await;
        assert_eq!(
            c.reply().await,
            format!("250 2.0.0 OK <quote-1@contoso.example> [Hostname={MAILBOX_HOSTNAME}]")
        );
        assert_eq!(c.cmd("RSET").await, "250 2.0.0 Resetting");
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
        assert_eq!(
            c.cmd("QUIT").await,
            "221 2.0.0 Service closing transmission channel"
        );

        assert_eq!(server.received_count(), 1);
        let mail = server.received().remove(0);
        let expected = format!("user={USER}\x01auth=Bearer {TOKEN}\x01\x01");
        assert_eq!(mail.auth_raw.as_deref(), Some(expected.as_bytes()));
        assert_eq!(mail.auth_user.as_deref(), Some(USER));
        assert_eq!(mail.message_id.as_deref(), Some("quote-1@contoso.example"));
        assert_eq!(mail.mail_from, "alice@contoso.example");
        assert_eq!(mail.rcpt_to, vec!["dana@fabrikam.example".to_string()]);
        assert!(!mail.tls);
        let body = String::from_utf8(mail.data).expect("utf8");
        assert!(
            body.ends_with("Hello Dana,\r\n.stuffed line\r\n"),
            "{body:?}"
        );
        assert_eq!(
            server.count_by_message_id().get("quote-1@contoso.example"),
            Some(&1)
        );
        assert_eq!(server.max_concurrent_connections_for(USER), 1);
        eventually("the connection to close", || {
            server.current_connections() == 0
        })
        .await;
        assert_eq!(server.connections_opened(), 1);
    }

    #[tokio::test]
    async fn only_crlf_dot_crlf_ends_the_content() {
        let server = SmtpServer::start(plain(None)).await.expect("start");
        let mut c = Client::greeted(&server).await;
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
            .await;
        c.cmd("MAIL FROM:<alice@contoso.example>").await;
        c.cmd("RCPT TO:<dana@fabrikam.example>").await;
        c.cmd("DATA").await;
        // A `.` after a bare LF, and one after CRLF but followed by a bare LF, are content.
        c.send("Subject: Dots\r\n\r\nfirst\n.\nsecond\r\n.\nthird\r\n.\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 2.0.0 OK"));
        let body = String::from_utf8(server.received().remove(0).data).expect("utf8");
        assert!(
            body.ends_with("\r\n\r\nfirst\n.\nsecond\r\n\nthird\r\n"),
            "{body:?}"
        );
    }

    #[tokio::test]
    async fn the_two_step_xoauth2_form_works_and_ehlo_advertises_exchange_extensions() {
        let server = SmtpServer::start(plain(Some(strict())))
            .await
            .expect("start");
        let mut c = Client::connect(&server).await;
        c.reply().await;
        let ehlo = c.cmd("EHLO client.example").await;
        assert_eq!(
            ehlo,
            format!(
                "250-{SERVER_HOSTNAME} Hello [127.0.0.1]\r\n250-SIZE 35882577\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME"
            )
        );
        assert_eq!(c.cmd("AUTH XOAUTH2").await, "334");
        assert_eq!(
            c.cmd(&xoauth2(USER, TOKEN)).await,
            "235 2.7.0 Authentication successful"
        );
        assert_eq!(
            c.cmd("AUTH XOAUTH2").await,
            "503 5.5.2 Already authenticated"
        );
        assert_eq!(
            c.cmd("FOO bar").await,
            "500 5.3.3 Unrecognized command 'FOO'"
        );
    }

    #[tokio::test]
    async fn a_rejected_or_malformed_token_gets_535_and_mail_needs_auth() {
        let server = SmtpServer::start(plain(Some(strict())))
            .await
            .expect("start");
        let mut c = Client::greeted(&server).await;
        let reply = c.cmd("MAIL FROM:<alice@contoso.example>").await;
        assert!(
            reply.starts_with("530 5.7.57 Client not authenticated to send mail. ["),
            "{reply}"
        );
        let reply = c
            .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "expired")))
            .await;
        assert!(
            reply.starts_with("535 5.7.3 Authentication unsuccessful"),
            "{reply}"
        );
        let malformed = base64::engine::general_purpose::STANDARD
            .encode(format!("user={USER}\x01auth=Bearer {TOKEN}\x01"));
        let reply = c.cmd(&format!("AUTH XOAUTH2 {malformed}")).await;
        assert!(
            reply.starts_with("535 5.7.3 Authentication unsuccessful"),
            "{reply}"
        );
        let reply = c.cmd("AUTH XOAUTH2 not-base64!").await;
        assert!(
            reply.starts_with("535 5.7.3 Authentication unsuccessful"),
            "{reply}"
        );
        assert_eq!(
            c.cmd("AUTH PLAIN AGFsaWNlAHB3").await,
            "504 5.7.4 Unrecognized authentication type"
        );
        assert_eq!(server.max_concurrent_connections_for(USER), 0);
        assert_eq!(server.received_count(), 0);
    }

    #[tokio::test]
    async fn a_refused_token_gets_the_error_challenge_then_535_after_the_empty_line() {
        let server = SmtpServer::start(SmtpConfig {
            xoauth2_error_challenge: true,
            ..plain(Some(strict()))
        })
        .await
        .expect("start");
        let mut c = Client::greeted(&server).await;
        assert_eq!(
            c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "stale")))
                .await,
            XOAUTH2_ERROR_CHALLENGE
        );
        let json = base64::engine::general_purpose::STANDARD
            .decode(XOAUTH2_ERROR_CHALLENGE.trim_start_matches("334 "))
            .expect("base64");
        assert_eq!(
            json,
            br#"{"status":"401","schemes":"bearer","scope":"mail"}"#.to_vec()
        );
        assert_eq!(c.cmd("").await, XOAUTH2_CHALLENGE_FINAL_REPLY);
        // A client that answers the challenge with anything but an empty line is noted.
        assert_eq!(
            c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "stale")))
                .await,
            XOAUTH2_ERROR_CHALLENGE
        );
        assert_eq!(c.cmd("RSET").await, XOAUTH2_CHALLENGE_FINAL_REPLY);
        // A good token is accepted at once.
        assert_eq!(
            c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, TOKEN)))
                .await,
            "235 2.7.0 Authentication successful"
        );
        let attempts = server.auth_attempts();
        let acks: Vec<_> = attempts.iter().map(|a| a.challenge_acknowledged).collect();
        assert_eq!(acks, vec![Some(true), Some(false), None]);
        assert_eq!(attempts[0].reply, XOAUTH2_CHALLENGE_FINAL_REPLY);
        assert_eq!(attempts[2].user.as_deref(), Some(USER));
    }

    #[tokio::test]
    async fn with_the_rfc_limit_a_long_auth_line_is_refused_and_the_two_step_form_works() {
        let server = SmtpServer::start(SmtpConfig {
            max_command_line: Some(RFC_COMMAND_LINE_LIMIT),
            ..plain(None)
        })
        .await
        .expect("start");
        let long = "t".repeat(2400);
        let mut c = Client::greeted(&server).await;
        let line = format!("AUTH XOAUTH2 {}", xoauth2(USER, &long));
        assert!(line.len() + 2 > RFC_COMMAND_LINE_LIMIT);
        assert_eq!(c.cmd(&line).await, "500 5.5.2 Line too long");
        assert_eq!(server.long_lines_refused(), 1);
        // The connection stays usable; exactly 1,000 octets pass.
        let fits = format!("NOOP {}", "x".repeat(RFC_COMMAND_LINE_LIMIT - 7));
        assert_eq!(fits.len() + 2, RFC_COMMAND_LINE_LIMIT);
        assert_eq!(c.cmd(&fits).await, "250 2.0.0 OK");
        // The response after the 334 is not a command line: it may be long.
        assert_eq!(c.cmd("AUTH XOAUTH2").await, "334");
        assert_eq!(
            c.cmd(&xoauth2(USER, &long)).await,
            "235 2.7.0 Authentication successful"
        );
        let attempts = server.auth_attempts();
        assert_eq!(attempts.len(), 1);
        assert!(attempts[0].two_step);
        assert_eq!(attempts[0].auth_line_octets, "AUTH XOAUTH2\r\n".len());
    }

    #[tokio::test]
    async fn an_injected_432_at_mail_from_is_answered_once() {
        let server = SmtpServer::start(plain(None)).await.expect("start");
        server.inject(
            Injected::Reply {
                stage: Stage::MailFrom,
                reply: SENDER_THREAD_LIMIT_REPLY.into(),
            },
            1,
        );
        let mut c = Client::greeted(&server).await;
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "any")))
            .await;
        assert_eq!(
            c.cmd("MAIL FROM:<alice@contoso.example>").await,
            SENDER_THREAD_LIMIT_REPLY
        );
        assert_eq!(
            c.cmd("MAIL FROM:<alice@contoso.example>").await,
            "250 2.1.0 Sender OK"
        );
    }

    #[tokio::test]
    async fn drop_mid_data_closes_without_recording_and_drop_after_data_records() {
        let server = SmtpServer::start(plain(None)).await.expect("start");
        server.inject(Injected::DropMidData, 1);
        let mut c = Client::greeted(&server).await;
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "any")))
            .await;
        c.cmd("MAIL FROM:<alice@contoso.example>").await;
        c.cmd("RCPT TO:<dana@fabrikam.example>").await;
        assert!(c.cmd("DATA").await.starts_with("354 "));
        let _ = c.writer.write_all(MESSAGE.as_bytes()).await;
        assert_eq!(c.reply().await, "", "closed without a final reply");
        assert_eq!(server.received_count(), 0);

        server.inject(Injected::DropAfterData, 1);
        let mut c = Client::greeted(&server).await;
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "any")))
            .await;
        c.cmd("MAIL FROM:<alice@contoso.example>").await;
        c.cmd("RCPT TO:<dana@fabrikam.example>").await;
        assert!(c.cmd("DATA").await.starts_with("354 "));
        c.send(MESSAGE).await;
        assert_eq!(c.reply().await, "", "closed without a final reply");
        assert_eq!(server.received_count(), 1, "it may have been delivered");
    }

    #[tokio::test]
    async fn pipelined_sends_limits_and_refused_connections() {
        let server = SmtpServer::start(SmtpConfig {
            max_message_bytes: 100,
            ..plain(None)
        })
        .await
        .expect("start");
        let mut c = Client::greeted(&server).await;
        c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "any")))
            .await;
        assert!(
            c.cmd("MAIL FROM:<a@contoso.example> SIZE=101")
                .await
                .starts_with("552 5.3.4 Message size exceeds fixed maximum message size")
        );
        // Pipelined: all replies come, in order.
        c.send("MAIL FROM:<a@contoso.example>\r\nRCPT TO:<b@fabrikam.example>\r\nDATA\r\n")
            .await;
        assert_eq!(c.reply().await, "250 2.1.0 Sender OK");
        assert_eq!(c.reply().await, "250 2.1.5 Recipient OK");
        assert!(c.reply().await.starts_with("354 "));
        c.send(&format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(200)))
            .await;
        assert_eq!(
            c.reply().await,
            "552 5.3.4 Message size exceeds fixed maximum message size"
        );
        c.cmd("MAIL FROM:<a@contoso.example>").await;
        for i in 0..MAX_RECIPIENTS_PER_MESSAGE {
            c.send(&format!("RCPT TO:<r{i}@fabrikam.example>\r\n"))
                .await;
        }
        for _ in 0..MAX_RECIPIENTS_PER_MESSAGE {
            assert_eq!(c.reply().await, "250 2.1.5 Recipient OK");
        }
        assert_eq!(
            c.cmd("RCPT TO:<one-too-many@fabrikam.example>").await,
            "452 4.5.3 Too many recipients"
        );
        assert_eq!(server.received_count(), 0);

        server.inject(Injected::RefuseConnection, 1);
        let mut refused = Client::connect(&server).await;
        assert_eq!(refused.reply().await, "");
        let _ok = Client::greeted(&server).await;
        assert_eq!(server.connections_opened(), 3);
    }

    #[tokio::test]
    async fn a_fourth_session_of_one_user_is_throttled_at_mail_from() {
        let server = SmtpServer::start(plain(None)).await.expect("start");
        server.set_connection_limit_per_user(Some(3));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut c = Client::greeted(&server).await;
            assert!(
                c.cmd(&format!("AUTH XOAUTH2 {}", xoauth2(USER, "any")))
                    .await
                    .starts_with("235")
            );
            clients.push(c);
        }
        assert_eq!(
            clients[3].cmd("MAIL FROM:<alice@contoso.example>").await,
            SENDER_THREAD_LIMIT_REPLY
        );
        assert_eq!(server.max_concurrent_connections_for(USER), 4);
        // One of the others leaves: the fourth may send now.
        let first = clients.remove(0);
        drop(first);
        eventually("the first session to end", || {
            server.current_connections() == 3
        })
        .await;
        assert_eq!(
            clients[2].cmd("MAIL FROM:<alice@contoso.example>").await,
            "250 2.1.0 Sender OK"
        );
    }

    #[tokio::test]
    async fn starttls_then_xoauth2_with_the_ca_of_the_server() {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

        let server = SmtpServer::start(SmtpConfig {
            validator: Some(strict()),
            ..SmtpConfig::default()
        })
        .await
        .expect("start");
        let tcp = TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .expect("connect");
        let mut plain_io = BufReader::new(tcp);
        let mut line = String::new();
        plain_io.read_line(&mut line).await.expect("greeting");
        assert!(line.starts_with("220 "));
        plain_io
            .get_mut()
            .write_all(b"EHLO client.example\r\n")
            .await
            .expect("write");
        let mut ehlo = String::new();
        loop {
            let mut l = String::new();
            plain_io.read_line(&mut l).await.expect("ehlo");
            ehlo.push_str(&l);
            if l.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
        assert!(!ehlo.contains("AUTH"), "no AUTH before TLS: {ehlo}");
        plain_io
            .get_mut()
            .write_all(format!("AUTH XOAUTH2 {}\r\n", xoauth2(USER, TOKEN)).as_bytes())
            .await
            .expect("write");
        line.clear();
        plain_io.read_line(&mut line).await.expect("auth");
        assert_eq!(line, "504 5.7.4 Unrecognized authentication type\r\n");
        plain_io
            .get_mut()
            .write_all(b"STARTTLS\r\n")
            .await
            .expect("write");
        line.clear();
        plain_io.read_line(&mut line).await.expect("starttls");
        assert_eq!(line, "220 2.0.0 SMTP server ready\r\n");

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).expect("pem"))
            .expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = connector
            .connect(
                ServerName::try_from("localhost").expect("name"),
                plain_io.into_inner(),
            )
            .await
            .expect("handshake");
        let (r, w) = tokio::io::split(tls);
        let mut r = BufReader::new(r);
        let mut w = w;
        let mut exchange = async |text: &str| -> String {
            w.write_all(text.as_bytes()).await.expect("write");
            let mut all = String::new();
            loop {
                let mut l = String::new();
                r.read_line(&mut l).await.expect("read");
                all.push_str(&l);
                if l.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        };
        let ehlo = exchange("EHLO client.example\r\n").await;
        assert!(ehlo.contains("250-AUTH LOGIN XOAUTH2\r\n"), "{ehlo}");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        assert!(
            exchange(&format!("AUTH XOAUTH2 {}\r\n", xoauth2(USER, TOKEN)))
                .await
                .starts_with("235 2.7.0")
        );
        exchange("MAIL FROM:<alice@contoso.example>\r\n").await;
        exchange("RCPT TO:<dana@fabrikam.example>\r\n").await;
        exchange("DATA\r\n").await;
        assert!(
            exchange(MESSAGE)
                .await
                .starts_with("250 2.0.0 OK <quote-1@")
        );
        let mail = server.received().remove(0);
        assert!(mail.tls);
        server.stop().await;
        assert_eq!(server.current_connections(), 0);
    }
}

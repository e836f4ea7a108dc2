//! A simulated Microsoft Graph mail API (`https://graph.microsoft.com/v1.0`) for the end-to-end
//! tests, the benchmarks and the demo: `sendMail` in its MIME and JSON forms, drafts with upload
//! sessions for large attachments (and deleting a draft), the Sent Items and Drafts lookups by
//! `internetMessageId`, and the limits
//! and errors of ../shared/MICROSOFT.md ("Microsoft Graph mail (second transport)").
//!
//! It serves plain HTTP on loopback; the module calls `{base_url}/v1.0/...`. Bearer tokens are
//! judged by a [`GraphValidator`] (`IdentityPlatform::graph_validator` accepts the identity
//! simulator's Graph tokens). [`GraphServer::inject`] plays Graph's errors, and the two failures
//! that leave a sender in doubt: the mail taken but no answer, or the connection dropped.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::dev::{Extensions, ServerHandle};
use actix_web::http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::identity::guid;
use crate::smtp::{MAILBOX_HOSTNAME, header_value, parse_message_id};

/// Largest request body Graph takes, in bytes: 4 MB (MICROSOFT.md, "Request size limit 4 MB").
/// Larger: `413 ErrorMessageSizeExceeded`.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Requests in flight at once per app and mailbox (MICROSOFT.md, "Limits per app and
/// mailbox"); one more gets `429 ApplicationThrottled` ("... over its MailboxConcurrency limit").
pub const MAX_CONCURRENT_REQUESTS: usize = 4;
/// Requests per app and mailbox in [`REQUEST_WINDOW`] (MICROSOFT.md); see
/// [`GraphServer::set_rate_limit`].
pub const MAX_REQUESTS_PER_WINDOW: usize = 10_000;
/// The window of [`MAX_REQUESTS_PER_WINDOW`]: 10 minutes.
pub const REQUEST_WINDOW: Duration = Duration::from_secs(600);
/// Bytes uploaded per app and mailbox in [`UPLOAD_WINDOW`]: 150 MB (MICROSOFT.md). Request
/// bodies and upload-URL ranges both count; beyond, `429 ApplicationThrottled` ("... over its
/// IncomingBytes limit") with `Retry-After`.
pub const MAX_UPLOAD_BYTES_PER_WINDOW: usize = 150 * 1024 * 1024;
/// The window of [`MAX_UPLOAD_BYTES_PER_WINDOW`]: 5 minutes.
pub const UPLOAD_WINDOW: Duration = Duration::from_secs(300);
/// Largest attachment an upload session takes: 150 MB (Microsoft Learn, "Attach large files to
/// Outlook messages or events").
pub const MAX_ATTACHMENT_BYTES: usize = 150 * 1024 * 1024;
/// Smallest attachment an upload session takes: 3 MB; smaller answers `400
/// ErrorAttachmentSizeShouldNotBeLessThanMinimumSize` (same page, "Errors").
pub const MIN_UPLOAD_SESSION_BYTES: usize = 3 * 1024 * 1024;
/// Largest byte range one `PUT` to an upload URL carries: 4 MB (Microsoft Learn,
/// "attachment: createUploadSession": "up to 4 MB each time").
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// `Retry-After` seconds of a MailboxConcurrency refusal (Microsoft documents no figure).
pub const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;
/// Microsoft Graph's own application id, named in the `WWW-Authenticate` of a 401.
const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
/// How long an upload URL stays valid (Microsoft gives a few hours; not enforced).
const UPLOAD_URL_LIFETIME_HOURS: i64 = 6;
/// Longest request body read at all; the limits above are judged after reading.
const MAX_BODY_READ: usize = 160 * 1024 * 1024;

/// Who a bearer token stands for, as the validator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphPrincipal {
    /// The signed-in user's UPN or address (delegated tokens); `None` for app-only tokens.
    pub user: Option<String>,
    /// The granted scopes as issued, e.g. `https://graph.microsoft.com/Mail.Send`, `Mail.Read`,
    /// `https://graph.microsoft.com/.default`; compared on the last path segment,
    /// case-insensitively.
    pub scopes: Vec<String>,
    /// Whether the token came from the client-credentials grant (application permissions,
    /// taken as granted on every mailbox).
    pub app_only: bool,
}

/// Judges a bearer token: `Some` principal when it is a live Graph token, `None` for `401
/// InvalidAuthenticationToken`.
pub type GraphValidator = Arc<dyn Fn(&str) -> Option<GraphPrincipal> + Send + Sync>;

/// A failure [`GraphServer::inject`] plays instead of the normal answer. Send-only faults
/// apply to `sendMail` and `messages/{id}/send`; the others to any authenticated `/v1.0`
/// request (never to upload URLs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphFault {
    /// `400 ErrorInvalidRecipients` (send-only).
    InvalidRecipients,
    /// `403 ErrorAccessDenied` (consent missing or an application access policy).
    AccessDenied,
    /// `403 ErrorSendAsDenied` (send-only).
    SendAsDenied,
    /// `404 MailboxNotEnabledForRESTAPI` (mailbox on-premises, inactive or unlicensed).
    MailboxNotEnabledForRestApi,
    /// `507 ErrorQuotaExceeded`, the mailbox is full (sends and draft creation).
    QuotaExceeded,
    /// `429 ApplicationThrottled` with `Retry-After: retry_after_secs`.
    Throttled {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// `503 serviceNotAvailable`.
    ServiceUnavailable,
    /// `504 UnknownError`, a gateway timeout.
    GatewayTimeout,
    /// `401 InvalidAuthenticationToken` ("Lifetime validation failed, the token is expired.").
    TokenExpired,
    /// The mail is taken and kept in Sent Items, then no answer: the request is held for
    /// `hold` and the connection closed (send-only).
    TimeoutAfterAccepting {
        /// How long to hold the request before closing the connection.
        hold: Duration,
    },
    /// The connection is closed without an answer and nothing is kept (send-only).
    DropBeforeAccepting,
}

impl GraphFault {
    /// The HTTP status it answers with; `None` when it answers nothing.
    pub fn status(&self) -> Option<u16> {
        self.error().map(|e| e.status)
    }

    /// The `error.code` it answers with; `None` when it answers nothing.
    pub fn code(&self) -> Option<&'static str> {
        self.error().map(|e| e.code)
    }

    fn error(&self) -> Option<GraphError> {
        Some(match self {
            GraphFault::InvalidRecipients => GraphError::invalid_recipients(),
            GraphFault::AccessDenied => GraphError::access_denied(),
            GraphFault::SendAsDenied => GraphError::new(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
            ),
            GraphFault::MailboxNotEnabledForRestApi => GraphError::new(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            ),
            GraphFault::QuotaExceeded => GraphError::new(
                507,
                "ErrorQuotaExceeded",
                "Mailbox has exceeded maximum mailbox size.",
            ),
            GraphFault::Throttled { retry_after_secs } => {
                GraphError::throttled("request", *retry_after_secs)
            }
            GraphFault::ServiceUnavailable => GraphError::unavailable(),
            GraphFault::GatewayTimeout => GraphError::new(
                504,
                "UnknownError",
                "The gateway did not receive a timely response from the upstream server.",
            ),
            GraphFault::TokenExpired => {
                GraphError::invalid_token("Lifetime validation failed, the token is expired.")
            }
            GraphFault::TimeoutAfterAccepting { .. } | GraphFault::DropBeforeAccepting => {
                return None;
            }
        })
    }

    fn applies_to(&self, op: &Op) -> bool {
        match self {
            GraphFault::InvalidRecipients
            | GraphFault::SendAsDenied
            | GraphFault::TimeoutAfterAccepting { .. }
            | GraphFault::DropBeforeAccepting => op.is_send(),
            GraphFault::QuotaExceeded => op.is_send() || matches!(op, Op::CreateDraft),
            _ => true,
        }
    }
}

/// How a mail reached Sent Items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPath {
    /// `POST .../sendMail`.
    SendMail,
    /// `POST .../messages` (a draft), attachments, then `POST .../messages/{id}/send`.
    DraftSend,
}

/// One mail the server sent.
#[derive(Clone, Debug)]
pub struct GraphSentMail {
    /// The mailbox it was sent from (lower case; an alias resolved).
    pub mailbox: String,
    /// Its item id in Sent Items.
    pub id: String,
    /// Its `Message-ID` without `<>` (from the MIME or the JSON, else one Exchange made up).
    pub internet_message_id: Option<String>,
    /// Its subject, RFC 2047 encoded-words decoded (as Graph gives `subject`).
    pub subject: String,
    /// The decoded MIME message, byte for byte (empty for the JSON form).
    pub mime: Vec<u8>,
    /// The JSON `message` of the JSON form.
    pub json: Option<Value>,
    /// Attachments added to the draft: (name, content type, bytes).
    pub attachments: Vec<(String, String, Vec<u8>)>,
    /// Which way it was sent.
    pub via: SendPath,
    /// Whether it was saved to Sent Items (`saveToSentItems: false` of the JSON form).
    pub saved_to_sent_items: bool,
    /// The `request-id` of the request that sent it.
    pub request_id: String,
    /// The `client-request-id` of that request (the client's, else one made up).
    pub client_request_id: String,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
}

/// One request the server saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphRequestLog {
    /// `GET`, `POST`, `PUT`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The status answered; 0 when the connection was closed without an answer.
    pub status: u16,
    /// The `error.code` of an error answer.
    pub code: Option<String>,
    /// The mailbox it was about, once known (lower case).
    pub mailbox: Option<String>,
    /// Its `request-id`.
    pub request_id: String,
}

/// A message's content as submitted.
#[derive(Clone)]
struct Content {
    mime: Vec<u8>,
    json: Option<Value>,
    internet_message_id: String,
    subject: String,
    has_recipients: bool,
    save_to_sent_items: bool,
}

struct Draft {
    mailbox: String,
    content: Content,
    created: DateTime<Utc>,
    attachments: Vec<(String, String, Vec<u8>)>,
}

struct UploadSession {
    token: String,
    mailbox: String,
    draft_id: String,
    name: String,
    content_type: String,
    size: usize,
    data: Vec<u8>,
    expires: DateTime<Utc>,
}

#[derive(Default)]
struct Usage {
    in_flight: usize,
    peak: usize,
    requests: VecDeque<Instant>,
    uploads: VecDeque<(Instant, usize)>,
}

struct State {
    validator: GraphValidator,
    down: bool,
    faults: VecDeque<(GraphFault, usize)>,
    aliases: HashMap<String, String>,
    usage: HashMap<String, Usage>,
    rate_limit: (usize, Duration),
    max_message_bytes: Option<usize>,
    /// How long each request under `/v1.0` takes once admitted.
    processing: Duration,
    drafts: HashMap<String, Draft>,
    sessions: HashMap<String, UploadSession>,
    sent: Vec<GraphSentMail>,
    log: Vec<GraphRequestLog>,
}

impl State {
    /// The mailbox an address or UPN names: lower case, an alias resolved.
    fn canonical(&self, address: &str) -> String {
        let lower = address.to_ascii_lowercase();
        self.aliases.get(&lower).cloned().unwrap_or(lower)
    }

    /// Takes one use of the first queued fault that applies to `op`.
    fn take_fault(&mut self, op: &Op) -> Option<GraphFault> {
        let index = self.faults.iter().position(|(f, _)| f.applies_to(op))?;
        let (fault, left) = &mut self.faults[index];
        let taken = fault.clone();
        *left -= 1;
        if *left == 0 {
            self.faults.remove(index);
        }
        Some(taken)
    }
}

struct Shared {
    state: Mutex<State>,
    base_url: String,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulated Graph mail API, serving on loopback until stopped or dropped.
pub struct GraphServer {
    shared: Arc<Shared>,
    handle: Mutex<Option<ServerHandle>>,
}

impl GraphServer {
    /// Starts on `127.0.0.1` and a free port, judging tokens with `validator`.
    pub async fn start(validator: GraphValidator) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", validator).await
    }

    /// Starts on `bind` (`host:port`).
    pub async fn start_on(bind: &str, validator: GraphValidator) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(bind)
            .with_context(|| format!("binding the simulated Graph server to {bind}"))?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                validator,
                down: false,
                faults: VecDeque::new(),
                aliases: HashMap::new(),
                usage: HashMap::new(),
                rate_limit: (MAX_REQUESTS_PER_WINDOW, REQUEST_WINDOW),
                max_message_bytes: Some(crate::smtp::EXCHANGE_MAX_MESSAGE_BYTES),
                processing: Duration::ZERO,
                drafts: HashMap::new(),
                sessions: HashMap::new(),
                sent: Vec::new(),
                log: Vec::new(),
            }),
            base_url,
        });
        let handle = serve(listener, shared.clone())?;
        tracing::debug!(base_url = %shared.base_url, "simulated Microsoft Graph started");
        Ok(Self {
            shared,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// The base URL (`http://127.0.0.1:PORT`); the API is under `{base_url}/v1.0`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Stops serving; open connections are closed.
    pub async fn stop(&self) {
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            handle.stop(false).await;
        }
    }

    /// Judges tokens with `validator` from now on.
    pub fn set_validator(&self, validator: GraphValidator) {
        self.shared.state().validator = validator;
    }

    /// Plays `fault` on the next `times` requests it applies to (see [`GraphFault`]).
    pub fn inject(&self, fault: GraphFault, times: usize) {
        if times > 0 {
            self.shared.state().faults.push_back((fault, times));
        }
    }

    /// Forgets every queued fault.
    pub fn clear_injections(&self) {
        self.shared.state().faults.clear();
    }

    /// How many injected faults are still to be played.
    pub fn injections_left(&self) -> usize {
        self.shared.state().faults.iter().map(|(_, n)| n).sum()
    }

    /// While down, every request (upload URLs too) is answered `503 serviceNotAvailable`
    /// before its token is looked at, as Graph's front door does when the service is away;
    /// nothing is kept.
    pub fn set_down(&self, down: bool) {
        self.shared.state().down = down;
    }

    /// Makes each admitted request take `each` before it is answered (real Graph takes tens to
    /// hundreds of milliseconds), so that concurrent requests overlap; default none.
    pub fn set_processing_time(&self, each: Duration) {
        self.shared.state().processing = each;
    }

    /// Allows `requests` per mailbox in `window` (default [`MAX_REQUESTS_PER_WINDOW`] in
    /// [`REQUEST_WINDOW`]); beyond, `429 ApplicationThrottled` with `Retry-After`.
    pub fn set_rate_limit(&self, requests: usize, window: Duration) {
        self.shared.state().rate_limit = (requests, window);
    }

    /// The largest message a draft send takes, MIME plus attachments, in bytes (default
    /// Exchange Online's 35 MB; `None`: no limit). Larger: `413 ErrorMessageSizeExceeded`.
    pub fn set_max_message_size(&self, bytes: Option<usize>) {
        self.shared.state().max_message_bytes = bytes;
    }

    /// Makes `alias` (e.g. a UPN) name `mailbox` (e.g. the primary address): requests and
    /// tokens naming either reach the same mailbox.
    pub fn add_alias(&self, alias: &str, mailbox: &str) {
        self.shared
            .state()
            .aliases
            .insert(alias.to_ascii_lowercase(), mailbox.to_ascii_lowercase());
    }

    /// The mails in `mailbox`'s Sent Items (an alias resolved, case-insensitive), in order.
    pub fn sent_items(&self, mailbox: &str) -> Vec<GraphSentMail> {
        let state = self.shared.state();
        let mailbox = state.canonical(mailbox);
        state
            .sent
            .iter()
            .filter(|m| m.mailbox == mailbox && m.saved_to_sent_items)
            .cloned()
            .collect()
    }

    /// Every mail sent, from every mailbox, in order (also those not saved to Sent Items).
    pub fn all_sent(&self) -> Vec<GraphSentMail> {
        self.shared.state().sent.clone()
    }

    /// How many times each `Message-ID` (without `<>`) was sent; duplicates count above 1.
    pub fn count_by_message_id(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for id in self
            .shared
            .state()
            .sent
            .iter()
            .filter_map(|m| m.internet_message_id.clone())
        {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Every request so far, in the order they were answered.
    pub fn requests(&self) -> Vec<GraphRequestLog> {
        self.shared.state().log.clone()
    }

    /// The most requests for `mailbox` that were in flight at once, counting one refused
    /// with MailboxConcurrency (so a client that keeps to the limit never shows more than 4).
    pub fn max_concurrent_for(&self, mailbox: &str) -> usize {
        let state = self.shared.state();
        let mailbox = state.canonical(mailbox);
        state.usage.get(&mailbox).map_or(0, |u| u.peak)
    }

    /// How many requests for `mailbox` are in flight now.
    pub fn in_flight_for(&self, mailbox: &str) -> usize {
        let state = self.shared.state();
        let mailbox = state.canonical(mailbox);
        state.usage.get(&mailbox).map_or(0, |u| u.in_flight)
    }

    /// How many drafts `mailbox` holds.
    pub fn draft_count(&self, mailbox: &str) -> usize {
        let state = self.shared.state();
        let mailbox = state.canonical(mailbox);
        state
            .drafts
            .values()
            .filter(|d| d.mailbox == mailbox)
            .count()
    }
}

impl Drop for GraphServer {
    fn drop(&mut self) {
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            // The stop command is sent at the call; the returned future only waits for it.
            drop(handle.stop(false));
        }
    }
}

/// Serves the API on `listener`.
fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<ServerHandle> {
    let data = web::Data::new(shared);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(MAX_BODY_READ))
            .default_service(web::to(handle))
    })
    .workers(1)
    .disable_signals()
    .on_connect(keep_socket)
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(handle)
}

/// A second handle on a connection's socket, to close it without an answer.
struct Socket(std::net::TcpStream);

/// Keeps a duplicate of each connection's socket in its connection data.
fn keep_socket(connection: &dyn Any, data: &mut Extensions) {
    #[cfg(unix)]
    if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsFd as _;
        if let Ok(fd) = tcp.as_fd().try_clone_to_owned() {
            data.insert(Socket(std::net::TcpStream::from(fd)));
        }
    }
    #[cfg(not(unix))]
    let _ = (connection, data);
}

/// Closes the request's connection at once: the client gets no answer.
fn drop_connection(req: &HttpRequest) {
    match req.conn_data::<Socket>() {
        Some(socket) => {
            let _ = socket.0.shutdown(std::net::Shutdown::Both);
        }
        None => tracing::warn!("no socket to drop for the simulated Graph request"),
    }
}

/// A Graph error answer: `{"error":{"code","message","innerError":{...}}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GraphError {
    status: u16,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl GraphError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid_token(message: &str) -> Self {
        Self::new(401, "InvalidAuthenticationToken", message)
    }

    fn access_denied() -> Self {
        Self::new(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        )
    }

    fn invalid_recipients() -> Self {
        Self::new(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
        )
    }

    fn not_found() -> Self {
        Self::new(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "ErrorMessageSizeExceeded", message)
    }

    /// `429 ApplicationThrottled`: "Application is over its {what} limit."
    fn throttled(what: &str, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs),
            ..Self::new(
                429,
                "ApplicationThrottled",
                format!("Application is over its {what} limit."),
            )
        }
    }

    fn unavailable() -> Self {
        Self::new(
            503,
            "serviceNotAvailable",
            "The service is temporarily unavailable for maintenance or is overloaded.",
        )
    }

    fn response(&self, ids: &Ids) -> HttpResponse {
        let body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "innerError": {
                "date": Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
                "request-id": ids.request,
                "client-request-id": ids.client,
            },
        }});
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = HttpResponse::build(status).json(body);
        if let Some(secs) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(RETRY_AFTER, value);
        }
        if self.status == 401 {
            let challenge = format!(
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"{GRAPH_APP_ID}\""
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(actix_web::http::header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// The `request-id` Graph gives a request and the `client-request-id` it echoes.
struct Ids {
    request: String,
    client: String,
}

impl Ids {
    fn of(req: &HttpRequest) -> Self {
        let client = req
            .headers()
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(guid);
        Self {
            request: guid(),
            client,
        }
    }

    fn stamp(&self, response: &mut HttpResponse) {
        for (name, value) in [
            ("request-id", &self.request),
            ("client-request-id", &self.client),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                response.headers_mut().insert(
                    actix_web::http::header::HeaderName::from_static(name),
                    value,
                );
            }
        }
    }
}

/// Whose mailbox a request names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Me,
    User(String),
}

/// What a `/v1.0` request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    SendMail,
    CreateDraft,
    AddAttachment(String),
    CreateUploadSession(String),
    SendDraft(String),
    ListMessages(String),
    DeleteMessage(String),
}

/// The permission an operation needs on the mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Send,
    ReadWrite,
    Read,
}

impl Op {
    fn is_send(&self) -> bool {
        matches!(self, Op::SendMail | Op::SendDraft(_))
    }

    /// Microsoft Learn's least-privileged delegated permission of each call.
    fn need(&self) -> Need {
        match self {
            Op::SendMail | Op::SendDraft(_) => Need::Send,
            Op::CreateDraft
            | Op::AddAttachment(_)
            | Op::CreateUploadSession(_)
            | Op::DeleteMessage(_) => Need::ReadWrite,
            Op::ListMessages(_) => Need::Read,
        }
    }
}

/// `%XX` decoded (path segments; `+` stays).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mailbox and operation of a `/v1.0` path; Graph matches its segments case-insensitively.
fn parse_route(method: &Method, path: &str) -> Result<(Target, Op), GraphError> {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let not_found = || {
        let last = segments.last().cloned().unwrap_or_default();
        GraphError::bad_request(format!("Resource not found for the segment '{last}'."))
    };
    if !matches!(lower.first().map(String::as_str), Some("v1.0" | "beta")) {
        return Err(GraphError::bad_request("Invalid version."));
    }
    let (target, rest) = match lower.get(1).map(String::as_str) {
        Some("me") => (Target::Me, 2),
        Some("users") if segments.len() > 2 => (Target::User(segments[2].clone()), 3),
        _ => return Err(not_found()),
    };
    let tail: Vec<&str> = lower[rest..].iter().map(String::as_str).collect();
    let id = |i: usize| segments[rest + i].clone();
    let op = match (method.as_str(), tail.as_slice()) {
        ("POST", ["sendmail"]) => Op::SendMail,
        ("POST", ["messages"]) => Op::CreateDraft,
        ("POST", ["messages", _, "attachments"]) => Op::AddAttachment(id(1)),
        ("POST", ["messages", _, "attachments", "createuploadsession"]) => {
            Op::CreateUploadSession(id(1))
        }
        ("POST", ["messages", _, "send"]) => Op::SendDraft(id(1)),
        ("GET", ["mailfolders", folder, "messages"]) => Op::ListMessages(folder.to_string()),
        ("DELETE", ["messages", _]) => Op::DeleteMessage(id(1)),
        _ => return Err(not_found()),
    };
    Ok((target, op))
}

/// The principal of the request's bearer token, or `401 InvalidAuthenticationToken`.
fn authenticate(shared: &Shared, req: &HttpRequest) -> Result<GraphPrincipal, GraphError> {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(GraphError::invalid_token("Access token is empty."));
    };
    let validator = shared.state().validator.clone();
    validator(token).ok_or_else(|| {
        GraphError::invalid_token("Access token validation failure. Invalid audience.")
    })
}

/// Whether any granted scope's last path segment is one of `wanted`.
fn has_scope(principal: &GraphPrincipal, wanted: &[&str]) -> bool {
    principal.scopes.iter().any(|scope| {
        let name = scope.rsplit('/').next().unwrap_or(scope);
        wanted.iter().any(|w| name.eq_ignore_ascii_case(w))
    })
}

/// Whether `principal` may do what `need` says on its own mailbox or another one. The
/// `.Shared` permissions cover the user's own mailbox too; app-only tokens are taken to hold
/// the application permission.
fn permitted(principal: &GraphPrincipal, own: bool, need: Need) -> bool {
    if principal.app_only {
        return true;
    }
    let wanted: &[&str] = match (need, own) {
        (Need::Send, true) => &["Mail.Send", "Mail.Send.Shared"],
        (Need::Send, false) => &["Mail.Send.Shared"],
        (Need::ReadWrite, true) => &["Mail.ReadWrite", "Mail.ReadWrite.Shared"],
        (Need::ReadWrite, false) => &["Mail.ReadWrite.Shared"],
        (Need::Read, true) => &[
            "Mail.Read",
            "Mail.ReadWrite",
            "Mail.Read.Shared",
            "Mail.ReadWrite.Shared",
        ],
        (Need::Read, false) => &["Mail.Read.Shared", "Mail.ReadWrite.Shared"],
    };
    has_scope(principal, wanted)
}

/// A request's slot in its mailbox's limits; frees it when dropped (answered or abandoned).
struct Slot {
    shared: Arc<Shared>,
    mailbox: String,
}

impl Slot {
    /// Takes a slot, or the `429` of the limit the request is over: concurrency, requests in
    /// the window, uploaded bytes in the window.
    fn take(shared: &Arc<Shared>, mailbox: &str, bytes: usize) -> Result<Self, GraphError> {
        let mut state = shared.state();
        let (limit, window) = state.rate_limit;
        let usage = state.usage.entry(mailbox.to_string()).or_default();
        usage.peak = usage.peak.max(usage.in_flight + 1);
        if usage.in_flight >= MAX_CONCURRENT_REQUESTS {
            return Err(GraphError::throttled(
                "MailboxConcurrency",
                CONCURRENCY_RETRY_AFTER_SECS,
            ));
        }
        let now = Instant::now();
        count_bytes(usage, now, bytes)?;
        while usage
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            usage.requests.pop_front();
        }
        if usage.requests.len() >= limit {
            let oldest = usage.requests.front().copied().unwrap_or(now);
            return Err(GraphError::throttled(
                "request",
                seconds_until(window, now.duration_since(oldest)),
            ));
        }
        usage.requests.push_back(now);
        usage.in_flight += 1;
        Ok(Self {
            shared: shared.clone(),
            mailbox: mailbox.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(usage) = self.shared.state().usage.get_mut(&self.mailbox) {
            usage.in_flight = usage.in_flight.saturating_sub(1);
        }
    }
}

/// Whole seconds (at least 1) until `elapsed` reaches `window`.
fn seconds_until(window: Duration, elapsed: Duration) -> u64 {
    let left = window.saturating_sub(elapsed);
    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
}

/// Counts `bytes` against the upload allowance of the window, or answers the IncomingBytes 429.
fn count_bytes(usage: &mut Usage, now: Instant, bytes: usize) -> Result<(), GraphError> {
    while usage
        .uploads
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) >= UPLOAD_WINDOW)
    {
        usage.uploads.pop_front();
    }
    let used: usize = usage.uploads.iter().map(|(_, n)| n).sum();
    if bytes > 0 && used + bytes > MAX_UPLOAD_BYTES_PER_WINDOW {
        let oldest = usage.uploads.front().map_or(now, |(t, _)| *t);
        return Err(GraphError::throttled(
            "IncomingBytes",
            seconds_until(UPLOAD_WINDOW, now.duration_since(oldest)),
        ));
    }
    if bytes > 0 {
        usage.uploads.push_back((now, bytes));
    }
    Ok(())
}

/// What the handler does with a request: answer, or close the connection without a word.
enum Reply {
    Answer(HttpResponse),
    Drop,
}

/// Every request: the upload URLs and the `/v1.0` API, logged.
async fn handle(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Arc<Shared>>,
) -> HttpResponse {
    let shared = shared.get_ref().clone();
    let ids = Ids::of(&req);
    let mut mailbox = None;
    let result = if req.path().to_ascii_lowercase().starts_with("/api/v2.0/") {
        upload(&shared, &req, &body, &mut mailbox)
    } else {
        api(&shared, &req, &body, &ids, &mut mailbox).await
    };
    let (response, status, code) = match result {
        Ok(Reply::Answer(mut response)) => {
            ids.stamp(&mut response);
            let status = response.status().as_u16();
            (response, status, None)
        }
        Ok(Reply::Drop) => {
            drop_connection(&req);
            (HttpResponse::Accepted().finish(), 0, None)
        }
        Err(error) => {
            let mut response = error.response(&ids);
            ids.stamp(&mut response);
            (response, error.status, Some(error.code.to_string()))
        }
    };
    shared.state().log.push(GraphRequestLog {
        method: req.method().to_string(),
        path: req.path().to_string(),
        status,
        code,
        mailbox,
        request_id: ids.request,
    });
    response
}

/// A `/v1.0` request: route, token, mailbox, limits, faults, permission, then the work.
async fn api(
    shared: &Arc<Shared>,
    req: &HttpRequest,
    body: &[u8],
    ids: &Ids,
    mailbox_seen: &mut Option<String>,
) -> Result<Reply, GraphError> {
    if shared.state().down {
        return Err(GraphError::unavailable());
    }
    let (target, op) = parse_route(req.method(), req.path())?;
    let principal = authenticate(shared, req)?;
    let (mailbox, own) = {
        let state = shared.state();
        let user = principal.user.as_deref().map(|u| state.canonical(u));
        let mailbox = match (&target, &user) {
            (Target::Me, Some(user)) if !principal.app_only => user.clone(),
            (Target::Me, _) => {
                return Err(GraphError::bad_request(
                    "/me request is only valid with delegated authentication flow.",
                ));
            }
            (Target::User(id), _) => state.canonical(id),
        };
        let own = user.as_deref() == Some(mailbox.as_str());
        (mailbox, own)
    };
    *mailbox_seen = Some(mailbox.clone());
    if body.len() > MAX_REQUEST_BYTES {
        return Err(GraphError::too_large(format!(
            "The request body is {} bytes; the maximum is {MAX_REQUEST_BYTES} bytes (4 MB). Use a draft and an upload session for large attachments.",
            body.len()
        )));
    }
    let _slot = Slot::take(shared, &mailbox, body.len())?;
    // Graph takes its time with a request (the slot stays taken meanwhile).
    let processing = shared.state().processing;
    if !processing.is_zero() {
        tokio::time::sleep(processing).await;
    }
    let fault = shared.state().take_fault(&op);
    if let Some(error) = fault.as_ref().and_then(GraphFault::error) {
        return Err(error);
    }
    if fault == Some(GraphFault::DropBeforeAccepting) {
        return Ok(Reply::Drop);
    }
    if !permitted(&principal, own, op.need()) {
        return Err(GraphError::access_denied());
    }
    let call = Call {
        shared,
        req,
        body,
        ids,
        mailbox: &mailbox,
    };
    let response = call.perform(&op)?;
    if let Some(GraphFault::TimeoutAfterAccepting { hold }) = fault {
        tokio::time::sleep(hold).await;
        return Ok(Reply::Drop);
    }
    Ok(Reply::Answer(response))
}

/// An admitted `/v1.0` request on `mailbox`.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    req: &'a HttpRequest,
    body: &'a [u8],
    ids: &'a Ids,
    mailbox: &'a str,
}

impl Call<'_> {
    fn perform(&self, op: &Op) -> Result<HttpResponse, GraphError> {
        match op {
            Op::SendMail => self.send_mail(),
            Op::CreateDraft => self.create_draft(),
            Op::AddAttachment(id) => self.add_attachment(id),
            Op::CreateUploadSession(id) => self.create_upload_session(id),
            Op::SendDraft(id) => self.send_draft(id),
            Op::ListMessages(folder) => self.list_messages(folder),
            Op::DeleteMessage(id) => self.delete_message(id),
        }
    }

    /// `DELETE .../messages/{id}`: `204 No Content`, the draft gone; `404 ErrorItemNotFound`
    /// for an id that is not one of the mailbox's drafts (the simulator keeps no other item
    /// that could be deleted).
    fn delete_message(&self, id: &str) -> Result<HttpResponse, GraphError> {
        let mut state = self.shared.state();
        draft_of(&mut state, self.mailbox, id)?;
        state.drafts.remove(id);
        Ok(HttpResponse::NoContent().finish())
    }

    /// `POST .../sendMail`: `202 Accepted`, no body; the mail kept as sent.
    fn send_mail(&self) -> Result<HttpResponse, GraphError> {
        let content = read_content(self.req, self.body, true)?;
        if !content.has_recipients {
            return Err(GraphError::invalid_recipients());
        }
        let mut state = self.shared.state();
        record_sent(
            &mut state,
            self.mailbox,
            content,
            Vec::new(),
            SendPath::SendMail,
            self.ids,
        );
        Ok(HttpResponse::Accepted().finish())
    }

    /// `POST .../messages`: `201 Created` with the draft.
    fn create_draft(&self) -> Result<HttpResponse, GraphError> {
        let content = read_content(self.req, self.body, false)?;
        let id = item_id();
        let draft = Draft {
            mailbox: self.mailbox.to_string(),
            content,
            created: Utc::now(),
            attachments: Vec::new(),
        };
        let mut body = message_json(&id, &draft.content, draft.created, true);
        body["@odata.context"] = json!(format!(
            "{}/v1.0/$metadata#users('{}')/messages/$entity",
            self.shared.base_url, self.mailbox
        ));
        self.shared.state().drafts.insert(id, draft);
        Ok(HttpResponse::Created().json(body))
    }

    /// `POST .../messages/{id}/attachments` with a `fileAttachment` (`contentBytes` base64).
    fn add_attachment(&self, draft_id: &str) -> Result<HttpResponse, GraphError> {
        let body: Value = parse_json(self.body)?;
        let name = body["name"].as_str().unwrap_or("attachment").to_string();
        let content_type = body["contentType"]
            .as_str()
            .unwrap_or("application/octet-stream")
            .to_string();
        let bytes = body["contentBytes"]
            .as_str()
            .and_then(|b| STANDARD.decode(b).ok())
            .ok_or_else(|| {
                GraphError::new(
                    400,
                    "ErrorInvalidRequest",
                    "contentBytes is missing or is not base64.",
                )
            })?;
        let size = bytes.len();
        let mut state = self.shared.state();
        let draft = draft_of(&mut state, self.mailbox, draft_id)?;
        draft
            .attachments
            .push((name.clone(), content_type.clone(), bytes));
        Ok(HttpResponse::Created().json(json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": item_id(),
            "name": name,
            "contentType": content_type,
            "size": size,
            "isInline": false,
        })))
    }

    /// `POST .../messages/{id}/attachments/createUploadSession`: `201 Created` with the
    /// `uploadSession` (`uploadUrl`, `expirationDateTime`, `nextExpectedRanges: ["0-"]`).
    fn create_upload_session(&self, draft_id: &str) -> Result<HttpResponse, GraphError> {
        let body: Value = parse_json(self.body)?;
        let item = body
            .get("AttachmentItem")
            .or_else(|| body.get("attachmentItem"))
            .ok_or_else(|| GraphError::bad_request("AttachmentItem is required."))?;
        if item["attachmentType"].as_str() != Some("file") {
            return Err(GraphError::bad_request("attachmentType must be 'file'."));
        }
        let name = item["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| GraphError::bad_request("AttachmentItem.name is required."))?;
        let size = item["size"]
            .as_u64()
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| GraphError::bad_request("AttachmentItem.size is required."))?;
        check_upload_size(size)?;
        let content_type = item["contentType"]
            .as_str()
            .unwrap_or("application/octet-stream");
        let session_id = item_id();
        let token = format!("{}{}", guid().replace('-', ""), guid().replace('-', ""));
        let expires = Utc::now() + chrono::Duration::hours(UPLOAD_URL_LIFETIME_HOURS);
        let mut state = self.shared.state();
        draft_of(&mut state, self.mailbox, draft_id)?;
        let user: String = url::form_urlencoded::byte_serialize(self.mailbox.as_bytes()).collect();
        let upload_url = format!(
            "{}/api/v2.0/Users('{user}')/Messages('{draft_id}')/AttachmentSessions('{session_id}')?authtoken={token}",
            self.shared.base_url
        );
        state.sessions.insert(
            session_id,
            UploadSession {
                token,
                mailbox: self.mailbox.to_string(),
                draft_id: draft_id.to_string(),
                name: name.to_string(),
                content_type: content_type.to_string(),
                size,
                data: Vec::with_capacity(size),
                expires,
            },
        );
        Ok(HttpResponse::Created().json(json!({
            "@odata.context": format!("{}/v1.0/$metadata#microsoft.graph.uploadSession", self.shared.base_url),
            "uploadUrl": upload_url,
            "expirationDateTime": expires.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "nextExpectedRanges": ["0-"],
        })))
    }

    /// `POST .../messages/{id}/send`: `202 Accepted`; the draft, with its attachments, moves to
    /// Sent Items. Upload sessions left unfinished are dropped.
    fn send_draft(&self, draft_id: &str) -> Result<HttpResponse, GraphError> {
        let mut state = self.shared.state();
        let max = state.max_message_bytes;
        let draft = draft_of(&mut state, self.mailbox, draft_id)?;
        if !draft.content.has_recipients {
            return Err(GraphError::invalid_recipients());
        }
        let total = draft.content.mime.len()
            + draft
                .attachments
                .iter()
                .map(|(_, _, b)| b.len())
                .sum::<usize>();
        if let Some(max) = max
            && total > max
        {
            return Err(GraphError::too_large(format!(
                "The message exceeds the maximum supported size: {total} bytes, the mailbox takes {max}., Cannot save changes made to an item to store."
            )));
        }
        let Some(draft) = state.drafts.remove(draft_id) else {
            return Err(GraphError::not_found());
        };
        state.sessions.retain(|_, s| s.draft_id != draft_id);
        record_sent(
            &mut state,
            self.mailbox,
            draft.content,
            draft.attachments,
            SendPath::DraftSend,
            self.ids,
        );
        Ok(HttpResponse::Accepted().finish())
    }

    /// `GET .../mailFolders/{SentItems|Drafts}/messages[?$filter=internetMessageId eq '<id>']`:
    /// `200` with `value` (`$select` and the rest of the query are ignored).
    fn list_messages(&self, folder: &str) -> Result<HttpResponse, GraphError> {
        let wanted = parse_filter(self.req.query_string())?;
        let top = parse_top(self.req.query_string())?;
        let matches = |id: &str| wanted.as_deref().is_none_or(|w| w == format!("<{id}>"));
        let state = self.shared.state();
        let mut value: Vec<Value> = match folder.to_ascii_lowercase().as_str() {
            // Newest first, as Graph lists a folder by default.
            "sentitems" => state
                .sent
                .iter()
                .rev()
                .filter(|m| m.mailbox == self.mailbox && m.saved_to_sent_items)
                .filter(|m| m.internet_message_id.as_deref().is_some_and(matches))
                .map(|m| {
                    json!({
                        "id": m.id,
                        "internetMessageId": format!("<{}>", m.internet_message_id.as_deref().unwrap_or_default()),
                        "sentDateTime": m.sent_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        "isDraft": false,
                    })
                })
                .collect(),
            "drafts" => state
                .drafts
                .iter()
                .filter(|(_, d)| d.mailbox == self.mailbox)
                .filter(|(_, d)| matches(&d.content.internet_message_id))
                .map(|(id, d)| message_json(id, &d.content, d.created, true))
                .collect(),
            _ => return Err(GraphError::not_found()),
        };
        if let Some(top) = top {
            value.truncate(top);
        }
        Ok(HttpResponse::Ok().json(json!({
            "@odata.context": format!("{}/v1.0/$metadata#users('{}')/mailFolders('{folder}')/messages", self.shared.base_url, self.mailbox),
            "value": value,
        })))
    }
}

/// The draft `id` of `mailbox`, or `404 ErrorItemNotFound`.
fn draft_of<'s>(
    state: &'s mut State,
    mailbox: &str,
    id: &str,
) -> Result<&'s mut Draft, GraphError> {
    state
        .drafts
        .get_mut(id)
        .filter(|d| d.mailbox == mailbox)
        .ok_or_else(GraphError::not_found)
}

/// An attachment size an upload session takes, or the error Microsoft gives for it.
fn check_upload_size(size: usize) -> Result<(), GraphError> {
    if size < MIN_UPLOAD_SESSION_BYTES {
        return Err(GraphError::new(
            400,
            "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
            "Attachment size must be greater than the minimum size.",
        ));
    }
    if size > MAX_ATTACHMENT_BYTES {
        return Err(GraphError::too_large(format!(
            "The attachment is {size} bytes; an upload session takes at most {MAX_ATTACHMENT_BYTES} (150 MB)."
        )));
    }
    Ok(())
}

/// A Graph item id (opaque, base64-like, as Exchange's are).
fn item_id() -> String {
    format!("AAMkAGI2{}AAA=", guid().replace('-', ""))
}

fn parse_json(body: &[u8]) -> Result<Value, GraphError> {
    serde_json::from_slice(body).map_err(|_| {
        GraphError::bad_request(
            "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
        )
    })
}

/// A message as submitted: base64 MIME (`Content-Type: text/plain`) or JSON (anything else,
/// as Graph reads it). `wrapped`: the JSON is `{"message":{...},"saveToSentItems":...}`
/// (sendMail) rather than the message itself (a draft).
fn read_content(req: &HttpRequest, body: &[u8], wrapped: bool) -> Result<Content, GraphError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if content_type == "text/plain" {
        let text: Vec<u8> = body
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let mime = STANDARD.decode(text).map_err(|_| {
            GraphError::new(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        })?;
        let has_recipients = ["to", "cc", "bcc"]
            .iter()
            .any(|h| header_value(&mime, h).is_some_and(|v| !v.is_empty()));
        return Ok(Content {
            internet_message_id: parse_message_id(&mime).unwrap_or_else(made_up_message_id),
            subject: header_value(&mime, "subject")
                .map(|v| decode_encoded_words(&v))
                .unwrap_or_default(),
            mime,
            json: None,
            has_recipients,
            save_to_sent_items: true,
        });
    }
    let body = parse_json(body)?;
    let (message, save) = if wrapped {
        let save = body["saveToSentItems"].as_bool().unwrap_or(true);
        match body.get("message") {
            Some(m) if m.is_object() => (m.clone(), save),
            _ => {
                return Err(GraphError::bad_request(
                    "The message parameter is required.",
                ));
            }
        }
    } else {
        (body, true)
    };
    let has_recipients = ["toRecipients", "ccRecipients", "bccRecipients"]
        .iter()
        .any(|k| message[*k].as_array().is_some_and(|a| !a.is_empty()));
    let internet_message_id = message["internetMessageId"]
        .as_str()
        .map(|id| {
            id.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .filter(|id| !id.is_empty())
        .unwrap_or_else(made_up_message_id);
    Ok(Content {
        mime: Vec::new(),
        subject: message["subject"].as_str().unwrap_or_default().to_string(),
        json: Some(message),
        internet_message_id,
        has_recipients,
        save_to_sent_items: save,
    })
}

/// A `Message-ID` (without `<>`) as Exchange makes one for a message that has none.
fn made_up_message_id() -> String {
    format!(
        "{}@{MAILBOX_HOSTNAME}",
        guid().replace('-', "").to_ascii_uppercase()
    )
}

/// The summary of a message Graph answers with.
fn message_json(id: &str, content: &Content, when: DateTime<Utc>, draft: bool) -> Value {
    json!({
        "id": id,
        "internetMessageId": format!("<{}>", content.internet_message_id),
        "subject": content.subject,
        "createdDateTime": when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "isDraft": draft,
    })
}

fn record_sent(
    state: &mut State,
    mailbox: &str,
    content: Content,
    attachments: Vec<(String, String, Vec<u8>)>,
    via: SendPath,
    ids: &Ids,
) {
    state.sent.push(GraphSentMail {
        mailbox: mailbox.to_string(),
        id: item_id(),
        internet_message_id: Some(content.internet_message_id),
        subject: content.subject,
        mime: content.mime,
        json: content.json,
        attachments,
        via,
        saved_to_sent_items: content.save_to_sent_items,
        request_id: ids.request.clone(),
        client_request_id: ids.client.clone(),
        sent_at: Utc::now(),
    });
}

/// The value of `$filter=internetMessageId eq '<id>'` (OData quoting: `''` is `'`), `None`
/// without a filter, `400` for any other filter.
fn parse_filter(query: &str) -> Result<Option<String>, GraphError> {
    let Some(filter) = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case("$filter"))
        .map(|(_, v)| v.into_owned())
    else {
        return Ok(None);
    };
    let invalid = || GraphError::bad_request(format!("Invalid filter clause: {filter}"));
    let rest = filter.trim();
    let field = "internetmessageid";
    if rest.len() < field.len() || !rest[..field.len()].eq_ignore_ascii_case(field) {
        return Err(invalid());
    }
    let rest = rest[field.len()..].trim_start();
    let rest = rest
        .strip_prefix("eq ")
        .or_else(|| rest.strip_prefix("EQ "))
        .ok_or_else(invalid)?
        .trim();
    let quoted = rest
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .ok_or_else(invalid)?;
    Ok(Some(quoted.replace("''", "'")))
}

/// The value of `$top` (how many items a list answers at most), `None` without one, `400` for
/// one that is not a whole number.
fn parse_top(query: &str) -> Result<Option<usize>, GraphError> {
    let Some(top) = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case("$top"))
        .map(|(_, v)| v.into_owned())
    else {
        return Ok(None);
    };
    top.trim().parse::<usize>().map(Some).map_err(|_| {
        GraphError::bad_request(format!(
            "Invalid $top value '{top}': it must be a non-negative integer."
        ))
    })
}

/// A header value with its RFC 2047 encoded-words (`=?UTF-8?B?...?=`, `=?UTF-8?Q?...?=`)
/// decoded; whitespace between two encoded-words is dropped. Other charsets and broken words
/// stay as they are.
fn decode_encoded_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, word) = rest.split_at(start);
        let decoded = decode_encoded_word(word);
        match decoded {
            Some((text, len)) => {
                if !(after_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &word[len..];
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &word[2..];
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of the encoded-word `word` starts with (`=?charset?encoding?text?=`) and its
/// length; `None` when it is not one this decodes.
fn decode_encoded_word(word: &str) -> Option<(String, usize)> {
    let inner = word.strip_prefix("=?")?;
    let (charset, rest) = inner.split_once('?')?;
    let (encoding, rest) = rest.split_once('?')?;
    let end = rest.find("?=")?;
    let text = &rest[..end];
    let charset = charset.split('*').next().unwrap_or(charset);
    if !(charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("us-ascii")) {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => STANDARD.decode(text).ok()?,
        "Q" | "q" => decode_q(text)?,
        _ => return None,
    };
    let len = word.len() - rest.len() + end + 2;
    Some((String::from_utf8(bytes).ok()?, len))
}

/// The bytes of an RFC 2047 "Q" encoded text (`_` is a space, `=XX` a byte).
fn decode_q(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => out.push(b' '),
            b'=' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

/// `bytes {start}-{end}/{total}`.
fn parse_content_range(value: &str) -> Option<(usize, usize, usize)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

/// The session id in `.../AttachmentSessions('{id}')`.
fn session_id(path: &str) -> Option<String> {
    let last = percent_decode(path.trim_end_matches('/').rsplit('/').next()?);
    let prefix = "attachmentsessions('";
    if last.len() <= prefix.len() || !last[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    last[prefix.len()..].strip_suffix("')").map(str::to_string)
}

/// A request to an upload URL: `PUT` a byte range (`200` with `nextExpectedRanges`, then
/// `201` with `Location` once complete), or `DELETE` the session (`204`). The URL carries its
/// own token; an `Authorization` header is refused, as Microsoft says not to send one.
fn upload(
    shared: &Arc<Shared>,
    req: &HttpRequest,
    body: &[u8],
    mailbox_seen: &mut Option<String>,
) -> Result<Reply, GraphError> {
    let mut state = shared.state();
    if state.down {
        return Err(GraphError::unavailable());
    }
    if req.headers().contains_key(AUTHORIZATION) {
        return Err(GraphError::invalid_token(
            "The upload URL is pre-authenticated; do not send an Authorization header with it.",
        ));
    }
    let id = session_id(req.path()).ok_or_else(GraphError::not_found)?;
    let token = url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "authtoken")
        .map(|(_, v)| v.into_owned());
    let session = state.sessions.get(&id).ok_or_else(GraphError::not_found)?;
    if token.as_deref() != Some(session.token.as_str()) || session.expires < Utc::now() {
        return Err(GraphError::invalid_token(
            "Access token validation failure. The upload URL's token is not valid.",
        ));
    }
    *mailbox_seen = Some(session.mailbox.clone());
    match *req.method() {
        Method::DELETE => {
            state.sessions.remove(&id);
            Ok(Reply::Answer(HttpResponse::NoContent().finish()))
        }
        Method::PUT => put_range(shared, &mut state, req, &id, body).map(Reply::Answer),
        _ => Err(GraphError::new(
            405,
            "ErrorInvalidRequest",
            "The upload URL takes PUT and DELETE.",
        )),
    }
}

/// One byte range of an upload session; they must come in order.
fn put_range(
    shared: &Shared,
    state: &mut State,
    req: &HttpRequest,
    id: &str,
    body: &[u8],
) -> Result<HttpResponse, GraphError> {
    let range = req
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_content_range)
        .ok_or_else(|| {
            GraphError::new(
                400,
                "ErrorInvalidRequest",
                "Content-Range must be 'bytes {start}-{end}/{total}'.",
            )
        })?;
    let (start, end, total) = range;
    let Some(session) = state.sessions.get(id) else {
        return Err(GraphError::not_found());
    };
    let mailbox = session.mailbox.clone();
    if total != session.size || end < start || end >= total || body.len() != end - start + 1 {
        return Err(GraphError::new(
            400,
            "ErrorInvalidRequest",
            format!(
                "Content-Range bytes {start}-{end}/{total} does not match the {} bytes sent or the session's size {}.",
                body.len(),
                session.size
            ),
        ));
    }
    if body.len() > MAX_UPLOAD_CHUNK_BYTES {
        return Err(GraphError::too_large(format!(
            "A byte range carries at most {MAX_UPLOAD_CHUNK_BYTES} bytes (4 MB)."
        )));
    }
    if start != session.data.len() {
        return Err(GraphError::new(
            416,
            "ErrorInvalidRange",
            format!(
                "The next expected range starts at byte {}; bytes must be uploaded in order.",
                session.data.len()
            ),
        ));
    }
    count_bytes(
        state.usage.entry(mailbox).or_default(),
        Instant::now(),
        body.len(),
    )?;
    let Some(session) = state.sessions.get_mut(id) else {
        return Err(GraphError::not_found());
    };
    session.data.extend_from_slice(body);
    if session.data.len() < session.size {
        return Ok(HttpResponse::Ok().json(json!({
            "@odata.context": format!("{}/api/v2.0/$metadata#AttachmentSessions/$entity", shared.base_url),
            "expirationDateTime": session.expires.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "nextExpectedRanges": [session.data.len().to_string()],
        })));
    }
    let Some(done) = state.sessions.remove(id) else {
        return Err(GraphError::not_found());
    };
    let draft = draft_of(state, &done.mailbox, &done.draft_id)?;
    draft
        .attachments
        .push((done.name, done.content_type, done.data));
    let location = format!(
        "{}/api/v2.0/Users('{}')/Messages('{}')/Attachments('{}')",
        shared.base_url,
        url::form_urlencoded::byte_serialize(done.mailbox.as_bytes()).collect::<String>(),
        done.draft_id,
        item_id()
    );
    Ok(HttpResponse::Created()
        .insert_header(("Location", location))
        .finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AppRegistration, IdentityPlatform};

    const ALICE: &str = "alice@contoso.example";
    const SALES: &str = "sales@contoso.example";
    const MB: usize = 1024 * 1024;

    /// Tokens by name: `send` (Mail.Send), `send-read` (Mail.Send, Mail.ReadWrite), `shared`
    /// (the .Shared permissions), all Alice's; `app` (app-only `.default`).
    fn validator() -> GraphValidator {
        Arc::new(|token: &str| {
            let delegated = |scopes: &[&str]| {
                Some(GraphPrincipal {
                    user: Some(ALICE.to_string()),
                    scopes: scopes
                        .iter()
                        .map(|s| format!("https://graph.microsoft.com/{s}"))
                        .collect(),
                    app_only: false,
                })
            };
            match token {
                "send" => delegated(&["Mail.Send"]),
                "send-read" => delegated(&["Mail.Send", "Mail.ReadWrite"]),
                "shared" => delegated(&["Mail.Send.Shared", "Mail.ReadWrite.Shared"]),
                "app" => Some(GraphPrincipal {
                    user: None,
                    scopes: vec!["https://graph.microsoft.com/.default".into()],
                    app_only: true,
                }),
                _ => None,
            }
        })
    }

    async fn server() -> GraphServer {
        GraphServer::start(validator()).await.expect("start")
    }

    fn message(id: &str) -> Vec<u8> {
        format!(
            "From: Alice <{ALICE}>\r\nTo: dana@fabrikam.example\r\nSubject: Quote\r\nMessage-ID:\r\n <{id}>\r\n\r\nHello Dana,\r\n"
        )
        .into_bytes()
    }

    async fn send_mime(
        server: &GraphServer,
        path: &str,
        token: &str,
        mime: &[u8],
    ) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1.0/{path}", server.base_url()))
            .bearer_auth(token)
            .header("Content-Type", "text/plain")
            .body(STANDARD.encode(mime))
            .send()
            .await
            .expect("request")
    }

    async fn search(server: &GraphServer, path: &str, token: &str, id: &str) -> reqwest::Response {
        let filter: String =
            url::form_urlencoded::byte_serialize(format!("internetMessageId eq '{id}'").as_bytes())
                .collect();
        reqwest::Client::new()
            .get(format!(
                "{}/v1.0/{path}/mailFolders/SentItems/messages?$filter={filter}&$select=id,internetMessageId",
                server.base_url()
            ))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// The status and `error` object of an error answer, after checking Graph's shape.
    async fn error_of(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        assert!(response.headers().contains_key("request-id"));
        let body: Value = response.json().await.expect("a JSON error");
        let error = body["error"].clone();
        assert!(error["code"].is_string(), "{body}");
        assert!(error["message"].is_string(), "{body}");
        let inner = &error["innerError"];
        for key in ["date", "request-id", "client-request-id"] {
            assert!(inner[key].is_string(), "{key} in {body}");
        }
        (status, error)
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_mime_send_is_accepted_and_kept_byte_for_byte() {
        let server = server().await;
        let mime = message("quote-1@contoso.example");
        let response = send_mime(&server, "me/sendMail", "send", &mime).await;
        assert_eq!(response.status().as_u16(), 202);
        let request_id = response
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("request-id");
        assert!(response.bytes().await.expect("body").is_empty());
        let sent = server.sent_items(ALICE);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].mime, mime);
        assert_eq!(
            sent[0].internet_message_id.as_deref(),
            Some("quote-1@contoso.example")
        );
        assert_eq!(sent[0].via, SendPath::SendMail);
        assert_eq!(sent[0].request_id, request_id);
        assert!(sent[0].attachments.is_empty());
        assert_eq!(
            server.count_by_message_id().get("quote-1@contoso.example"),
            Some(&1)
        );
        let log = server.requests();
        assert_eq!(log.len(), 1);
        assert_eq!(
            (log[0].method.as_str(), log[0].path.as_str(), log[0].status),
            ("POST", "/v1.0/me/sendMail", 202)
        );
        assert_eq!(log[0].mailbox.as_deref(), Some(ALICE));
    }

    #[tokio::test]
    async fn a_json_send_is_kept_and_save_to_sent_items_is_honoured() {
        let server = server().await;
        let client = reqwest::Client::new();
        let url = format!("{}/v1.0/me/sendMail", server.base_url());
        let mail = |save: bool| {
            json!({"message": {
                "subject": "Quote",
                "body": {"contentType": "Text", "content": "Hello"},
                "toRecipients": [{"emailAddress": {"address": "dana@fabrikam.example"}}],
            }, "saveToSentItems": save})
        };
        for save in [true, false] {
            let response = client
                .post(&url)
                .bearer_auth("send")
                .json(&mail(save))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status().as_u16(), 202);
        }
        let sent = server.sent_items(ALICE);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].json.is_some() && sent[0].mime.is_empty());
        assert!(sent[0].internet_message_id.is_some());
        assert_eq!(server.all_sent().len(), 2);
    }

    #[tokio::test]
    async fn no_recipients_bad_base64_and_unknown_paths_are_refused() {
        let server = server().await;
        let lonely = b"From: alice@contoso.example\r\nSubject: x\r\n\r\nHi\r\n";
        let (status, error) =
            error_of(send_mime(&server, "me/sendMail", "send", lonely).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("ErrorInvalidRecipients"))
        );
        let response = reqwest::Client::new()
            .post(format!("{}/v1.0/me/sendMail", server.base_url()))
            .bearer_auth("send")
            .header("Content-Type", "text/plain")
            .body("not base64!")
            .send()
            .await
            .expect("request");
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("ErrorMimeContentInvalidBase64String"))
        );
        let (status, error) =
            error_of(send_mime(&server, "me/sendMessage", "send", lonely).await).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("BadRequest")));
        assert!(server.all_sent().is_empty());
    }

    #[tokio::test]
    async fn a_request_over_4_mb_gets_413() {
        let server = server().await;
        let mut mime = message("big@contoso.example");
        mime.extend(std::iter::repeat_n(b'a', 3 * MB + MB / 10));
        assert!(STANDARD.encode(&mime).len() > MAX_REQUEST_BYTES);
        let response = send_mime(&server, "me/sendMail", "send", &mime).await;
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (413, Some("ErrorMessageSizeExceeded"))
        );
        assert!(server.all_sent().is_empty());
    }

    /// Creates a draft from `mime` in Alice's mailbox; its id.
    async fn draft(server: &GraphServer, mime: &[u8]) -> String {
        let response = send_mime(server, "me/messages", "send-read", mime).await;
        assert_eq!(response.status().as_u16(), 201);
        let body: Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_string()
    }

    /// Opens an upload session on draft `id`; its upload URL.
    async fn upload_session(server: &GraphServer, id: &str, size: usize) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!(
                "{}/v1.0/me/messages/{id}/attachments/createUploadSession",
                server.base_url()
            ))
            .bearer_auth("send-read")
            .json(&json!({"AttachmentItem": {
                "attachmentType": "file", "name": "catalogue.pdf", "size": size,
                "contentType": "application/pdf",
            }}))
            .send()
            .await
            .expect("request")
    }

    async fn put(url: &str, bytes: &[u8], start: usize, total: usize) -> reqwest::Response {
        reqwest::Client::new()
            .put(url)
            .header("Content-Type", "application/octet-stream")
            .header(
                "Content-Range",
                format!("bytes {start}-{}/{total}", start + bytes.len() - 1),
            )
            .body(bytes.to_vec())
            .send()
            .await
            .expect("request")
    }

    #[tokio::test]
    async fn a_large_attachment_goes_through_a_draft_and_an_upload_session() {
        let server = server().await;
        let mime = message("big-1@contoso.example");
        let id = draft(&server, &mime).await;
        let size = 10 * MB;
        let file: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let response = upload_session(&server, &id, size).await;
        assert_eq!(response.status().as_u16(), 201);
        let session: Value = response.json().await.expect("json");
        assert_eq!(session["nextExpectedRanges"], json!(["0-"]));
        assert!(session["expirationDateTime"].is_string());
        let url = session["uploadUrl"]
            .as_str()
            .expect("uploadUrl")
            .to_string();
        assert!(url.starts_with(&server.base_url()), "{url}");
        let mut start = 0;
        for chunk in file.chunks(MAX_UPLOAD_CHUNK_BYTES) {
            let response = put(&url, chunk, start, size).await;
            start += chunk.len();
            if start < size {
                assert_eq!(response.status().as_u16(), 200);
                let body: Value = response.json().await.expect("json");
                assert_eq!(body["nextExpectedRanges"], json!([start.to_string()]));
            } else {
                assert_eq!(response.status().as_u16(), 201);
                assert!(response.headers().contains_key("location"));
            }
        }
        assert!(server.sent_items(ALICE).is_empty());
        let response = reqwest::Client::new()
            .post(format!("{}/v1.0/me/messages/{id}/send", server.base_url()))
            .bearer_auth("send-read")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 202);
        let sent = server.sent_items(ALICE);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].via, SendPath::DraftSend);
        assert_eq!(sent[0].mime, mime);
        assert_eq!(
            sent[0].attachments,
            vec![(
                "catalogue.pdf".to_string(),
                "application/pdf".to_string(),
                file
            )]
        );
        assert_eq!(server.draft_count(ALICE), 0);
        let (status, error) = error_of(
            reqwest::Client::new()
                .post(format!("{}/v1.0/me/messages/{id}/send", server.base_url()))
                .bearer_auth("send-read")
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_eq!(
            (status, error["code"].as_str()),
            (404, Some("ErrorItemNotFound"))
        );
    }

    #[tokio::test]
    async fn upload_sessions_keep_microsofts_rules() {
        let server = server().await;
        let id = draft(&server, &message("rules@contoso.example")).await;
        let (status, error) = error_of(upload_session(&server, &id, MB).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (
                400,
                Some("ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
            )
        );
        let (status, _) =
            error_of(upload_session(&server, &id, MAX_ATTACHMENT_BYTES + 1).await).await;
        assert_eq!(status, 413);
        let size = 9 * MB;
        let session: Value = upload_session(&server, &id, size)
            .await
            .json()
            .await
            .expect("json");
        let url = session["uploadUrl"]
            .as_str()
            .expect("uploadUrl")
            .to_string();
        let chunk = vec![7u8; 2 * MB];
        let with_bearer = reqwest::Client::new()
            .put(&url)
            .bearer_auth("send-read")
            .header(
                "Content-Range",
                format!("bytes 0-{}/{size}", chunk.len() - 1),
            )
            .body(chunk.clone())
            .send()
            .await
            .expect("request");
        let (status, error) = error_of(with_bearer).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("InvalidAuthenticationToken"))
        );
        let (status, _) = error_of(put(&url, &vec![7u8; 5 * MB], 0, size).await).await;
        assert_eq!(status, 413);
        let (status, _) = error_of(put(&url, &chunk, MB, size).await).await;
        assert_eq!(status, 416);
        let forged = url.replace("authtoken=", "authtoken=x");
        let (status, _) = error_of(put(&forged, &chunk, 0, size).await).await;
        assert_eq!(status, 401);
        assert_eq!(put(&url, &chunk, 0, size).await.status().as_u16(), 200);
        let small = reqwest::Client::new()
            .post(format!(
                "{}/v1.0/me/messages/{id}/attachments",
                server.base_url()
            ))
            .bearer_auth("send-read")
            .json(
                &json!({"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt",
                "contentType": "text/plain", "contentBytes": STANDARD.encode("hello")}),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(small.status().as_u16(), 201);
        let (status, error) =
            error_of(send_mime(&server, "me/messages", "send", b"To: x@y\r\n\r\n").await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("ErrorAccessDenied"))
        );
    }

    #[tokio::test]
    async fn sent_items_are_found_by_internet_message_id() {
        let server = server().await;
        let mime = message("found@contoso.example");
        assert_eq!(
            send_mime(&server, "me/sendMail", "send", &mime)
                .await
                .status()
                .as_u16(),
            202
        );
        let response = search(&server, "me", "send-read", "<found@contoso.example>").await;
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("json");
        let value = body["value"].as_array().expect("value");
        assert_eq!(value.len(), 1);
        assert_eq!(value[0]["internetMessageId"], "<found@contoso.example>");
        assert_eq!(
            value[0]["id"].as_str(),
            Some(server.sent_items(ALICE)[0].id.as_str())
        );
        for absent in ["<missing@contoso.example>", "found@contoso.example"] {
            let body: Value = search(&server, "me", "send-read", absent)
                .await
                .json()
                .await
                .expect("json");
            assert_eq!(body["value"], json!([]), "{absent}");
        }
        let by_address = format!("users/{ALICE}");
        let response = search(&server, &by_address, "app", "<found@contoso.example>").await;
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["value"].as_array().map(Vec::len), Some(1));
        let (status, error) =
            error_of(search(&server, "me", "send", "<found@contoso.example>").await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("ErrorAccessDenied"))
        );
    }

    #[tokio::test]
    async fn sent_items_are_listed_newest_first_and_top_limits_the_answer() {
        let server = server().await;
        for id in ["first@contoso.example", "second@contoso.example"] {
            let response = send_mime(&server, "me/sendMail", "send", &message(id)).await;
            assert_eq!(response.status().as_u16(), 202);
        }
        let list = |query: &'static str| {
            let url = format!(
                "{}/v1.0/users/{ALICE}/mailFolders/SentItems/messages{query}",
                server.base_url()
            );
            async move {
                reqwest::Client::new()
                    .get(url)
                    .bearer_auth("send-read")
                    .send()
                    .await
                    .expect("request")
            }
        };
        let ids = |body: &Value| -> Vec<String> {
            body["value"]
                .as_array()
                .expect("value")
                .iter()
                .map(|m| {
                    m["internetMessageId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        };
        let all: Value = list("").await.json().await.expect("json");
        assert_eq!(
            ids(&all),
            ["<second@contoso.example>", "<first@contoso.example>"]
        );
        let response = list("?$top=1").await;
        assert_eq!(response.status().as_u16(), 200);
        let one: Value = response.json().await.expect("json");
        assert_eq!(ids(&one), ["<second@contoso.example>"]);
        let none: Value = list("?%24top=0").await.json().await.expect("json");
        assert_eq!(none["value"], json!([]));
        let (status, error) = error_of(list("?$top=many").await).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("BadRequest")));
        // Reading Sent Items needs a read permission: Mail.Send alone is denied.
        let denied = reqwest::Client::new()
            .get(format!(
                "{}/v1.0/me/mailFolders/SentItems/messages?$top=1",
                server.base_url()
            ))
            .bearer_auth("send")
            .send()
            .await
            .expect("request");
        let (status, error) = error_of(denied).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("ErrorAccessDenied"))
        );
    }

    #[tokio::test]
    async fn the_subject_of_a_mime_send_is_kept_decoded() {
        let server = server().await;
        let mime = b"To: dana@fabrikam.example\r\nSubject: =?utf-8?b?UHLDqWF2aXM=?= =?UTF-8?Q?_f=C3=BCr_Dana?= =?utf-8?q?=C3=A0?= and more\r\nMessage-ID: <subject@contoso.example>\r\n\r\nHello\r\n";
        let response = send_mime(&server, "me/sendMail", "send", mime).await;
        assert_eq!(response.status().as_u16(), 202);
        assert_eq!(
            server.sent_items(ALICE)[0].subject,
            "Préavis für Danaà and more"
        );
        assert_eq!(decode_encoded_words("Plain =?x?"), "Plain =?x?");
        assert_eq!(
            decode_encoded_words("=?iso-8859-1?q?caf=E9?="),
            "=?iso-8859-1?q?caf=E9?="
        );
    }

    #[tokio::test]
    async fn missing_and_invalid_tokens_get_401() {
        let server = server().await;
        let mime = message("nobody@contoso.example");
        let response = reqwest::Client::new()
            .post(format!("{}/v1.0/me/sendMail", server.base_url()))
            .header("Content-Type", "text/plain")
            .body(STANDARD.encode(&mime))
            .send()
            .await
            .expect("request");
        assert!(response.headers().contains_key("www-authenticate"));
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("InvalidAuthenticationToken"))
        );
        let (status, error) =
            error_of(send_mime(&server, "me/sendMail", "forged", &mime).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("InvalidAuthenticationToken"))
        );
        let (status, error) = error_of(send_mime(&server, "me/sendMail", "app", &mime).await).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("BadRequest")));
        assert!(server.all_sent().is_empty());
    }

    #[tokio::test]
    async fn another_mailbox_needs_mail_send_shared_or_an_app_token() {
        let server = server().await;
        let mime = message("shared@contoso.example");
        let path = format!("users/{SALES}/sendMail");
        let (status, error) = error_of(send_mime(&server, &path, "send", &mime).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("ErrorAccessDenied"))
        );
        assert_eq!(
            send_mime(&server, &path, "shared", &mime)
                .await
                .status()
                .as_u16(),
            202
        );
        assert_eq!(
            send_mime(&server, &path, "app", &mime)
                .await
                .status()
                .as_u16(),
            202
        );
        assert_eq!(server.sent_items(SALES).len(), 2);
        // Her own mailbox by another name of hers needs no more than Mail.Send.
        server.add_alias("Alice.Smith@contoso.example", ALICE);
        let own = "users/alice.smith%40contoso.example/sendMail";
        let response = send_mime(&server, own, "send", &mime).await;
        assert_eq!(response.status().as_u16(), 202);
        assert_eq!(server.sent_items("alice.smith@contoso.example").len(), 1);
    }

    #[tokio::test]
    async fn graph_validator_takes_graph_tokens_and_refuses_outlook_ones() {
        let idp = IdentityPlatform::start().await.expect("identity");
        idp.register_app(AppRegistration {
            client_id: "app-1".into(),
            client_secret: "secret".into(),
            secret_expired: false,
            redirect_uris: vec![],
        });
        let token = |scope: &'static str| {
            let url = format!(
                "{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
                idp.authority_url()
            );
            async move {
                let body: Value = reqwest::Client::new()
                    .post(url)
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", "app-1"),
                        ("client_secret", "secret"),
                        ("scope", scope),
                    ])
                    .send()
                    .await
                    .expect("token request")
                    .json()
                    .await
                    .expect("json");
                body["access_token"]
                    .as_str()
                    .expect("access_token")
                    .to_string()
            }
        };
        let server = GraphServer::start(idp.graph_validator())
            .await
            .expect("start");
        let mime = message("app@contoso.example");
        let path = format!("users/{SALES}/sendMail");
        let graph = token("https://graph.microsoft.com/.default").await;
        assert_eq!(
            send_mime(&server, &path, &graph, &mime)
                .await
                .status()
                .as_u16(),
            202
        );
        let outlook = token("https://outlook.office365.com/.default").await;
        let (status, error) = error_of(send_mime(&server, &path, &outlook, &mime).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("InvalidAuthenticationToken"))
        );
        idp.expire_access_token(&graph);
        let (status, _) = error_of(send_mime(&server, &path, &graph, &mime).await).await;
        assert_eq!(status, 401);
        assert_eq!(server.sent_items(SALES).len(), 1);
        idp.stop().await;
    }

    #[tokio::test]
    async fn a_fifth_concurrent_request_gets_429_mailbox_concurrency() {
        let server = server().await;
        server.inject(
            GraphFault::TimeoutAfterAccepting {
                hold: Duration::from_secs(2),
            },
            MAX_CONCURRENT_REQUESTS,
        );
        let url = format!("{}/v1.0/me/sendMail", server.base_url());
        let held: Vec<_> = (0..MAX_CONCURRENT_REQUESTS)
            .map(|i| {
                let request = reqwest::Client::new()
                    .post(&url)
                    .bearer_auth("send")
                    .header("Content-Type", "text/plain")
                    .body(STANDARD.encode(message(&format!("held-{i}@contoso.example"))));
                tokio::spawn(request.send())
            })
            .collect();
        eventually("four requests in flight", || {
            server.in_flight_for(ALICE) == MAX_CONCURRENT_REQUESTS
        })
        .await;
        let fifth = send_mime(
            &server,
            "me/sendMail",
            "send",
            &message("fifth@contoso.example"),
        )
        .await;
        assert_eq!(
            fifth
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let (status, error) = error_of(fifth).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (429, Some("ApplicationThrottled"))
        );
        assert_eq!(
            error["message"].as_str(),
            Some("Application is over its MailboxConcurrency limit.")
        );
        for request in held {
            assert!(request.await.expect("join").is_err());
        }
        assert_eq!(server.sent_items(ALICE).len(), MAX_CONCURRENT_REQUESTS);
        assert_eq!(
            server.max_concurrent_for(ALICE),
            MAX_CONCURRENT_REQUESTS + 1
        );
        assert_eq!(server.in_flight_for(ALICE), 0);
    }

    #[tokio::test]
    async fn the_request_rate_is_limited_per_mailbox() {
        let server = server().await;
        server.set_rate_limit(2, Duration::from_secs(600));
        let mime = message("rate@contoso.example");
        for _ in 0..2 {
            assert_eq!(
                send_mime(&server, "me/sendMail", "send", &mime)
                    .await
                    .status()
                    .as_u16(),
                202
            );
        }
        let third = send_mime(&server, "me/sendMail", "send", &mime).await;
        let retry_after: u64 = third
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!(retry_after > 0 && retry_after <= 600);
        let (status, error) = error_of(third).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (429, Some("ApplicationThrottled"))
        );
        // Another mailbox has its own allowance.
        let other = send_mime(&server, &format!("users/{SALES}/sendMail"), "app", &mime).await;
        assert_eq!(other.status().as_u16(), 202);
    }

    #[tokio::test]
    async fn each_injected_fault_answers_its_status_and_code() {
        let server = server().await;
        let cases = [
            (GraphFault::InvalidRecipients, 400, "ErrorInvalidRecipients"),
            (GraphFault::AccessDenied, 403, "ErrorAccessDenied"),
            (GraphFault::SendAsDenied, 403, "ErrorSendAsDenied"),
            (
                GraphFault::MailboxNotEnabledForRestApi,
                404,
                "MailboxNotEnabledForRESTAPI",
            ),
            (GraphFault::QuotaExceeded, 507, "ErrorQuotaExceeded"),
            (
                GraphFault::Throttled {
                    retry_after_secs: 7,
                },
                429,
                "ApplicationThrottled",
            ),
            (GraphFault::ServiceUnavailable, 503, "serviceNotAvailable"),
            (GraphFault::GatewayTimeout, 504, "UnknownError"),
            (GraphFault::TokenExpired, 401, "InvalidAuthenticationToken"),
        ];
        let mime = message("fault@contoso.example");
        for (fault, status, code) in cases {
            assert_eq!((fault.status(), fault.code()), (Some(status), Some(code)));
            server.inject(fault.clone(), 1);
            let response = send_mime(&server, "me/sendMail", "send", &mime).await;
            if let GraphFault::Throttled { .. } = fault {
                assert_eq!(
                    response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                    Some("7")
                );
            }
            let (got, error) = error_of(response).await;
            assert_eq!(
                (got, error["code"].as_str()),
                (status, Some(code)),
                "{fault:?}"
            );
            assert_eq!(server.injections_left(), 0);
        }
        assert!(server.all_sent().is_empty());
        // A send-only fault waits for a send; a lookup passes it by.
        server.inject(GraphFault::InvalidRecipients, 1);
        assert_eq!(
            search(&server, "me", "send-read", "<x@y>")
                .await
                .status()
                .as_u16(),
            200
        );
        assert_eq!(server.injections_left(), 1);
        server.clear_injections();
        assert_eq!(
            send_mime(&server, "me/sendMail", "send", &mime)
                .await
                .status()
                .as_u16(),
            202
        );
    }

    #[tokio::test]
    async fn timeout_after_accepting_keeps_the_mail_and_answers_nothing() {
        let server = server().await;
        let url = format!("{}/v1.0/me/sendMail", server.base_url());
        let send = |client: reqwest::Client, id: &str| {
            client
                .post(&url)
                .bearer_auth("send")
                .header("Content-Type", "text/plain")
                .body(STANDARD.encode(message(id)))
                .send()
        };
        server.inject(
            GraphFault::TimeoutAfterAccepting {
                hold: Duration::from_millis(50),
            },
            1,
        );
        let dropped = send(reqwest::Client::new(), "held@contoso.example").await;
        assert!(dropped.is_err(), "{dropped:?}");
        assert_eq!(
            server.count_by_message_id().get("held@contoso.example"),
            Some(&1)
        );
        server.inject(
            GraphFault::TimeoutAfterAccepting {
                hold: Duration::from_secs(30),
            },
            1,
        );
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .expect("client");
        let timed_out = send(impatient, "slow@contoso.example").await;
        assert!(timed_out.is_err_and(|e| e.is_timeout()));
        assert_eq!(
            server.count_by_message_id().get("slow@contoso.example"),
            Some(&1)
        );
        eventually("the first request logged", || !server.requests().is_empty()).await;
        assert_eq!(server.requests()[0].status, 0);
    }

    #[tokio::test]
    async fn drop_before_accepting_keeps_nothing() {
        let server = server().await;
        server.inject(GraphFault::DropBeforeAccepting, 1);
        let url = format!("{}/v1.0/me/sendMail", server.base_url());
        let dropped = reqwest::Client::new()
            .post(&url)
            .bearer_auth("send")
            .header("Content-Type", "text/plain")
            .body(STANDARD.encode(message("lost@contoso.example")))
            .send()
            .await;
        assert!(dropped.is_err());
        assert!(server.all_sent().is_empty());
        eventually("the request logged", || !server.requests().is_empty()).await;
        assert_eq!(server.requests()[0].status, 0);
    }

    #[tokio::test]
    async fn down_answers_503_until_up() {
        let server = server().await;
        let mime = message("down@contoso.example");
        server.set_down(true);
        let (status, error) =
            error_of(send_mime(&server, "me/sendMail", "send", &mime).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (503, Some("serviceNotAvailable"))
        );
        server.set_down(false);
        assert_eq!(
            send_mime(&server, "me/sendMail", "send", &mime)
                .await
                .status()
                .as_u16(),
            202
        );
        server.stop().await;
        let refused = reqwest::Client::new()
            .post(format!("{}/v1.0/me/sendMail", server.base_url()))
            .send()
            .await;
        assert!(refused.is_err());
    }

    #[test]
    fn routes_filters_and_ranges_parse() {
        let post = Method::POST;
        assert_eq!(
            parse_route(&post, "/v1.0/users/a%40b.example/SENDMAIL"),
            Ok((Target::User("a@b.example".into()), Op::SendMail))
        );
        assert_eq!(
            parse_route(
                &post,
                "/v1.0/me/messages/AAMk=/attachments/createUploadSession"
            ),
            Ok((Target::Me, Op::CreateUploadSession("AAMk=".into())))
        );
        assert!(parse_route(&Method::GET, "/v1.0/me/sendMail").is_err());
        assert_eq!(
            parse_route(
                &Method::DELETE,
                "/v1.0/users/a%40b.example/messages/AAMk%3D"
            ),
            Ok((
                Target::User("a@b.example".into()),
                Op::DeleteMessage("AAMk=".into())
            ))
        );
        assert!(parse_route(&Method::DELETE, "/v1.0/me/messages").is_err());
        assert_eq!(
            parse_filter("%24filter=internetMessageId+eq+%27%3Ca%27%27b%40c%3E%27&%24select=id"),
            Ok(Some("<a'b@c>".into()))
        );
        assert_eq!(parse_filter("$select=id"), Ok(None));
        assert!(parse_filter("$filter=subject eq 'x'").is_err());
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 9, 100)));
        assert_eq!(parse_content_range("0-9/100"), None);
        assert_eq!(
            session_id("/api/v2.0/Users('a')/Messages('m')/AttachmentSessions('s1')"),
            Some("s1".into())
        );
        assert_eq!(
            seconds_until(Duration::from_secs(10), Duration::from_millis(9_500)),
            1
        );
    }
}

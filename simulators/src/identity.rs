//! A simulated Microsoft identity platform (Entra ID v2 endpoints) for tests and the demo. It
//! answers as MICROSOFT.md says Microsoft does, errors included, and is strict where Microsoft
//! is strict: exact redirect URIs, single-use short-lived codes, PKCE, scope on refresh.

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// An application registration.
#[derive(Clone, Debug)]
pub struct AppRegistration {
    /// The application (client) id.
    pub client_id: String,
    /// The client secret's value.
    pub client_secret: String,
    /// Whether the secret has expired (AADSTS7000222).
    pub secret_expired: bool,
    /// The registered Web redirect URIs (matched exactly).
    pub redirect_uris: Vec<String>,
}

/// A user who can sign in.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// The UPN (`preferred_username`).
    pub username: String,
    /// The e-mail address (the `email` claim).
    pub email: Option<String>,
    /// The object id.
    pub oid: String,
    /// The tenant id.
    pub tenant_id: String,
}

/// How the authorize endpoint answers.
#[derive(Clone, Debug)]
pub enum AuthorizeMode {
    /// Redirects back with a code at once.
    AutoApprove,
    /// Shows a consent page with Accept and Cancel.
    ConsentPage,
    /// Redirects back with this error.
    Deny {
        /// The `error` value.
        error: String,
        /// The `error_description` value.
        description: String,
    },
}

/// A failure the token endpoint plays instead of answering.
#[derive(Clone, Debug)]
pub enum TokenFault {
    /// An OAuth error with an AADSTS code.
    OAuthError {
        /// HTTP status (400, 401).
        status: u16,
        /// The `error` value.
        error: String,
        /// The AADSTS number.
        code: u32,
        /// The description (starting with `AADSTSnnnn:`).
        description: String,
    },
    /// A 5xx (503 says `temporarily_unavailable`).
    ServerError {
        /// The status.
        status: u16,
    },
    /// 429 with `Retry-After`.
    TooManyRequests {
        /// Seconds to wait.
        retry_after_secs: u64,
    },
    /// Answers normally after a delay.
    Slow {
        /// The delay.
        delay: std::time::Duration,
    },
    /// Something that is not an OAuth document, as a proxy, firewall or captive gateway in
    /// front of Microsoft answers: e.g. HTTP 400 `text/html` (see [`TokenFault::gateway_page`]).
    NotOAuth {
        /// The HTTP status.
        status: u16,
        /// The `Content-Type`.
        content_type: String,
        /// The body, as is.
        body: String,
    },
}

impl TokenFault {
    /// A gateway's HTML error page: HTTP 400, `text/html`.
    pub fn gateway_page() -> Self {
        TokenFault::NotOAuth {
            status: 400,
            content_type: "text/html".into(),
            body: GATEWAY_PAGE.into(),
        }
    }
}

/// The body of [`TokenFault::gateway_page`].
pub const GATEWAY_PAGE: &str = "<html><head><title>400 Bad Request</title></head><body>Request blocked by gateway policy</body></html>";

/// One request the token endpoint saw.
#[derive(Clone, Debug)]
pub struct TokenRequestLog {
    /// `authorization_code`, `refresh_token`, `client_credentials`, ...
    pub grant_type: String,
    /// The scope sent.
    pub scope: Option<String>,
    /// The client id sent.
    pub client_id: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// The AADSTS code of an error answer.
    pub error_code: Option<u32>,
}

/// What an issued access token stands for.
#[derive(Clone, Debug)]
pub struct AccessTokenInfo {
    /// The signed-in user (`None` for app-only tokens).
    pub username: Option<String>,
    /// The application.
    pub client_id: String,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Whether it came from the client-credentials grant.
    pub app_only: bool,
}

struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    scope: String,
    challenge: Option<String>,
    username: String,
    issued: DateTime<Utc>,
    redeemed: bool,
}

struct RefreshGrant {
    client_id: String,
    username: String,
    /// The resource scopes the user consented to at sign-in (a refresh may ask for any of
    /// them, one resource at a time, and for nothing else: AADSTS65001).
    consented: String,
    superseded: bool,
    /// When the sign-in it descends from happened (rotation keeps it).
    signed_in_at: DateTime<Utc>,
}

struct State {
    authority: String,
    /// Tenants added besides the built-in directory ([`KNOWN_TENANTS`], users' tenants and domains).
    tenants: Vec<String>,
    apps: HashMap<String, AppRegistration>,
    users: Vec<TestUser>,
    signed_in: Option<String>,
    mode: AuthorizeMode,
    faults: Option<(TokenFault, usize)>,
    strict_rotation: bool,
    /// Users whose grants from sign-ins up to this time are revoked.
    revoked: HashMap<String, DateTime<Utc>>,
    lifetime: i64,
    access_token_length: Option<usize>,
    without_offline_access: bool,
    omit_refresh: bool,
    expires_as_string: bool,
    codes: HashMap<String, CodeGrant>,
    refresh_tokens: HashMap<String, RefreshGrant>,
    access: HashMap<String, AccessTokenInfo>,
    log: Vec<TokenRequestLog>,
}

type Shared = Arc<Mutex<State>>;

/// The simulated identity platform, serving on loopback until dropped.
#[derive(Clone)]
pub struct IdentityPlatform {
    state: Shared,
    handle: Arc<Mutex<Option<actix_web::dev::ServerHandle>>>,
    authority: String,
}

/// Serves the platform's endpoints on `listener` with `state`.
fn serve(
    listener: std::net::TcpListener,
    state: Shared,
) -> std::io::Result<actix_web::dev::ServerHandle> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/{tenant}/oauth2/v2.0/authorize", web::get().to(authorize))
            .route("/{tenant}/oauth2/v2.0/authorize", web::post().to(consent))
            .route("/{tenant}/oauth2/v2.0/token", web::post().to(token))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(handle)
}

fn random(len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rand::rng().random()).collect();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A random GUID in its usual text form (client ids, trace ids).
pub fn guid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Outlook resource of the global cloud (`outlook.office.com`, also `outlook.office365.com`).
fn is_global_outlook_scope(s: &str) -> bool {
    s.starts_with("https://outlook.office.com/") || s.starts_with("https://outlook.office365.com/")
}

/// Microsoft Graph in each cloud (MICROSOFT.md, "National clouds").
const GRAPH_RESOURCES: [&str; 4] = [
    "https://graph.microsoft.com/",
    "https://graph.microsoft.us/",
    "https://dod-graph.microsoft.us/",
    "https://microsoftgraph.chinacloudapi.cn/",
];

/// A Microsoft Graph scope: one of [`GRAPH_RESOURCES`], or a bare name (`Mail.Send`), which
/// Microsoft reads as Graph's.
fn is_graph_scope(s: &str) -> bool {
    GRAPH_RESOURCES.iter().any(|r| s.starts_with(r)) || (!s.contains("://") && !is_oidc_scope(s))
}

/// The resource a scope belongs to: the Outlook resource of the global cloud has two names,
/// Graph's bare scopes and its hosts are one resource; any other is its `scheme://host`.
fn resource_of(scope: &str) -> String {
    if is_global_outlook_scope(scope) {
        "https://outlook.office.com".into()
    } else if is_graph_scope(scope) {
        "graph".into()
    } else {
        let (scheme, rest) = scope.split_once("://").unwrap_or(("", scope));
        format!("{scheme}://{}", rest.split('/').next().unwrap_or_default())
    }
}

/// A national-cloud tenant (its domain ends in `.us` or `.cn`) asked for a global-cloud
/// Outlook or Graph scope: Microsoft answers AADSTS500011 (the resource principal is not in
/// that cloud's directory). The description, if so.
fn wrong_cloud(tenant: &str, scope: &str) -> Option<String> {
    let tenant = tenant.to_ascii_lowercase();
    if !(tenant.ends_with(".us") || tenant.ends_with(".cn")) {
        return None;
    }
    let resource = scope
        .split_whitespace()
        .find(|s| is_global_outlook_scope(s) || s.starts_with("https://graph.microsoft.com/"))?;
    let resource = resource
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default();
    Some(format!(
        "AADSTS500011: The resource principal named https://{resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
    ))
}

/// The tenants the simulated directory knows besides its users' tenant ids and domains: the
/// multi-tenant names and Contoso's domains in each cloud.
pub const KNOWN_TENANTS: [&str; 7] = [
    "common",
    "organizations",
    "consumers",
    "contoso.example",
    "contoso.onmicrosoft.com",
    "contoso.onmicrosoft.us",
    "contoso.partner.onmschina.cn",
];

/// Whether the directory knows `tenant` (a name, an id or a domain; case-insensitive).
fn knows_tenant(state: &State, tenant: &str) -> bool {
    let tenant = tenant.to_ascii_lowercase();
    let domain_of = |address: &str| {
        address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
    };
    KNOWN_TENANTS.contains(&tenant.as_str())
        || state
            .tenants
            .iter()
            .any(|t| t.eq_ignore_ascii_case(&tenant))
        || state.users.iter().any(|u| {
            u.tenant_id.eq_ignore_ascii_case(&tenant)
                || domain_of(&u.username).as_deref() == Some(tenant.as_str())
                || u.email.as_deref().and_then(domain_of).as_deref() == Some(tenant.as_str())
        })
}

/// Microsoft's answer for a tenant it does not know (HTTP 400, AADSTS90002).
fn unknown_tenant(tenant: &str) -> HttpResponse {
    oauth_error(
        400,
        "invalid_request",
        90002,
        &format!(
            "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
        ),
    )
}

fn is_oidc_scope(s: &str) -> bool {
    matches!(s, "openid" | "email" | "profile" | "offline_access")
}

/// The first scope of `requested` (a refresh's) the sign-in did not consent to, if any; the
/// OpenID scopes and `offline_access` need none, and a `.default` scope stands for what was
/// consented on its resource.
fn not_consented(requested: &str, consented: &str) -> Option<String> {
    let consented: Vec<String> = consented
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    requested
        .split_whitespace()
        .filter(|s| !is_oidc_scope(s) && !s.ends_with("/.default"))
        .find(|s| !consented.contains(&s.to_ascii_lowercase()))
        .map(str::to_string)
}

/// Scopes from more than one resource (e.g. Outlook and Graph) in one request (AADSTS28000).
fn mixes_resources(scope: &str) -> bool {
    let mut resources: Vec<String> = scope
        .split_whitespace()
        .filter(|s| !is_oidc_scope(s))
        .map(resource_of)
        .collect();
    resources.sort();
    resources.dedup();
    resources.len() > 1
}

fn error_body(error: &str, code: u32, description: &str) -> serde_json::Value {
    let trace = guid();
    let correlation = guid();
    let timestamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
    let description = if description.starts_with("AADSTS") {
        description.to_string()
    } else {
        format!("AADSTS{code}: {description}")
    };
    serde_json::json!({
        "error": error,
        "error_description": format!("{description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

fn oauth_error(status: u16, error: &str, code: u32, description: &str) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST))
        .insert_header(("cache-control", "no-store"))
        .json(error_body(error, code, description))
}

fn error_page(code: u32, text: &str) -> HttpResponse {
    let body = maud::html! {
        (maud::DOCTYPE)
        html { head { title { "Sign in to your account" } } body {
            h1 { "Sorry, but we're having trouble signing you in." }
            p.error { "AADSTS" (code) ": " (text) }
        } }
    };
    HttpResponse::BadRequest()
        .content_type("text/html; charset=utf-8")
        .body(body.into_string())
}

fn redirect_with(redirect_uri: &str, params: &[(&str, &str)]) -> HttpResponse {
    let mut url = match url::Url::parse(redirect_uri) {
        Ok(u) => u,
        Err(_) => return error_page(50011, "The redirect URI is not a URL."),
    };
    url.query_pairs_mut().extend_pairs(params);
    HttpResponse::Found()
        .insert_header(("Location", url.to_string()))
        .finish()
}

#[derive(Deserialize, Clone, Default)]
struct AuthorizeQuery {
    client_id: Option<String>,
    response_type: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    login_hint: Option<String>,
    decision: Option<String>,
}

/// Checks an authorize request; an error page (no redirect) or the redirect URI to answer on.
fn check_authorize(state: &State, q: &AuthorizeQuery) -> Result<String, Box<HttpResponse>> {
    let client_id = q.client_id.clone().unwrap_or_default();
    let Some(app) = state.apps.get(&client_id) else {
        return Err(Box::new(error_page(
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory."),
        )));
    };
    let redirect_uri = q.redirect_uri.clone().unwrap_or_default();
    if !app.redirect_uris.iter().any(|r| r == &redirect_uri) {
        return Err(Box::new(error_page(
            50011,
            &format!(
                "The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs configured for the application '{client_id}'."
            ),
        )));
    }
    Ok(redirect_uri)
}

fn user_for(state: &State, login_hint: Option<&str>) -> Option<TestUser> {
    if let Some(name) = &state.signed_in {
        return state.users.iter().find(|u| &u.username == name).cloned();
    }
    login_hint
        .and_then(|h| {
            state
                .users
                .iter()
                .find(|u| u.username.eq_ignore_ascii_case(h))
                .cloned()
        })
        .or_else(|| state.users.first().cloned())
}

fn issue_code(state: &mut State, q: &AuthorizeQuery, redirect_uri: &str) -> HttpResponse {
    let st = q.state.clone().unwrap_or_default();
    if q.response_type.as_deref() != Some("code") {
        return redirect_with(
            redirect_uri,
            &[
                ("error", "unsupported_response_type"),
                (
                    "error_description",
                    "AADSTS700054: response_type 'code' is the only one supported here.",
                ),
                ("state", &st),
            ],
        );
    }
    if q.code_challenge.is_some() && q.code_challenge_method.as_deref() != Some("S256") {
        return redirect_with(
            redirect_uri,
            &[
                ("error", "invalid_request"),
                (
                    "error_description",
                    "AADSTS501491: Invalid code_challenge_method: only S256 is accepted.",
                ),
                ("state", &st),
            ],
        );
    }
    let mut scope = q.scope.clone().unwrap_or_default();
    if state.without_offline_access {
        scope = scope
            .split_whitespace()
            .filter(|s| *s != "offline_access")
            .collect::<Vec<_>>()
            .join(" ");
    }
    if mixes_resources(&scope) {
        return redirect_with(
            redirect_uri,
            &[
                ("error", "invalid_request"),
                (
                    "error_description",
                    "AADSTS28000: Provided value for the input parameter scope is not valid because it contains more than one resource.",
                ),
                ("state", &st),
            ],
        );
    }
    let Some(user) = user_for(state, q.login_hint.as_deref()) else {
        return redirect_with(
            redirect_uri,
            &[
                ("error", "login_required"),
                (
                    "error_description",
                    "AADSTS50058: A silent sign-in request was sent but no user is signed in.",
                ),
                ("state", &st),
            ],
        );
    };
    let code = format!("0.A{}", random(48));
    state.codes.insert(
        code.clone(),
        CodeGrant {
            client_id: q.client_id.clone().unwrap_or_default(),
            redirect_uri: redirect_uri.to_string(),
            scope,
            challenge: q.code_challenge.clone(),
            username: user.username,
            issued: Utc::now(),
            redeemed: false,
        },
    );
    redirect_with(
        redirect_uri,
        &[("code", &code), ("state", &st), ("session_state", &guid())],
    )
}

async fn authorize(
    state: web::Data<Shared>,
    tenant: web::Path<String>,
    q: web::Query<AuthorizeQuery>,
) -> HttpResponse {
    let q = q.into_inner();
    let mut s = lock(&state);
    let redirect_uri = match check_authorize(&s, &q) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    let st = q.state.clone().unwrap_or_default();
    if let Some(description) = wrong_cloud(&tenant, q.scope.as_deref().unwrap_or_default()) {
        return redirect_with(
            &redirect_uri,
            &[
                ("error", "invalid_resource"),
                ("error_description", &description),
                ("state", &st),
            ],
        );
    }
    match s.mode.clone() {
        AuthorizeMode::AutoApprove => issue_code(&mut s, &q, &redirect_uri),
        AuthorizeMode::Deny { error, description } => redirect_with(
            &redirect_uri,
            &[
                ("error", &error),
                ("error_description", &description),
                ("state", &st),
            ],
        ),
        AuthorizeMode::ConsentPage => {
            let user = user_for(&s, q.login_hint.as_deref());
            let app = s
                .apps
                .get(q.client_id.as_deref().unwrap_or_default())
                .map(|a| a.client_id.clone())
                .unwrap_or_default();
            let hidden: BTreeMap<&str, String> = [
                ("client_id", q.client_id.clone()),
                ("response_type", q.response_type.clone()),
                ("redirect_uri", q.redirect_uri.clone()),
                ("scope", q.scope.clone()),
                ("state", q.state.clone()),
                ("code_challenge", q.code_challenge.clone()),
                ("code_challenge_method", q.code_challenge_method.clone()),
                ("login_hint", q.login_hint.clone()),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let body = maud::html! {
                (maud::DOCTYPE)
                html lang="en" { head { meta charset="utf-8"; title { "Permissions requested" }
                    style { "body{font-family:'Segoe UI',system-ui,sans-serif;background:#f2f2f2}main{max-width:440px;margin:4rem auto;background:#fff;padding:2rem;box-shadow:0 2px 6px rgba(0,0,0,.2)}button{padding:.5rem 1.5rem;margin-right:.5rem;border:0;cursor:pointer}.accept{background:#0067b8;color:#fff}" } }
                body { main {
                    p { strong { "Microsoft (simulated)" } }
                    h1 { "Permissions requested" }
                    p { "Signed in as " strong.user { (user.as_ref().map(|u| u.username.clone()).unwrap_or_else(|| "nobody".into())) } }
                    p { "The application " code { (app) } " would like to:" }
                    ul { @for s in q.scope.as_deref().unwrap_or_default().split_whitespace() { li { (s) } } }
                    form method="post" {
                        @for (k, v) in &hidden { input type="hidden" name=(k) value=(v); }
                        button.accept type="submit" name="decision" value="accept" { "Accept" }
                        button type="submit" name="decision" value="cancel" { "Cancel" }
                    }
                } }
                }
            };
            HttpResponse::Ok()
                .content_type("text/html; charset=utf-8")
                .body(body.into_string())
        }
    }
}

async fn consent(state: web::Data<Shared>, form: web::Form<AuthorizeQuery>) -> HttpResponse {
    let q = form.into_inner();
    let mut s = lock(&state);
    let redirect_uri = match check_authorize(&s, &q) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    if q.decision.as_deref() == Some("accept") {
        issue_code(&mut s, &q, &redirect_uri)
    } else {
        let st = q.state.clone().unwrap_or_default();
        redirect_with(
            &redirect_uri,
            &[
                ("error", "access_denied"),
                (
                    "error_description",
                    "AADSTS65004: User declined to consent to access the app.",
                ),
                ("state", &st),
            ],
        )
    }
}

fn id_token(authority: &str, client_id: &str, user: &TestUser, with_email: bool) -> String {
    let now = Utc::now().timestamp();
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","kid":"simulated"}"#);
    let mut claims = serde_json::json!({
        "aud": client_id,
        "iss": format!("{authority}/{}/v2.0", user.tenant_id),
        "iat": now, "nbf": now, "exp": now + 3600,
        "name": user.username,
        "oid": user.oid,
        "preferred_username": user.username,
        "upn": user.username,
        "tid": user.tenant_id,
        "ver": "2.0",
    });
    if with_email && let Some(email) = &user.email {
        claims["email"] = serde_json::json!(email);
    }
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!(
        "{header}.{payload}.{}",
        URL_SAFE_NO_PAD.encode(b"simulated-signature")
    )
}

#[allow(clippy::too_many_arguments)]
fn token_answer(
    state: &mut State,
    client_id: &str,
    username: Option<&str>,
    scope: &str,
    consented: &str,
    with_refresh: bool,
    id_token: Option<String>,
    signed_in_at: DateTime<Utc>,
) -> HttpResponse {
    let resource_scopes: Vec<String> = scope
        .split_whitespace()
        .filter(|s| !is_oidc_scope(s))
        .map(str::to_string)
        .collect();
    let mut access_token = format!("eyJ0eXAiOiJKV1Qi.{}", random(96));
    if let Some(len) = state.access_token_length {
        // Real Exchange tokens with many claims run to a few thousand characters.
        while access_token.len() < len {
            access_token.push_str(&random(96));
        }
        access_token.truncate(len.max(20));
    }
    let expires_at = Utc::now() + Duration::seconds(state.lifetime);
    state.access.insert(
        access_token.clone(),
        AccessTokenInfo {
            username: username.map(str::to_string),
            client_id: client_id.to_string(),
            scopes: resource_scopes.clone(),
            expires_at,
            app_only: username.is_none(),
        },
    );
    let expires_in = if state.expires_as_string {
        serde_json::json!(state.lifetime.to_string())
    } else {
        serde_json::json!(state.lifetime)
    };
    let mut body = serde_json::json!({
        "token_type": "Bearer",
        "scope": resource_scopes.join(" "),
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": access_token,
    });
    if with_refresh && let Some(user) = username {
        let refresh = format!("1.A{}", random(96));
        state.refresh_tokens.insert(
            refresh.clone(),
            RefreshGrant {
                client_id: client_id.to_string(),
                username: user.to_string(),
                consented: consented.to_string(),
                superseded: false,
                signed_in_at,
            },
        );
        body["refresh_token"] = serde_json::json!(refresh);
    }
    if let Some(id) = id_token {
        body["id_token"] = serde_json::json!(id);
    }
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(body)
}

fn basic_auth(req: &HttpRequest) -> Option<(String, String)> {
    let header = req.headers().get("authorization")?.to_str().ok()?;
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

async fn token(
    state: web::Data<Shared>,
    tenant: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let (basic_id, basic_secret) = basic_auth(&req).unzip();
    let client_id = form.get("client_id").cloned().or(basic_id);
    let client_secret = form.get("client_secret").cloned().or(basic_secret);
    let fault = {
        let mut s = lock(&state);
        match s.faults.take() {
            Some((fault, n)) => {
                if n > 1 {
                    s.faults = Some((fault.clone(), if n == usize::MAX { n } else { n - 1 }));
                }
                Some(fault)
            }
            None => None,
        }
    };
    let (response, code) = match fault {
        Some(TokenFault::Slow { delay }) => {
            tokio::time::sleep(delay).await;
            answer_token(
                &state,
                &tenant,
                &grant_type,
                client_id.as_deref(),
                client_secret.as_deref(),
                &form,
            )
        }
        Some(TokenFault::OAuthError {
            status,
            error,
            code,
            description,
        }) => (oauth_error(status, &error, code, &description), Some(code)),
        Some(TokenFault::NotOAuth {
            status,
            content_type,
            body,
        }) => (
            HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST))
                .content_type(content_type)
                .body(body),
            None,
        ),
        Some(TokenFault::ServerError { status }) => {
            let (error, code) = if status == 503 {
                ("temporarily_unavailable", 90006)
            } else {
                ("server_error", 90033)
            };
            (
                oauth_error(
                    status,
                    error,
                    code,
                    "The service is temporarily unavailable. Please try again later.",
                ),
                Some(code),
            )
        }
        Some(TokenFault::TooManyRequests { retry_after_secs }) => {
            let mut r = oauth_error(
                429,
                "temporarily_unavailable",
                90033,
                "Too many requests, please retry later.",
            );
            if let Ok(v) =
                actix_web::http::header::HeaderValue::from_str(&retry_after_secs.to_string())
            {
                r.headers_mut()
                    .insert(actix_web::http::header::RETRY_AFTER, v);
            }
            (r, Some(90033))
        }
        // The tenant is resolved before anything else is looked at.
        None if !knows_tenant(&lock(&state), &tenant) => (unknown_tenant(&tenant), Some(90002)),
        None => match wrong_cloud(&tenant, form.get("scope").map_or("", String::as_str)) {
            Some(description) => (
                oauth_error(400, "invalid_resource", 500011, &description),
                Some(500011),
            ),
            None => answer_token(
                &state,
                &tenant,
                &grant_type,
                client_id.as_deref(),
                client_secret.as_deref(),
                &form,
            ),
        },
    };
    lock(&state).log.push(TokenRequestLog {
        grant_type,
        scope: form.get("scope").cloned(),
        client_id,
        status: response.status().as_u16(),
        error_code: code,
    });
    response
}

fn answer_token(
    state: &Shared,
    tenant: &str,
    grant_type: &str,
    client_id: Option<&str>,
    client_secret: Option<&str>,
    form: &HashMap<String, String>,
) -> (HttpResponse, Option<u32>) {
    let fail = |status: u16, error: &str, code: u32, text: &str| {
        (oauth_error(status, error, code, text), Some(code))
    };
    let mut s = lock(state);
    let client_id = client_id.unwrap_or_default().to_string();
    let Some(app) = s.apps.get(&client_id).cloned() else {
        return fail(
            400,
            "unauthorized_client",
            700016,
            &format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        );
    };
    if client_secret != Some(app.client_secret.as_str()) {
        return fail(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app.",
        );
    }
    if app.secret_expired {
        return fail(
            401,
            "invalid_client",
            7000222,
            &format!(
                "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app."
            ),
        );
    }
    let scope = form.get("scope").cloned();
    match grant_type {
        "authorization_code" => {
            let code = form.get("code").cloned().unwrap_or_default();
            let Some(grant) = s.codes.get_mut(&code) else {
                return fail(
                    400,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                );
            };
            if grant.redeemed {
                return fail(
                    400,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                );
            }
            grant.redeemed = true;
            if Utc::now() - grant.issued > Duration::minutes(10) {
                return fail(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.",
                );
            }
            if grant.client_id != client_id {
                return fail(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided grant is invalid or malformed.",
                );
            }
            if form.get("redirect_uri") != Some(&grant.redirect_uri) {
                return fail(
                    400,
                    "invalid_grant",
                    50011,
                    &format!(
                        "The redirect URI '{}' specified in the request does not match the redirect URI used in the authorization request.",
                        form.get("redirect_uri").cloned().unwrap_or_default()
                    ),
                );
            }
            if let Some(challenge) = &grant.challenge {
                let verifier = form.get("code_verifier").cloned().unwrap_or_default();
                let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
                if &computed != challenge {
                    return fail(
                        400,
                        "invalid_grant",
                        501481,
                        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                    );
                }
            }
            let (username, granted) = (grant.username.clone(), grant.scope.clone());
            let Some(user) = s.users.iter().find(|u| u.username == username).cloned() else {
                return fail(
                    400,
                    "invalid_grant",
                    50034,
                    "The user account does not exist in the directory.",
                );
            };
            let scopes: Vec<&str> = granted.split_whitespace().collect();
            let with_refresh = scopes.contains(&"offline_access");
            let id = scopes
                .contains(&"openid")
                .then(|| id_token(&s.authority, &client_id, &user, scopes.contains(&"email")));
            (
                token_answer(
                    &mut s,
                    &client_id,
                    Some(&username),
                    &granted,
                    &granted,
                    with_refresh,
                    id,
                    Utc::now(),
                ),
                None,
            )
        }
        "refresh_token" => {
            let Some(scope) = scope.filter(|s| !s.trim().is_empty()) else {
                return fail(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'scope'.",
                );
            };
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let strict = s.strict_rotation;
            let Some(grant) = s.refresh_tokens.get(&presented) else {
                return fail(
                    400,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                );
            };
            if grant.client_id != client_id {
                return fail(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided grant is invalid or malformed.",
                );
            }
            if s.revoked
                .get(&grant.username)
                .is_some_and(|at| grant.signed_in_at <= *at)
            {
                return fail(
                    400,
                    "invalid_grant",
                    50173,
                    "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
                );
            }
            if strict && grant.superseded {
                return fail(
                    400,
                    "invalid_grant",
                    70000,
                    "The provided grant is invalid or malformed.",
                );
            }
            if mixes_resources(&scope) {
                return fail(
                    400,
                    "invalid_scope",
                    28000,
                    "Provided value for the input parameter scope is not valid because it contains more than one resource.",
                );
            }
            let consented = grant.consented.clone();
            if let Some(missing) = not_consented(&scope, &consented) {
                return fail(
                    400,
                    "invalid_grant",
                    65001,
                    &format!(
                        "The user or administrator has not consented to use the application with ID '{client_id}'. Send an interactive authorization request for this user and resource. Missing: {missing}."
                    ),
                );
            }
            let username = grant.username.clone();
            let signed_in_at = grant.signed_in_at;
            let with_refresh = !s.omit_refresh;
            if with_refresh && let Some(g) = s.refresh_tokens.get_mut(&presented) {
                g.superseded = true;
            }
            let granted = if scope.contains("offline_access") {
                scope.clone()
            } else {
                format!("{scope} offline_access")
            };
            (
                token_answer(
                    &mut s,
                    &client_id,
                    Some(&username),
                    &granted,
                    &consented,
                    with_refresh,
                    None,
                    signed_in_at,
                ),
                None,
            )
        }
        "client_credentials" => {
            let scope = scope.unwrap_or_default();
            let parts: Vec<&str> = scope.split_whitespace().collect();
            if parts.len() != 1 || !parts[0].ends_with("/.default") {
                return fail(
                    400,
                    "invalid_scope",
                    1002012,
                    &format!(
                        "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                    ),
                );
            }
            (
                token_answer(
                    &mut s,
                    &client_id,
                    None,
                    &scope,
                    "",
                    false,
                    None,
                    Utc::now(),
                ),
                None,
            )
        }
        other => fail(
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        ),
    }
}

impl IdentityPlatform {
    /// Starts on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on `bind`.
    pub async fn start_on(bind: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(bind)?;
        let authority = format!("http://{}", listener.local_addr()?);
        let state: Shared = Arc::new(Mutex::new(State {
            authority: authority.clone(),
            tenants: Vec::new(),
            apps: HashMap::new(),
            users: Vec::new(),
            signed_in: None,
            mode: AuthorizeMode::AutoApprove,
            faults: None,
            strict_rotation: false,
            revoked: HashMap::new(),
            lifetime: 4517,
            access_token_length: None,
            without_offline_access: false,
            omit_refresh: false,
            expires_as_string: false,
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access: HashMap::new(),
            log: Vec::new(),
        }));
        let handle = serve(listener, state.clone())?;
        Ok(Self {
            state,
            handle: Arc::new(Mutex::new(Some(handle))),
            authority,
        })
    }

    /// Takes the platform off the network: connections to it are refused until
    /// [`IdentityPlatform::come_back`] (everything it knows is kept).
    pub async fn go_down(&self) {
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            handle.stop(false).await;
        }
    }

    /// Serves again on the same address after [`IdentityPlatform::go_down`].
    pub fn come_back(&self) -> anyhow::Result<()> {
        let address = self.authority.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind(address.as_str())?;
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(serve(listener, self.state.clone())?);
        Ok(())
    }

    /// The authority URL to configure (`http://127.0.0.1:PORT`).
    pub fn authority_url(&self) -> String {
        self.authority.clone()
    }

    /// Registers an application.
    pub fn register_app(&self, app: AppRegistration) {
        lock(&self.state).apps.insert(app.client_id.clone(), app);
    }

    /// Adds a tenant (an id or a domain) to the directory.
    pub fn add_tenant(&self, tenant: &str) {
        lock(&self.state).tenants.push(tenant.to_string());
    }

    /// Adds a user who can sign in.
    pub fn add_user(&self, user: TestUser) {
        lock(&self.state).users.push(user);
    }

    /// Who the authorize endpoint signs in from now on.
    pub fn sign_in_as(&self, username: &str) {
        lock(&self.state).signed_in = Some(username.to_string());
    }

    /// How the authorize endpoint answers.
    pub fn set_authorize_mode(&self, mode: AuthorizeMode) {
        lock(&self.state).mode = mode;
    }

    /// The next `count` token requests get `fault` (`usize::MAX`: until cleared).
    pub fn fail_next_token_requests(&self, fault: TokenFault, count: usize) {
        lock(&self.state).faults = (count > 0).then_some((fault, count));
    }

    /// Removes injected faults.
    pub fn clear_faults(&self) {
        lock(&self.state).faults = None;
    }

    /// Refuses a refresh token once a newer one was issued from it (stricter than Microsoft).
    pub fn set_strict_rotation(&self, strict: bool) {
        lock(&self.state).strict_rotation = strict;
    }

    /// Revokes every grant of `username` (as a password change does): its refresh tokens are
    /// refused from now on (AADSTS50173). Access tokens already issued stay valid until they
    /// expire, as with Microsoft (without continuous access evaluation); see
    /// [`IdentityPlatform::expire_access_tokens_of`].
    pub fn revoke_grants_of(&self, username: &str) {
        lock(&self.state)
            .revoked
            .insert(username.to_string(), Utc::now());
    }

    /// Makes every access token issued to `username` expire now (what a revocation does to
    /// them under continuous access evaluation, or what an hour does): SMTP refuses them.
    pub fn expire_access_tokens_of(&self, username: &str) {
        let past = Utc::now() - Duration::seconds(1);
        for info in lock(&self.state).access.values_mut() {
            if info
                .username
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(username))
            {
                info.expires_at = past;
            }
        }
    }

    /// The length of new access tokens in characters (`None`: about 150, the default).
    /// Exchange Online's tokens often run to 2,000 characters and more.
    pub fn set_access_token_length(&self, len: Option<usize>) {
        lock(&self.state).access_token_length = len;
    }

    /// The lifetime of new access tokens, in seconds.
    pub fn set_access_token_lifetime(&self, secs: i64) {
        lock(&self.state).lifetime = secs;
    }

    /// Grants sign-ins without `offline_access` (consent given without it, or a policy that
    /// strips it): the code exchange then answers without a refresh token.
    pub fn grant_without_offline_access(&self, on: bool) {
        lock(&self.state).without_offline_access = on;
    }

    /// Answers refreshes without a new refresh token.
    pub fn omit_refresh_token_on_refresh(&self, omit: bool) {
        lock(&self.state).omit_refresh = omit;
    }

    /// Sends `expires_in` as a string, as some proxies do.
    pub fn expires_in_as_string(&self, on: bool) {
        lock(&self.state).expires_as_string = on;
    }

    /// Every token request so far.
    pub fn token_requests(&self) -> Vec<TokenRequestLog> {
        lock(&self.state).log.clone()
    }

    /// What a live access token stands for (`None` if unknown or expired).
    pub fn validate_access_token(&self, token: &str) -> Option<AccessTokenInfo> {
        lock(&self.state)
            .access
            .get(token)
            .filter(|i| i.expires_at > Utc::now())
            .cloned()
    }

    /// A validator for the simulated SMTP server: a live token of the `user=` mailbox (or an
    /// app-only token) is accepted, anything else gets `535 5.7.3`.
    pub fn smtp_validator(&self) -> crate::smtp::TokenValidator {
        let idp = self.clone();
        Arc::new(
            move |user: &str, bearer: &str| match idp.validate_access_token(bearer) {
                Some(info)
                    if info.app_only
                        || info
                            .username
                            .as_deref()
                            .is_some_and(|u| u.eq_ignore_ascii_case(user)) =>
                {
                    crate::smtp::AuthVerdict::Accept
                }
                _ => crate::smtp::AuthVerdict::Reject,
            },
        )
    }

    /// A validator for the simulated Graph server: a live token whose scopes are all Microsoft
    /// Graph's (any cloud's Graph host, bare names, or `.default` of the client-credentials
    /// grant) is accepted; an Outlook-resource token is not (MICROSOFT.md: "A Graph access
    /// token is for the Graph resource only"), nor an expired or unknown one.
    pub fn graph_validator(&self) -> crate::graph::GraphValidator {
        let idp = self.clone();
        Arc::new(move |bearer: &str| {
            let info = idp.validate_access_token(bearer)?;
            let graph = !info.scopes.is_empty() && info.scopes.iter().all(|s| is_graph_scope(s));
            graph.then_some(crate::graph::GraphPrincipal {
                user: info.username,
                scopes: info.scopes,
                app_only: info.app_only,
            })
        })
    }

    /// Makes an access token expire now.
    pub fn expire_access_token(&self, token: &str) {
        if let Some(info) = lock(&self.state).access.get_mut(token) {
            info.expires_at = Utc::now() - Duration::seconds(1);
        }
    }

    /// Stops the server.
    pub async fn stop(&self) {
        self.go_down().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_resource_per_request() {
        let graph = "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.Read";
        assert!(!mixes_resources(&format!("{graph} offline_access openid")));
        assert!(!mixes_resources("Mail.Send User.Read offline_access"));
        assert!(!mixes_resources(
            "Mail.Send https://graph.microsoft.com/Mail.Read"
        ));
        assert!(!mixes_resources(
            "https://outlook.office.com/SMTP.Send https://outlook.office365.com/IMAP.AccessAsUser.All"
        ));
        assert!(mixes_resources(
            "https://outlook.office.com/SMTP.Send https://graph.microsoft.com/Mail.Send"
        ));
        assert!(mixes_resources(
            "https://outlook.office.com/SMTP.Send Mail.Send"
        ));
        assert!(mixes_resources(
            "https://outlook.office365.us/SMTP.Send https://graph.microsoft.us/Mail.Send"
        ));
    }

    #[test]
    fn graph_scopes_of_every_cloud() {
        for scope in [
            "https://graph.microsoft.com/Mail.Send",
            "https://graph.microsoft.us/Mail.Send",
            "https://dod-graph.microsoft.us/Mail.Send",
            "https://microsoftgraph.chinacloudapi.cn/Mail.Send",
            "https://graph.microsoft.com/.default",
            "Mail.Send",
        ] {
            assert!(is_graph_scope(scope), "{scope}");
        }
        for scope in [
            "https://outlook.office.com/SMTP.Send",
            "https://outlook.office365.com/.default",
            "https://partner.outlook.cn/SMTP.Send",
            "openid",
            "api://other/scope",
        ] {
            assert!(!is_graph_scope(scope), "{scope}");
        }
    }

    #[test]
    fn global_graph_scope_in_a_national_tenant_is_another_cloud() {
        let found = wrong_cloud(
            "contoso.onmicrosoft.us",
            "https://graph.microsoft.com/Mail.Send offline_access",
        );
        assert!(found.is_some_and(|d| d.starts_with(
            "AADSTS500011: The resource principal named https://graph.microsoft.com"
        )));
        assert!(
            wrong_cloud(
                "contoso.onmicrosoft.us",
                "https://graph.microsoft.us/Mail.Send"
            )
            .is_none()
        );
        assert!(
            wrong_cloud(
                "contoso.onmicrosoft.com",
                "https://graph.microsoft.com/Mail.Send"
            )
            .is_none()
        );
    }
}

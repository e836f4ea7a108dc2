//! Requests to the identity platform's token endpoint, parsed as Microsoft answers them
//! (`error_codes`, `Retry-After`, `expires_in` as a number or a string).

use oauth2::reqwest;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Duration;

use crate::connect::aad::{AadFailure, FailureClass, aadsts_code, classify};
use crate::settings::{OutlookSettings, Resource};

/// How long one token request may take.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(20);

/// What is being traded for tokens.
pub enum Grant<'a> {
    /// The code from the redirect, with its PKCE verifier.
    AuthorizationCode {
        /// The code.
        code: &'a str,
        /// The redirect URI used in the authorize request.
        redirect_uri: &'a str,
        /// The PKCE verifier.
        verifier: &'a str,
    },
    /// A refresh token.
    RefreshToken(&'a SecretString),
    /// The client-credentials grant (app-only).
    ClientCredentials,
}

/// Tokens from a successful answer.
pub struct Tokens {
    /// The access token.
    pub access_token: SecretString,
    /// The (rotated) refresh token, if the answer carried one.
    pub refresh_token: Option<SecretString>,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// The granted scopes.
    pub scope: String,
    /// The id_token, when `openid` was asked for.
    pub id_token: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
struct SuccessBody {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: Option<NumberOrString>,
    scope: Option<String>,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u32>,
}

fn transient(message: String, retry_after_secs: Option<u64>) -> AadFailure {
    AadFailure {
        error: "unavailable".into(),
        code: None,
        description: message,
        class: FailureClass::Transient,
        retry_after_secs,
    }
}

/// The HTTP client for token requests: no redirects, a timeout.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .unwrap_or_default()
}

/// Sends one token request and classifies the answer.
pub async fn request(
    http: &reqwest::Client,
    settings: &OutlookSettings,
    grant: Grant<'_>,
    resource: Resource,
) -> Result<Tokens, AadFailure> {
    let body = form_body(settings, &grant, resource);
    let answer = post(http, &settings.token_url(), body).await?;
    read_answer(answer)
}

/// The request's form (`application/x-www-form-urlencoded`): the client's ID and secret, the
/// grant and its scope (the delegated scopes of `resource` for a code, the scope a refresh
/// asks for, or `.default` for client credentials).
fn form_body(settings: &OutlookSettings, grant: &Grant<'_>, resource: Resource) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("client_id", &settings.client_id)
        .append_pair("client_secret", settings.client_secret.expose_secret());
    match grant {
        Grant::AuthorizationCode {
            code,
            redirect_uri,
            verifier,
        } => form
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("code_verifier", verifier)
            .append_pair(
                "scope",
                &settings.cloud.delegated_scopes(resource).join(" "),
            ),
        Grant::RefreshToken(token) => form
            .append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", token.expose_secret())
            .append_pair("scope", &settings.cloud.refresh_scope(resource)),
        Grant::ClientCredentials => form
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &settings.cloud.app_only_scope(resource)),
    };
    form.finish()
}

/// The token endpoint's answer, read whole.
struct Answer {
    status: reqwest::StatusCode,
    /// `Retry-After`, in seconds.
    retry_after: Option<u64>,
    content_type: Option<String>,
    bytes: Vec<u8>,
}

/// POSTs `body` to `token_url`; a timeout, a refused connection or an answer cut off is a
/// transient failure.
async fn post(http: &reqwest::Client, token_url: &str, body: String) -> Result<Answer, AadFailure> {
    let response = http
        .post(token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "could not be reached"
            };
            transient(format!("the token endpoint {what}"), None)
        })?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
    let content_type = header("content-type");
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|_| transient("the token endpoint's answer was cut off".into(), None))?
        .to_vec();
    Ok(Answer {
        status,
        retry_after,
        content_type,
        bytes,
    })
}

/// The tokens of a success; else the failure, classified: HTTP 429 and 5xx are transient
/// (with Microsoft's code when the body names one), an OAuth error document is classified by
/// its error and AADSTS code, anything else is "not OAuth" with what came instead.
fn read_answer(answer: Answer) -> Result<Tokens, AadFailure> {
    let Answer {
        status,
        retry_after,
        content_type,
        bytes,
    } = answer;
    if status.is_success() {
        let parsed: SuccessBody = serde_json::from_slice(&bytes)
            .map_err(|_| not_oauth(status.as_u16(), content_type.as_deref(), &bytes))?;
        let expires_in = match parsed.expires_in {
            Some(NumberOrString::Number(n)) => n,
            Some(NumberOrString::Text(t)) => t.trim().parse().unwrap_or(3600),
            None => 3600,
        };
        return Ok(Tokens {
            access_token: SecretString::from(parsed.access_token),
            refresh_token: parsed.refresh_token.map(SecretString::from),
            expires_in,
            scope: parsed.scope.unwrap_or_default(),
            id_token: parsed.id_token,
        });
    }
    if status.as_u16() == 429 || status.is_server_error() {
        let detail = serde_json::from_slice::<ErrorBody>(&bytes).ok();
        return Err(AadFailure {
            error: detail
                .as_ref()
                .map(|d| d.error.clone())
                .unwrap_or_else(|| "server_error".into()),
            code: detail.as_ref().and_then(|d| d.error_codes.first().copied()),
            description: detail
                .map(|d| d.error_description)
                .unwrap_or_else(|| format!("the token endpoint answered HTTP {}", status.as_u16())),
            class: FailureClass::Transient,
            retry_after_secs: retry_after,
        });
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => {
            let code = body
                .error_codes
                .first()
                .copied()
                .or_else(|| aadsts_code(&body.error_description));
            Err(AadFailure {
                class: classify(&body.error, code),
                error: body.error,
                code,
                description: body.error_description,
                retry_after_secs: retry_after,
            })
        }
        Err(_) => Err(not_oauth(status.as_u16(), content_type.as_deref(), &bytes)),
    }
}

/// An answer that is not an OAuth document: says the HTTP status and what came instead, e.g.
/// "the token endpoint answered HTTP 400 with an HTML page (text/html)".
fn not_oauth(status: u16, content_type: Option<&str>, body: &[u8]) -> AadFailure {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    let looks_html = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|at| body[at] == b'<');
    let what = match media.as_deref() {
        _ if body.iter().all(u8::is_ascii_whitespace) => "an empty body".to_string(),
        Some("text/html") => "an HTML page (text/html)".to_string(),
        _ if looks_html => "an HTML page".to_string(),
        Some(other) => format!("a {other} document that is not OAuth JSON"),
        None => "a body without a content type".to_string(),
    };
    AadFailure {
        error: format!("http_{status}"),
        code: None,
        description: format!("the token endpoint answered HTTP {status} with {what}"),
        class: FailureClass::NotOAuth,
        retry_after_secs: None,
    }
}

/// The claims of an id_token that name the signed-in mailbox.
#[derive(Debug, Default, Deserialize)]
pub struct IdClaims {
    /// Usually the UPN.
    pub preferred_username: Option<String>,
    /// The e-mail address, when the `email` scope was granted.
    pub email: Option<String>,
    /// The UPN.
    pub upn: Option<String>,
    /// The tenant.
    pub tid: Option<String>,
}

/// Reads the claims of an id_token received directly from the token endpoint over TLS (its
/// signature need not be checked then: OpenID Connect Core 3.1.3.7).
pub fn id_claims(id_token: &str) -> Option<IdClaims> {
    use base64::Engine;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

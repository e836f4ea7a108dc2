//! Sign-in: argon2 password hashes, session cookies, and CSRF checks on every state-changing request.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use chrono::Duration;
use crm_sdk::{CSRF_FIELD, CSRF_HEADER, CurrentUser};
use futures::StreamExt;
use maud::html;
use rand::Rng;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::entities::{session, user};
use crate::html::ok;
use crate::state::AppState;
use crate::throttle::{SignInThrottle, Verdict};

const SESSION_COOKIE: &str = "crm_session";
const ANON_CSRF_COOKIE: &str = "crm_csrf";
const SESSION_DAYS: i64 = 14;
/// The largest form the CSRF check reads for a signed-in user (the compose form carries a mail).
const SIGNED_IN_FORM_BYTES: usize = 32 * 1024 * 1024;
/// The largest upload form (`multipart/form-data`, files attached to a mail) it reads for a
/// signed-in user without a CSRF header, in bytes.
const SIGNED_IN_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
/// The largest form it reads for anyone else (the sign-in form).
const ANONYMOUS_FORM_BYTES: usize = 64 * 1024;

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

/// A hash of a random password, verified against for unknown accounts so that they cost the
/// same work as known ones.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&random_token()).unwrap_or_default())
}

/// Whether `password` matches `hash`; with no hash (an unknown account) the same argon2 work is
/// done against a dummy hash and the answer is no.
fn verify_password(password: &str, hash: Option<&str>) -> bool {
    let matches = PasswordHash::new(hash.unwrap_or_else(|| dummy_hash())).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    });
    matches && hash.is_some()
}

/// Computes the dummy hash now, so that the first unknown sign-in costs no more than others.
pub fn warm_up() {
    let _ = dummy_hash();
}

/// A random URL-safe token of 256 bits.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn current_user(state: &AppState, req: &ServiceRequest) -> Option<CurrentUser> {
    let token = req.cookie(SESSION_COOKIE)?.value().to_string();
    let found = session::Entity::find_by_id(sha256_hex(&token))
        .find_also_related(user::Entity)
        .filter(session::Column::ExpiresAt.gt(state.clock.now()))
        // At most one row by its key; `.all()` rather than `.one()`, whose bound `LIMIT ?`
        // makes SQLite compile the statement again at every request (crate::db::first).
        .all(&state.db)
        .await
        .map(crate::db::first);
    match found {
        Ok(Some((session, Some(user)))) => Some(CurrentUser {
            id: user.id,
            email: user.email,
            name: user.name,
            is_admin: user.is_admin,
            csrf_token: session.csrf_token,
        }),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "looking up a session failed");
            None
        }
    }
}

fn csrf_refused() -> HttpResponse {
    HttpResponse::build(StatusCode::FORBIDDEN)
        .content_type("text/html; charset=utf-8")
        .body(
            html! {
                h1 { "This form could not be accepted" }
                p { "It has expired or did not come from this site (missing or wrong CSRF token). Go back, reload the page and submit it again." }
                p { a href="/" { "Back to the CRM" } }
            }
            .into_string(),
        )
}

/// The text of the part `name` of a `multipart/form-data` body (an upload form's CSRF field).
async fn upload_field(
    headers: &actix_web::http::header::HeaderMap,
    body: web::Bytes,
    name: &str,
) -> Option<String> {
    let stream =
        futures::stream::once(async move { Ok::<_, actix_web::error::PayloadError>(body) });
    let mut form = actix_multipart::Multipart::new(headers, stream);
    while let Some(Ok(mut part)) = form.next().await {
        if part.name() != Some(name) {
            continue;
        }
        let mut value = Vec::new();
        while let Some(Ok(chunk)) = part.next().await {
            value.extend_from_slice(&chunk);
            if value.len() > 1024 {
                return None;
            }
        }
        return String::from_utf8(value).ok();
    }
    None
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Middleware: puts the signed-in [`CurrentUser`] in the request and refuses state-changing
/// requests whose CSRF token (form field or header) does not match the session's.
pub async fn session_middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return next.call(req).await.map(|r| r.map_into_boxed_body());
    };
    let user = current_user(&state, &req).await;
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if unsafe_method {
        let expected = match &user {
            Some(user) => Some(user.csrf_token.clone()),
            None => req.cookie(ANON_CSRF_COOKIE).map(|c| c.value().to_string()),
        };
        // Refused before a byte of the body is read: nobody to compare a token with.
        let Some(expected) = expected.filter(|e| !e.is_empty()) else {
            tracing::info!(path = ?req.path(), "refused a request without a session or CSRF cookie");
            return Ok(req.into_response(csrf_refused()));
        };
        let mut presented = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let is_form = req
            .content_type()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded");
        let is_upload = req
            .content_type()
            .eq_ignore_ascii_case("multipart/form-data");
        if presented.is_none() && is_upload && user.is_some() {
            if declared_length(&req).is_some_and(|n| n > SIGNED_IN_UPLOAD_BYTES) {
                return Ok(req.into_response(too_large()));
            }
            let mut payload = req.take_payload();
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk?;
                if body.len() + chunk.len() > SIGNED_IN_UPLOAD_BYTES {
                    return Ok(req.into_response(too_large()));
                }
                body.extend_from_slice(&chunk);
            }
            let body = body.freeze();
            presented = upload_field(req.headers(), body.clone(), CSRF_FIELD).await;
            let (_, mut replay) = actix_http::h1::Payload::create(true);
            replay.unread_data(body);
            req.set_payload(Payload::from(replay));
        }
        if presented.is_none() && is_form {
            // Large forms only from a signed-in user; the declared length is refused unread.
            let limit = if user.is_some() {
                SIGNED_IN_FORM_BYTES
            } else {
                ANONYMOUS_FORM_BYTES
            };
            if declared_length(&req).is_some_and(|n| n > limit) {
                return Ok(req.into_response(too_large()));
            }
            let mut payload = req.take_payload();
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk?;
                if body.len() + chunk.len() > limit {
                    return Ok(req.into_response(too_large()));
                }
                body.extend_from_slice(&chunk);
            }
            let body = body.freeze();
            presented = form_field(&body, CSRF_FIELD);
            let (_, mut replay) = actix_http::h1::Payload::create(true);
            replay.unread_data(body);
            req.set_payload(Payload::from(replay));
        }
        let valid = presented
            .as_deref()
            .is_some_and(|p| constant_time_eq(expected.as_bytes(), p.as_bytes()));
        if !valid {
            tracing::info!(path = ?req.path(), "refused a request without a valid CSRF token");
            return Ok(req.into_response(csrf_refused()));
        }
    }
    let Some(user) = user else {
        return next.call(req).await.map(|r| r.map_into_boxed_body());
    };
    // Pages show the unread count in the navigation; other requests skip the query.
    let unread = if matches!(*req.method(), Method::GET | Method::HEAD) {
        crate::inbox::unread_count(&state.db, &user)
            .await
            .unwrap_or(0)
    } else {
        0
    };
    req.extensions_mut().insert(user);
    crate::inbox::with_unread(unread, next.call(req))
        .await
        .map(|r| r.map_into_boxed_body())
}

fn declared_length(req: &ServiceRequest) -> Option<usize> {
    req.headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn too_large() -> HttpResponse {
    HttpResponse::PayloadTooLarge().body("The form is too large.")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
    error: Option<String>,
}

fn safe_next(next: Option<&str>) -> String {
    crm_sdk::redirect::redirect_target(next)
}

async fn login_page(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<NextQuery>,
) -> HttpResponse {
    let token = req
        .cookie(ANON_CSRF_COOKIE)
        .map(|c| c.value().to_string())
        .unwrap_or_else(random_token);
    let next = safe_next(query.next.as_deref());
    // A fresh install: say how the first operator is made.
    let nobody = sea_orm::PaginatorTrait::count(crate::entities::user::Entity::find(), &state.db)
        .await
        .is_ok_and(|n| n == 0);
    let body = html! {
        section.card.narrow {
            h1 { "Sign in" }
            @if query.error.is_some() {
                p.flash.bad role="alert" { "Wrong e-mail address or password." }
            }
            @if nobody {
                p.flash.warn role="status" { "Nobody can sign in yet. On the server, add the first operator: "
                    code { "crm-host user add --operator you@example.com" } }
            }
            form method="post" action="/login" {
                input type="hidden" name=(CSRF_FIELD) value=(token);
                input type="hidden" name="next" value=(next);
                label for="email" { "E-mail" }
                input #email type="email" name="email" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" required;
                p { button type="submit" { "Sign in" } }
            }
        }
    };
    let mut response = ok(state.chrome.render("Sign in", None, body));
    let cookie = Cookie::build(ANON_CSRF_COOKIE, token)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(state.secure_cookies)
        .finish();
    let _ = response.add_cookie(&cookie);
    response
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    next: Option<String>,
}

fn too_many_attempts(wait: std::time::Duration) -> HttpResponse {
    let minutes = wait.as_secs().div_ceil(60).max(1);
    HttpResponse::TooManyRequests()
        .insert_header(("Retry-After", wait.as_secs().max(1).to_string()))
        .content_type("text/html; charset=utf-8")
        .body(
            html! {
                h1 { "Too many failed sign-ins" }
                p { "Sign-in is paused for this account or this address after several wrong passwords. Wait " (minutes) " minute(s) and try again." }
                p { a href="/login" { "Back to sign-in" } }
            }
            .into_string(),
        )
}

async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    throttle: web::Data<SignInThrottle>,
    form: web::Form<LoginForm>,
) -> HttpResponse {
    let email = form.email.trim().to_lowercase();
    let address = req.peer_addr().map(|a| a.ip());
    if let Verdict::Wait(wait) = throttle.check(&email, address) {
        tracing::info!(email = ?email, "sign-in held back: too many failures");
        return too_many_attempts(wait);
    }
    let found = user::Entity::find()
        .filter(user::Column::Email.eq(email.clone()))
        .one(&state.db)
        .await;
    let next = safe_next(form.next.as_deref());
    let hash = match &found {
        Ok(Some(user)) => Some(user.password_hash.as_str()),
        _ => None,
    };
    let verified = verify_password(&form.password, hash);
    let user = match found {
        Ok(Some(user)) if verified => user,
        Ok(_) => {
            throttle.failed(&email, address);
            tracing::info!(email = ?email, "sign-in refused");
            let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
            return HttpResponse::SeeOther()
                .insert_header(("Location", format!("/login?error=1&next={next}")))
                .finish();
        }
        Err(e) => {
            tracing::error!(error = %e, "sign-in lookup failed");
            return HttpResponse::ServiceUnavailable()
                .body("The database is not answering; try again.");
        }
    };
    let token = random_token();
    let now = state.clock.now();
    let created = session::ActiveModel {
        token_hash: Set(sha256_hex(&token)),
        user_id: Set(user.id),
        csrf_token: Set(random_token()),
        expires_at: Set(now + Duration::days(SESSION_DAYS)),
        created_at: Set(now),
    }
    .insert(&state.db)
    .await;
    if let Err(e) = created {
        tracing::error!(error = %e, "creating a session failed");
        return HttpResponse::ServiceUnavailable()
            .body("The database is not answering; try again.");
    }
    tracing::info!(user_id = user.id, "signed in");
    let cookie = Cookie::build(SESSION_COOKIE, token)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(state.secure_cookies)
        .max_age(actix_web::cookie::time::Duration::days(SESSION_DAYS))
        .finish();
    HttpResponse::SeeOther()
        .insert_header(("Location", next))
        .cookie(cookie)
        .finish()
}

async fn logout(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(cookie) = req.cookie(SESSION_COOKIE) {
        let _ = session::Entity::delete_by_id(sha256_hex(cookie.value()))
            .exec(&state.db)
            .await;
    }
    let mut gone = Cookie::build(SESSION_COOKIE, "").path("/").finish();
    gone.make_removal();
    HttpResponse::SeeOther()
        .insert_header(("Location", "/login"))
        .cookie(gone)
        .finish()
}

/// The sign-in routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/login", web::get().to(login_page))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout));
}

/// Refuses non-operators with a 403 page.
pub fn require_admin(
    user: &CurrentUser,
    chrome: &crate::html::HostChrome,
) -> Result<(), Box<HttpResponse>> {
    if user.is_admin {
        return Ok(());
    }
    Err(Box::new(HttpResponse::Forbidden()
        .content_type("text/html; charset=utf-8")
        .body(
            chrome
                .render(
                    "Operators only",
                    Some(user),
                    html! {
                        h1 { "Operators only" }
                        p { "This page is for CRM operators. Ask an administrator if you need a change here." }
                    },
                )
                .into_string(),
        )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_accounts_cost_one_argon2_verification_with_the_same_parameters() {
        let real = hash_password("pw").unwrap_or_default();
        assert!(verify_password("pw", Some(&real)));
        assert!(!verify_password("nope", Some(&real)));
        assert!(!verify_password("pw", None));
        let (real, dummy) = (
            PasswordHash::new(&real).map(|h| (h.algorithm, h.version, h.params.to_string())),
            PasswordHash::new(dummy_hash()).map(|h| (h.algorithm, h.version, h.params.to_string())),
        );
        assert!(real.is_ok());
        assert_eq!(real, dummy, "the dummy hash costs what a real one costs");
    }
}

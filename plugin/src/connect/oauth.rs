//! The connect flow: `POST /connect` (form: `server=ID`, CSRF) → Microsoft → `GET /confirm?code&state`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use chrono::Duration;
use crm_sdk::{CurrentUser, ModuleContext};
use maud::html;
use oauth2::basic::BasicClient;
use oauth2::{AuthUrl, ClientId, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope};
use rand::Rng;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, Set};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::CONFIRM_PATH;
use crate::connect::aad::{AadFailure, aadsts_code, explain};
use crate::connect::token_client::{self, Grant};
use crate::entities::{mail_server, oauth_state};
use crate::settings::{OutlookSettings, Resource};
use crate::web::layout::page_with;
use crate::web::servers::may_manage;

/// How long a started sign-in may take.
pub const STATE_LIFETIME_MINUTES: i64 = 10;

fn hash_state(state: &str) -> String {
    Sha256::digest(state.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn seal_context(state_hash: &str) -> String {
    format!("microsoft_outlook/oauth_state/{state_hash}")
}

/// A failure page: what happened, what to do, and Microsoft's code and words (escaped).
struct Failure<'a> {
    status: StatusCode,
    title: String,
    what: String,
    fix: String,
    code: Option<u32>,
    microsoft_says: Option<&'a str>,
    back: Option<String>,
}

fn failure_page(ctx: &ModuleContext, user: &CurrentUser, f: Failure<'_>) -> HttpResponse {
    tracing::info!(status = f.status.as_u16(), code = ?f.code, title = %f.title, "connect failed");
    let (back, back_words) = match f.back {
        Some(back) => (back, "Back to the mail server"),
        None => {
            let (href, words) = crate::web::layout::servers_home(user);
            (href.to_string(), words)
        }
    };
    let body = html! {
        h1 { (f.title) }
        section.card.failure {
            p.flash.bad role="alert" { (f.what) }
            p { strong { "What to do: " } (f.fix) }
            // Microsoft's code and words are for whoever looks into it, folded away.
            @if f.code.is_some() || f.microsoft_says.is_some() {
                details.microsoft-says {
                    summary { "Microsoft's own answer" @if let Some(code) = f.code { " (AADSTS" (code) ")" } }
                    @if let Some(code) = f.code { p { "Microsoft error code: " code { "AADSTS" (code) } } }
                    @if let Some(text) = f.microsoft_says { p.help { "Microsoft says: " (text) } }
                }
            }
            p { a href=(back) { (back_words) } }
        }
    };
    page_with(f.status, ctx, user, &f.title, body)
}

/// `fix` (the words of a refused sign-in) for a sign-in that was to switch the server to
/// Microsoft Graph: its button is the switch, not Connect (which would sign in for SMTP).
fn as_a_switch(fix: &str) -> String {
    const SWITCH: &str = "Switch this server to Microsoft Graph";
    [
        "Connect (Reconnect on a mailbox connected before)",
        "Connect (or Reconnect)",
        "Connect",
    ]
    .iter()
    .fold(fix.to_string(), |words, button| {
        words
            .replace(&format!("Click {button}"), &format!("Click {SWITCH}"))
            .replace(&format!("click {button}"), &format!("click {SWITCH}"))
    })
}

/// The page of a sign-in Microsoft refused or the user cancelled; `switching` when it was to
/// switch the server to Microsoft Graph (the server stays as it was).
fn aad_failure_page(
    ctx: &ModuleContext,
    user: &CurrentUser,
    (failure, switching): (&AadFailure, bool),
    back: Option<String>,
) -> HttpResponse {
    let (what, mut fix) = explain(&failure.error, failure.code, &ctx.public_url(CONFIRM_PATH));
    if !user.is_admin && failure.class == crate::connect::aad::FailureClass::Configuration {
        // The fix is in the CRM's settings or the app registration: not a user's to do.
        fix = "This is for the CRM's operators to fix (in the CRM's Microsoft settings or the app registration in Azure), not something you can change. Tell them this page's words; once they have fixed it, click Connect (or Reconnect) again.".into();
    }
    if switching {
        fix = format!(
            "The server still sends by SMTP, as before, and its mail still waits. {}",
            as_a_switch(&fix)
        );
    }
    let title = if switching {
        "The server was not switched to Microsoft Graph"
    } else {
        "The mailbox was not connected"
    };
    let status = match failure.class {
        crate::connect::aad::FailureClass::Transient
        | crate::connect::aad::FailureClass::NotOAuth => StatusCode::BAD_GATEWAY,
        _ => StatusCode::BAD_REQUEST,
    };
    failure_page(
        ctx,
        user,
        Failure {
            status,
            title: title.into(),
            what,
            fix,
            code: failure.code,
            microsoft_says: Some(&failure.description),
            back,
        },
    )
}

fn not_configured_page(
    ctx: &ModuleContext,
    user: &CurrentUser,
    problem: &crate::settings::NotConfigured,
) -> HttpResponse {
    failure_page(
        ctx,
        user,
        Failure {
            status: StatusCode::CONFLICT,
            title: "The module is not configured yet".into(),
            what: problem.to_string(),
            fix: if user.is_admin {
                "Open Settings › Microsoft Outlook, paste the application (client) ID and the client secret from Azure, save, then click Connect again.".into()
            } else {
                "Ask a CRM operator to enter the Microsoft Outlook settings.".into()
            },
            code: None,
            microsoft_says: None,
            back: Some(if user.is_admin {
                "/settings".into()
            } else {
                "/".into()
            }),
        },
    )
}

/// The page of `server_id` if `user` may open it.
async fn server_page_for(
    ctx: &ModuleContext,
    user: &CurrentUser,
    server_id: i32,
) -> Option<String> {
    mail_server::Entity::find_by_id(server_id)
        .one(ctx.db())
        .await
        .ok()
        .flatten()
        .filter(|s| may_manage(user, s))
        .map(|s| format!("/microsoft_outlook/servers/{}", s.id))
}

/// The page of a sign-in that cannot be completed; `back` is the page of its server when
/// that is known and the viewer may open it.
fn state_failure(
    ctx: &ModuleContext,
    user: &CurrentUser,
    what: &str,
    back: Option<String>,
) -> HttpResponse {
    failure_page(
        ctx,
        user,
        Failure {
            status: StatusCode::BAD_REQUEST,
            title: "This sign-in cannot be completed".into(),
            what: what.into(),
            fix: "Nothing was stored. Go back to the mail server and click Connect again; a sign-in must be finished within 10 minutes, once, by the person who started it.".into(),
            code: None,
            microsoft_says: None,
            back,
        },
    )
}

#[derive(Deserialize)]
struct ConnectForm {
    server: Option<String>,
    /// `graph`: switch the server to Microsoft Graph first (the held-for-5.7.139 button), so
    /// that this sign-in grants Graph's permissions.
    switch_to: Option<String>,
}

/// Starts a sign-in for a server the viewer may manage (an operator's shared one, or their
/// own mailbox), for Microsoft Graph's permission when a switch to it is asked (the server
/// switches when the sign-in completes): a state, the switch and a PKCE verifier are kept for
/// [`STATE_LIFETIME_MINUTES`] (the verifier sealed), and the browser goes to Microsoft's
/// authorize endpoint with the mailbox as the login hint.
async fn connect(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    form: web::Form<ConnectForm>,
) -> HttpResponse {
    match connect_steps(&ctx, &user, &form).await {
        Ok(done) | Err(done) => done,
    }
}

/// [`connect`]'s steps; `Err` is the page that ends the flow early.
async fn connect_steps(
    ctx: &ModuleContext,
    user: &CurrentUser,
    form: &ConnectForm,
) -> Result<HttpResponse, HttpResponse> {
    let server = server_to_connect(ctx, user, form.server.as_deref()).await?;
    let settings = OutlookSettings::load(ctx)
        .await
        .map_err(|problem| not_configured_page(ctx, user, &problem))?;
    // A switch to Graph asks for Graph's permission now, and changes the server only when
    // the sign-in completes (an abandoned one leaves it as it was).
    let mut server = server;
    let switch_to = match form.switch_to.as_deref() {
        Some("graph") if server.transport != "graph" => {
            server.transport = "graph".into();
            Some(server.transport.clone())
        }
        _ => None,
    };
    let (url, state, verifier) = authorize_url(ctx, &settings, &server)
        .map_err(|problem| not_configured_page(ctx, user, &problem))?;
    remember_sign_in(ctx, user, (server.id, switch_to), &state, &verifier)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "storing an OAuth state failed");
            let back = Some(format!("/microsoft_outlook/servers/{}", server.id));
            state_failure(ctx, user, "The database did not answer.", back)
        })?;
    tracing::info!(server_id = server.id, user_id = user.id, "connect started");
    Ok(HttpResponse::SeeOther()
        .insert_header(("Location", url.to_string()))
        .finish())
}

/// After the tokens of `server_id` (and the `switched` transport) were stored: whatever held
/// the mailbox, a new connection is the fix to try, so its mails go out, each told who ended
/// its wait; the answer leads to the server's page, which says what was done.
async fn connected(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<crate::runtime::Shared>,
    user: &CurrentUser,
    server_id: i32,
    switched: Option<&str>,
) -> HttpResponse {
    tracing::info!(server_id, user_id = user.id, "mailbox connected");
    let (ended, flash) = match switched {
        Some(transport) => (
            crate::outbox::history::Ended::TransportChangedBy(user),
            transport,
        ),
        None => (crate::outbox::history::Ended::ConnectedBy(user), "1"),
    };
    shared.server_changed(server_id);
    let forced = (None, crate::delivery::release::Release::Forced);
    if let Err(e) = crate::delivery::release::release(ctx, shared, server_id, forced, ended).await {
        tracing::warn!(error = %e, "releasing the mails that waited for a reconnect failed");
    }
    HttpResponse::SeeOther()
        .insert_header((
            "Location",
            format!("/microsoft_outlook/servers/{server_id}?connected={flash}"),
        ))
        .finish()
}

/// The server `id` names, if it exists and the viewer may manage it (the same answer for "not
/// yours" and "not there"); a database that did not answer is said as such.
async fn server_to_connect(
    ctx: &ModuleContext,
    user: &CurrentUser,
    id: Option<&str>,
) -> Result<mail_server::Model, HttpResponse> {
    let Some(server_id) = id.and_then(|s| s.parse::<i32>().ok()) else {
        let why = "No mail server was named (server=ID).";
        return Err(state_failure(ctx, user, why, None));
    };
    let server = mail_server::Entity::find_by_id(server_id)
        .one(ctx.db())
        .await
        .map_err(|e| crate::web::layout::db_down(ctx, user, e))?;
    server.filter(|s| may_manage(user, s)).ok_or_else(|| {
        page_with(
            StatusCode::NOT_FOUND,
            ctx,
            user,
            "Not found",
            html! { h1 { "No such mail server" } p { "Shared servers are connected by operators; a personal mailbox only by its owner." } },
        )
    })
}

/// Microsoft's authorize URL for `server` (the scopes of its transport in the configured
/// cloud, PKCE S256, `response_mode=query`, the mailbox as `login_hint`), with its new random
/// state (32 bytes, base64url) and PKCE verifier.
fn authorize_url(
    ctx: &ModuleContext,
    settings: &OutlookSettings,
    server: &mail_server::Model,
) -> Result<(url::Url, String, oauth2::PkceCodeVerifier), crate::settings::NotConfigured> {
    let unreadable = || {
        crate::settings::NotConfigured::Unreadable(
            "the authority URL or the public base URL is not a URL".into(),
        )
    };
    let auth_url = AuthUrl::new(settings.authorize_url()).map_err(|_| unreadable())?;
    let redirect = RedirectUrl::new(ctx.public_url(CONFIRM_PATH)).map_err(|_| unreadable())?;
    let client = BasicClient::new(ClientId::new(settings.client_id.clone()))
        .set_auth_uri(auth_url)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let state_bytes: [u8; 32] = rand::rng().random();
    let state = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        state_bytes,
    );
    let scopes = settings
        .cloud
        .delegated_scopes(Resource::of_transport(&server.transport));
    let (url, _) = client
        .authorize_url(|| CsrfToken::new(state.clone()))
        .add_scopes(scopes.into_iter().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_extra_param("response_mode", "query")
        .add_extra_param("login_hint", server.mailbox.clone())
        .url();
    Ok((url, state, verifier))
}

/// Keeps the started sign-in (by the state's hash, the verifier sealed under it) for
/// [`STATE_LIFETIME_MINUTES`], and forgets those abandoned more than a day ago.
async fn remember_sign_in(
    ctx: &ModuleContext,
    user: &CurrentUser,
    (server_id, transport): (i32, Option<String>),
    state: &str,
    verifier: &oauth2::PkceCodeVerifier,
) -> Result<(), sea_orm::DbErr> {
    let state_hash = hash_state(state);
    let now = ctx.clock().now();
    let stored = oauth_state::Entity::insert(oauth_state::ActiveModel {
        pkce_verifier_sealed: Set(ctx
            .sealer()
            .seal(verifier.secret(), &seal_context(&state_hash))),
        state_hash: Set(state_hash),
        user_id: Set(user.id),
        server_id: Set(server_id),
        expires_at: Set(now + Duration::minutes(STATE_LIFETIME_MINUTES)),
        created_at: Set(now),
        transport: Set(transport),
    })
    .exec_without_returning(ctx.db())
    .await;
    let _ = oauth_state::Entity::delete_many()
        .filter(oauth_state::Column::ExpiresAt.lt(now - Duration::days(1)))
        .exec(ctx.db())
        .await;
    stored.map(|_| ())
}

#[derive(Deserialize)]
struct ConfirmQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The callback of a sign-in: its state taken (once, by the user who started it, within
/// [`STATE_LIFETIME_MINUTES`]), Microsoft's answer read, the code exchanged, the identity that
/// signed in matched to the server's mailbox, then the tokens stored and the mailbox's held
/// mail released. Every refusal is a page in words; nothing is stored unless all of it holds.
async fn confirm(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<crate::runtime::Shared>,
    user: CurrentUser,
    query: web::Query<ConfirmQuery>,
) -> HttpResponse {
    match confirm_steps(&ctx, &shared.into_inner(), &user, &query).await {
        Ok(done) | Err(done) => done,
    }
}

/// [`confirm`]'s steps; `Err` is the page that ends the flow early.
async fn confirm_steps(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<crate::runtime::Shared>,
    user: &CurrentUser,
    query: &ConfirmQuery,
) -> Result<HttpResponse, HttpResponse> {
    let (pending, state_hash) = take_state(ctx, user, query.state.as_deref()).await?;
    // The way back from here on: the server's page, when the viewer may open it.
    let back = server_page_for(ctx, user, pending.server_id).await;
    if pending.expires_at < ctx.clock().now() {
        let why = "This sign-in took longer than 10 minutes and has expired.";
        return Err(state_failure(ctx, user, why, back));
    }
    if let Some(error) = query.error.as_deref() {
        let description = query.error_description.clone().unwrap_or_default();
        let code = aadsts_code(&description);
        let failure = AadFailure {
            class: crate::connect::aad::classify(error, code),
            error: error.to_string(),
            code,
            description,
            retry_after_secs: None,
        };
        let switching = pending.transport.is_some();
        return Err(aad_failure_page(ctx, user, (&failure, switching), back));
    }
    let Some(code) = query.code.as_deref().filter(|c| !c.is_empty()) else {
        let why = "The answer from Microsoft carries neither a code nor an error.";
        return Err(state_failure(ctx, user, why, back));
    };
    let mut server = server_of(ctx, user, &pending, &back).await?;
    // A switch of transport started with this sign-in: its tokens are for the new one.
    let switch_to = pending.transport.clone().filter(|t| *t != server.transport);
    if let Some(transport) = &switch_to {
        server.transport.clone_from(transport);
    }
    let tokens = exchange(
        ctx,
        shared,
        user,
        (&pending, &state_hash),
        (code, &server),
        &back,
    )
    .await?;
    let sign_in_name =
        signed_in_mailbox(ctx, user, &server, &tokens, &back).map_err(|page| *page)?;
    let signed_in = (sign_in_name.as_str(), switch_to.as_deref());
    match crate::tokens::store::store_connected(ctx, server.id, &tokens, signed_in).await {
        Ok(_) => Ok(connected(ctx, shared, user, server.id, switch_to.as_deref()).await),
        Err(e) => {
            tracing::error!(error = %e, "storing tokens failed");
            let why = "The database did not answer; the tokens were not stored.";
            Err(state_failure(ctx, user, why, back))
        }
    }
}

/// The pending sign-in of `state` and the state's hash, taken for good: it must be known, the
/// viewer's own, and not taken by another request meanwhile (single use: only the request
/// that deletes the row goes on).
async fn take_state(
    ctx: &ModuleContext,
    user: &CurrentUser,
    state: Option<&str>,
) -> Result<(oauth_state::Model, String), HttpResponse> {
    let Some(state) = state.filter(|s| !s.is_empty() && s.len() <= 512) else {
        let why = "The answer from Microsoft carries no state, so it cannot be matched to a sign-in started here.";
        return Err(state_failure(ctx, user, why, None));
    };
    let state_hash = hash_state(state);
    let pending = oauth_state::Entity::find_by_id(state_hash.clone())
        .one(ctx.db())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "reading an OAuth state failed");
            state_failure(ctx, user, "The database did not answer.", None)
        })?;
    let Some(pending) = pending else {
        let why = "This sign-in is unknown or was already completed (the state is not valid).";
        return Err(state_failure(ctx, user, why, None));
    };
    if pending.user_id != user.id {
        tracing::warn!(
            user_id = user.id,
            "an OAuth state presented by another user"
        );
        let why = "This sign-in was started by another CRM user.";
        return Err(state_failure(ctx, user, why, None));
    }
    let claimed = oauth_state::Entity::delete_by_id(state_hash.clone())
        .exec(ctx.db())
        .await;
    if !matches!(claimed, Ok(r) if r.rows_affected == 1) {
        let back = server_page_for(ctx, user, pending.server_id).await;
        let why = "This sign-in was already completed.";
        return Err(state_failure(ctx, user, why, back));
    }
    Ok((pending, state_hash))
}

/// The mail server of `pending`, if it still exists and the viewer may still manage it.
async fn server_of(
    ctx: &ModuleContext,
    user: &CurrentUser,
    pending: &oauth_state::Model,
    back: &Option<String>,
) -> Result<mail_server::Model, HttpResponse> {
    let server = mail_server::Entity::find_by_id(pending.server_id)
        .one(ctx.db())
        .await
        .map_err(|e| crate::web::layout::db_down(ctx, user, e))?;
    server.filter(|s| may_manage(user, s)).ok_or_else(|| {
        let why = "The mail server of this sign-in no longer exists or is no longer yours.";
        state_failure(ctx, user, why, back.clone())
    })
}

/// Exchanges the authorization `code` at the token endpoint with the sign-in's PKCE verifier,
/// for the resource of `server`'s transport.
async fn exchange(
    ctx: &ModuleContext,
    shared: &crate::runtime::Shared,
    user: &CurrentUser,
    (pending, state_hash): (&oauth_state::Model, &str),
    (code, server): (&str, &mail_server::Model),
    back: &Option<String>,
) -> Result<token_client::Tokens, HttpResponse> {
    let settings = OutlookSettings::load(ctx)
        .await
        .map_err(|problem| not_configured_page(ctx, user, &problem))?;
    let verifier = ctx
        .sealer()
        .unseal(&pending.pkce_verifier_sealed, &seal_context(state_hash))
        .map_err(|e| {
            tracing::error!(error = %e, "the PKCE verifier cannot be unsealed");
            let why = "The sign-in's proof key cannot be read (the sealing key changed).";
            state_failure(ctx, user, why, back.clone())
        })?;
    let redirect_uri = ctx.public_url(CONFIRM_PATH);
    let grant = Grant::AuthorizationCode {
        code,
        redirect_uri: &redirect_uri,
        verifier: verifier.expose_secret(),
    };
    let resource = Resource::of_transport(&server.transport);
    token_client::request(&shared.http, &settings, grant, resource)
        .await
        .map_err(|failure| {
            let switching = pending.transport.is_some();
            aad_failure_page(ctx, user, (&failure, switching), back.clone())
        })
}

/// The name the mailbox signed in with (its UPN, else the matching claim), when the identity
/// token names the server's mailbox and Microsoft issued a refresh token; else the page that
/// says what to do. Nothing is stored either way.
fn signed_in_mailbox(
    ctx: &ModuleContext,
    user: &CurrentUser,
    server: &mail_server::Model,
    tokens: &token_client::Tokens,
    back: &Option<String>,
) -> Result<String, Box<HttpResponse>> {
    let claims = tokens
        .id_token
        .as_deref()
        .and_then(token_client::id_claims)
        .unwrap_or_default();
    let candidates = [
        ("preferred_username", claims.preferred_username.as_deref()),
        ("email", claims.email.as_deref()),
        ("upn", claims.upn.as_deref()),
    ];
    let matched = candidates
        .iter()
        .find_map(|(_, v)| v.filter(|v| v.eq_ignore_ascii_case(&server.mailbox)));
    let Some(signed_in_as) = matched else {
        let seen = candidates
            .iter()
            .filter_map(|(claim, v)| v.map(|v| format!("{v} ({claim})")))
            .collect::<Vec<_>>()
            .join(", ");
        let seen = if seen.is_empty() {
            "an account that Microsoft did not name".to_string()
        } else {
            seen
        };
        return Err(Box::new(failure_page(
            ctx,
            user,
            Failure {
                status: StatusCode::BAD_REQUEST,
                title: "Signed in with another mailbox".into(),
                what: format!(
                    "You signed in at Microsoft as {seen}, but this server's mailbox is {}. Nothing was stored.",
                    server.mailbox
                ),
                fix: format!(
                    "Click Connect (or Reconnect) again and sign in as {} (use a private window or \"Use another account\" at Microsoft), or change the server's mailbox address.",
                    server.mailbox
                ),
                code: None,
                microsoft_says: None,
                back: back.clone(),
            },
        )));
    };
    if tokens.refresh_token.is_none() {
        return Err(Box::new(failure_page(
            ctx,
            user,
            Failure {
                status: StatusCode::BAD_REQUEST,
                title: "The mailbox was not connected".into(),
                what: "Microsoft issued no refresh token (the offline_access permission was not granted), so the connection would stop working within the hour, when the access token expires. Nothing was stored.".into(),
                fix: "An administrator must make sure the app registration has the delegated permission offline_access (Microsoft Graph) with consent, then click Connect (or Reconnect) again and accept the permissions.".into(),
                code: None,
                microsoft_says: None,
                back: back.clone(),
            },
        )));
    }
    // The sign-in name (UPN) may differ from the mailbox's address; SMTP may accept either.
    Ok(claims
        .preferred_username
        .as_deref()
        .or(claims.upn.as_deref())
        .unwrap_or(signed_in_as)
        .to_string())
}

/// The connect routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // A resource, so that a GET (an old link, a forged image) answers 405.
    cfg.service(web::resource("/connect").route(web::post().to(connect)))
        .route("/confirm", web::get().to(confirm));
}

//! Fresh access tokens: read the stored one, or refresh it (rotation stored atomically with a
//! compare-and-swap on the version), and hold the mailbox when Microsoft refuses.

use chrono::Duration;
use crm_sdk::ModuleContext;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::SecretString;
use std::sync::Arc;

use crate::connect::aad::FailureClass;
use crate::connect::token_client::{self, Grant};
use crate::delivery::classify::{self, HoldReason, Level, Verdict, Who};
use crate::entities::{mail_server, token};
use crate::runtime::Shared;
use crate::settings::{OutlookSettings, Resource};
use crate::tokens::store::{access_context, refresh_context};

/// Refresh when the access token expires within this many minutes.
pub const REFRESH_MARGIN_MINUTES: i64 = 5;

pub use crate::tokens::store::AccessToken;

/// Why no access token could be had.
#[derive(Debug, Clone)]
pub enum TokenProblem {
    /// The mailbox is held (recorded in its health, people told): its mails wait.
    Held(Verdict),
    /// Try again later.
    Transient {
        /// Why.
        reason: String,
        /// Wait at least this long.
        retry_after_secs: Option<u64>,
    },
    /// The database failed.
    Database(String),
    /// Another worker is refreshing this token and did not finish in time: nothing is wrong
    /// with the mailbox; its mails wait a moment, spending nothing.
    Busy(String),
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenProblem::Held(v) => f.write_str(&v.words()),
            TokenProblem::Transient { reason, .. } => {
                write!(f, "temporarily unavailable: {reason}")
            }
            TokenProblem::Database(m) => write!(f, "database: {m}"),
            TokenProblem::Busy(reason) => write!(f, "waiting: {reason}"),
        }
    }
}

impl TokenProblem {
    /// Whether the grant is dead (the mailbox must be connected again).
    pub fn grant_dead(&self) -> bool {
        matches!(self, TokenProblem::Held(v) if v.level == Level::MailboxHeld(HoldReason::GrantDead))
    }
}

/// A token was obtained for `server`: ends a hold that a token proves fixed (the token
/// endpoint's, the settings').
async fn token_obtained(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
) -> Result<(), TokenProblem> {
    let by = crate::delivery::release::Success::Token(&ENDED_BY_A_TOKEN);
    crate::delivery::release::succeeded(ctx, shared, server.id, by)
        .await
        .map_err(db)
}

fn db(e: sea_orm::DbErr) -> TokenProblem {
    TokenProblem::Database(e.to_string())
}

/// Holds `server`'s mailbox for the verdict's reason (people told once) and gives the problem
/// to return. A dead grant also marks the token row, so that nothing refreshes it again.
pub async fn hold(
    ctx: &ModuleContext,
    shared: &Shared,
    server: &mail_server::Model,
    mut verdict: Verdict,
) -> TokenProblem {
    let Level::MailboxHeld(reason) = verdict.level else {
        return TokenProblem::Transient {
            reason: verdict.words(),
            retry_after_secs: None,
        };
    };
    let mut row = token::Entity::update_many()
        .col_expr(token::Column::LastError, Expr::value(verdict.words()))
        .filter(token::Column::ServerId.eq(server.id));
    if reason == HoldReason::GrantDead {
        row = row.col_expr(token::Column::Status, Expr::value("needs_reconnect"));
    }
    if let Err(e) = row.exec(ctx.db()).await {
        return db(e);
    }
    match crate::delivery::hold::hold(ctx, shared, server, reason, &verdict).await {
        Err(e) => return db(e),
        // The mails wait as long as the hold says (it may pace its probes).
        Ok(held) => {
            if let Some(until) = held.until {
                verdict.hold_for = Some(until - ctx.clock().now());
            }
        }
    }
    TokenProblem::Held(verdict)
}

/// The reasons a successful token request ends (the path to Microsoft and the settings work).
pub const ENDED_BY_A_TOKEN: [HoldReason; 3] = [
    HoldReason::TokenEndpointNotOAuth,
    HoldReason::ClientCredentials,
    HoldReason::WrongCloud,
];

fn unseal(ctx: &ModuleContext, sealed: &str, context: &str) -> Result<SecretString, TokenProblem> {
    ctx.sealer().unseal(sealed, context).map_err(|e| {
        TokenProblem::Held(Verdict {
            rule: "grant-dead",
            level: Level::MailboxHeld(HoldReason::GrantDead),
            who: Who::MailboxOwner,
            what: format!("The stored token cannot be read ({e}): the sealing key changed."),
            fix: "Connect the mail server again.".into(),
            hold_for: None,
        })
    })
}

/// The verdict when the module's settings cannot be used.
fn not_configured(problem: &crate::settings::NotConfigured) -> Verdict {
    Verdict {
        rule: "client-credentials",
        level: Level::MailboxHeld(HoldReason::ClientCredentials),
        who: Who::Operator,
        what: problem.to_string(),
        fix: "The mails wait and go out as soon as the settings are saved.".into(),
        hold_for: None,
    }
}

/// The module's settings, or the mailbox held until an operator saves working ones.
async fn settings_or_hold(
    ctx: &ModuleContext,
    shared: &Shared,
    server: &mail_server::Model,
) -> Result<OutlookSettings, TokenProblem> {
    match OutlookSettings::load(ctx).await {
        Ok(s) => Ok(s),
        Err(problem) => Err(hold(ctx, shared, server, not_configured(&problem)).await),
    }
}

/// The app-only token (client credentials), fetched once and shared until shortly before it
/// expires.
pub async fn app_only_token(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    force: bool,
) -> Result<AccessToken, TokenProblem> {
    let settings = settings_or_hold(ctx, shared, server).await?;
    let resource = Resource::of_transport(&server.transport);
    let mut cached = shared.app_token.lock().await;
    let margin = Duration::minutes(REFRESH_MARGIN_MINUTES);
    if let Some(t) = cached.as_ref()
        && !force
        && t.client_id == settings.client_id
        && t.resource == resource
        && t.expires_at > ctx.clock().now() + margin
    {
        return Ok(AccessToken {
            token: t.token.clone(),
            version: t.version,
            refreshed: false,
            identities: vec![server.mailbox.clone()],
        });
    }
    match token_client::request(&shared.http, &settings, Grant::ClientCredentials, resource).await {
        Ok(tokens) => {
            let version = cached.as_ref().map_or(1, |t| t.version + 1);
            *cached = Some(crate::runtime::AppToken {
                client_id: settings.client_id.clone(),
                resource,
                token: tokens.access_token.clone(),
                expires_at: ctx.clock().now() + Duration::seconds(tokens.expires_in),
                version,
            });
            drop(cached);
            tracing::info!("app-only token fetched");
            token_obtained(ctx, shared, server).await?;
            Ok(AccessToken {
                token: tokens.access_token,
                version,
                refreshed: true,
                identities: vec![server.mailbox.clone()],
            })
        }
        Err(failure) if failure.class == FailureClass::Transient => Err(TokenProblem::Transient {
            reason: failure.description.clone(),
            retry_after_secs: failure.retry_after_secs,
        }),
        Err(failure) => {
            drop(cached);
            let mut verdict = classify::token(&failure, &ctx.public_url(crate::CONFIRM_PATH));
            if verdict.level == Level::MailboxHeld(HoldReason::GrantDead) {
                // No grant in app-only: a refusal is the app's permissions.
                verdict.level = Level::MailboxHeld(HoldReason::ClientCredentials);
                verdict.who = Who::Operator;
            }
            verdict.fix = "For app-only sending, an administrator must give the app the Office 365 Exchange Online application permission SMTP.SendAsApp with admin consent, and register its Exchange service principal with rights on the mailbox; then save the settings or click Release held mail on the server page.".into();
            Err(hold(ctx, shared, server, verdict).await)
        }
    }
}

/// The identities SMTP AUTH may use for a mailbox, the one that worked first.
fn identities(server: &mail_server::Model, row: &token::Model) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for id in [
        row.smtp_user.as_deref(),
        Some(server.mailbox.as_str()),
        Some(row.signed_in_as.as_str()),
    ]
    .into_iter()
    .flatten()
    {
        if !id.is_empty() && !ids.iter().any(|i| i.eq_ignore_ascii_case(id)) {
            ids.push(id.to_string());
        }
    }
    ids
}

/// A usable access token for `server`, refreshed first when it expires within five minutes
/// (or when `force` is set, after the server refused it).
pub async fn fresh_access_token(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    force: bool,
) -> Result<AccessToken, TokenProblem> {
    if server.auth == "app_only" {
        return app_only_token(ctx, shared, server, force).await;
    }
    let row = crate::entities::by_key::<token::Entity, _>(ctx.db(), server.id)
        .await
        .map_err(db)?;
    let Some(row) = row else {
        return Err(hold(
            ctx,
            shared,
            server,
            classify::not_connected(&server.mailbox),
        )
        .await);
    };
    if row.status != "valid" {
        return Err(hold(ctx, shared, server, dead_grant(&row)).await);
    }
    let margin = Duration::minutes(REFRESH_MARGIN_MINUTES);
    // The stored access token is for one resource; a server whose transport needs the other
    // (switched from SMTP to Graph) gets one from the same grant.
    let for_transport = Resource::of_transport(&server.transport).granted_in(&row.scopes);
    if !force && for_transport && row.access_expires_at > ctx.clock().now() + margin {
        return Ok(AccessToken {
            token: unseal(ctx, &row.access_token_sealed, &access_context(server.id))?,
            version: row.version,
            refreshed: false,
            identities: identities(server, &row),
        });
    }
    refresh(ctx, shared, server, row).await
}

/// The verdict on a token row whose grant was found dead before.
fn dead_grant(row: &token::Model) -> Verdict {
    Verdict {
        rule: "grant-dead",
        level: Level::MailboxHeld(HoldReason::GrantDead),
        who: Who::MailboxOwner,
        what: row
            .last_error
            .clone()
            .unwrap_or_else(|| "The mailbox's grant is no longer valid.".into()),
        fix: "Connect the mail server again.".into(),
        hold_for: None,
    }
}

/// How long one worker may hold a token's refresh before others may take it over.
const REFRESH_LEASE_SECS: i64 = 30;

/// The stored token once another worker's refresh of version `from` is done.
async fn wait_for_other_refresh(
    ctx: &ModuleContext,
    server_id: i32,
    from: i64,
) -> Result<Option<token::Model>, TokenProblem> {
    for _ in 0..(REFRESH_LEASE_SECS * 20) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let Some(now_row) = token::Entity::find_by_id(server_id)
            .one(ctx.db())
            .await
            .map_err(db)?
        else {
            return Ok(None);
        };
        let lease_over = now_row
            .refresh_lease_until
            .is_none_or(|t| t <= ctx.clock().now());
        if now_row.version != from || now_row.status != "valid" || lease_over {
            return Ok(Some(now_row));
        }
    }
    Ok(None)
}

/// Refreshes `row` with its refresh token. One worker at a time (in any process) holds the
/// refresh lease; the others wait and use its result. The rotation is stored with a
/// compare-and-swap on the version.
pub async fn refresh(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    row: token::Model,
) -> Result<AccessToken, TokenProblem> {
    refresh_using(ctx, shared, server, row, None).await
}

/// [`refresh`] with the module settings already loaded (a refresh run loads them once).
pub async fn refresh_using(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    row: token::Model,
    settings: Option<&OutlookSettings>,
) -> Result<AccessToken, TokenProblem> {
    let mut row = row;
    loop {
        let now = ctx.clock().now();
        let claimed = token::Entity::update_many()
            .col_expr(
                token::Column::RefreshLeaseUntil,
                Expr::value(now + Duration::seconds(REFRESH_LEASE_SECS)),
            )
            .filter(token::Column::ServerId.eq(server.id))
            .filter(token::Column::Version.eq(row.version))
            .filter(token::Column::Status.eq("valid"))
            .filter(
                sea_orm::Condition::any()
                    .add(token::Column::RefreshLeaseUntil.is_null())
                    .add(token::Column::RefreshLeaseUntil.lte(now)),
            )
            .exec(ctx.db())
            .await
            .map_err(db)?;
        if claimed.rows_affected == 1 {
            let result = refresh_holding_lease(ctx, shared, server, &row, settings).await;
            shared.metrics.token_refresh(match &result {
                Ok(_) => "ok",
                Err(TokenProblem::Held(_)) => "held",
                Err(TokenProblem::Transient { .. }) => "temporary",
                Err(TokenProblem::Database(_)) => "database",
                Err(TokenProblem::Busy(_)) => "busy",
            });
            if result.is_err() {
                let _ = token::Entity::update_many()
                    .col_expr(
                        token::Column::RefreshLeaseUntil,
                        Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
                    )
                    .filter(token::Column::ServerId.eq(server.id))
                    .exec(ctx.db())
                    .await;
            }
            return result;
        }
        // Someone else is refreshing (or already did): use their result.
        let Some(current) = wait_for_other_refresh(ctx, server.id, row.version).await? else {
            return Err(TokenProblem::Busy(
                "another worker's token refresh did not finish".into(),
            ));
        };
        if current.status != "valid" {
            return Err(hold(ctx, shared, server, dead_grant(&current)).await);
        }
        if current.version != row.version {
            return Ok(AccessToken {
                token: unseal(
                    ctx,
                    &current.access_token_sealed,
                    &access_context(server.id),
                )?,
                version: current.version,
                refreshed: false,
                identities: identities(server, &current),
            });
        }
        // The other worker gave up or its lease ran out: try to take the lease.
        row = current;
    }
}

/// Stores a refresh's answer with a compare-and-swap on the version; the token to use.
async fn store_refreshed(
    ctx: &ModuleContext,
    server: &mail_server::Model,
    row: &token::Model,
    tokens: token_client::Tokens,
) -> Result<AccessToken, TokenProblem> {
    let now = ctx.clock().now();
    let sealer = ctx.sealer();
    let mut update = token::Entity::update_many()
        .col_expr(
            token::Column::AccessTokenSealed,
            Expr::value(sealer.seal_secret(&tokens.access_token, &access_context(server.id))),
        )
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(now + Duration::seconds(tokens.expires_in)),
        )
        .col_expr(token::Column::Version, Expr::value(row.version + 1))
        .col_expr(token::Column::LastRefreshAt, Expr::value(now))
        .col_expr(
            token::Column::RefreshLeaseUntil,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        .col_expr(
            token::Column::LastError,
            Expr::value(Option::<String>::None),
        );
    if !tokens.scope.is_empty() {
        update = update.col_expr(token::Column::Scopes, Expr::value(tokens.scope.clone()));
    }
    // Rotation: keep the old refresh token when the answer carries none.
    if let Some(new_refresh) = &tokens.refresh_token {
        update = update.col_expr(
            token::Column::RefreshTokenSealed,
            Expr::value(sealer.seal_secret(new_refresh, &refresh_context(server.id))),
        );
    }
    let swapped = update
        .filter(token::Column::ServerId.eq(server.id))
        .filter(token::Column::Version.eq(row.version))
        .exec(ctx.db())
        .await
        .map_err(db)?;
    if swapped.rows_affected == 1 {
        tracing::info!(
            server_id = server.id,
            version = row.version + 1,
            "token refreshed"
        );
        return Ok(AccessToken {
            token: tokens.access_token,
            version: row.version + 1,
            refreshed: true,
            identities: identities(server, row),
        });
    }
    // Another worker refreshed first; its refresh token is the live one now.
    let winner = token::Entity::find_by_id(server.id)
        .one(ctx.db())
        .await
        .map_err(db)?
        .ok_or_else(|| TokenProblem::Database("the token row disappeared".into()))?;
    Ok(AccessToken {
        token: unseal(ctx, &winner.access_token_sealed, &access_context(server.id))?,
        version: winner.version,
        refreshed: false,
        identities: identities(server, &winner),
    })
}

async fn refresh_holding_lease(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    row: &token::Model,
    settings: Option<&OutlookSettings>,
) -> Result<AccessToken, TokenProblem> {
    let loaded;
    let settings = match settings {
        Some(s) => s,
        None => {
            loaded = settings_or_hold(ctx, shared, server).await?;
            &loaded
        }
    };
    let Some(sealed_refresh) = row.refresh_token_sealed.as_deref() else {
        let verdict = Verdict {
            rule: "grant-dead",
            level: Level::MailboxHeld(HoldReason::GrantDead),
            who: Who::MailboxOwner,
            what: "No refresh token is stored (offline_access was not granted), so the access token cannot be renewed.".into(),
            fix: "Connect the mail server again and accept the permission to stay signed in (offline_access).".into(),
            hold_for: None,
        };
        return Err(hold(ctx, shared, server, verdict).await);
    };
    let refresh_token = unseal(ctx, sealed_refresh, &refresh_context(server.id))?;
    let answer = token_client::request(
        &shared.http,
        settings,
        Grant::RefreshToken(&refresh_token),
        Resource::of_transport(&server.transport),
    )
    .await;
    match answer {
        Ok(tokens) => {
            let token = store_refreshed(ctx, server, row, tokens).await?;
            token_obtained(ctx, shared, server).await?;
            Ok(token)
        }
        Err(failure) => {
            // A loser of a race whose refresh token was already rotated away gets invalid_grant:
            // if the row moved on meanwhile, use the winner's token instead of giving up.
            if failure.class != FailureClass::Transient
                && let Ok(Some(now_row)) = token::Entity::find_by_id(server.id).one(ctx.db()).await
                && now_row.version != row.version
                && now_row.status == "valid"
            {
                return Ok(AccessToken {
                    token: unseal(
                        ctx,
                        &now_row.access_token_sealed,
                        &access_context(server.id),
                    )?,
                    version: now_row.version,
                    refreshed: false,
                    identities: identities(server, &now_row),
                });
            }
            if failure.class == FailureClass::Transient {
                return Err(TokenProblem::Transient {
                    reason: failure.description.clone(),
                    retry_after_secs: failure.retry_after_secs,
                });
            }
            let verdict = classify::token(&failure, &ctx.public_url(crate::CONFIRM_PATH));
            Err(hold(ctx, shared, server, verdict).await)
        }
    }
}

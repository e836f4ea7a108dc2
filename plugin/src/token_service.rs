//! Fresh access tokens: read the stored one, or refresh it (rotation stored atomically with a
//! compare-and-swap on the version), and put a dead grant into "needs reconnect" once.

use chrono::Duration;
use crm_sdk::{Audience, ModuleContext, Notification};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::SecretString;

use crate::aad::{AadFailure, FailureClass, explain};
use crate::entities::{mail_server, token};
use crate::settings::OutlookSettings;
use crate::token_client::{self, Grant};
use crate::token_store::{access_context, refresh_context};

/// Refresh when the access token expires within this many minutes.
pub const REFRESH_MARGIN_MINUTES: i64 = 5;

/// An access token ready to use.
pub struct AccessToken {
    /// The bearer token.
    pub token: SecretString,
    /// The row version it belongs to (connections are reused per version).
    pub version: i64,
    /// Whether this call refreshed it.
    pub refreshed: bool,
}

/// Why no access token could be had.
#[derive(Debug, Clone)]
pub enum TokenProblem {
    /// The server was never connected (or was disconnected).
    NotConnected,
    /// The grant is dead: the owner must reconnect.
    NeedsReconnect(String),
    /// The module's settings are incomplete or wrong.
    Configuration(String),
    /// Try again later.
    Transient {
        /// Why.
        reason: String,
        /// Wait at least this long.
        retry_after_secs: Option<u64>,
    },
    /// The database failed.
    Database(String),
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenProblem::NotConnected => {
                f.write_str("the mail server is not connected: connect it on its page")
            }
            TokenProblem::NeedsReconnect(m) | TokenProblem::Configuration(m) => f.write_str(m),
            TokenProblem::Transient { reason, .. } => {
                write!(f, "temporarily unavailable: {reason}")
            }
            TokenProblem::Database(m) => write!(f, "database: {m}"),
        }
    }
}

fn db(e: sea_orm::DbErr) -> TokenProblem {
    TokenProblem::Database(e.to_string())
}

fn words(failure: &AadFailure, ctx: &ModuleContext) -> String {
    let (what, fix) = explain(
        &failure.error,
        failure.code,
        &ctx.public_url(crate::CONFIRM_PATH),
    );
    match failure.code {
        Some(code) => format!("{what} {fix} (AADSTS{code})"),
        None => format!("{what} {fix}"),
    }
}

/// Marks a server's grant dead and tells its owner and the operators, once per incident.
pub async fn mark_needs_reconnect(
    ctx: &ModuleContext,
    server: &mail_server::Model,
    reason: &str,
) -> Result<(), TokenProblem> {
    let now = ctx.clock().now();
    token::Entity::update_many()
        .col_expr(token::Column::Status, Expr::value("needs_reconnect"))
        .col_expr(token::Column::LastError, Expr::value(reason.to_string()))
        .filter(token::Column::ServerId.eq(server.id))
        .exec(ctx.db())
        .await
        .map_err(db)?;
    // Only the writer that sets notified_at notifies.
    let first = token::Entity::update_many()
        .col_expr(token::Column::NotifiedAt, Expr::value(now))
        .filter(token::Column::ServerId.eq(server.id))
        .filter(token::Column::NotifiedAt.is_null())
        .exec(ctx.db())
        .await
        .map_err(db)?;
    if first.rows_affected == 1 {
        let subject = format!(
            "Mail server \"{}\" ({}) must be reconnected",
            server.name, server.mailbox
        );
        let body = format!("{reason} Mail from this server waits until then; nothing is lost.");
        let link = Some(format!("/microsoft_outlook/servers/{}", server.id));
        let mut audiences = vec![Audience::Operators];
        if let Some(owner) = server.owner_user_id {
            audiences.push(Audience::User(owner));
        }
        for audience in audiences {
            let sent = ctx
                .notifier()
                .notify(Notification {
                    audience,
                    subject: subject.clone(),
                    body: body.clone(),
                    link: link.clone(),
                })
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "a needs-reconnect notification was not recorded");
            }
        }
        tracing::warn!(server_id = server.id, "mail server needs reconnect");
    }
    Ok(())
}

fn unseal(ctx: &ModuleContext, sealed: &str, context: &str) -> Result<SecretString, TokenProblem> {
    ctx.sealer().unseal(sealed, context).map_err(|e| {
        TokenProblem::NeedsReconnect(format!(
            "The stored token cannot be read ({e}); reconnect the mail server."
        ))
    })
}

/// The app-only token (client credentials), fetched once and shared until shortly before it
/// expires.
pub async fn app_only_token(
    ctx: &ModuleContext,
    shared: &crate::runtime::Shared,
    force: bool,
) -> Result<AccessToken, TokenProblem> {
    let settings = OutlookSettings::load(ctx)
        .await
        .map_err(|e| TokenProblem::Configuration(e.to_string()))?;
    let mut cached = shared.app_token.lock().await;
    let margin = Duration::minutes(REFRESH_MARGIN_MINUTES);
    if let Some(t) = cached.as_ref()
        && !force
        && t.client_id == settings.client_id
        && t.expires_at > ctx.clock().now() + margin
    {
        return Ok(AccessToken {
            token: t.token.clone(),
            version: t.version,
            refreshed: false,
        });
    }
    match token_client::request(&shared.http, &settings, Grant::ClientCredentials).await {
        Ok(tokens) => {
            let version = cached.as_ref().map_or(1, |t| t.version + 1);
            *cached = Some(crate::runtime::AppToken {
                client_id: settings.client_id.clone(),
                token: tokens.access_token.clone(),
                expires_at: ctx.clock().now() + Duration::seconds(tokens.expires_in),
                version,
            });
            tracing::info!("app-only token fetched");
            Ok(AccessToken {
                token: tokens.access_token,
                version,
                refreshed: true,
            })
        }
        Err(failure) if failure.class == FailureClass::Transient => Err(TokenProblem::Transient {
            reason: failure.description.clone(),
            retry_after_secs: failure.retry_after_secs,
        }),
        Err(failure) => Err(TokenProblem::Configuration(format!(
            "{} For app-only sending, the app needs the Office 365 Exchange Online permission SMTP.SendAsApp with admin consent, and an Exchange service principal with rights on the mailbox.",
            words(&failure, ctx)
        ))),
    }
}

/// A usable access token for `server`, refreshed first when it expires within five minutes
/// (or when `force` is set, after the server refused it).
pub async fn fresh_access_token(
    ctx: &ModuleContext,
    shared: &crate::runtime::Shared,
    server: &mail_server::Model,
    force: bool,
) -> Result<AccessToken, TokenProblem> {
    if server.auth == "app_only" {
        return app_only_token(ctx, shared, force).await;
    }
    let http = &shared.http;
    let row = token::Entity::find_by_id(server.id)
        .one(ctx.db())
        .await
        .map_err(db)?;
    let Some(row) = row else {
        return Err(TokenProblem::NotConnected);
    };
    if row.status != "valid" {
        return Err(TokenProblem::NeedsReconnect(
            row.last_error
                .unwrap_or_else(|| "The mail server must be reconnected.".into()),
        ));
    }
    let margin = Duration::minutes(REFRESH_MARGIN_MINUTES);
    if !force && row.access_expires_at > ctx.clock().now() + margin {
        return Ok(AccessToken {
            token: unseal(ctx, &row.access_token_sealed, &access_context(server.id))?,
            version: row.version,
            refreshed: false,
        });
    }
    refresh(ctx, http, server, row).await
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
            return Err(TokenProblem::NotConnected);
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
    http: &oauth2::reqwest::Client,
    server: &mail_server::Model,
    row: token::Model,
) -> Result<AccessToken, TokenProblem> {
    refresh_using(ctx, http, server, row, None).await
}

/// [`refresh`] with the module settings already loaded (a refresh run loads them once).
pub async fn refresh_using(
    ctx: &ModuleContext,
    http: &oauth2::reqwest::Client,
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
            let result = refresh_holding_lease(ctx, http, server, &row, settings).await;
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
            return Err(TokenProblem::Transient {
                reason: "another worker's token refresh did not finish".into(),
                retry_after_secs: None,
            });
        };
        if current.status != "valid" {
            return Err(TokenProblem::NeedsReconnect(
                current
                    .last_error
                    .unwrap_or_else(|| "The mail server must be reconnected.".into()),
            ));
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
            });
        }
        // The other worker gave up or its lease ran out: try to take the lease.
        row = current;
    }
}

async fn refresh_holding_lease(
    ctx: &ModuleContext,
    http: &oauth2::reqwest::Client,
    server: &mail_server::Model,
    row: &token::Model,
    settings: Option<&OutlookSettings>,
) -> Result<AccessToken, TokenProblem> {
    let loaded;
    let settings = match settings {
        Some(s) => s,
        None => {
            loaded = OutlookSettings::load(ctx)
                .await
                .map_err(|e| TokenProblem::Configuration(e.to_string()))?;
            &loaded
        }
    };
    let Some(sealed_refresh) = row.refresh_token_sealed.as_deref() else {
        let reason = "No refresh token is stored (offline_access was not granted). Reconnect the mail server.";
        mark_needs_reconnect(ctx, server, reason).await?;
        return Err(TokenProblem::NeedsReconnect(reason.into()));
    };
    let refresh_token = unseal(ctx, sealed_refresh, &refresh_context(server.id))?;
    match token_client::request(http, settings, Grant::RefreshToken(&refresh_token)).await {
        Ok(tokens) => {
            let now = ctx.clock().now();
            let sealer = ctx.sealer();
            let mut update = token::Entity::update_many()
                .col_expr(
                    token::Column::AccessTokenSealed,
                    Expr::value(
                        sealer.seal_secret(&tokens.access_token, &access_context(server.id)),
                    ),
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
                });
            }
            // Another worker refreshed first; its refresh token is the live one now.
            let winner = token::Entity::find_by_id(server.id)
                .one(ctx.db())
                .await
                .map_err(db)?
                .ok_or(TokenProblem::NotConnected)?;
            Ok(AccessToken {
                token: unseal(ctx, &winner.access_token_sealed, &access_context(server.id))?,
                version: winner.version,
                refreshed: false,
            })
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
                });
            }
            match failure.class {
                FailureClass::Transient => Err(TokenProblem::Transient {
                    reason: failure.description.clone(),
                    retry_after_secs: failure.retry_after_secs,
                }),
                FailureClass::Configuration => {
                    let reason = words(&failure, ctx);
                    if crate::jobs::remember_once(
                        ctx,
                        &format!("config_broken:{}", failure.code.unwrap_or(0)),
                        &reason,
                    )
                    .await
                    .unwrap_or(false)
                    {
                        let _ = ctx
                            .notifier()
                            .notify(Notification {
                                audience: Audience::Operators,
                                subject:
                                    "Microsoft Outlook: the client secret is invalid or expired"
                                        .into(),
                                body: format!(
                                    "{reason} Until then no token can be refreshed and mail waits."
                                ),
                                link: Some("/settings".into()),
                            })
                            .await;
                    }
                    let _ = token::Entity::update_many()
                        .col_expr(token::Column::LastError, Expr::value(reason.clone()))
                        .filter(token::Column::ServerId.eq(server.id))
                        .exec(ctx.db())
                        .await;
                    Err(TokenProblem::Configuration(reason))
                }
                FailureClass::NeedsReconnect | FailureClass::Refused => {
                    let reason = words(&failure, ctx);
                    mark_needs_reconnect(ctx, server, &reason).await?;
                    Err(TokenProblem::NeedsReconnect(reason))
                }
            }
        }
    }
}

//! The token store: sealed access and refresh tokens, one row per mail server, versioned.

use chrono::Duration;
use crm_sdk::ModuleContext;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter, Set, TransactionTrait};
use secrecy::SecretString;

use crate::connect::token_client::Tokens;
use crate::entities::{mail_server, token};

/// The seal context of a server's access token.
pub fn access_context(server_id: i32) -> String {
    format!("microsoft_outlook/token/{server_id}/access")
}

/// The seal context of a server's refresh token.
pub fn refresh_context(server_id: i32) -> String {
    format!("microsoft_outlook/token/{server_id}/refresh")
}

/// Stores the tokens of a fresh connection: status valid, version bumped, errors cleared;
/// with `transport` (a switch that this sign-in completes, e.g. `graph`), the server's
/// transport changes in the same transaction, so that no mail meets the new tokens on the old
/// transport.
pub async fn store_connected(
    ctx: &ModuleContext,
    server_id: i32,
    tokens: &Tokens,
    (signed_in_as, transport): (&str, Option<&str>),
) -> Result<token::Model, DbErr> {
    let now = ctx.clock().now();
    let sealer = ctx.sealer();
    let txn = ctx.db().begin().await?;
    let previous = token::Entity::find_by_id(server_id).one(&txn).await?;
    let version = previous.as_ref().map_or(1, |t| t.version + 1);
    let row = token::ActiveModel {
        server_id: Set(server_id),
        access_token_sealed: Set(
            sealer.seal_secret(&tokens.access_token, &access_context(server_id))
        ),
        refresh_token_sealed: Set(tokens
            .refresh_token
            .as_ref()
            .map(|r: &SecretString| sealer.seal_secret(r, &refresh_context(server_id)))),
        access_expires_at: Set(now + Duration::seconds(tokens.expires_in)),
        scopes: Set(tokens.scope.clone()),
        version: Set(version),
        status: Set("valid".into()),
        signed_in_as: Set(signed_in_as.to_string()),
        connected_at: Set(now),
        last_refresh_at: Set(None),
        last_error: Set(None),
        notified_at: Set(None),
        refresh_lease_until: Set(None),
        smtp_user: Set(None),
    };
    token::Entity::insert(row)
        .on_conflict(
            OnConflict::column(token::Column::ServerId)
                .update_columns([
                    token::Column::AccessTokenSealed,
                    token::Column::RefreshTokenSealed,
                    token::Column::AccessExpiresAt,
                    token::Column::Scopes,
                    token::Column::Version,
                    token::Column::Status,
                    token::Column::SignedInAs,
                    token::Column::ConnectedAt,
                    token::Column::LastRefreshAt,
                    token::Column::LastError,
                    token::Column::NotifiedAt,
                    token::Column::RefreshLeaseUntil,
                    token::Column::SmtpUser,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    if let Some(transport) = transport {
        mail_server::Entity::update_many()
            .col_expr(mail_server::Column::Transport, Expr::value(transport))
            .col_expr(mail_server::Column::UpdatedAt, Expr::value(now))
            .filter(mail_server::Column::Id.eq(server_id))
            .exec(&txn)
            .await?;
    }
    let stored = token::Entity::find_by_id(server_id)
        .one(&txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("token of server {server_id}")))?;
    txn.commit().await?;
    Ok(stored)
}

/// An access token ready to use.
pub struct AccessToken {
    /// The bearer token.
    pub token: SecretString,
    /// The row version it belongs to (connections are reused per version).
    pub version: i64,
    /// Whether this call refreshed it.
    pub refreshed: bool,
    /// The `user=` identities SMTP AUTH may use, the one known to work first (the mailbox
    /// address, the signed-in UPN).
    pub identities: Vec<String>,
}

//! The state of every mail server, for the operator CLI and scripts.

use chrono::{DateTime, Utc};
use crm_sdk::ModuleContext;
use sea_orm::{EntityTrait, QueryOrder};
use serde::Serialize;

use crate::delivery::health::Health;
use crate::entities::{mail_server, token};

/// One mail server's state.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    /// The server's id.
    pub id: i32,
    /// Its name.
    pub name: String,
    /// The mailbox address.
    pub mailbox: String,
    /// `shared` or `personal`.
    pub kind: String,
    /// `smtp` or `graph`: how its mail goes out.
    pub transport: String,
    /// `delegated` or `app_only`.
    pub auth: String,
    /// `held:<reason>` or `throttled` (the mailbox's health), else the token's state:
    /// `not_connected`, `app_only`, `valid` or `needs_reconnect`.
    pub status: String,
    /// The mailbox's health: `ready`, `throttled` or `held`.
    pub health: String,
    /// Why it is held, in words.
    pub held_because: Option<String>,
    /// Since when it is held or throttled.
    pub since: Option<DateTime<Utc>>,
    /// Mails queued or being sent through it.
    pub waiting: i64,
    /// When the access token expires.
    pub access_expires_at: Option<DateTime<Utc>>,
    /// When the token was last refreshed.
    pub last_refresh_at: Option<DateTime<Utc>>,
    /// The last error, in words.
    pub last_error: Option<String>,
}

/// Every server with its token state.
pub async fn all(ctx: &ModuleContext) -> Result<Vec<ServerStatus>, sea_orm::DbErr> {
    let servers = mail_server::Entity::find()
        .order_by_asc(mail_server::Column::Id)
        .all(ctx.db())
        .await?;
    let tokens = token::Entity::find().all(ctx.db()).await?;
    let healths = crate::delivery::health::all(ctx).await?;
    let waiting = crate::delivery::health::waiting_counts(ctx).await?;
    let now = ctx.clock().now();
    Ok(servers
        .into_iter()
        .map(|s| {
            let t = tokens.iter().find(|t| t.server_id == s.id);
            let health = Health::of(healths.get(&s.id), now);
            let (held_because, since) = match &health {
                Health::Held { detail, since, .. } => (Some(detail.clone()), Some(*since)),
                Health::Throttled { .. } => (None, healths.get(&s.id).and_then(|h| h.since)),
                Health::Ready => (None, None),
            };
            ServerStatus {
                id: s.id,
                name: s.name,
                mailbox: s.mailbox,
                kind: s.kind,
                transport: s.transport,
                status: match (&health, t) {
                    (Health::Held { reason, .. }, _) => format!("held:{}", reason.as_str()),
                    (Health::Throttled { .. }, _) => "throttled".into(),
                    (Health::Ready, None) if s.auth == "app_only" => "app_only".into(),
                    (Health::Ready, None) => "not_connected".into(),
                    (Health::Ready, Some(t)) => t.status.clone(),
                },
                health: health.state().into(),
                held_because,
                since,
                waiting: waiting.get(&s.id).copied().unwrap_or(0),
                auth: s.auth,
                access_expires_at: t.map(|t| t.access_expires_at),
                last_refresh_at: t.and_then(|t| t.last_refresh_at),
                last_error: t.and_then(|t| t.last_error.clone()),
            }
        })
        .collect())
}

/// A plain-text table of `rows`.
pub fn table(rows: &[ServerStatus]) -> String {
    let fmt = |d: Option<DateTime<Utc>>| {
        d.map(|d| d.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "-".into())
    };
    // A name is cut to its column, so that two servers of one mailbox can be told apart.
    let name = |n: &str| {
        if n.chars().count() > 20 {
            format!("{}…", n.chars().take(19).collect::<String>())
        } else {
            n.to_string()
        }
    };
    let mut out = format!(
        "{:<4} {:<20} {:<32} {:<9} {:<5} {:<28} {:<8} {:<17} {:<17} {}\n",
        "ID",
        "NAME",
        "MAILBOX",
        "KIND",
        "VIA",
        "STATUS",
        "WAITING",
        "ACCESS EXPIRES",
        "LAST REFRESH",
        "LAST ERROR"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<4} {:<20} {:<32} {:<9} {:<5} {:<28} {:<8} {:<17} {:<17} {}\n",
            r.id,
            name(&r.name),
            r.mailbox,
            r.kind,
            r.transport,
            r.status,
            r.waiting,
            fmt(r.access_expires_at),
            fmt(r.last_refresh_at),
            r.held_because
                .as_deref()
                .or(r.last_error.as_deref())
                .unwrap_or("-")
        ));
    }
    out
}

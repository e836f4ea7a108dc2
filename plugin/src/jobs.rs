//! The plugin's side of the scheduled jobs: what the refresh and secret-expiry runs do.

use chrono::NaiveDate;
use crm_sdk::{Audience, ModuleContext, Notification};
use microsoft_outlook_jobs::{BoxDynError, OutlookJobs};
use sea_orm::EntityTrait;

use crate::alerts::remember_once;
use crate::entities::token;
use crate::settings::OutlookSettings;

/// The days before the client secret expires at which operators are warned.
pub const SECRET_WARNING_DAYS: [i64; 3] = [30, 7, 1];

/// The module's services as the job runner sees them.
#[derive(Clone)]
pub struct JobServices {
    /// The module's context.
    pub ctx: ModuleContext,
    /// Routes' and jobs' shared state.
    pub shared: std::sync::Arc<crate::runtime::Shared>,
}

/// Days from `today` until `expires_on` (negative once past).
pub fn days_left(expires_on: NaiveDate, today: NaiveDate) -> i64 {
    (expires_on - today).num_days()
}

/// The incident key of the client secret's expiry warnings: resolved once the stored expiry
/// date is more than 30 days ahead (or gone).
pub const SECRET_EXPIRY_KEY: &str = "microsoft_outlook/client_secret/expiry";

/// Warns operators once per threshold (30, 7, 1 days) before the client secret expires, and
/// once after; the warning open replaces the earlier ones, and all are resolved when the date
/// is moved more than 30 days ahead. The days left, or `None` without settings or a date.
pub async fn check_client_secret(ctx: &ModuleContext) -> Result<Option<i64>, BoxDynError> {
    let Ok(settings) = OutlookSettings::load(ctx).await else {
        return Ok(None);
    };
    let Some(expires_on) = settings.secret_expires_on else {
        ctx.notifier().resolve(SECRET_EXPIRY_KEY).await?;
        return Ok(None);
    };
    let left = days_left(expires_on, ctx.clock().now().date_naive());
    let Some(threshold) = SECRET_WARNING_DAYS
        .iter()
        .copied()
        .filter(|t| left <= *t)
        .min()
    else {
        // A new secret (or a corrected date) far enough ahead: the earlier warnings are done,
        // unless the date changed again since this run read it (a run that read the old date
        // must not resolve the warning of a new, nearer one).
        let still = OutlookSettings::load(ctx)
            .await
            .ok()
            .and_then(|s| s.secret_expires_on);
        if still == Some(expires_on) {
            ctx.notifier().resolve(SECRET_EXPIRY_KEY).await?;
        }
        return Ok(Some(left));
    };
    // Past the date, one more notice: it says the secret expired.
    let key = if left < 0 {
        format!("client_secret:{expires_on}:expired")
    } else {
        format!("client_secret:{expires_on}:{threshold}")
    };
    if remember_once(ctx, &key, &left.to_string()).await? {
        let (subject, body) = if left < 0 {
            (
                format!("The Microsoft Outlook client secret expired on {expires_on}"),
                "Microsoft refuses an expired secret: no mailbox can renew its token, so mail stops within the hour. Create a new client secret in Microsoft Entra ID (App registrations › your app › Certificates & secrets) and paste its Value and its expiry date in Settings › Microsoft Outlook. If the check of a save says Microsoft still accepts the secret, the date is wrong: correct it there instead.".to_string(),
            )
        } else {
            (
                format!(
                    "The Microsoft Outlook client secret expires in {left} day(s), on {expires_on}"
                ),
                format!(
                    "Create a new client secret in Microsoft Entra ID (App registrations › your app › Certificates & secrets) and paste its Value and its expiry date in Settings › Microsoft Outlook before {expires_on}: from that day Microsoft refuses the old one, and mail stops within the hour."
                ),
            )
        };
        // One warning open at a time: the latest replaces the earlier ones.
        ctx.notifier().resolve(SECRET_EXPIRY_KEY).await?;
        ctx.notifier()
            .notify(Notification {
                audience: Audience::Operators,
                subject,
                body,
                link: Some("/settings".into()),
                key: Some(SECRET_EXPIRY_KEY.into()),
            })
            .await?;
        tracing::warn!(
            days_left = left,
            threshold,
            "client secret expiry warning sent"
        );
    }
    Ok(Some(left))
}

/// What a refresh run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefreshSummary {
    /// Tokens refreshed by this run.
    pub refreshed: usize,
    /// Mailboxes skipped (needs reconnect, or refreshed meanwhile by another worker).
    pub skipped: usize,
    /// Refreshes that failed and will be tried again next run.
    pub failed: usize,
    /// Mailboxes whose grant turned out dead in this run.
    pub needs_reconnect: usize,
}

impl std::fmt::Display for RefreshSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "token refresh: refreshed={} skipped={} failed={} needs_reconnect={}",
            self.refreshed, self.skipped, self.failed, self.needs_reconnect
        )
    }
}

pub use crate::runtime::RefreshOptions;

enum One {
    Refreshed,
    Skipped,
    Failed,
    NeedsReconnect,
}

async fn refresh_one(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<crate::runtime::Shared>,
    server: &crate::entities::mail_server::Model,
    seen: token::Model,
    settings: Option<&OutlookSettings>,
    options: &RefreshOptions,
) -> One {
    use crate::tokens::service::{TokenProblem, refresh_using};
    let seen_version = seen.version;
    let mut first = Some(seen);
    if !options.max_jitter.is_zero() {
        let wait = rand::random_range(0..=options.max_jitter.as_millis() as u64);
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    }
    let mut tries = 0;
    loop {
        // The run's own read first (the refresh lease checks the version); again on retries.
        let row = match first.take() {
            Some(row) => row,
            None => match token::Entity::find_by_id(server.id).one(ctx.db()).await {
                Ok(Some(row)) if row.status == "valid" => row,
                Ok(_) => return One::Skipped,
                Err(_) => return One::Failed,
            },
        };
        // Refreshed since this run looked (by another process's run, or a delivery).
        if row.version != seen_version {
            return One::Skipped;
        }
        match refresh_using(ctx, shared, server, row, settings).await {
            Ok(t) if t.refreshed => return One::Refreshed,
            Ok(_) => return One::Skipped,
            Err(problem) if problem.grant_dead() => return One::NeedsReconnect,
            Err(TokenProblem::Transient {
                retry_after_secs, ..
            }) if tries < options.transient_retries => {
                tries += 1;
                let wait = retry_after_secs.unwrap_or(1u64 << tries).min(60);
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            }
            // Another worker's refresh did not finish in time: look again.
            Err(TokenProblem::Busy(_)) if tries < options.transient_retries => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1u64 << tries)).await;
            }
            Err(_) => return One::Failed,
        }
    }
}

/// Refreshes the token of every connected delegated mailbox (or only `only`), so that no
/// refresh token lapses from 90 days without use.
pub async fn refresh_all(
    ctx: &ModuleContext,
    shared: &std::sync::Arc<crate::runtime::Shared>,
    only: Option<i32>,
    options: &RefreshOptions,
) -> Result<RefreshSummary, sea_orm::DbErr> {
    use crate::entities::mail_server;
    use futures::StreamExt;
    use sea_orm::{ColumnTrait, QueryFilter};
    let mut query = mail_server::Entity::find().filter(mail_server::Column::Auth.eq("delegated"));
    if let Some(id) = only {
        query = query.filter(mail_server::Column::Id.eq(id));
    }
    let servers = query.all(ctx.db()).await?;
    let tokens = token::Entity::find().all(ctx.db()).await?;
    let mut summary = RefreshSummary::default();
    let mut due = Vec::new();
    let recent = ctx.clock().now()
        - chrono::Duration::from_std(options.skip_refreshed_within)
            .unwrap_or(chrono::Duration::zero());
    for server in servers {
        match tokens.iter().find(|t| t.server_id == server.id) {
            Some(t) if t.status == "valid" && t.last_refresh_at.is_none_or(|at| at <= recent) => {
                due.push((server, t.clone()))
            }
            Some(_) => summary.skipped += 1,
            None => {}
        }
    }
    // Loaded once for the run (each refresh would otherwise read and unseal them again).
    let settings = OutlookSettings::load(ctx).await.ok();
    let settings = settings.as_ref();
    let results: Vec<One> = futures::stream::iter(due)
        .map(|(server, seen)| async move {
            refresh_one(ctx, shared, &server, seen, settings, options).await
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    for r in results {
        match r {
            One::Refreshed => summary.refreshed += 1,
            One::Skipped => summary.skipped += 1,
            One::Failed => summary.failed += 1,
            One::NeedsReconnect => summary.needs_reconnect += 1,
        }
    }
    Ok(summary)
}

impl OutlookJobs for JobServices {
    async fn refresh_tokens(&self) -> Result<String, BoxDynError> {
        let summary =
            refresh_all(&self.ctx, &self.shared, None, &self.shared.options.refresh).await?;
        Ok(summary.to_string())
    }

    async fn check_client_secret(&self) -> Result<(), BoxDynError> {
        check_client_secret(&self.ctx).await.map(|_| ())
    }

    async fn drain(&self, server_id: i32) -> Result<(), BoxDynError> {
        // The database may be restarting: wait for it (about half a minute) rather than let
        // the job fail; the outbox rows stay the truth either way.
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            match crate::delivery::drains::run(&self.ctx, &self.shared, server_id).await {
                Ok(()) => return Ok(()),
                Err(e) if wait <= std::time::Duration::from_secs(16) => {
                    self.shared.note_db_error(&e);
                    tracing::warn!(error = %e, server_id, "a drain hit a database error; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn sweep_outbox(&self) -> Result<(), BoxDynError> {
        // Twice the lease timeout (1 to 10 minutes): a job still waiting then is taken as lost.
        let repush_after =
            chrono::Duration::seconds((self.shared.options.lease_secs * 2).clamp(60, 600));
        let servers = crate::outbox::sweep::to_wake(&self.ctx, &self.shared, repush_after)
            .await
            .inspect_err(|e| self.shared.note_db_error(e))?;
        self.shared.note_db_reached();
        if !servers.is_empty() {
            tracing::debug!(
                count = servers.len(),
                "outbox sweep wakes mailboxes with due mail"
            );
            // In a process that delivers, its dispatcher starts the drains at once; elsewhere
            // a drain job is pushed. (A job pushed here waited for the SQLite queue's worker,
            // which in tests took it only at its 30 s heartbeat: a retry went out up to half a
            // minute after it was due.)
            self.shared.wake_many(&servers).await;
        }
        // Sent mails' texts past the retention go, a few hundred at a time, hourly.
        let due = {
            let mut last = self
                .shared
                .last_prune
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(3600));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            let limits = crate::delivery::limits::limits(&self.ctx, &self.shared).await;
            let before = self.ctx.clock().now() - chrono::Duration::days(limits.keep_sent_days);
            // A turn per 500 bodies: the drains' claims and outcomes get theirs in between.
            loop {
                let turn = self.shared.write_gate(&self.ctx).await;
                if crate::outbox::sweep::prune_bodies(turn.db(), before, 500).await? < 500 {
                    break;
                }
            }
        }
        Ok(())
    }
}

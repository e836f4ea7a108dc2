//! The plugin's side of the scheduled jobs: what the refresh and secret-expiry runs do.

use chrono::{NaiveDate, Utc};
use crm_sdk::{Audience, ModuleContext, Notification};
use microsoft_outlook_jobs::{BoxDynError, OutlookJobs};
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, PaginatorTrait, Set};

use crate::entities::{alert, token};
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

/// Records `key` once; returns whether it was new (so the caller notifies once).
pub async fn remember_once(
    ctx: &ModuleContext,
    key: &str,
    value: &str,
) -> Result<bool, sea_orm::DbErr> {
    let inserted = alert::Entity::insert(alert::ActiveModel {
        key: Set(key.to_string()),
        value: Set(value.to_string()),
        at: Set(ctx.clock().now()),
    })
    .on_conflict(
        OnConflict::column(alert::Column::Key)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(ctx.db())
    .await?;
    Ok(inserted > 0)
}

/// Warns operators once per threshold (30, 7, 1 days) before the client secret expires.
pub async fn check_client_secret(ctx: &ModuleContext) -> Result<Option<i64>, BoxDynError> {
    let Ok(settings) = OutlookSettings::load(ctx).await else {
        return Ok(None);
    };
    let Some(expires_on) = settings.secret_expires_on else {
        return Ok(None);
    };
    let left = days_left(expires_on, ctx.clock().now().date_naive());
    let Some(threshold) = SECRET_WARNING_DAYS
        .iter()
        .copied()
        .filter(|t| left <= *t)
        .min()
    else {
        return Ok(Some(left));
    };
    let key = format!("client_secret:{expires_on}:{threshold}");
    if remember_once(ctx, &key, &left.to_string()).await? {
        let subject = if left < 0 {
            "The Microsoft Outlook client secret has expired".to_string()
        } else {
            format!("The Microsoft Outlook client secret expires in {left} day(s), on {expires_on}")
        };
        ctx.notifier()
            .notify(Notification {
                audience: Audience::Operators,
                subject,
                body: "Create a new client secret in Microsoft Entra ID (App registrations › your app › Certificates & secrets), paste its Value and its new expiry date in Settings › Microsoft Outlook. Mail stops when the old one expires.".into(),
                link: Some("/settings".into()),
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

impl OutlookJobs for JobServices {
    async fn refresh_tokens(&self) -> Result<String, BoxDynError> {
        let connected = token::Entity::find().count(self.ctx.db()).await?;
        Ok(format!(
            "token refresh run at {}: {connected} connected mailbox(es) seen",
            Utc::now()
        ))
    }

    async fn check_client_secret(&self) -> Result<(), BoxDynError> {
        check_client_secret(&self.ctx).await.map(|_| ())
    }

    async fn deliver(&self, outbox_id: i64) -> Result<(), BoxDynError> {
        crate::deliver::deliver(&self.ctx, &self.shared, outbox_id).await?;
        Ok(())
    }

    async fn sweep_outbox(&self) -> Result<(), BoxDynError> {
        let due = crate::deliver::due_ids(&self.ctx, 5000).await?;
        if !due.is_empty() {
            tracing::debug!(count = due.len(), "outbox sweep re-queues due mails");
            self.shared.push(&due).await;
        }
        Ok(())
    }
}

//! Notifications: stored in the host's table and listed on the notifications page.

use actix_web::{HttpResponse, web};
use async_trait::async_trait;
use chrono::Utc;
use crm_sdk::{Audience, BoxError, CurrentUser, Notification, Notifier};
use maud::html;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use crate::entities::notification;
use crate::html::ok;
use crate::state::AppState;

/// A notifier that keeps notifications in the database.
pub struct DbNotifier {
    db: DatabaseConnection,
}

impl DbNotifier {
    /// A notifier over `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl Notifier for DbNotifier {
    async fn notify(&self, n: Notification) -> Result<(), BoxError> {
        let (user_id, for_operators) = match n.audience {
            Audience::User(id) => (Some(id), false),
            Audience::Operators => (None, true),
        };
        tracing::info!(?user_id, for_operators, subject = %n.subject, "notification");
        notification::ActiveModel {
            user_id: Set(user_id),
            for_operators: Set(for_operators),
            subject: Set(n.subject),
            body: Set(n.body),
            link: Set(n.link),
            created_at: Set(Utc::now()),
            incident_key: Set(n.key),
            resolved_at: Set(None),
            ..Default::default()
        }
        .insert(&self.db)
        .await?;
        Ok(())
    }

    async fn resolve(&self, key: &str) -> Result<(), BoxError> {
        let resolved = notification::Entity::update_many()
            .col_expr(
                notification::Column::ResolvedAt,
                sea_orm::sea_query::Expr::value(Utc::now()),
            )
            .filter(notification::Column::IncidentKey.eq(key))
            .filter(notification::Column::ResolvedAt.is_null())
            .exec(&self.db)
            .await?;
        if resolved.rows_affected > 0 {
            tracing::info!(key, "notifications resolved");
        }
        Ok(())
    }
}

async fn page(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    let mut mine = Condition::any().add(notification::Column::UserId.eq(user.id));
    if user.is_admin {
        mine = mine.add(notification::Column::ForOperators.eq(true));
    }
    let items = notification::Entity::find()
        .filter(mine)
        .order_by_desc(notification::Column::Id)
        .limit(200)
        .all(&state.db)
        .await
        .unwrap_or_default();
    let body = html! {
        h1 { "Notifications" }
        @if items.is_empty() { section.card { p { "Nothing needs your attention." } } }
        @for n in &items {
            section.card.notification.resolved[n.resolved_at.is_some()] {
                h2 { (n.subject) @if n.resolved_at.is_some() { " " span.badge.ok { "Resolved" } } }
                @if let Some(at) = n.resolved_at { p.help { "Resolved " (at.format("%Y-%m-%d %H:%M UTC")) ": nothing left to do." } }
                p.help { (n.created_at.format("%Y-%m-%d %H:%M UTC")) @if n.for_operators { " · for operators" } }
                p { (n.body) }
                @if let (Some(link), None) = (&n.link, n.resolved_at) { p { a href=(link) { "Fix it" } } }
            }
        }
    };
    ok(state.chrome.render("Notifications", Some(&user), body))
}

/// The notification routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/notifications", web::get().to(page));
}

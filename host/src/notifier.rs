//! Notifications: stored in the host's table and listed on the notifications page.

use actix_web::{HttpResponse, web};
use async_trait::async_trait;
use chrono::Utc;
use crm_sdk::{Audience, BoxError, CurrentUser, Notification, Notifier};
use maud::html;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
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

    async fn resolve_for(&self, key: &str, user_id: i64) -> Result<(), BoxError> {
        let resolved = notification::Entity::update_many()
            .col_expr(
                notification::Column::ResolvedAt,
                sea_orm::sea_query::Expr::value(Utc::now()),
            )
            .filter(notification::Column::IncidentKey.eq(key))
            .filter(notification::Column::UserId.eq(user_id))
            .filter(notification::Column::ForOperators.eq(false))
            .filter(notification::Column::ResolvedAt.is_null())
            .exec(&self.db)
            .await?;
        if resolved.rows_affected > 0 {
            tracing::info!(key, user_id, "a user's notifications resolved");
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct PageQuery {
    read: Option<String>,
}

async fn page(
    state: web::Data<AppState>,
    user: CurrentUser,
    query: web::Query<PageQuery>,
) -> HttpResponse {
    let items = notification::Entity::find()
        .filter(crate::inbox::visible_to(&user))
        .order_by_desc(notification::Column::Id)
        .limit(200)
        .all(&state.db)
        .await
        .unwrap_or_default();
    let read = crate::inbox::read_ids(&state.db, &user, items.iter().map(|n| n.id).collect())
        .await
        .unwrap_or_default();
    let unread = crate::inbox::current_unread();
    let body = html! {
        h1 { "Notifications" }
        @match query.read.as_deref() {
            Some("all") => p.flash.ok role="status" { "All notifications marked read." },
            Some(_) => p.flash.ok role="status" { "Marked read." },
            None => {},
        }
        @if items.is_empty() { section.card { p { "Nothing needs your attention." } } }
        @else {
            p.inbox-summary {
                @if unread == 0 { "No unread notifications. " } @else { (unread) " unread. " }
                @if unread > 0 {
                    form.inline method="post" action="/notifications/read-all" {
                        (crate::html::csrf(&user))
                        button.secondary type="submit" { "Mark all read" }
                    }
                }
            }
        }
        // What still needs someone first; what is resolved below, folded (kept for the
        // record).
        @if !items.is_empty() && items.iter().all(|n| n.resolved_at.is_some()) {
            section.card { p { "Nothing needs your attention." } }
        }
        @for n in items.iter().filter(|n| n.resolved_at.is_none()) { (card(n, &read, &user)) }
        @let resolved: Vec<&notification::Model> = items.iter().filter(|n| n.resolved_at.is_some()).collect();
        @if !resolved.is_empty() {
            details.resolved-list {
                summary { "Resolved (" (resolved.len()) "): nothing left to do" }
                @for n in resolved { (card(n, &read, &user)) }
            }
        }
    };
    ok(state.chrome.render("Notifications", Some(&user), body))
}

/// One notification as a card: its subject, when, what it says (folded once resolved), and
/// what the reader can do (Fix it while open, Mark read while unread).
fn card(
    n: &notification::Model,
    read: &std::collections::HashSet<i64>,
    user: &CurrentUser,
) -> maud::Markup {
    html! {
        @let is_unread = n.resolved_at.is_none() && !read.contains(&n.id);
        section.card.notification.resolved[n.resolved_at.is_some()].unread[is_unread] id=(format!("notification-{}", n.id)) {
            h2 {
                @if is_unread { span.badge.warn { "Unread" } " " }
                (n.subject)
                @if n.resolved_at.is_some() { " " span.badge.ok { "Resolved" } }
            }
            @if let Some(at) = n.resolved_at { p.help { "Resolved " (at.format("%Y-%m-%d %H:%M UTC")) ": nothing left to do." } }
            p.help { (n.created_at.format("%Y-%m-%d %H:%M UTC")) @if n.for_operators { " · for operators" } }
            @if n.resolved_at.is_some() {
                // What it asked is done: kept for the record, folded away.
                details.resolved-body { summary { "What it said" } p { (n.body) } }
            } @else {
                p { (n.body) }
            }
            p {
                @if let (Some(link), None) = (&n.link, n.resolved_at) { a href=(link) { "Fix it" } " " }
                @if is_unread {
                    form.inline method="post" action=(format!("/notifications/{}/read", n.id)) {
                        (crate::html::csrf(user))
                        button.secondary type="submit" { "Mark read" }
                    }
                }
            }
        }
    }
}

/// The notification routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/notifications", web::get().to(page))
        .configure(crate::inbox::routes);
}

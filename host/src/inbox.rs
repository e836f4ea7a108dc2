//! Notifications as an inbox: who sees which, what each person has read, the unread count in
//! the navigation, and marking read (one or all).

use actix_web::{HttpResponse, web};
use chrono::Utc;
use crm_sdk::CurrentUser;
use sea_orm::sea_query::{Expr, OnConflict, Query, SelectStatement};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QuerySelect, QueryTrait, Set,
};

use crate::entities::{notification, notification_read};
use crate::state::AppState;

tokio::task_local! {
    /// The signed-in person's unread count for the page being rendered (set by the session
    /// middleware around the handler, read by the page frame).
    static UNREAD: u64;
}

/// The notifications `user` sees: their own, and the operators' when they are one.
pub fn visible_to(user: &CurrentUser) -> Condition {
    let mut mine = Condition::any().add(notification::Column::UserId.eq(user.id));
    if user.is_admin {
        mine = mine.add(notification::Column::ForOperators.eq(true));
    }
    mine
}

/// The notifications `user` sees that are neither resolved nor read by them.
fn unread(user: &CurrentUser) -> sea_orm::Select<notification::Entity> {
    notification::Entity::find()
        .filter(visible_to(user))
        .filter(notification::Column::ResolvedAt.is_null())
        .filter(
            notification::Column::Id.not_in_subquery(
                Query::select()
                    .column(notification_read::Column::NotificationId)
                    .from(notification_read::Entity)
                    .and_where(notification_read::Column::UserId.eq(user.id))
                    .to_owned(),
            ),
        )
}

/// Notifications `user` sees that are neither resolved nor read by them.
pub async fn unread_count(db: &DatabaseConnection, user: &CurrentUser) -> Result<u64, DbErr> {
    unread(user).count(db).await
}

/// Marks every unread notification of `user` read in one `INSERT … SELECT`: however many
/// there are, no id travels (a list of ids as bind variables breaks SQLite's limit of
/// 32766 variables).
async fn mark_all(db: &DatabaseConnection, user: &CurrentUser) -> Result<(), DbErr> {
    let select: SelectStatement = unread(user)
        .select_only()
        .column(notification::Column::Id)
        .expr(Expr::val(user.id))
        .expr(Expr::val(Utc::now()))
        .into_query();
    let mut insert = Query::insert();
    insert
        .into_table(notification_read::Entity)
        .columns([
            notification_read::Column::NotificationId,
            notification_read::Column::UserId,
            notification_read::Column::ReadAt,
        ])
        .select_from(select)
        .map_err(|e| DbErr::Custom(e.to_string()))?
        .on_conflict(
            OnConflict::columns([
                notification_read::Column::NotificationId,
                notification_read::Column::UserId,
            ])
            .do_nothing()
            .to_owned(),
        );
    db.execute(&insert).await.map(|_| ())
}

/// The ids among `ids` that `user` has read.
pub async fn read_ids(
    db: &DatabaseConnection,
    user: &CurrentUser,
    ids: Vec<i64>,
) -> Result<std::collections::HashSet<i64>, DbErr> {
    Ok(notification_read::Entity::find()
        .filter(notification_read::Column::UserId.eq(user.id))
        .filter(notification_read::Column::NotificationId.is_in(ids))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.notification_id)
        .collect())
}

/// Runs `page` with `count` as the unread count the frame shows.
pub async fn with_unread<F: std::future::Future>(count: u64, page: F) -> F::Output {
    UNREAD.scope(count, page).await
}

/// The unread count of the page being rendered (0 outside a signed-in request).
pub fn current_unread() -> u64 {
    UNREAD.try_with(|n| *n).unwrap_or(0)
}

async fn mark(db: &DatabaseConnection, user: &CurrentUser, ids: Vec<i64>) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    notification_read::Entity::insert_many(ids.into_iter().map(|id| {
        notification_read::ActiveModel {
            notification_id: Set(id),
            user_id: Set(user.id),
            read_at: Set(now),
        }
    }))
    .on_conflict_do_nothing_on([
        notification_read::Column::NotificationId,
        notification_read::Column::UserId,
    ])
    .exec(db)
    .await
    .map(|_| ())
}

/// The notification `id` if `user` sees it (as a list of its id, or empty).
async fn visible_ids(
    db: &DatabaseConnection,
    user: &CurrentUser,
    id: i64,
) -> Result<Vec<i64>, DbErr> {
    notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .filter(visible_to(user))
        .filter(notification::Column::Id.eq(id))
        .into_tuple::<i64>()
        .all(db)
        .await
}

fn back(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .finish()
}

async fn read_one(
    state: web::Data<AppState>,
    user: CurrentUser,
    id: web::Path<i64>,
) -> HttpResponse {
    // Someone else's notification answers like a missing one.
    match visible_ids(&state.db, &user, id.into_inner()).await {
        Ok(ids) if ids.is_empty() => HttpResponse::NotFound().body("No such notification."),
        Ok(ids) => match mark(&state.db, &user, ids).await {
            Ok(()) => back("/notifications?read=1"),
            Err(e) => unavailable(e),
        },
        Err(e) => unavailable(e),
    }
}

async fn read_all(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    match mark_all(&state.db, &user).await {
        Ok(()) => {
            tracing::info!(user_id = user.id, "notifications marked read");
            back("/notifications?read=all")
        }
        Err(e) => unavailable(e),
    }
}

fn unavailable(e: DbErr) -> HttpResponse {
    tracing::error!(error = %e, "marking notifications read failed");
    HttpResponse::ServiceUnavailable().body("The database did not answer; nothing changed.")
}

/// The routes that mark notifications read.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/notifications/read-all", web::post().to(read_all))
        .route("/notifications/{id}/read", web::post().to(read_one));
}

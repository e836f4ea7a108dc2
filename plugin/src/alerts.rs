//! Things told once: a key per incident, so that a notification is sent once however many
//! processes and runs meet the incident, and again only after it ended.

use crm_sdk::ModuleContext;
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, Set};

use crate::entities::alert;

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

/// Forgets that `key` was told (the incident ended; a new one is told again).
pub async fn forget_alert(ctx: &ModuleContext, key: &str) -> Result<(), sea_orm::DbErr> {
    alert::Entity::delete_by_id(key.to_string())
        .exec(ctx.db())
        .await?;
    Ok(())
}

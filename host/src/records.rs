//! Contact records: the record directory modules look records up in, and the contact pages.

use std::collections::{BTreeSet, HashMap};

use actix_web::{HttpResponse, web};
use async_trait::async_trait;
use crm_sdk::{BoxError, CurrentUser, RecordAccess, RecordDirectory, RecordRef, RecordSummary};
use maud::{PreEscaped, html};
use sea_orm::{ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};

use crate::entities::contact;
use crate::html::ok;
use crate::state::AppState;

/// The model name of contacts.
pub const CONTACT: &str = "contact";

/// Records in the host's tables: a private contact is visible to its owner and operators.
pub struct DbRecordDirectory {
    db: DatabaseConnection,
}

impl DbRecordDirectory {
    /// A directory over `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn may_see(contact: &contact::Model, viewer: &CurrentUser) -> bool {
    !contact.private || contact.owner_user_id == viewer.id || viewer.is_admin
}

fn access(found: Option<&contact::Model>, viewer: &CurrentUser) -> RecordAccess {
    match found {
        None => RecordAccess::Missing,
        Some(contact) if !may_see(contact, viewer) => RecordAccess::Hidden,
        Some(contact) => RecordAccess::Visible(RecordSummary {
            url: format!("/contacts/{}", contact.id),
            title: contact.name.clone(),
            email: contact.email.clone(),
        }),
    }
}

#[async_trait]
impl RecordDirectory for DbRecordDirectory {
    async fn find(
        &self,
        record: &RecordRef,
        viewer: &CurrentUser,
    ) -> Result<RecordAccess, BoxError> {
        if record.model != CONTACT {
            return Ok(RecordAccess::Missing);
        }
        // By key, without `.one()`'s bound limit (see crate::db::first).
        let found = contact::Entity::find_by_id(record.id).all(&self.db).await?;
        Ok(access(crate::db::first(found).as_ref(), viewer))
    }

    /// One query for all the contacts asked for (`id IN (...)`).
    async fn find_many(
        &self,
        lookups: &[(&RecordRef, &CurrentUser)],
    ) -> Result<Vec<RecordAccess>, BoxError> {
        let ids: BTreeSet<i64> = lookups
            .iter()
            .filter(|(record, _)| record.model == CONTACT)
            .map(|(record, _)| record.id)
            .collect();
        let found: HashMap<i64, contact::Model> = if ids.is_empty() {
            HashMap::new()
        } else {
            contact::Entity::find()
                .filter(contact::Column::Id.is_in(ids))
                .all(&self.db)
                .await?
                .into_iter()
                .map(|c| (c.id, c))
                .collect()
        };
        Ok(lookups
            .iter()
            .map(|(record, viewer)| {
                let contact = (record.model == CONTACT)
                    .then(|| found.get(&record.id))
                    .flatten();
                access(contact, viewer)
            })
            .collect())
    }
}

async fn list(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    let mut visible = Condition::any()
        .add(contact::Column::Private.eq(false))
        .add(contact::Column::OwnerUserId.eq(user.id));
    if user.is_admin {
        visible = Condition::all();
    }
    let contacts = contact::Entity::find()
        .filter(visible)
        .order_by_asc(contact::Column::Name)
        .all(&state.db)
        .await
        .unwrap_or_default();
    let body = html! {
        h1 { "Contacts" }
        section.card {
            table {
                thead { tr { th { "Name" } th { "Company" } th { "E-mail" } } }
                tbody {
                    @for c in &contacts {
                        tr {
                            td { a href=(format!("/contacts/{}", c.id)) { (c.name) } @if c.private { " " span.badge.muted { "private" } } }
                            td { (c.company.as_deref().unwrap_or("")) }
                            td { (c.email.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
            @if contacts.is_empty() { p { "No contacts yet." } }
        }
    };
    ok(state.chrome.render("Contacts", Some(&user), body))
}

async fn show(state: web::Data<AppState>, user: CurrentUser, id: web::Path<i64>) -> HttpResponse {
    let id = id.into_inner();
    let found = contact::Entity::find_by_id(id)
        .all(&state.db)
        .await
        .ok()
        .and_then(crate::db::first);
    let Some(contact) = found.filter(|c| may_see(c, &user)) else {
        return HttpResponse::NotFound()
            .content_type("text/html; charset=utf-8")
            .body(state.chrome.render("Not found", Some(&user), html! { h1 { "No such contact" } p { a href="/contacts" { "Back to contacts" } } }).into_string());
    };
    let record = RecordRef {
        model: CONTACT.into(),
        id,
    };
    let mut panels = Vec::new();
    for entry in state.registry.entries() {
        if entry.is_enabled()
            && let Some(panel) = entry.module.record_panel(&entry.ctx, &record, &user).await
        {
            panels.push(panel);
        }
    }
    let body = html! {
        h1 { (contact.name) }
        section.card {
            p { strong { "Company: " } (contact.company.as_deref().unwrap_or("—")) }
            p { strong { "E-mail: " } (contact.email.as_deref().unwrap_or("—")) }
        }
        @for panel in panels { (PreEscaped(panel)) }
    };
    ok(state.chrome.render(&contact.name, Some(&user), body))
}

/// The contact routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/contacts", web::get().to(list))
        .route("/contacts/{id}", web::get().to(show));
}

//! Module settings: the sealed store and the operators' settings page.

use actix_web::{HttpResponse, web};
use async_trait::async_trait;
use chrono::Utc;
use crm_sdk::{
    CurrentUser, FieldKind, Manifest, Sealer, SettingsCheck, SettingsError, SettingsStore,
    SettingsValues,
};
use maud::{Markup, PreEscaped, html};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set, TransactionTrait};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::auth::require_admin;
use crate::entities::setting;
use crate::html::{csrf, ok};
use crate::state::AppState;

fn seal_context(module: &str, key: &str) -> String {
    format!("settings/{module}/{key}")
}

/// Settings in the host's `crm_settings` table; secret fields sealed with the host's key.
pub struct DbSettingsStore {
    db: DatabaseConnection,
    sealer: Sealer,
}

impl DbSettingsStore {
    /// A store over `db`.
    pub fn new(db: DatabaseConnection, sealer: Sealer) -> Self {
        Self { db, sealer }
    }
}

#[async_trait]
impl SettingsStore for DbSettingsStore {
    async fn load(&self, module: &str) -> Result<SettingsValues, SettingsError> {
        let rows = setting::Entity::find()
            .filter(setting::Column::Module.eq(module))
            .all(&self.db)
            .await
            .map_err(|e| SettingsError::Storage(e.to_string()))?;
        let mut plain = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        for row in rows {
            if row.sealed {
                let value = self
                    .sealer
                    .unseal(&row.value, &seal_context(module, &row.key))
                    .map_err(|source| SettingsError::Unseal {
                        field: row.key.clone(),
                        source,
                    })?;
                secrets.insert(row.key, value);
            } else {
                plain.insert(row.key, row.value);
            }
        }
        Ok(SettingsValues::new(plain, secrets))
    }
}

/// Writes plain and secret (sealed) values of `module` in one transaction.
pub async fn store(
    db: &DatabaseConnection,
    sealer: &Sealer,
    module: &str,
    plain: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
) -> Result<(), sea_orm::DbErr> {
    let now = Utc::now();
    let rows: Vec<setting::ActiveModel> = plain
        .into_iter()
        .map(|(key, value)| (key, value, false))
        .chain(secrets.into_iter().map(|(key, value)| {
            let sealed = sealer.seal(&value, &seal_context(module, &key));
            (key, sealed, true)
        }))
        .map(|(key, value, sealed)| setting::ActiveModel {
            module: Set(module.to_string()),
            key: Set(key),
            value: Set(value),
            sealed: Set(sealed),
            updated_at: Set(now),
        })
        .collect();
    db.transaction::<_, (), sea_orm::DbErr>(|txn| {
        Box::pin(async move {
            for row in rows {
                setting::Entity::insert(row)
                    .on_conflict(
                        OnConflict::columns([setting::Column::Module, setting::Column::Key])
                            .update_columns([
                                setting::Column::Value,
                                setting::Column::Sealed,
                                setting::Column::UpdatedAt,
                            ])
                            .to_owned(),
                    )
                    .exec(txn)
                    .await?;
            }
            Ok(())
        })
    })
    .await
    .map_err(|e| match e {
        sea_orm::TransactionError::Connection(e) | sea_orm::TransactionError::Transaction(e) => e,
    })
}

/// Stored plain values of a module, with the manifest's defaults for fields never saved.
pub fn with_defaults(manifest: &Manifest, values: &SettingsValues) -> BTreeMap<String, String> {
    manifest
        .settings
        .iter()
        .filter(|f| !f.secret)
        .filter_map(|f| {
            values
                .get(&f.id)
                .map(str::to_string)
                .or_else(|| f.default.clone())
                .map(|v| (f.id.clone(), v))
        })
        .collect()
}

/// A submitted form: refused (shown again with its values and messages), or saved and checked.
struct Submitted<'a> {
    module: &'a str,
    input: &'a BTreeMap<String, String>,
    errors: &'a BTreeMap<String, String>,
    check: Option<&'a SettingsCheck>,
}

/// What the module found when it checked the saved settings, in words with the code.
fn check_block(check: &SettingsCheck) -> Markup {
    let (class, badge) = match check.verified {
        Some(true) => ("flash ok settings-check", "verified"),
        Some(false) => ("flash bad settings-check", "not verified"),
        None => ("flash warn settings-check", "not checked"),
    };
    html! {
        div class=(class) id="settings-check" role=(if check.verified == Some(false) { "alert" } else { "status" }) {
            p { span.badge.muted { (badge) } " " strong { (check.title) } }
            p { (check.detail) }
            @if let Some((words, path)) = &check.next { p { "Next: " a href=(path) { (words) } } }
            @if let Some(code) = &check.code { p.help { "Code: " code { (code) } } }
        }
    }
}

async fn render(
    state: &AppState,
    user: &CurrentUser,
    flash: Option<Markup>,
    submitted: Option<Submitted<'_>>,
) -> Markup {
    let mut sections = Vec::new();
    for entry in state.registry.entries() {
        let manifest = entry.module.manifest();
        let stored = entry.ctx.settings().load(&manifest.id).await;
        let (values, load_error) = match &stored {
            Ok(v) => (v.clone(), None),
            Err(e) => (SettingsValues::default(), Some(e.to_string())),
        };
        let mut shown = with_defaults(manifest, &values);
        let mut errors = BTreeMap::new();
        if let Some(submitted) = &submitted
            && submitted.module == manifest.id
        {
            shown.extend(submitted.input.iter().map(|(k, v)| (k.clone(), v.clone())));
            errors = submitted.errors.clone();
        }
        let hints = entry.module.settings_hints(&entry.ctx).await;
        let guide = entry.module.settings_guide(&entry.ctx).await;
        let check = submitted
            .as_ref()
            .filter(|s| s.module == manifest.id)
            .and_then(|s| s.check);
        sections.push(html! {
            section.card id=(format!("settings-{}", manifest.id)) {
                h2 { (manifest.settings_section) }
                @if !entry.is_enabled() {
                    p.flash.warn { "This module is disabled: its settings are kept but not used. " a href="/modules" { "Enable it" } "." }
                }
                @if let Some(e) = load_error {
                    p.flash.bad { "Stored settings cannot be read: " (e) ". If the sealing key changed, restore the old key or enter the secret again." }
                }
                @if let Some(check) = check { (check_block(check)) }
                @if let Some(guide) = &guide { (PreEscaped(guide)) }
                @for hint in &hints {
                    p { strong { (hint.label) ": " } code.copy { (hint.value) } }
                }
                form method="post" action=(format!("/settings/{}", manifest.id)) {
                    (csrf(user))
                    @for field in &manifest.settings {
                        label for=(field.id) { (field.label) @if field.required { " *" } }
                        @if field.secret {
                            input id=(field.id) type="password" name=(field.id) autocomplete="new-password"
                                placeholder=(if values.has_secret(&field.id) { "stored — leave empty to keep it" } else { "not set" });
                            @if values.has_secret(&field.id) { p.help { span.badge.ok { "stored" } " The value is write-only and sealed; it is never shown again." } }
                        } @else if !field.choices.is_empty() {
                            @let current = shown.get(&field.id).map(String::as_str).or(field.default.as_deref()).unwrap_or("");
                            select id=(field.id) name=(field.id) {
                                @for (value, label) in &field.choices {
                                    option value=(value) selected[value == current] { (label) }
                                }
                            }
                        } @else {
                            input id=(field.id) type=(if field.kind == FieldKind::Date { "date" } else { "text" }) name=(field.id)
                                value=(shown.get(&field.id).map(String::as_str).unwrap_or(""));
                        }
                        @if !field.help.is_empty() { p.help { (field.help) } }
                        @if let Some(e) = errors.get(&field.id) { p.error role="alert" { (field.label) " " (e) } }
                    }
                    p { button type="submit" { "Save" } }
                }
            }
        });
    }
    html! {
        h1 { "General settings" }
        @if let Some(flash) = flash { (flash) }
        @for s in sections { (s) }
    }
}

async fn page(state: web::Data<AppState>, user: CurrentUser) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    let body = render(&state, &user, None, None).await;
    ok(state.chrome.render("Settings", Some(&user), body))
}

/// `GET /settings/{module}`: the settings page, as `POST` to this address leaves it (a reload
/// after Save lands here).
async fn module_page(
    state: web::Data<AppState>,
    user: CurrentUser,
    module_id: web::Path<String>,
) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    if state.registry.get(&module_id).is_none() {
        return crate::not_found::response(&state.chrome, Some(&user), false);
    }
    let body = render(&state, &user, None, None).await;
    ok(state.chrome.render("Settings", Some(&user), body))
}

async fn save(
    state: web::Data<AppState>,
    user: CurrentUser,
    module_id: web::Path<String>,
    form: web::Form<BTreeMap<String, String>>,
) -> HttpResponse {
    if let Err(refused) = require_admin(&user, &state.chrome) {
        return *refused;
    }
    let Some(entry) = state.registry.get(&module_id) else {
        return crate::not_found::response(&state.chrome, Some(&user), false);
    };
    let manifest = entry.module.manifest();
    let stored = entry
        .ctx
        .settings()
        .load(&manifest.id)
        .await
        .unwrap_or_default();
    let mut errors = BTreeMap::new();
    let mut plain = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for field in &manifest.settings {
        let raw = form.get(&field.id).map(|v| v.trim()).unwrap_or("");
        if raw.is_empty() {
            let kept = if field.secret {
                stored.has_secret(&field.id)
            } else {
                false
            };
            if field.required && !kept {
                errors.insert(field.id.clone(), "is required".to_string());
            }
            if !field.secret {
                plain.insert(field.id.clone(), String::new());
            }
            continue;
        }
        match field.normalize(raw) {
            Ok(value) if field.secret => {
                secrets.insert(field.id.clone(), value);
            }
            Ok(value) => {
                plain.insert(field.id.clone(), value);
            }
            Err(message) => {
                errors.insert(field.id.clone(), message);
            }
        }
    }
    if errors.is_empty() {
        // The module also sees the secrets typed now (e.g. to refuse a secret's ID pasted
        // instead of its value); a secret left empty keeps the stored one and is not shown.
        let mut typed = plain.clone();
        typed.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        for e in entry.module.validate_settings(&typed) {
            errors.insert(e.field, e.message);
        }
    }
    if !errors.is_empty() {
        tracing::info!(module = %manifest.id, fields = ?errors.keys().collect::<Vec<_>>(), "settings refused");
        let flash = html! { p.flash.bad role="alert" { "Nothing was saved: correct the fields marked below." } };
        return nothing_saved(&state, &user, manifest, &form, flash, (&errors, None)).await;
    }
    // The module checks the settings as they would be once saved, before they are stored.
    let candidate = Candidate::of(manifest, &stored, &plain, &secrets);
    let check = entry
        .module
        .verify_settings(&entry.ctx.with_settings(Arc::new(candidate)))
        .await;
    if let Some(check) = &check {
        tracing::info!(module = %manifest.id, verified = ?check.verified, code = ?check.code, "settings checked");
    }
    if let Some(check) = check.as_ref().filter(|c| c.verified == Some(false)) {
        // Settings that work are never replaced by settings the outside system refuses: one
        // wrong paste would stop every mailbox at its next token refresh.
        let in_use = entry.module.verify_settings(&entry.ctx).await;
        if in_use.is_some_and(|c| c.verified == Some(true)) {
            tracing::info!(module = %manifest.id, "settings refused by their check; the working ones kept");
            let flash = html! {
                p.flash.bad role="alert" {
                    "Nothing was saved: the check below refused these settings, and the settings in use work, so they are kept. Correct what it says and save again (a client secret created a few minutes ago may not be accepted yet: then save again a little later)."
                }
            };
            return nothing_saved(
                &state,
                &user,
                manifest,
                &form,
                flash,
                (&BTreeMap::new(), Some(check)),
            )
            .await;
        }
    }
    let saved = store(&state.db, &state.sealer, &manifest.id, plain, secrets).await;
    match saved {
        Ok(()) => {
            tracing::info!(module = %manifest.id, user_id = user.id, "settings saved");
            if let Err(e) = state.registry.restart_jobs(&manifest.id).await {
                tracing::error!(module = %manifest.id, error = %e, "restarting the module's jobs failed");
            }
            if entry.is_enabled() {
                entry
                    .module
                    .settings_saved(&entry.ctx, check.as_ref())
                    .await;
            }
            let flash = html! { p.flash.ok role="status" { "Settings saved." } };
            let (input, errors) = (BTreeMap::new(), BTreeMap::new());
            let body = render(
                &state,
                &user,
                Some(flash),
                Some(Submitted {
                    module: &manifest.id,
                    input: &input,
                    errors: &errors,
                    check: check.as_ref(),
                }),
            )
            .await;
            ok(state.chrome.render("Settings", Some(&user), body))
        }
        Err(e) => {
            tracing::error!(error = %e, "saving settings failed");
            HttpResponse::ServiceUnavailable()
                .body("The database did not answer; nothing was saved. Try again.")
        }
    }
}

/// The settings a save would leave (`plain` as typed; each secret as typed, or the stored one
/// when left empty), for the module to check before they are stored.
struct Candidate {
    module: String,
    values: SettingsValues,
}

impl Candidate {
    fn of(
        manifest: &Manifest,
        stored: &SettingsValues,
        plain: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, String>,
    ) -> Self {
        let mut sealed = BTreeMap::new();
        for field in manifest.settings.iter().filter(|f| f.secret) {
            let value = match secrets.get(&field.id) {
                Some(typed) => Some(secrecy::SecretString::from(typed.clone())),
                None => stored.secret(&field.id).cloned(),
            };
            if let Some(value) = value {
                sealed.insert(field.id.clone(), value);
            }
        }
        Self {
            module: manifest.id.clone(),
            values: SettingsValues::new(plain.clone(), sealed),
        }
    }
}

#[async_trait]
impl SettingsStore for Candidate {
    async fn load(&self, module: &str) -> Result<SettingsValues, SettingsError> {
        if module == self.module {
            Ok(self.values.clone())
        } else {
            Err(SettingsError::Storage(format!(
                "only the settings of {} are being checked",
                self.module
            )))
        }
    }
}

/// The answer to a save that stored nothing (`flash` says why): the form again with what was
/// typed (secrets excepted), the fields' `errors`, and what the module's `check` found.
async fn nothing_saved(
    state: &AppState,
    user: &CurrentUser,
    manifest: &Manifest,
    form: &BTreeMap<String, String>,
    flash: Markup,
    (errors, check): (&BTreeMap<String, String>, Option<&SettingsCheck>),
) -> HttpResponse {
    let echo: BTreeMap<String, String> = manifest
        .settings
        .iter()
        .filter(|f| !f.secret)
        .filter_map(|f| form.get(&f.id).map(|v| (f.id.clone(), v.clone())))
        .collect();
    let body = render(
        state,
        user,
        Some(flash),
        Some(Submitted {
            module: &manifest.id,
            input: &echo,
            errors,
            check,
        }),
    )
    .await;
    HttpResponse::UnprocessableEntity()
        .content_type("text/html; charset=utf-8")
        .body(
            state
                .chrome
                .render("Settings", Some(user), body)
                .into_string(),
        )
}

/// The settings routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/settings", web::get().to(page))
        .route("/settings/{module}", web::get().to(module_page))
        .route("/settings/{module}", web::post().to(save));
}

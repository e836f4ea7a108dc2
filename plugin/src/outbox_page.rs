//! The outbox console (`/outbox`): every mail for operators, one's own mails for everybody
//! else; filters, search, a mail's detail page, and the actions on mails — retry, cancel, and
//! releasing a held mailbox — one by one or in bulk on a filtered set after a confirmation
//! that says how many. Every page answers JSON too (`Accept: application/json`), and every
//! action takes JSON with the `X-CSRF-Token` header.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, NaiveDate, Utc};
use crm_sdk::{CurrentUser, FieldError, ModuleContext};
use maud::{Markup, html};
use sea_orm::sea_query::{BinOper, Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, EntityTrait, Iterable, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Select,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use crate::entities::{mail_server, outbox};
use crate::health::Health;
use crate::mail_routes::{
    MailView, classified_reply, for_viewer, json_refusal, status_badge, wants_json,
};
use crate::pages::{csrf, page, page_with};
use crate::runtime::Shared;

/// Mails per page.
pub const PER_PAGE: u64 = 50;
const OUTBOX: &str = "/microsoft_outlook/outbox";
/// Statuses a mail may be retried or cancelled from.
const ACTIONABLE: [&str; 2] = ["queued", "failed"];

/// The statuses from which `user` may take `action` (`retry` or `cancel`): a user retries
/// only failed mails (a queued one waits out its back-off); operators may make a queued mail
/// due now too.
fn actionable_by(user: &CurrentUser, action: &str) -> &'static [&'static str] {
    if action == "retry" && !user.is_admin {
        &["failed"]
    } else {
        &ACTIONABLE
    }
}

/// The filter of the list, as typed (every field may be empty).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filter {
    /// `queued`, `sending`, `sent`, `failed` or `cancelled`.
    #[serde(default)]
    pub status: String,
    /// A mail server's id.
    #[serde(default)]
    pub server: String,
    /// An author's user id (operators).
    #[serde(default)]
    pub author: String,
    /// `model:id`, e.g. `contact:12`.
    #[serde(default)]
    pub record: String,
    /// Queued on or after this day (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    pub from: String,
    /// Queued on or before this day.
    #[serde(default)]
    pub to: String,
    /// Part of a recipient, the subject or the Message-ID.
    #[serde(default)]
    pub q: String,
}

fn field_error(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.into(),
        message,
    }
}

/// The case forms of `c` that are one character each (`ä` → `ä`, `Ä`), `c` first.
fn case_forms(c: char) -> Vec<char> {
    fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
        let first = chars.next()?;
        chars.next().is_none().then_some(first)
    }
    let mut forms = vec![c];
    for f in [single(c.to_lowercase()), single(c.to_uppercase())]
        .into_iter()
        .flatten()
    {
        if !forms.contains(&f) {
            forms.push(f);
        }
    }
    forms
}

/// "Contains `text`, whatever the case", matched by the database itself on both backends.
/// Neither SQLite's `LIKE` nor its `lower()` knows the case of non-ASCII letters (`Ä`), so
/// every cased letter is matched by the set of its forms: a `GLOB` on SQLite, a regular
/// expression (`~`) on PostgreSQL (which, unlike its `lower()`, does not depend on the
/// cluster's locale). Every other character matches as itself.
fn contains_any_case(
    backend: DbBackend,
    column: outbox::Column,
    text: &str,
) -> sea_orm::sea_query::SimpleExpr {
    let mut pattern = String::new();
    let postgres = backend == DbBackend::Postgres;
    if !postgres {
        pattern.push('*');
    }
    for c in text.chars() {
        let forms = case_forms(c);
        if forms.len() > 1 {
            pattern.push('[');
            pattern.extend(forms);
            pattern.push(']');
        } else if postgres && !c.is_alphanumeric() {
            // In a PostgreSQL regular expression `\` and a non-alphanumeric character is
            // that character.
            pattern.push('\\');
            pattern.push(c);
        } else if !postgres && matches!(c, '*' | '?' | '[') {
            // In a GLOB, a set of one is that character.
            pattern.extend(['[', c, ']']);
        } else {
            pattern.push(c);
        }
    }
    if !postgres {
        pattern.push('*');
    }
    let operator = if postgres { "~" } else { "GLOB" };
    Expr::col((outbox::Entity, column)).binary(BinOper::Custom(operator), Expr::val(pattern))
}

impl Filter {
    /// The condition on outbox rows that `viewer` may see and that match on a `backend`
    /// database; or what is wrong.
    pub fn condition(
        &self,
        viewer: &CurrentUser,
        backend: DbBackend,
    ) -> Result<Condition, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut c = Condition::all();
        if !viewer.is_admin {
            c = c.add(outbox::Column::AuthorUserId.eq(viewer.id));
        }
        let status = self.status.trim();
        if !status.is_empty() {
            if crate::metrics::STATUSES.contains(&status) {
                c = c.add(outbox::Column::Status.eq(status));
            } else {
                errors.push(field_error("status", format!("no status \"{status}\"")));
            }
        }
        if !self.server.trim().is_empty() {
            match self.server.trim().parse::<i32>() {
                Ok(id) => c = c.add(outbox::Column::ServerId.eq(id)),
                Err(_) => errors.push(field_error("server", "not a mail server id".into())),
            }
        }
        if !self.author.trim().is_empty() {
            match self.author.trim().parse::<i64>() {
                Ok(id) => c = c.add(outbox::Column::AuthorUserId.eq(id)),
                Err(_) => errors.push(field_error("author", "not a user id".into())),
            }
        }
        if !self.record.trim().is_empty() {
            match self
                .record
                .trim()
                .split_once(':')
                .and_then(|(m, id)| Some((m, id.parse::<i64>().ok()?)))
            {
                Some((model, id)) => {
                    c = c
                        .add(outbox::Column::RecordModel.eq(model))
                        .add(outbox::Column::RecordId.eq(id))
                }
                None => errors.push(field_error(
                    "record",
                    "write the record as model:id, e.g. contact:12".into(),
                )),
            }
        }
        let day = |field: &str, text: &str, errors: &mut Vec<FieldError>| {
            let text = text.trim();
            if text.is_empty() {
                return None;
            }
            let parsed = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
            if parsed.is_none() {
                errors.push(field_error(field, "a day is written YYYY-MM-DD".into()));
            }
            parsed
        };
        let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        if let Some(at) = day("from", &self.from, &mut errors).and_then(midnight) {
            c = c.add(outbox::Column::CreatedAt.gte(at));
        }
        if let Some(at) = day("to", &self.to, &mut errors)
            .and_then(|d| d.succ_opt())
            .and_then(midnight)
        {
            c = c.add(outbox::Column::CreatedAt.lt(at));
        }
        let q = self.q.trim().trim_start_matches('<').trim_end_matches('>');
        if !q.is_empty() {
            c = c.add(
                Condition::any()
                    .add(contains_any_case(backend, outbox::Column::Recipients, q))
                    .add(contains_any_case(backend, outbox::Column::Subject, q))
                    .add(contains_any_case(backend, outbox::Column::MessageId, q)),
            );
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    /// The filter as a query string (empty fields left out), with `page` when past the first.
    pub fn query(&self, page: u64) -> String {
        let mut pairs: Vec<(&str, &str)> = [
            ("status", &self.status),
            ("server", &self.server),
            ("author", &self.author),
            ("record", &self.record),
            ("from", &self.from),
            ("to", &self.to),
            ("q", &self.q),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.as_str()))
        .collect();
        let page = page.to_string();
        if page != "1" {
            pairs.push(("page", &page));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    fn hidden_fields(&self) -> Markup {
        html! {
            input type="hidden" name="status" value=(self.status);
            input type="hidden" name="server" value=(self.server);
            input type="hidden" name="author" value=(self.author);
            input type="hidden" name="record" value=(self.record);
            input type="hidden" name="from" value=(self.from);
            input type="hidden" name="to" value=(self.to);
            input type="hidden" name="q" value=(self.q);
        }
    }
}

/// Outbox rows without their message (lists never need it, and it may be megabytes).
fn without_message() -> Select<outbox::Entity> {
    outbox::Entity::find()
        .select_only()
        .columns(outbox::Column::iter().filter(|c| !matches!(c, outbox::Column::RawMessage)))
        .column_as(Expr::val(""), "raw_message")
}

/// One mail of the outbox as scripts see it.
#[derive(Serialize)]
pub struct OutboxMail {
    #[serde(flatten)]
    mail: MailView,
    server_id: i32,
    server: String,
    author_user_id: i64,
    record: String,
    recipients: Vec<String>,
    size_bytes: i64,
}

fn outbox_mail(
    m: outbox::Model,
    servers: &HashMap<i32, String>,
    waits: &HashMap<i32, String>,
) -> OutboxMail {
    let waiting = matches!(m.status.as_str(), "queued" | "sending")
        .then(|| waits.get(&m.server_id).cloned())
        .flatten();
    OutboxMail {
        server_id: m.server_id,
        server: servers.get(&m.server_id).cloned().unwrap_or_default(),
        author_user_id: m.author_user_id,
        record: format!("{}:{}", m.record_model, m.record_id),
        recipients: m.recipients.lines().map(str::to_string).collect(),
        size_bytes: m.size_bytes,
        mail: MailView {
            waiting,
            ..MailView::from(m)
        },
    }
}

async fn server_names(ctx: &ModuleContext) -> HashMap<i32, String> {
    mail_server::Entity::find()
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect()
}

/// The mailboxes `user` may pick in the filter: every one for operators; the shared ones and
/// their own personal mailbox for everybody else.
async fn mailbox_choices(ctx: &ModuleContext, user: &CurrentUser) -> HashMap<i32, String> {
    let mut query = mail_server::Entity::find();
    if !user.is_admin {
        query = query.filter(
            Condition::any()
                .add(mail_server::Column::Kind.eq("shared"))
                .add(mail_server::Column::OwnerUserId.eq(user.id)),
        );
    }
    query
        .all(ctx.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect()
}

/// The authors of mails, with a name taken from their latest From header.
async fn authors(ctx: &ModuleContext) -> Vec<(i64, String)> {
    let rows: Vec<(i64, String)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::AuthorUserId)
        .column_as(outbox::Column::FromHeader.max(), "from_header")
        .group_by(outbox::Column::AuthorUserId)
        .order_by_asc(outbox::Column::AuthorUserId)
        .into_tuple()
        .all(ctx.db())
        .await
        .unwrap_or_default();
    rows.into_iter()
        .map(|(id, from)| {
            let name = from
                .split('<')
                .next()
                .map(|n| n.trim().trim_matches('"').to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or(from);
            (id, name)
        })
        .collect()
}

fn db_down(e: sea_orm::DbErr) -> HttpResponse {
    tracing::error!(error = %e, "the outbox could not be read");
    HttpResponse::ServiceUnavailable().body("The database did not answer. Try again in a moment.")
}

fn not_found(ctx: &ModuleContext, user: &CurrentUser, req: &HttpRequest) -> HttpResponse {
    if wants_json(req) {
        return json_refusal(
            StatusCode::NOT_FOUND,
            &[field_error("mail", "there is no such mail".into())],
        );
    }
    page_with(
        StatusCode::NOT_FOUND,
        ctx,
        user,
        "Not found",
        html! { h1 { "No such mail" } p { a href=(OUTBOX) { "Back to the outbox" } } },
    )
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .finish()
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(flatten)]
    filter: Filter,
    page: Option<String>,
    released: Option<String>,
    done: Option<String>,
    n: Option<String>,
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The held and throttled mailboxes, each held one with "Release held mail" (a throttled one
/// sends again by itself when Exchange's wait is over).
async fn held_mailboxes(ctx: &ModuleContext, user: &CurrentUser) -> Markup {
    let now = ctx.clock().now();
    let healths = crate::health::all(ctx).await.unwrap_or_default();
    let waiting = crate::health::waiting_counts(ctx).await.unwrap_or_default();
    let names = server_names(ctx).await;
    let mut held: Vec<(i32, Health)> = healths
        .iter()
        .map(|(id, row)| (*id, Health::of(Some(row), now)))
        .filter(|(_, h)| *h != Health::Ready)
        .collect();
    held.sort_by_key(|(id, _)| *id);
    html! {
        @if !held.is_empty() {
            section.card id="held" {
                h2 { "Mailboxes that hold mail" }
                table.held {
                    thead { tr { th { "Mailbox" } th { "State" } th { "Waiting" } th {} } }
                    tbody {
                        @for (id, health) in &held {
                            tr data-server=(id) {
                                td { a href=(format!("/microsoft_outlook/servers/{id}")) { (names.get(id).map(String::as_str).unwrap_or("(deleted)")) } }
                                td { span.badge.bad { (health.label()) }
                                    @if let Health::Held { detail, .. } = health { p.help { (detail) } } }
                                td { (waiting.get(id).copied().unwrap_or(0)) }
                                td {
                                    @match health {
                                        Health::Held { .. } => form.inline method="post" action=(format!("{OUTBOX}/release/{id}")) {
                                            (csrf(user))
                                            button type="submit" { "Release held mail" }
                                        },
                                        Health::Throttled { until } => span.help { "Sends again by itself at " (when(*until)) " UTC." },
                                        Health::Ready => {},
                                    }
                                }
                            }
                        }
                    }
                }
                p.help { "Releasing ends the hold and sends the waiting mails now, in queue order. If the cause is not fixed the mailbox is held again at the first refusal." }
            }
        }
    }
}

fn filter_form(
    filter: &Filter,
    user: &CurrentUser,
    servers: &HashMap<i32, String>,
    authors: &[(i64, String)],
) -> Markup {
    let mut servers: Vec<(&i32, &String)> = servers.iter().collect();
    servers.sort();
    html! {
        form.filters method="get" action=(OUTBOX) {
            div.wide { label for="f-q" { "Search recipient, subject or Message-ID" }
                input #f-q name="q" value=(filter.q); }
            div { label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in crate::metrics::STATUSES {
                        option value=(s) selected[filter.status == s] { (s) }
                    }
                } }
            div { label for="f-server" { "Mailbox" }
                select #f-server name="server" {
                    option value="" { "any" }
                    @for (id, name) in servers {
                        option value=(id) selected[filter.server == id.to_string()] { (name) }
                    }
                } }
            @if user.is_admin {
                div { label for="f-author" { "Author" }
                    select #f-author name="author" {
                        option value="" { "anyone" }
                        @for (id, name) in authors {
                            option value=(id) selected[filter.author == id.to_string()] { (name) }
                        }
                    } }
            }
            div { label for="f-record" { "Record (model:id)" }
                input #f-record name="record" value=(filter.record) placeholder="contact:12"; }
            div { label for="f-from" { "Queued from" }
                input #f-from type="date" name="from" value=(filter.from); }
            div { label for="f-to" { "Queued until" }
                input #f-to type="date" name="to" value=(filter.to); }
            p { button type="submit" { "Filter" } " " a.button.secondary href=(OUTBOX) { "Clear" } }
        }
    }
}

fn mails_table(
    mails: &[outbox::Model],
    servers: &HashMap<i32, String>,
    waits: &HashMap<i32, String>,
    viewer: &CurrentUser,
) -> Markup {
    html! {
        div.scroll { table.outbox {
            thead { tr { th { "Queued" } th { "Subject" } th { "To" } th { "From" } th { "Mailbox" } th { "Status" } th { "Attempts" } th { "Last reply" } } }
            tbody {
                @for m in mails {
                    tr data-id=(m.id) data-message-id=(m.message_id) {
                        td { (when(m.created_at)) }
                        td { a href=(format!("{OUTBOX}/{}", m.id)) { @if m.subject.is_empty() { "(no subject)" } @else { (m.subject) } } }
                        td { (m.recipients.lines().next().unwrap_or(""))
                            @let more = m.recipients.lines().count().saturating_sub(1);
                            @if more > 0 { " +" (more) } }
                        td { (m.from_header) }
                        td { (servers.get(&m.server_id).map(String::as_str).unwrap_or("(deleted)")) }
                        td.status { (status_badge(&m.status))
                            @if matches!(m.status.as_str(), "queued" | "sending") {
                                @if let Some(w) = waits.get(&m.server_id) {
                                    p.help.waiting { @if viewer.is_admin { "Waits for its mailbox (see above)." } @else { (w) } }
                                }
                            } }
                        td { (m.attempts) }
                        td { (m.last_reply.as_deref().map(classified_reply).unwrap_or_default()) }
                    }
                }
            }
        } }
    }
}

async fn list(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    query: web::Query<ListQuery>,
    req: HttpRequest,
) -> HttpResponse {
    let query = query.into_inner();
    let filter = query.filter;
    let page_no = query
        .page
        .as_deref()
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(1);
    let page_no = Ord::max(page_no, 1);
    let backend = ctx.db().get_database_backend();
    let (condition, problems) = match filter.condition(&user, backend) {
        Ok(c) => (c, Vec::new()),
        Err(problems) if wants_json(&req) => {
            return json_refusal(StatusCode::BAD_REQUEST, &problems);
        }
        // The page shows what is wrong and the mails the viewer may see.
        Err(problems) => (
            Filter::default()
                .condition(&user, backend)
                .unwrap_or_else(|_| Condition::all()),
            problems,
        ),
    };
    let paginator = without_message()
        .filter(condition)
        .order_by_desc(outbox::Column::Id)
        .paginate(ctx.db(), PER_PAGE);
    let total = match paginator.num_items().await {
        Ok(n) => n,
        Err(e) => return db_down(e),
    };
    let mails: Vec<outbox::Model> = match paginator.fetch_page(page_no - 1).await {
        Ok(rows) => rows.into_iter().map(|m| for_viewer(m, &user)).collect(),
        Err(e) => return db_down(e),
    };
    let servers = server_names(&ctx).await;
    let waits = crate::health::waiting_words(&ctx).await;
    let pages = Ord::max(total.div_ceil(PER_PAGE), 1);
    if wants_json(&req) {
        let mails: Vec<OutboxMail> = mails
            .into_iter()
            .map(|m| outbox_mail(m, &servers, &waits))
            .collect();
        return HttpResponse::Ok().json(serde_json::json!({
            "page": page_no,
            "pages": pages,
            "per_page": PER_PAGE,
            "total": total,
            "mails": mails,
        }));
    }
    let authors = if user.is_admin {
        authors(&ctx).await
    } else {
        Vec::new()
    };
    let flash = match (&query.released, &query.done, &query.n) {
        (Some(_), _, _) => Some(
            "Released: the hold was lifted and the waiting mails are being sent in queue order."
                .to_string(),
        ),
        (_, Some(action), Some(n)) if action == "retry" => Some(format!(
            "{n} mail(s) queued again: they are being sent now."
        )),
        (_, Some(action), Some(n)) if action == "cancel" => {
            Some(format!("{n} mail(s) cancelled: they will not be sent."))
        }
        _ => None,
    };
    let body = html! {
        h1 { "Outbox" }
        @if let Some(flash) = flash { p.flash.ok role="status" { (flash) } }
        @if !problems.is_empty() {
            div.flash.bad role="alert" { "The filter was not applied:" ul { @for p in &problems { li { strong { (p.field) } ": " (p.message) } } } }
        }
        @if !user.is_admin { p.help { "Your own mails: everything you sent from the CRM, newest first." } }
        @if user.is_admin { (held_mailboxes(&ctx, &user).await) }
        section.card { (filter_form(&filter, &user, &mailbox_choices(&ctx, &user).await, &authors)) }
        section.card {
            p.count { (total) " mail(s)" @if pages > 1 { ", page " (page_no) " of " (pages) } }
            @if total > 0 {
                form.inline method="post" action=(format!("{OUTBOX}/bulk")) {
                    (csrf(&user))
                    (filter.hidden_fields())
                    button.secondary type="submit" name="action" value="retry" { "Retry these…" }
                    " "
                    button.secondary type="submit" name="action" value="cancel" { "Cancel these…" }
                    span.help { @if user.is_admin { " Applies to the queued and failed mails of this filter, after a confirmation." } @else { " Retry applies to the failed mails of this filter, cancel to the queued and failed ones, after a confirmation." } }
                }
                (mails_table(&mails, &servers, &waits, &user))
            } @else {
                p.help { "No mail matches." }
            }
            p.pages {
                @if page_no > 1 { a href=(format!("{OUTBOX}?{}", filter.query(page_no - 1))) { "← Newer" } " " }
                @if page_no < pages { a href=(format!("{OUTBOX}?{}", filter.query(page_no + 1))) { "Older →" } }
            }
        }
    };
    page(&ctx, &user, "Outbox", body)
}

/// The mail `id` if `viewer` may see it (operators: every mail; others: their own).
async fn visible_mail(
    ctx: &ModuleContext,
    viewer: &CurrentUser,
    id: i64,
) -> Result<Option<outbox::Model>, sea_orm::DbErr> {
    let found = outbox::Entity::find_by_id(id).one(ctx.db()).await?;
    Ok(found.filter(|m| viewer.is_admin || m.author_user_id == viewer.id))
}

/// The header fields of a stored message, unfolded, in order.
pub fn headers_of(raw: &str) -> Vec<(String, String)> {
    let head = raw
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .split("\n\n")
        .next()
        .unwrap_or("");
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

#[derive(Deserialize)]
struct DetailFlash {
    retried: Option<String>,
    cancelled: Option<String>,
    queued: Option<String>,
    refused: Option<String>,
}

async fn detail(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    id: web::Path<String>,
    flash: web::Query<DetailFlash>,
    req: HttpRequest,
) -> HttpResponse {
    // Not a number: the module's "No such mail" page (not an empty 404).
    let Ok(id) = id.parse::<i64>() else {
        return not_found(&ctx, &user, &req);
    };
    let mail = match visible_mail(&ctx, &user, id).await {
        Ok(Some(m)) => for_viewer(m, &user),
        Ok(None) => return not_found(&ctx, &user, &req),
        Err(e) => return db_down(e),
    };
    let server = mail_server::Entity::find_by_id(mail.server_id)
        .one(ctx.db())
        .await
        .ok()
        .flatten();
    let health = crate::health::get(&ctx, mail.server_id)
        .await
        .unwrap_or(Health::Ready);
    let waits_on_mailbox =
        matches!(mail.status.as_str(), "queued" | "sending") && health != Health::Ready;
    let waits = crate::health::waiting_words(&ctx).await;
    let headers = headers_of(&mail.raw_message);
    let servers = server_names(&ctx).await;
    if wants_json(&req) {
        let health_view = serde_json::json!({
            "state": health.state(),
            "label": health.label(),
            "detail": match &health {
                Health::Held { detail, .. } if user.is_admin => Some(detail.clone()),
                _ => waits.get(&mail.server_id).cloned(),
            },
        });
        let classified = mail.last_reply.as_deref().map(classified_reply);
        let (envelope_from, raw_size) = (mail.envelope_from.clone(), mail.size_bytes);
        let status = mail.status.as_str();
        let (retry, cancel) = (
            actionable_by(&user, "retry").contains(&status),
            actionable_by(&user, "cancel").contains(&status),
        );
        return HttpResponse::Ok().json(serde_json::json!({
            "mail": outbox_mail(mail, &servers, &waits),
            "envelope_from": envelope_from,
            "size_bytes": raw_size,
            "headers": headers,
            "classified_reply": classified,
            "mailbox_health": health_view,
            "actions": { "retry": retry, "cancel": cancel },
        }));
    }
    let flash = if flash.retried.is_some() {
        Some(html! { p.flash.ok role="status" { "Queued again: it is being sent now." } })
    } else if flash.cancelled.is_some() {
        Some(html! { p.flash.ok role="status" { "Cancelled: this mail will not be sent." } })
    } else if flash.queued.is_some() {
        Some(
            html! { p.flash.ok role="status" { "Test mail queued: it goes out through the normal queue." } },
        )
    } else {
        flash
            .refused
            .as_deref()
            .map(|why| html! { p.flash.bad role="alert" { (refusal_words(why)) } })
    };
    let record_link = match mail.record_model.as_str() {
        "contact" => Some(format!("/contacts/{}", mail.record_id)),
        "mail_server" => Some(format!("/microsoft_outlook/servers/{}", mail.record_id)),
        _ => None,
    };
    let max_attempts = crate::deliver::limits(&ctx, &shared).await.max_attempts;
    let body = html! {
        h1 { @if mail.subject.is_empty() { "(no subject)" } @else { (mail.subject) } }
        p { a href=(OUTBOX) { "← Outbox" } }
        @if let Some(flash) = flash { (flash) }
        section.card id="envelope" {
            h2 { "Envelope" }
            table.fields { tbody {
                tr { th { "Status" } td.status { (status_badge(&mail.status)) } }
                tr { th { "Message-ID" } td { code { "<" (mail.message_id) ">" } } }
                tr { th { "MAIL FROM" } td { (mail.envelope_from) } }
                tr { th { "RCPT TO" } td { @for r in mail.recipients.lines() { (r) br; } } }
                tr { th { "From" } td { (mail.from_header) } }
                tr { th { "Mailbox" } td { @match &server {
                    Some(s) if user.is_admin || s.owner_user_id == Some(user.id) => a href=(format!("/microsoft_outlook/servers/{}", s.id)) { (s.name) " (" (s.mailbox) ")" },
                    Some(s) => { (s.name) " (" (s.mailbox) ")" },
                    None => "(deleted)",
                } } }
                tr { th { "Record" } td { @match &record_link {
                    Some(link) => a href=(link) { (mail.record_model) " " (mail.record_id) },
                    None => { (mail.record_model) " " (mail.record_id) },
                } } }
                tr { th { "Size" } td { (format!("{:.1} KB", mail.size_bytes as f64 / 1024.0)) } }
                tr { th { "Queued" } td { (when(mail.created_at)) " UTC" } }
                @if let Some(at) = mail.sent_at { @if mail.status == "sent" { tr { th { "Sent" } td { (when(at)) " UTC" } } } }
            } }
        }
        section.card id="delivery" {
            h2 { "Delivery" }
            table.fields { tbody {
                tr { th { "Attempts" } td { (mail.attempts) " of at most " (max_attempts) } }
                @if mail.status == "queued" { tr { th { "Next attempt" } td { (when(mail.next_attempt_at)) " UTC" } } }
                tr { th { "Last reply" } td.reply { (mail.last_reply.as_deref().unwrap_or("-")) } }
                @if let Some(reply) = &mail.last_reply { tr { th { "Classified" } td { (classified_reply(reply)) } } }
                @if let Some(words) = &mail.last_error { tr { th { "What happened" } td.words { (words) } } }
            } }
            @if waits_on_mailbox {
                div.status.waiting {
                    p { span.badge.bad { (health.label()) } }
                    @match (&health, user.is_admin) {
                        (Health::Held { detail, .. }, true) => p { (detail) },
                        _ => p { (waits.get(&mail.server_id).cloned().unwrap_or_default()) },
                    }
                    @if user.is_admin && matches!(health, Health::Held { .. }) {
                        form.inline method="post" action=(format!("{OUTBOX}/release/{}", mail.server_id)) {
                            (csrf(&user))
                            button type="submit" { "Release held mail" }
                            span.help { " Ends the hold of this mailbox and sends its waiting mails now." }
                        }
                    }
                }
            }
            (actions(&mail, &user))
        }
        section.card id="headers" {
            h2 { "Headers of the stored message" }
            table.headers { tbody { @for (name, value) in &headers { tr { th { (name) } td { (value) } } } } }
        }
    };
    page(&ctx, &user, "Mail", body)
}

fn refusal_words(why: &str) -> &'static str {
    match why {
        "sending" => "This mail is being sent right now: it can no longer be cancelled or retried.",
        "sent" => "This mail was sent already.",
        "cancelled" => "This mail was cancelled.",
        "queued" => {
            "This mail is queued already: it is tried again by itself when its next attempt is due."
        }
        _ => "Nothing was changed: the mail is not queued or failed.",
    }
}

fn actions(mail: &outbox::Model, user: &CurrentUser) -> Markup {
    let base = format!("{OUTBOX}/{}", mail.id);
    html! {
        div.actions {
            @match mail.status.as_str() {
                "queued" | "failed" => {
                    @if actionable_by(user, "retry").contains(&mail.status.as_str()) {
                        form.inline method="post" action=(format!("{base}/retry")) {
                            (csrf(user))
                            button type="submit" { "Retry now" }
                        }
                        " "
                    }
                    form.inline method="post" action=(format!("{base}/cancel")) {
                        (csrf(user))
                        button.danger type="submit" { "Cancel" }
                    }
                    p.help { @if mail.status == "failed" { "Retry now gives it a new round of attempts. " } @else if user.is_admin { "Retry now makes it due now (a held mailbox still holds it). " } @else { "It is tried again by itself when its next attempt is due. " } "Cancel keeps it from ever being sent." }
                }
                "sending" => p.help { "This mail is being sent right now: it cannot be cancelled." },
                _ => {}
            }
        }
    }
}

/// What a retry or a cancel did.
#[derive(Debug, Serialize)]
pub struct Changed {
    /// The mails changed.
    pub ids: Vec<i64>,
}

/// Queues the mails matching `condition` again: a failed one gets a new round of attempts, a
/// queued one is due now. Their jobs are pushed (and, in a delivering process, a few are sent
/// at once). Only mails that are still queued or failed at the moment of the update change.
pub async fn retry(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    condition: Condition,
) -> Result<Changed, sea_orm::DbErr> {
    let now = ctx.clock().now();
    // Marked pushed only when there is a queue to push to (else the sweep takes them).
    let pushed_at = shared.queue().is_some().then_some(now);
    let mut ids = Vec::new();
    let mut were_failed = Vec::new();
    for status in ACTIONABLE {
        let candidates = ids_with(ctx, condition.clone(), status).await?;
        for chunk in candidates.chunks(500) {
            let mut update = outbox::Entity::update_many()
                .col_expr(outbox::Column::Status, Expr::value("queued"))
                .col_expr(outbox::Column::NextAttemptAt, Expr::value(now))
                .col_expr(outbox::Column::PushedAt, Expr::value(pushed_at))
                .col_expr(outbox::Column::UpdatedAt, Expr::value(now));
            if status == "failed" {
                update = update
                    .col_expr(outbox::Column::Attempts, Expr::value(0))
                    .col_expr(
                        outbox::Column::SentAt,
                        Expr::value(Option::<DateTime<Utc>>::None),
                    );
            }
            update
                .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
                .filter(outbox::Column::Status.eq(status))
                .exec(ctx.db())
                .await?;
        }
        if status == "failed" {
            were_failed.extend(candidates.iter().copied());
        }
        ids.extend(candidates);
    }
    // Those whose update lost a race (claimed meanwhile) are not reported as retried.
    let mut ids = still_with(ctx, &ids, "queued").await?;
    ids.sort_unstable();
    resolve_failed_notices(ctx, &were_failed, &ids).await;
    shared.push(&ids).await;
    for id in ids.iter().take(20) {
        shared.deliver_soon(ctx, *id);
    }
    Ok(Changed { ids })
}

/// Cancels the mails matching `condition` that are queued or failed: they are never claimed
/// or sent. A mail being sent is not touched.
pub async fn cancel(
    ctx: &ModuleContext,
    condition: Condition,
    by: &CurrentUser,
) -> Result<Changed, sea_orm::DbErr> {
    let now = ctx.clock().now();
    let mut ids = Vec::new();
    let mut were_failed = Vec::new();
    for status in ACTIONABLE {
        let candidates = ids_with(ctx, condition.clone(), status).await?;
        if status == "failed" {
            were_failed.extend(candidates.iter().copied());
        }
        ids.extend(candidates);
    }
    for chunk in ids.chunks(500) {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::Status, Expr::value("cancelled"))
            .col_expr(outbox::Column::UpdatedAt, Expr::value(now))
            .col_expr(
                outbox::Column::LastError,
                Expr::value(format!(
                    "Cancelled by {} on {} UTC: it will not be sent.",
                    by.name,
                    now.format("%Y-%m-%d %H:%M")
                )),
            )
            .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
            .filter(outbox::Column::Status.is_in(ACTIONABLE))
            .exec(ctx.db())
            .await?;
    }
    let mut ids = still_with(ctx, &ids, "cancelled").await?;
    ids.sort_unstable();
    resolve_failed_notices(ctx, &were_failed, &ids).await;
    Ok(Changed { ids })
}

/// Resolves the "Mail not sent" notices of the mails that were failed and have been changed
/// (`changed`, sorted): retried or cancelled, nobody needs to act on them any more.
async fn resolve_failed_notices(ctx: &ModuleContext, were_failed: &[i64], changed: &[i64]) {
    for id in were_failed {
        if changed.binary_search(id).is_ok()
            && let Err(e) = ctx
                .notifier()
                .resolve(&crate::failed_notice::key(*id))
                .await
        {
            tracing::warn!(error = %e, outbox_id = id, "a failed-mail notice was not resolved");
        }
    }
}

async fn ids_with(
    ctx: &ModuleContext,
    condition: Condition,
    status: &str,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .filter(condition)
        .filter(outbox::Column::Status.eq(status))
        .order_by_asc(outbox::Column::Id)
        .into_tuple()
        .all(ctx.db())
        .await
}

async fn still_with(
    ctx: &ModuleContext,
    ids: &[i64],
    status: &str,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    let mut kept = Vec::new();
    for chunk in ids.chunks(500) {
        let found: Vec<i64> = outbox::Entity::find()
            .select_only()
            .column(outbox::Column::Id)
            .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
            .filter(outbox::Column::Status.eq(status))
            .into_tuple()
            .all(ctx.db())
            .await?;
        kept.extend(found);
    }
    Ok(kept)
}

/// A retry or a cancel of one mail.
async fn one(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> HttpResponse {
    let (id, action) = path.into_inner();
    let Ok(id) = id.parse::<i64>() else {
        return not_found(&ctx, &user, &req);
    };
    let mail = match visible_mail(&ctx, &user, id).await {
        Ok(Some(m)) => m,
        Ok(None) => return not_found(&ctx, &user, &req),
        Err(e) => return db_down(e),
    };
    let only = Condition::all()
        .add(outbox::Column::Id.eq(mail.id))
        .add(outbox::Column::Status.is_in(actionable_by(&user, &action).iter().copied()));
    let shared = shared.into_inner();
    let done = match action.as_str() {
        "retry" => retry(&ctx, &shared, only).await,
        "cancel" => cancel(&ctx, only, &user).await,
        _ => return not_found(&ctx, &user, &req),
    };
    let changed = match done {
        Ok(c) => !c.ids.is_empty(),
        Err(e) => return db_down(e),
    };
    let now = outbox::Entity::find_by_id(mail.id)
        .one(ctx.db())
        .await
        .ok()
        .flatten()
        .map_or(mail.status.clone(), |m| m.status);
    tracing::info!(outbox_id = mail.id, user_id = user.id, action = %action, changed, "outbox action");
    if wants_json(&req) {
        let status = if changed {
            StatusCode::OK
        } else {
            StatusCode::CONFLICT
        };
        return HttpResponse::build(status).json(serde_json::json!({
            "id": mail.id,
            "action": action,
            "changed": changed,
            "status": now,
            "message": if changed { None } else { Some(refusal_words(&now)) },
        }));
    }
    let flash = match (changed, action.as_str()) {
        (true, "retry") => "retried=1".to_string(),
        (true, _) => "cancelled=1".to_string(),
        (false, _) => format!("refused={now}"),
    };
    see_other(&format!("{OUTBOX}/{}?{flash}", mail.id))
}

/// A bulk action's request: the filter, the action, and whether it is confirmed.
#[derive(Deserialize)]
struct BulkForm {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    action: String,
    #[serde(default)]
    confirm: String,
}

#[derive(Deserialize)]
struct BulkJson {
    #[serde(default)]
    filter: Filter,
    action: String,
    #[serde(default)]
    confirm: bool,
}

async fn bulk(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let json = wants_json(&req);
    let parsed = if json {
        serde_json::from_slice::<BulkJson>(&body)
            .map(|b| (b.filter, b.action, b.confirm))
            .map_err(|e| e.to_string())
    } else {
        serde_urlencoded::from_bytes::<BulkForm>(&body)
            .map(|b| (b.filter, b.action, b.confirm == "yes"))
            .map_err(|e| e.to_string())
    };
    let (filter, action, confirmed) = match parsed {
        Ok(p) => p,
        Err(e) => {
            return json_refusal(
                StatusCode::BAD_REQUEST,
                &[field_error("body", format!("not a bulk action: {e}"))],
            );
        }
    };
    if !matches!(action.as_str(), "retry" | "cancel") {
        return json_refusal(
            StatusCode::BAD_REQUEST,
            &[field_error("action", "retry or cancel".into())],
        );
    }
    let statuses = actionable_by(&user, &action);
    let condition = match filter.condition(&user, ctx.db().get_database_backend()) {
        Ok(c) => c.add(outbox::Column::Status.is_in(statuses.iter().copied())),
        Err(problems) => return json_refusal(StatusCode::BAD_REQUEST, &problems),
    };
    if !confirmed {
        let matching = without_message()
            .filter(condition.clone())
            .count(ctx.db())
            .await;
        let matching = match matching {
            Ok(n) => n,
            Err(e) => return db_down(e),
        };
        if json {
            return HttpResponse::Ok().json(serde_json::json!({
                "action": action, "confirmed": false, "matching": matching,
            }));
        }
        return confirmation(&ctx, &user, &filter, &action, statuses, matching);
    }
    let shared = shared.into_inner();
    let done = match action.as_str() {
        "retry" => retry(&ctx, &shared, condition).await,
        _ => cancel(&ctx, condition, &user).await,
    };
    let changed = match done {
        Ok(c) => c,
        Err(e) => return db_down(e),
    };
    tracing::info!(user_id = user.id, action = %action, mails = changed.ids.len(), "outbox bulk action");
    if json {
        return HttpResponse::Ok().json(serde_json::json!({
            "action": action, "confirmed": true, "changed": changed.ids.len(), "ids": changed.ids,
        }));
    }
    let back = filter.query(1);
    see_other(&format!(
        "{OUTBOX}?{back}{}done={action}&n={}",
        if back.is_empty() { "" } else { "&" },
        changed.ids.len()
    ))
}

fn confirmation(
    ctx: &ModuleContext,
    user: &CurrentUser,
    filter: &Filter,
    action: &str,
    statuses: &[&str],
    matching: u64,
) -> HttpResponse {
    let which = statuses.join(" or ");
    let (verb, effect) = if action == "retry" {
        (
            "Retry",
            if statuses.contains(&"queued") {
                "Failed mails get a new round of attempts; queued mails become due now."
            } else {
                "They get a new round of attempts."
            },
        )
    } else {
        (
            "Cancel",
            "They will never be sent. Mails being sent right now are not touched.",
        )
    };
    let body = html! {
        h1 { (verb) " " (matching) " mail(s)?" }
        section.card.confirm {
            @if matching == 0 {
                p { "No " (which) " mail matches this filter: there is nothing to " (verb.to_lowercase()) "." }
            } @else {
                p { (verb) " " strong { (matching) " " (which) " mail(s)" } " that match the filter? " (effect) }
                form.inline method="post" action=(format!("{OUTBOX}/bulk")) {
                    (csrf(user))
                    (filter.hidden_fields())
                    input type="hidden" name="action" value=(action);
                    input type="hidden" name="confirm" value="yes";
                    button.danger[action == "cancel"] type="submit" { "Yes, " (verb.to_lowercase()) " " (matching) " mail(s)" }
                }
                " "
            }
            a.button.secondary href=(format!("{OUTBOX}?{}", filter.query(1))) { "Back to the outbox" }
        }
    };
    page(ctx, user, "Confirm", body)
}

/// "Release held mail" for a mailbox (operators).
async fn release(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    server_id: web::Path<i32>,
    req: HttpRequest,
) -> HttpResponse {
    let server_id = server_id.into_inner();
    let exists = mail_server::Entity::find_by_id(server_id)
        .one(ctx.db())
        .await
        .ok()
        .flatten()
        .is_some();
    if !user.is_admin || !exists {
        return not_found(&ctx, &user, &req);
    }
    shared.server_changed(server_id);
    match crate::health::release(
        &ctx,
        &shared.into_inner(),
        server_id,
        None,
        crate::health::Release::Forced,
    )
    .await
    {
        Ok(ended) => {
            tracing::info!(server_id, user_id = user.id, ended, "held mail released");
            if wants_json(&req) {
                return HttpResponse::Ok()
                    .json(serde_json::json!({ "server_id": server_id, "hold_ended": ended }));
            }
            see_other(&format!("{OUTBOX}?released={server_id}"))
        }
        Err(e) => db_down(e),
    }
}

/// The outbox routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/outbox", web::get().to(list))
        .route("/outbox/bulk", web::post().to(bulk))
        .route("/outbox/release/{server}", web::post().to(release))
        .route("/outbox/{id}", web::get().to(detail))
        .route("/outbox/{id}/{action}", web::post().to(one));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_unfolded_in_order() {
        let raw = "From: a@b.example\r\nSubject: a long\r\n subject\r\nTo: c@d.example\r\n\r\nBody: not a header\r\n";
        assert_eq!(
            headers_of(raw),
            vec![
                ("From".to_string(), "a@b.example".to_string()),
                ("Subject".to_string(), "a long subject".to_string()),
                ("To".to_string(), "c@d.example".to_string()),
            ]
        );
    }

    #[test]
    fn a_letter_matches_in_either_case_and_other_characters_as_themselves() {
        assert_eq!(case_forms('ä'), ['ä', 'Ä']);
        assert_eq!(case_forms('Ä'), ['Ä', 'ä']);
        assert_eq!(case_forms('a'), ['a', 'A']);
        assert_eq!(case_forms('%'), ['%']);
        // A letter whose other case is two characters keeps the forms that are one.
        assert_eq!(case_forms('ß'), ['ß']);
    }

    #[test]
    fn the_query_string_keeps_only_what_is_set() {
        let f = Filter {
            status: "sent".into(),
            q: "dana & co".into(),
            ..Filter::default()
        };
        assert_eq!(f.query(1), "status=sent&q=dana+%26+co");
        assert_eq!(f.query(2), "status=sent&q=dana+%26+co&page=2");
    }
}

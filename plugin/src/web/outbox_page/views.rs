//! The outbox's list: the filter form, the held mailboxes, the mails, as a page or JSON.

use super::*;

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

pub(super) fn outbox_mail(
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

pub(super) async fn server_names(ctx: &ModuleContext) -> HashMap<i32, String> {
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
pub(super) async fn mailbox_choices(
    ctx: &ModuleContext,
    user: &CurrentUser,
) -> HashMap<i32, String> {
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
pub(super) async fn authors(ctx: &ModuleContext) -> Vec<(i64, String)> {
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

pub(super) fn db_down(e: sea_orm::DbErr) -> HttpResponse {
    tracing::error!(error = %e, "the outbox could not be read");
    HttpResponse::ServiceUnavailable().body("The database did not answer. Try again in a moment.")
}

/// The answer for a mail that does not exist or is not the viewer's.
pub(super) fn not_found(
    ctx: &ModuleContext,
    user: &CurrentUser,
    req: &HttpRequest,
) -> HttpResponse {
    no_such(ctx, user, req, ("mail", "mail"))
}

/// The answer for a `(field, thing)` (e.g. `("server", "mail server")`) that does not exist
/// or is not the viewer's: JSON naming the field, or a page leading back to the outbox.
pub(super) fn no_such(
    ctx: &ModuleContext,
    user: &CurrentUser,
    req: &HttpRequest,
    (field, thing): (&str, &str),
) -> HttpResponse {
    if wants_json(req) {
        return json_refusal(
            StatusCode::NOT_FOUND,
            &[field_error(field, format!("there is no such {thing}"))],
        );
    }
    page_with(
        StatusCode::NOT_FOUND,
        ctx,
        user,
        "Not found",
        html! { h1 { "No such " (thing) } p { a href=(OUTBOX) { "Back to the outbox" } } },
    )
}

pub(super) fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("Location", to))
        .finish()
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    #[serde(flatten)]
    filter: Filter,
    page: Option<String>,
    released: Option<String>,
    done: Option<String>,
    n: Option<String>,
}

pub(super) fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The held and throttled mailboxes, each held one with "Release held mail" (a throttled one
/// sends again by itself when Exchange's wait is over).
/// `return_to` is where "Release held mail" leads back to (this page with its filter).
pub(super) async fn held_mailboxes(
    ctx: &ModuleContext,
    user: &CurrentUser,
    return_to: &str,
) -> Markup {
    let now = ctx.clock().now();
    let healths = crate::delivery::health::all(ctx).await.unwrap_or_default();
    let waiting = crate::delivery::health::waiting_counts(ctx)
        .await
        .unwrap_or_default();
    // Each mailbox's name, and where the operators act on it (a personal mailbox's page is
    // its owner's: theirs is its mail).
    let all = mail_server::Entity::find()
        .all(ctx.db())
        .await
        .unwrap_or_default();
    let personal: std::collections::HashSet<i32> = all
        .iter()
        .filter(|s| s.kind == "personal")
        .map(|s| s.id)
        .collect();
    let servers: HashMap<i32, (String, String)> = all
        .into_iter()
        .map(|s| {
            let link = crate::delivery::hold::operators_link(&s);
            (s.id, (s.name, link))
        })
        .collect();
    let mut held: Vec<(i32, Health)> = healths
        .iter()
        .map(|(id, row)| (*id, Health::of(Some(row), now)))
        .filter(|(_, h)| *h != Health::Ready)
        .collect();
    held.sort_by_key(|(id, _)| *id);
    let releasable = held
        .iter()
        .any(|(_, h)| h.reason().is_some_and(|r| r.release_can_help()));
    html! {
        @if !held.is_empty() {
            section.card id="held" {
                h2 { "Mailboxes that hold mail" }
                // `data-label`: a phone shows each mailbox as a card, each field named.
                table.held.cards {
                    thead { tr { th { "Mailbox" } th { "State" } th { "Waiting" } th {} } }
                    tbody {
                        @for (id, health) in &held {
                            tr data-server=(id) {
                                td.title { @match servers.get(id) {
                                    Some((name, link)) => a href=(link) { (name) },
                                    None => "(deleted)",
                                } }
                                td data-label="State" { span.badge.bad { (health.label()) }
                                    @if let Health::Held { detail, .. } = health { p.help { (detail) } } }
                                td data-label="Waiting" { (waiting.get(id).copied().unwrap_or(0)) }
                                td {
                                    @match health {
                                        Health::Held { reason, .. } if !reason.release_can_help() => span.help {
                                            @if personal.contains(id) {
                                                "Only a new sign-in ends this hold: its owner was asked to click Reconnect under My mailbox."
                                            } @else {
                                                "Only a new sign-in ends this hold: click Reconnect on "
                                                @match servers.get(id) {
                                                    Some((_, link)) => a href=(link) { "the server's page" },
                                                    None => "the server's page",
                                                }
                                                "."
                                            }
                                        },
                                        Health::Held { .. } => form.inline method="post" action=(format!("{OUTBOX}/release/{id}")) {
                                            (csrf(user))
                                            input type="hidden" name="return_to" value=(return_to);
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
                @if releasable {
                    p.help { "Releasing ends the hold and sends the waiting mails now, in queue order. If the cause is not fixed the mailbox is held again at the first refusal." }
                }
            }
        }
    }
}

pub(super) fn filter_form(
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

pub(super) fn mails_table(
    mails: &[outbox::Model],
    servers: &HashMap<i32, String>,
    waits: &HashMap<i32, String>,
    viewer: &CurrentUser,
) -> Markup {
    html! {
        div.scroll { table.outbox.cards role="table" {
            thead { tr role="row" { th role="columnheader" { "Queued (UTC)" } th role="columnheader" { "Subject" } th role="columnheader" { "To" } th role="columnheader" { "From" } th role="columnheader" { "Mailbox" } th role="columnheader" { "Status" } th role="columnheader" { "Attempts" } th role="columnheader" { "Last reply" } } }
            tbody {
                @for m in mails {
                    // `data-label`: a phone shows each mail as a card, each field named.
                    tr role="row" data-id=(m.id) data-message-id=(m.message_id) {
                        td role="cell" data-label="Queued (UTC)" { (when(m.created_at)) }
                        td.subject.title role="cell" { a href=(format!("{OUTBOX}/{}", m.id)) { @if m.subject.is_empty() { "(no subject)" } @else { (m.subject) } } }
                        td role="cell" data-label="To" { (m.recipients.lines().next().unwrap_or(""))
                            @let more = m.recipients.lines().count().saturating_sub(1);
                            @if more > 0 { " +" (more) } }
                        td role="cell" data-label="From" { (m.from_header) }
                        td role="cell" data-label="Mailbox" { (servers.get(&m.server_id).map(String::as_str).unwrap_or("(deleted)")) }
                        td.status role="cell" data-label="Status" { (status_badge(&m.status))
                            @if matches!(m.status.as_str(), "queued" | "sending") {
                                @if let Some(w) = waits.get(&m.server_id) {
                                    p.help.waiting { @if viewer.is_admin { "Waits for its mailbox (see above)." } @else { (w) } }
                                }
                            } }
                        td role="cell" data-label="Attempts" { (m.attempts) }
                        td role="cell" data-label="Last reply" { (m.last_reply.as_deref().map(classified_reply).unwrap_or_default()) }
                    }
                }
            }
        } }
    }
}

/// Whether the bulk `action` can change a mail of `filter` for `user`: its status filter
/// leaves a status the action applies to (a user retries only failed mails; nobody retries or
/// cancels sent ones).
fn bulk_applies(filter: &Filter, user: &CurrentUser, action: &str) -> bool {
    filter.status.is_empty() || actionable_by(user, action).contains(&filter.status.as_str())
}

/// This page as the viewer filtered it, without the flash of the last action: where an action
/// taken from it leads back to.
fn this_page(req: &HttpRequest) -> String {
    let kept: Vec<(String, String)> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| !matches!(k.as_ref(), "released" | "done" | "n"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    if query.is_empty() {
        OUTBOX.to_string()
    } else {
        format!("{OUTBOX}?{query}")
    }
}

pub(super) async fn list(
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
    let paginator = outbox::Entity::find()
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
    let waits = crate::delivery::waiting::waiting_words_as(&ctx, &user).await;
    let pages = Ord::max(total.div_ceil(PER_PAGE), 1);
    let this_page = this_page(&req);
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
        (Some(_), _, _) => Some(RELEASED_FLASH.to_string()),
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
        @if user.is_admin { (held_mailboxes(&ctx, &user, &this_page).await) }
        section.card { (filter_form(&filter, &user, &mailbox_choices(&ctx, &user).await, &authors)) }
        section.card {
            p.count { (total) " mail(s)" @if pages > 1 { ", page " (page_no) " of " (pages) } }
            @let (can_retry, can_cancel) = (bulk_applies(&filter, &user, "retry"), bulk_applies(&filter, &user, "cancel"));
            @if total > 0 {
                @if can_retry || can_cancel { form.inline method="post" action=(format!("{OUTBOX}/bulk")) {
                    (csrf(&user))
                    (filter.hidden_fields())
                    @if can_retry { button.secondary type="submit" name="action" value="retry" { "Retry these…" } " " }
                    @if can_cancel { button.secondary type="submit" name="action" value="cancel" { "Cancel these…" } }
                    span.help { @if user.is_admin { " Applies to the queued and failed mails of this filter, after a confirmation." } @else if can_retry && can_cancel { " Retry applies to the failed mails of this filter, cancel to the queued and failed ones, after a confirmation." } @else { " Cancels the queued and failed mails of this filter, after a confirmation." } }
                } }
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

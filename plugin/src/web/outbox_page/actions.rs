//! The outbox's actions: retry and cancel (one mail or a confirmed filtered set) and releasing a
//! held mailbox.

use super::*;

/// What a retry or a cancel did.
#[derive(Debug, Serialize)]
pub struct Changed {
    /// The mails changed.
    pub ids: Vec<i64>,
}

/// Queues the mails matching `condition` again: a failed one gets a new round of attempts, a
/// queued one is due now. Their mailboxes' drains are woken. Only mails that are still queued
/// or failed at the moment of the update change.
pub async fn retry(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    condition: Condition,
    by: &CurrentUser,
) -> Result<Changed, sea_orm::DbErr> {
    let now = ctx.clock().now();
    // Due now, after their mailboxes' last wake: the wake below sends them; should it reach no
    // drain, the sweep does.
    // The rows each update wrote (a mail claimed meanwhile is not among them): only those are
    // reported, told in their history and woken.
    let (mut new_round, mut made_due, mut servers) = (Vec::new(), Vec::new(), Vec::new());
    let mut were_failed = Vec::new();
    for status in ACTIONABLE {
        let candidates = ids_with(ctx, condition.clone(), status).await?;
        for chunk in candidates.chunks(500) {
            let mut update = outbox::Entity::update_many()
                .col_expr(outbox::Column::Status, Expr::value("queued"))
                .col_expr(outbox::Column::NextAttemptAt, Expr::value(now))
                .col_expr(outbox::Column::UpdatedAt, Expr::value(now));
            if status == "failed" {
                update = update
                    .col_expr(outbox::Column::Attempts, Expr::value(0))
                    .col_expr(
                        outbox::Column::SentAt,
                        Expr::value(Option::<DateTime<Utc>>::None),
                    );
            }
            let written = update
                .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
                .filter(outbox::Column::Status.eq(status))
                .exec_with_returning(ctx.db())
                .await?;
            let into = if status == "failed" {
                &mut new_round
            } else {
                &mut made_due
            };
            into.extend(written.iter().map(|m| m.id));
            servers.extend(written.iter().map(|m| m.server_id));
        }
        if status == "failed" {
            were_failed.extend(candidates.iter().copied());
        }
    }
    use crate::outbox::history::{DUE_NOW, RETRIED, actions};
    actions(ctx.db(), &new_round, RETRIED, by, now).await?;
    actions(ctx.db(), &made_due, DUE_NOW, by, now).await?;
    let mut ids: Vec<i64> = new_round.into_iter().chain(made_due).collect();
    ids.sort_unstable();
    resolve_failed_notices(ctx, &were_failed, &ids).await;
    servers.sort_unstable();
    servers.dedup();
    for server_id in servers {
        shared.wake(server_id).await;
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
    let mut cancelled = Vec::with_capacity(ids.len());
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let written = outbox::Entity::update_many()
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
            .exec_with_returning(ctx.db())
            .await?;
        cancelled.extend(written.iter().map(|m| m.id));
        rows.extend(written);
    }
    // Only the rows this update wrote (not a mail claimed meanwhile, nor one cancelled twice).
    let mut ids = cancelled;
    ids.sort_unstable();
    crate::outbox::history::actions(ctx.db(), &ids, crate::outbox::history::CANCELLED, by, now)
        .await?;
    resolve_failed_notices(ctx, &were_failed, &ids).await;
    // The cancel stands whatever happens here.
    if let Err(e) = crate::delivery::hold::authors_cancelled(ctx, &rows).await {
        tracing::warn!(error = %e, "resolving the notices of authors who cancelled failed");
    }
    Ok(Changed { ids })
}

/// Resolves the "Mail not sent" notices of the mails that were failed and have been changed
/// (`changed`, sorted): retried or cancelled, nobody needs to act on them any more.
pub(super) async fn resolve_failed_notices(
    ctx: &ModuleContext,
    were_failed: &[i64],
    changed: &[i64],
) {
    for id in were_failed {
        if changed.binary_search(id).is_ok()
            && let Err(e) = ctx
                .notifier()
                .resolve(&crate::outbox::failed_notice::key(*id))
                .await
        {
            tracing::warn!(error = %e, outbox_id = id, "a failed-mail notice was not resolved");
        }
    }
}

pub(super) async fn ids_with(
    ctx: &ModuleContext,
    condition: Condition,
    status: &str,
) -> Result<Vec<i64>, sea_orm::DbErr> {
    outbox::Entity::find()
        .select_only()
        .column(outbox::Column::Id)
        .filter(condition)
        .filter(
            outbox::status_named(status)
                .unwrap_or_else(|| outbox::Column::Status.eq(status.to_string())),
        )
        .order_by_asc(outbox::Column::Id)
        .into_tuple()
        .all(ctx.db())
        .await
}

/// The mail whose id is `id` in a path, if `user` may see it; else the page to answer (the
/// module's "No such mail" page for a bad, missing or hidden id; 503 when the database failed).
async fn mail_in_path(
    ctx: &ModuleContext,
    user: &CurrentUser,
    id: &str,
    req: &HttpRequest,
) -> Result<outbox::Model, HttpResponse> {
    let Ok(id) = id.parse::<i64>() else {
        return Err(not_found(ctx, user, req));
    };
    match visible_mail(ctx, user, id).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(not_found(ctx, user, req)),
        Err(e) => Err(db_down(e)),
    }
}

/// A retry or a cancel of one mail.
pub(super) async fn one(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> HttpResponse {
    let (id, action) = path.into_inner();
    let mail = match mail_in_path(&ctx, &user, &id, &req).await {
        Ok(mail) => mail,
        Err(page) => return page,
    };
    let only = Condition::all()
        .add(outbox::Column::Id.eq(mail.id))
        .add(outbox::Column::Status.is_in(actionable_by(&user, &action).iter().copied()));
    let shared = shared.into_inner();
    let done = match action.as_str() {
        "retry" => retry(&ctx, &shared, only, &user).await,
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

/// The page that asks before a mail is cancelled (its page's Cancel leads here): what it is,
/// that it will never be sent and that this cannot be undone; the form posts the cancel.
pub(super) async fn confirm_cancel(
    ctx: web::Data<ModuleContext>,
    user: CurrentUser,
    id: web::Path<String>,
    req: HttpRequest,
) -> HttpResponse {
    let mail = match mail_in_path(&ctx, &user, &id, &req).await {
        Ok(mail) => mail,
        Err(page) => return page,
    };
    let base = format!("{OUTBOX}/{}", mail.id);
    let cancellable = actionable_by(&user, "cancel").contains(&mail.status.as_str());
    let subject = if mail.subject.is_empty() {
        "(no subject)"
    } else {
        mail.subject.as_str()
    };
    let body = html! {
        h1 { "Cancel this mail?" }
        section.card.confirm {
            p { strong { (subject) } " to " (mail.recipients.lines().collect::<Vec<_>>().join(", ")) }
            @if cancellable {
                p { "It will never be sent, and this cannot be undone: to send it later, write it again from its record." }
                form.inline method="post" action=(format!("{base}/cancel")) {
                    (csrf(&user))
                    button.danger type="submit" { "Yes, cancel it" }
                }
                " "
            } @else {
                p { (refusal_words(&mail.status)) }
            }
            a.button.secondary href=(base) { "Keep it" }
        }
    };
    page(&ctx, &user, "Cancel this mail?", body)
}

/// A bulk action's request: the filter, the action, and whether it is confirmed.
#[derive(Deserialize)]
pub(super) struct BulkForm {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    action: String,
    #[serde(default)]
    confirm: String,
}

#[derive(Deserialize)]
pub(super) struct BulkJson {
    #[serde(default)]
    filter: Filter,
    action: String,
    #[serde(default)]
    confirm: bool,
}

pub(super) async fn bulk(
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
            return refused(
                &ctx,
                &user,
                json,
                &[field_error("body", format!("not a bulk action: {e}"))],
            );
        }
    };
    if !matches!(action.as_str(), "retry" | "cancel") {
        return refused(
            &ctx,
            &user,
            json,
            &[field_error("action", "retry or cancel".into())],
        );
    }
    let statuses = actionable_by(&user, &action);
    let condition = match filter.condition(&user, ctx.db().get_database_backend()) {
        Ok(c) => c.add(outbox::Column::Status.is_in(statuses.iter().copied())),
        Err(problems) => return refused(&ctx, &user, json, &problems),
    };
    if !confirmed {
        let matching = outbox::Entity::find()
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
        "retry" => retry(&ctx, &shared, condition, &user).await,
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

#[derive(Deserialize)]
pub(super) struct ReleaseForm {
    #[serde(default)]
    return_to: Option<String>,
}

/// Whether `to` is a page of the outbox on this host (a path, never another site).
fn is_outbox_page(to: &str) -> bool {
    (to == OUTBOX || to.starts_with(&format!("{OUTBOX}?")) || to.starts_with(&format!("{OUTBOX}/")))
        && !to.contains("//")
        && !to.contains('\\')
        && !to.chars().any(char::is_control)
}

/// A bulk action refused before anything was changed: the problems as JSON (`json`), or a page
/// that says them in words and leads back to the outbox.
fn refused(
    ctx: &ModuleContext,
    user: &CurrentUser,
    json: bool,
    problems: &[crm_sdk::FieldError],
) -> HttpResponse {
    if json {
        return json_refusal(StatusCode::BAD_REQUEST, problems);
    }
    page_with(
        StatusCode::BAD_REQUEST,
        ctx,
        user,
        "Nothing was changed",
        html! {
            h1 { "Nothing was changed" }
            ul { @for p in problems { li.error role="alert" { (p.field) ": " (p.message) } } }
            p { a href=(OUTBOX) { "Back to the outbox" } " — correct the filter there, then choose the action again." }
        },
    )
}

pub(super) fn confirmation(
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

/// "Release held mail" for a mailbox (operators). A form may say where to go back to
/// (`return_to`: a page of the outbox, e.g. the list with its filter); the flash is added there.
pub(super) async fn release(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    server_id: web::Path<i32>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let server_id = server_id.into_inner();
    let server = match mail_server::Entity::find_by_id(server_id)
        .one(ctx.db())
        .await
    {
        Ok(found) => found.filter(|_| user.is_admin),
        Err(e) => return db_down(e),
    };
    let Some(server) = server else {
        return no_such(&ctx, &user, &req, ("server", "mail server"));
    };
    // An operator opens a shared server's page, or their own mailbox's.
    let not_theirs = server.owner_user_id.is_some_and(|o| o != user.id);
    let personal = server.owner_user_id.is_some();
    let return_to = serde_urlencoded::from_bytes::<ReleaseForm>(&body)
        .ok()
        .and_then(|f| f.return_to)
        .filter(|to| is_outbox_page(to))
        .unwrap_or_else(|| OUTBOX.to_string());
    shared.server_changed(server_id);
    match crate::delivery::release::release_by(&ctx, &shared.into_inner(), server_id, &user).await {
        Ok(Err(not)) if wants_json(&req) => json_refusal(
            StatusCode::CONFLICT,
            &[field_error("server", not.words(personal))],
        ),
        Ok(Err(not)) => page_with(
            StatusCode::CONFLICT,
            &ctx,
            &user,
            not.title(),
            html! {
                h1 { (not.title()) }
                p { (not.words(personal)) }
                p {
                    @if !not_theirs { a href=(format!("/microsoft_outlook/servers/{server_id}")) { "Go to the mail server" } " · " }
                    a href=(return_to) { "Back to the outbox" }
                }
            },
        ),
        Ok(Ok(ended)) => {
            tracing::info!(server_id, user_id = user.id, ended, "held mail released");
            if wants_json(&req) {
                return HttpResponse::Ok()
                    .json(serde_json::json!({ "server_id": server_id, "hold_ended": ended }));
            }
            let joint = if return_to.contains('?') { '&' } else { '?' };
            see_other(&format!("{return_to}{joint}released={server_id}"))
        }
        Err(e) => db_down(e),
    }
}

//! A mail's page in the outbox: envelope, headers, attempts and replies in words, its actions.

use super::message::MessageView;
use super::*;

/// The mail `id` if `viewer` may see it (operators: every mail; others: their own).
pub(super) async fn visible_mail(
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
pub(super) struct DetailFlash {
    retried: Option<String>,
    cancelled: Option<String>,
    queued: Option<String>,
    refused: Option<String>,
    released: Option<String>,
}

/// What a Retry now did, as far as this page can tell yet: the mail is usually still on its
/// way when the page is shown, so it says so and links to the page again (without the flash);
/// `held`: its mailbox is held or throttled, so it waits for that instead.
fn retried_flash(status: &str, id: i64, held: bool) -> Markup {
    match status {
        "sent" => {
            html! { p.flash.ok role="status" { "Sent: the server accepted it on this retry." } }
        }
        "failed" => {
            html! { p.flash.bad role="alert" { "Retried, and it failed again: the server's answer is below." } }
        }
        _ if held => {
            html! { p.flash.warn role="status" { "Due now, but its mailbox is not sending now: it goes out once the mailbox is ready again (the box below says why)." } }
        }
        _ => html! {
            p.flash.ok role="status" {
                "Queued again: it is being sent now, so the status below is from before. "
                a href=(format!("/microsoft_outlook/outbox/{id}")) { "See its outcome" }
                " in a few seconds."
            }
        },
    }
}

/// What the mail page shows of one mail: its row (as the viewer may see it), its server, its
/// mailbox's health and the words for a wait, and what is kept of its message.
struct Viewed {
    mail: outbox::Model,
    server: Option<mail_server::Model>,
    health: Health,
    waits: HashMap<i32, String>,
    headers: Vec<(String, String)>,
    message: Option<MessageView>,
    body_kept: bool,
    /// Its history as the viewer may read it, and how many older events it leaves out.
    history: (Vec<crate::outbox::history::Entry>, u64),
}

impl Viewed {
    /// Loads mail `id` as `user` may see it; `None` when it is not there or not theirs.
    async fn load(
        ctx: &ModuleContext,
        user: &CurrentUser,
        id: i64,
    ) -> Result<Option<Self>, sea_orm::DbErr> {
        let Some(mail) = visible_mail(ctx, user, id).await? else {
            return Ok(None);
        };
        let mail = for_viewer(mail, user);
        let history = crate::outbox::history::of_mail(ctx.db(), &mail, user).await?;
        let server = mail_server::Entity::find_by_id(mail.server_id)
            .one(ctx.db())
            .await
            .ok()
            .flatten();
        let health = crate::delivery::health::get(ctx, mail.server_id)
            .await
            .unwrap_or(Health::Ready);
        let waits = crate::delivery::waiting::waiting_words_as(ctx, user).await;
        let body = outbox_body::Entity::find_by_id(mail.id)
            .one(ctx.db())
            .await
            .ok()
            .flatten();
        Ok(Some(Self {
            headers: body
                .as_ref()
                .map(|b| headers_of(&b.raw))
                .unwrap_or_default(),
            message: body.as_ref().and_then(|b| MessageView::of(&b.raw)),
            body_kept: body.is_some(),
            history,
            mail,
            server,
            health,
            waits,
        }))
    }

    /// Whether a person queued it again after it failed (its attempts count from there).
    fn retried(&self) -> bool {
        self.history
            .0
            .iter()
            .any(|e| e.kind == crate::outbox::history::RETRIED)
    }

    /// Whether the mail is still to send and its mailbox is held or throttled.
    fn waits_on_mailbox(&self) -> bool {
        matches!(self.mail.status.as_str(), "queued" | "sending") && self.health != Health::Ready
    }

    /// What its last attempt meant, as `user` reads it, unless the waiting box below says it:
    /// the mail whose reply held its mailbox has the hold's words, said there once; an
    /// author's words leave out what they are told there. `None` when nothing is left.
    fn what_happened(&self, user: &CurrentUser) -> Option<&str> {
        let words = self.mail.last_error.as_deref()?;
        if !self.waits_on_mailbox() {
            return Some(words).filter(|w| !w.is_empty());
        }
        let words = if user.is_admin {
            words
        } else {
            crate::outbox::user_words::without_told(words)
        };
        let said_below = self.wait_words(user).as_deref() == Some(words);
        Some(words).filter(|w| !w.is_empty() && !said_below)
    }

    /// The words for its mailbox's wait: an operator reads the hold's detail, anyone else
    /// what they are told.
    fn wait_words(&self, user: &CurrentUser) -> Option<String> {
        match &self.health {
            Health::Held { detail, .. } if user.is_admin => Some(detail.clone()),
            _ => self.waits.get(&self.mail.server_id).cloned(),
        }
    }
}

pub(super) async fn detail(
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
    let viewed = match Viewed::load(&ctx, &user, id).await {
        Ok(Some(v)) => v,
        Ok(None) => return not_found(&ctx, &user, &req),
        Err(e) => return db_down(e),
    };
    if wants_json(&req) {
        let servers = server_names(&ctx).await;
        return detail_json(viewed, &servers, &user);
    }
    let limits = crate::delivery::limits::limits(&ctx, &shared).await;
    let now = ctx.clock().now();
    let mail = &viewed.mail;
    let body = html! {
        h1 { @if mail.subject.is_empty() { "(no subject)" } @else { (mail.subject) } }
        p { a href=(OUTBOX) { "← Outbox" } }
        @if let Some(flash) = detail_flash(&flash, &viewed) { (flash) }
        (envelope_card(&viewed, &user))
        (delivery_card(&viewed, &user, &limits, now))
        (history_card(&viewed))
        (message_cards(&viewed))
    };
    page(&ctx, &user, "Mail", body)
}

/// The mail page as JSON: the mail as lists show it, its envelope sender and size, the stored
/// message's headers and parts, the classified reply, its mailbox's health and what the
/// viewer may do.
fn detail_json(v: Viewed, servers: &HashMap<i32, String>, user: &CurrentUser) -> HttpResponse {
    let health_view = serde_json::json!({
        "state": v.health.state(),
        "label": v.health.label(),
        "detail": v.wait_words(user),
    });
    let classified = v.mail.last_reply.as_deref().map(classified_reply);
    let status = v.mail.status.as_str();
    let (retry, cancel) = (
        actionable_by(user, "retry").contains(&status),
        actionable_by(user, "cancel").contains(&status),
    );
    // Release held mail, as the page offers it to an operator.
    let release = user.is_admin
        && v.waits_on_mailbox()
        && v.health.reason().is_some_and(|r| r.release_can_help());
    let (envelope_from, raw_size) = (v.mail.envelope_from.clone(), v.mail.size_bytes);
    HttpResponse::Ok().json(serde_json::json!({
        "mail": outbox_mail(v.mail, servers, &v.waits),
        "envelope_from": envelope_from,
        "size_bytes": raw_size,
        "headers": v.headers,
        "message": v.message,
        "classified_reply": classified,
        "mailbox_health": health_view,
        "actions": { "retry": retry, "cancel": cancel, "release": release },
        "history": v.history.0,
        "history_left_out": v.history.1,
    }))
}

/// The line that tells what the action that led here did.
fn detail_flash(flash: &DetailFlash, v: &Viewed) -> Option<Markup> {
    if flash.retried.is_some() {
        Some(retried_flash(
            &v.mail.status,
            v.mail.id,
            v.waits_on_mailbox(),
        ))
    } else if flash.released.is_some() {
        Some(html! { p.flash.ok role="status" { (RELEASED_FLASH) } })
    } else if flash.cancelled.is_some() {
        Some(html! { p.flash.ok role="status" { "Cancelled: this mail will not be sent." } })
    } else if flash.queued.is_some() && v.waits_on_mailbox() {
        Some(
            html! { p.flash.warn role="status" { "Test mail queued: it waits with the mailbox's other mail until the mailbox is ready again (the box below says why)." } },
        )
    } else if flash.queued.is_some() {
        Some(
            html! { p.flash.ok role="status" { "Test mail queued: it goes out through the normal queue." } },
        )
    } else {
        flash
            .refused
            .as_deref()
            .map(|why| html! { p.flash.bad role="alert" { (refusal_words(why)) } })
    }
}

/// Who sent the mail to whom, through which mailbox, for which record, and when.
fn envelope_card(v: &Viewed, user: &CurrentUser) -> Markup {
    let mail = &v.mail;
    let record_link = match mail.record_model.as_str() {
        "contact" => Some(format!("/contacts/{}", mail.record_id)),
        "mail_server" => Some(format!("/microsoft_outlook/servers/{}", mail.record_id)),
        _ => None,
    };
    html! {
        section.card id="envelope" {
            h2 { "Envelope" }
            table.fields { tbody {
                tr { th { "Status" } td.status { (status_badge(&mail.status)) } }
                tr { th { "Message-ID" } td { code { "<" (mail.message_id) ">" } } }
                tr { th { "Envelope sender (MAIL FROM)" } td { (mail.envelope_from) } }
                tr { th { "Recipients (RCPT TO)" } td { @for r in mail.recipients.lines() { (r) br; } } }
                tr { th { "From" } td { (mail.from_header) } }
                tr { th { "Mailbox" } td { @match &v.server {
                    Some(s) if user.is_admin || s.owner_user_id == Some(user.id) => a href=(crate::web::servers::server_url(s)) { (s.name) " (" (s.mailbox) ")" },
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
    }
}

/// Its attempts and the server's last answer, what its mailbox waits for (with Release held
/// mail for an operator where a release can help), and the actions the viewer may take.
fn delivery_card(
    v: &Viewed,
    user: &CurrentUser,
    limits: &crate::delivery::limits::Limits,
    now: chrono::DateTime<chrono::Utc>,
) -> Markup {
    let mail = &v.mail;
    html! {
        section.card id="delivery" {
            h2 { "Delivery" }
            table.fields { tbody {
                tr { th { "Attempts" } td { (mail.attempts) @match mail.status.as_str() {
                    "failed" => " (failed: not tried again by itself)",
                    "sent" | "cancelled" => "",
                    _ => { " of at most " (limits.max_attempts) @if v.waits_on_mailbox() { " (waiting for its mailbox spends none)" } },
                } @if v.retried() { " — counted since the last retry; History has the earlier ones" } } }
                @if mail.status == "queued" { tr { th { "Next attempt" } td { (next_attempt(mail, now, limits.per_minute, &v.health)) } } }
                tr { th { "Last reply" } td.reply { (mail.last_reply.as_deref().unwrap_or("-")) } }
                @if let Some(reply) = &mail.last_reply { tr { th { "Classified" } td { (classified_reply(reply)) } } }
                @if let Some(words) = v.what_happened(user) { tr { th { "What happened" } td.words { (words) } } }
            } }
            @if v.waits_on_mailbox() {
                div.status.waiting {
                    p { span.badge.bad { @if user.is_admin { (v.health.label()) } @else { "Waiting for its mailbox" } } }
                    p { (v.wait_words(user).unwrap_or_default()) }
                    @if let Some(server) = v.server.as_ref().filter(|s| user.is_admin && s.owner_user_id.is_none_or(|o| o == user.id)) {
                        p { a href=(format!("/microsoft_outlook/servers/{}", server.id)) { "Go to its mail server, " (server.name) } }
                    }
                    @if user.is_admin && v.health.reason().is_some_and(|r| r.release_can_help()) {
                        form.inline method="post" action=(format!("{OUTBOX}/release/{}", mail.server_id)) {
                            (csrf(user))
                            input type="hidden" name="return_to" value=(format!("{OUTBOX}/{}", mail.id));
                            button type="submit" { "Release held mail" }
                            span.help { " Ends the hold of this mailbox and sends its waiting mails now, in queue order." }
                        }
                    }
                }
            }
            (actions(mail, user, v.waits_on_mailbox()))
        }
    }
}

/// How the mail got where it stands: queued, each attempt the server did not accept (its
/// reply and what it meant), each retry or cancel and by whom, and when it was sent.
fn history_card(v: &Viewed) -> Markup {
    let (entries, left_out) = &v.history;
    html! {
        section.card id="history" {
            h2 { "History" }
            @if *left_out > 0 {
                p.help { (left_out) " earlier events are not shown; the newest " (entries.len()) " are." }
            }
            table.history {
                thead { tr { th { "When (UTC)" } th { "What happened" } th { "Server's reply" } } }
                tbody {
                    @for e in entries {
                        tr class=(format!("event {}", e.kind)) {
                            td { (when(e.at)) }
                            td { (e.what) @if let Some(words) = &e.words { details { summary { "What it meant" } p.help { (words) } } } }
                            td.reply { (e.reply.as_deref().unwrap_or("-")) }
                        }
                    }
                }
            }
        }
    }
}

/// The stored message as the recipient reads it, and its headers; or why it is no longer kept.
fn message_cards(v: &Viewed) -> Markup {
    html! {
        @if let Some(message) = &v.message {
            section.card id="message" {
                h2 { "Message" }
                (message.render())
            }
        }
        section.card id="headers" {
            h2 { "Headers of the stored message" }
            @if v.body_kept {
                table.headers { tbody { @for (name, value) in &v.headers { tr { th { (name) } td { (value) } } } } }
            } @else {
                p.help { "The text of this mail is no longer kept: sent mail keeps it for the days set in Settings › Microsoft Outlook › Keep sent messages. Its addresses, subject and outcome stay." }
            }
        }
    }
}

pub(super) fn refusal_words(why: &str) -> &'static str {
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

/// Retry and Cancel for `mail`, as far as `user` may take them; `held` says that the mail
/// waits on its mailbox (so it goes when the mailbox is ready, not at its own next attempt).
pub(super) fn actions(mail: &outbox::Model, user: &CurrentUser, held: bool) -> Markup {
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
                    // Cancelling cannot be undone: the button leads to a page that asks first.
                    a.button.danger href=(format!("{base}/cancel")) { "Cancel" }
                    p.help { @if mail.status == "failed" { "Retry now sends it again as it is, with a new round of attempts: for when the cause is fixed (to change an address, write a new mail from the record). " } @else if user.is_admin { "Retry now makes it due now (a held mailbox still holds it). " } @else if held { "It goes out by itself once its mailbox is ready again. " } @else { "It is tried again by itself when its next attempt is due. " } "Cancel keeps it from ever being sent." }
                }
                "sending" => p.help { "This mail is being sent right now: it cannot be cancelled." },
                _ => {}
            }
        }
    }
}

/// When a queued mail goes. On a mailbox that is held or throttled: when the mailbox is tried
/// again (one of its mails probes it) or may send again, unless the mail's own next attempt
/// is later; the box below says why. On a ready mailbox: its own time when that is still to
/// come, else in its turn with the mailbox's other due mail, in queue order (and, with a
/// per-minute limit, at that pace).
fn next_attempt(
    mail: &outbox::Model,
    now: DateTime<Utc>,
    per_minute: usize,
    health: &Health,
) -> String {
    let own = mail.next_attempt_at;
    match (health, per_minute) {
        (Health::Held { until: Some(u), .. }, _) if *u > now && own <= *u => format!(
            "When the mailbox is ready again; it is tried again by itself at {} UTC (see below)",
            when(*u)
        ),
        (Health::Throttled { until }, _) if own <= *until => format!(
            "When the mailbox may send again, after {} UTC (see below)",
            when(*until)
        ),
        (Health::Held { .. } | Health::Throttled { .. }, _) if own > now => format!(
            "{} UTC, if the mailbox is ready again by then (see below)",
            when(own)
        ),
        (Health::Held { .. } | Health::Throttled { .. }, _) => {
            "When the mailbox is ready again (see below)".to_string()
        }
        (Health::Ready, _) if own > now => format!("{} UTC", when(own)),
        (Health::Ready, 0) => "Now, in queue order with this mailbox's other due mail".to_string(),
        (Health::Ready, n) => format!(
            "In its turn: in queue order with this mailbox's other due mail, at most {n} a minute"
        ),
    }
}

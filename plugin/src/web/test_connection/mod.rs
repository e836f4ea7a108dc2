//! "Test connection" and "Send a test mail" on a server's page (operators, or the owner of a
//! personal mailbox). The test connects, starts TLS, says EHLO and authenticates with the
//! stored token (refreshed when due) exactly as a delivery does — the same code in
//! [`crate::delivery::smtp`], taking one of the mailbox's connection slots only for the test — and shows
//! each step with its result, and on failure the classification table's words. A server that
//! sends through Microsoft Graph is tested with Graph's steps instead ([`graph`]). A test that
//! authenticates ends a hold whose cause it proves fixed. A failed test holds nothing: it only
//! reports (the next delivery classifies and holds as usual). The test mail is queued through
//! the normal queue, from the mailbox itself, and shows in the outbox.

mod graph;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use crm_sdk::{CurrentUser, ModuleContext, RecordRef};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::delivery::classify::{self, Facts, HoldReason};
use crate::delivery::smtp::{Reached, SendOutcome, SmtpFailure};
use crate::entities::mail_server;
use crate::outbox::compose::{AddressInput, MailRequest, OutgoingMail, SizeLimits};
use crate::runtime::Shared;
use crate::tokens::service::{AccessToken, TokenProblem, fresh_access_token};
use crate::web::layout::{csrf, managed_server, page, page_with};
use crate::web::mail_routes::{classified_reply, json_refusal, wants_json};
use crate::web::servers::server_url;

/// Holds that a successful connect and AUTH prove fixed.
const ENDED_BY_A_TEST: [HoldReason; 6] = [
    HoldReason::Unreachable,
    HoldReason::TokenRefused,
    HoldReason::SmtpAuthDisabled,
    HoldReason::NoUsableAuth,
    HoldReason::ServerRefused,
    HoldReason::TlsRefused,
];

/// How long a test waits for one of the mailbox's connection slots.
const SLOT_WAIT: Duration = Duration::from_secs(10);

/// One step of a test.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was tried.
    pub name: String,
    /// Whether it worked.
    pub ok: bool,
    /// What came of it.
    pub detail: String,
}

/// What a test found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether every step worked.
    pub ok: bool,
    /// The steps, in order, up to the one that failed.
    pub steps: Vec<Step>,
    /// On failure, the classification rule that matched.
    pub rule: Option<String>,
    /// On failure, what happened and what to do (the classification table's words).
    pub words: Option<String>,
    /// Whether the test ended a hold of the mailbox.
    pub hold_ended: bool,
}

fn step(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Step {
    Step {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// The steps a connection went through, up to `reached`, and the failed one after it.
fn connection_steps(
    server: &mail_server::Model,
    identity: &str,
    reached: Reached,
    failure: Option<String>,
) -> Vec<Step> {
    let address = format!("{}:{}", server.smtp_host, server.smtp_port);
    let mut plan: Vec<(Reached, String)> = Vec::new();
    plan.push((Reached::Connected, format!("TCP connection to {address}")));
    if server.security == "tls" {
        plan.push((
            Reached::Handshaken,
            format!("TLS handshake with {}", server.smtp_host),
        ));
        plan.push((Reached::Secured, "Greeting and EHLO over TLS".into()));
    } else {
        plan.push((Reached::Greeted, "Greeting and EHLO".into()));
        if server.security == "starttls" {
            plan.push((Reached::Secured, "STARTTLS".into()));
        }
    }
    plan.push((
        Reached::Authenticated,
        format!("AUTH XOAUTH2 as {identity}"),
    ));
    let mut steps = Vec::new();
    let mut failure = failure;
    for (at, name) in plan {
        if reached >= at {
            steps.push(step(name, true, "ok"));
        } else {
            if let Some(why) = failure.take() {
                steps.push(step(name, false, why));
            }
            break;
        }
    }
    steps
}

fn shown_reply(f: &SmtpFailure, viewer: &CurrentUser) -> String {
    match f.code {
        Some(_) if !viewer.is_admin => classified_reply(&f.text),
        _ => f.text.clone(),
    }
}

/// Tests `server`'s connection as `viewer` sees it (non-operators see reply codes only):
/// SMTP's steps, or Microsoft Graph's for a server whose transport is `graph`.
pub async fn test(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    viewer: &CurrentUser,
) -> Report {
    if let Some(report) = not_connected(ctx, server).await {
        return report;
    }
    if server.transport == "graph" {
        return graph::test(ctx, shared, server, viewer).await;
    }
    let mut steps = Vec::new();
    let mut token = match fresh_access_token(ctx, shared, server, false).await {
        Ok(t) => t,
        Err(problem) => return token_failed(steps, SMTP_TOKEN_STEP, &problem),
    };
    steps.push(token_step(SMTP_TOKEN_STEP, &token));
    let mut outcome = probe(ctx, shared, server, &token).await;
    if let (_, Err(SendOutcome::Failed(f))) = &outcome
        && f.refused_token()
        && !token.refreshed
    {
        // As a delivery does: a refused token that was not just issued is refreshed once.
        steps.push(step(
            "AUTH XOAUTH2 with the stored token",
            false,
            format!(
                "{} — refreshing the token and trying again",
                shown_reply(f, viewer)
            ),
        ));
        shared.smtp.forget(server.id);
        token = match fresh_access_token(ctx, shared, server, true).await {
            Ok(t) => t,
            Err(problem) => return token_failed(steps, SMTP_TOKEN_STEP, &problem),
        };
        steps.push(token_step(SMTP_TOKEN_STEP, &token));
        outcome = probe(ctx, shared, server, &token).await;
    }
    let identity = token
        .identities
        .first()
        .cloned()
        .unwrap_or_else(|| server.mailbox.clone());
    let (reached, result) = outcome;
    match result {
        Ok(()) => {
            steps.extend(connection_steps(server, &identity, reached, None));
            let hold_ended = end_hold(ctx, shared, server, (&ENDED_BY_A_TEST, viewer)).await;
            Report {
                ok: true,
                steps,
                rule: None,
                words: None,
                hold_ended,
            }
        }
        Err(SendOutcome::Failed(f)) => {
            let facts = Facts {
                mailbox: &server.mailbox,
                from: &server.mailbox,
                auth_user: if f.auth_user.is_empty() {
                    &server.mailbox
                } else {
                    &f.auth_user
                },
            };
            let verdict = classify::smtp(f.observed(), &facts);
            let shown = shown_reply(&f, viewer);
            steps.extend(connection_steps(
                server,
                &identity,
                reached,
                Some(shown.clone()),
            ));
            let words = test_words(&verdict, viewer.is_admin, (server, reached, &shown));
            Report {
                ok: false,
                steps,
                rule: Some(verdict.rule.to_string()),
                words: Some(words),
                hold_ended: false,
            }
        }
        Err(other) => no_slot(steps, "A connection slot of the mailbox", other),
    }
}

/// The words of a failed test: the verdict's, but a failure to connect that a mail would only
/// retry is, in a test, for the person who set the server up to look at.
/// The network between this CRM and the server is the operators' to check (`operator`: the
/// reader is one), never a mailbox owner's. A server that accepted the TCP connection
/// (`reached`, with what failed after it: `failure`) resolved and was reached, so its security
/// setting against its port comes first, then (operators) what is between.
fn test_words(
    verdict: &classify::Verdict,
    operator: bool,
    (server, reached, failure): (&mail_server::Model, Reached, &str),
) -> String {
    if verdict.rule == "unreachable" && reached >= Reached::Connected {
        let security = match server.security.as_str() {
            "starttls" => "STARTTLS",
            "tls" => "TLS from the start",
            _ => "none",
        };
        let address = format!("{}:{}", server.smtp_host, server.smtp_port);
        // A proxy, a firewall or the server itself may accept and drop.
        let otherwise = if operator {
            "if it does, something between this CRM's machine and the server (a proxy or a firewall that accepts and drops) or the server itself ended the connection"
        } else {
            "if it does, the CRM's operators check its connection to Microsoft"
        };
        let waits = "Mail meeting this would wait, spending no attempt, and be tried again later.";
        return match reached {
            Reached::Connected if server.security == "tls" => format!(
                "The server at {address} accepted the TCP connection, but the TLS handshake failed ({failure}). Check that this server's security setting ({security}) matches its port (Microsoft 365 takes STARTTLS on port 587; a port that takes STARTTLS or no security answers in plain text); {otherwise}. {waits}"
            ),
            Reached::Handshaken => format!(
                "TLS was set up with the server at {address}, but no SMTP greeting or EHLO answer came over it ({failure}). Check that the port is the server's SMTP port; {otherwise}. {waits}"
            ),
            Reached::Greeted => format!(
                "The server at {address} greeted, but STARTTLS failed ({failure}). Check that this server's security setting ({security}) matches its port (Microsoft 365 takes STARTTLS on port 587). {waits}"
            ),
            // A port that expects TLS from the start waits silently for it.
            _ => format!(
                "The server at {address} accepted the TCP connection, but no SMTP greeting or EHLO answer came over it ({failure}). Check that this server's security setting ({security}) matches its port (Microsoft 365 takes STARTTLS on port 587; a port that takes TLS from the start waits for TLS and never greets); {otherwise}. {waits}"
            ),
        };
    }
    let network = if operator {
        "this CRM's machine can reach it (DNS, firewall, proxy)"
    } else {
        "(the CRM's operators check its connection to Microsoft)"
    };
    match (verdict.rule, operator) {
        ("unreachable", true) => format!(
            "{} Check the host name, port and security, and that {network}; mail meeting this would wait, spending no attempt, and be tried again later.",
            verdict.what
        ),
        ("unreachable", false) => format!(
            "{} Check the host name, port and security {network}; mail meeting this would wait, spending no attempt, and be tried again later.",
            verdict.what
        ),
        ("network", _) => format!(
            "{} The server answered, then the connection failed; if it happens again, check the security setting. A mail meeting this would be tried again later.",
            verdict.what
        ),
        _ => verdict.words(),
    }
}

/// Ends `server`'s hold when its reason is one of `ended` (a passed test, by `by`, proves it
/// fixed); whether there was such a hold.
async fn end_hold(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    (ended, by): (&[HoldReason], &CurrentUser),
) -> bool {
    let held_before = crate::delivery::health::get(ctx, server.id)
        .await
        .map(|h| h.reason().is_some_and(|r| ended.contains(&r)))
        .unwrap_or(false);
    if held_before {
        shared.server_changed(server.id);
        if let Err(e) = crate::delivery::release::release(
            ctx,
            shared,
            server.id,
            (Some(ended), crate::delivery::release::Release::IfHeld),
            crate::outbox::history::Ended::TestedBy(by),
        )
        .await
        {
            tracing::warn!(error = %e, "ending a hold after a successful test failed");
        }
    }
    held_before
}

/// The report when no sending slot of the mailbox was free (`slot` names the step).
fn no_slot(mut steps: Vec<Step>, slot: &str, outcome: SendOutcome) -> Report {
    let why = match outcome {
        SendOutcome::Busy(why) | SendOutcome::NotTried(why) => {
            format!("{why}; try again in a moment")
        }
        _ => "the test was interrupted".into(),
    };
    steps.push(step(slot, false, why));
    Report {
        ok: false,
        steps,
        rule: None,
        words: None,
        hold_ended: false,
    }
}

async fn probe(
    ctx: &ModuleContext,
    shared: &Arc<Shared>,
    server: &mail_server::Model,
    token: &AccessToken,
) -> (Reached, Result<(), SendOutcome>) {
    let deadline = Instant::now() + SLOT_WAIT;
    shared.smtp.probe(ctx, server, token, deadline).await
}

/// The name of the SMTP test's token step.
const SMTP_TOKEN_STEP: &str = "Access token";

fn token_step(name: &str, token: &AccessToken) -> Step {
    step(
        name,
        true,
        if token.refreshed {
            "refreshed now"
        } else {
            "stored token still valid"
        },
    )
}

/// The report for a mailbox that signs in as a user and was never connected (or was
/// disconnected): there is no token to test with. A test holds nothing, so this is said here
/// rather than asked of the token service (which holds a mailbox it has no token for, as a
/// delivery must).
async fn not_connected(ctx: &ModuleContext, server: &mail_server::Model) -> Option<Report> {
    if server.auth == "app_only" {
        return None;
    }
    let row = crate::entities::by_key::<crate::entities::token::Entity, _>(ctx.db(), server.id)
        .await
        .ok()?;
    if row.is_some() {
        return None;
    }
    let verdict = classify::not_connected(&server.mailbox);
    let name = if server.transport == "graph" {
        graph::TOKEN_STEP
    } else {
        SMTP_TOKEN_STEP
    };
    Some(Report {
        ok: false,
        steps: vec![step(name, false, verdict.what.clone())],
        rule: Some(verdict.rule.to_string()),
        words: Some(verdict.words()),
        hold_ended: false,
    })
}

fn token_failed(mut steps: Vec<Step>, name: &str, problem: &TokenProblem) -> Report {
    let rule = match problem {
        TokenProblem::Held(v) => Some(v.rule.to_string()),
        TokenProblem::Transient { .. } => Some("token-endpoint-unavailable".to_string()),
        TokenProblem::Database(_) | TokenProblem::Busy(_) => None,
    };
    steps.push(step(name, false, problem.to_string()));
    Report {
        ok: false,
        steps,
        rule,
        words: Some(problem.to_string()),
        hold_ended: false,
    }
}

/// The "Test" section of a server's page.
pub fn section(server: &mail_server::Model, user: &CurrentUser) -> Markup {
    let base = server_url(server);
    html! {
        section.card id="test" {
            h2 { "Test" }
            form.inline method="post" action=(format!("{base}/test")) {
                (csrf(user))
                button type="submit" { "Test connection" }
                @if server.transport == "graph" {
                    span.help { " Gets an access token for Microsoft Graph and reads one item of the mailbox's Sent Items with it; sends nothing." }
                } @else {
                    span.help { " Connects, starts TLS, says EHLO and authenticates with the stored token; sends nothing." }
                }
            }
            form method="post" action=(format!("{base}/test-mail")) {
                (csrf(user))
                label for="test-to" { "Send a test mail to" }
                input #test-to type="email" name="to" value=(user.email);
                p { button.secondary type="submit" { "Send a test mail" } span.help { " From " (server.mailbox) ", through the normal queue; it shows in the outbox." } }
            }
        }
    }
}

fn report_markup(server: &mail_server::Model, report: &Report) -> Markup {
    let passed = if server.transport == "graph" {
        "Connection OK: Microsoft Graph accepts the mailbox's token."
    } else {
        "Connection OK: the mailbox authenticates with its token."
    };
    html! {
        @if report.ok {
            p.flash.ok role="status" { (passed) @if report.hold_ended { " The hold was ended: its waiting mails are being sent." } }
        } @else {
            p.flash.bad role="alert" { "The connection test failed." }
        }
        ol.steps {
            @for s in &report.steps {
                li class=(if s.ok { "ok" } else { "bad" }) {
                    @if s.ok { span.badge.ok { "ok" } } @else { span.badge.bad { "failed" } }
                    " " strong { (s.name) } @if !s.ok || s.detail != "ok" { ": " (s.detail) }
                }
            }
        }
        @if let Some(words) = &report.words {
            div.words role="alert" {
                @if let Some(rule) = &report.rule { p { "Classified as " code { (rule) } "." } }
                p { (words) }
            }
        }
    }
}

async fn run_test(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
    req: HttpRequest,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    if let Some(why) = crate::outbox::queue::outbound_refusal(&ctx, &server, &user).await {
        return refused_host(&ctx, &user, &req, &why);
    }
    let shared = shared.into_inner();
    let report = test(&ctx, &shared, &server, &user).await;
    tracing::info!(
        server_id = server.id,
        user_id = user.id,
        ok = report.ok,
        rule = report.rule.as_deref().unwrap_or("-"),
        "connection test"
    );
    if wants_json(&req) {
        return HttpResponse::Ok().json(&report);
    }
    let body = html! {
        h1 { "Test connection: " (server.name) }
        section.card id="test-result" { (report_markup(&server, &report)) }
        (section(&server, &user))
        p { a href=(server_url(&server)) { "Back to the server" } }
    };
    page(&ctx, &user, "Test connection", body)
}

/// The answer when the server's host is not one the operator allows (nothing was tried).
fn refused_host(
    ctx: &ModuleContext,
    user: &CurrentUser,
    req: &HttpRequest,
    why: &str,
) -> HttpResponse {
    if wants_json(req) {
        return HttpResponse::Conflict()
            .json(serde_json::json!({ "errors": [{ "field": "server", "message": why }] }));
    }
    crate::web::layout::page_with(
        StatusCode::CONFLICT,
        ctx,
        user,
        "Not tried",
        html! { h1 { "Nothing was tried" } p.flash.bad role="alert" { (why) } },
    )
}

#[derive(Deserialize)]
struct TestMailForm {
    #[serde(default)]
    to: String,
}

async fn test_mail(
    ctx: web::Data<ModuleContext>,
    shared: web::Data<Shared>,
    user: CurrentUser,
    id: web::Path<i32>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let server = match managed_server(&ctx, &user, id.into_inner()).await {
        Ok(server) => server,
        Err(refused) => return *refused,
    };
    if let Some(why) = crate::outbox::queue::outbound_refusal(&ctx, &server, &user).await {
        return refused_host(&ctx, &user, &req, &why);
    }
    let json = wants_json(&req);
    let form: TestMailForm = if json {
        serde_json::from_slice(&body).unwrap_or(TestMailForm { to: String::new() })
    } else {
        serde_urlencoded::from_bytes(&body).unwrap_or(TestMailForm { to: String::new() })
    };
    let to = Some(form.to.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| user.email.clone());
    let shared = shared.into_inner();
    let request = MailRequest {
        to: AddressInput::One(to.clone()),
        cc: AddressInput::One(String::new()),
        bcc: AddressInput::One(String::new()),
        subject: format!("Test mail from the CRM ({})", server.name),
        text_body: format!(
            "This is a test mail sent by {} through the mailbox {} (mail server \"{}\").\r\nIf you read it, the CRM sends mail through this mailbox.",
            user.name, server.mailbox, server.name
        ),
        ..MailRequest::default()
    };
    let max_bytes = crate::delivery::limits::limits(&ctx, &shared)
        .await
        .max_bytes;
    let queued = match OutgoingMail::parse(request, SizeLimits::text_only(max_bytes)) {
        Ok(mail) => {
            let record = RecordRef {
                model: "mail_server".into(),
                id: i64::from(server.id),
            };
            crate::outbox::queue::queue_through(&ctx, &shared, &user, &server, &record, mail, true)
                .await
                .map_err(|r| (r.status, r.errors))
        }
        Err(errors) => Err((StatusCode::UNPROCESSABLE_ENTITY, errors)),
    };
    match queued {
        Ok(row) if json => HttpResponse::Created().json(serde_json::json!({
            "id": row.id, "message_id": row.message_id, "status": row.status,
        })),
        Ok(row) => HttpResponse::SeeOther()
            .insert_header((
                "Location",
                format!("/microsoft_outlook/outbox/{}?queued=1", row.id),
            ))
            .finish(),
        Err((status, errors)) if json => json_refusal(status, &errors),
        Err((status, errors)) => {
            let body = html! {
                h1 { "The test mail was not queued" }
                section.card {
                    ul { @for e in &errors { li { strong { (e.field) } ": " (e.message) } } }
                    p { a href=(server_url(&server)) { "Back to the server" } }
                }
            };
            page_with(status, &ctx, &user, "Not queued", body)
        }
    }
}

/// A test's result reloaded (its address asked with GET, as a browser's reload or a bookmark
/// does): back to the server's page, where the tests are.
async fn back_to_server(id: web::Path<i32>) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((
            "Location",
            format!("/microsoft_outlook/servers/{}", id.into_inner()),
        ))
        .finish()
}

/// The test routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/servers/{id}/test", web::post().to(run_test))
        .route("/servers/{id}/test", web::get().to(back_to_server))
        .route("/servers/{id}/test-mail", web::post().to(test_mail))
        .route("/servers/{id}/test-mail", web::get().to(back_to_server));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::classify::{Observed, Stage};

    #[test]
    fn a_test_that_cannot_connect_says_what_to_check_not_that_nothing_is_to_do() {
        let facts = Facts {
            mailbox: "crm@contoso.example",
            from: "crm@contoso.example",
            auth_user: "crm@contoso.example",
        };
        let lookup = classify::smtp(
            Observed::Network {
                stage: Stage::Connect,
                detail: "Connection error: failed to lookup address information",
            },
            &facts,
        );
        let server =
            crate::web::servers::tests::shared_at("smtp.office365.com", 587, "starttls", None);
        let lookup_failure = "failed to lookup address information";
        let words = test_words(&lookup, true, (&server, Reached::Nothing, lookup_failure));
        let owners = test_words(&lookup, false, (&server, Reached::Nothing, lookup_failure));
        assert!(owners.contains("Check the host name"), "{owners}");
        assert!(!owners.contains("firewall"), "{owners}");
        assert!(words.contains("failed to lookup address"), "{words}");
        assert!(
            words.contains("Check the host name, port and security"),
            "{words}"
        );
        assert!(!words.contains("Nothing to do"), "{words}");
        // Other verdicts keep their own words.
        let refused = classify::smtp(
            Observed::Reply {
                stage: Stage::Transaction,
                code: 550,
                text: "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
            },
            &facts,
        );
        assert_eq!(
            test_words(&refused, true, (&server, Reached::Greeted, "550 5.1.10")),
            refused.words()
        );
        // A server that accepted the connection but never greeted: it resolved and was reached,
        // so the advice is the security setting first, never DNS; what is between (a proxy or a
        // firewall) only for operators.
        let silent = classify::smtp(
            Observed::Network {
                stage: Stage::Connect,
                detail: "Connection error: incomplete response",
            },
            &facts,
        );
        let failure = "Connection error: incomplete response";
        for operator in [true, false] {
            let words = test_words(&silent, operator, (&server, Reached::Connected, failure));
            assert!(
                words.contains(
                    "smtp.office365.com:587 accepted the TCP connection, but no SMTP greeting or EHLO"
                ) && words.contains("security setting (STARTTLS)")
                    && words.contains("incomplete response"),
                "{words}"
            );
            // The network is the operators' to look at, never an owner's; no DNS (it resolved).
            assert_eq!(words.contains("firewall"), operator, "{words}");
            assert!(
                !words.contains("DNS") && !words.contains("could not be reached"),
                "{words}"
            );
        }
        // A greeting, then a TLS handshake that failed: said as STARTTLS, not as no greeting.
        let words = test_words(
            &silent,
            true,
            (&server, Reached::Greeted, "handshake failure"),
        );
        assert!(
            words.contains("greeted, but STARTTLS failed (handshake failure)"),
            "{words}"
        );
        // TLS from the start: a failed handshake and a silence after it are told apart.
        let implicit =
            crate::web::servers::tests::shared_at("relay.contoso.example", 465, "tls", None);
        let handshake = "TLS handshake failed: the server answered in plain text, not TLS";
        for operator in [true, false] {
            let words = test_words(
                &silent,
                operator,
                (&implicit, Reached::Connected, handshake),
            );
            assert!(
                words.contains("relay.contoso.example:465 accepted the TCP connection, but the TLS handshake failed (TLS handshake failed: the server answered in plain text")
                    && words.contains("security setting (TLS from the start)")
                    && !words.contains("no SMTP greeting"),
                "{words}"
            );
            assert_eq!(words.contains("firewall"), operator, "{words}");
            let words = test_words(&silent, operator, (&implicit, Reached::Handshaken, failure));
            assert!(
                words.contains("TLS was set up with the server at relay.contoso.example:465, but no SMTP greeting")
                    && !words.contains("DNS"),
                "{words}"
            );
        }
        let steps: Vec<(String, bool)> = connection_steps(
            &implicit,
            "crm@contoso.example",
            Reached::Connected,
            Some(handshake.into()),
        )
        .into_iter()
        .map(|s| (s.name, s.ok))
        .collect();
        assert_eq!(
            steps,
            [
                (
                    "TCP connection to relay.contoso.example:465".to_string(),
                    true
                ),
                (
                    "TLS handshake with relay.contoso.example".to_string(),
                    false
                ),
            ]
        );
    }
}

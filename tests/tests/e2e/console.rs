//! The operator's console: the outbox page (filters, search, a mail's detail, JSON), its
//! actions (retry, cancel, release a held mailbox, in bulk after a confirmation), the server
//! page's "Test connection" and "Send a test mail", and `GET /metrics`.

use crate::helpers::{ADMIN, BOB, TestApp, eventually, history_kinds};
use crate::send::{Mailing, mailing, point_server_at, queue, row, settings, wait_status};
use crm_sdk::Clock;
use microsoft_outlook::entities::{mail_server, mailbox_health, token};
use microsoft_simulators::smtp::{Injected, SmtpConfig, SmtpServer, Stage, TlsMode};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};

const OUTBOX: &str = "/microsoft_outlook/outbox";
const AUTH_DISABLED: &str =
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.";
const UNKNOWN_RECIPIENT: &str =
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup";

/// A connected mailbox whose mails fail at the first refusal (one attempt).
async fn one_attempt() -> Mailing {
    let m = mailing().await;
    settings(
        &m.env,
        &[("mailbox_rate_per_minute", "0"), ("max_attempts", "1")],
    )
    .await;
    m
}

fn refuse_recipients(m: &Mailing, times: usize) {
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::RcptTo,
            reply: UNKNOWN_RECIPIENT.into(),
        },
        times,
    );
}

/// Makes the next AUTH happen on a fresh connection and answer `535 5.7.139`.
async fn disable_smtp_auth(m: &Mailing, times: usize) {
    m.smtp.close_connections().await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: AUTH_DISABLED.into(),
        },
        times,
    );
}

async fn outbox_json(browser: &crate::helpers::Browser, query: &str) -> Value {
    let (status, body) = browser.get_json(&format!("{OUTBOX}?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn subjects(list: &Value) -> Vec<String> {
    list["mails"]
        .as_array()
        .expect("mails")
        .iter()
        .map(|m| m["subject"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn held(app: &TestApp, server_id: i32) -> bool {
    mailbox_health::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("query")
        .is_some_and(|h| h.state == "held")
}

/// Waits until SMTP AUTH being off holds the mailbox and its batch's outcomes are written.
async fn wait_held(app: &TestApp, server_id: i32) {
    crate::send::wait_held(app, server_id, "smtp_auth_disabled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_lists_filters_searches_and_shows_a_mail() {
    let m = mailing().await;
    let app = &m.env.app;
    let ids = [
        queue(&m, "Alpha quote").await,
        queue(&m, "Beta invoice").await,
        queue(&m, "Gamma reminder").await,
    ];
    for id in ids {
        wait_status(app, id, "sent").await;
    }
    let admin = &m.env.admin;
    let all = outbox_json(admin, "").await;
    assert_eq!(all["total"], 3);
    assert_eq!(
        subjects(&all),
        ["Gamma reminder", "Beta invoice", "Alpha quote"],
        "newest first"
    );
    assert_eq!(all["mails"][0]["server"], "Office 365");
    assert_eq!(all["mails"][0]["record"], format!("contact:{}", m.contact));
    assert_eq!(outbox_json(admin, "status=sent").await["total"], 3);
    assert_eq!(outbox_json(admin, "status=failed").await["total"], 0);
    assert_eq!(
        subjects(&outbox_json(admin, "q=ALPHA").await),
        ["Alpha quote"],
        "search is case-insensitive"
    );
    assert_eq!(
        outbox_json(admin, "q=dana%40fabrikam").await["total"],
        3,
        "search by recipient"
    );
    let message_id = row(app, ids[1]).await.message_id;
    let by_id = outbox_json(admin, &format!("q=%3C{message_id}%3E")).await;
    assert_eq!(subjects(&by_id), ["Beta invoice"], "search by Message-ID");
    assert_eq!(
        outbox_json(admin, &format!("record=contact:{}", m.contact)).await["total"],
        3
    );
    assert_eq!(
        outbox_json(admin, &format!("server={}", m.env.server_id)).await["total"],
        3
    );
    assert_eq!(
        outbox_json(admin, &format!("author={}", app.alice_id)).await["total"],
        3
    );
    let today = app.clock.now().date_naive();
    let yesterday = today.pred_opt().expect("yesterday");
    assert_eq!(
        outbox_json(admin, &format!("from={today}&to={today}")).await["total"],
        3
    );
    assert_eq!(
        outbox_json(admin, &format!("to={yesterday}")).await["total"],
        0
    );
    let (status, refused) = admin.get_json(&format!("{OUTBOX}?record=contact")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["errors"][0]["field"], "record");
    // Wildcards are searched as text.
    assert_eq!(outbox_json(admin, "q=%25").await["total"], 0);

    let (status, page, _) = admin.get(&format!("{OUTBOX}?status=sent")).await;
    assert_eq!(status, StatusCode::OK);
    for subject in ["Alpha quote", "Beta invoice", "Gamma reminder"] {
        assert!(page.contains(subject), "{page}");
    }
    assert!(page.contains("3 mail(s)"), "{page}");

    let (status, detail) = admin.get_json(&format!("{OUTBOX}/{}", ids[1])).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["mail"]["status"], "sent");
    assert_eq!(detail["envelope_from"], "alice@contoso.example");
    assert_eq!(detail["classified_reply"], "250 2.0.0");
    let headers = detail["headers"].as_array().expect("headers");
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "Subject" && h[1] == "Beta invoice"),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "Message-ID" && h[1] == format!("<{message_id}>")),
        "{headers:?}"
    );
    assert_eq!(
        detail["actions"]["retry"], false,
        "a sent mail is not retried"
    );
    let (_, page, _) = admin.get(&format!("{OUTBOX}/{}", ids[1])).await;
    assert!(
        page.contains("Envelope") && page.contains(&message_id),
        "{page}"
    );
    assert!(page.contains("Headers of the stored message"), "{page}");
    assert!(!page.contains("Retry now"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_only_their_own_mails_and_another_s_is_not_there() {
    let m = mailing().await;
    let app = &m.env.app;
    let mine = queue(&m, "Alice's mail").await;
    let bob = app.signed_in(BOB).await;
    let bobs_contact = crm_host::seed::create_contact(
        &app.db,
        "Erin Northwind",
        Some("erin@northwind.example"),
        None,
        app.bob_id,
        false,
    )
    .await
    .expect("contact");
    let (status, body) = bob
        .post_json(
            &format!("/microsoft_outlook/records/contact/{bobs_contact}/mails"),
            &json!({"to": "erin@northwind.example", "subject": "Bob's mail", "text_body": "Hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bobs = body["id"].as_i64().expect("id");
    wait_status(app, mine, "sent").await;
    wait_status(app, bobs, "sent").await;

    assert_eq!(subjects(&outbox_json(&m.alice, "").await), ["Alice's mail"]);
    // Naming another author changes nothing: a user's outbox is their own.
    assert_eq!(
        subjects(&outbox_json(&m.alice, &format!("author={}", app.bob_id)).await),
        Vec::<String>::new()
    );
    assert_eq!(outbox_json(&m.env.admin, "").await["total"], 2);
    let (status, _) = m.alice.get_json(&format!("{OUTBOX}/{bobs}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = m.alice.get_json(&format!("{OUTBOX}/999999")).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the same answer as a missing one"
    );
    let (status, _) = m
        .alice
        .post_json(&format!("{OUTBOX}/{bobs}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, page, _) = m.alice.get(OUTBOX).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("Alice's mail") && !page.contains("Bob's mail"),
        "{page}"
    );
    assert!(!page.contains("Release held mail"), "{page}");
    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/release/{}", m.env.server_id), &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "users do not release mailboxes"
    );
    assert!(
        body.to_string().contains("no such mail server"),
        "a server, not a mail: {body}"
    );
    let (_, page, _) = m.alice.get("/contacts").await;
    assert!(page.contains(OUTBOX), "the menu has the outbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_failed_mail_gives_it_a_new_round_and_sends_it() {
    let m = one_attempt().await;
    let app = &m.env.app;
    refuse_recipients(&m, 1);
    let id = queue(&m, "Refused once").await;
    let failed = wait_status(app, id, "failed").await;
    assert!(
        failed
            .last_reply
            .as_deref()
            .unwrap_or_default()
            .contains("5.1.10"),
        "{failed:?}"
    );
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{id}")).await;
    assert_eq!(
        detail["classified_reply"],
        "550 5.1.10: recipient not found"
    );
    assert_eq!(
        detail["mail"]["last_reply"], "550 5.1.10: recipient not found",
        "a user sees the classified codes only"
    );
    // The author retries their own mail from the outbox.
    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1, "a new round of attempts");
    assert_eq!(m.smtp.received_count(), 1);
    // The failure before the retry stays in the mail's history (its codes only, for a user),
    // and so does who retried it.
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{id}")).await;
    let history = detail["history"].as_array().expect("history");
    assert_eq!(
        history_kinds(&detail),
        ["queued", "failed", "retried", "sent"],
        "{detail}"
    );
    assert_eq!(history[1]["reply"], "550 5.1.10: recipient not found");
    assert_eq!(
        history[2]["what"],
        "Queued again by Alice Adams, with a new round of attempts"
    );
    assert_eq!(
        history[3]["what"],
        "Attempt 1 after a retry: accepted by the server"
    );
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{id}")).await;
    assert!(
        detail["history"][1]["reply"]
            .as_str()
            .unwrap_or_default()
            .starts_with("550 5.1.10"),
        "an operator reads the reply as it came: {detail}"
    );
    // The page the form's Retry now leads to tells what became of the mail, not "failed".
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}/{id}?retried=1")).await;
    assert!(
        page.contains("Sent: the server accepted it on this retry."),
        "{page}"
    );
    // A sent mail is not retried again.
    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_mail_is_never_sent_and_releasing_the_mailbox_sends_the_others() {
    let m = one_attempt().await;
    let app = &m.env.app;
    disable_smtp_auth(&m, 100).await;
    let first = queue(&m, "Waits then goes").await;
    wait_held(app, m.env.server_id).await;
    let second = queue(&m, "Cancelled while waiting").await;
    let (status, page, _) = m.env.admin.get(OUTBOX).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Release held mail"), "{page}");
    assert!(page.contains("Held: SMTP AUTH disabled"), "{page}");
    let (_, page, _) = m.env.admin.get(&format!("{OUTBOX}/{first}")).await;
    assert!(page.contains("Release held mail"), "{page}");
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{first}")).await;
    assert_eq!(detail["actions"]["release"], true, "{detail}");
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{first}")).await;
    assert_eq!(
        detail["actions"]["release"], false,
        "an operator's action: {detail}"
    );
    // The mail's Cancel asks first (it cannot be undone); asking changes nothing.
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}/{second}")).await;
    assert!(
        page.contains(&format!(r#"href="{OUTBOX}/{second}/cancel""#)),
        "{page}"
    );
    let (status, page, _) = m.alice.get(&format!("{OUTBOX}/{second}/cancel")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Cancel this mail?"), "{page}");
    assert!(page.contains("cannot be undone"), "{page}");
    assert!(page.contains("Keep it"), "{page}");
    assert_eq!(row(app, second).await.status, "queued");
    // Cancel, as the form of that page posts it.
    let (status, _, location) = m
        .alice
        .post_form(&format!("{OUTBOX}/{second}/cancel"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.expect("Location").contains("cancelled=1"));
    assert_eq!(row(app, second).await.status, "cancelled");
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}/{second}?cancelled=1")).await;
    assert!(page.contains("will not be sent"), "{page}");
    assert!(
        page.contains(r#"class="event cancelled""#),
        "its history: {page}"
    );
    // Queued while its mailbox was held, it was never tried: its history has no attempt.
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{second}")).await;
    assert_eq!(history_kinds(&detail), ["queued", "cancelled"], "{detail}");
    assert_eq!(detail["history"][1]["by"], "Alice Adams", "{detail}");
    // Another user cannot reach the confirmation page of Alice's mail.
    let bob = m.env.app.signed_in(BOB).await;
    let (status, _, _) = bob.get(&format!("{OUTBOX}/{first}/cancel")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains(">Cancelled<"), "the status in words: {page}");
    // Exchange lets the mailbox in again; the operator releases its held mail from the outbox
    // as they filtered it, and comes back to it so filtered.
    m.smtp.clear_injections();
    let filtered = format!("{OUTBOX}?status=queued");
    let (_, page, _) = m.env.admin.get(&filtered).await;
    assert!(
        page.contains(&format!(r#"name="return_to" value="{filtered}""#)),
        "{page}"
    );
    // A return address off the outbox is not followed.
    let release = format!("{OUTBOX}/release/{}", m.env.server_id);
    let (status, _, location) = m
        .env
        .admin
        .post_form(&release, &[("return_to", "https://elsewhere.example/")])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        location
            .expect("Location")
            .starts_with(&format!("{OUTBOX}?released=")),
        "stays on the outbox"
    );
    let (status, _, location) = m
        .env
        .admin
        .post_form(&release, &[("return_to", &filtered)])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        location.expect("Location"),
        format!("{filtered}&released={}", m.env.server_id)
    );
    wait_status(app, first, "sent").await;
    // The first mail's history: the attempt its mailbox's problem stopped (no attempt spent),
    // the release and who asked for it, then the attempt that went out.
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{first}")).await;
    let history = detail["history"].as_array().expect("history");
    assert_eq!(
        history_kinds(&detail),
        ["queued", "waited", "released", "sent"],
        "{detail}"
    );
    assert!(
        history[1]["reply"]
            .as_str()
            .unwrap_or_default()
            .contains("5.7.139"),
        "{detail}"
    );
    assert_eq!(history[2]["by"], "Olivia Operator", "{detail}");
    assert_eq!(history[3]["what"], "Attempt 1: accepted by the server");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(row(app, second).await.status, "cancelled");
    let received: Vec<String> = m
        .smtp
        .received()
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert_eq!(
        received,
        [row(app, first).await.message_id],
        "only the first"
    );
    assert!(!held(app, m.env.server_id).await);
    let list = outbox_json(&m.env.admin, "status=cancelled").await;
    assert_eq!(subjects(&list), ["Cancelled while waiting"]);
    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a sent mail is not cancelled: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_retry_confirms_how_many_then_sends_the_filtered_failed_mails() {
    let m = one_attempt().await;
    let app = &m.env.app;
    refuse_recipients(&m, 3);
    let ids = [
        queue(&m, "Bulk one").await,
        queue(&m, "Bulk two").await,
        queue(&m, "Bulk three").await,
    ];
    for id in ids {
        wait_status(app, id, "failed").await;
    }
    let admin = &m.env.admin;
    // The form asks first, and says how many.
    let (status, page, _) = admin
        .post_form(
            &format!("{OUTBOX}/bulk"),
            &[("status", "failed"), ("q", "bulk"), ("action", "retry")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Retry 3 mail(s)?"), "{page}");
    assert_eq!(row(app, ids[0]).await.status, "failed", "nothing done yet");
    let (status, body) = admin
        .post_json(
            &format!("{OUTBOX}/bulk"),
            &json!({"action": "retry", "filter": {"status": "failed"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["matching"], 3);
    assert_eq!(body["confirmed"], false);
    let (status, _, location) = admin
        .post_form(
            &format!("{OUTBOX}/bulk"),
            &[
                ("status", "failed"),
                ("q", "bulk"),
                ("action", "retry"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.expect("Location").contains("n=3"));
    for id in ids {
        wait_status(app, id, "sent").await;
    }
    assert_eq!(m.smtp.received_count(), 3);
    let (_, body) = admin
        .post_json(
            &format!("{OUTBOX}/bulk"),
            &json!({"action": "cancel", "filter": {"status": "sent"}, "confirm": true}),
        )
        .await;
    assert_eq!(body["changed"], 0, "sent mails are not cancelled");
    // A form with a filter that does not parse gets a page in words, not JSON, and changes
    // nothing.
    let (status, page, _) = admin
        .post_form(
            &format!("{OUTBOX}/bulk"),
            &[("record", "contact:99x"), ("action", "cancel")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(
        page.contains("Nothing was changed") && page.contains("model:id"),
        "{page}"
    );
    assert!(!page.trim_start().starts_with('{'), "{page}");
}

/// A test of a mailbox with no token says to connect it, and holds nothing: nobody is told
/// that a mailbox nobody has connected yet needs connecting "again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_a_mailbox_that_is_not_connected_says_so_and_holds_nothing() {
    let m = one_attempt().await;
    let app = &m.env.app;
    token::Entity::delete_many()
        .filter(token::Column::ServerId.eq(m.env.server_id))
        .exec(&app.db)
        .await
        .expect("delete the token");
    let test = format!("/microsoft_outlook/servers/{}/test", m.env.server_id);
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["rule"], "not-connected", "{report}");
    assert!(
        report["words"]
            .as_str()
            .is_some_and(|w| w.contains("Click Connect")),
        "{report}"
    );
    let health = mailbox_health::Entity::find_by_id(m.env.server_id)
        .one(&app.db)
        .await
        .expect("health");
    assert!(
        health.as_ref().is_none_or(|h| h.state != "held"),
        "{health:?}"
    );
    let told = crm_host::entities::notification::Entity::find()
        .all(&app.db)
        .await
        .expect("notifications");
    assert!(told.is_empty(), "{told:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_shows_each_step_and_the_words_of_a_refusal() {
    let m = one_attempt().await;
    let app = &m.env.app;
    let test = format!("/microsoft_outlook/servers/{}/test", m.env.server_id);
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(steps.len(), 5, "{steps:?}");
    assert!(
        steps[3] == "STARTTLS" && steps[4].starts_with("AUTH XOAUTH2"),
        "{steps:?}"
    );
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(
        page.contains("Test connection") && page.contains("Send a test mail"),
        "{page}"
    );
    let (status, page, _) = m.env.admin.post_form(&test, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Connection OK"), "{page}");
    // The result's address reloaded (a GET): back to the server's page, not "Page not found".
    let (status, _, location) = m.env.admin.get(&test).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        location.as_deref(),
        Some(format!("/microsoft_outlook/servers/{}", m.env.server_id).as_str())
    );
    assert_eq!(m.smtp.received_count(), 0, "a test sends nothing");

    // Exchange refuses SMTP AUTH: the test says where and why, in the table's words.
    disable_smtp_auth(&m, 1).await;
    let (_, page, _) = m.env.admin.post_form(&test, &[]).await;
    assert!(page.contains("The connection test failed"), "{page}");
    assert!(page.contains("5.7.139"), "{page}");
    assert!(page.contains("smtp-auth-disabled"), "{page}");
    assert!(page.contains("Authenticated SMTP"), "{page}");
    assert!(!held(app, m.env.server_id).await, "a test holds nothing");
    disable_smtp_auth(&m, 1).await;
    let (_, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(report["ok"], false);
    assert_eq!(report["rule"], "smtp-auth-disabled");
    let last = report["steps"].as_array().expect("steps").last().cloned();
    assert_eq!(last.as_ref().map(|s| s["ok"].clone()), Some(json!(false)));

    // A held mailbox whose test passes is released: its waiting mail goes out.
    disable_smtp_auth(&m, 1).await;
    let id = queue(&m, "Waits for the test").await;
    wait_held(app, m.env.server_id).await;
    assert_eq!(row(app, id).await.status, "queued");
    let (_, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["hold_ended"], true, "{report}");
    wait_status(app, id, "sent").await;
    // Its history says what ended the wait.
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{id}")).await;
    assert_eq!(
        history_kinds(&detail),
        ["queued", "waited", "hold_ended", "sent"],
        "{detail}"
    );
    assert!(
        detail.to_string().contains("a test of the connection by"),
        "{detail}"
    );
    // Users test only their own mailboxes.
    let (status, _, _) = m.alice.post_form(&test, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A server that accepts the TCP connection and then says nothing usable (here it hangs up at
/// once, as a port that expects TLS from the start does to a plain greeting): the network
/// reached it, so the test points at the security setting, not at DNS or a firewall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_of_a_server_that_accepts_but_never_greets_points_at_the_security_setting() {
    let m = one_attempt().await;
    let app = &m.env.app;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((line, _)) = listener.accept().await {
            drop(line);
        }
    });
    mail_server::Entity::update_many()
        .col_expr(mail_server::Column::SmtpPort, Expr::value(i32::from(port)))
        .filter(mail_server::Column::Id.eq(m.env.server_id))
        .exec(&app.db)
        .await
        .expect("move the server");
    let test = format!("/microsoft_outlook/servers/{}/test", m.env.server_id);
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["rule"], "unreachable", "{report}");
    let steps: Vec<(&str, bool)> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default(),
                s["ok"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    let tcp = steps.len().checked_sub(2).map(|i| steps[i]);
    assert!(
        tcp.is_some_and(|(name, ok)| ok
            && name.starts_with("TCP connection to ")
            && name.ends_with(&format!(":{port}")))
            && steps.last() == Some(&("Greeting and EHLO", false)),
        "{steps:?}"
    );
    let words = report["words"].as_str().unwrap_or_default();
    assert!(
        words.contains("accepted the TCP connection, but no SMTP greeting or EHLO")
            && words.contains("security setting (STARTTLS)"),
        "{words}"
    );
    assert!(!words.contains("DNS"), "{words}");
    assert!(!held(app, m.env.server_id).await, "a test holds nothing");
}

/// The names and outcomes of a test report's steps.
fn steps_of(report: &Value) -> Vec<(String, bool)> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["ok"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_start_is_a_step_of_its_own_and_carries_mail() {
    let m = mailing().await;
    let app = &m.env.app;
    let test = format!("/microsoft_outlook/servers/{}/test", m.env.server_id);
    // Set to TLS from the start, on a port that greets in plain text (STARTTLS): the
    // handshake is the step that failed, and the words say the server spoke plain text.
    point_server_at(&m.env, &m.smtp, &[("security", "tls")]).await;
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    let steps = steps_of(&report);
    let tcp = format!("TCP connection to localhost:{}", m.smtp.port());
    assert_eq!(
        steps[steps.len() - 2..],
        [
            (tcp, true),
            ("TLS handshake with localhost".to_string(), false)
        ],
        "{report}"
    );
    let words = report["words"].as_str().unwrap_or_default();
    assert!(
        words.contains("but the TLS handshake failed")
            && words.contains("answered in plain text")
            && words.contains("security setting (TLS from the start)"),
        "{words}"
    );
    assert!(!held(app, m.env.server_id).await, "a test holds nothing");

    // A server that takes TLS from the start: every step, then a mail over it.
    let implicit = SmtpServer::start(SmtpConfig {
        tls: TlsMode::Implicit,
        validator: Some(m.env.idp.smtp_validator()),
        ..SmtpConfig::default()
    })
    .await
    .expect("smtp");
    // Without its CA the certificate is refused at the handshake, in the certificate's words.
    point_server_at(
        &m.env,
        &implicit,
        &[("security", "tls"), ("extra_ca_pem", "")],
    )
    .await;
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["rule"], "certificate-refused", "{report}");
    assert_eq!(
        steps_of(&report).last(),
        Some(&("TLS handshake with localhost".to_string(), false)),
        "{report}"
    );
    point_server_at(&m.env, &implicit, &[("security", "tls")]).await;
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let names: Vec<String> = steps_of(&report).into_iter().map(|(n, _)| n).collect();
    let at = names
        .iter()
        .position(|n| n.starts_with("TCP connection to"))
        .expect("TCP step");
    assert_eq!(
        names[at..at + 3],
        [
            format!("TCP connection to localhost:{}", implicit.port()),
            "TLS handshake with localhost".to_string(),
            "Greeting and EHLO over TLS".to_string(),
        ],
        "{report}"
    );
    assert!(names[at + 3].starts_with("AUTH XOAUTH2 as "), "{names:?}");
    let id = queue(&m, "Over TLS from the start").await;
    wait_status(app, id, "sent").await;
    let received = implicit.received();
    assert_eq!(received.len(), 1);
    assert!(
        String::from_utf8_lossy(&received[0].data).contains("Subject: Over TLS from the start"),
        "the mail arrived over the TLS server"
    );
    assert_eq!(
        m.smtp.received_count(),
        0,
        "nothing went to the other server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_mail_goes_through_the_queue_shows_in_the_outbox_and_arrives() {
    let m = mailing().await;
    let app = &m.env.app;
    let path = format!("/microsoft_outlook/servers/{}/test-mail", m.env.server_id);
    let (status, page, location) = m
        .env
        .admin
        .post_form(&path, &[("to", "postmaster@fabrikam.example")])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let location = location.expect("Location");
    assert!(location.starts_with(OUTBOX), "{location}");
    let smtp = &m.smtp;
    eventually("the test mail to arrive", || async {
        smtp.received_count() == 1
    })
    .await;
    let received = smtp.received().remove(0);
    assert_eq!(received.rcpt_to, ["postmaster@fabrikam.example"]);
    assert_eq!(
        received.mail_from,
        crate::connect::MAILBOX,
        "from the mailbox itself"
    );
    let list = outbox_json(
        &m.env.admin,
        &format!("record=mail_server:{}", m.env.server_id),
    )
    .await;
    assert_eq!(list["total"], 1);
    assert!(
        list["mails"][0]["subject"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Test mail from the CRM"),
        "{list}"
    );
    let (_, page, _) = m.env.admin.get(&location).await;
    assert!(page.contains("Test mail queued"), "{page}");
    let id = list["mails"][0]["id"].as_i64().expect("id");
    wait_status(app, id, "sent").await;
    // An address that is not one is refused, and nothing is queued.
    let (status, _, _) = m
        .env
        .admin
        .post_form(&path, &[("to", "not an address")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(outbox_json(&m.env.admin, "").await["total"], 1);
}

/// The value of the series `name{labels}` in a Prometheus text page.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_mails_sends_latency_refreshes_and_mailboxes() {
    let m = one_attempt().await;
    let app = &m.env.app;
    // The next mail refreshes the token first.
    token::Entity::update_many()
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(app.clock.now() + chrono::Duration::minutes(1)),
        )
        .filter(token::Column::ServerId.eq(m.env.server_id))
        .exec(&app.db)
        .await
        .expect("update");
    let sent = queue(&m, "Counted").await;
    wait_status(app, sent, "sent").await;
    refuse_recipients(&m, 1);
    let failed = queue(&m, "Refused").await;
    wait_status(app, failed, "failed").await;

    // A second mailbox that signs in as a user and was never connected: not ready.
    let first = microsoft_outlook::entities::mail_server::Entity::find_by_id(m.env.server_id)
        .one(&app.db)
        .await
        .expect("server")
        .expect("exists");
    let mut second: microsoft_outlook::entities::mail_server::ActiveModel = first.into();
    second.id = sea_orm::NotSet;
    second.name = sea_orm::Set("Never connected".into());
    second.mailbox = sea_orm::Set("other@contoso.example".into());
    second.is_default = sea_orm::Set(false);
    sea_orm::ActiveModelTrait::insert(second, &app.db)
        .await
        .expect("second server");
    let anonymous = app.browser();
    let (status, _, _) = anonymous.get("/metrics").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = m.alice.get("/metrics").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let admin = app.signed_in(ADMIN).await;
    let (status, text, _) = admin.get("/metrics").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let expect = [
        ("microsoft_outlook_mails{status=\"sent\"}", 1.0),
        ("microsoft_outlook_mails{status=\"failed\"}", 1.0),
        ("microsoft_outlook_mails{status=\"queued\"}", 0.0),
        ("microsoft_outlook_mails{status=\"cancelled\"}", 0.0),
        (
            "microsoft_outlook_sends_total{rule=\"sent\",level=\"sent\"}",
            1.0,
        ),
        (
            "microsoft_outlook_sends_total{rule=\"mail-refused\",level=\"mail_fails\"}",
            1.0,
        ),
        (
            "microsoft_outlook_drain_seconds_count{outcome=\"sent\"}",
            1.0,
        ),
        (
            "microsoft_outlook_drain_seconds_count{outcome=\"failed\"}",
            1.0,
        ),
        (
            "microsoft_outlook_token_refreshes_total{outcome=\"ok\"}",
            1.0,
        ),
        ("microsoft_outlook_mailboxes{state=\"ready\"}", 1.0),
        ("microsoft_outlook_mailboxes{state=\"held\"}", 0.0),
        ("microsoft_outlook_mailboxes{state=\"not_connected\"}", 1.0),
    ];
    for (name, value) in expect {
        assert_eq!(series(&text, name), Some(value), "{name}\n{text}");
    }
    assert!(
        text.contains("# TYPE microsoft_outlook_drain_seconds histogram"),
        "{text}"
    );
}

/// The failed-mail notices of mail `id`: (audience is the author, body, link, resolved).
async fn notices_of(app: &TestApp, id: i64) -> Vec<(bool, String, Option<String>, bool)> {
    use crm_host::entities::notification;
    notification::Entity::find()
        .filter(
            notification::Column::IncidentKey.eq(microsoft_outlook::outbox::failed_notice::key(id)),
        )
        .all(&app.db)
        .await
        .expect("notifications")
        .into_iter()
        .map(|n| {
            (
                n.user_id == Some(app.alice_id),
                n.body,
                n.link,
                n.resolved_at.is_some(),
            )
        })
        .collect()
}

/// Waits until both notices of the failed mail `id` (author's, operators') are recorded.
async fn wait_notices(app: &TestApp, id: i64) {
    for _ in 0..300 {
        if notices_of(app, id).await.len() == 2 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("gave up waiting: the notices of mail {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_cancel_resolve_a_failed_mails_notices() {
    let m = one_attempt().await;
    let app = &m.env.app;
    refuse_recipients(&m, 2);
    let retried = queue(&m, "Retried later").await;
    let cancelled = queue(&m, "Cancelled later").await;
    for id in [retried, cancelled] {
        wait_status(app, id, "failed").await;
        wait_notices(app, id).await;
        for (for_author, body, link, resolved) in notices_of(app, id).await {
            assert_eq!(
                link.as_deref(),
                Some(format!("{OUTBOX}/{id}").as_str()),
                "both notices link the mail's page"
            );
            assert!(!resolved);
            if for_author {
                // A refused recipient is the author's to correct, said once.
                assert!(body.contains("Check the recipients' addresses"), "{body}");
                assert_eq!(body.matches("send it again").count(), 1, "{body}");
            }
        }
    }
    let (_, page, _) = m.alice.get("/contacts").await;
    assert!(page.contains(r#"aria-label="2 unread""#), "{page}");
    // The linked page answers, for the author and for an operator.
    for browser in [&m.alice, &m.env.admin] {
        let (status, _, _) = browser.get(&format!("{OUTBOX}/{retried}")).await;
        assert_eq!(status, StatusCode::OK);
    }

    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/{retried}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        notices_of(app, retried).await.iter().all(|n| n.3),
        "retried: resolved"
    );
    wait_status(app, retried, "sent").await;
    let (_, page, _) = m.alice.get("/contacts").await;
    assert!(page.contains(r#"aria-label="1 unread""#), "{page}");

    let (status, _, _) = m
        .alice
        .post_form(&format!("{OUTBOX}/{cancelled}/cancel"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        notices_of(app, cancelled).await.iter().all(|n| n.3),
        "cancelled: resolved"
    );
    let (_, page, _) = m.alice.get("/contacts").await;
    assert!(!page.contains("badge unread"), "{page}");
    let (_, page, _) = m.env.admin.get("/contacts").await;
    assert!(!page.contains("badge unread"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_only_an_administrator_can_fix_tells_the_author_to_wait() {
    let m = one_attempt().await;
    let app = &m.env.app;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::MailFrom,
            reply: "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
                .into(),
        },
        1,
    );
    let id = queue(&m, "Send-as denied").await;
    wait_status(app, id, "failed").await;
    wait_notices(app, id).await;
    let (_, body, _, _) = notices_of(app, id)
        .await
        .into_iter()
        .find(|n| n.0)
        .expect("the author's notice");
    assert!(
        body.contains("5.7.60") || body.contains("Send As"),
        "{body}"
    );
    assert!(
        body.contains("The CRM's operators have been told; nothing is needed from you"),
        "{body}"
    );
    assert!(!body.contains("Correct what is said here"), "{body}");
    // The author is not handed the administrator's steps, and is told once what happens.
    assert!(!body.contains("administrator"), "{body}");
    assert!(!body.contains("admin center"), "{body}");
    assert_eq!(
        body.matches("operators have been told").count(),
        1,
        "{body}"
    );
    // The operators' copy keeps the steps.
    let (_, to_operators, _, _) = notices_of(app, id)
        .await
        .into_iter()
        .find(|n| !n.0)
        .expect("the operators' notice");
    assert!(
        to_operators.contains("An Exchange administrator must grant"),
        "{to_operators}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_retries_only_failed_mails_and_operators_also_queued_ones() {
    let m = one_attempt().await;
    let app = &m.env.app;
    refuse_recipients(&m, 1);
    let failed = queue(&m, "Failed first").await;
    wait_status(app, failed, "failed").await;
    disable_smtp_auth(&m, 100).await;
    let waiting = queue(&m, "Waits its turn").await;
    wait_held(app, m.env.server_id).await;
    let due = row(app, waiting).await.next_attempt_at;

    // A queued mail: no "Retry now" for its author, and a refusal that says why.
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{waiting}")).await;
    assert_eq!(detail["actions"]["retry"], false, "{detail}");
    assert_eq!(detail["actions"]["cancel"], true, "{detail}");
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}/{waiting}")).await;
    assert!(
        !page.contains(&format!(r#"action="{OUTBOX}/{waiting}/retry""#)),
        "{page}"
    );
    let (status, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/{waiting}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("queued already"),
        "{body}"
    );
    let (status, _, location) = m
        .alice
        .post_form(&format!("{OUTBOX}/{waiting}/retry"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.expect("Location").contains("refused=queued"));
    assert_eq!(row(app, waiting).await.next_attempt_at, due, "not made due");

    // The list offers in bulk only what can apply to its filter: a user's queued mails can
    // be cancelled, not retried.
    let buttons = |page: &str| {
        (
            page.contains(r#"value="retry""#),
            page.contains(r#"value="cancel""#),
        )
    };
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}?status=queued")).await;
    assert_eq!(buttons(&page), (false, true), "{page}");
    let (_, page, _) = m.alice.get(&format!("{OUTBOX}?status=failed")).await;
    assert_eq!(buttons(&page), (true, true), "{page}");
    let (_, page, _) = m.alice.get(OUTBOX).await;
    assert_eq!(buttons(&page), (true, true), "{page}");
    let (_, page, _) = m.env.admin.get(&format!("{OUTBOX}?status=queued")).await;
    assert_eq!(buttons(&page), (true, true), "{page}");

    // In bulk: only the failed one counts and changes.
    let (_, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/bulk"), &json!({"action": "retry"}))
        .await;
    assert_eq!(body["matching"], 1, "{body}");
    let (status, page, _) = m
        .alice
        .post_form(&format!("{OUTBOX}/bulk"), &[("action", "retry")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("1 failed mail(s)"), "{page}");
    let (_, body) = m
        .alice
        .post_json(
            &format!("{OUTBOX}/bulk"),
            &json!({"action": "retry", "confirm": true}),
        )
        .await;
    assert_eq!(body["ids"], json!([failed]), "{body}");
    assert_eq!(row(app, waiting).await.next_attempt_at, due, "not made due");
    // Cancelling a queued mail stays the author's choice.
    let (_, body) = m
        .alice
        .post_json(&format!("{OUTBOX}/bulk"), &json!({"action": "cancel"}))
        .await;
    assert_eq!(body["matching"], 2, "{body}");

    // An operator may still make a queued mail due now.
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{waiting}")).await;
    assert_eq!(detail["actions"]["retry"], true, "{detail}");
    let (status, body) = m
        .env
        .admin
        .post_json(&format!("{OUTBOX}/{waiting}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Its history says what the operator did: made it due, not a new round of attempts.
    let (_, detail) = m.alice.get_json(&format!("{OUTBOX}/{waiting}")).await;
    let history = detail["history"].as_array().expect("history");
    assert!(
        history
            .iter()
            .any(|e| e["what"] == "Made due now by Olivia Operator"),
        "{detail}"
    );
}

/// The options of the outbox filter's Mailbox list.
fn mailbox_options(page: &str) -> String {
    let from = page.find(r#"id="f-server""#).expect("the Mailbox list");
    let to = page[from..].find("</select>").expect("its end") + from;
    page[from..to].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_picks_among_shared_mailboxes_and_their_own_only() {
    let m = mailing().await;
    let app = &m.env.app;
    let bob = app.signed_in(BOB).await;
    let bobs = crate::connect::create_personal(&bob, "bob@contoso.example").await;
    let alices = crate::connect::create_personal(&m.alice, "alice@contoso.example").await;
    let shared = format!(r#"value="{}""#, m.env.server_id);
    let (bobs, alices) = (format!(r#"value="{bobs}""#), format!(r#"value="{alices}""#));

    let (_, page, _) = m.alice.get(OUTBOX).await;
    let options = mailbox_options(&page);
    assert!(
        options.contains(&shared) && options.contains(&alices),
        "{options}"
    );
    assert!(
        !options.contains(&bobs),
        "not another user's mailbox\n{options}"
    );
    let (_, page, _) = m.env.admin.get(OUTBOX).await;
    let options = mailbox_options(&page);
    for id in [&shared, &alices, &bobs] {
        assert!(
            options.contains(id.as_str()),
            "operators see all\n{options}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_non_ascii_letters_in_any_case_and_a_bad_id_answers_the_404_page() {
    let m = mailing().await;
    let app = &m.env.app;
    let id = queue(&m, "Ärger mit der Lieferung").await;
    queue(&m, "Arger is not it").await;
    let admin = &m.env.admin;
    for q in ["ä", "Ä", "ärger", "ÄRGER", "LIEFERUNG"] {
        let q = url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>();
        let found = outbox_json(admin, &format!("q={q}")).await;
        assert_eq!(
            subjects(&found),
            ["Ärger mit der Lieferung"],
            "q={q}\n{found}"
        );
    }
    // Wildcards of either backend are searched as text.
    for q in ["%25", "_", "*", "%3F", "%5B", "..", "a.%2B"] {
        assert_eq!(
            outbox_json(admin, &format!("q={q}")).await["total"],
            0,
            "q={q}"
        );
    }
    wait_status(app, id, "sent").await;

    for path in [format!("{OUTBOX}/abc"), format!("{OUTBOX}/12x")] {
        let (status, page, _) = m.alice.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(page.contains("No such mail"), "{page}");
    }
    let (status, page, _) = m.alice.post_form(&format!("{OUTBOX}/abc/retry"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("No such mail"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_mailbox_is_shown_but_offers_no_release() {
    use sea_orm::{ActiveModelTrait, Set};
    let m = mailing().await;
    let app = &m.env.app;
    let now = app.clock.now();
    mailbox_health::ActiveModel {
        server_id: Set(m.env.server_id),
        state: Set("throttled".into()),
        reason: Set(None),
        detail: Set(Some("Exchange asked to slow down.".into())),
        rule: Set(None),
        since: Set(Some(now)),
        until: Set(Some(now + chrono::Duration::minutes(10))),
        notified_at: Set(None),
        updated_at: Set(now),
    }
    .insert(&app.db)
    .await
    .expect("throttle");
    let id = queue(&m, "Waits out the throttle").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(row(app, id).await.status, "queued");
    let (_, page, _) = m.env.admin.get(OUTBOX).await;
    assert!(
        page.contains(&format!(r#"data-server="{}""#, m.env.server_id)),
        "the throttled mailbox is listed\n{page}"
    );
    assert!(page.contains("Sends again by itself"), "{page}");
    assert!(!page.contains("Release held mail"), "{page}");
    assert!(
        !page.contains("Releasing ends the hold"),
        "no help for a button not shown"
    );
    let (_, page, _) = m.env.admin.get(&format!("{OUTBOX}/{id}")).await;
    assert!(!page.contains("Release held mail"), "{page}");
    // Nor does the server's page offer it: the throttle ends by itself.
    let server_page = format!("/microsoft_outlook/servers/{}", m.env.server_id);
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(page.contains("Throttled until"), "{page}");
    assert!(!page.contains("Release held mail"), "{page}");
    // Posted anyway: refused in words; the throttle and the mail stay as they were.
    let slow_down = "asked this mailbox to slow down until";
    crate::helpers::release_is_refused(&m.env.admin, m.env.server_id, slow_down).await;
    let release = format!("{OUTBOX}/release/{}", m.env.server_id);
    let health = mailbox_health::Entity::find_by_id(m.env.server_id)
        .one(&app.db)
        .await
        .expect("health")
        .expect("row");
    assert_eq!(health.state, "throttled");
    assert_eq!(row(app, id).await.status, "queued");
    // The throttle lapses and the mail goes (its row still says `throttled`); a release
    // then ends no hold, and says so.
    app.clock.advance(chrono::Duration::minutes(11));
    wait_status(app, id, "sent").await;
    let (status, body) = m.env.admin.post_json(&release, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["hold_ended"], false, "{body}");
    let (_, detail) = m.env.admin.get_json(&format!("{OUTBOX}/{id}")).await;
    assert_eq!(history_kinds(&detail), ["queued", "sent"], "{detail}");
}

/// A held mail's page: its author reads what happened and that the operators were told (no
/// "Retry now", no server page, no steps in the admin center), and one promise of when it
/// goes; the operator reads the steps to take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_mail_page_says_what_happened_in_users_words_and_operators_in_theirs() {
    let m = one_attempt().await;
    let app = &m.env.app;
    disable_smtp_auth(&m, 100).await;
    let id = queue(&m, "Held by the tenant").await;
    wait_held(app, m.env.server_id).await;
    let path = format!("{OUTBOX}/{id}");

    let (_, page, _) = m.alice.get(&path).await;
    let (_, detail) = m.alice.get_json(&path).await;
    let words = detail["mail"]["last_error"]
        .as_str()
        .expect("what happened");
    for shown in [page.as_str(), words] {
        assert!(shown.contains("5.7.139"), "{shown}");
        assert!(
            shown.contains("The CRM's operators have been told"),
            "{shown}"
        );
        for operators_only in [
            "Retry now",
            "Release held mail",
            "server page",
            "Set-CASMailbox",
            "An Exchange administrator must",
        ] {
            assert!(!shown.contains(operators_only), "{operators_only}: {shown}");
        }
    }
    assert!(
        !page.contains("when its next attempt is due"),
        "a held mail goes when its mailbox is ready: {page}"
    );
    assert!(page.contains("once its mailbox is ready again"), "{page}");
    // Said once on her page: the waiting words tell her; what happened says what happened.
    let delivery = page.split("id=\"history\"").next().unwrap_or_default();
    assert_eq!(delivery.matches("have been told").count(), 1, "{page}");
    assert!(delivery.contains("What happened"), "{page}");

    let (_, page, _) = m.env.admin.get(&path).await;
    assert!(
        page.contains("An Exchange administrator must enable Authenticated SMTP"),
        "{page}"
    );
    // The mail whose reply held the mailbox: the hold's words once in its delivery, not also
    // as its own (its history keeps them, folded, as what its stop meant).
    let delivery = page.split("id=\"history\"").next().unwrap_or_default();
    assert_eq!(
        delivery
            .matches("An Exchange administrator must enable Authenticated SMTP")
            .count(),
        1,
        "{page}"
    );
    // The operator is told what is theirs to do, not that the operators have been told.
    let (_, detail) = m.env.admin.get_json(&path).await;
    let waiting = detail["mail"]["waiting"].as_str().expect("why it waits");
    assert!(waiting.contains("yours to fix"), "{waiting}");
    assert!(waiting.contains("Release held mail"), "{waiting}");
    assert!(!waiting.contains("have been told"), "{waiting}");
}

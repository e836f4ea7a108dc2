//! Sending mail from records: the outbox, XOAUTH2 delivery through the simulated Exchange
//! submission server, every outcome class, and bad input at the door.

use crate::connect::{Env, MAILBOX, connect_through, env};
use crate::helpers::{ALICE, BOB, Browser, TestApp, eventually, history_kinds, spawn_on};
use crm_sdk::{Clock, Sealer};
use microsoft_outlook::entities::{mailbox_health, outbox, token};
use microsoft_simulators::identity::TokenFault;
use microsoft_simulators::smtp::{Injected, SmtpConfig, SmtpServer, Stage};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use secrecy::ExposeSecret;
use serde_json::json;

pub(crate) struct Mailing {
    pub env: Env,
    pub smtp: SmtpServer,
    pub alice: Browser,
    pub contact: i64,
}

pub(crate) async fn point_server_at(env: &Env, smtp: &SmtpServer, extra: &[(&str, &str)]) {
    let port = smtp.port().to_string();
    let pem = smtp.ca_pem();
    let mut fields = vec![
        ("name", "Office 365"),
        ("mailbox", MAILBOX),
        ("smtp_host", "localhost"),
        ("smtp_port", port.as_str()),
        ("security", "starttls"),
        ("extra_ca_pem", pem.as_str()),
        ("auth", "delegated"),
        ("transport", "smtp"),
        ("send_as", "author"),
        ("is_default", "on"),
    ];
    for (k, v) in extra {
        fields.retain(|(f, _)| f != k);
        fields.push((k, v));
    }
    let (status, page, _) = env
        .admin
        .post_form(
            &format!("/microsoft_outlook/servers/{}", env.server_id),
            &fields,
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
}

/// Saves the module settings with `extra` fields (the client secret stays as stored).
pub(crate) async fn settings(env: &Env, extra: &[(&str, &str)]) {
    let authority = env.idp.authority_url();
    let mut fields = vec![
        ("client_id", crate::connect::CLIENT_ID),
        ("tenant", "common"),
        ("authority_url", authority.as_str()),
    ];
    fields.extend_from_slice(extra);
    let (status, page, _) = env
        .admin
        .post_form("/settings/microsoft_outlook", &fields)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
}

pub(crate) async fn mailing() -> Mailing {
    let env = env().await;
    let (status, _, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let smtp = SmtpServer::start(SmtpConfig {
        validator: Some(env.idp.smtp_validator()),
        ..SmtpConfig::default()
    })
    .await
    .expect("smtp");
    point_server_at(&env, &smtp, &[]).await;
    // The per-minute throttle has its own test; the others send faster than 30 a minute.
    settings(&env, &[("mailbox_rate_per_minute", "0")]).await;
    with_contact(env, smtp).await
}

/// Alice's contact Dana (to write to), and Alice signed in.
pub(crate) async fn dana_and_alice(env: &Env) -> (i64, Browser) {
    let contact = crm_host::seed::create_contact(
        &env.app.db,
        "Dana Fabrikam",
        Some("dana@fabrikam.example"),
        Some("Fabrikam"),
        env.app.alice_id,
        false,
    )
    .await
    .expect("contact");
    (contact, env.app.signed_in(ALICE).await)
}

/// The mailing of `env` and `smtp`: Alice signed in, and her contact Dana to write to.
pub(crate) async fn with_contact(env: Env, smtp: SmtpServer) -> Mailing {
    let (contact, alice) = dana_and_alice(&env).await;
    Mailing {
        env,
        smtp,
        alice,
        contact,
    }
}

/// A private contact of Bob's: hidden from Alice.
async fn bobs_private_contact(env: &Env) -> i64 {
    crm_host::seed::create_contact(
        &env.app.db,
        "Hana Private",
        Some("hana@litware.example"),
        None,
        env.app.bob_id,
        true,
    )
    .await
    .expect("contact")
}

pub(crate) fn mails_path(contact: i64) -> String {
    format!("/microsoft_outlook/records/contact/{contact}/mails")
}

pub(crate) async fn queue(m: &Mailing, subject: &str) -> i64 {
    let (status, body) = m
        .alice
        .post_json(&mails_path(m.contact), &json!({"to": "Dana <dana@fabrikam.example>", "subject": subject, "text_body": "Hello Dana"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_i64().expect("id")
}

/// Makes the queued mails `ids` due together a minute from now (the test's clock), so that
/// they go out as one batch once the clock is advanced. (At a per-minute limit only the mails
/// that go when the window frees are given its time; the others keep their turn.)
async fn wait_together(app: &TestApp, ids: &[i64]) {
    outbox::Entity::update_many()
        .col_expr(
            outbox::Column::NextAttemptAt,
            Expr::value(app.clock.now() + chrono::Duration::seconds(60)),
        )
        .filter(outbox::Column::Id.is_in(ids.iter().copied()))
        .exec(&app.db)
        .await
        .expect("outbox");
}

pub(crate) async fn row(app: &TestApp, id: i64) -> outbox::Model {
    outbox::Entity::find_by_id(id)
        .one(&app.db)
        .await
        .expect("query")
        .expect("row")
}

pub(crate) async fn wait_status(app: &TestApp, id: i64, status: &str) -> outbox::Model {
    let db = app.db.clone();
    eventually(&format!("mail {id} to become {status}"), || {
        let db = db.clone();
        let status = status.to_string();
        async move {
            outbox::Entity::find_by_id(id)
                .one(&db)
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.status == status)
        }
    })
    .await;
    row(app, id).await
}

async fn outbox_count(app: &TestApp) -> u64 {
    outbox::Entity::find().count(&app.db).await.expect("count")
}

/// Moves the test clock past a retry's due time (the sweep then re-queues it).
fn advance(app: &TestApp, secs: i64) {
    app.clock.advance(chrono::Duration::seconds(secs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_queues_a_mail_on_a_contact_and_it_is_delivered_with_xoauth2() {
    let m = mailing().await;
    // The record's page offers the compose form.
    let (_, page, _) = m.alice.get(&format!("/contacts/{}", m.contact)).await;
    assert!(page.contains("Send a mail"));
    let (status, _, location) = m
        .alice
        .post_form(
            &mails_path(m.contact),
            &[
                ("to", "Dana <dana@fabrikam.example>"),
                ("subject", "Our quote"),
                ("text_body", "Hello Dana, here it is."),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        location
            .expect("redirect")
            .starts_with(&mails_path(m.contact))
    );
    let smtp = &m.smtp;
    eventually("the mail to reach the server", || async {
        smtp.received_count() == 1
    })
    .await;
    let received = smtp.received().remove(0);

    let stored = token::Entity::find_by_id(m.env.server_id)
        .one(&m.env.app.db)
        .await
        .expect("q")
        .expect("token");
    let access = Sealer::new(&m.env.app.key)
        .unseal(
            &stored.access_token_sealed,
            &microsoft_outlook::tokens::store::access_context(m.env.server_id),
        )
        .expect("unseal");
    let expected = format!(
        "user={MAILBOX}\x01auth=Bearer {}\x01\x01",
        access.expose_secret()
    );
    assert_eq!(
        received.auth_raw.as_deref(),
        Some(expected.as_bytes()),
        "the exact XOAUTH2 initial response"
    );
    assert!(received.tls, "sent after STARTTLS");
    let data = String::from_utf8_lossy(&received.data).to_string();
    let headers = data
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        headers.contains("From: \"Alice Adams\" <alice@contoso.example>")
            || headers.contains("From: Alice Adams <alice@contoso.example>"),
        "{headers}"
    );
    assert!(
        !headers.contains("\r\nSender:"),
        "send-as: the author is the From, no Sender\n{headers}"
    );
    let (_, list) = m.alice.get_json(&mails_path(m.contact)).await;
    let mail = &list[0];
    assert_eq!(mail["status"], "sent");
    assert_eq!(mail["attempts"], 1);
    let message_id = mail["message_id"].as_str().expect("message id");
    assert!(
        headers.contains(&format!("Message-ID: <{message_id}>")),
        "{headers}"
    );
    assert_eq!(received.message_id.as_deref(), Some(message_id));
    assert_eq!(received.mail_from, "alice@contoso.example");
    assert!(
        mail["last_reply"]
            .as_str()
            .expect("reply")
            .starts_with("250")
    );
    let (_, page, _) = m.alice.get(&mails_path(m.contact)).await;
    assert!(page.contains("sent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_432_is_retried_with_back_off_then_sent() {
    let m = mailing().await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::MailFrom,
            reply: "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
        },
        1,
    );
    let id = queue(&m, "Throttled").await;
    eventually("the first attempt to end", || async {
        let r = row(&m.env.app, id).await;
        r.attempts == 1 && r.status == "queued"
    })
    .await;
    let first = row(&m.env.app, id).await;
    assert!(
        first
            .last_reply
            .as_deref()
            .unwrap_or_default()
            .contains("432 4.3.2"),
        "{first:?}"
    );
    assert!(
        first.next_attempt_at > m.env.app.clock.now(),
        "a retry is scheduled later"
    );
    advance(&m.env.app, 10);
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 2);
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
    // The mail's history keeps the attempt the server put off, under the reply that came later.
    let (_, detail) = m
        .env
        .admin
        .get_json(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    let history = detail["history"].as_array().expect("history");
    assert_eq!(
        history_kinds(&detail),
        ["queued", "deferred", "sent"],
        "{detail}"
    );
    assert_eq!(
        history[1]["what"],
        "Attempt 1: did not go out; tried again later"
    );
    assert!(
        history[1]["reply"]
            .as_str()
            .unwrap_or_default()
            .contains("432 4.3.2"),
        "{detail}"
    );
    assert_eq!(history[2]["what"], "Attempt 2: accepted by the server");
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    assert!(page.contains("id=\"history\""), "{page}");
    assert!(page.contains("sender thread limit exceeded"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_as_denied_fails_with_the_reply_and_what_to_do() {
    let m = mailing().await;
    m.smtp.inject(Injected::Reply { stage: Stage::EndOfData, reply: "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception".into() }, 1);
    let id = queue(&m, "Denied").await;
    let failed = wait_status(&m.env.app, id, "failed").await;
    assert_eq!(failed.attempts, 1);
    assert!(
        failed
            .last_reply
            .as_deref()
            .unwrap_or_default()
            .contains("SendAsDenied")
    );
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("Send As permission"),
        "{failed:?}"
    );
    assert_eq!(m.smtp.received_count(), 0);
}

/// Addresses with letters outside ASCII: a Unicode domain goes out in its ASCII form; a
/// Unicode local part on a server without SMTPUTF8 fails that mail at once, in words for its
/// author (it was retried for hours as a network failure), and the others still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_addresses_go_in_ascii_or_fail_in_words_without_smtputf8() {
    let m = mailing().await;
    let post = |to: &'static str, subject: &'static str| {
        let alice = &m.alice;
        let path = mails_path(m.contact);
        async move {
            let (status, body) = alice
                .post_json(
                    &path,
                    &json!({"to": to, "subject": subject, "text_body": "Hello"}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{to}: {body}");
            body["id"].as_i64().expect("id")
        }
    };
    let domain = post("Dana <dana@fäbrikam.example>", "Unicode domain").await;
    let sent = wait_status(&m.env.app, domain, "sent").await;
    let received = m.smtp.received();
    let mail = received
        .iter()
        .find(|r| r.message_id.as_deref() == Some(sent.message_id.as_str()))
        .expect("received");
    assert_eq!(mail.rcpt_to, ["dana@xn--fbrikam-5wa.example"]);
    let local = post("dänä@fabrikam.example", "Unicode local part").await;
    let failed = wait_status(&m.env.app, local, "failed").await;
    assert_eq!(failed.attempts, 1);
    let why = failed.last_error.unwrap_or_default();
    assert!(why.contains("dänä@fabrikam.example"), "{why}");
    assert!(why.contains("SMTPUTF8"), "{why}");
    assert!(why.contains("plain ASCII letters"), "{why}");
    assert!(!why.contains("tried again"), "{why}");
    // Nothing of it reached the server, and the mailbox is not held for it.
    assert_eq!(m.smtp.received_count(), 1);
    let after = post("dana@fabrikam.example", "After").await;
    wait_status(&m.env.app, after, "sent").await;
    // A domain without a dot is refused when the mail is written.
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam", "subject": "Dotless", "text_body": "Hello"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("has no dot"), "{body}");
}

/// A server whose certificate the CRM does not accept (here: its CA is not given) holds the
/// mailbox, in words for whoever can fix it, instead of spending every mail's attempts as a
/// network failure; once the CA is added, a test connection ends the hold and the mail goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_holds_the_mailbox_until_it_is_fixed() {
    let m = mailing().await;
    point_server_at(&m.env, &m.smtp, &[("extra_ca_pem", "")]).await;
    let id = queue(&m, "Untrusted").await;
    let server_id = m.env.server_id;
    let held = wait_held(&m.env.app, server_id, "server_refused").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!(waiting.status, "queued");
    assert_eq!(
        waiting.attempts, 0,
        "a held mailbox's mail spends no attempt"
    );
    let words = format!("{held:?}");
    assert!(words.contains("certificate"), "{words}");
    assert_eq!(m.smtp.received_count(), 0);
    // The operator's test says the same, not "nothing to do".
    let test = format!("/microsoft_outlook/servers/{server_id}/test");
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["rule"], "certificate-refused", "{report}");
    point_server_at(&m.env, &m.smtp, &[]).await;
    let (status, report) = m.env.admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_535_refreshes_the_token_and_sends() {
    let m = mailing().await;
    let before = m
        .env
        .idp
        .token_requests()
        .iter()
        .filter(|r| r.grant_type == "refresh_token")
        .count();
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "535 5.7.3 Authentication unsuccessful".into(),
        },
        1,
    );
    let id = queue(&m, "Refresh then send").await;
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    let refreshes = m
        .env
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type == "refresh_token")
        .collect::<Vec<_>>();
    assert_eq!(refreshes.len(), before + 1);
    assert!(
        refreshes
            .last()
            .and_then(|r| r.scope.clone())
            .unwrap_or_default()
            .contains("SMTP.Send"),
        "scope repeated"
    );
}

/// Waits until the mailbox of `server_id` is held for `reason` and none of its mails is being
/// sent any more (the outcomes of the batch that met the refusal are written); its health row.
pub(crate) async fn wait_held(
    app: &TestApp,
    server_id: i32,
    reason: &str,
) -> mailbox_health::Model {
    let db = app.db.clone();
    eventually(
        &format!("mailbox {server_id} to be held ({reason}) with no mail in flight"),
        || {
            let db = db.clone();
            async move {
                let held = mailbox_health::Entity::find_by_id(server_id)
                    .one(&db)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|h| h.state == "held" && h.reason.as_deref() == Some(reason));
                let in_flight = outbox::Entity::find()
                    .filter(outbox::Column::ServerId.eq(server_id))
                    .filter(outbox::Column::Status.eq("sending"))
                    .count(&db)
                    .await
                    .unwrap_or(1);
                held && in_flight == 0
            }
        },
    )
    .await;
    mailbox_health::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("query")
        .expect("health row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_535_holds_the_mailbox_and_notifies_once() {
    let m = mailing().await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "535 5.7.3 Authentication unsuccessful".into(),
        },
        10,
    );
    let id = queue(&m, "Refused token").await;
    wait_held(&m.env.app, m.env.server_id, "token_refused").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!(
        (waiting.status.as_str(), waiting.attempts),
        ("queued", 0),
        "a mail that waits for its mailbox spends no attempt"
    );
    assert!(
        waiting
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("An administrator must check"),
        "{waiting:?}"
    );
    let second = queue(&m, "Also waits").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let also = row(&m.env.app, second).await;
    assert_eq!((also.status.as_str(), also.attempts), ("queued", 0));
    let (_, page, _) = m.env.admin.get("/notifications").await;
    assert_eq!(
        page.matches("is held: SMTP refuses the token").count(),
        1,
        "operators are told once\n{page}"
    );
    assert!(
        page.contains("click Release held mail on the server"),
        "{page}"
    );
    let (_, server_page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(
        server_page.contains("Held: SMTP refuses the token"),
        "{server_page}"
    );

    // Reconnecting releases the waiting mails.
    m.smtp.clear_injections();
    let (status, _, _) = connect_through(&m.env.admin, m.env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_status(&m.env.app, id, "sent").await;
    wait_status(&m.env.app, second, "sent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_disabled_is_explained_not_retried() {
    let m = mailing().await;
    m.smtp.inject(Injected::Reply { stage: Stage::Auth, reply: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.".into() }, 10);
    let id = queue(&m, "No SMTP AUTH").await;
    wait_held(&m.env.app, m.env.server_id, "smtp_auth_disabled").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!((waiting.status.as_str(), waiting.attempts), ("queued", 0));
    let error = waiting.last_error.unwrap_or_default();
    assert!(error.contains("SMTP is disabled"), "{error}");
    assert!(error.contains("5.7.139"), "{error}");
    assert!(error.contains("Graph"), "{error}");
    assert!(
        m.env
            .idp
            .token_requests()
            .iter()
            .all(|r| r.grant_type != "refresh_token"),
        "a disabled SMTP AUTH is not a token problem: no refresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_on_refresh_holds_the_mailbox_for_a_reconnect() {
    let m = mailing().await;
    token::Entity::update_many()
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(m.env.app.clock.now() + chrono::Duration::minutes(1)),
        )
        .exec(&m.env.app.db)
        .await
        .expect("update");
    m.env.idp.fail_next_token_requests(
        TokenFault::OAuthError { status: 400, error: "invalid_grant".into(), code: 70008, description: "AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.".into() },
        1,
    );
    let id = queue(&m, "Expired grant").await;
    wait_held(&m.env.app, m.env.server_id, "grant_dead").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!((waiting.status.as_str(), waiting.attempts), ("queued", 0));
    assert!(
        waiting
            .last_error
            .unwrap_or_default()
            .contains("AADSTS70008")
    );
    let t = token::Entity::find_by_id(m.env.server_id)
        .one(&m.env.app.db)
        .await
        .expect("q")
        .expect("row");
    assert_eq!(t.status, "needs_reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_within_five_minutes_is_refreshed_first_and_rotation_is_stored() {
    let m = mailing().await;
    let before = token::Entity::find_by_id(m.env.server_id)
        .one(&m.env.app.db)
        .await
        .expect("q")
        .expect("row");
    let sealer = Sealer::new(&m.env.app.key);
    let refresh_context = microsoft_outlook::tokens::store::refresh_context(m.env.server_id);
    let old_refresh = sealer
        .unseal(
            before.refresh_token_sealed.as_deref().expect("rt"),
            &refresh_context,
        )
        .expect("unseal");
    token::Entity::update_many()
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(m.env.app.clock.now() + chrono::Duration::minutes(4)),
        )
        .exec(&m.env.app.db)
        .await
        .expect("update");
    let id = queue(&m, "Fresh token").await;
    wait_status(&m.env.app, id, "sent").await;
    let after = token::Entity::find_by_id(m.env.server_id)
        .one(&m.env.app.db)
        .await
        .expect("q")
        .expect("row");
    assert_eq!(after.version, before.version + 1);
    let new_refresh = sealer
        .unseal(
            after.refresh_token_sealed.as_deref().expect("rt"),
            &refresh_context,
        )
        .expect("unseal");
    assert_ne!(
        new_refresh.expose_secret(),
        old_refresh.expose_secret(),
        "the rotated refresh token is stored"
    );
    assert!(after.access_expires_at > m.env.app.clock.now() + chrono::Duration::minutes(30));
    let received = m.smtp.received().remove(0);
    let access = sealer
        .unseal(
            &after.access_token_sealed,
            &microsoft_outlook::tokens::store::access_context(m.env.server_id),
        )
        .expect("unseal");
    assert!(
        String::from_utf8_lossy(received.auth_raw.as_deref().unwrap_or_default())
            .contains(access.expose_secret()),
        "sent with the new token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_dropped_mid_data_is_retried_and_sent_once() {
    let m = mailing().await;
    m.smtp.inject(Injected::DropMidData, 1);
    let id = queue(&m, "Dropped").await;
    eventually("the first attempt", || async {
        row(&m.env.app, id).await.attempts == 1 && row(&m.env.app, id).await.status == "queued"
    })
    .await;
    advance(&m.env.app, 10);
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 2);
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
}

/// A server that accepts the connection and never answers (no greeting) holds neither the
/// mail nor the connection: the attempt is given up after the SMTP timeout, the connection is
/// closed, the mailbox waits as unreachable (the mail spends no attempt), and the mail goes
/// out on a later probe, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_given_up_and_the_mail_goes_out_later() {
    let m = mailing().await;
    m.smtp.inject(Injected::StallConnection, 1);
    let id = queue(&m, "Stalled").await;
    eventually("the stalled connection", || async {
        m.smtp.stalled_connections() == 1
    })
    .await;
    eventually("the attempt to be given up", || async {
        let r = row(&m.env.app, id).await;
        r.attempts == 0 && r.status == "queued" && r.last_error.is_some()
    })
    .await;
    let waiting = row(&m.env.app, id).await;
    let why = waiting.last_error.unwrap_or_default();
    assert!(
        why.contains("could not be reached") && why.contains("stopped answering"),
        "{why}"
    );
    eventually("the stalled connection to be closed", || async {
        m.smtp.stalled_connections() == 0
    })
    .await;
    advance(&m.env.app, 600);
    // The sweep (every second) wakes the mailbox's drain in this process: the mail goes out
    // within seconds of being due, not when a queued drain job is next picked up (the SQLite
    // queue's worker did so only at its 30 s heartbeat). 20 s leaves a loaded machine room.
    let mut sent = None;
    for _ in 0..200 {
        let r = row(&m.env.app, id).await;
        if r.status == "sent" {
            sent = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let sent = sent.expect("the mail is sent on a later attempt");
    assert_eq!(sent.attempts, 1, "the stall spent no attempt");
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_give_up_after_the_configured_limit() {
    let m = mailing().await;
    settings(
        &m.env,
        &[("max_attempts", "2"), ("mailbox_rate_per_minute", "0")],
    )
    .await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::MailFrom,
            // A transient of this message (a 4.7.x at 421 would throttle the whole mailbox).
            reply: "451 4.4.0 Primary target IP address responded with: 421 4.4.2 Connection dropped due to SocketError".into(),
        },
        10,
    );
    let id = queue(&m, "Doomed").await;
    eventually("the first attempt", || async {
        row(&m.env.app, id).await.attempts == 1 && row(&m.env.app, id).await.status == "queued"
    })
    .await;
    advance(&m.env.app, 30);
    let failed = wait_status(&m.env.app, id, "failed").await;
    assert_eq!(failed.attempts, 2);
    assert!(
        failed
            .last_error
            .unwrap_or_default()
            .contains("Gave up after 2 attempts")
    );
    // The author reads both attempts in the mail's history, each with its words.
    let (_, detail) = m
        .alice
        .get_json(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    let history = detail["history"].as_array().expect("history");
    assert_eq!(
        history_kinds(&detail),
        ["queued", "deferred", "failed"],
        "{detail}"
    );
    assert_eq!(
        history[2]["what"],
        "Attempt 2: did not go out; not tried again by itself"
    );
    assert!(
        history[2]["words"]
            .as_str()
            .unwrap_or_default()
            .contains("Gave up after 2 attempts"),
        "{detail}"
    );
    for attempt in [&history[1], &history[2]] {
        assert_eq!(
            attempt["reply"], "451 4.4.0",
            "a user reads the reply's codes: {detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_batch_loses_nothing_and_doubles_nothing() {
    let m = mailing().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(queue(&m, &format!("Batch {i}")).await);
    }
    let smtp = &m.smtp;
    eventually("some mails to go out", || async {
        smtp.received_count() >= 3
    })
    .await;
    // The first process stops its workers (in-flight sends finish); another process takes over.
    m.env.app.app.registry.shutdown().await;
    let second = spawn_on(m.env.app.test_db(), m.env.app.key.clone(), false).await;
    let db = second.db.clone();
    eventually("every mail to be sent", || {
        let db = db.clone();
        async move {
            outbox::Entity::find()
                .filter(outbox::Column::Status.ne("sent"))
                .count(&db)
                .await
                .unwrap_or(1)
                == 0
        }
    })
    .await;
    let counts = m.smtp.count_by_message_id();
    for id in ids {
        let r = row(&m.env.app, id).await;
        assert_eq!(
            counts.get(&r.message_id),
            Some(&1),
            "mail {id} delivered exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_queued() {
    let m = mailing().await;
    let path = mails_path(m.contact);
    let many: Vec<String> = (0..501).map(|i| format!("r{i}@fabrikam.example")).collect();
    let cases = [
        (
            json!({"to": "dana@fabrikam.example", "subject": "Hi\r\nBcc: victim@evil.example", "text_body": "x"}),
            "subject",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "dana@fabrikam.example\r\nBcc: victim@evil.example", "subject": "Hi", "text_body": "x"}),
            "to",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "not an address", "subject": "Hi", "text_body": "x"}),
            "to",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": many, "subject": "Hi", "text_body": "x"}),
            "to",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "x".repeat(11 * 1024 * 1024)}),
            "text_body",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "x", "reply_to": "a@b.example\nX-Evil: 1"}),
            "reply_to",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, field, status) in cases {
        let (got, answer) = m.alice.post_json(&path, &body).await;
        assert_eq!(got, status, "{field}: {answer}");
        assert_eq!(answer["errors"][0]["field"], field, "{answer}");
    }
    let ok = json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "x"});
    let (status, answer) = m
        .alice
        .post_json("/microsoft_outlook/records/contact/999999/mails", &ok)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let hidden = bobs_private_contact(&m.env).await;
    let (status, _) = m.alice.post_json(&mails_path(hidden), &ok).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "hidden answers as missing");
    // Bob may, it is his.
    let bob = m.env.app.signed_in(BOB).await;
    let (status, _) = bob.post_json(&mails_path(hidden), &ok).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        outbox_count(&m.env.app).await,
        1,
        "only Bob's valid mail was queued"
    );

    // A From the server may not use.
    point_server_at(&m.env, &m.smtp, &[("from_allow_list", "@fabrikam.example")]).await;
    let (status, answer) = m.alice.post_json(&path, &ok).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["errors"][0]["field"], "from");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("may not send as alice@contoso.example")
    );
    // Without a CSRF token nothing happens either.
    let response = m
        .alice
        .client
        .post(m.alice.url(&path))
        .json(&ok)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(outbox_count(&m.env.app).await, 1);
}

/// Requests that arrive together are admitted together (one record look-up, one server query,
/// one transaction) and still each get their own answer: a mail to a hidden or a missing
/// record is refused alone, the others are stored under their own record and author, and sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_queued_together_are_each_answered_and_stored_as_their_own() {
    let m = mailing().await;
    let hidden = bobs_private_contact(&m.env).await;
    let bob = m.env.app.signed_in(BOB).await;
    let missing = 999_999;
    // (who, contact, subject, expected status)
    let cases: Vec<(&Browser, i64, String, StatusCode)> = (0..16)
        .map(|i| match i % 4 {
            0 => (
                &m.alice,
                m.contact,
                format!("Alice {i}"),
                StatusCode::CREATED,
            ),
            1 => (&m.alice, hidden, format!("Peek {i}"), StatusCode::NOT_FOUND),
            2 => (&bob, hidden, format!("Bob {i}"), StatusCode::CREATED),
            _ => (
                &m.alice,
                missing,
                format!("Nobody {i}"),
                StatusCode::NOT_FOUND,
            ),
        })
        .collect();
    let requests: Vec<(String, serde_json::Value)> = cases
        .iter()
        .map(|(_, contact, subject, _)| {
            (
                mails_path(*contact),
                json!({"to": "dana@fabrikam.example", "subject": subject, "text_body": "x"}),
            )
        })
        .collect();
    let answers = futures::future::join_all(
        cases
            .iter()
            .zip(&requests)
            .map(|((who, ..), (path, body))| who.post_json(path, body)),
    )
    .await;
    let mut stored = Vec::new();
    for ((who, contact, subject, expected), (status, answer)) in cases.iter().zip(&answers) {
        assert_eq!(status, expected, "{subject}: {answer}");
        if *expected == StatusCode::CREATED {
            let id = answer["id"].as_i64().expect("id");
            let row = row(&m.env.app, id).await;
            assert_eq!(&row.subject, subject);
            assert_eq!(row.record_id, *contact);
            let author = if std::ptr::eq(*who, &bob) {
                m.env.app.bob_id
            } else {
                m.env.app.alice_id
            };
            assert_eq!(row.author_user_id, author, "{subject}");
            stored.push(id);
        } else {
            assert_eq!(answer["errors"][0]["field"], "record", "{answer}");
        }
    }
    assert_eq!(stored.len(), 8);
    assert_eq!(
        outbox_count(&m.env.app).await,
        8,
        "the refused mails left nothing"
    );
    for id in stored {
        wait_status(&m.env.app, id, "sent").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_minute_limit_holds_mails_back_without_spending_attempts() {
    let m = mailing().await;
    settings(&m.env, &[("mailbox_rate_per_minute", "2")]).await;
    let ids = [
        queue(&m, "One").await,
        queue(&m, "Two").await,
        queue(&m, "Three").await,
    ];
    let smtp = &m.smtp;
    eventually("two mails to go out", || async {
        smtp.received_count() == 2
    })
    .await;
    let app = &m.env.app;
    eventually("the third to be held back", || async {
        let mut held = 0;
        for id in ids {
            let r = row(app, id).await;
            if r.status == "queued" && r.attempts == 0 && r.next_attempt_at > app.clock.now() {
                held += 1;
            }
        }
        held == 1
    })
    .await;
    assert_eq!(m.smtp.received_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_per_minute_limit_only_the_next_mails_wait_for_the_window_and_the_rest_keep_their_turn()
 {
    let m = mailing().await;
    settings(&m.env, &[("mailbox_rate_per_minute", "2")]).await;
    let mut ids = Vec::new();
    for k in 1..=6 {
        ids.push(queue(&m, &format!("Mail {k}")).await);
    }
    let smtp = &m.smtp;
    let app = &m.env.app;
    // Which queued mails were given a later time, and which keep their turn.
    let split = || async {
        let now = app.clock.now();
        let (mut later, mut in_turn) = (Vec::new(), Vec::new());
        for id in &ids {
            let r = row(app, *id).await;
            if r.status == "queued" {
                assert_eq!(
                    r.attempts, 0,
                    "held back without spending an attempt: {r:?}"
                );
                if r.next_attempt_at > now {
                    later.push(r.id);
                } else {
                    in_turn.push(r.id);
                }
            }
        }
        (later, in_turn)
    };
    // The first two go (the test's clock stands still: they share one time in the window);
    // the two oldest of the rest get the time the window frees, the last two keep their own.
    eventually("two sent, the next two waiting for the window", || async {
        smtp.received_count() == 2 && split().await == (ids[2..4].to_vec(), ids[4..].to_vec())
    })
    .await;
    let (status, page, _) = m
        .alice
        .get(&format!("/microsoft_outlook/outbox/{}", ids[5]))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains(
            "In its turn: in queue order with this mailbox&#39;s other due mail, at most 2 a minute"
        ) || page.contains(
            "In its turn: in queue order with this mailbox's other due mail, at most 2 a minute"
        ),
        "{page}"
    );
    // The window frees: the next two go (woken by the sweep), then the last two wait in turn.
    advance(app, 61);
    eventually(
        "the next two sent, the last two waiting for the window",
        || async { smtp.received_count() == 4 && split().await == (ids[4..].to_vec(), Vec::new()) },
    )
    .await;
    advance(app, 61);
    eventually("the last two sent", || async { smtp.received_count() == 6 }).await;
    let arrived: Vec<Option<String>> = smtp.received().into_iter().map(|r| r.message_id).collect();
    let mut queued = Vec::new();
    for id in &ids {
        queued.push(Some(row(app, *id).await.message_id));
    }
    assert_eq!(arrived, queued, "in queue order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_only_server_fetches_one_client_credentials_token_for_many_mails() {
    let m = mailing().await;
    // Disconnect the delegated grant: app-only needs none.
    let (status, _, _) = m
        .env
        .admin
        .post_form(
            &format!("/microsoft_outlook/servers/{}/disconnect", m.env.server_id),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    point_server_at(&m.env, &m.smtp, &[("auth", "app_only")]).await;
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(
        page.contains("service principal"),
        "the page explains the Exchange step"
    );
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(queue(&m, &format!("App-only {i}")).await);
    }
    for id in &ids {
        wait_status(&m.env.app, *id, "sent").await;
    }
    let grants: Vec<_> = m
        .env
        .idp
        .token_requests()
        .into_iter()
        .filter(|r| r.grant_type == "client_credentials")
        .collect();
    assert_eq!(grants.len(), 1, "one token for every mail");
    assert_eq!(
        grants[0].scope.as_deref(),
        Some("https://outlook.office365.com/.default")
    );
    for mail in m.smtp.received() {
        assert_eq!(mail.auth_user.as_deref(), Some(MAILBOX));
        let raw = String::from_utf8_lossy(mail.auth_raw.as_deref().unwrap_or_default()).to_string();
        let bearer = raw
            .split("auth=Bearer ")
            .nth(1)
            .and_then(|r| r.split('\x01').next())
            .unwrap_or_default()
            .to_string();
        let info = m
            .env
            .idp
            .validate_access_token(&bearer)
            .expect("a live token");
        assert!(info.app_only, "sent with the app-only token");
    }
}

/// A server that cannot be reached is a matter of the mailbox, not of each mail: a batch that
/// meets it spends no attempt (its mailbox is held as unreachable), and only the mail that met
/// it tells so in its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_holds_its_mailbox_and_no_mail_of_the_batch_spends_an_attempt() {
    let m = mailing().await;
    let app = &m.env.app;
    // One mail a minute: the first goes, the next three wait (made to wait together).
    settings(&m.env, &[("mailbox_rate_per_minute", "1")]).await;
    let first = queue(&m, "Goes at once").await;
    wait_status(app, first, "sent").await;
    m.smtp.stop().await;
    let waiting = [
        queue(&m, "Waits one").await,
        queue(&m, "Waits two").await,
        queue(&m, "Waits three").await,
    ];
    for id in waiting {
        let r = row(app, id).await;
        assert_eq!((r.status.as_str(), r.attempts), ("queued", 0), "{r:?}");
    }
    wait_together(app, &waiting).await;
    // The time comes; the three go out as one batch and meet a closed port.
    settings(&m.env, &[("mailbox_rate_per_minute", "0")]).await;
    app.clock.advance(chrono::Duration::seconds(61));
    eventually("the batch to meet the closed port", || async {
        let held = mailbox_health::Entity::find_by_id(m.env.server_id)
            .one(&app.db)
            .await
            .expect("query")
            .is_some_and(|h| h.reason.as_deref() == Some("unreachable"));
        let mut waited = 0;
        for id in waiting {
            let r = row(app, id).await;
            if r.status == "queued" && r.next_attempt_at > app.clock.now() {
                waited += 1;
            }
        }
        held && waited == waiting.len()
    })
    .await;
    let health = mailbox_health::Entity::find_by_id(m.env.server_id)
        .one(&app.db)
        .await
        .expect("query")
        .expect("a health row");
    assert_eq!(
        (health.state.as_str(), health.reason.as_deref()),
        ("held", Some("unreachable")),
        "{health:?}"
    );
    assert!(
        health
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("could not be reached"),
        "{health:?}"
    );
    for id in waiting {
        let r = row(app, id).await;
        assert_eq!(r.attempts, 0, "no attempt spent: {r:?}");
    }
    // Only the mail that met the closed port tells it in its history; the others were not
    // tried and have nothing to tell.
    let mut told = 0;
    for id in waiting {
        let (_, detail) = m
            .alice
            .get_json(&format!("/microsoft_outlook/outbox/{id}"))
            .await;
        if history_kinds(&detail) != ["queued"] {
            told += 1;
        }
    }
    assert_eq!(told, 1, "one history row for the batch");
}

/// With PIPELINING, MAIL FROM, the RCPT TOs and DATA go out together, so the server may accept
/// DATA although it refused one recipient. The mail must then go to nobody (not to the
/// recipients it accepted), fail with the refusal in words, and the mailbox must go on
/// sending on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_among_several_sends_the_mail_to_nobody_and_the_next_mail_goes_out() {
    let m = mailing().await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::RcptTo,
            reply: "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup".into(),
        },
        1,
    );
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "nobody@fabrikam.example", "cc": "Dana <dana@fabrikam.example>",
                    "subject": "Two recipients", "text_body": "Hello Dana"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = body["id"].as_i64().expect("id");
    let failed = wait_status(&m.env.app, first, "failed").await;
    assert!(
        failed
            .last_reply
            .as_deref()
            .unwrap_or_default()
            .contains("5.1.10"),
        "{failed:?}"
    );
    assert_eq!(m.smtp.count_by_message_id().get(&failed.message_id), None);
    let second = queue(&m, "After the refusal").await;
    let sent = wait_status(&m.env.app, second, "sent").await;
    let received = m.smtp.received();
    assert_eq!(received.len(), 1, "only the second mail arrived");
    assert_eq!(
        received[0].message_id.as_deref(),
        Some(sent.message_id.as_str())
    );
    assert_eq!(
        received[0].rcpt_to,
        vec!["dana@fabrikam.example".to_string()]
    );
}

/// The content goes out dot-stuffed (RFC 5321 §4.5.2) in the same write as its end: lines that
/// begin with a dot arrive as written, and the mail is not cut at a lone dot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_that_begin_with_a_dot_arrive_as_written() {
    let m = mailing().await;
    let text = "First line\n.\n..two dots\n.leading dot\nlast line";
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "Dots", "text_body": text}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    let sent = wait_status(&m.env.app, id, "sent").await;
    let received = m.smtp.received();
    let mail = received
        .iter()
        .find(|r| r.message_id.as_deref() == Some(sent.message_id.as_str()))
        .expect("received");
    let data = String::from_utf8_lossy(&mail.data);
    assert!(data.contains("last line"), "{data}");
    assert!(
        data.contains("\r\n.\r\n..two dots\r\n.leading dot\r\n"),
        "{data}"
    );
}

/// On a reused connection the next mail's MAIL FROM, RCPT TO and DATA go out behind the
/// current mail's content. When the server answers that content with `421` and closes, the
/// mail it refused is retried, and the next one, whose commands were lost with the
/// connection, goes out on a new connection without spending an attempt: each arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_after_a_mail_loses_nothing_of_the_mail_pipelined_behind_it() {
    let m = mailing().await;
    let app = &m.env.app;
    // One mail a minute: the first goes, the next three wait (made to wait together) and
    // then go as one batch.
    settings(&m.env, &[("mailbox_rate_per_minute", "1")]).await;
    let first = queue(&m, "Goes at once").await;
    wait_status(app, first, "sent").await;
    let batch = [
        queue(&m, "Batch one").await,
        queue(&m, "Batch two").await,
        queue(&m, "Batch three").await,
    ];
    wait_together(app, &batch).await;
    // The batch's first mail goes alone and is taken; the second, sent with the third's
    // commands behind it, meets 421 and the end of the connection.
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::EndOfData,
            reply: "250 2.0.0 OK taken".into(),
        },
        1,
    );
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::EndOfData,
            reply: "421 4.3.2 Service not available, closing transmission channel".into(),
        },
        1,
    );
    settings(&m.env, &[("mailbox_rate_per_minute", "0")]).await;
    advance(app, 61);
    let third = wait_status(app, batch[2], "sent").await;
    assert_eq!(
        third.attempts, 1,
        "the pipelined mail spent no extra attempt"
    );
    eventually("the refused mail to wait for its retry", || async {
        let r = row(app, batch[1]).await;
        r.status == "queued" && r.attempts == 1
    })
    .await;
    let second = row(app, batch[1]).await;
    assert!(
        second
            .last_reply
            .as_deref()
            .unwrap_or_default()
            .starts_with("421"),
        "{second:?}"
    );
    advance(app, 3600);
    let second = wait_status(app, batch[1], "sent").await;
    assert_eq!(second.attempts, 2);
    let counts = m.smtp.count_by_message_id();
    for id in [first, batch[0], batch[1], batch[2]] {
        let mail = row(app, id).await;
        assert_eq!(counts.get(&mail.message_id), Some(&1), "{mail:?}");
    }
    assert_eq!(m.smtp.received_count(), 4);
}

/// With MAIL FROM, RCPT TO and DATA pipelined, a server that answers MAIL FROM with `421` and
/// closes never answers the commands behind it. The mail must be judged by that `421` (here
/// Exchange's throttling: the mailbox waits a minute, the mail spends no attempt), not as a
/// dropped line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_before_the_line_closes_is_the_verdict_not_the_closed_line() {
    let m = mailing().await;
    let app = &m.env.app;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::MailFrom,
            reply: "421 4.7.0 Too many messages from this mailbox, try again later".into(),
        },
        1,
    );
    let id = queue(&m, "Throttled").await;
    eventually("the mailbox to be throttled", || async {
        let r = row(app, id).await;
        r.status == "queued"
            && r.last_reply
                .as_deref()
                .is_some_and(|t| t.starts_with("421 4.7.0"))
    })
    .await;
    let waiting = row(app, id).await;
    assert_eq!(waiting.attempts, 0, "no attempt spent: {waiting:?}");
    let server_id = waiting.server_id;
    let health = mailbox_health::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("query")
        .expect("health row");
    assert_eq!(health.state, "throttled", "{health:?}");
    advance(app, 61);
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
}

/// The sweep keeps one wake time per mailbox, never one per mail: a mailbox whose due mail it
/// woke is not woken again until more mail comes due after that wake, or the wake is older
/// than `repush_after` (its drain may be lost). A web-only process (no drains, no sweep of its
/// own) so that only the calls here touch the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_wakes_a_mailbox_once_per_mail_coming_due_and_marks_no_mail() {
    use microsoft_outlook::entities::{mail_server, mailbox_wake};
    use sea_orm::{ActiveModelTrait, Set};
    let test_db = std::sync::Arc::new(
        microsoft_outlook_tests::testdb::TestDb::create()
            .await
            .expect("test database"),
    );
    let options = microsoft_outlook::runtime::ModuleOptions {
        workers: false,
        ..crate::helpers::test_options()
    };
    let app =
        crate::helpers::spawn_with(test_db, crm_sdk::SealingKey::generate(), true, options).await;
    app.enable_module().await;
    let (ctx, shared) = app.module_parts();
    let now = app.clock.now();
    let server = mail_server::ActiveModel {
        name: Set("Office 365".into()),
        kind: Set("shared".into()),
        owner_user_id: Set(None),
        smtp_host: Set("smtp.office365.com".into()),
        smtp_port: Set(587),
        security: Set("starttls".into()),
        extra_ca_pem: Set(None),
        mailbox: Set(MAILBOX.into()),
        auth: Set("delegated".into()),
        transport: Set("smtp".into()),
        send_as: Set("author".into()),
        from_allow_list: Set(String::new()),
        is_default: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&app.db)
    .await
    .expect("server");
    let queue_due_at = |n: i64, due: chrono::DateTime<chrono::Utc>| outbox::ActiveModel {
        message_id: Set(format!("wake-{n}@crm.example")),
        status: Set("queued".into()),
        server_id: Set(server.id),
        author_user_id: Set(app.alice_id),
        record_model: Set("contact".into()),
        record_id: Set(1),
        from_header: Set(MAILBOX.into()),
        envelope_from: Set(MAILBOX.into()),
        recipients: Set("dana@fabrikam.example".into()),
        subject: Set(format!("Mail {n}")),
        size_bytes: Set(100),
        attempts: Set(0),
        next_attempt_at: Set(due),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    for n in 0..3 {
        queue_due_at(n, now).insert(&app.db).await.expect("mail");
    }
    let repush = chrono::Duration::seconds(60);
    let sweep = || microsoft_outlook::outbox::sweep::to_wake(&ctx, &shared, repush);
    assert_eq!(sweep().await.expect("sweep"), vec![server.id], "woken once");
    assert_eq!(
        sweep().await.expect("sweep"),
        Vec::<i32>::new(),
        "not again"
    );
    let wakes = mailbox_wake::Entity::find()
        .all(&app.db)
        .await
        .expect("wakes");
    assert_eq!(wakes.len(), 1, "one row for the mailbox: {wakes:?}");
    let marked = outbox::Entity::find()
        .filter(outbox::Column::PushedAt.is_not_null())
        .count(&app.db)
        .await
        .expect("count");
    assert_eq!(marked, 0, "no mail row is written");
    // A mail that comes due after the wake (a retry) wakes the mailbox again, once.
    let later = now + chrono::Duration::seconds(10);
    queue_due_at(3, later).insert(&app.db).await.expect("mail");
    assert_eq!(
        sweep().await.expect("sweep"),
        Vec::<i32>::new(),
        "not due yet"
    );
    app.clock.set(later);
    assert_eq!(sweep().await.expect("sweep"), vec![server.id], "came due");
    assert_eq!(sweep().await.expect("sweep"), Vec::<i32>::new());
    // A wake older than `repush_after` whose mail still waits: its drain may be lost.
    app.clock.set(later + repush + chrono::Duration::seconds(1));
    assert_eq!(
        sweep().await.expect("sweep"),
        vec![server.id],
        "woken again"
    );
}

/// The sweep does not mark the backlog of a mailbox that this process is draining (that
/// rewrote every queued row behind the batch in flight at each sweep); it only tells the
/// running drain to look once more. Once no drain of the mailbox runs here, the sweep wakes it
/// and the mail goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_does_not_rewrite_the_backlog_of_a_mailbox_drained_here_and_wakes_it_after() {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    let (ctx, shared) = app.module_parts();
    // A drain of the mailbox is running here (as far as the dispatcher knows): the wake of the
    // queued mail only raises its "more mail came" flag.
    let more = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    shared
        .active
        .lock()
        .expect("active")
        .insert(server_id, more.clone());
    let id = queue(&m, "Behind the batch").await;
    eventually("the running drain to be told", || async {
        more.swap(false, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let swept =
        microsoft_outlook::outbox::sweep::to_wake(&ctx, &shared, chrono::Duration::seconds(60))
            .await
            .expect("sweep");
    assert!(swept.contains(&server_id), "woken: {swept:?}");
    let waiting = row(app, id).await;
    assert_eq!(waiting.status, "queued");
    let marked = microsoft_outlook::entities::mailbox_wake::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("wake");
    assert_eq!(marked, None, "a mailbox drained here is not marked woken");
    // The drain ends without having taken it (as if it had stopped): the sweep wakes the
    // mailbox and the mail goes out, once.
    shared.active.lock().expect("active").remove(&server_id);
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
}

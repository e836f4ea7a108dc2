//! Mailbox health: refusals that are about the mailbox (a dead grant, SMTP AUTH disabled, the
//! sending quota, a proxy in front of Microsoft, ...) hold the mailbox, its mails wait without
//! spending attempts, the people who can fix it are told once, and the waiting mails go out in
//! queue order once it is fixed. Also SASL XOAUTH2 as servers really speak it (error
//! challenges, the 1,000-octet line limit, the UPN as `user=`) and national clouds.

use crate::connect::{
    CLIENT_ID, CLIENT_SECRET, Env, MAILBOX, REDIRECT, authorize, connect_through, create_personal,
    env, start_connect, token_rows,
};
use crate::helpers::{ALICE, TestApp, eventually};
use crate::send::{Mailing, point_server_at, queue, row, settings, wait_status, with_contact};
use crm_host::entities::notification;
use crm_sdk::Clock;
use microsoft_outlook::entities::{mailbox_health, token};
use microsoft_simulators::identity::{AppRegistration, TestUser, TokenFault};
use microsoft_simulators::smtp::{
    Injected, RFC_COMMAND_LINE_LIMIT, SmtpConfig, SmtpServer, Stage, XOAUTH2_CHALLENGE_FINAL_REPLY,
};
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

/// A connected shared server on a simulated SMTP server started with `config`; `before` runs
/// before the server is pointed at it and connected (to add users, sign in as someone else,
/// change the identity platform), `mailbox` is the server's mailbox.
async fn mailing_with(config: SmtpConfig, mailbox: &str, before: impl FnOnce(&Env)) -> Mailing {
    let env = env().await;
    before(&env);
    let smtp = SmtpServer::start(SmtpConfig {
        validator: Some(env.idp.smtp_validator()),
        ..config
    })
    .await
    .expect("smtp");
    point_server_at(&env, &smtp, &[("mailbox", mailbox)]).await;
    // One attempt only: a mail that waits for its mailbox must not spend it.
    settings(
        &env,
        &[("mailbox_rate_per_minute", "0"), ("max_attempts", "1")],
    )
    .await;
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    with_contact(env, smtp).await
}

async fn mailing() -> Mailing {
    mailing_with(SmtpConfig::default(), MAILBOX, |_| {}).await
}

async fn health(app: &TestApp, server_id: i32) -> Option<mailbox_health::Model> {
    mailbox_health::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("query")
}

/// How many mails of `server_id` are in flight (`sending`); 1 when the database does not say.
async fn in_flight(app: &TestApp, server_id: i32) -> u64 {
    use sea_orm::PaginatorTrait;
    microsoft_outlook::entities::outbox::Entity::find()
        .filter(microsoft_outlook::entities::outbox::Column::ServerId.eq(server_id))
        .filter(microsoft_outlook::entities::outbox::Column::Status.eq("sending"))
        .count(&app.db)
        .await
        .unwrap_or(1)
}

/// Waits until the mailbox is held for `reason`. The attempt that met the hold writes the hold
/// first and its own outcome just after: that outcome is waited for too (no mail of the
/// mailbox in flight).
async fn wait_held(app: &TestApp, server_id: i32, reason: &str) -> mailbox_health::Model {
    for _ in 0..300 {
        let in_flight = in_flight(app, server_id).await;
        if let Some(h) = health(app, server_id).await
            && h.state == "held"
            && h.reason.as_deref() == Some(reason)
            && in_flight == 0
        {
            return h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mails = microsoft_outlook::entities::outbox::Entity::find()
        .all(&app.db)
        .await
        .expect("query");
    panic!(
        "gave up waiting: mailbox {server_id} to be held ({reason}); its health: {:?}; the mails: {:?}",
        health(app, server_id).await,
        mails
            .iter()
            .map(|m| (m.id, &m.status, m.attempts, &m.last_reply, &m.last_error))
            .collect::<Vec<_>>()
    );
}

/// Waits until the mailbox is ready again (no row, or state `ready`).
async fn wait_ready(app: &TestApp, server_id: i32) {
    eventually(&format!("mailbox {server_id} to be ready"), || async {
        health(app, server_id)
            .await
            .is_none_or(|h| h.state == "ready")
    })
    .await;
}

async fn notifications(app: &TestApp, key: &str) -> Vec<notification::Model> {
    notification::Entity::find()
        .filter(notification::Column::IncidentKey.eq(key))
        .all(&app.db)
        .await
        .expect("query")
}

/// The operators' notifications of the incident `key` (authors whose mail waits get their own).
async fn operator_notifications(app: &TestApp, key: &str) -> Vec<notification::Model> {
    let mut notes = notifications(app, key).await;
    notes.retain(|n| n.for_operators);
    notes
}

/// An operator's Release held mail in the outbox (any mailbox, personal ones too):
/// `server_id`'s hold ends at once.
async fn release_forced(env: &Env, server_id: i32) {
    let path = format!("/microsoft_outlook/outbox/release/{server_id}");
    let (status, answer) = env.admin.post_json(&path, &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["hold_ended"], true, "{answer}");
}

/// The history of the mail `id` as an operator reads it (its JSON).
async fn history_of(env: &Env, id: i64) -> serde_json::Value {
    let (status, detail) = env
        .admin
        .get_json(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    detail["history"].clone()
}

/// The `what` of each event of `history` whose kind is `kind`.
fn events_of<'a>(history: &'a serde_json::Value, kind: &str) -> Vec<&'a str> {
    history
        .as_array()
        .expect("history")
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["what"].as_str().unwrap_or_default())
        .collect()
}

/// `who`'s sign-in revoked at Microsoft, as a password change does: their grants, and the
/// access tokens the CRM still believes good.
fn revoke_sign_in(env: &Env, who: &str) {
    env.idp.revoke_grants_of(who);
    env.idp.expire_access_tokens_of(who);
}

/// The shared mailbox with its sign-in revoked and a mail (`subject`, its id returned) that
/// met it: held for a dead grant, the mail waiting.
async fn held_by_a_revoked_sign_in(subject: &str) -> (Mailing, i64) {
    let m = mailing().await;
    revoke_sign_in(&m.env, MAILBOX);
    let id = queue(&m, subject).await;
    wait_held(&m.env.app, m.env.server_id, "grant_dead").await;
    (m, id)
}

/// The one notice among `notes` addressed to the user `user_id`.
fn the_one_for(notes: &[notification::Model], user_id: i64) -> notification::Model {
    let theirs: Vec<_> = notes
        .iter()
        .filter(|n| n.user_id == Some(user_id))
        .collect();
    assert_eq!(theirs.len(), 1, "{notes:?}");
    theirs[0].clone()
}

fn mailbox_key(server_id: i32) -> String {
    format!("microsoft_outlook:mailbox:{server_id}")
}

fn refreshes(env: &Env) -> usize {
    env.idp
        .token_requests()
        .iter()
        .filter(|r| r.grant_type == "refresh_token")
        .count()
}

async fn token_row(app: &TestApp, server_id: i32) -> token::Model {
    token::Entity::find_by_id(server_id)
        .one(&app.db)
        .await
        .expect("query")
        .expect("token row")
}

/// Makes the stored access token look about to expire: the next mail refreshes it first.
async fn expire_soon(app: &TestApp, server_id: i32) {
    token::Entity::update_many()
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(app.clock.now() + chrono::Duration::minutes(1)),
        )
        .filter(token::Column::ServerId.eq(server_id))
        .exec(&app.db)
        .await
        .expect("update");
}

/// Asserts that a waiting mail is still queued, with no attempt spent. The attempt that met the
/// hold writes the hold first and its own outcome (queued again, the attempt given back) just
/// after: that outcome is waited for.
async fn assert_waits(app: &TestApp, id: i64) {
    eventually("the attempt that met the hold to be written", || async {
        row(app, id).await.status != "sending"
    })
    .await;
    let r = row(app, id).await;
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("queued", 0),
        "mail {id} waits without spending an attempt: {r:?}"
    );
}

/// Advances the test clock `minutes` past a held mailbox's probe time and waits for the probe:
/// the mailbox's next probe time is past the new now and none of its mails is in flight.
/// Returns how long until the next probe.
async fn next_probe(app: &TestApp, server_id: i32, minutes: i64) -> chrono::Duration {
    app.clock.advance(chrono::Duration::minutes(minutes));
    let now = app.clock.now();
    let mut until = None;
    for _ in 0..300 {
        let in_flight = in_flight(app, server_id).await;
        until = health(app, server_id).await.and_then(|h| h.until);
        if in_flight == 0 && until.is_some_and(|u| u > now) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    match until.filter(|u| *u > now) {
        Some(u) => u - now,
        None => panic!("gave up waiting: the probe {minutes} minutes on"),
    }
}

/// What the mails waiting on `server_id` say to `viewer` (`None`: nobody in particular).
async fn waiting_words(app: &TestApp, viewer: Option<i64>, server_id: i32) -> String {
    let (ctx, _) = app.module_parts();
    microsoft_outlook::delivery::waiting::waiting_words_for(&ctx, viewer)
        .await
        .remove(&server_id)
        .unwrap_or_default()
}

/// Lets the sweep (every second) and the workers run a few rounds.
async fn a_few_sweeps() {
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
}

/// The text of a page as a reader sees it: tags removed, whitespace collapsed.
fn text_of(page: &str) -> String {
    let mut text = String::with_capacity(page.len());
    let mut in_tag = false;
    for c in page.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn position(smtp: &SmtpServer, message_id: &str) -> Option<usize> {
    smtp.received()
        .iter()
        .position(|m| m.message_id.as_deref() == Some(message_id))
}

/// Alice's own mailbox on a simulated SMTP server started with `config` (allowed by the
/// operator for personal mailboxes), connected; returns the mailing and the mailbox's id.
async fn alices_mailbox(config: SmtpConfig) -> (Mailing, i32) {
    let env = env().await;
    let smtp = SmtpServer::start(SmtpConfig {
        validator: Some(env.idp.smtp_validator()),
        ..config
    })
    .await
    .expect("smtp");
    // The operator allows the simulated server for personal mailboxes.
    let allowed = format!("smtp.office365.com, localhost:{}", smtp.port());
    settings(
        &env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("max_attempts", "1"),
            ("personal_smtp_hosts", allowed.as_str()),
        ],
    )
    .await;
    // Alice's own mailbox, pointed at it and connected.
    let alice = env.app.signed_in(ALICE).await;
    let mine = create_personal(&alice, ALICE.0).await;
    let port = smtp.port().to_string();
    let pem = smtp.ca_pem();
    let (status, page, _) = alice
        .post_form(
            &format!("/microsoft_outlook/servers/{mine}"),
            &[
                ("name", "Personal"),
                ("mailbox", ALICE.0),
                ("smtp_host", "localhost"),
                ("smtp_port", &port),
                ("security", "starttls"),
                ("extra_ca_pem", &pem),
                ("send_as", "mailbox"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    env.idp.sign_in_as(ALICE.0);
    assert_eq!(connect_through(&alice, mine).await.0, StatusCode::SEE_OTHER);
    let contact = crm_host::seed::create_contact(
        &env.app.db,
        "Dana Fabrikam",
        Some("dana@fabrikam.example"),
        None,
        env.app.alice_id,
        false,
    )
    .await
    .expect("contact");
    let m = Mailing {
        env,
        smtp,
        alice,
        contact,
    };
    (m, mine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_behind_an_error_challenge_holds_the_mailbox_until_reconnected() {
    // A server that refuses tokens the Gmail/Dovecot way: 334 <JSON>, then 535 after the
    // client's empty line.
    let (m, mine) = alices_mailbox(SmtpConfig {
        xoauth2_error_challenge: true,
        ..SmtpConfig::default()
    })
    .await;
    let app = &m.env.app;

    // Alice changes her password: the grant is revoked and the stored access token, which the
    // CRM still believes good for an hour, is refused by the server.
    revoke_sign_in(&m.env, ALICE.0);
    let before = refreshes(&m.env);
    let id = queue(&m, "After the password change").await;
    let held = wait_held(app, mine, "grant_dead").await;
    assert!(held.until.is_none(), "only a reconnect ends it: {held:?}");
    a_few_sweeps().await;
    assert_waits(app, id).await;
    assert_eq!(
        refreshes(&m.env) - before,
        1,
        "the refused token is refreshed exactly once, and a dead grant is not hammered"
    );
    let attempts = m.smtp.auth_attempts();
    assert!(
        attempts
            .iter()
            .any(|a| a.challenge_acknowledged == Some(true)
                && a.reply == XOAUTH2_CHALLENGE_FINAL_REPLY),
        "the module answered the error challenge with an empty line: {attempts:?}"
    );
    assert!(
        attempts
            .iter()
            .all(|a| a.challenge_acknowledged != Some(false)),
        "never anything but the empty line after a challenge: {attempts:?}"
    );
    assert_eq!(token_row(app, mine).await.status, "needs_reconnect");
    assert_eq!(m.smtp.received_count(), 0);

    // Only Alice can sign in to her mailbox: she is told, once; the operators are not asked.
    let notes = notifications(app, &mailbox_key(mine)).await;
    let to_operators = notes.iter().filter(|n| n.for_operators).count();
    let to_alice = notes
        .iter()
        .filter(|n| n.user_id == Some(app.alice_id))
        .count();
    assert_eq!((to_operators, to_alice), (0, 1), "{notes:?}");
    assert!(notes.iter().all(|n| n.resolved_at.is_none()));
    let (_, page, _) = m.alice.get("/notifications").await;
    assert!(page.contains("AADSTS50173"), "{page}");

    // Release held mail cannot end it (only a new sign-in can): an operator who posts it
    // anyway is told so, on a page or in JSON, and nothing changes.
    let path = format!("/microsoft_outlook/outbox/release/{mine}");
    let (status, page, _) = m.env.admin.post_form(&path, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    // Her mailbox: only she can connect it, and the operator is not sent to a page that is
    // not theirs.
    assert!(page.contains("only its owner can connect it"), "{page}");
    assert!(
        !page.contains(&format!(r#"href="/microsoft_outlook/servers/{mine}""#)),
        "{page}"
    );
    let (status, answer) = m.env.admin.post_json(&path, &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer.to_string().contains("My mailbox"), "{answer}");
    a_few_sweeps().await;
    assert_waits(app, id).await;
    wait_held(app, mine, "grant_dead").await;
    assert_eq!(refreshes(&m.env) - before, 1, "nothing tried");
    assert!(events_of(&history_of(&m.env, id).await, "released").is_empty());

    // She connects again: the waiting mail goes out and the incident is resolved.
    assert_eq!(
        connect_through(&m.alice, mine).await.0,
        StatusCode::SEE_OTHER
    );
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    assert_eq!(m.smtp.count_by_message_id().get(&sent.message_id), Some(&1));
    wait_ready(app, mine).await;
    // Its history says who ended the wait, and how.
    let history = history_of(&m.env, id).await;
    let ended = events_of(&history, "hold_ended");
    assert!(
        ended.len() == 1 && ended[0].ends_with("connected the mailbox again"),
        "{history}"
    );
    let notes = notifications(app, &mailbox_key(mine)).await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes.iter().all(|n| n.resolved_at.is_some()),
        "resolved: {notes:?}"
    );
    let (_, page, _) = m.alice.get("/notifications").await;
    assert!(page.contains("Resolved"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_mailboxs_dead_grant_is_the_operators_to_reconnect_and_release_cannot_end_it() {
    let (m, id) = held_by_a_revoked_sign_in("Waits for a reconnect").await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    assert_waits(app, id).await;

    // The operators read it as theirs: reconnect, no Release held mail (it cannot help).
    let server_page = format!("/microsoft_outlook/servers/{server_id}");
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(page.contains("Reconnect"), "{page}");
    assert!(!page.contains("Release held mail"), "{page}");
    let mail_page = format!("/microsoft_outlook/outbox/{id}");
    let (_, page, _) = m.env.admin.get(&mail_page).await;
    let text = text_of(&page);
    assert!(text.contains("Held: Reconnect needed"), "{text}");
    assert!(
        text.contains("an operator, on the mail server's page, for a shared mailbox")
            && text.contains("click Reconnect"),
        "{text}"
    );
    assert!(page.contains(&format!(r#"href="{server_page}""#)), "{page}");
    assert!(!text.contains("Release held mail"), "{text}");
    let (_, list, _) = m.env.admin.get("/microsoft_outlook/outbox").await;
    let list = text_of(&list);
    assert!(
        list.contains("Only a new sign-in ends this hold: click Reconnect"),
        "{list}"
    );
    assert!(!list.contains("Release held mail"), "{list}");
    // Its author reads that it waits and that the operators were told; nothing to do.
    let (_, page, _) = m.alice.get(&mail_page).await;
    let text = text_of(&page);
    assert!(text.contains("operators"), "{text}");
    assert!(
        !text.contains("yours to fix") && !text.contains("Reconnect"),
        "{text}"
    );

    // A Release held mail posted anyway is refused in words, and changes nothing.
    let reconnect = "only connecting it ends it";
    crate::helpers::release_is_refused(&m.env.admin, server_id, reconnect).await;
    a_few_sweeps().await;
    assert_waits(app, id).await;
    wait_held(app, server_id, "grant_dead").await;
    assert_eq!(m.smtp.received_count(), 0);

    // The operator connects it again: the mail goes out, and its history says who ended
    // the wait.
    let (status, _, _) = connect_through(&m.env.admin, server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_status(app, id, "sent").await;
    let history = history_of(&m.env, id).await;
    let ended = events_of(&history, "hold_ended");
    assert!(
        ended.len() == 1 && ended[0].ends_with("connected the mailbox again"),
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_who_cancels_their_last_waiting_mail_is_no_longer_told_it_waits() {
    let (m, first) = held_by_a_revoked_sign_in("Cancelled first").await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    let second = queue(&m, "Cancelled last").await;
    let key = mailbox_key(server_id);
    let alices_open = || async {
        notifications(app, &key)
            .await
            .into_iter()
            .filter(|n| n.user_id == Some(app.alice_id) && n.resolved_at.is_none())
            .count()
    };
    eventually("Alice to be told her mail waits", || async {
        alices_open().await == 1
    })
    .await;
    let cancel = |id: i64| {
        let alice = &m.alice;
        async move {
            let path = format!("/microsoft_outlook/outbox/{id}/cancel");
            let (status, _) = alice.post_json(&path, &serde_json::json!({})).await;
            assert_eq!(status, StatusCode::OK);
        }
    };
    // One of her mails still waits: the notice stands, open in her inbox.
    cancel(first).await;
    assert_eq!(alices_open().await, 1);
    let (_, page, _) = m.alice.get("/notifications").await;
    assert!(!page.contains("Resolved ("), "{page}");
    // Her last one: the hold no longer concerns her; the operators' notice stays, and so
    // does the hold.
    cancel(second).await;
    assert_eq!(alices_open().await, 0);
    let operators = operator_notifications(app, &key).await;
    assert!(
        operators.len() == 1 && operators[0].resolved_at.is_none(),
        "{operators:?}"
    );
    wait_held(app, server_id, "grant_dead").await;
    // Her inbox folds it away with what is resolved.
    let (_, page, _) = m.alice.get("/notifications").await;
    assert!(page.contains("Resolved (1): nothing left to do"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_who_cancels_their_waiting_mail_is_still_asked_to_reconnect() {
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;
    revoke_sign_in(&m.env, ALICE.0);
    let id = queue(&m, "Cancelled by its owner").await;
    wait_held(app, mine, "grant_dead").await;
    let open = || async {
        notifications(app, &mailbox_key(mine))
            .await
            .into_iter()
            .filter(|n| n.user_id == Some(app.alice_id) && n.resolved_at.is_none())
            .count()
    };
    assert_eq!(open().await, 1, "she is asked to reconnect");
    let path = format!("/microsoft_outlook/outbox/{id}/cancel");
    let (status, _) = m.alice.post_json(&path, &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row(app, id).await.status, "cancelled");
    // Her mailbox still needs her: the notice that asks her stands.
    assert_eq!(open().await, 1, "still asked to reconnect");
    wait_held(app, mine, "grant_dead").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_xoauth2_data_holds_the_mailbox_and_no_mail_fails() {
    let m = mailing().await;
    let app = &m.env.app;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "501 5.5.124 Invalid XOAUTH2 auth data".into(),
        },
        20,
    );
    let ids = [
        queue(&m, "One").await,
        queue(&m, "Two").await,
        queue(&m, "Three").await,
    ];
    let held = wait_held(app, m.env.server_id, "token_refused").await;
    assert!(
        held.detail.unwrap_or_default().contains("5.5.124"),
        "the reply is named"
    );
    a_few_sweeps().await;
    for id in ids {
        assert_waits(app, id).await;
    }
    assert_eq!(m.smtp.received_count(), 0);
    let notes = operator_notifications(app, &mailbox_key(m.env.server_id)).await;
    assert_eq!(notes.len(), 1, "operators told once: {notes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sending_quota_holds_the_mailbox_for_a_day_then_mail_goes_out() {
    let m = mailing().await;
    let app = &m.env.app;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::EndOfData,
            reply: "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception".into(),
        },
        1,
    );
    let first = queue(&m, "Over the quota").await;
    let held = wait_held(app, m.env.server_id, "quota_exceeded").await;
    let until = held.until.expect("a quota hold ends by itself");
    let expected = app.clock.now() + chrono::Duration::hours(24);
    assert!(
        (until - expected).num_seconds().abs() < 120,
        "until {until}, expected about {expected}"
    );
    let second = queue(&m, "Also waits").await;
    a_few_sweeps().await;
    assert_waits(app, first).await;
    assert_waits(app, second).await;
    assert_eq!(m.smtp.received_count(), 0);
    let notes = operator_notifications(app, &mailbox_key(m.env.server_id)).await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].for_operators);
    assert!(notes[0].body.contains("10,000 recipients"), "{notes:?}");
    // Nothing is to be fixed: everyone reads that it goes by itself, nobody "once fixed" or
    // that the operators will fix it.
    let all = notifications(app, &mailbox_key(m.env.server_id)).await;
    let authors = the_one_for(&all, app.alice_id);
    let (_, mail) = m
        .alice
        .get_json(&format!("/microsoft_outlook/outbox/{first}"))
        .await;
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    let alices_words = mail["mail"]["last_error"].as_str().unwrap_or_default();
    let (_, as_operator) = m
        .env
        .admin
        .get_json(&format!("/microsoft_outlook/outbox/{first}"))
        .await;
    let operators_waiting = as_operator["mail"]["waiting"].as_str().unwrap_or_default();
    for words in [
        notes[0].body.as_str(),
        authors.body.as_str(),
        alices_words,
        operators_waiting,
        &text_of(&page),
    ] {
        assert!(
            words.contains("by itself") || words.contains("by themselves"),
            "{words}"
        );
        assert!(
            !words.contains("once this is fixed")
                && !words.contains("will fix it")
                && !words.contains("yours to fix"),
            "{words}"
        );
    }

    // A day later the first mail is the probe: it goes out, then the other one; the hold ends.
    app.clock
        .advance(chrono::Duration::hours(24) + chrono::Duration::minutes(1));
    wait_status(app, first, "sent").await;
    wait_status(app, second, "sent").await;
    wait_ready(app, m.env.server_id).await;
    let a = position(&m.smtp, &row(app, first).await.message_id);
    let b = position(&m.smtp, &row(app, second).await.message_id);
    assert!(a < b, "queue order: {a:?} then {b:?}");
    eventually("the notification to be resolved", || async {
        operator_notifications(app, &mailbox_key(m.env.server_id))
            .await
            .iter()
            .all(|n| n.resolved_at.is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_hold_keeps_only_the_newest_stops_in_the_probe_mails_history() {
    use microsoft_outlook::entities::outbox;
    use microsoft_outlook::outbox::history::{WAITED, WAITED_KEPT, attempts};
    // A real hold writes the mail's first stop; a long hold's probes (every 15 minutes, for
    // days) write one more each, as the drains write them.
    let (m, id) = held_by_a_revoked_sign_in("Waits through many probes").await;
    let app = &m.env.app;
    let (ctx, shared) = app.module_parts();
    let kept = WAITED_KEPT as usize;
    for probe in 1..=kept + 2 {
        app.clock.advance(chrono::Duration::minutes(15));
        let mail = outbox::Entity::find_by_id(id)
            .one(&app.db)
            .await
            .expect("query")
            .expect("mail");
        let reply = format!("535 5.7.139 probe {probe}");
        let turn = shared.write_gate(&ctx).await;
        attempts(
            turn.db(),
            app.clock.now(),
            WAITED,
            &[mail],
            (Some(&reply), Some("SMTP AUTH is disabled.")),
        )
        .await
        .expect("stop written");
    }
    let history = history_of(&m.env, id).await;
    let replies: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .filter(|e| e["kind"] == "waited")
        .map(|e| e["reply"].as_str().unwrap_or_default())
        .collect();
    // The newest kept, in order: probes 3 to 22 (the hold's own stop and probes 1–2 gone).
    let newest: Vec<String> = (3..=kept + 2)
        .map(|p| format!("535 5.7.139 probe {p}"))
        .collect();
    assert_eq!(replies, newest, "{history}");
    assert_eq!(history[0]["kind"], "queued", "{history}");
    assert_waits(app, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_outcome_of_a_drain_that_lost_its_claim_changes_nothing_and_tells_nothing() {
    use microsoft_outlook::entities::outbox;
    use microsoft_outlook::outbox::record::{Outcome, record};
    use sea_orm::ExprTrait;
    // The mailbox is held, so no drain of the host touches the second mail: the test plays
    // the drains.
    let (m, _) = held_by_a_revoked_sign_in("Meets the hold").await;
    let app = &m.env.app;
    let (ctx, shared) = app.module_parts();
    let id = queue(&m, "Claimed twice").await;
    let claim = |owner: &'static str| async move {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::Status, Expr::value("sending"))
            .col_expr(outbox::Column::LeaseOwner, Expr::value(owner))
            .col_expr(
                outbox::Column::Attempts,
                Expr::col(outbox::Column::Attempts).add(1),
            )
            .filter(outbox::Column::Id.eq(id))
            .exec(&app.db)
            .await
            .expect("claim");
    };
    let outcome = |status: &'static str, reply: &str| Outcome {
        id,
        status,
        next_attempt_at: (status == "queued").then(|| app.clock.now()),
        last_reply: Some(reply.into()),
        last_error: Some(format!("The server answered {reply}.")),
        uncount: false,
        tried: true,
    };
    // Drain A claims it, loses its claim (the sweep took it over), and drain B claims it.
    claim("drain-a").await;
    claim("drain-b").await;
    // A's outcomes come late, of every kind: none is written, none goes in the history.
    for (status, reply) in [
        ("queued", "451 4.3.0 Late deferral"),
        ("failed", "550 5.1.10 Late refusal"),
        ("sent", "250 2.0.0 Late acceptance"),
    ] {
        let turn = shared.write_gate(&ctx).await;
        record(&ctx, &turn, "drain-a", &[outcome(status, reply)], false)
            .await
            .expect("record");
    }
    let r = row(app, id).await;
    assert_eq!(
        (r.status.as_str(), r.lease_owner.as_deref(), r.last_reply),
        ("sending", Some("drain-b"), None),
        "B's claim stands"
    );
    let history = history_of(&m.env, id).await;
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(1),
        "only queued: {history}"
    );
    // B's outcome is written, with its own history row.
    let turn = shared.write_gate(&ctx).await;
    let reply = "550 5.1.10 RESOLVER.ADR.RecipientNotFound";
    record(&ctx, &turn, "drain-b", &[outcome("failed", reply)], false)
        .await
        .expect("record");
    drop(turn);
    assert_eq!(row(app, id).await.status, "failed");
    let history = history_of(&m.env, id).await;
    let failed = events_of(&history, "failed");
    assert_eq!(failed.len(), 1, "{history}");
    assert!(
        history.to_string().contains("RecipientNotFound"),
        "{history}"
    );
    assert!(!history.to_string().contains("Late"), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_page_from_the_token_endpoint_is_not_a_dead_grant() {
    let m = mailing().await;
    let app = &m.env.app;
    let id_server = m.env.server_id;
    expire_soon(app, id_server).await;
    let before = token_row(app, id_server).await;
    m.env
        .idp
        .fail_next_token_requests(TokenFault::gateway_page(), usize::MAX);
    let id = queue(&m, "Behind a proxy").await;
    let held = wait_held(app, id_server, "token_endpoint_not_oauth").await;
    let detail = held.detail.unwrap_or_default();
    assert!(
        detail.contains("HTTP 400") && detail.contains("HTML"),
        "{detail}"
    );
    a_few_sweeps().await;
    assert_waits(app, id).await;
    let after = token_row(app, id_server).await;
    assert_eq!(after.status, "valid", "the grant is not declared dead");
    assert_eq!(
        after.refresh_token_sealed, before.refresh_token_sealed,
        "the refresh token is kept"
    );
    assert_eq!(after.version, before.version);
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{id_server}"))
        .await;
    for words in ["HTTP 400", "HTML", "proxy"] {
        assert!(page.contains(words), "{words:?} on the server page\n{page}");
    }
    assert!(!page.contains("Held: Reconnect needed"), "{page}");

    // The proxy is fixed; the operator clicks Release held mail.
    m.env.idp.clear_faults();
    let (status, page, _) = m
        .env
        .admin
        .post_form(
            &format!("/microsoft_outlook/servers/{id_server}/retry"),
            &[],
        )
        .await;
    assert!(
        status == StatusCode::SEE_OTHER || status == StatusCode::OK,
        "{status}\n{page}"
    );
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    wait_ready(app, id_server).await;
    // Release held mail is a form of the operator's: without a CSRF token nothing happens.
    let (status, _, _) = m
        .env
        .admin
        .post_raw(
            &format!("/microsoft_outlook/servers/{id_server}/retry"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_token_goes_after_the_334_when_lines_are_limited_to_1000_octets() {
    let m = mailing_with(
        SmtpConfig {
            max_command_line: Some(RFC_COMMAND_LINE_LIMIT),
            ..SmtpConfig::default()
        },
        MAILBOX,
        |env| env.idp.set_access_token_length(Some(2400)),
    )
    .await;
    let id = queue(&m, "A long token").await;
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    assert_eq!(
        m.smtp.long_lines_refused(),
        0,
        "no command line was too long"
    );
    let attempts = m.smtp.auth_attempts();
    let accepted = attempts
        .iter()
        .find(|a| a.reply.starts_with("235"))
        .expect("an accepted AUTH");
    assert!(
        accepted.two_step,
        "the initial response came after the 334: {attempts:?}"
    );
    assert!(accepted.auth_line_octets <= RFC_COMMAND_LINE_LIMIT);
    let received = m.smtp.received().remove(0);
    let raw = String::from_utf8_lossy(received.auth_raw.as_deref().unwrap_or_default()).to_string();
    let bearer = raw
        .split("auth=Bearer ")
        .nth(1)
        .and_then(|r| r.split('\x01').next())
        .unwrap_or_default();
    assert_eq!(bearer.len(), 2400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_as_the_signed_in_upn_when_the_address_is_not_accepted() {
    const UPN: &str = "s.jones@contoso.onmicrosoft.example";
    const SALES: &str = "sales@contoso.example";
    let m = mailing_with(SmtpConfig::default(), SALES, |env| {
        env.idp.add_user(TestUser {
            username: UPN.into(),
            email: Some(SALES.into()),
            oid: "oid-s.jones".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        });
        env.idp.sign_in_as(UPN);
    })
    .await;
    let app = &m.env.app;
    // The simulated server's validator accepts a token only for its own user: the UPN.
    let id = queue(&m, "As the UPN").await;
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1);
    let received = m.smtp.received().remove(0);
    assert_eq!(received.auth_user.as_deref(), Some(UPN));
    let t = token_row(app, m.env.server_id).await;
    assert_eq!(
        t.smtp_user.as_deref(),
        Some(UPN),
        "the identity is remembered"
    );
    assert!(t.signed_in_as.eq_ignore_ascii_case(UPN), "{t:?}");
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(
        text_of(&page).contains(&format!("Authenticates as {UPN}")),
        "{page}"
    );

    // The next mail authenticates as the UPN at once.
    let before = m.smtp.auth_attempts().len();
    let next = queue(&m, "Again").await;
    wait_status(app, next, "sent").await;
    let attempts = m.smtp.auth_attempts();
    assert!(
        attempts[before..]
            .iter()
            .all(|a| a.user.as_deref() == Some(UPN) && a.reply.starts_with("235")),
        "{attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_us_government_tenant_asks_for_the_us_government_outlook_resource() {
    let env = env().await;
    let authority = env.idp.authority_url();
    let save = |cloud: &'static str| {
        let (admin, authority) = (&env.admin, authority.clone());
        async move {
            let (status, page, _) = admin
                .post_form(
                    "/settings/microsoft_outlook",
                    &[
                        ("client_id", CLIENT_ID),
                        ("tenant", "contoso.onmicrosoft.us"),
                        ("authority_url", &authority),
                        ("cloud", cloud),
                    ],
                )
                .await;
            (status, page)
        }
    };
    let (status, page) = save("usgov").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let url = start_connect(&env.admin, env.server_id).await;
    assert_eq!(url.path(), "/contoso.onmicrosoft.us/oauth2/v2.0/authorize");
    let scope = url
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .expect("scope");
    assert!(
        scope
            .split(' ')
            .any(|s| s == "https://outlook.office365.us/SMTP.Send"),
        "{scope}"
    );
    assert!(!scope.contains("outlook.office.com"), "{scope}");
    assert!(scope.split(' ').any(|s| s == "offline_access"), "{scope}");
    // The simulated US Government tenant grants it.
    let callback = authorize(&url).await;
    let (status, page, _) = env.admin.get(&callback).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let t = token_row(&env.app, env.server_id).await;
    assert!(
        t.scopes.contains("https://outlook.office365.us/SMTP.Send"),
        "{t:?}"
    );

    // The global cloud's scope for that tenant: AADSTS500011 in words, and the settings that
    // work stay (the check runs before anything is stored).
    let (status, page) = save("global").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("AADSTS500011"), "{page}");
    assert!(page.contains("another cloud"), "{page}");
    assert!(page.contains("Nothing was saved"), "{page}");
    let url = start_connect(&env.admin, env.server_id).await;
    assert_eq!(url.path(), "/contoso.onmicrosoft.us/oauth2/v2.0/authorize");
    assert!(
        url.query_pairs()
            .any(|(k, v)| k == "scope" && v.contains("https://outlook.office365.us/SMTP.Send")),
        "{url}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_refresh_token_is_refused_and_nothing_is_stored() {
    let env = env().await;
    env.idp.grant_without_offline_access(true);
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert!(status.is_client_error(), "{status}\n{page}");
    assert!(page.contains("offline_access"), "{page}");
    assert!(
        page.contains("hour"),
        "says it would stop within the hour\n{page}"
    );
    assert_eq!(token_rows(&env.app).await, 0, "nothing is stored");
    // With the permission granted, the same connect works.
    env.idp.grant_without_offline_access(false);
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    assert!(
        token_row(&env.app, env.server_id)
            .await
            .refresh_token_sealed
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_secret_holds_mail_until_the_settings_are_saved_then_it_goes_first() {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    // The secret expires in Azure (AADSTS7000222 on the next refresh).
    m.env.idp.register_app(AppRegistration {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        secret_expired: true,
        redirect_uris: vec![REDIRECT.into()],
    });
    expire_soon(app, server_id).await;
    let waiting = queue(&m, "Waits for the secret").await;
    let held = wait_held(app, server_id, "client_credentials").await;
    assert!(
        held.detail.unwrap_or_default().contains("AADSTS7000222"),
        "Microsoft's code is shown"
    );
    a_few_sweeps().await;
    assert_waits(app, waiting).await;
    let key = "microsoft_outlook:settings:client_credentials";
    let notes = notifications(app, key).await;
    let to_operators: Vec<_> = notes.iter().filter(|n| n.for_operators).collect();
    assert_eq!(to_operators.len(), 1, "operators told once: {notes:?}");
    // The author whose mail waits is told too, without being asked to act.
    assert!(
        notes
            .iter()
            .filter(|n| !n.for_operators)
            .all(|n| n.body.contains("nothing is needed from you")),
        "{notes:?}"
    );

    // The settings page, where the notice's link leads, says so above the fields.
    let (_, page, _) = m.env.admin.get("/settings/microsoft_outlook").await;
    assert!(
        page.contains("Microsoft refuses these settings") && page.contains("AADSTS7000222"),
        "{page}"
    );
    // Saving the settings while Microsoft still refuses the secret ends nothing: the mail
    // waits, the hold and its notice stay, and nobody is told a second time.
    settings(
        &m.env,
        &[("mailbox_rate_per_minute", "0"), ("max_attempts", "1")],
    )
    .await;
    a_few_sweeps().await;
    assert_waits(app, waiting).await;
    wait_held(app, server_id, "client_credentials").await;
    let notes = notifications(app, key).await;
    assert!(
        notes.iter().all(|n| n.resolved_at.is_none()),
        "still unresolved: {notes:?}"
    );
    assert_eq!(
        notes.iter().filter(|n| n.for_operators).count(),
        1,
        "operators still told once: {notes:?}"
    );

    // An operator creates a new secret in Azure and saves it in the settings.
    const NEW_SECRET: &str = "Xy9Q~a.fresh.client.secret-value";
    m.env.idp.register_app(AppRegistration {
        client_id: CLIENT_ID.into(),
        client_secret: NEW_SECRET.into(),
        secret_expired: false,
        redirect_uris: vec![REDIRECT.into()],
    });
    settings(
        &m.env,
        &[
            ("client_secret", NEW_SECRET),
            ("mailbox_rate_per_minute", "0"),
            ("max_attempts", "1"),
        ],
    )
    .await;
    let later = queue(&m, "Queued after the save").await;
    wait_status(app, waiting, "sent").await;
    wait_status(app, later, "sent").await;
    // The waiting mail's history says, once and before it was sent, what ended its wait: the
    // save (the refused save did not), or a token refreshed in the background with the new
    // secret before the save's own release ran; the later one never waited.
    let history = history_of(&m.env, waiting).await;
    let kinds: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["queued", "waited", "hold_ended", "sent"],
        "{history}"
    );
    let ended = events_of(&history, "hold_ended");
    assert!(
        ended.len() == 1
            && [
                "Its mailbox's hold ended: the module's settings were saved",
                "Its mailbox's hold ended: Microsoft gave the mailbox a token again",
            ]
            .contains(&ended[0]),
        "{history}; the mail: {:?}; health: {:?}",
        row(app, waiting).await,
        health(app, server_id).await
    );
    assert!(events_of(&history_of(&m.env, later).await, "hold_ended").is_empty());
    let a = position(&m.smtp, &row(app, waiting).await.message_id);
    let b = position(&m.smtp, &row(app, later).await.message_id);
    assert!(
        a.is_some() && a < b,
        "the mail that waited goes first: {a:?} then {b:?}"
    );
    wait_ready(app, server_id).await;
    let (_, page, _) = m.env.admin.get("/settings/microsoft_outlook").await;
    assert!(!page.contains("Microsoft refuses these settings"), "{page}");
    eventually("the settings notification to be resolved", || async {
        notifications(app, key)
            .await
            .iter()
            .all(|n| n.resolved_at.is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_refusals_hold_the_mailbox_and_message_refusals_fail_the_mail() {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    let cases = [
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            "smtp_auth_disabled",
        ),
        (
            Stage::MailFrom,
            "530 5.7.57 Client not authenticated to send mail",
            "no_usable_auth",
        ),
        (
            Stage::MailFrom,
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            "tenant_blocked",
        ),
        (Stage::Auth, "554 5.7.0 Whatever", "token_refused"),
    ];
    for (stage, reply, reason) in cases {
        // A new connection, so that AUTH happens again (the module keeps authenticated ones).
        m.smtp.close_connections().await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let before_refreshes = refreshes(&m.env);
        m.smtp.inject(
            Injected::Reply {
                stage,
                reply: reply.into(),
            },
            20,
        );
        let id = queue(&m, reason).await;
        let held = wait_held(app, server_id, reason).await;
        assert!(
            held.detail.unwrap_or_default().contains(&reply[..9]),
            "{reason}: the reply is named"
        );
        a_few_sweeps().await;
        assert_waits(app, id).await;
        let r = row(app, id).await;
        assert!(
            r.last_reply
                .as_deref()
                .unwrap_or_default()
                .contains(&reply[..9]),
            "{reason}: {r:?}"
        );
        assert_eq!(
            refreshes(&m.env),
            before_refreshes,
            "{reason}: not a token problem, no refresh"
        );
        // Fixed: the hold ends and the mail goes out.
        m.smtp.clear_injections();
        release_forced(&m.env, server_id).await;
        wait_status(app, id, "sent").await;
        wait_ready(app, server_id).await;
        let history = history_of(&m.env, id).await;
        assert_eq!(
            events_of(&history, "released").len(),
            1,
            "{reason}: the release is in its history: {history}"
        );
    }
    let incidents = operator_notifications(app, &mailbox_key(server_id)).await;
    assert_eq!(
        incidents.len(),
        cases.len(),
        "one per incident: {incidents:?}"
    );
    assert!(incidents.iter().all(|n| n.resolved_at.is_some()));

    // A refusal of the message: only that mail fails, the mailbox stays ready.
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::RcptTo,
            reply: "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup".into(),
        },
        1,
    );
    let bad = queue(&m, "Unknown recipient").await;
    let failed = wait_status(app, bad, "failed").await;
    assert_eq!(failed.attempts, 1);
    assert!(
        failed
            .last_reply
            .unwrap_or_default()
            .contains("RecipientNotFound")
    );
    assert!(
        health(app, server_id)
            .await
            .is_none_or(|h| h.state == "ready")
    );
    let next = queue(&m, "Still sending").await;
    wait_status(app, next, "sent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pages_show_a_held_mailbox() {
    let m = mailing().await;
    let app = &m.env.app;
    let (_, list, _) = m.env.admin.get("/microsoft_outlook/servers").await;
    assert!(list.contains("Outlook token validated"), "{list}");
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
        },
        20,
    );
    let id = queue(&m, "Held").await;
    wait_held(app, m.env.server_id, "smtp_auth_disabled").await;
    assert_waits(app, id).await;
    let (_, list, _) = m.env.admin.get("/microsoft_outlook/servers").await;
    assert!(list.contains("Held: SMTP AUTH disabled"), "{list}");
    assert!(!list.contains("Outlook token validated"), "{list}");
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(page.contains("Held: SMTP AUTH disabled"), "{page}");
    assert!(!page.contains("Outlook token validated"), "{page}");
    assert!(page.contains("Release held mail"), "{page}");
    // Alice, whose mail waits, is told once that the operators know: not asked to fix it.
    let alice_notes = notification::Entity::find()
        .filter(notification::Column::UserId.eq(app.alice_id))
        .all(&app.db)
        .await
        .expect("query");
    assert_eq!(alice_notes.len(), 1, "{alice_notes:?}");
    assert!(
        alice_notes[0].body.contains("nothing is needed from you"),
        "{alice_notes:?}"
    );
    assert!(
        !alice_notes[0].body.contains("must enable"),
        "{alice_notes:?}"
    );
    // It asks nothing of her, so it offers no "Fix it".
    assert_eq!(alice_notes[0].link, None, "{alice_notes:?}");
    let (_, inbox, _) = m.alice.get("/notifications").await;
    assert!(inbox.contains("Your mail waits"), "{inbox}");
    assert!(!inbox.contains("Fix it"), "{inbox}");
}

/// The words and the link of each notice of a personal mailbox's hold name something its
/// reader can do and reach: operators are never sent to a server page they cannot open nor
/// asked to sign in to a user's mailbox; its owner reads "you" and is asked only what only
/// they can do; a notice that asks nothing has no "Fix it" link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_mailboxs_hold_tells_each_reader_what_they_can_do_and_where() {
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;

    // The tenant keeps SMTP AUTH off: an administrator's fix.
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
        },
        20,
    );
    let id = queue(&m, "Held by the tenant").await;
    wait_held(app, mine, "smtp_auth_disabled").await;
    let notes = notifications(app, &mailbox_key(mine)).await;
    let ops: Vec<_> = notes.iter().filter(|n| n.for_operators).collect();
    assert_eq!(ops.len(), 1, "{notes:?}");
    let link = ops[0]
        .link
        .clone()
        .expect("the operators' notice has a link");
    assert_eq!(link, format!("/microsoft_outlook/outbox?server={mine}"));
    let (status, page, _) = m.env.admin.get(&link).await;
    assert_eq!(status, StatusCode::OK, "the operator can open it: {page}");
    assert!(page.contains("Release held mail"), "{page}");
    assert!(
        ops[0].body.contains("must enable Authenticated SMTP"),
        "{ops:?}"
    );
    assert!(ops[0].body.contains("Release held mail"), "{ops:?}");
    assert!(!ops[0].body.contains("Retry now"), "{ops:?}");
    assert!(!ops[0].body.contains("server page"), "{ops:?}");
    let alices = [the_one_for(&notes, app.alice_id)];
    assert!(
        alices[0].body.contains("nothing is needed from you"),
        "{alices:?}"
    );
    assert_eq!(alices[0].link, None, "nothing asked, no Fix it: {alices:?}");
    let (_, inbox, _) = m.alice.get("/notifications").await;
    assert!(!inbox.contains("Fix it"), "{inbox}");

    // Alice disconnects her mailbox while her mail waits on it; then SMTP AUTH is enabled
    // and the operator releases the held mail: now only she can connect it again.
    let (status, _, _) = m
        .alice
        .post_form(
            &format!("/microsoft_outlook/servers/{mine}/disconnect"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    m.smtp.clear_injections();
    release_forced(&m.env, mine).await;
    wait_held(app, mine, "grant_dead").await;
    assert_waits(app, id).await;
    let notes: Vec<_> = notifications(app, &mailbox_key(mine))
        .await
        .into_iter()
        .filter(|n| n.resolved_at.is_none())
        .collect();
    assert!(
        notes.iter().all(|n| !n.for_operators),
        "operators cannot reconnect a user's mailbox: {notes:?}"
    );
    let alices = [the_one_for(&notes, app.alice_id)];
    assert_eq!(
        alices[0].link.as_deref(),
        Some("/microsoft_outlook/my-mailbox")
    );
    assert!(alices[0].body.contains("Click Connect"), "{alices:?}");
    assert!(alices[0].body.contains("Only you can"), "{alices:?}");
    assert!(!alices[0].body.contains("server's page"), "{alices:?}");
    let (status, _, _) = m.alice.get("/microsoft_outlook/my-mailbox").await;
    assert!(status.is_success() || status.is_redirection());
    // Her waiting mail says "you" to her, and to the operators that only she can.
    let to_alice = waiting_words(app, Some(app.alice_id), mine).await;
    assert!(
        to_alice.contains("your mailbox must be connected again"),
        "{to_alice}"
    );
    assert!(!to_alice.contains("its owner"), "{to_alice}");
    let to_others = waiting_words(app, None, mine).await;
    assert!(to_others.contains("only its owner"), "{to_others}");
    assert!(
        !to_others.contains("operators have been told"),
        "{to_others}"
    );
    // The pages she reads say the same: her mail's page and the outbox.
    for path in [
        format!("/microsoft_outlook/outbox/{id}"),
        "/microsoft_outlook/outbox".to_string(),
    ] {
        let (_, page, _) = m.alice.get(&path).await;
        assert!(
            page.contains("your mailbox must be connected again"),
            "{path}: {page}"
        );
        assert!(!page.contains("its owner"), "{path}: {page}");
    }
    // The operators' outbox leads from the held mailbox to its mail, not to a page of hers.
    let (_, outbox, _) = m.env.admin.get("/microsoft_outlook/outbox").await;
    assert!(
        outbox.contains(&format!(
            r#"href="/microsoft_outlook/outbox?server={mine}""#
        )),
        "{outbox}"
    );
    assert!(
        !outbox.contains(&format!(r#"href="/microsoft_outlook/servers/{mine}""#)),
        "{outbox}"
    );
}

/// A personal mailbox whose server's certificate the CRM refuses: its connection settings
/// (host, extra CA certificate) are on its owner's page, so the owner is asked to fix them and
/// the operators, who cannot open that page, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_on_a_personal_mailbox_is_its_owners_to_fix() {
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;
    microsoft_outlook::entities::mail_server::Entity::update_many()
        .col_expr(
            microsoft_outlook::entities::mail_server::Column::ExtraCaPem,
            Expr::value(Option::<String>::None),
        )
        .filter(microsoft_outlook::entities::mail_server::Column::Id.eq(mine))
        .exec(&app.db)
        .await
        .expect("server");
    queue(&m, "Untrusted").await;
    wait_held(app, mine, "server_refused").await;
    let notes = notifications(app, &mailbox_key(mine)).await;
    assert!(notes.iter().all(|n| !n.for_operators), "{notes:?}");
    let alices = [the_one_for(&notes, app.alice_id)];
    assert_eq!(
        alices[0].link.as_deref(),
        Some("/microsoft_outlook/my-mailbox")
    );
    assert!(
        alices[0].body.contains("extra CA certificate"),
        "{alices:?}"
    );
    assert!(alices[0].body.contains("Only you can"), "{alices:?}");
    let to_alice = waiting_words(app, Some(app.alice_id), mine).await;
    assert!(to_alice.contains("only you can"), "{to_alice}");
    assert!(!to_alice.contains("administrator"), "{to_alice}");
}

/// A mail server that cannot be reached holds its mailbox: no mail spends an attempt (even with
/// one allowed), one mail probes it again, less often the longer it lasts; the operators are
/// told once, and only when it has lasted 15 minutes; when it answers again, the mail goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_that_cannot_be_reached_holds_the_mailbox_and_tells_operators_only_if_it_lasts()
 {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    m.smtp.close_connections().await;
    m.smtp.inject(Injected::RefuseConnection, usize::MAX);
    let ids = [
        queue(&m, "Waits for the network one").await,
        queue(&m, "Waits for the network two").await,
    ];
    let held = wait_held(app, server_id, "unreachable").await;
    assert!(
        held.detail
            .as_deref()
            .unwrap_or_default()
            .contains("could not be reached"),
        "{held:?}"
    );
    for id in ids {
        assert_waits(app, id).await;
    }
    // The process that met it counts it (its own series: a process cut off from Microsoft
    // while others send shows here even when the others' mail ends the hold).
    let (_, metrics, _) = m.env.admin.get("/metrics").await;
    let met = metrics.lines().find_map(|l| {
        l.strip_prefix(
            "microsoft_outlook_sends_total{rule=\"unreachable\",level=\"mailbox_held\"}",
        )?
        .trim()
        .parse::<f64>()
        .ok()
    });
    assert!(met.is_some_and(|n| n >= 1.0), "{metrics}");
    let key = microsoft_outlook::delivery::health::notification_key(server_id);
    let outage = microsoft_outlook::delivery::health::unreachable_key();
    assert!(
        notifications(app, &key).await.is_empty() && notifications(app, &outage).await.is_empty(),
        "a short outage tells nobody yet"
    );
    // The author reads that it waits and why, that nothing is needed from them, and (not yet
    // told) that the operators are told if it lasts; never the operators' steps.
    // (`waiting`: the mailbox's state now, as each of its mails says it.)
    let authors_words = async || {
        let (_, list) = m
            .alice
            .get_json(&format!(
                "/microsoft_outlook/records/contact/{}/mails",
                m.contact
            ))
            .await;
        let waiting = list[0]["waiting"].as_str().unwrap_or_default().to_string();
        (list.to_string(), waiting)
    };
    let (list, waiting) = authors_words().await;
    assert!(
        waiting.contains("cannot reach Microsoft")
            && waiting.contains("Nothing is needed from you")
            && waiting.contains("told if it lasts"),
        "{waiting}"
    );
    for never in [
        "have been told",
        "proxy",
        "firewall",
        "DNS",
        "The mails wait",
    ] {
        assert!(!list.contains(never), "{never:?} in {list}");
    }
    // Probes meet the same: the first after the retry base, then after as long as it lasted.
    let probe = async |minutes: i64| next_probe(app, server_id, minutes).await;
    // The operator's server page says when they would be told, and that it goes by itself.
    let (_, page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/servers/{server_id}"))
        .await;
    let page = text_of(&page);
    for words in [
        "notified if it lasts 15 minutes",
        "go out in queue order once it answers",
        "2 mail(s) wait.",
    ] {
        assert!(page.contains(words), "{words:?} on the server page: {page}");
    }
    // How the mails wait is said once.
    assert_eq!(page.matches("no attempt").count(), 1, "{page}");
    // When the next probe comes, to the second as the mail pages say times.
    let at = held
        .until
        .expect("a probe time")
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string();
    assert!(
        page.contains(&format!("tried again by itself at {at}")),
        "{at} on the server page: {page}"
    );
    // A waiting mail's page says when its mailbox is tried again.
    let (_, mail_page, _) = m
        .env
        .admin
        .get(&format!("/microsoft_outlook/outbox/{}", ids[1]))
        .await;
    assert!(
        text_of(&mail_page).contains(&format!("it is tried again by itself at {at}")),
        "{at} on the mail's page: {mail_page}"
    );
    let next = probe(1).await;
    assert!(
        next > chrono::Duration::seconds(59) && next < chrono::Duration::minutes(2),
        "paced by how long it lasted: {next}"
    );
    assert!(notifications(app, &key).await.is_empty());
    let next = probe(13).await;
    // 14 minutes: still nobody told, and the next probe comes when it has lasted 15 (it tells).
    assert!(
        next <= chrono::Duration::seconds(61),
        "the probe that tells comes on time: {next}"
    );
    assert!(notifications(app, &key).await.is_empty());
    assert!(notifications(app, &outage).await.is_empty());
    let next = probe(15).await;
    // (PostgreSQL keeps microseconds.)
    assert!(
        (next - chrono::Duration::minutes(15))
            .num_milliseconds()
            .abs()
            < 1,
        "at most every 15 minutes: {next}"
    );
    // 29 minutes: the operators are told, once, in words (one notice for every mailbox
    // that cannot reach Microsoft); the author too.
    let told = operator_notifications(app, &outage).await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].subject.contains("Microsoft cannot be reached"),
        "{told:?}"
    );
    assert!(told[0].body.contains("firewall"), "{told:?}");
    let (list, waiting) = authors_words().await;
    assert!(waiting.contains("have been told"), "{waiting}");
    assert!(!waiting.contains("told if it lasts"), "{waiting}");
    assert!(!list.contains("proxy"), "{list}");
    probe(15).await;
    assert_eq!(
        operator_notifications(app, &outage).await.len(),
        1,
        "told once"
    );
    assert!(operator_notifications(app, &key).await.is_empty());
    assert!(
        !notifications(app, &key).await.is_empty(),
        "the author told too"
    );
    for id in ids {
        assert_waits(app, id).await;
    }
    // The server answers again: the next probe sends, and the rest follows.
    m.smtp.clear_injections();
    app.clock.advance(chrono::Duration::minutes(15));
    for id in ids {
        let sent = wait_status(app, id, "sent").await;
        assert_eq!(sent.attempts, 1, "{sent:?}");
    }
    wait_ready(app, server_id).await;
    // Each mail's history says, once, what ended its wait: the probe (the oldest) that its
    // own going out did, the other that a mail went out.
    let [probe_mail, other] = ids;
    let history = history_of(&m.env, probe_mail).await;
    assert_eq!(
        events_of(&history, "hold_ended"),
        [
            "Its mailbox's hold ended: this mail went out through the mailbox, which showed that it works again"
        ],
        "{history}"
    );
    let history = history_of(&m.env, other).await;
    assert_eq!(
        events_of(&history, "hold_ended"),
        ["Its mailbox's hold ended: a mail went out through the mailbox again"],
        "{history}"
    );
    assert!(
        notifications(app, &key)
            .await
            .iter()
            .chain(notifications(app, &outage).await.iter())
            .all(|n| n.resolved_at.is_some()),
        "the notices are resolved"
    );
}

/// Microsoft's token endpoint away while a mail needs a new token (503, then a 429 with
/// `Retry-After`): the mailbox waits, no mail spends an attempt, and the probe honours
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_away_holds_the_mailbox_and_spends_no_attempt() {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    expire_soon(app, server_id).await;
    m.env
        .idp
        .fail_next_token_requests(TokenFault::ServerError { status: 503 }, usize::MAX);
    let id = queue(&m, "While Microsoft is away").await;
    let held = wait_held(app, server_id, "unreachable").await;
    assert!(
        held.detail
            .as_deref()
            .unwrap_or_default()
            .contains("token endpoint is temporarily unavailable"),
        "{held:?}"
    );
    a_few_sweeps().await;
    assert_waits(app, id).await;
    assert_eq!(token_row(app, server_id).await.status, "valid");
    // It asks to come back in ten minutes: the next probe waits that long.
    m.env.idp.clear_faults();
    m.env.idp.fail_next_token_requests(
        TokenFault::TooManyRequests {
            retry_after_secs: 600,
        },
        usize::MAX,
    );
    app.clock.advance(chrono::Duration::minutes(1));
    let now = app.clock.now();
    eventually("the probe to meet the 429", || async {
        health(app, server_id)
            .await
            .and_then(|h| h.until)
            .is_some_and(|until| until >= now + chrono::Duration::seconds(599))
    })
    .await;
    assert_waits(app, id).await;
    m.env.idp.clear_faults();
    app.clock.advance(chrono::Duration::minutes(11));
    let sent = wait_status(app, id, "sent").await;
    assert_eq!(sent.attempts, 1, "{sent:?}");
    wait_ready(app, server_id).await;
}

/// A mailbox held for a cause of its own (SMTP AUTH disabled) whose probe cannot reach
/// Microsoft stays held for that cause: its words and its incident stay (nobody is told again),
/// only the next probe moves; no mail spends an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_cannot_reach_microsoft_keeps_the_hold_it_probes() {
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    let refused = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.";
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: refused.into(),
        },
        usize::MAX,
    );
    let id = queue(&m, "Held for SMTP AUTH").await;
    let before = wait_held(app, server_id, "smtp_auth_disabled").await;
    let key = microsoft_outlook::delivery::health::notification_key(server_id);
    let told = notifications(app, &key).await.len();
    assert!(told >= 1, "the hold was told");
    // At the probe time, Microsoft's token endpoint is away.
    expire_soon(app, server_id).await;
    m.env
        .idp
        .fail_next_token_requests(TokenFault::ServerError { status: 503 }, usize::MAX);
    let next = next_probe(app, server_id, 16).await;
    assert_waits(app, id).await;
    let refused = m
        .env
        .idp
        .token_requests()
        .iter()
        .filter(|r| r.grant_type == "refresh_token" && r.status == 503)
        .count();
    assert!(refused > 0, "the probe met the token endpoint away");
    let after = health(app, server_id).await.expect("health");
    assert_eq!(
        (after.state.as_str(), after.reason.as_deref()),
        ("held", Some("smtp_auth_disabled")),
        "{after:?}"
    );
    assert_eq!(after.since, before.since, "the same incident");
    assert_eq!(after.detail, before.detail, "its words stay");
    assert!(
        (next - chrono::Duration::minutes(15))
            .num_milliseconds()
            .abs()
            < 1,
        "probed again at its own pace: {next}"
    );
    assert_eq!(
        notifications(app, &key).await.len(),
        told,
        "nobody told again"
    );
    // Back: the next probe meets SMTP AUTH disabled again; still the same incident.
    m.env.idp.clear_faults();
    next_probe(app, server_id, 16).await;
    assert_waits(app, id).await;
    let again = health(app, server_id).await.expect("health");
    assert_eq!(again.since, before.since, "{again:?}");
    assert_eq!(
        notifications(app, &key).await.len(),
        told,
        "nobody told again"
    );
}

/// A personal mailbox that cannot reach Microsoft: once it lasts, its owner is asked only to
/// check their own settings (where they are, with a link), never the network; the operators
/// are told to look at the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_mailbox_that_cannot_be_reached_asks_its_owner_only_about_their_settings() {
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;
    m.smtp.inject(Injected::RefuseConnection, usize::MAX);
    let (notes, alices) = told_once_it_lasted(&m, mine, "From my own mailbox").await;
    assert_eq!(
        alices.link.as_deref(),
        Some("/microsoft_outlook/my-mailbox"),
        "{alices:?}"
    );
    assert!(alices.body.contains("server settings"), "{alices:?}");
    for never in ["proxy", "firewall", "DNS", "Release held mail"] {
        assert!(!alices.body.contains(never), "{never:?} in {alices:?}");
    }
    assert!(notes.iter().all(|n| !n.for_operators), "{notes:?}");
    let operators =
        operator_notifications(app, &microsoft_outlook::delivery::health::unreachable_key()).await;
    assert_eq!(operators.len(), 1, "{operators:?}");
    assert!(operators[0].body.contains("firewall"), "{operators:?}");
    assert!(operators[0].body.contains(ALICE.0), "{operators:?}");
    let to_alice = waiting_words(app, Some(app.alice_id), mine).await;
    assert!(
        to_alice.contains("your mailbox's server settings"),
        "{to_alice}"
    );
    assert!(!to_alice.contains("proxy"), "{to_alice}");
}

/// Alice queues `subject` on her own mailbox `mine`, which cannot reach Microsoft: it is held
/// as unreachable, her mail waits, and it is probed until it has lasted 15 minutes (when people
/// are told). The mailbox's notices, and hers.
async fn told_once_it_lasted(
    m: &Mailing,
    mine: i32,
    subject: &str,
) -> (Vec<notification::Model>, notification::Model) {
    let app = &m.env.app;
    let id = queue(m, subject).await;
    wait_held(app, mine, "unreachable").await;
    assert_waits(app, id).await;
    for minutes in [1, 14, 15] {
        next_probe(app, mine, minutes).await;
    }
    let notes = notifications(app, &mailbox_key(mine)).await;
    let alices = the_one_for(&notes, app.alice_id);
    (notes, alices)
}

/// A personal mailbox whose token cannot be had because Microsoft's token endpoint is away:
/// nothing of the owner's settings can be the cause, so the owner is not asked about them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_mailbox_whose_token_endpoint_is_away_does_not_ask_its_owner_about_settings() {
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;
    expire_soon(app, mine).await;
    m.env
        .idp
        .fail_next_token_requests(TokenFault::ServerError { status: 503 }, usize::MAX);
    let (_, alices) = told_once_it_lasted(&m, mine, "From my own mailbox, token away").await;
    assert!(
        alices.body.contains("operators have been told")
            && !alices.body.contains("server settings"),
        "{alices:?}"
    );
    let to_alice = waiting_words(app, Some(app.alice_id), mine).await;
    assert!(
        to_alice.contains("have been told") && !to_alice.contains("server settings"),
        "{to_alice}"
    );
    let (_, page, _) = m
        .alice
        .get(&format!("/microsoft_outlook/servers/{mine}"))
        .await;
    let page = text_of(&page);
    assert!(
        page.contains("Microsoft cannot be reached")
            && page.contains("operators have been told")
            && !page.contains("server settings here"),
        "{page}"
    );
}

/// The probe of a held mailbox is its oldest mail that is due: an older mail waiting for a
/// retry of its own does not keep a mailbox that answers again from sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_is_the_oldest_due_mail_not_one_waiting_for_its_own_retry() {
    use microsoft_outlook::entities::outbox;
    let m = mailing().await;
    let app = &m.env.app;
    let server_id = m.env.server_id;
    m.smtp.inject(Injected::RefuseConnection, usize::MAX);
    let older = queue(&m, "Retries in an hour").await;
    let newer = queue(&m, "Due with the probe").await;
    wait_held(app, server_id, "unreachable").await;
    assert_waits(app, older).await;
    assert_waits(app, newer).await;
    // The older mail met a retry of its own (as after a 4xx reply to it): due in an hour.
    outbox::Entity::update_many()
        .col_expr(
            outbox::Column::NextAttemptAt,
            Expr::value(app.clock.now() + chrono::Duration::hours(1)),
        )
        .filter(outbox::Column::Id.eq(older))
        .exec(&app.db)
        .await
        .expect("outbox");
    m.smtp.clear_injections();
    app.clock.advance(chrono::Duration::minutes(1));
    // (Without a due probe, nothing would go before the older mail's hour.)
    wait_status(app, newer, "sent").await;
    wait_ready(app, server_id).await;
    // The probe's history says its going out ended the hold, the older mail's that a mail did.
    let ended = async |id| {
        let history = history_of(&m.env, id).await;
        events_of(&history, "hold_ended")
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ended(newer).await,
        [
            "Its mailbox's hold ended: this mail went out through the mailbox, which showed that it works again"
        ]
    );
    assert_eq!(
        ended(older).await,
        ["Its mailbox's hold ended: a mail went out through the mailbox again"]
    );
    // In the order it happened: accepted, then the hold ended by it.
    let history = history_of(&m.env, newer).await;
    let kinds: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default())
        .collect();
    assert!(kinds.ends_with(&["sent", "hold_ended"]), "{history}");
}

/// One outage reaches every mailbox: the operators are told once, whichever mailbox it lasted
/// for first; the notice stays until no mailbox waits on it, and a later outage is told again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_several_mailboxes_is_told_to_the_operators_once() {
    use microsoft_outlook::delivery::classify::{HoldReason, token_unavailable};
    use microsoft_outlook::delivery::health::unreachable_key;
    use microsoft_outlook::entities::mail_server;
    let (m, mine) = alices_mailbox(SmtpConfig::default()).await;
    let app = &m.env.app;
    let (ctx, shared) = app.module_parts();
    let servers = mail_server::Entity::find()
        .filter(mail_server::Column::Id.is_in([m.env.server_id, mine]))
        .all(&app.db)
        .await
        .expect("servers");
    assert_eq!(servers.len(), 2);
    let verdict = token_unavailable("HTTP 503", None);
    // Both meet the token endpoint away, then again 16 minutes later (as their probes do).
    let outage = async || {
        for _ in 0..2 {
            for server in &servers {
                microsoft_outlook::delivery::hold::hold(
                    &ctx,
                    &shared,
                    server,
                    HoldReason::Unreachable,
                    &verdict,
                )
                .await
                .expect("held");
            }
            app.clock.advance(chrono::Duration::minutes(16));
        }
    };
    outage().await;
    let told = operator_notifications(app, &unreachable_key()).await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].body.contains("Other mailboxes"), "{told:?}");
    // One answers again: the others still wait, the notice stays.
    release_forced(&m.env, m.env.server_id).await;
    let told = operator_notifications(app, &unreachable_key()).await;
    assert!(told[0].resolved_at.is_none(), "{told:?}");
    release_forced(&m.env, mine).await;
    let told = operator_notifications(app, &unreachable_key()).await;
    assert!(told[0].resolved_at.is_some(), "{told:?}");
    // A later outage is a new incident.
    outage().await;
    let told = operator_notifications(app, &unreachable_key()).await;
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(told.iter().filter(|n| n.resolved_at.is_none()).count(), 1);
    // Both answer again, and meet another cause: the outage is over, its notice resolved (and a
    // later outage would be told again).
    let disabled = microsoft_outlook::delivery::classify::smtp(
        microsoft_outlook::delivery::classify::Observed::Reply {
            stage: microsoft_outlook::delivery::classify::Stage::Auth,
            code: 535,
            text: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        },
        &microsoft_outlook::delivery::classify::Facts::default(),
    );
    for server in &servers {
        let held = microsoft_outlook::delivery::hold::hold(
            &ctx,
            &shared,
            server,
            HoldReason::SmtpAuthDisabled,
            &disabled,
        )
        .await
        .expect("held");
        assert!(held.began);
    }
    let told = operator_notifications(app, &unreachable_key()).await;
    assert!(told.iter().all(|n| n.resolved_at.is_some()), "{told:?}");
}

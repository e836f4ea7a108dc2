//! The operator's console: the outbox page (filters, search, a mail's detail, JSON), its
//! actions (retry, cancel, release a held mailbox, in bulk after a confirmation), the server
//! page's "Test connection" and "Send a test mail", and `GET /metrics`.

use crate::helpers::{ADMIN, BOB, TestApp, eventually};
use crate::send::{Mailing, mailing, queue, row, settings, wait_status};
use crm_sdk::Clock;
use microsoft_outlook::entities::{mailbox_health, token};
use microsoft_simulators::smtp::{Injected, Stage};
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
    let (_, page, _) = m.env.admin.get(&format!("{OUTBOX}/{id}")).await;
    assert!(!page.contains("Release held mail"), "{page}");
}

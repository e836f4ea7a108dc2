//! Sending through Microsoft Graph where SMTP AUTH is off: the same message bytes as SMTP,
//! Graph tokens from the same connection flow, each Graph answer at its level, and no mail
//! sent twice when Graph's answer is lost.

use crate::connect::{Env, MAILBOX, connect_through, env};
use crate::helpers::{Browser, eventually};
use crate::send::{
    Mailing, mailing, mails_path, point_server_at, queue, row, settings, wait_held, wait_status,
};
use crm_sdk::Clock;
use microsoft_outlook::entities::{mailbox_health, outbox_body};
use microsoft_simulators::graph::{GraphFault, GraphServer};
use microsoft_simulators::smtp::{Injected, SmtpConfig, SmtpServer, Stage};
use reqwest::StatusCode;
use sea_orm::EntityTrait;
use serde_json::json;
use std::time::Duration;

struct GraphMailing {
    env: Env,
    graph: GraphServer,
    alice: Browser,
    contact: i64,
}

/// Switches `env`'s server to Graph (the simulated one) and connects it.
async fn to_graph(env: &Env, smtp: &SmtpServer, graph: &GraphServer) {
    point_server_at(env, smtp, &[("transport", "graph")]).await;
    let url = graph.base_url();
    settings(
        env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("graph_url", url.as_str()),
        ],
    )
    .await;
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
}

async fn graph_mailing() -> GraphMailing {
    let env = env().await;
    // An SMTP server only for the form's host and port: a Graph server never connects to it.
    let smtp = SmtpServer::start(SmtpConfig::default())
        .await
        .expect("smtp");
    let graph = GraphServer::start(env.idp.graph_validator())
        .await
        .expect("graph");
    to_graph(&env, &smtp, &graph).await;
    let (contact, alice) = crate::send::dana_and_alice(&env).await;
    GraphMailing {
        env,
        graph,
        alice,
        contact,
    }
}

async fn queue_graph(m: &GraphMailing, subject: &str) -> i64 {
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "Dana <dana@fabrikam.example>", "subject": subject, "markdown_body": "Hello **Dana**",
                    "attachments": [{"filename": "Préavis.pdf", "content_base64": "JVBERi0xLjcKJeLjz9MK"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_i64().expect("id")
}

fn advance(m: &GraphMailing, secs: i64) {
    m.env.app.clock.advance(chrono::Duration::seconds(secs));
}

/// The mail `id` once an attempt gave it back to the queue (queued, with the reason kept).
async fn wait_tried(m: &GraphMailing, id: i64) -> microsoft_outlook::entities::outbox::Model {
    let app = &m.env.app;
    eventually(
        &format!("mail {id} to be queued again after an attempt"),
        || async {
            let r = row(app, id).await;
            r.status == "queued" && r.attempts >= 1 && r.last_error.is_some()
        },
    )
    .await;
    row(app, id).await
}

async fn health_state(m: &GraphMailing) -> Option<(String, Option<String>)> {
    mailbox_health::Entity::find_by_id(m.env.server_id)
        .one(&m.env.app.db)
        .await
        .expect("query")
        .map(|h| (h.state, h.reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_over_graph_carries_the_bytes_smtp_would_send() {
    let m = graph_mailing().await;
    // The connect flow asked for Graph's scopes, and the token is Graph's.
    let requests = m.env.idp.token_requests();
    let code = requests
        .iter()
        .rev()
        .find(|r| r.grant_type == "authorization_code")
        .expect("a code exchange");
    let scope = code.scope.clone().unwrap_or_default();
    assert!(
        scope.contains("https://graph.microsoft.com/Mail.Send"),
        "{scope}"
    );
    assert!(
        !scope.contains("SMTP.Send"),
        "one resource per token: {scope}"
    );
    let id = queue_graph(&m, "Through Graph").await;
    let mail = wait_status(&m.env.app, id, "sent").await;
    let sent = m.graph.sent_items(MAILBOX);
    assert_eq!(sent.len(), 1);
    let stored = outbox_body::Entity::find_by_id(id)
        .one(&m.env.app.db)
        .await
        .expect("query")
        .expect("the text is kept");
    assert!(
        sent[0].mime == stored.raw.as_bytes(),
        "Graph got the very RFC 5322 bytes the SMTP path sends"
    );
    assert_eq!(
        sent[0].internet_message_id.as_deref(),
        Some(mail.message_id.as_str())
    );
    assert_eq!(mail.last_reply.as_deref(), Some("202 Accepted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_answers_land_at_their_level() {
    let m = graph_mailing().await;
    // 400 ErrorInvalidRecipients: this mail fails; the mailbox stays ready.
    m.graph.inject(GraphFault::InvalidRecipients, 1);
    let id = queue_graph(&m, "Bad recipients").await;
    let failed = wait_status(&m.env.app, id, "failed").await;
    assert!(
        failed
            .last_error
            .unwrap_or_default()
            .contains("ErrorInvalidRecipients"),
        "the reply is kept"
    );
    assert_ne!(health_state(&m).await.map(|h| h.0).as_deref(), Some("held"));
    // 503: the mail is tried again later and goes out.
    m.graph.inject(GraphFault::ServiceUnavailable, 1);
    let id = queue_graph(&m, "Graph busy").await;
    let again = wait_tried(&m, id).await;
    assert_eq!(again.attempts, 1);
    advance(&m, 3600);
    wait_status(&m.env.app, id, "sent").await;
    // 401 InvalidAuthenticationToken: refreshed once, then sent.
    let refreshes = |m: &GraphMailing| {
        m.env
            .idp
            .token_requests()
            .iter()
            .filter(|r| r.grant_type == "refresh_token")
            .count()
    };
    let before = refreshes(&m);
    m.graph.inject(GraphFault::TokenExpired, 1);
    let id = queue_graph(&m, "Stale token").await;
    wait_status(&m.env.app, id, "sent").await;
    assert_eq!(refreshes(&m), before + 1);
    // 403 ErrorAccessDenied: the mailbox is held, the mail waits without spending attempts.
    m.graph.inject(GraphFault::AccessDenied, 1);
    let id = queue_graph(&m, "Denied").await;
    wait_held(&m.env.app, m.env.server_id, "graph_access_denied").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!((waiting.status.as_str(), waiting.attempts), ("queued", 0));
    assert!(
        waiting.last_error.unwrap_or_default().contains("Mail.Send"),
        "the admin step in words"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_429_is_honoured_and_a_mailbox_that_is_not_exchange_online_is_held() {
    let m = graph_mailing().await;
    m.graph.inject(
        GraphFault::Throttled {
            retry_after_secs: 120,
        },
        1,
    );
    let id = queue_graph(&m, "Throttled").await;
    let app = &m.env.app;
    eventually("the mailbox to be throttled", || async {
        health_state(&m).await.map(|h| h.0).as_deref() == Some("throttled")
    })
    .await;
    let waiting = wait_status(app, id, "queued").await;
    assert_eq!(waiting.attempts, 0, "a throttle spends no attempt");
    assert!(
        waiting.next_attempt_at >= app.clock.now() + chrono::Duration::seconds(100),
        "Retry-After (120 s) is honoured"
    );
    advance(&m, 121);
    wait_status(app, id, "sent").await;
    m.graph.inject(GraphFault::MailboxNotEnabledForRestApi, 1);
    let id = queue_graph(&m, "Not Exchange Online").await;
    wait_held(app, m.env.server_id, "not_exchange_online").await;
    assert_eq!(row(app, id).await.status, "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_graph_took_without_answering_is_found_in_sent_items_not_sent_twice() {
    let m = graph_mailing().await;
    m.graph.inject(
        GraphFault::TimeoutAfterAccepting {
            hold: Duration::from_millis(300),
        },
        1,
    );
    let id = queue_graph(&m, "Lost answer").await;
    let unknown = wait_tried(&m, id).await;
    assert_eq!(unknown.attempts, 1);
    assert!(
        unknown
            .last_error
            .unwrap_or_default()
            .contains("Sent Items"),
        "the author is told it is checked before sending again"
    );
    advance(&m, 3600);
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert!(
        sent.last_reply.unwrap_or_default().contains("Sent Items"),
        "recorded as sent from Sent Items"
    );
    let counts = m.graph.count_by_message_id();
    assert_eq!(counts.get(&sent.message_id), Some(&1), "sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_held_for_smtp_auth_disabled_switched_to_graph_sends_its_waiting_mail() {
    let Mailing {
        env,
        smtp,
        alice,
        contact,
    } = mailing().await;
    smtp.inject(Injected::Reply { stage: Stage::Auth, reply: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.".into() }, 10);
    let m = Mailing {
        env,
        smtp,
        alice,
        contact,
    };
    let id = queue(&m, "Waits for Graph").await;
    wait_held(&m.env.app, m.env.server_id, "smtp_auth_disabled").await;
    let graph = GraphServer::start(m.env.idp.graph_validator())
        .await
        .expect("graph");
    let url = graph.base_url();
    settings(
        &m.env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("graph_url", url.as_str()),
        ],
    )
    .await;
    // The held server's page offers the switch; one click starts the sign-in that grants
    // Graph's permissions, and the server switches when it completes.
    let server_page = format!("/microsoft_outlook/servers/{}", m.env.server_id);
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(
        page.contains("Switch this server to Microsoft Graph"),
        "{page}"
    );
    let server_id = m.env.server_id.to_string();
    let switch = [("server", server_id.as_str()), ("switch_to", "graph")];
    let transport = || async {
        microsoft_outlook::entities::mail_server::Entity::find_by_id(m.env.server_id)
            .one(&m.env.app.db)
            .await
            .expect("query")
            .expect("server")
            .transport
    };
    // Abandoned at Microsoft (the tab closed), then declined there: the server stays as it
    // was, its page still offers the switch, and its mail still waits for it.
    // Declined, or refused for want of consent to Mail.Send (the likeliest at a switch).
    let refusals = [
        None,
        Some((
            "access_denied",
            "AADSTS65004: User declined to consent to access the app.",
        )),
        Some((
            "consent_required",
            "AADSTS65001: The user or administrator has not consented to use the application.",
        )),
    ];
    for refusal in refusals {
        let (status, _, location) = m
            .env
            .admin
            .post_form("/microsoft_outlook/connect", &switch)
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        if let Some((error, description)) = refusal {
            m.env
                .idp
                .set_authorize_mode(microsoft_simulators::identity::AuthorizeMode::Deny {
                    error: error.into(),
                    description: description.into(),
                });
            let url = url::Url::parse(&location.expect("Location")).expect("url");
            let callback = crate::connect::authorize(&url).await;
            let (_, page, _) = m.env.admin.get(&callback).await;
            assert!(page.contains(&description[..12]), "{page}");
            // The page says what stands: the server was not switched, and to try the switch
            // again (not Connect, which would sign in for SMTP).
            assert!(
                page.contains("The server was not switched to Microsoft Graph")
                    && page.contains("still sends by SMTP")
                    && page.contains("lick Switch this server to Microsoft Graph"),
                "{page}"
            );
            assert!(!page.contains("lick Connect"), "{page}");
            m.env
                .idp
                .set_authorize_mode(microsoft_simulators::identity::AuthorizeMode::AutoApprove);
        }
        assert_eq!(transport().await, "smtp", "{refusal:?}");
        let (_, page, _) = m.env.admin.get(&server_page).await;
        assert!(
            page.contains("Switch this server to Microsoft Graph"),
            "{page}"
        );
        wait_held(&m.env.app, m.env.server_id, "smtp_auth_disabled").await;
        assert_eq!(row(&m.env.app, id).await.status, "queued");
    }
    let (status, page, location) = m
        .env
        .admin
        .post_form("/microsoft_outlook/connect", &switch)
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    assert_eq!(
        transport().await,
        "smtp",
        "not before the sign-in completes"
    );
    let authorize_url = url::Url::parse(&location.expect("Location")).expect("url");
    let scope: String = authorize_url
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    assert!(
        scope.contains("https://graph.microsoft.com/Mail.Send"),
        "{scope}"
    );
    let callback = crate::connect::authorize(&authorize_url).await;
    let (status, page, location) = m.env.admin.get(&callback).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    assert_eq!(transport().await, "graph");
    let (_, page, _) = m.env.admin.get(&location.expect("Location")).await;
    assert!(
        page.contains("Switched: this server now sends through Microsoft Graph"),
        "{page}"
    );
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 1, "the hold spent no attempt");
    assert_eq!(graph.sent_items(MAILBOX).len(), 1);
    assert_eq!(m.smtp.received_count(), 0);
    let (_, detail) = m
        .env
        .admin
        .get_json(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    assert!(
        detail["history"]
            .to_string()
            .contains("changed how the mailbox sends"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_over_graphs_request_limit_goes_as_a_draft_with_an_upload_session() {
    use base64::Engine;
    let m = graph_mailing().await;
    let big: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let small = b"Terms and conditions".to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "The scans", "markdown_body": "Ten megabytes of scans.",
                    "attachments": [
                        {"filename": "Scans März.pdf", "content_type": "application/pdf", "content_base64": b64(&big)},
                        {"filename": "terms.txt", "content_base64": b64(&small)},
                    ]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    let mail = wait_status(&m.env.app, id, "sent").await;
    let sent = m.graph.sent_items(MAILBOX);
    assert_eq!(sent.len(), 1);
    let item = &sent[0];
    assert_eq!(item.via, microsoft_simulators::graph::SendPath::DraftSend);
    assert_eq!(
        item.internet_message_id.as_deref(),
        Some(mail.message_id.as_str()),
        "the draft keeps the Message-ID"
    );
    let files: Vec<(&str, &[u8])> = item
        .attachments
        .iter()
        .map(|(name, _, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    assert_eq!(
        files.len(),
        2,
        "{:?}",
        files.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    assert!(
        files.contains(&("Scans März.pdf", big.as_slice())),
        "the 10 MB file, byte for byte"
    );
    assert!(files.contains(&("terms.txt", small.as_slice())));
    assert!(
        m.graph
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/attachments/createUploadSession")),
        "the 10 MB file went through an upload session"
    );
    let text = String::from_utf8_lossy(&item.mime).to_string();
    assert!(
        text.contains("Ten megabytes of scans."),
        "the draft carries the text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcc_recipients_reach_graph_which_reads_them_from_the_message() {
    let m = graph_mailing().await;
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "bcc": "boss@contoso.example", "subject": "With a Bcc", "text_body": "Hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_status(&m.env.app, body["id"].as_i64().expect("id"), "sent").await;
    let sent = m.graph.sent_items(MAILBOX);
    let mime = String::from_utf8_lossy(&sent[0].mime).to_string();
    let head = mime.split("\r\n\r\n").next().unwrap_or_default();
    assert!(head.contains("Bcc: boss@contoso.example"), "{head}");
    assert!(
        !head.contains("Bcc: dana"),
        "To is not repeated in Bcc: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_switched_to_graph_without_a_new_sign_in_waits_for_the_consent() {
    let m = mailing().await;
    let graph = GraphServer::start(m.env.idp.graph_validator())
        .await
        .expect("graph");
    point_server_at(&m.env, &m.smtp, &[("transport", "graph")]).await;
    let url = graph.base_url();
    settings(
        &m.env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("graph_url", url.as_str()),
        ],
    )
    .await;
    // The server's page gives the next step at once, before any mail waits.
    let server_page = format!("/microsoft_outlook/servers/{}", m.env.server_id);
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(
        page.contains("Next step: this server now sends through Microsoft Graph")
            && page.contains("to grant Mail.Send"),
        "{page}"
    );
    // The grant was consented for SMTP.Send only: Microsoft refuses a Graph token from it
    // (AADSTS65001) and the mailbox waits for a new sign-in.
    let id = queue(&m, "Needs Graph consent").await;
    wait_held(&m.env.app, m.env.server_id, "grant_dead").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!((waiting.status.as_str(), waiting.attempts), ("queued", 0));
    assert!(
        waiting.last_error.unwrap_or_default().contains("65001"),
        "Microsoft's code is kept"
    );
    // The author, who is asked nothing, is told in the CRM's words, without Microsoft's
    // description (its trace IDs and its steps for administrators).
    let author = waiting.author_user_id;
    let told_author = || async {
        crm_host::entities::notification::Entity::find()
            .all(&m.env.app.db)
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|n| n.user_id == Some(author))
    };
    eventually("the author to be told the mail waits", || async {
        told_author().await.is_some()
    })
    .await;
    let told = told_author().await.expect("the author's notice");
    // Releasing cannot end a hold that only a new sign-in ends: the operators are not
    // offered it, and are told what does.
    let (_, outbox, _) = m.env.admin.get("/microsoft_outlook/outbox").await;
    assert!(
        outbox.contains("Only a new sign-in ends this hold")
            && !outbox.contains("Release held mail"),
        "{outbox}"
    );
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(!page.contains("Retry now"), "{page}");
    assert!(!page.contains("it is renewed automatically"), "{page}");
    let (_, list, _) = m.env.admin.get("/microsoft_outlook/servers").await;
    assert!(
        list.contains("data-label=\"Sends through\">Microsoft Graph</td>"),
        "{list}"
    );
    assert!(
        told.body.contains("nothing is needed from you"),
        "{}",
        told.body
    );
    assert!(
        !told.body.contains("Trace ID") && !told.body.contains("Microsoft said"),
        "{}",
        told.body
    );
    let (status, page, _) = connect_through(&m.env.admin, m.env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    wait_status(&m.env.app, id, "sent").await;
    assert_eq!(graph.sent_items(MAILBOX).len(), 1);
    assert_eq!(m.smtp.received_count(), 0);
    let (_, page, _) = m.env.admin.get(&server_page).await;
    assert!(!page.contains("Next step: this server now sends"), "{page}");
}

/// The names of a connection test's steps.
fn step_names(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_of_a_graph_server_reads_the_mailbox_and_words_a_refusal() {
    let m = graph_mailing().await;
    let admin = &m.env.admin;
    let test = format!("/microsoft_outlook/servers/{}/test", m.env.server_id);
    let read = format!("GET /v1.0/users/{MAILBOX}/mailFolders/SentItems/messages?$top=1");
    let (status, report) = admin.post_json(&test, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        step_names(&report),
        [
            "Settings",
            "Access token for Microsoft Graph",
            read.as_str()
        ],
        "Graph's steps, not SMTP's"
    );
    let reads: Vec<_> = m
        .graph
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/mailFolders/SentItems/messages"))
        .collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].status, 200);
    assert_eq!(reads[0].mailbox.as_deref(), Some(MAILBOX));
    let (_, page, _) = admin
        .get(&format!("/microsoft_outlook/servers/{}", m.env.server_id))
        .await;
    assert!(page.contains("Sent Items with it; sends nothing"), "{page}");
    let (status, page, _) = admin.post_form(&test, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("Connection OK: Microsoft Graph accepts"),
        "{page}"
    );
    assert!(m.graph.all_sent().is_empty(), "a test sends nothing");

    // Graph denies the mailbox: the status and code, the rule and the table's words.
    m.graph.inject(GraphFault::AccessDenied, 1);
    let (_, page, _) = admin.post_form(&test, &[]).await;
    assert!(page.contains("The connection test failed"), "{page}");
    assert!(page.contains("403 ErrorAccessDenied"), "{page}");
    assert!(page.contains("graph-access-denied"), "{page}");
    assert!(page.contains("Mail.Send.Shared"), "{page}");
    assert_ne!(
        health_state(&m).await.map(|h| h.0).as_deref(),
        Some("held"),
        "a test holds nothing"
    );
    m.graph.inject(GraphFault::AccessDenied, 1);
    let (_, report) = admin.post_json(&test, &json!({})).await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["rule"], "graph-access-denied");
    let last = report["steps"]
        .as_array()
        .and_then(|s| s.last())
        .cloned()
        .expect("a last step");
    assert_eq!(last["ok"], false);
    assert!(
        last["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("403 ErrorAccessDenied: Access is denied"),
        "{last}"
    );

    // A token Graph refuses is refreshed once, as a delivery does, and the test passes.
    m.graph.inject(GraphFault::TokenExpired, 1);
    let (_, report) = admin.post_json(&test, &json!({})).await;
    assert_eq!(report["ok"], true, "{report}");
    let steps = report["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps.len(), 5, "{report}");
    assert!(
        steps[2]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("401 InvalidAuthenticationToken"),
        "{report}"
    );
    assert_eq!(steps[3]["detail"], "refreshed now");

    // A shared server is tested by operators only.
    let (status, _, _) = m.alice.post_form(&test, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_as_denied_fails_the_mail_and_a_full_mailbox_holds_the_mailbox() {
    let m = graph_mailing().await;
    // The server sends as the author (alice@), not as the mailbox: Exchange's Send As refusal
    // is about this mail's From, so this mail fails and the mailbox stays ready.
    m.graph.inject(GraphFault::SendAsDenied, 1);
    let id = queue_graph(&m, "Send As").await;
    let failed = wait_status(&m.env.app, id, "failed").await;
    assert!(
        failed.last_error.unwrap_or_default().contains("Send As"),
        "the admin step in words"
    );
    assert_ne!(health_state(&m).await.map(|h| h.0).as_deref(), Some("held"));
    // ErrorQuotaExceeded: the mailbox is full; its mail waits, spending no attempt.
    m.graph.inject(GraphFault::QuotaExceeded, 1);
    let id = queue_graph(&m, "Mailbox full").await;
    wait_held(&m.env.app, m.env.server_id, "mailbox_full").await;
    let waiting = row(&m.env.app, id).await;
    assert_eq!((waiting.status.as_str(), waiting.attempts), ("queued", 0));
}

/// An attempt that made its draft but got no answer to the draft's `send` leaves the draft in
/// the mailbox (Graph kept nothing else); the next attempt, not finding the mail in Sent Items,
/// deletes that draft before it makes its own. The mail goes out once and Drafts end empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_left_by_an_unanswered_attempt_is_deleted_by_the_next_one() {
    use base64::Engine;
    let m = graph_mailing().await;
    m.graph.inject(GraphFault::DropBeforeAccepting, 1);
    // Over the request limit once in base64: the draft route, its file by an upload session.
    let scan: Vec<u8> = (0..3_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "The scan", "markdown_body": "The scan.",
                    "attachments": [{"filename": "scan.pdf", "content_type": "application/pdf",
                                     "content_base64": base64::engine::general_purpose::STANDARD.encode(&scan)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    let tried = wait_tried(&m, id).await;
    assert_eq!(tried.attempts, 1);
    assert_eq!(
        m.graph.draft_count(MAILBOX),
        1,
        "the unanswered attempt's draft is still in the mailbox"
    );
    assert!(m.graph.sent_items(MAILBOX).is_empty());
    advance(&m, 3600);
    let sent = wait_status(&m.env.app, id, "sent").await;
    assert_eq!(sent.attempts, 2);
    let items = m.graph.sent_items(MAILBOX);
    assert_eq!(items.len(), 1, "sent once");
    assert_eq!(items[0].attachments.len(), 1);
    assert_eq!(m.graph.draft_count(MAILBOX), 0, "no draft is left behind");
}

/// A draft whose `send` Graph refused is deleted at once: the mailbox keeps no draft of a mail
/// that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_whose_send_is_refused_is_deleted() {
    use base64::Engine;
    let m = graph_mailing().await;
    m.graph.inject(GraphFault::InvalidRecipients, 1);
    let scan = vec![7u8; 3_500_000];
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "Refused scan", "text_body": "The scan.",
                    "attachments": [{"filename": "scan.pdf", "content_type": "application/pdf",
                                     "content_base64": base64::engine::general_purpose::STANDARD.encode(&scan)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    let failed = wait_status(&m.env.app, id, "failed").await;
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("recipient"),
        "{:?}",
        failed.last_error
    );
    assert_eq!(m.graph.draft_count(MAILBOX), 0, "the refused draft is gone");
    assert!(m.graph.sent_items(MAILBOX).is_empty());
}

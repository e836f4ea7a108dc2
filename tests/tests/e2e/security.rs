//! The web surface as an attacker probes it: redirect targets, where the server connects for a
//! user, the sign-in throttle, bodies refused unread, security headers, what reaches logs and
//! mail headers, existence oracles, and Connect as a POST.

use crate::connect::{connect_through, create_personal, env, post_connect};
use crate::helpers::{ADMIN, ALICE, BOB, Browser, TestApp, captured_logs, csrf_in, spawn_app};
use crate::send::{mailing, settings, wait_status};
use crm_host::throttle::{ACCOUNT_BURST, ADDRESS_BURST};
use microsoft_outlook::entities::{mail_server, oauth_state, outbox};
use microsoft_simulators::smtp::{Injected, Stage};
use proptest::prelude::*;
use reqwest::StatusCode;
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Posts the sign-in form as a browser does; returns the status and Location.
async fn try_sign_in(
    browser: &Browser,
    email: &str,
    password: &str,
    next: &str,
) -> (StatusCode, Option<String>) {
    let (_, page, _) = browser.get("/login").await;
    let token = csrf_in(&page).expect("login form has a CSRF token");
    let (status, _, location) = browser
        .post_raw(
            "/login",
            &[
                ("email", email),
                ("password", password),
                ("csrf_token", &token),
                ("next", next),
            ],
        )
        .await;
    (status, location)
}

const OFF_SITE: [&str; 8] = [
    "/\t/evil.example",
    "/\n/evil.example",
    "//evil.example",
    "/\\evil.example",
    "https://evil.example/",
    "/.//evil.example",
    "/%2e//evil.example",
    " //evil.example",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_that_leaves_the_site_falls_back_to_the_home_page() {
    let app = spawn_app().await;
    // The example: the sign-in page, a failed sign-in and a good one.
    let browser = app.browser();
    let (_, page, _) = browser.get("/login?next=/%09/evil.example").await;
    assert!(page.contains("name=\"next\" value=\"/\""), "{page}");
    let (status, location) = try_sign_in(&browser, ALICE.0, "wrong", "/\t/evil.example").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/login?error=1&next=%2F"));
    for next in OFF_SITE {
        let browser = app.browser();
        let (status, location) = try_sign_in(&browser, ALICE.0, ALICE.1, next).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(location.as_deref(), Some("/"), "{next:?}");
    }
    // A path on this site is kept, query and all.
    let browser = app.browser();
    let (_, location) = try_sign_in(&browser, ALICE.0, ALICE.1, "/contacts?sort=name").await;
    assert_eq!(location.as_deref(), Some("/contacts?sort=name"));
}

fn redirect_input() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("//".to_string()),
        Just("\\".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2f".to_string()),
        Just("%5c".to_string()),
        Just("%09".to_string()),
        Just(":".to_string()),
        Just("@".to_string()),
        Just("?".to_string()),
        Just("#".to_string()),
        Just("evil.example".to_string()),
        Just("https:".to_string()),
        Just("javascript:".to_string()),
        "[\\t\\n\\r \\x0b\\x0c\\x00]",
        "[a-z0-9]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    /// No input yields a Location that a browser resolves outside the origin.
    #[test]
    fn no_redirect_target_leaves_the_origin(raw in redirect_input()) {
        let target = crm_sdk::redirect::redirect_target(Some(&raw));
        let page = url::Url::parse("https://crm.contoso.example/login?next=x").expect("url");
        let resolved = page.join(&target).expect("a target always resolves");
        prop_assert_eq!(resolved.origin(), page.origin(), "{:?} -> {:?}", raw, target);
        prop_assert!(target.starts_with('/') && !target.starts_with("//"), "{:?}", target);
        prop_assert!(
            !target.chars().any(|c| c.is_control() || c.is_whitespace() || c == '\\'),
            "{:?}",
            target
        );
    }
}

/// Saves the module settings, allowing `hosts` for personal mailboxes.
async fn allow_personal_hosts(env: &crate::connect::Env, hosts: &str) {
    settings(
        env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("personal_smtp_hosts", hosts),
        ],
    )
    .await;
}

fn personal_fields<'a>(host: &'a str, port: &'a str, security: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("name", "Mine"),
        ("mailbox", ALICE.0),
        ("smtp_host", host),
        ("smtp_port", port),
        ("security", security),
        ("send_as", "mailbox"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_choose_where_the_server_connects() {
    let env = env().await;
    let alice = env.app.signed_in(ALICE).await;
    // The example: a loopback listener without TLS.
    let (status, page, _) = alice
        .post_form(
            "/microsoft_outlook/my-mailbox",
            &personal_fields("127.0.0.1", "2525", "none"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        page.contains("only to the SMTP hosts the operator allows"),
        "{page}"
    );
    assert!(page.contains("only operators may choose it"), "{page}");
    // Any other host, another port of the allowed host.
    for (host, port, message) in [
        (
            "smtp.evil.example",
            "587",
            "only to the SMTP hosts the operator allows",
        ),
        (
            "localhost",
            "587",
            "only to the SMTP hosts the operator allows",
        ),
        ("smtp.office365.com", "25", "Port 25 is not allowed"),
    ] {
        let (status, page, _) = alice
            .post_form(
                "/microsoft_outlook/my-mailbox",
                &personal_fields(host, port, "starttls"),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{host}:{port}");
        assert!(page.contains(message), "{host}:{port}: {page}");
    }
    assert_eq!(
        mail_server::Entity::find()
            .count(&env.app.db)
            .await
            .expect("count"),
        1,
        "only the shared server"
    );
    // The cloud's host on 587 or 465 is fine; editing it elsewhere is not.
    let id = create_personal(&alice, ALICE.0).await;
    let (status, page, _) = alice
        .post_form(
            &format!("/microsoft_outlook/servers/{id}"),
            &personal_fields("127.0.0.1", "2525", "starttls"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    // The operator allows a host: the user may use it, still never without TLS.
    allow_personal_hosts(&env, "smtp.office365.com, localhost:2525").await;
    let (status, page, _) = alice
        .post_form(
            &format!("/microsoft_outlook/servers/{id}"),
            &personal_fields("localhost", "2525", "none"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("only operators may choose it"), "{page}");
    let (status, page, _) = alice
        .post_form(
            &format!("/microsoft_outlook/servers/{id}"),
            &personal_fields("localhost", "2525", "starttls"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    // The user's form offers no "none".
    let (_, page, _) = alice.get(&format!("/microsoft_outlook/servers/{id}")).await;
    assert!(!page.contains("option value=\"none\""), "{page}");
    // An operator's list is checked when saved.
    let (status, page, _) = env
        .admin
        .post_form(
            "/settings/microsoft_outlook",
            &[("personal_smtp_hosts", "smtp.example:port")],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_classified_words_of_a_remote_reply_and_a_disallowed_mailbox_is_not_used() {
    let m = mailing().await;
    let port = m.smtp.port().to_string();
    let pem = m.smtp.ca_pem();
    let hosts = format!("localhost:{port}");
    allow_personal_hosts(&m.env, &hosts).await;
    let mut fields = personal_fields("localhost", &port, "starttls");
    fields.push(("extra_ca_pem", &pem));
    let (status, page, location) = m
        .alice
        .post_form("/microsoft_outlook/my-mailbox", &fields)
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let id: i32 = location
        .expect("server page")
        .trim_start_matches("/microsoft_outlook/servers/")
        .split('?')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("id");
    m.env.idp.sign_in_as(ALICE.0);
    let (status, page, _) = connect_through(&m.alice, id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");

    // The remote server's free text stays with operators.
    let remote = "554 5.2.0 <b>whatever the listener says</b> Bearer eyJ-not-for-users";
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::EndOfData,
            reply: remote.into(),
        },
        1,
    );
    let path = format!("/microsoft_outlook/records/contact/{}/mails", m.contact);
    let ok = json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "x"});
    let (status, body) = m.alice.post_json(&path, &ok).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let failed = wait_status(&m.env.app, body["id"].as_i64().expect("id"), "failed").await;
    assert_eq!(failed.server_id, id, "sent through her mailbox");
    let (_, list) = m.alice.get_json(&path).await;
    assert_eq!(list[0]["last_reply"], "554 5.2.0", "{list}");
    let (_, page, _) = m.alice.get(&path).await;
    let (_, panel, _) = m.alice.get(&format!("/contacts/{}", m.contact)).await;
    for shown in [list.to_string(), page, panel] {
        assert!(!shown.contains("whatever the listener says"), "{shown}");
        assert!(!shown.contains("eyJ-not-for-users"), "{shown}");
    }
    let (_, list) = m.env.admin.get_json(&path).await;
    assert!(
        list[0]["last_reply"]
            .as_str()
            .unwrap_or_default()
            .contains("whatever the listener says"),
        "operators see the reply: {list}"
    );

    // The operator narrows the list: her mailbox is no longer used, and she is told why.
    settings(&m.env, &[("mailbox_rate_per_minute", "0")]).await;
    let before = outbox::Entity::find()
        .count(&m.env.app.db)
        .await
        .expect("count");
    let (status, body) = m.alice.post_json(&path, &ok).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["errors"][0]["field"], "server");
    assert_eq!(
        outbox::Entity::find()
            .count(&m.env.app.db)
            .await
            .expect("count"),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_throttled_per_account_and_per_address() {
    let app = spawn_app().await;
    let browser = app.browser();
    // The example: many wrong passwords, then the right one.
    for _ in 0..=ACCOUNT_BURST {
        let (status, location) = try_sign_in(&browser, ALICE.0, "guess", "/").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert!(location.unwrap_or_default().starts_with("/login?error=1"));
    }
    let (status, _) = try_sign_in(&browser, ALICE.0, ALICE.1, "/").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the right password waits too"
    );
    // Unknown accounts are counted (and answered) like known ones.
    for _ in 0..=ACCOUNT_BURST {
        let (status, location) = try_sign_in(&browser, "ghost@contoso.example", "x", "/").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert!(location.unwrap_or_default().starts_with("/login?error=1"));
    }
    let (status, _) = try_sign_in(&browser, "ghost@contoso.example", "x", "/").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another account from this address still signs in...
    let (status, location) = try_sign_in(&app.browser(), BOB.0, BOB.1, "/contacts").await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/contacts"))
    );
    // ...until the address has failed too often, whatever the account.
    for i in 0..ADDRESS_BURST {
        try_sign_in(&browser, &format!("spray{i}@contoso.example"), "x", "/").await;
    }
    let (status, _) = try_sign_in(&app.browser(), BOB.0, BOB.1, "/").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

/// Sends `head` and the first 64 KB of a body that `head` declares much larger; returns what
/// the server answers before the rest is sent (or panics after 10 s).
async fn answer_before_the_body(app: &TestApp, head: &str) -> String {
    let port = app.base.rsplit(':').next().expect("port");
    let mut tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&vec![b'a'; 64 * 1024])
        .await
        .expect("part of the body");
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .expect("the server answered without waiting for the 31 MB body")
        .expect("read");
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_without_a_session_or_a_csrf_header_are_refused_unread() {
    let app = spawn_app().await;
    app.enable_module().await;
    let length = 31 * 1024 * 1024;
    let form = |cookie: &str| {
        format!(
            "POST /microsoft_outlook/records/contact/1/mails HTTP/1.1\r\nHost: crm\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {length}\r\n{cookie}\r\n"
        )
    };
    // The example: anonymous, no cookie at all.
    let answer = answer_before_the_body(&app, &form("")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // Anonymous with the sign-in form's cookie: only a small form is read.
    let answer = answer_before_the_body(&app, &form("Cookie: crm_csrf=abc\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Anonymous with a cookie and a matching header: sent to sign in, the body unread.
    let answer = answer_before_the_body(
        &app,
        &format!(
            "POST /microsoft_outlook/records/contact/1/mails HTTP/1.1\r\nHost: crm\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\
             Cookie: crm_csrf=abc\r\nX-CSRF-Token: abc\r\n\r\n"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert!(answer.contains("/login?next="), "{answer}");
    // Signed in, JSON without the CSRF header.
    let jar = jar_of(&app, ALICE).await;
    let cookies =
        reqwest::cookie::CookieStore::cookies(&*jar, &url::Url::parse(&app.base).expect("url"))
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .expect("session cookie");
    let json = format!(
        "POST /microsoft_outlook/records/contact/1/mails HTTP/1.1\r\nHost: crm\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\nCookie: {cookies}\r\n\r\n"
    );
    let answer = answer_before_the_body(&app, &json).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

/// A cookie jar signed in as `who`.
async fn jar_of(app: &TestApp, who: (&str, &str)) -> std::sync::Arc<reqwest::cookie::Jar> {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let browser = Browser {
        base: app.base.clone(),
        client: reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(std::time::Duration::from_secs(20))
            .build()
            .expect("client"),
    };
    browser.sign_in(who.0, who.1).await;
    jar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_security_headers() {
    let app = spawn_app().await;
    app.enable_module().await;
    let admin = app.signed_in(ADMIN).await;
    let anonymous = app.browser();
    let responses = [
        anonymous.client.get(anonymous.url("/login")).send().await,
        anonymous.client.get(anonymous.url("/health")).send().await,
        anonymous.client.get(anonymous.url("/nowhere")).send().await,
        anonymous.client.post(anonymous.url("/login")).send().await,
        admin
            .client
            .get(admin.url("/microsoft_outlook/servers"))
            .send()
            .await,
    ];
    for response in responses {
        let response = response.expect("answered");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let csp = header("content-security-policy");
        assert!(
            csp.contains("default-src 'self'"),
            "{}: {csp}",
            response.url()
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        // The test host's public URL is https.
        assert!(header("strict-transport-security").starts_with("max-age="));
    }
    // Pages work under the policy: no inline styles or scripts; the stylesheet is a file.
    let (_, page, _) = admin.get("/microsoft_outlook/servers").await;
    let (_, login, _) = anonymous.get("/login").await;
    for html in [&page, &login] {
        assert!(!html.contains("<style") && !html.contains("style=") && !html.contains("<script"));
        assert!(html.contains("href=\"/assets/crm.css\""));
    }
    let css = anonymous
        .client
        .get(anonymous.url("/assets/crm.css"))
        .send()
        .await
        .expect("css");
    assert_eq!(css.status(), StatusCode::OK);
    assert!(
        css.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .starts_with("text/css")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_input_cannot_forge_log_lines_or_reach_headers_with_control_characters() {
    let app = spawn_app().await;
    app.enable_module().await;
    // The example: a sign-in e-mail with a newline and ANSI escapes.
    let forged = "mallory@contoso.example\nFORGED-LINE user_id=1 signed in\u{1b}[2J";
    let (status, _) = try_sign_in(&app.browser(), forged, "x", "/").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let logs = captured_logs();
    assert!(
        logs.contains("mallory@contoso.example"),
        "the attempt is logged"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("FORGED-LINE")),
        "a log line was forged"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "an escape sequence reached the log"
    );

    // Vertical tab, form feed, NUL and the like in any header field; NUL in a body.
    let contact = crm_host::seed::create_contact(
        &app.db,
        "Dana Fabrikam",
        Some("dana@fabrikam.example"),
        None,
        app.alice_id,
        false,
    )
    .await
    .expect("contact");
    let alice = app.signed_in(ALICE).await;
    let path = format!("/microsoft_outlook/records/contact/{contact}/mails");
    let base = json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "Hello"});
    for bad in ["\u{b}", "\u{c}", "\0", "\u{1b}"] {
        for field in ["subject", "to", "cc", "bcc", "reply_to"] {
            let mut body = base.clone();
            let value = match field {
                "subject" => format!("Hi{bad}"),
                _ => format!("Dana{bad} <dana@fabrikam.example>"),
            };
            body[field] = json!(value);
            let (status, answer) = alice.post_json(&path, &body).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{field} {bad:?}: {answer}"
            );
            assert_eq!(answer["errors"][0]["field"], field, "{answer}");
        }
    }
    for field in ["text_body", "html_body"] {
        let mut body = base.clone();
        body[field] = json!("Hello\0world");
        let (status, answer) = alice.post_json(&path, &body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {answer}"
        );
        assert_eq!(answer["errors"][0]["field"], field, "{answer}");
    }
    assert_eq!(
        outbox::Entity::find().count(&app.db).await.expect("count"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yours_and_not_there_answer_the_same_404() {
    let env = env().await;
    let app = &env.app;
    let alice = app.signed_in(ALICE).await;
    let bob = app.signed_in(BOB).await;
    // A hidden record and a missing one, on every mail route.
    let hidden =
        crm_host::seed::create_contact(&app.db, "Hana Private", None, None, app.bob_id, true)
            .await
            .expect("contact");
    let missing = hidden + 1000;
    let ok = json!({"to": "dana@fabrikam.example", "subject": "Hi", "text_body": "x"});
    let mut answers = Vec::new();
    for id in [hidden, missing] {
        let path = format!("/microsoft_outlook/records/contact/{id}/mails");
        let (s1, j1) = alice.get_json(&path).await;
        let (s2, p2, _) = alice.get(&path).await;
        let (s3, j3) = alice.post_json(&path, &ok).await;
        let (s4, p4, _) = alice
            .post_form(
                &path,
                &[
                    ("to", "dana@fabrikam.example"),
                    ("subject", "Hi"),
                    ("text_body", "x"),
                ],
            )
            .await;
        let (s5, _, _) = alice.get(&format!("/contacts/{id}")).await;
        let normalise = |text: String| {
            text.replace(&format!("contact {id}"), "contact ID")
                .replace(&format!("/contacts/{id}\""), "/contacts/ID\"")
        };
        answers.push((
            [s1, s2, s3, s4, s5],
            normalise(j1.to_string()),
            normalise(p2),
            normalise(j3.to_string()),
            normalise(p4),
        ));
    }
    assert_eq!(answers[0].0, [StatusCode::NOT_FOUND; 5]);
    assert_eq!(answers[0], answers[1], "hidden and missing differ");

    // Bob's mailbox, the shared server and a server that does not exist, seen by Alice.
    let bobs = create_personal(&bob, BOB.0).await;
    let mut seen = Vec::new();
    for id in [bobs, env.server_id, 999_999] {
        let base = format!("/microsoft_outlook/servers/{id}");
        let (s1, p1, _) = alice.get(&base).await;
        let (s2, p2, _) = alice.post_form(&base, &[("name", "Mine")]).await;
        let (s3, p3, _) = alice.post_form(&format!("{base}/disconnect"), &[]).await;
        let (s4, p4, _) = alice.post_form(&format!("{base}/delete"), &[]).await;
        let (s5, p5, _) = post_connect(&alice, id).await;
        seen.push(([s1, s2, s3, s4, s5], [p1, p2, p3, p4], p5));
    }
    assert_eq!(seen[0].0, [StatusCode::NOT_FOUND; 5]);
    assert_eq!(
        seen[0], seen[1],
        "another user's mailbox and a shared server look missing"
    );
    assert_eq!(seen[1], seen[2]);
    assert!(
        mail_server::Entity::find_by_id(bobs)
            .one(&app.db)
            .await
            .expect("q")
            .is_some(),
        "nothing happened to Bob's mailbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_a_post_with_a_csrf_token() {
    let env = env().await;
    let states = || async {
        oauth_state::Entity::find()
            .count(&env.app.db)
            .await
            .expect("count")
    };
    // The example: a GET that stored a state row per call.
    let (status, _, _) = env
        .admin
        .get(&format!(
            "/microsoft_outlook/connect?server={}",
            env.server_id
        ))
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // A POST without the token (a cross-site form) changes nothing either.
    let (status, _, _) = env
        .admin
        .post_raw(
            "/microsoft_outlook/connect",
            &[("server", &env.server_id.to_string())],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(states().await, 0);
    // The server page's Connect is a form with the token.
    let (_, page, _) = env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", env.server_id))
        .await;
    assert!(
        page.contains("action=\"/microsoft_outlook/connect\""),
        "{page}"
    );
    assert!(!page.contains("connect?server="), "{page}");
    let (status, _, location) = post_connect(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location.unwrap_or_default().contains("login_hint="));
    assert_eq!(states().await, 1);
}

/// Test connection and test mail on a personal mailbox keep the operator's rule: a host the
/// operator stopped allowing is not connected to, and no test mail is queued through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_test_never_reaches_a_host_the_operator_does_not_allow() {
    let env = env().await;
    allow_personal_hosts(&env, "smtp.office365.com, localhost:2525").await;
    let alice = env.app.signed_in(ALICE).await;
    let id = create_personal(&alice, ALICE.0).await;
    let (status, page, _) = alice
        .post_form(
            &format!("/microsoft_outlook/servers/{id}"),
            &personal_fields("localhost", "2525", "starttls"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    // The operator narrows the list afterwards.
    allow_personal_hosts(&env, "smtp.office365.com").await;
    // The mailbox's page says so before anything is tried.
    let (_, page, _) = alice.get(&format!("/microsoft_outlook/servers/{id}")).await;
    assert!(
        page.contains("This mailbox connects to localhost:2525, which the operator does not allow"),
        "{page}"
    );
    for path in ["test", "test-mail"] {
        let (status, page, _) = alice
            .post_form(&format!("/microsoft_outlook/servers/{id}/{path}"), &[])
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {page}");
        assert!(page.contains("does not allow"), "{path}: {page}");
        assert!(page.contains("Nothing was tried"), "{path}: {page}");
    }
    assert_eq!(
        microsoft_outlook::entities::outbox::Entity::find()
            .count(&env.app.db)
            .await
            .expect("count"),
        0,
        "no test mail was queued"
    );
}

/// A colleague's mail on a shared record: the JSON list gives Bob exactly what the page gives
/// him (its subject and status), not its page, its sender or its failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colleagues_mail_is_the_same_in_the_json_list_as_on_the_page() {
    let m = mailing().await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::EndOfData,
            reply: "554 5.2.0 refused".into(),
        },
        1,
    );
    let path = format!("/microsoft_outlook/records/contact/{}/mails", m.contact);
    let mail = json!({"to": "dana@fabrikam.example", "cc": "fiona@fabrikam.example", "subject": "Private terms", "text_body": "x"});
    let (status, body) = m.alice.post_json(&path, &mail).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    wait_status(&m.env.app, id, "failed").await;
    let url = format!("/microsoft_outlook/outbox/{id}");

    // Alice, the author, sees her mail whole, in both.
    let (_, list) = m.alice.get_json(&path).await;
    assert_eq!(list[0]["url"], url.as_str(), "{list}");
    let error = list[0]["last_error"]
        .as_str()
        .expect("her failure")
        .to_string();
    let (_, page, _) = m.alice.get(&path).await;
    assert!(page.contains(&url) && page.contains(&error), "{page}");

    // Bob sees the subject and the status, and nothing the page does not show him.
    let bob = m.env.app.signed_in(BOB).await;
    let (status, list) = bob.get_json(&path).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let seen = list[0].as_object().expect("a mail");
    let mut keys: Vec<&str> = seen.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "created_at",
            "message_id",
            "status",
            "status_words",
            "subject",
            "updated_at",
            "waiting"
        ],
        "{list}"
    );
    assert_eq!(seen["subject"], "Private terms");
    assert_eq!(seen["status"], "failed");
    let (_, page, _) = bob.get(&path).await;
    for shown in [list.to_string(), page] {
        assert!(!shown.contains(&url), "{shown}");
        // The reply's code and text (not "554" alone: a Message-ID's hex may hold it).
        assert!(!shown.contains("554 5.2.0"), "{shown}");
        assert!(!shown.contains("5.2.0"), "{shown}");
        assert!(!shown.contains(crate::connect::MAILBOX), "{shown}");
        assert!(shown.contains("Private terms"), "{shown}");
    }
    let (status, _, _) = bob.get(&url).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

//! Bad input at the door: arbitrary query strings at the OAuth callback and arbitrary bodies at
//! the queue route never give a 500 or a panic, and never queue a row.

use crate::helpers::{ADMIN, ALICE, spawn_app};
use microsoft_outlook::entities::{outbox, outbox_body};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sea_orm::{EntityTrait, PaginatorTrait};

/// Cases per property; CI runs at least 10,000 in all.
fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

fn query_string() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("code".to_string()),
        Just("state".to_string()),
        Just("error".to_string()),
        Just("error_description".to_string()),
        Just("session_state".to_string()),
        "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        "[ -~]{0,64}",
        any::<String>().prop_map(|s| s.chars().take(80).collect()),
        Just("AADSTS70008: expired".to_string()),
        Just("<script>alert(1)</script>".to_string()),
        Just("%00%ff%".to_string()),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| {
                let v: String = url::form_urlencoded::byte_serialize(v.as_bytes()).collect();
                format!("{k}={v}")
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

fn mail_body() -> impl Strategy<Value = (bool, Vec<u8>)> {
    let address = prop_oneof![
        Just("dana@fabrikam.example".to_string()),
        "[ -~]{0,40}",
        Just("a@b.example\r\nBcc: x@evil.example".to_string()),
        Just("".to_string()),
    ];
    let json = (
        address.clone(),
        "[ -~\r\n]{0,40}",
        "[ -~\r\n]{0,80}",
        any::<bool>(),
    )
        .prop_map(|(to, subject, body, as_list)| {
            let to = if as_list {
                serde_json::json!([to])
            } else {
                serde_json::json!(to)
            };
            serde_json::to_vec(
                &serde_json::json!({"to": to, "subject": subject, "text_body": body}),
            )
            .unwrap_or_default()
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (true, b)),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (false, b)),
        json.prop_map(|b| (true, b)),
        (address, "[ -~]{0,40}").prop_map(|(to, subject)| {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("to", &to)
                .append_pair("subject", &subject)
                .finish();
            (false, body.into_bytes())
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_callbacks_and_bodies_never_500_and_never_queue() {
    let app = spawn_app().await;
    app.enable_module().await;
    let admin = app.signed_in(ADMIN).await;
    let alice = app.signed_in(ALICE).await;
    let csrf = alice.csrf().await;
    // A shared server (never connected: queued mails just wait) so that valid mails do queue.
    let now = chrono::Utc::now();
    sea_orm::ActiveModelTrait::insert(
        microsoft_outlook::entities::mail_server::ActiveModel {
            name: sea_orm::Set("Office 365".into()),
            kind: sea_orm::Set("shared".into()),
            owner_user_id: sea_orm::Set(None),
            smtp_host: sea_orm::Set("smtp.office365.com".into()),
            smtp_port: sea_orm::Set(587),
            security: sea_orm::Set("starttls".into()),
            extra_ca_pem: sea_orm::Set(None),
            mailbox: sea_orm::Set("crm@contoso.example".into()),
            auth: sea_orm::Set("delegated".into()),
            transport: sea_orm::Set("smtp".into()),
            send_as: sea_orm::Set("author".into()),
            from_allow_list: sea_orm::Set(String::new()),
            is_default: sea_orm::Set(true),
            created_at: sea_orm::Set(now),
            updated_at: sea_orm::Set(now),
            ..Default::default()
        },
        &app.db,
    )
    .await
    .expect("server");
    let contact = crm_host::seed::create_contact(
        &app.db,
        "Dana",
        Some("dana@fabrikam.example"),
        None,
        app.alice_id,
        false,
    )
    .await
    .expect("contact");
    let handle = tokio::runtime::Handle::current();

    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let confirm_runs = std::sync::atomic::AtomicU32::new(0);
    let result = tokio::task::block_in_place(|| {
        runner.run(&query_string(), |query| {
            let (status, _, _) =
                handle.block_on(admin.get(&format!("/microsoft_outlook/confirm?{query}")));
            confirm_runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            prop_assert!(
                !status.is_server_error(),
                "confirm?{} gave {}",
                query,
                status
            );
            Ok(())
        })
    });
    result.unwrap_or_else(|e| panic!("{e}"));

    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let path = alice.url(&format!(
        "/microsoft_outlook/records/contact/{contact}/mails"
    ));
    let queue_runs = std::sync::atomic::AtomicU32::new(0);
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let result = tokio::task::block_in_place(|| {
        runner.run(&mail_body(), |(json, body)| {
            let request = alice
                .client
                .post(&path)
                .header("x-csrf-token", &csrf)
                .header(
                    "content-type",
                    if json {
                        "application/json"
                    } else {
                        "application/x-www-form-urlencoded"
                    },
                )
                .body(body.clone());
            let status = handle
                .block_on(async { request.send().await.map(|r| r.status()) })
                .expect("answer");
            queue_runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            prop_assert!(
                !status.is_server_error(),
                "body {:?} gave {}",
                String::from_utf8_lossy(&body),
                status
            );
            prop_assert!(
                status.is_client_error() || status.as_u16() == 201 || status.as_u16() == 303,
                "{}",
                status
            );
            if status.is_success() || status.is_redirection() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    let queued = outbox::Entity::find().count(&app.db).await.expect("count");
    let accepted = accepted.into_inner();
    assert_eq!(
        queued, accepted,
        "one row per accepted mail, none for refused ones"
    );
    // What was queued is well-formed: no injected header, every recipient an address.
    for row in outbox::Entity::find().all(&app.db).await.expect("rows") {
        assert!(!row.subject.contains(['\r', '\n']), "{row:?}");
        let body = outbox_body::Entity::find_by_id(row.id)
            .one(&app.db)
            .await
            .expect("body")
            .expect("every queued mail has its body");
        assert!(
            !body.raw.contains("evil.example"),
            "an injected header got through: {}",
            body.raw
        );
        for r in row.recipients.lines() {
            assert!(r.parse::<lettre::Address>().is_ok(), "{r}");
        }
    }
    println!(
        "fuzz: confirm_cases={} queue_cases={} server_errors=0 accepted={accepted} queued={queued}",
        confirm_runs.into_inner(),
        queue_runs.into_inner()
    );
}

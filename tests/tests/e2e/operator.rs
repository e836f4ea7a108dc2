//! The operator's console: settings verified against the token endpoint, notifications as an
//! inbox (unread count, mark read, failed mails told to their author and the operators),
//! careful actions that ask first, and a disabled module's page.

use crate::connect::{CLIENT_ID, CLIENT_SECRET, env};
use crate::helpers::{ADMIN, ALICE, eventually};
use crate::send::{mailing, mails_path, queue, wait_status};
use microsoft_simulators::identity::AppRegistration;
use microsoft_simulators::smtp::{Injected, Stage};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

async fn save(env: &crate::connect::Env, fields: &[(&str, &str)]) -> (StatusCode, String) {
    let authority = env.idp.authority_url();
    let mut form = vec![
        ("client_id", CLIENT_ID),
        ("authority_url", authority.as_str()),
    ];
    for (k, v) in fields {
        form.retain(|(f, _)| f != k);
        form.push((k, v));
    }
    if !form.iter().any(|(k, _)| *k == "tenant") {
        form.push(("tenant", "common"));
    }
    let (status, page, _) = env
        .admin
        .post_form("/settings/microsoft_outlook", &form)
        .await;
    (status, page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_settings_verifies_the_client_id_and_secret_with_the_token_endpoint() {
    let env = env().await;
    // The right secret, tenant common: Microsoft answers about the dummy code, so verified.
    let (status, page) = save(&env, &[("client_secret", CLIENT_SECRET)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Client ID and secret verified"), "{page}");
    // Microsoft refused only the made-up sign-in code: no code beside a success, and the next
    // step is a link.
    assert!(
        !page.contains("AADSTS9002313"),
        "a code beside a success reads as a failure\n{page}"
    );
    // The next step: the shared server exists but is not connected yet.
    let next = format!(
        r#"Next: <a href="/microsoft_outlook/servers/{}">Connect crm@contoso.example</a>"#,
        env.server_id
    );
    assert!(page.contains(&next), "{page}");

    // A wrong secret while the stored one works: nothing is saved, and the page says 7000215
    // in words.
    let (status, page) = save(
        &env,
        &[("client_secret", "Wr0ng~secret-value-for-the-check")],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("Nothing was saved"), "{page}");
    assert!(page.contains("the settings in use work"), "{page}");
    assert!(page.contains("The client secret is invalid."), "{page}");
    assert!(page.contains("AADSTS7000215"), "{page}");
    assert!(page.contains("not its Secret ID"), "{page}");
    assert!(
        page.contains(r#"id="settings-check" role="alert""#),
        "{page}"
    );
    // The working secret is still the one stored: a save that leaves it empty keeps it.
    let (status, page) = save(&env, &[]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Client ID and secret verified"), "{page}");

    // An unknown application, and an unknown tenant.
    let (_, page) = save(
        &env,
        &[
            ("client_id", "00000000-1111-2222-3333-444444444444"),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    assert!(page.contains("AADSTS700016"), "{page}");
    assert!(page.contains("does not know this application"), "{page}");
    let (_, page) = save(
        &env,
        &[
            ("client_secret", CLIENT_SECRET),
            ("tenant", "fabrikam.example"),
        ],
    )
    .await;
    assert!(page.contains("AADSTS90002"), "{page}");
    assert!(page.contains("does not know this tenant"), "{page}");

    // A tenant the directory knows by its domain works as well as common.
    let (_, page) = save(
        &env,
        &[
            ("client_secret", CLIENT_SECRET),
            ("tenant", "contoso.example"),
        ],
    )
    .await;
    assert!(page.contains("Client ID and secret verified"), "{page}");

    // The secret is replaced in Azure: the stored one no longer works, so a save is stored
    // whatever its check finds (nothing that works is lost), and the new secret then works.
    let rotated = "Rt8Q~rotated.client.secret-value";
    env.idp.register_app(AppRegistration {
        client_id: CLIENT_ID.into(),
        client_secret: rotated.into(),
        secret_expired: false,
        redirect_uris: vec![crate::connect::REDIRECT.into()],
    });
    let (status, page) = save(&env, &[("client_secret", "Wr0ng~another-wrong-value")]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Settings saved."), "{page}");
    assert!(page.contains("The client secret is invalid."), "{page}");
    let (status, page) = save(&env, &[("client_secret", rotated)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Client ID and secret verified"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_id_pasted_as_the_secret_is_refused_and_nothing_is_saved() {
    let env = env().await;
    let (status, page) = save(
        &env,
        &[
            ("client_secret", "8a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"),
            ("tenant", "organizations"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("Secret ID"), "{page}");
    assert!(page.contains("Nothing was saved"), "{page}");
    let values = env
        .app
        .app
        .registry
        .get("microsoft_outlook")
        .expect("linked")
        .ctx
        .settings()
        .load("microsoft_outlook")
        .await
        .expect("load");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(values.secret("client_secret").expect("kept")),
        CLIENT_SECRET
    );
    assert_eq!(values.get("tenant"), Some("common"), "nothing was saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_page_guides_and_warns_as_the_secret_expiry_nears() {
    let env = env().await;
    let today = crm_sdk::Clock::now(env.app.clock.as_ref()).date_naive();
    let soon = (today + chrono::Duration::days(5)).to_string();
    let (_, page) = save(&env, &[("client_secret_expires_on", soon.as_str())]).await;
    assert!(page.contains("runs out in 5 days"), "{page}");
    assert!(
        page.contains(r#"class="flash bad secret-expiry" role="alert""#),
        "{page}"
    );
    let (_, page, _) = env.admin.get("/settings").await;
    for words in [
        "/microsoft_outlook/confirm",
        r#"data-copy="redirect-uri""#,
        "/microsoft_outlook/assets/copy.js",
        "SMTP.SendAsApp",
        "offline_access",
        "Mail.Send",
        "IMAP.AccessAsUser.All",
        "entra.microsoft.com",
        r#"href="/microsoft_outlook/servers""#,
    ] {
        assert!(page.contains(words), "{words}\n{page}");
    }
    let (status, script, _) = env.admin.get("/microsoft_outlook/assets/copy.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains("data-copy"));
    let past = (today - chrono::Duration::days(1)).to_string();
    let (_, page) = save(&env, &[("client_secret_expires_on", past.as_str())]).await;
    let expired = format!("The expiry date given for the client secret, {past}, has passed");
    assert!(page.contains(&expired), "{page}");
    // Where Microsoft still takes the secret, the banner says the date is the thing to fix.
    assert!(page.contains("Client ID and secret verified"), "{page}");
    assert!(page.contains("the date is wrong"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_mail_tells_its_author_and_the_operators_and_unread_counts_in_the_navigation() {
    let m = mailing().await;
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::RcptTo,
            reply: "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup".into(),
        },
        1,
    );
    let id = queue(&m, "Bounce").await;
    wait_status(&m.env.app, id, "failed").await;
    let mut told = false;
    for _ in 0..100 {
        let (_, page, _) = m.alice.get("/notifications").await;
        if page.contains("Mail not sent: &quot;Bounce&quot;")
            || page.contains("Mail not sent: \"Bounce\"")
        {
            told = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(told, "the author is told");
    let (_, page, _) = m.alice.get("/notifications").await;
    assert!(
        page.contains("5.1.10"),
        "in the classification's words\n{page}"
    );
    // A refused recipient asks for the addresses to be checked, not "the content"; and the
    // notice does not contradict the Retry now its mail page offers.
    assert!(
        page.contains("Check the recipients&#39; addresses")
            || page.contains("Check the recipients' addresses"),
        "{page}"
    );
    assert!(page.contains("not tried again by itself"), "{page}");
    assert!(
        page.contains(&format!(r#"href="/microsoft_outlook/outbox/{id}""#)),
        "links the mail's page\n{page}"
    );
    assert!(!page.contains(&mails_path(m.contact)), "{page}");
    assert!(
        page.contains(r#"class="badge unread" aria-label="1 unread""#),
        "{page}"
    );

    let admin = m.env.app.signed_in(ADMIN).await;
    let (_, page, _) = admin.get("/notifications").await;
    assert!(
        page.contains("Mail not sent"),
        "the operators are told\n{page}"
    );
    assert!(page.contains("aria-label=\"1 unread\""), "{page}");
    // The operators' copy names the author (not an internal id) and leaves out the advice
    // meant for the author.
    let ops = crm_host::entities::notification::Entity::find()
        .filter(crm_host::entities::notification::Column::ForOperators.eq(true))
        .all(&m.env.app.db)
        .await
        .expect("query");
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(ops[0].body.contains("by Alice"), "{ops:?}");
    assert!(!ops[0].body.contains("user "), "{ops:?}");
    assert!(ops[0].body.contains("5.1.10"), "{ops:?}");
    assert!(!ops[0].body.contains("send it again"), "{ops:?}");
    assert!(!ops[0].body.contains("Check the recipients"), "{ops:?}");

    // Mark one read: the count goes.
    let nid: i64 = page
        .split("action=\"/notifications/")
        .skip(1)
        .find_map(|rest| rest.split('/').next()?.parse().ok())
        .expect("a mark-read form");
    let (status, _, location) = admin
        .post_form(&format!("/notifications/{nid}/read"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/notifications?read=1"));
    let (_, page, _) = admin.get("/notifications").await;
    assert!(!page.contains("badge unread"), "{page}");
    // Reading is per person: the author still has theirs unread; then all at once.
    let (_, page, _) = m.alice.get("/contacts").await;
    assert!(page.contains("aria-label=\"1 unread\""), "{page}");
    // Someone else's notification answers like a missing one.
    let (status, _, _) = m
        .alice
        .post_form(&format!("/notifications/{nid}/read"), &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, location) = m.alice.post_form("/notifications/read-all", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = m.alice.get(&location.expect("back")).await;
    assert!(page.contains("All notifications marked read"), "{page}");
    assert!(!page.contains("badge unread"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_notifications_are_not_counted_unread() {
    let env = env().await;
    let notifier = crm_host::notifier::DbNotifier::new(env.app.db.clone());
    use crm_sdk::Notifier;
    for key in ["incident-a", "incident-b"] {
        notifier
            .notify(crm_sdk::Notification {
                audience: crm_sdk::Audience::Operators,
                subject: format!("Held {key}"),
                body: "words".into(),
                link: None,
                key: Some(key.into()),
            })
            .await
            .expect("notify");
    }
    let (_, page, _) = env.admin.get("/notifications").await;
    assert!(page.contains("aria-label=\"2 unread\""), "{page}");
    notifier.resolve("incident-a").await.expect("resolve");
    let (_, page, _) = env.admin.get("/notifications").await;
    assert!(page.contains("aria-label=\"1 unread\""), "{page}");
    assert!(page.contains("Resolved"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_disconnect_and_disable_ask_first_and_count_the_queued_mail() {
    let m = mailing().await;
    let env = &m.env;
    // A mail waits on a held mailbox.
    m.smtp.inject(
        Injected::Reply {
            stage: Stage::Auth,
            reply: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
        },
        100,
    );
    let id = queue(&m, "Waits").await;
    let app = env.app.db.clone();
    eventually("the mail waits on the held mailbox", || {
        let db = app.clone();
        async move {
            use sea_orm::EntityTrait;
            microsoft_outlook::entities::outbox::Entity::find_by_id(id)
                .one(&db)
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.status == "queued" && r.last_error.is_some())
        }
    })
    .await;
    let server = format!("/microsoft_outlook/servers/{}", env.server_id);
    let (_, page, _) = env.admin.get(&server).await;
    assert!(
        page.contains(&format!(r#"href="{server}/delete""#)),
        "{page}"
    );
    assert!(
        page.contains(&format!(r#"href="{server}/disconnect""#)),
        "{page}"
    );

    let (status, page, _) = env.admin.get(&format!("{server}/delete")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("1 queued mail(s) of this server will fail"),
        "{page}"
    );
    assert!(
        page.contains(&format!(r#"action="{server}/delete""#)),
        "{page}"
    );
    let (status, page, _) = env.admin.get(&format!("{server}/disconnect")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("1 queued mail(s) wait"), "{page}");
    // Not yours: the same 404 as not there.
    let (status, _, _) = m.alice.get(&format!("{server}/delete")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, page, _) = env.admin.get("/modules/microsoft_outlook/disable").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("1 queued mail(s) stay queued"), "{page}");

    // Disconnect, then delete: each ends with a message.
    let (status, _, location) = env
        .admin
        .post_form(&format!("{server}/disconnect"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = env.admin.get(&location.expect("back")).await;
    assert!(page.contains("Disconnected"), "{page}");
    let (status, _, location) = env.admin.post_form(&format!("{server}/delete"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = env.admin.get(&location.expect("list")).await;
    assert!(page.contains("Deleted: the mail server"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_module_answers_a_page_that_says_so() {
    let env = env().await;
    let (status, _, _) = env
        .admin
        .post_form("/modules/microsoft_outlook/disable", &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, page, _) = env.admin.get("/microsoft_outlook/servers").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("module is disabled"), "{page}");
    assert!(
        page.contains(r#"href="/modules""#),
        "an operator is sent to Modules\n{page}"
    );
    let alice = env.app.signed_in(ALICE).await;
    let (status, page, _) = alice.get("/microsoft_outlook/my-mailbox").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("module is disabled"), "{page}");
    assert!(page.contains("Ask one of the CRM's operators"), "{page}");
    // The settings page, which an operator fills in before enabling it, keeps its copy
    // buttons: their script is served while the module is disabled.
    let (_, settings, _) = env.admin.get("/settings").await;
    assert!(
        settings.contains("/microsoft_outlook/assets/copy.js"),
        "{settings}"
    );
    let (status, script, _) = env.admin.get("/microsoft_outlook/assets/copy.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains("data-copy"), "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_all_read_works_on_a_large_inbox() {
    use crm_host::entities::{notification, notification_read};
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, Set, TransactionTrait};
    let env = env().await;
    let db = &env.app.db;
    // More than SQLite's 32766 bound variables if each read were one row of an INSERT.
    let now = chrono::Utc::now();
    let notice = |n: usize, resolved: bool| notification::ActiveModel {
        user_id: Set(None),
        for_operators: Set(true),
        subject: Set(format!("Notice {n}")),
        body: Set("words".into()),
        link: Set(None),
        created_at: Set(now),
        incident_key: Set(None),
        resolved_at: Set(resolved.then_some(now)),
        ..Default::default()
    };
    let txn = db.begin().await.expect("begin");
    let all: Vec<_> = (0..12_000).map(|n| notice(n, n % 1000 == 0)).collect();
    for chunk in all.chunks(1000) {
        notification::Entity::insert_many(chunk.to_vec())
            .exec(&txn)
            .await
            .expect("insert");
    }
    txn.commit().await.expect("commit");
    let (_, page, _) = env.admin.get("/contacts").await;
    assert!(page.contains(r#"aria-label="11988 unread""#), "{page}");

    let (status, _, location) = env.admin.post_form("/notifications/read-all", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/notifications?read=all"));
    let (_, page, _) = env.admin.get("/contacts").await;
    assert!(!page.contains("badge unread"), "{page}");
    // Only the unresolved ones get a read mark; a second time changes nothing.
    let marks = || {
        notification_read::Entity::find()
            .filter(notification_read::Column::UserId.eq(env.app.admin_id))
            .count(db)
    };
    assert_eq!(marks().await.expect("count"), 11_988);
    let (status, _, _) = env.admin.post_form("/notifications/read-all", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(marks().await.expect("count"), 11_988);
}

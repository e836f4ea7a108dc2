//! The host contract: module lifecycle, operators-only pages, sealed settings, CSRF, manifest.

use crate::helpers::{ADMIN, ALICE, captured_logs, spawn_app, spawn_on};
use crm_sdk::{Sealer, SealingKey, SettingsError, SettingsStore};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Statement};

const GUID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

async fn scalar_count(app: &crate::helpers::TestApp, sql: &str) -> i64 {
    let row = app
        .db
        .query_one_raw(Statement::from_string(
            app.db.get_database_backend(),
            sql.to_string(),
        ))
        .await
        .expect("query")
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("a count")
}

async fn setting_rows(app: &crate::helpers::TestApp) -> i64 {
    scalar_count(
        app,
        "SELECT COUNT(*) FROM crm_settings WHERE module = 'microsoft_outlook'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_lifecycle_enable_disable_reenable_keeps_data() {
    let app = spawn_app().await;
    let admin = app.signed_in(ADMIN).await;

    // Linked but not enabled: its routes do not exist, its jobs do not run.
    assert_eq!(
        admin.get("/microsoft_outlook/servers").await.0,
        StatusCode::NOT_FOUND
    );
    let (_, modules, _) = admin.get("/modules").await;
    assert!(modules.contains("disabled"), "{modules}");

    // Enable: migrations applied, routes live, jobs running.
    let (status, page, _) = admin
        .post_form("/modules/microsoft_outlook/enable", &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("enabled"));
    assert!(page.contains("Jobs: running"), "{page}");
    assert_eq!(
        scalar_count(&app, "SELECT COUNT(*) FROM microsoft_outlook_migrations").await,
        crm_sdk::Module::migration_names(&microsoft_outlook::OutlookModule::new()).len() as i64
    );
    assert_eq!(
        admin.get("/microsoft_outlook/servers").await.0,
        StatusCode::OK
    );

    // Data the module owns.
    app.db
        .execute_unprepared(
            "INSERT INTO microsoft_outlook_alerts (key, value, at) VALUES ('lifecycle-probe', 'kept', '2026-01-01T00:00:00Z')",
        )
        .await
        .expect("insert");

    // Disable: 404 and jobs stopped.
    let (status, page, _) = admin
        .post_form("/modules/microsoft_outlook/disable", &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Jobs: stopped"), "{page}");
    assert_eq!(
        admin.get("/microsoft_outlook/servers").await.0,
        StatusCode::NOT_FOUND
    );
    let entry = app.app.registry.get("microsoft_outlook").expect("linked");
    assert!(entry.running_jobs().await.is_empty());

    // Enable again: idempotent migrations, data intact, routes back.
    let (status, _, _) = admin
        .post_form("/modules/microsoft_outlook/enable", &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        admin.get("/microsoft_outlook/servers").await.0,
        StatusCode::OK
    );
    assert_eq!(
        scalar_count(
            &app,
            "SELECT COUNT(*) FROM microsoft_outlook_alerts WHERE key = 'lifecycle-probe'"
        )
        .await,
        1
    );
    assert!(!entry.running_jobs().await.is_empty());

    // A restarted host resumes the enabled module.
    app.stop().await;
    let again = spawn_on(app.test_db(), app.key.clone(), false).await;
    let admin = again.signed_in(ADMIN).await;
    assert_eq!(
        admin.get("/microsoft_outlook/servers").await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_users_get_403_on_settings_and_modules() {
    let app = spawn_app().await;
    let alice = app.signed_in(ALICE).await;
    assert_eq!(alice.get("/settings").await.0, StatusCode::FORBIDDEN);
    assert_eq!(alice.get("/modules").await.0, StatusCode::FORBIDDEN);
    let (status, _, _) = alice
        .post_form(
            "/settings/microsoft_outlook",
            &[("client_id", GUID), ("client_secret", "x")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = alice
        .post_form("/modules/microsoft_outlook/enable", &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(setting_rows(&app).await, 0);
    assert!(
        app.app
            .registry
            .get("microsoft_outlook")
            .is_some_and(|e| !e.is_enabled())
    );

    // Nobody signed in: sent to the sign-in page.
    let anonymous = app.browser();
    let (status, _, location) = anonymous.get("/settings").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location.as_deref(), Some("/login?next=%2Fsettings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_is_sealed_write_only_and_never_logged() {
    let app = spawn_app().await;
    let admin = app.signed_in(ADMIN).await;
    let secret = format!("Zx8Q~{}", crm_host::auth::random_token());
    let (status, page, _) = admin
        .post_form(
            "/settings/microsoft_outlook",
            &[
                ("client_id", GUID),
                ("client_secret", &secret),
                ("client_secret_expires_on", "2027-05-01"),
                ("tenant", "organizations"),
                ("authority_url", "https://login.microsoftonline.us"),
                ("refresh_schedule", "0 30 2 * * *"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Settings saved"));
    assert!(page.contains("stored"));
    assert!(!page.contains(&secret));
    assert!(
        page.contains("https://crm.contoso.example/microsoft_outlook/confirm"),
        "redirect URI shown"
    );

    let (_, again, _) = admin.get("/settings").await;
    assert!(!again.contains(&secret));
    assert!(again.contains("login.microsoftonline.us"));

    let row = app
        .db
        .query_one_raw(Statement::from_string(
            app.db.get_database_backend(),
            "SELECT value, sealed FROM crm_settings WHERE module = 'microsoft_outlook' AND key = 'client_secret'".to_string(),
        ))
        .await
        .expect("query")
        .expect("stored");
    let raw: String = row.try_get_by_index(0).expect("value");
    assert_ne!(raw, secret);
    assert!(!raw.contains(&secret));
    assert!(row.try_get_by_index::<bool>(1).expect("sealed"));

    // The host's store unseals it for the module.
    let values = app
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
        secrecy::ExposeSecret::expose_secret(values.secret("client_secret").expect("secret")),
        secret
    );

    // Saving again with the field empty keeps the stored secret.
    let (status, _, _) = admin
        .post_form(
            "/settings/microsoft_outlook",
            &[
                ("client_id", GUID),
                ("client_secret", ""),
                ("tenant", "common"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let values = crm_host::settings::DbSettingsStore::new(app.db.clone(), Sealer::new(&app.key))
        .load("microsoft_outlook")
        .await
        .expect("load");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(values.secret("client_secret").expect("kept")),
        secret
    );

    assert!(
        !captured_logs().contains(&secret),
        "the client secret reached a log line"
    );
    assert!(
        captured_logs().contains("settings saved"),
        "logs were captured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_cannot_unseal_and_says_so() {
    let app = spawn_app().await;
    let admin = app.signed_in(ADMIN).await;
    let (status, _, _) = admin
        .post_form(
            "/settings/microsoft_outlook",
            &[("client_id", GUID), ("client_secret", "s3cret-value")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let wrong = crm_host::settings::DbSettingsStore::new(
        app.db.clone(),
        Sealer::new(&SealingKey::generate()),
    );
    match wrong.load("microsoft_outlook").await {
        Err(SettingsError::Unseal { field, .. }) => assert_eq!(field, "client_secret"),
        other => panic!("expected an unseal error, got {other:?}"),
    }

    // A host started with another key still serves the page and explains.
    app.stop().await;
    let other = spawn_on(app.test_db(), SealingKey::generate(), false).await;
    let admin = other.signed_in(ADMIN).await;
    let (status, page, _) = admin.get("/settings").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("cannot be unsealed"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_refused_and_nothing_is_saved() {
    let app = spawn_app().await;
    let admin = app.signed_in(ADMIN).await;
    let cases: [(&str, &str, &str); 5] = [
        ("client_id", "not-a-guid", "must be a GUID"),
        ("tenant", "contoso tenant!", "must be common, organizations"),
        (
            "authority_url",
            "ftp://login.example",
            "must be an http(s) URL",
        ),
        (
            "authority_url",
            "http://login.microsoftonline.com",
            "must use https",
        ),
        (
            "refresh_schedule",
            "every night",
            "is not a cron expression",
        ),
    ];
    for (field, value, message) in cases {
        let mut fields = vec![
            ("client_id", GUID),
            ("client_secret", "s3cret"),
            ("tenant", "common"),
        ];
        fields.retain(|(k, _)| *k != field);
        fields.push((field, value));
        let (status, page, _) = admin
            .post_form("/settings/microsoft_outlook", &fields)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}={value}");
        assert!(page.contains("Nothing was saved"), "{page}");
        assert!(
            page.contains(message),
            "{field}={value}: expected {message:?}"
        );
        assert_eq!(
            setting_rows(&app).await,
            0,
            "{field}={value} saved something"
        );
    }
    // A missing required secret.
    let (status, page, _) = admin
        .post_form("/settings/microsoft_outlook", &[("client_id", GUID)])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("Client secret is required"), "{page}");
    assert_eq!(setting_rows(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_a_valid_csrf_token_are_refused() {
    let app = spawn_app().await;
    let admin = app.signed_in(ADMIN).await;
    let fields = [("client_id", GUID), ("client_secret", "s3cret")];
    let (status, page, _) = admin.post_raw("/settings/microsoft_outlook", &fields).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("CSRF"));
    let mut forged = fields.to_vec();
    forged.push(("csrf_token", "forged-token"));
    assert_eq!(
        admin
            .post_raw("/settings/microsoft_outlook", &forged)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        admin
            .post_raw("/modules/microsoft_outlook/enable", &[])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(setting_rows(&app).await, 0);
    assert!(
        app.app
            .registry
            .get("microsoft_outlook")
            .is_some_and(|e| !e.is_enabled())
    );

    // Another session's token does not work either.
    let other = app.signed_in(ADMIN).await;
    let other_token = other.csrf().await;
    let mut stolen = fields.to_vec();
    stolen.push(("csrf_token", &other_token));
    assert_eq!(
        admin
            .post_raw("/settings/microsoft_outlook", &stolen)
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    // The sign-in form is protected too.
    let fresh = app.browser();
    let (status, _, _) = fresh
        .post_raw("/login", &[("email", ADMIN.0), ("password", ADMIN.1)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[test]
fn a_bad_manifest_fails_with_the_field_and_the_problem() {
    let good = microsoft_outlook::MANIFEST_TOML;
    assert!(microsoft_outlook::OutlookModule::from_manifest(good).is_ok());
    let cases = [
        (
            good.replace("host_api = 1", "host_api = 7"),
            "host_api",
            "host API 7",
        ),
        (
            good.replace(
                "route_prefix = \"/microsoft_outlook\"",
                "route_prefix = \"/outlook\"",
            ),
            "route_prefix",
            "slash + id",
        ),
        (
            good.replacen("kind = \"guid\"", "kind = \"colour\"", 1),
            "colour",
            "unknown variant",
        ),
        (
            good.replacen(
                "id = \"microsoft_outlook\"",
                "id = \"microsoft_outlook\"\ncolour = \"blue\"",
                1,
            ),
            "colour",
            "unknown field",
        ),
        (
            good.replace("schedule = \"0 0 3 * * *\"", "schedule = \"nightly\""),
            "job[0].schedule",
            "cron",
        ),
        (
            good.replacen("id = \"tenant\"", "id = \"client_id\"", 1),
            "setting[3].id",
            "declared twice",
        ),
    ];
    for (text, field, problem) in cases {
        let err = microsoft_outlook::OutlookModule::from_manifest(&text)
            .err()
            .expect("refused");
        let message = err.to_string();
        assert!(message.contains(field), "{message} should name {field}");
        assert!(message.contains(problem), "{message} should say {problem}");
    }
}

/// An outbox that holds mail when the module is upgraded keeps every mail's text: the bodies
/// move to their own table, the old column goes, and running the migrations again is harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_moves_queued_mail_texts_to_their_own_table() {
    use microsoft_outlook::entities::{outbox, outbox_body};
    use microsoft_outlook_migrations::Migrator;
    use sea_orm::EntityTrait;
    use sea_orm_migration::{MigratorTrait, SchemaManager};
    let test_db = microsoft_outlook_tests::testdb::TestDb::create()
        .await
        .expect("a database");
    let db = sea_orm::Database::connect(&test_db.url)
        .await
        .expect("connect");
    // The schema as it was before the bodies moved (the first five migrations).
    Migrator::up(&db, Some(5)).await.expect("m0001–m0005");
    let text =
        "Subject: Before the upgrade\r\n\r\nThe text must survive, accents \u{e9}t\u{e9} too.\r\n";
    db.execute_unprepared(&format!(
        "INSERT INTO microsoft_outlook_outbox (message_id, status, server_id, author_user_id, \
         record_model, record_id, from_header, envelope_from, recipients, subject, raw_message, \
         size_bytes, attempts, next_attempt_at, created_at, updated_at) VALUES ('old@crm', \
         'queued', 1, 1, 'contact', 1, 'a@contoso.example', 'a@contoso.example', \
         'b@fabrikam.example', 'Before the upgrade', '{text}', {}, 0, \
         '2026-11-30T00:00:00Z', '2026-11-30T00:00:00Z', '2026-11-30T00:00:00Z')",
        text.len()
    ))
    .await
    .expect("an old outbox row");
    Migrator::up(&db, None).await.expect("m0006");
    Migrator::up(&db, None).await.expect("again: nothing to do");
    let row = outbox::Entity::find()
        .one(&db)
        .await
        .expect("the outbox reads with the new columns")
        .expect("the row is still there");
    let body = outbox_body::Entity::find_by_id(row.id)
        .one(&db)
        .await
        .expect("bodies")
        .expect("its body moved");
    assert_eq!(body.raw, text);
    let manager = SchemaManager::new(&db);
    assert!(
        !manager
            .has_column("microsoft_outlook_outbox", "raw_message")
            .await
            .expect("schema"),
        "the old column is gone"
    );
}

/// The host answers a module's batch look-up of records as it answers one at a time: the same
/// access per (record, viewer), in the order asked, whatever the mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_looked_up_together_answer_as_one_at_a_time() {
    use crm_sdk::{CurrentUser, RecordAccess, RecordDirectory, RecordRef};
    let app = spawn_app().await;
    let open =
        crm_host::seed::create_contact(&app.db, "Dana Fabrikam", None, None, app.alice_id, false)
            .await
            .expect("contact");
    let private =
        crm_host::seed::create_contact(&app.db, "Hana Private", None, None, app.bob_id, true)
            .await
            .expect("contact");
    let user = |id: i64, is_admin: bool| CurrentUser {
        id,
        email: format!("user{id}@contoso.example"),
        name: format!("User {id}"),
        is_admin,
        csrf_token: String::new(),
    };
    let (alice, bob, admin) = (
        user(app.alice_id, false),
        user(app.bob_id, false),
        user(app.admin_id, true),
    );
    let contact = |id: i64| RecordRef {
        model: "contact".into(),
        id,
    };
    let deal = RecordRef {
        model: "deal".into(),
        id: open,
    };
    let (open, private, missing) = (contact(open), contact(private), contact(999_999));
    let lookups = [
        (&private, &alice),
        (&open, &alice),
        (&private, &bob),
        (&missing, &alice),
        (&deal, &alice),
        (&private, &admin),
        (&open, &bob),
    ];
    let directory = crm_host::records::DbRecordDirectory::new(app.db.clone());
    let together = directory.find_many(&lookups).await.expect("look-up");
    let words = |a: &RecordAccess| match a {
        RecordAccess::Missing => "missing".to_string(),
        RecordAccess::Hidden => "hidden".to_string(),
        RecordAccess::Visible(s) => format!("visible {}", s.title),
    };
    let together: Vec<String> = together.iter().map(words).collect();
    assert_eq!(
        together,
        [
            "hidden",
            "visible Dana Fabrikam",
            "visible Hana Private",
            "missing",
            "missing",
            "visible Hana Private",
            "visible Dana Fabrikam",
        ]
    );
    for ((record, viewer), expected) in lookups.iter().zip(&together) {
        let alone = directory.find(record, viewer).await.expect("look-up");
        assert_eq!(
            &words(&alone),
            expected,
            "{record:?} for user {}",
            viewer.id
        );
    }
    assert!(directory.find_many(&[]).await.expect("nothing").is_empty());
}

/// No address answers a blank page: a reload of the settings after Save shows them, an
/// unknown address gets the 404 page in the host's layout with a link home, and the icon
/// browsers ask for is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_addresses_answer_a_page_and_the_settings_reload() {
    let app = spawn_app().await;
    app.enable_module().await;
    let admin = app.signed_in(ADMIN).await;
    let (status, page, _) = admin.get("/settings/microsoft_outlook").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"id="settings-microsoft_outlook""#),
        "{page}"
    );

    let alice = app.signed_in(ALICE).await;
    for path in [
        "/nonexistent",
        "/microsoft_outlook/nonexist",
        "/settings/no_such_module",
    ] {
        let who = if path.starts_with("/settings") {
            &admin
        } else {
            &alice
        };
        let (status, page, _) = who.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(page.contains("Page not found"), "{path}: {page}");
        assert!(page.contains(r#"href="/""#), "{path}: {page}");
        assert!(page.contains("Sign out"), "in the layout: {path}: {page}");
    }
    let (status, page, _) = app.browser().get("/nonexistent").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("Page not found"), "{page}");

    let response = reqwest::get(format!("{}/favicon.ico", app.base))
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("image/")),
    );
}

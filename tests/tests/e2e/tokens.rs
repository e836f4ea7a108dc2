//! Keeping tokens alive: rotation under concurrency, the nightly job, needs-reconnect,
//! classification of refresh failures, and client-secret expiry warnings.

use crate::connect::{Env, MAILBOX, connect_through, env};
use crate::helpers::{ALICE, eventually};
use crate::send::settings;
use crm_sdk::{Clock, Sealer};
use microsoft_outlook::entities::{mail_server, mailbox_health, token};
use microsoft_outlook::jobs::{RefreshOptions, refresh_all};
use microsoft_simulators::identity::TokenFault;
use reqwest::StatusCode;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::ExposeSecret;

async fn connected() -> Env {
    let env = env().await;
    let (status, _, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    env
}

async fn token_row(env: &Env, server_id: i32) -> token::Model {
    token::Entity::find_by_id(server_id)
        .one(&env.app.db)
        .await
        .expect("q")
        .expect("token")
}

async fn expire_soon(env: &Env, server_id: i32) {
    token::Entity::update_many()
        .col_expr(
            token::Column::AccessExpiresAt,
            Expr::value(env.app.clock.now() + chrono::Duration::minutes(1)),
        )
        .filter(token::Column::ServerId.eq(server_id))
        .exec(&env.app.db)
        .await
        .expect("update");
}

fn refreshes(env: &Env) -> usize {
    env.idp
        .token_requests()
        .iter()
        .filter(|r| r.grant_type == "refresh_token")
        .count()
}

fn ctx(env: &Env) -> crm_sdk::ModuleContext {
    env.app
        .app
        .registry
        .get("microsoft_outlook")
        .expect("linked")
        .ctx
        .clone()
}

async fn server(env: &Env, id: i32) -> mail_server::Model {
    mail_server::Entity::find_by_id(id)
        .one(&env.app.db)
        .await
        .expect("q")
        .expect("server")
}

fn options() -> RefreshOptions {
    RefreshOptions {
        concurrency: 4,
        max_jitter: std::time::Duration::ZERO,
        transient_retries: 1,
        skip_refreshed_within: std::time::Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_refreshing_one_mailbox_for_200_rounds_never_lose_the_grant() {
    let env = connected().await;
    env.idp.set_strict_rotation(true);
    let ctx = ctx(&env);
    let shared = env.app.module.shared();
    let server = server(&env, env.server_id).await;
    for round in 0..200 {
        expire_soon(&env, env.server_id).await;
        let before = refreshes(&env);
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (ctx, shared, server) = (ctx.clone(), shared.clone(), server.clone());
            workers.push(tokio::spawn(async move {
                microsoft_outlook::tokens::service::fresh_access_token(
                    &ctx, &shared, &server, false,
                )
                .await
            }));
        }
        for worker in workers {
            let token = worker
                .await
                .expect("join")
                .unwrap_or_else(|p| panic!("round {round}: {p}"));
            assert!(
                env.idp
                    .validate_access_token(token.token.expose_secret())
                    .is_some(),
                "round {round}: a live token"
            );
        }
        assert_eq!(
            refreshes(&env) - before,
            1,
            "round {round}: exactly one refresh"
        );
        let row = token_row(&env, env.server_id).await;
        assert_eq!(row.status, "valid", "round {round}");
    }
    assert!(
        env.idp
            .token_requests()
            .iter()
            .filter(|r| r.grant_type == "refresh_token")
            .all(|r| r.status == 200),
        "no refresh was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_job_refreshes_every_mailbox_and_a_revoked_grant_is_told_once() {
    let env = connected().await;
    // Alice connects her own mailbox too.
    let alice = env.app.signed_in(ALICE).await;
    let alice_server = crate::connect::create_personal(&alice, ALICE.0).await;
    env.idp.sign_in_as(ALICE.0);
    assert_eq!(
        connect_through(&alice, alice_server).await.0,
        StatusCode::SEE_OTHER
    );

    // Every second: a saved schedule applies at once.
    settings(&env, &[("refresh_schedule", "*/1 * * * * *")]).await;

    let (shared_id, env_ref) = (env.server_id, &env);
    eventually("both mailboxes refreshed by the job", || async {
        token_row(env_ref, shared_id).await.version >= 2
            && token_row(env_ref, alice_server).await.version >= 2
    })
    .await;

    env.idp.revoke_grants_of(ALICE.0);
    eventually("alice's mailbox to need a reconnect", || async {
        token_row(env_ref, alice_server).await.status == "needs_reconnect"
    })
    .await;
    let failed_after_revoke = env
        .idp
        .token_requests()
        .iter()
        .filter(|r| r.status != 200)
        .count();
    let v = token_row(&env, shared_id).await.version;
    eventually("three more runs", || async {
        token_row(env_ref, shared_id).await.version >= v + 3
    })
    .await;
    assert_eq!(
        env.idp
            .token_requests()
            .iter()
            .filter(|r| r.status != 200)
            .count(),
        failed_after_revoke,
        "a mailbox that needs a reconnect is skipped"
    );
    let (_, notes, _) = alice.get("/notifications").await;
    assert_eq!(
        notes.matches("is held: Reconnect needed").count(),
        1,
        "alice is told once\n{notes}"
    );
    // Only Alice can sign in to her own mailbox: the operators are not asked to.
    let (_, notes, _) = env.admin.get("/notifications").await;
    assert_eq!(
        notes.matches("is held: Reconnect needed").count(),
        0,
        "operators are not asked to reconnect a user's mailbox\n{notes}"
    );
    assert!(
        token_row(&env, alice_server)
            .await
            .last_error
            .unwrap_or_default()
            .contains("AADSTS50173")
    );

    // Reconnecting clears it.
    let (status, _, _) = connect_through(&alice, alice_server).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let row = token_row(&env, alice_server).await;
    assert_eq!(row.status, "valid");
    assert!(row.last_error.is_none() && row.notified_at.is_none());
    let health = mailbox_health::Entity::find_by_id(alice_server)
        .one(&env.app.db)
        .await
        .expect("q");
    assert!(
        health.is_none_or(|h| h.state == "ready"),
        "the hold ended with the reconnect"
    );
    let (_, notes, _) = alice.get("/notifications").await;
    assert!(
        notes.contains("Resolved"),
        "the incident is resolved\n{notes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_failures_are_classified() {
    let env = connected().await;
    let ctx = ctx(&env);
    let shared = env.app.module.shared();
    let sealer = Sealer::new(&env.app.key);
    let refresh_ctx = microsoft_outlook::tokens::store::refresh_context(env.server_id);

    // Transient: a 503 and a 429 with Retry-After are retried within the run.
    env.idp
        .fail_next_token_requests(TokenFault::ServerError { status: 503 }, 1);
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!((summary.refreshed, summary.failed), (1, 0), "{summary}");
    env.idp.fail_next_token_requests(
        TokenFault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(summary.refreshed, 1, "{summary}");
    // Still failing after the retries: counted as failed, the grant stays valid.
    env.idp
        .fail_next_token_requests(TokenFault::ServerError { status: 500 }, 5);
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(
        (summary.failed, summary.needs_reconnect),
        (1, 0),
        "{summary}"
    );
    assert_eq!(token_row(&env, env.server_id).await.status, "valid");
    env.idp.clear_faults();

    // A token endpoint slower than the timeout is a transient failure too.
    env.idp.fail_next_token_requests(
        TokenFault::Slow {
            delay: std::time::Duration::from_secs(3),
        },
        2,
    );
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(
        (summary.failed, summary.needs_reconnect),
        (1, 0),
        "{summary}"
    );
    assert_eq!(token_row(&env, env.server_id).await.status, "valid");
    env.idp.clear_faults();

    // No refresh token in the answer: the old one is kept.
    let before = sealer
        .unseal(
            token_row(&env, env.server_id)
                .await
                .refresh_token_sealed
                .as_deref()
                .expect("rt"),
            &refresh_ctx,
        )
        .expect("unseal");
    env.idp.omit_refresh_token_on_refresh(true);
    env.idp.expires_in_as_string(true);
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(summary.refreshed, 1);
    let row = token_row(&env, env.server_id).await;
    let kept = sealer
        .unseal(
            row.refresh_token_sealed.as_deref().expect("rt"),
            &refresh_ctx,
        )
        .expect("unseal");
    assert_eq!(kept.expose_secret(), before.expose_secret());
    assert!(
        row.access_expires_at > env.app.clock.now() + chrono::Duration::minutes(60),
        "expires_in given as a string is honoured"
    );
    env.idp.omit_refresh_token_on_refresh(false);
    env.idp.expires_in_as_string(false);

    // A bad client secret is the configuration's fault: operators are told, the grant stays.
    env.idp.fail_next_token_requests(
        TokenFault::OAuthError {
            status: 401,
            error: "invalid_client".into(),
            code: 7000222,
            description:
                "AADSTS7000222: The provided client secret keys for app '...' are expired.".into(),
        },
        2,
    );
    for _ in 0..2 {
        let summary = refresh_all(&ctx, &shared, None, &options())
            .await
            .expect("run");
        assert_eq!(summary.failed, 1, "{summary}");
    }
    let row = token_row(&env, env.server_id).await;
    assert_eq!(row.status, "valid");
    assert!(
        row.last_error
            .unwrap_or_default()
            .contains("client secret has expired")
    );
    let (_, notes, _) = env.admin.get("/notifications").await;
    assert_eq!(
        notes.matches("app credentials or settings refused").count(),
        1,
        "told once\n{notes}"
    );

    // invalid_grant: the mailbox needs a reconnect, with the reason and the fix.
    env.idp.fail_next_token_requests(
        TokenFault::OAuthError { status: 400, error: "invalid_grant".into(), code: 50076, description: "AADSTS50076: Due to a configuration change made by your administrator, you must use multi-factor authentication.".into() },
        1,
    );
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(summary.needs_reconnect, 1, "{summary}");
    let row = token_row(&env, env.server_id).await;
    assert_eq!(row.status, "needs_reconnect");
    assert!(row.last_error.unwrap_or_default().contains("multi-factor"));
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(
        (summary.skipped, summary.refreshed),
        (1, 0),
        "skipped afterwards"
    );
    assert_eq!(MAILBOX, server(&env, env.server_id).await.mailbox);
}

/// A hold's error does not outlive it: once the right secret is saved and the hold ends, no
/// page, table or CLI line shows the old "Last error" beside a validated token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_error_goes_when_the_hold_it_explained_ends() {
    let env = connected().await;
    let ctx = ctx(&env);
    let shared = env.app.module.shared();
    // The secret in Azure changes; the CRM still has the old one: every refresh is refused.
    const NEW_SECRET: &str = "Xy9Q~a.fresh.client.secret-value";
    env.idp
        .register_app(microsoft_simulators::identity::AppRegistration {
            client_id: crate::connect::CLIENT_ID.into(),
            client_secret: NEW_SECRET.into(),
            secret_expired: false,
            redirect_uris: vec![crate::connect::REDIRECT.into()],
        });
    let summary = refresh_all(&ctx, &shared, None, &options())
        .await
        .expect("run");
    assert_eq!(summary.failed, 1, "{summary}");
    assert!(
        token_row(&env, env.server_id)
            .await
            .last_error
            .unwrap_or_default()
            .contains("AADSTS7000215")
    );
    let held = mailbox_health::Entity::find_by_id(env.server_id)
        .one(&env.app.db)
        .await
        .expect("q")
        .expect("health");
    assert_eq!(held.reason.as_deref(), Some("client_credentials"));

    // The operator saves the right secret: the hold ends, and its error with it.
    settings(&env, &[("client_secret", NEW_SECRET)]).await;
    eventually("the hold to end", || async {
        mailbox_health::Entity::find_by_id(env.server_id)
            .one(&env.app.db)
            .await
            .expect("q")
            .is_none_or(|h| h.state == "ready")
    })
    .await;
    assert_eq!(token_row(&env, env.server_id).await.last_error, None);
    let (_, list, _) = env.admin.get("/microsoft_outlook/servers").await;
    assert!(list.contains("Outlook token validated"), "{list}");
    assert!(!list.contains("AADSTS7000215"), "{list}");
    let (_, page, _) = env
        .admin
        .get(&format!("/microsoft_outlook/servers/{}", env.server_id))
        .await;
    assert!(!page.contains("AADSTS7000215"), "{page}");
    let status = microsoft_outlook::web::status::all(&ctx)
        .await
        .expect("status");
    assert!(status.iter().all(|s| s.last_error.is_none()), "{status:?}");
    assert!(
        !microsoft_outlook::web::status::table(&status).contains("AADSTS"),
        "the CLI's table"
    );
}

/// An expiry date within the warning window warns the operators when it is saved, not at the
/// next daily run; saving again does not warn twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_expiry_saved_within_30_days_warns_at_once() {
    let env = env().await;
    let today = env.app.clock.now().date_naive();
    let expires = (today + chrono::Duration::days(5)).to_string();
    settings(&env, &[("client_secret_expires_on", &expires)]).await;
    let warned = |notes: String| notes.matches("client secret expires in 5 day(s)").count();
    eventually("the operators to be warned", || async {
        let (_, notes, _) = env.admin.get("/notifications").await;
        warned(notes) == 1
    })
    .await;
    settings(&env, &[("client_secret_expires_on", &expires)]).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, notes, _) = env.admin.get("/notifications").await;
    assert_eq!(warned(notes), 1, "warned once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_expiry_warnings_fire_once_per_threshold() {
    let env = env().await;
    let ctx = ctx(&env);
    let today = env.app.clock.now().date_naive();
    let expires = (today + chrono::Duration::days(40)).to_string();
    settings(&env, &[("client_secret_expires_on", &expires)]).await;
    let (_, page, _) = env.admin.get("/settings").await;
    assert!(
        page.contains("40 day(s) left"),
        "the settings page shows the days left"
    );
    let warnings = |page: &str| {
        page.matches("client secret expires in").count()
            + page.matches("client secret expired on").count()
    };
    let mut seen = Vec::new();
    for (day, expected) in [
        (0, 0),
        (10, 1),
        (11, 1),
        (20, 1),
        (33, 2),
        (34, 2),
        (39, 3),
        (39, 3),
        (40, 3),
        // Past the date: once more, saying it expired.
        (41, 4),
        (42, 4),
    ] {
        let target = (today + chrono::Duration::days(day))
            .and_hms_opt(9, 0, 0)
            .expect("time")
            .and_utc();
        env.app.clock.set(target);
        microsoft_outlook::jobs::check_client_secret(&ctx)
            .await
            .expect("check");
        // Sessions last 14 days on the test clock too: sign in again.
        let admin = env.app.signed_in(crate::helpers::ADMIN).await;
        let (_, notes, _) = admin.get("/notifications").await;
        seen.push((day, warnings(&notes)));
        assert_eq!(warnings(&notes), expected, "day {day}: {seen:?}");
    }
    // Each warning replaced the one before; a new secret's date far ahead resolves the last.
    let admin = env.app.signed_in(crate::helpers::ADMIN).await;
    let (_, notes, _) = admin.get("/notifications").await;
    assert_eq!(notes.matches(">Resolved<").count(), 3, "{notes}");
    assert!(notes.contains("client secret expired on"), "{notes}");
    let renewed = (today + chrono::Duration::days(400)).to_string();
    let authority = env.idp.authority_url();
    let (status, page, _) = admin
        .post_form(
            "/settings/microsoft_outlook",
            &[
                ("client_id", crate::connect::CLIENT_ID),
                ("tenant", "common"),
                ("authority_url", authority.as_str()),
                ("client_secret_expires_on", renewed.as_str()),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    microsoft_outlook::jobs::check_client_secret(&ctx)
        .await
        .expect("check");
    let (_, notes, _) = admin.get("/notifications").await;
    assert_eq!(notes.matches(">Resolved<").count(), 4, "{notes}");
    assert_eq!(warnings(&notes), 4, "the warnings stay listed, resolved");
}

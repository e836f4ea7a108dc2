//! Connecting a mailbox: the OAuth2 authorization code flow with PKCE against the simulated
//! identity platform, and every failure the operator can meet on the way.

use crate::helpers::{ADMIN, ALICE, Browser, TestApp, captured_logs, spawn_app};
use crm_sdk::Sealer;
use microsoft_simulators::identity::{
    AppRegistration, AuthorizeMode, IdentityPlatform, TestUser, TokenFault,
};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait, Statement};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;

pub(crate) const CLIENT_ID: &str = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f";
pub(crate) const CLIENT_SECRET: &str = "Qh8Q~simulated.client.secret-value";
pub(crate) const REDIRECT: &str = "https://crm.contoso.example/microsoft_outlook/confirm";
pub(crate) const MAILBOX: &str = "crm@contoso.example";

pub(crate) struct Env {
    pub app: TestApp,
    pub idp: IdentityPlatform,
    pub admin: Browser,
    pub server_id: i32,
}

pub(crate) fn user(name: &str) -> TestUser {
    TestUser {
        username: name.to_string(),
        email: Some(name.to_string()),
        oid: format!("oid-{name}"),
        tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
    }
}

async fn save_settings(admin: &Browser, idp: &IdentityPlatform, secret: &str) {
    let authority = idp.authority_url();
    let (status, page, _) = admin
        .post_form(
            "/settings/microsoft_outlook",
            &[
                ("client_id", CLIENT_ID),
                ("client_secret", secret),
                ("tenant", "common"),
                ("authority_url", &authority),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
}

pub(crate) async fn create_shared_server(admin: &Browser) -> i32 {
    let (status, page, location) = admin
        .post_form(
            "/microsoft_outlook/servers",
            &[
                ("name", "Office 365"),
                ("mailbox", MAILBOX),
                ("password", ""),
                ("smtp_host", "smtp.office365.com"),
                ("smtp_port", "587"),
                ("security", "starttls"),
                ("auth", "delegated"),
                ("transport", "smtp"),
                ("send_as", "author"),
                ("is_default", "on"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let location = location.expect("redirect to the server page");
    location
        .trim_start_matches("/microsoft_outlook/servers/")
        .split('?')
        .next()
        .and_then(|id| id.parse().ok())
        .expect("server id")
}

/// Creates the signed-in user's personal mailbox through the form; returns its id.
pub(crate) async fn create_personal(browser: &Browser, mailbox: &str) -> i32 {
    let (status, page, location) = browser
        .post_form(
            "/microsoft_outlook/my-mailbox",
            &[
                ("name", "Personal"),
                ("mailbox", mailbox),
                ("smtp_host", "smtp.office365.com"),
                ("smtp_port", "587"),
                ("security", "starttls"),
                ("send_as", "mailbox"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    location
        .expect("server page")
        .trim_start_matches("/microsoft_outlook/servers/")
        .split('?')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("id")
}

pub(crate) async fn env_with(secret: &str, secret_expired: bool) -> Env {
    let app = spawn_app().await;
    app.enable_module().await;
    let idp = IdentityPlatform::start().await.expect("identity platform");
    idp.register_app(AppRegistration {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        secret_expired,
        redirect_uris: vec![REDIRECT.into()],
    });
    idp.add_user(user(MAILBOX));
    idp.add_user(user(ALICE.0));
    idp.add_user(user("someone.else@contoso.example"));
    idp.sign_in_as(MAILBOX);
    let admin = app.signed_in(ADMIN).await;
    save_settings(&admin, &idp, secret).await;
    let server_id = create_shared_server(&admin).await;
    Env {
        app,
        idp,
        admin,
        server_id,
    }
}

pub(crate) async fn env() -> Env {
    env_with(CLIENT_SECRET, false).await
}

/// Clicks Connect: the form's POST, as the server page has it.
pub(crate) async fn post_connect(
    browser: &Browser,
    server_id: i32,
) -> (StatusCode, String, Option<String>) {
    browser
        .post_form(
            "/microsoft_outlook/connect",
            &[("server", &server_id.to_string())],
        )
        .await
}

/// Starts the connect flow; returns the authorize URL the browser is sent to.
pub(crate) async fn start_connect(browser: &Browser, server_id: i32) -> url::Url {
    let (status, page, location) = post_connect(browser, server_id).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    url::Url::parse(&location.expect("Location")).expect("authorize URL")
}

/// Follows the authorize URL at the simulated platform; returns the CRM callback path and query.
pub(crate) async fn authorize(authorize_url: &url::Url) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = http
        .get(authorize_url.as_str())
        .send()
        .await
        .expect("authorize");
    assert_eq!(
        response.status(),
        StatusCode::FOUND,
        "{}",
        response.text().await.unwrap_or_default()
    );
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("redirect")
        .to_string();
    assert!(location.starts_with(REDIRECT), "{location}");
    location
        .trim_start_matches("https://crm.contoso.example")
        .to_string()
}

pub(crate) async fn token_rows(app: &TestApp) -> u64 {
    microsoft_outlook::entities::token::Entity::find()
        .count(&app.db)
        .await
        .expect("count")
}

pub(crate) async fn connect_through(
    browser: &Browser,
    server_id: i32,
) -> (StatusCode, String, Option<String>) {
    let url = start_connect(browser, server_id).await;
    let callback = authorize(&url).await;
    browser.get(&callback).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_connects_the_shared_server_and_sees_the_token_validated() {
    let env = env().await;
    let url = start_connect(&env.admin, env.server_id).await;

    // The authorize URL carries exactly the documented parameters.
    assert_eq!(url.path(), "/common/oauth2/v2.0/authorize");
    let params: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    let keys: Vec<&str> = params.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "client_id",
            "code_challenge",
            "code_challenge_method",
            "login_hint",
            "redirect_uri",
            "response_mode",
            "response_type",
            "scope",
            "state"
        ]
    );
    assert_eq!(params["client_id"], CLIENT_ID);
    assert_eq!(params["response_type"], "code");
    assert_eq!(params["redirect_uri"], REDIRECT);
    assert_eq!(params["response_mode"], "query");
    assert_eq!(
        params["scope"],
        "openid email offline_access https://outlook.office.com/SMTP.Send"
    );
    assert_eq!(params["login_hint"], MAILBOX);
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(params["code_challenge"].len(), 43);
    assert!(
        params["state"].len() >= 22,
        "state carries at least 128 bits"
    );
    assert!(!params.contains_key("prompt"));

    let callback = authorize(&url).await;
    let (status, _, location) = env.admin.get(&callback).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = location.expect("back to the server page");
    assert_eq!(
        location,
        format!("/microsoft_outlook/servers/{}?connected=1", env.server_id)
    );
    let (status, page, _) = env.admin.get(&location).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Outlook token validated"), "{page}");
    assert!(page.contains(MAILBOX));
    assert!(page.contains("Access token expires"));
    let (_, list, _) = env.admin.get("/microsoft_outlook/servers").await;
    assert!(list.contains("Outlook token validated"));

    // Sealed at rest; the unsealed token is one Microsoft issued for the mailbox.
    let row = microsoft_outlook::entities::token::Entity::find_by_id(env.server_id)
        .one(&env.app.db)
        .await
        .expect("query")
        .expect("stored");
    assert_eq!(row.status, "valid");
    assert_eq!(row.version, 1);
    let sealer = Sealer::new(&env.app.key);
    let access = sealer
        .unseal(
            &row.access_token_sealed,
            &microsoft_outlook::tokens::store::access_context(env.server_id),
        )
        .expect("unseal");
    let refresh = sealer
        .unseal(
            row.refresh_token_sealed
                .as_deref()
                .expect("a refresh token"),
            &microsoft_outlook::tokens::store::refresh_context(env.server_id),
        )
        .expect("unseal");
    let info = env
        .idp
        .validate_access_token(access.expose_secret())
        .expect("a live token");
    assert_eq!(info.username.as_deref(), Some(MAILBOX));
    assert!(
        info.scopes
            .iter()
            .any(|s| s == "https://outlook.office.com/SMTP.Send")
    );
    for secret in [access.expose_secret(), refresh.expose_secret()] {
        assert!(!row.access_token_sealed.contains(secret));
        assert!(
            !row.refresh_token_sealed
                .as_deref()
                .unwrap_or_default()
                .contains(secret)
        );
        assert!(!page.contains(secret));
        assert!(!list.contains(secret));
        assert!(
            !captured_logs().contains(secret),
            "a token reached the logs"
        );
    }
    assert!(!captured_logs().contains(CLIENT_SECRET));

    // Disconnect forgets the tokens.
    let (status, _, location) = env
        .admin
        .post_form(
            &format!("/microsoft_outlook/servers/{}/disconnect", env.server_id),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = env.admin.get(&location.expect("back")).await;
    assert!(page.contains("Not connected"));
    assert_eq!(token_rows(&env.app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_connects_a_personal_mailbox() {
    let env = env().await;
    let alice = env.app.signed_in(ALICE).await;
    let (status, page, _) = alice.get("/microsoft_outlook/my-mailbox").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(ALICE.0), "pre-filled with her address");
    // Her part is the address: the connection details come from the settings, folded away.
    assert!(
        page.contains(r#"<details class="connection-details"><summary>"#),
        "{page}"
    );
    // A password is refused with the reason.
    let (status, page, _) = alice
        .post_form(
            "/microsoft_outlook/my-mailbox",
            &[
                ("name", "Alice"),
                ("mailbox", ALICE.0),
                ("password", "hunter2"),
                ("smtp_host", "smtp.office365.com"),
                ("smtp_port", "587"),
                ("security", "starttls"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("Leave the password empty"));
    let id = create_personal(&alice, ALICE.0).await;

    // Alice may not connect the shared server, nor the operator her mailbox: to each of them
    // it is not there.
    assert_eq!(
        post_connect(&alice, env.server_id).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(post_connect(&env.admin, id).await.0, StatusCode::NOT_FOUND);

    env.idp.sign_in_as(ALICE.0);
    let (status, _, location) = connect_through(&alice, id).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = alice.get(&location.expect("server page")).await;
    assert!(page.contains("Outlook token validated"), "{page}");
    assert!(page.contains(ALICE.0));
}

async fn assert_failure(env: &Env, page: &str, status: StatusCode, expected: &[&str]) {
    assert!(
        status.is_client_error()
            || status == StatusCode::BAD_GATEWAY
            || status == StatusCode::CONFLICT,
        "{status}"
    );
    for text in expected {
        assert!(page.contains(text), "expected {text:?} in\n{page}");
    }
    assert!(!page.contains(CLIENT_SECRET));
    assert_eq!(token_rows(&env.app).await, 0, "nothing may be stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_consent_missing_are_explained() {
    let env = env().await;
    env.idp.set_authorize_mode(AuthorizeMode::Deny {
        error: "access_denied".into(),
        description:
            "AADSTS65004: User declined to consent to access the app. <script>alert(1)</script>"
                .into(),
    });
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &["cancelled", "AADSTS65004", "&lt;script&gt;"],
    )
    .await;
    assert!(
        !page.contains("<script>alert(1)</script>"),
        "Microsoft's text is escaped"
    );

    env.idp.set_authorize_mode(AuthorizeMode::Deny {
        error: "consent_required".into(),
        description:
            "AADSTS65001: The user or administrator has not consented to use the application."
                .into(),
    });
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &["Consent", "admin consent", "AADSTS65001"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_client_secret_is_explained() {
    let env = env_with("wrong-secret-value", false).await;
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &["client secret is invalid", "AADSTS7000215", "Settings"],
    )
    .await;
    assert!(!page.contains("wrong-secret-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_secret_is_explained() {
    let env = env_with(CLIENT_SECRET, true).await;
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &["client secret has expired", "AADSTS7000222"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_uri_mismatch_shows_the_uri_to_register() {
    let env = env().await;
    env.idp.fail_next_token_requests(
        TokenFault::OAuthError {
            status: 400,
            error: "invalid_request".into(),
            code: 500112,
            description: "AADSTS500112: The reply address 'http://crm.contoso.example/microsoft_outlook/confirm' does not match the reply address 'https://crm.contoso.example/microsoft_outlook/confirm' provided when requesting Authorization code.".into(),
        },
        1,
    );
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &["redirect URI does not match", "AADSTS500112", REDIRECT],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_are_single_use_expiring_unforgeable_and_bound_to_the_user() {
    let env = env().await;

    // Forged.
    let (status, page, _) = env
        .admin
        .get("/microsoft_outlook/confirm?code=abc&state=forged-state-value")
        .await;
    assert_failure(&env, &page, status, &["unknown or was already completed"]).await;
    let (status, page, _) = env.admin.get("/microsoft_outlook/confirm?code=abc").await;
    assert_failure(&env, &page, status, &["no state"]).await;

    // Presented by another user.
    let url = start_connect(&env.admin, env.server_id).await;
    let callback = authorize(&url).await;
    let alice = env.app.signed_in(ALICE).await;
    let (status, page, _) = alice.get(&callback).await;
    assert_failure(&env, &page, status, &["started by another CRM user"]).await;

    // Expired.
    env.app.clock.advance(chrono::Duration::minutes(11));
    let (status, page, _) = env.admin.get(&callback).await;
    assert_failure(&env, &page, status, &["expired"]).await;

    // Replayed: the first use connects, the second is refused and changes nothing.
    let url = start_connect(&env.admin, env.server_id).await;
    let callback = authorize(&url).await;
    assert_eq!(env.admin.get(&callback).await.0, StatusCode::SEE_OTHER);
    let (status, page, _) = env.admin.get(&callback).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("unknown or was already completed"));
    let row = microsoft_outlook::entities::token::Entity::find_by_id(env.server_id)
        .one(&env.app.db)
        .await
        .expect("q")
        .expect("row");
    assert_eq!(row.version, 1, "a replay stores nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pkce_verifier_is_refused_by_the_platform() {
    let env = env().await;
    let url = start_connect(&env.admin, env.server_id).await;
    let callback = authorize(&url).await;
    // Swap the stored verifier for another one, sealed the same way.
    let state: String = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    let hash: String = <sha2::Sha256 as sha2::Digest>::digest(state.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let forged = Sealer::new(&env.app.key).seal(
        "a-different-verifier-0123456789-0123456789-abc",
        &format!("microsoft_outlook/oauth_state/{hash}"),
    );
    env.app
        .db
        .execute_raw(Statement::from_sql_and_values(
            env.app.db.get_database_backend(),
            match env.app.db.get_database_backend() {
                sea_orm::DbBackend::Postgres => "UPDATE microsoft_outlook_oauth_states SET pkce_verifier_sealed = $1 WHERE state_hash = $2",
                _ => "UPDATE microsoft_outlook_oauth_states SET pkce_verifier_sealed = ? WHERE state_hash = ?",
            },
            [forged.into(), hash.into()],
        ))
        .await
        .expect("update");
    let (status, page, _) = env.admin.get(&callback).await;
    assert_failure(&env, &page, status, &["proof key", "AADSTS501481"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_with_another_mailbox_is_refused_and_explained() {
    let env = env().await;
    env.idp.sign_in_as("someone.else@contoso.example");
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_failure(
        &env,
        &page,
        status,
        &[
            "Signed in with another mailbox",
            "someone.else@contoso.example (preferred_username)",
            MAILBOX,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_before_configuration_says_what_to_do() {
    let app = spawn_app().await;
    app.enable_module().await;
    let admin = app.signed_in(ADMIN).await;
    let server_id = create_shared_server(&admin).await;
    let (_, page, _) = admin
        .get(&format!("/microsoft_outlook/servers/{server_id}"))
        .await;
    assert!(page.contains("settings are incomplete"), "{page}");
    let (status, page, _) = post_connect(&admin, server_id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(page.contains("not configured"));
    assert!(page.contains("application (client) ID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_token_endpoint_is_a_clear_error_not_a_500() {
    let env = env().await;
    env.idp
        .fail_next_token_requests(TokenFault::ServerError { status: 503 }, 1);
    let (status, page, _) = connect_through(&env.admin, env.server_id).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_failure(&env, &page, status, &["temporary problem"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_form_validation_is_clear() {
    let env = env().await;
    let cases = [
        (
            ("mailbox", "not an address"),
            "Mailbox must be an e-mail address",
        ),
        (
            ("security", "none"),
            "only allowed for a relay on this machine",
        ),
        (("smtp_port", "99999"), "Port must be a number"),
        (("password", "secret"), "Leave the password empty"),
        (
            ("from_allow_list", "nobody@@example"),
            "neither an e-mail address nor @domain",
        ),
        (("extra_ca_pem", "not a pem"), "PEM text"),
    ];
    for ((field, value), message) in cases {
        let mut fields = vec![
            ("name", "X"),
            ("mailbox", "x@contoso.example"),
            ("smtp_host", "smtp.office365.com"),
            ("smtp_port", "587"),
            ("security", "starttls"),
        ];
        fields.retain(|(k, _)| *k != field);
        fields.push((field, value));
        let (status, page, _) = env
            .admin
            .post_form("/microsoft_outlook/servers", &fields)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}");
        assert!(page.contains(message), "{field}: {message}");
    }
    let count = env
        .app
        .db
        .query_one_raw(Statement::from_string(
            env.app.db.get_database_backend(),
            "SELECT COUNT(*) FROM microsoft_outlook_mail_servers".to_string(),
        ))
        .await
        .expect("q")
        .expect("row")
        .try_get_by_index::<i64>(0)
        .expect("n");
    assert_eq!(count, 1, "only the server made by the setup");
    // A local relay without TLS is allowed.
    let (status, _, _) = env
        .admin
        .post_form(
            "/microsoft_outlook/servers",
            &[
                ("name", "Relay"),
                ("mailbox", "relay@contoso.example"),
                ("smtp_host", "127.0.0.1"),
                ("smtp_port", "2525"),
                ("security", "none"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

/// An expired sign-in leads back to the server it was for, when the viewer may open it;
/// otherwise to where they may go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_sign_in_leads_back_to_its_server() {
    let env = env().await;
    let url = start_connect(&env.admin, env.server_id).await;
    let callback = authorize(&url).await;
    env.app.clock.advance(chrono::Duration::minutes(11));
    let (status, page, _) = env.admin.get(&callback).await;
    assert_failure(&env, &page, status, &["longer than 10 minutes"]).await;
    let server_page = format!(r#"href="/microsoft_outlook/servers/{}""#, env.server_id);
    assert!(page.contains(&server_page), "{page}");
    assert!(
        !page.contains("/microsoft_outlook/my-mailbox\">Back"),
        "{page}"
    );

    // A sign-in that cannot be matched to a server: the operator goes to the servers.
    let (_, page, _) = env
        .admin
        .get("/microsoft_outlook/confirm?code=abc&state=forged-state-value")
        .await;
    assert!(
        page.contains(r#"href="/microsoft_outlook/servers">Back to mail servers"#),
        "{page}"
    );
}

/// A user who opens a shared server is sent where they may go, and the list's refusal says
/// what they cannot do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_sent_to_their_mailbox_from_a_shared_server() {
    let env = env().await;
    let alice = env.app.signed_in(ALICE).await;
    for path in [
        format!("/microsoft_outlook/servers/{}", env.server_id),
        format!("/microsoft_outlook/servers/{}/delete", env.server_id),
    ] {
        let (status, page, _) = alice.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            page.contains(r#"href="/microsoft_outlook/my-mailbox">Go to My mailbox"#),
            "{path}: {page}"
        );
        assert!(
            !page.contains(r#"href="/microsoft_outlook/servers">"#),
            "{path}: {page}"
        );
    }
    let (status, page, _) = alice.get("/microsoft_outlook/servers").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("You cannot manage mail servers"), "{page}");
    assert!(!page.contains("this mail server"), "{page}");
    // The operator's 404 still leads to the list.
    let (_, page, _) = env.admin.get("/microsoft_outlook/servers/999999").await;
    assert!(
        page.contains(r#"href="/microsoft_outlook/servers">Back to mail servers"#),
        "{page}"
    );
}

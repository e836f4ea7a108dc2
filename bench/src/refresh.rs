//! Refresh: the nightly job's `refresh_all` over many connected mailboxes against the simulated
//! token endpoint, versus a raw loop of the same POSTs with the same HTTP client and concurrency.

use anyhow::Context as _;
use futures::StreamExt;
use microsoft_outlook::entities::token;
use microsoft_outlook::jobs::{RefreshOptions, refresh_all};
use microsoft_simulators::identity::TestUser;
use sea_orm::EntityTrait;
use sea_orm::sea_query::Expr;
use std::time::Instant;

use crate::drain::Run;
use crate::services::Idp;
use crate::setup::{App, Assembled};

/// The options the benchmark runs `refresh_all` with: the defaults (concurrency 8), no jitter.
pub fn options() -> RefreshOptions {
    RefreshOptions {
        max_jitter: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// Signs every mailbox in once through the simulated authorize and token endpoints (the
/// authorization-code grant) and returns their refresh tokens, in order.
pub async fn issue_refresh_tokens(
    idp: &Idp,
    app: &App,
    redirect_uri: &str,
    mailboxes: &[String],
) -> anyhow::Result<Vec<String>> {
    for (i, mailbox) in mailboxes.iter().enumerate() {
        idp.platform.add_user(TestUser {
            username: mailbox.clone(),
            email: Some(mailbox.clone()),
            oid: format!("00000000-0000-0000-0000-{i:012}"),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        });
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let base = format!("{}/common/oauth2/v2.0", idp.platform.authority_url());
    let scope = "openid email offline_access https://outlook.office.com/SMTP.Send";
    let tokens: Vec<anyhow::Result<String>> = futures::stream::iter(mailboxes)
        .map(|mailbox| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let answer = http
                    .get(format!("{base}/authorize"))
                    .query(&[
                        ("client_id", app.client_id.as_str()),
                        ("response_type", "code"),
                        ("redirect_uri", redirect_uri),
                        ("scope", scope),
                        ("state", "bench"),
                        ("login_hint", mailbox.as_str()),
                    ])
                    .send()
                    .await?;
                let location = answer
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .context("the authorize endpoint did not redirect")?;
                let code = url::Url::parse(location)?
                    .query_pairs()
                    .find(|(k, _)| k == "code")
                    .map(|(_, v)| v.into_owned())
                    .context("no code in the redirect")?;
                let tokens: serde_json::Value = http
                    .post(format!("{base}/token"))
                    .form(&[
                        ("grant_type", "authorization_code"),
                        ("code", code.as_str()),
                        ("redirect_uri", redirect_uri),
                        ("client_id", app.client_id.as_str()),
                        ("client_secret", app.client_secret.as_str()),
                        ("scope", scope),
                    ])
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                tokens["refresh_token"]
                    .as_str()
                    .map(str::to_string)
                    .context("no refresh token in the answer")
            }
        })
        .buffered(16)
        .collect()
        .await;
    tokens.into_iter().collect()
}

/// Forgets when the tokens were last refreshed (so that a new run refreshes all of them).
pub async fn reset(a: &Assembled) -> anyhow::Result<()> {
    token::Entity::update_many()
        .col_expr(
            token::Column::LastRefreshAt,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        .exec(&a.db)
        .await?;
    Ok(())
}

/// The module: `jobs::refresh_all` over every connected mailbox.
pub async fn module(a: &Assembled, expected: usize) -> anyhow::Result<Run> {
    reset(a).await?;
    let options = options();
    let started = Instant::now();
    let summary = refresh_all(&a.ctx, &a.shared, None, &options).await?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        summary.refreshed == expected,
        "the refresh run did not refresh every mailbox: {summary}"
    );
    Ok(Run::new(expected, secs))
}

/// The baseline: the same refresh-token POSTs (form as the module sends it) with the module's
/// HTTP client, at the same concurrency, reading each answer; no database, no sealing.
pub async fn raw_loop(
    a: &Assembled,
    idp: &Idp,
    app: &App,
    refresh_tokens: &[String],
) -> anyhow::Result<Run> {
    let http = a.shared.http.clone();
    let url = format!("{}/common/oauth2/v2.0/token", idp.platform.authority_url());
    let concurrency = options().concurrency.max(1);
    let refresh_scope = microsoft_outlook::settings::Cloud::Global
        .refresh_scope(microsoft_outlook::settings::Resource::Outlook);
    let refresh_scope = &refresh_scope;
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(refresh_tokens)
        .map(|refresh| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs([
                        ("client_id", app.client_id.as_str()),
                        ("client_secret", app.client_secret.as_str()),
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh.as_str()),
                        ("scope", refresh_scope.as_str()),
                    ])
                    .finish();
                let answer = http
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("accept", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    answer.status().is_success(),
                    "token endpoint answered {}",
                    answer.status()
                );
                answer.bytes().await?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(Run::new(refresh_tokens.len(), secs))
}

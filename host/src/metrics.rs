//! `GET /metrics`: every enabled module's metrics in the Prometheus text format, for an
//! operator's session or a scraper presenting `Authorization: Bearer <metrics_token>`.

use actix_web::{HttpRequest, HttpResponse, web};
use crm_sdk::CurrentUser;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::state::AppState;

/// Whether the request presents the configured bearer token (no token configured: never).
fn bearer_ok(req: &HttpRequest, configured: Option<&SecretString>) -> bool {
    let Some(configured) = configured.filter(|t| !t.expose_secret().is_empty()) else {
        return false;
    };
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared as digests, so that the time taken does not tell how much of it matched.
    Sha256::digest(presented.trim().as_bytes())
        == Sha256::digest(configured.expose_secret().as_bytes())
}

async fn metrics(
    state: web::Data<AppState>,
    user: Option<CurrentUser>,
    req: HttpRequest,
) -> HttpResponse {
    let allowed = user.as_ref().is_some_and(|u| u.is_admin)
        || bearer_ok(&req, state.config.metrics_token.as_ref());
    if !allowed {
        return match user {
            Some(_) => HttpResponse::Forbidden().body("Operators only."),
            None => HttpResponse::Unauthorized()
                .insert_header(("WWW-Authenticate", "Bearer"))
                .body("Sign in as an operator, or present the metrics token as a Bearer token."),
        };
    }
    let mut text = String::new();
    for entry in state.registry.entries() {
        if entry.is_enabled()
            && let Some(module_text) = entry.module.metrics(&entry.ctx).await
        {
            text.push_str(&module_text);
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .body(text)
}

/// The metrics route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics));
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn only_the_configured_bearer_token_opens_the_metrics() {
        let token = SecretString::from("s3cret-scrape-token");
        let with = |header: &str| {
            TestRequest::default()
                .insert_header(("Authorization", header))
                .to_http_request()
        };
        assert!(bearer_ok(&with("Bearer s3cret-scrape-token"), Some(&token)));
        assert!(!bearer_ok(&with("Bearer s3cret"), Some(&token)));
        assert!(!bearer_ok(&with("Basic s3cret-scrape-token"), Some(&token)));
        assert!(!bearer_ok(
            &TestRequest::default().to_http_request(),
            Some(&token)
        ));
        // No token configured: no bearer opens them, not even an empty one.
        assert!(!bearer_ok(&with("Bearer "), None));
        assert!(!bearer_ok(&with("Bearer "), Some(&SecretString::from(""))));
    }
}

//! What an address the CRM does not know answers: a small page in the host's layout that says
//! so and links to the start page (JSON for a script), instead of an empty 404.

use actix_web::{HttpRequest, HttpResponse, web};
use crm_sdk::CurrentUser;
use maud::html;

use crate::html::HostChrome;
use crate::state::AppState;

/// The 404 answer, as a page in `chrome` (or JSON when `wants_json`).
pub fn response(chrome: &HostChrome, user: Option<&CurrentUser>, wants_json: bool) -> HttpResponse {
    let words = "There is no page at this address.";
    if wants_json {
        return HttpResponse::NotFound()
            .json(serde_json::json!({ "error": "not_found", "message": words }));
    }
    let body = html! {
        h1 { "Page not found" }
        section.card {
            p { (words) " The link may be old, or the address mistyped." }
            p { a.button href="/" { "Go to the start page" } }
        }
    };
    HttpResponse::NotFound()
        .content_type("text/html; charset=utf-8")
        .body(chrome.render("Not found", user, body).into_string())
}

/// The default service: every request no route answers.
pub async fn page(
    req: HttpRequest,
    state: web::Data<AppState>,
    user: Option<CurrentUser>,
) -> HttpResponse {
    response(&state.chrome, user.as_ref(), wants_json(&req))
}

/// Whether the request asks for JSON (`Accept: application/json`): a script, not a browser.
pub fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

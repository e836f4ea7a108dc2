//! What a disabled module's pages answer: a page that says the module is disabled and who can
//! enable it, instead of an empty 404.

use actix_web::{HttpRequest, HttpResponse, web};
use crm_sdk::CurrentUser;
use maud::html;

use crate::state::AppState;

/// The answer to a request under the route prefix of the disabled module `name`.
pub async fn page(
    req: HttpRequest,
    state: web::Data<AppState>,
    user: Option<CurrentUser>,
    name: String,
) -> HttpResponse {
    let wants_json = crate::not_found::wants_json(&req);
    let words = format!(
        "The {name} module is disabled in this CRM. An operator can enable it on the Modules page."
    );
    if wants_json {
        return HttpResponse::NotFound()
            .json(serde_json::json!({ "error": "module_disabled", "message": words }));
    }
    let body = html! {
        h1 { (name) " is disabled" }
        section.card role="alert" {
            p { (words) }
            @match &user {
                Some(u) if u.is_admin => p { a.button href="/modules" { "Open Modules" } " Its data and settings were kept: enabling it resumes where it stopped." },
                Some(_) => p { "Ask one of the CRM's operators (administrators) to enable it." },
                None => p { a href=(crm_sdk::SIGN_IN_PATH) { "Sign in" } },
            }
        }
    };
    HttpResponse::NotFound()
        .content_type("text/html; charset=utf-8")
        .body(
            state
                .chrome
                .render("Module disabled", user.as_ref(), body)
                .into_string(),
        )
}

use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError, dev::Payload};
use std::future::{Ready, ready};

/// Where the host signs people in; modules redirect there when nobody is signed in.
pub const SIGN_IN_PATH: &str = "/login";
/// The form field that carries the CSRF token on every state-changing form.
pub const CSRF_FIELD: &str = "csrf_token";
/// The header that carries the CSRF token on scripted (JSON) requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The signed-in user, as the host tells it to modules (an actix extractor).
#[derive(Debug, Clone)]
pub struct CurrentUser {
    /// The user's id in the host.
    pub id: i64,
    /// The user's e-mail address (their own mailbox).
    pub email: String,
    /// The user's display name.
    pub name: String,
    /// Whether the user is an operator (administrator).
    pub is_admin: bool,
    /// The CSRF token of the user's session, to put in forms as [`CSRF_FIELD`].
    pub csrf_token: String,
}

/// Nobody is signed in: the response sends the browser to the sign-in page.
#[derive(Debug, thiserror::Error)]
#[error("sign in to continue")]
pub struct SignInRequired {
    next: String,
}

impl ResponseError for SignInRequired {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::SEE_OTHER
    }

    fn error_response(&self) -> HttpResponse {
        let next: String = url::form_urlencoded::byte_serialize(self.next.as_bytes()).collect();
        HttpResponse::SeeOther()
            .insert_header(("Location", format!("{SIGN_IN_PATH}?next={next}")))
            .finish()
    }
}

impl FromRequest for CurrentUser {
    type Error = SignInRequired;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let found = req.extensions().get::<CurrentUser>().cloned();
        ready(found.ok_or_else(|| {
            SignInRequired {
                next: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            }
        }))
    }
}

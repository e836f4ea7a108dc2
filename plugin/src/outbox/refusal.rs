//! A refused mail: the HTTP status and what is wrong, per field, in words for the person who
//! wrote it.

use actix_web::http::StatusCode;
use crm_sdk::FieldError;

/// A refused mail: the HTTP status and what is wrong, per field.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// 4xx, or 503 when the database did not answer.
    pub status: StatusCode,
    /// The problems.
    pub errors: Vec<FieldError>,
}

/// A refusal with one problem, on `field`.
pub fn refuse(status: StatusCode, field: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        errors: vec![FieldError {
            field: field.into(),
            message: message.into(),
        }],
    }
}

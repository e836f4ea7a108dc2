//! The outbox console (`/outbox`): every mail for operators, one's own mails for everybody
//! else; filters, search, a mail's detail page, and the actions on mails — retry, cancel, and
//! releasing a held mailbox — one by one or in bulk on a filtered set after a confirmation
//! that says how many. Every page answers JSON too (`Accept: application/json`), and every
//! action takes JSON with the `X-CSRF-Token` header.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, NaiveDate, Utc};
use crm_sdk::{CurrentUser, FieldError, ModuleContext};
use maud::{Markup, html};
use sea_orm::sea_query::{BinOper, Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use crate::delivery::health::Health;
use crate::entities::{mail_server, outbox, outbox_body};
use crate::runtime::Shared;
use crate::web::layout::{csrf, page, page_with};
use crate::web::mail_routes::{
    MailView, classified_reply, for_viewer, json_refusal, status_badge, wants_json,
};

/// Mails per page.
pub const PER_PAGE: u64 = 50;
const OUTBOX: &str = "/microsoft_outlook/outbox";
/// Statuses a mail may be retried or cancelled from.
const ACTIONABLE: [&str; 2] = ["queued", "failed"];

/// The statuses from which `user` may take `action` (`retry` or `cancel`): a user retries
/// only failed mails (a queued one waits out its back-off); operators may make a queued mail
/// due now too.
fn actionable_by(user: &CurrentUser, action: &str) -> &'static [&'static str] {
    if action == "retry" && !user.is_admin {
        &["failed"]
    } else {
        &ACTIONABLE
    }
}

mod actions;

/// What Release held mail did, wherever it was clicked.
pub(crate) const RELEASED_FLASH: &str = "Held mail released: the hold was lifted, and any mails that waited are being sent in queue order.";
mod detail;
mod filter;
mod message;
mod views;

use actions::*;
pub use actions::{Changed, cancel, retry};
pub use detail::headers_of;
use detail::*;
pub use filter::Filter;
use filter::*;
pub use views::OutboxMail;
use views::*;

/// The outbox routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/outbox", web::get().to(list))
        .route("/outbox/bulk", web::post().to(bulk))
        .route("/outbox/release/{server}", web::post().to(release))
        .route("/outbox/{id}", web::get().to(detail))
        .route("/outbox/{id}/cancel", web::get().to(confirm_cancel))
        .route("/outbox/{id}/{action}", web::post().to(one));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_unfolded_in_order() {
        let raw = "From: a@b.example\r\nSubject: a long\r\n subject\r\nTo: c@d.example\r\n\r\nBody: not a header\r\n";
        assert_eq!(
            headers_of(raw),
            vec![
                ("From".to_string(), "a@b.example".to_string()),
                ("Subject".to_string(), "a long subject".to_string()),
                ("To".to_string(), "c@d.example".to_string()),
            ]
        );
    }

    #[test]
    fn a_letter_matches_in_either_case_and_other_characters_as_themselves() {
        assert_eq!(case_forms('ä'), ['ä', 'Ä']);
        assert_eq!(case_forms('Ä'), ['Ä', 'ä']);
        assert_eq!(case_forms('a'), ['a', 'A']);
        assert_eq!(case_forms('%'), ['%']);
        // A letter whose other case is two characters keeps the forms that are one.
        assert_eq!(case_forms('ß'), ['ß']);
    }

    #[test]
    fn the_query_string_keeps_only_what_is_set() {
        let f = Filter {
            status: "sent".into(),
            q: "dana & co".into(),
            ..Filter::default()
        };
        assert_eq!(f.query(1), "status=sent&q=dana+%26+co");
        assert_eq!(f.query(2), "status=sent&q=dana+%26+co&page=2");
    }
}

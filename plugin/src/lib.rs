//! The `microsoft_outlook` CRM module: connect Microsoft 365 / Exchange Online mailboxes with
//! OAuth2 and send CRM mail through them.

mod module;

pub use module::OutlookModule;

//! The module's pages and routes: mail servers and personal mailboxes, the outbox console, the
//! queue route of the records, the connection test, the status API and the setup guide.

pub mod compose_box;
pub mod layout;
pub mod mail_routes;
pub mod mail_words;
pub mod outbox_page;
pub mod pages;
pub mod server_form;
pub mod servers;
pub mod setup_guide;
pub mod status;
pub mod status_block;
pub mod test_connection;

//! Delivery: the drains of mailboxes with due mail, the limits they keep, and the transports
//! that carry a batch (SMTP with XOAUTH2; Microsoft Graph next).

pub mod drain;
pub mod drains;
pub mod limits;
pub mod smtp_transport;
pub mod transport;

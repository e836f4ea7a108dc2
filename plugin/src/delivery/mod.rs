//! Delivery: the drains of mailboxes with due mail, each mailbox's health (ready, throttled,
//! held; a hold begun and ended), the classification of what servers answer, the limits the drains keep, and the
//! transports that carry a batch (SMTP with XOAUTH2; Microsoft Graph next).

pub mod attempt;
pub mod classify;
pub mod drain;
pub mod drains;
pub mod graph;
pub mod graph_draft;
pub mod graph_replies;
pub mod health;
pub mod hold;
pub mod limits;
pub mod outcomes;
pub mod release;
pub mod smtp;
pub mod smtp_open;
pub mod smtp_slots;
pub mod smtp_tls;
pub mod smtp_transaction;
pub mod smtp_transport;
pub mod transport;
pub mod unreachable;
pub mod waiting;
pub mod xoauth2;

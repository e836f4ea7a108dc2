//! The outbox: the truth of every mail. Composing a mail, queuing it with its body, claims and
//! outcomes a batch at a time, and telling people when a mail failed.

pub mod admit;
pub mod attachments;
pub mod claims;
pub mod compose;
pub mod failed_notice;
pub mod group_insert;
pub mod history;
pub mod lease;
pub mod markdown;
pub mod queue;
pub mod record;
pub mod refusal;
pub mod sweep;
pub mod user_words;

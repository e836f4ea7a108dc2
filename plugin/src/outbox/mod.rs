//! The outbox: the truth of every mail. Claims and outcomes, a batch at a time.

pub mod claims;

//! Tokens: sealed at rest in the module's table, fresh when a drain needs one, refreshed with a
//! compare-and-swap on the row's version so that a rotated refresh token is never lost.

pub mod service;
pub mod store;

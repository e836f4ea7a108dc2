//! Connecting a mailbox: the authorize request, the callback at `/microsoft_outlook/confirm`,
//! the token endpoint's client and the AADSTS errors in words.

pub mod aad;
pub mod confirm;
pub mod oauth;
pub mod token_client;

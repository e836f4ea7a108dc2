//! End-to-end tests of the host and the microsoft_outlook module (one binary; SQLite by default,
//! PostgreSQL when TEST_DATABASE_URL names a server).

mod foundation;
mod helpers;

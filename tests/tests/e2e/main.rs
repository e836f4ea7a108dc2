//! End-to-end tests of the host and the microsoft_outlook module (one binary; SQLite by default,
//! PostgreSQL when TEST_DATABASE_URL names a server).

mod cluster;
mod compose;
mod connect;
mod console;
mod foundation;
mod fuzz;
mod graph;
mod health;
#[allow(dead_code)] // shared by every suite; not each suite uses each helper
mod helpers;
mod operator;
mod security;
mod send;
mod tokens;

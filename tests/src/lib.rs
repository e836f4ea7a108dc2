//! Simulated Microsoft services (identity platform, SMTP submission, Graph) for the tests and
//! the demo, plus test support shared by the end-to-end suites.

pub mod cluster;
pub mod identity;
pub mod smtp;
pub mod testdb;

//! Test support shared by the end-to-end suites: a cluster of host processes and test
//! databases. The simulated Microsoft services are the `microsoft-simulators` crate's.

pub mod cluster;
pub mod testdb;

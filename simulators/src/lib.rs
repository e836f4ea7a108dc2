//! The simulated Microsoft services — the Microsoft identity platform (Entra ID v2 authorize and
//! token endpoints), Exchange Online SMTP submission and the Microsoft Graph mail API — used by
//! the demo (`crm-host demo`), the end-to-end tests and the benchmarks. They answer as
//! ../shared/MICROSOFT.md says Microsoft does, errors included.

pub mod graph;
pub mod identity;
pub mod smtp;

//! A thread-per-core node proxy for Istio ambient mesh. See ARCHITECTURE.md for the threads,
//! ports and data paths; `app::start` is the one place where it is all wired together.

pub mod app;
pub mod config;
pub mod control;
pub mod model;
pub mod net;
pub mod rbac;
pub mod routing;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod worker;
pub mod xds;

//! A thread-per-core node proxy for Istio ambient mesh. See ARCHITECTURE.md for the threads,
//! ports and data paths; `app::start` is the one place where it is all wired together.
//!
//! `unsafe` is denied everywhere but `sys`, where each block carries its argument.
#![deny(unsafe_code)]

pub mod app;
pub mod config;
pub mod control;
pub mod dns;
pub mod hbone;
pub mod inpod;
pub mod model;
pub mod net;
pub mod rbac;
pub mod routing;
pub mod snapshot;
#[allow(unsafe_code)]
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod worker;

//! A load generator and scenario runner for ztunnel-compatible proxies: throughput, latency
//! histograms, connection rate and idle memory, direct versus through the proxy, measured from
//! /proc, reported as JSON, markdown and an SVG plot. See perf/README.md.

pub mod agent;
pub mod dns;
pub mod inpod;
pub mod load;
pub mod netns;
pub mod plot;
pub mod profile;
pub mod proxy;
pub mod report;
pub mod scenario;
pub mod server;

pub use scenario::{Report, RunOpts, Scenario, run};

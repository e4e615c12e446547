//! The perf harness end to end against this build of the proxy, in quick mode: every test runs
//! on every path, figures are non-zero, histograms are filled, the report files are written,
//! and `--compare` interleaves a second proxy. No timing is asserted.
//!
//! It uses the proxy's default ports (as any ztunnel-compatible binary would), so it fails with
//! a clear message if another proxy is running on this machine.

mod common;

use perf::{RunOpts, Scenario};

#[test]
fn quick_local_run_produces_a_complete_report() {
    let dir = common::TestDir::new("perf");
    let proxy = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"));
    let opts = RunOpts {
        scenario: Scenario::Local,
        quick: true,
        proxy: proxy.clone(),
        compare: Some(proxy),
        out: dir.0.clone(),
        reps: Some(1),
        progress: false,
        policies: 5,
        tests: Vec::new(),
        paths: Vec::new(),
        profile: false,
        node_b: None,
    };
    let report = perf::run(&opts).expect("the harness runs");
    assert!(report.failures.is_empty(), "no test failed: {:?}", report.failures);
    // Each proxy's own view of the run is saved next to the report.
    let saved: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("metrics-") || n.starts_with("latency-"))
        .collect();
    assert!(saved.iter().any(|n| n.starts_with("metrics-")), "a metrics scrape saved: {saved:?}");
    assert!(saved.iter().any(|n| n.starts_with("latency-")), "/stats/latency saved: {saved:?}");
    for f in ["report.json", "report.md", "latency.svg", "config.yaml"] {
        let meta = std::fs::metadata(dir.0.join(f)).unwrap_or_else(|_| panic!("{f} written"));
        assert!(meta.len() > 0, "{f} is not empty");
    }
    assert_eq!(report.proxies.len(), 2);
    let labels: Vec<String> = report.proxies.iter().map(|p| p.label.clone()).collect();
    for test in ["bulk_1", "bulk_8", "rr_1b", "rr_1k", "rr_open_1b", "connrate"] {
        for (path, proxy) in [("direct", "none"), ("tcp", labels[0].as_str()), ("tcp", labels[1].as_str())] {
            let r = report
                .records
                .iter()
                .find(|r| r.test == test && r.path == path && r.proxy == proxy)
                .unwrap_or_else(|| panic!("{test} on {path} through {proxy} was measured"));
            match test {
                "bulk_1" | "bulk_8" => assert!(r.metrics["gbit_per_s"].as_f64().unwrap() > 0.0),
                "connrate" => assert!(r.metrics["connections"].as_u64().unwrap() > 0),
                _ => {
                    let lat = r.latency.as_ref().expect("latency recorded");
                    assert!(lat.count > 0 && lat.p50_us > 0.0 && lat.max_us >= lat.p99_us);
                    assert!(!r.histogram.as_ref().unwrap().is_empty(), "full histogram saved");
                }
            }
            if proxy != "none" {
                assert!(r.cpu_seconds.is_some() && r.peak_rss_bytes.unwrap() > 0, "proxy measured from /proc");
                let unit = match test {
                    "bulk_1" | "bulk_8" => "mb",
                    "connrate" => "connection",
                    _ => "round_trip",
                };
                let key = format!("context_switches_per_{unit}");
                assert!(r.efficiency[&key].as_f64().is_some_and(|v| v >= 0.0), "{key} on {test}: {:?}", r.efficiency);
            }
        }
    }
    // Each proxy's start is recorded, once per instance and repetition.
    for label in &labels {
        let starts: Vec<_> = report.records.iter().filter(|r| r.test == "start" && &r.proxy == label).collect();
        assert_eq!(starts.len(), 1, "one start record for {label}");
        let m = &starts[0].metrics;
        assert_eq!(starts[0].path, "local", "the start record names the instance");
        assert!(m["ready_ms"].as_f64().is_some_and(|v| v > 0.0), "time to ready: {m}");
        let (rss, anon) = (m["rss_bytes"].as_u64().unwrap(), m["rss_anon_bytes"].as_u64().unwrap());
        assert!(anon > 0 && anon < rss, "anonymous RSS is part of the RSS: {m}");
    }
    assert!(md_has_start_ratios(&dir.0), "--compare puts the start figures among the ratios");
    let idle = report.records.iter().find(|r| r.test == "idle" && r.path == "tcp").expect("idle measured");
    assert_eq!(idle.metrics["connections"], 100);
    // HBONE is either measured or reported unavailable with a reason, never silently missing.
    let hbone_measured = report.records.iter().any(|r| r.path == "hbone");
    let hbone_unavailable = report.unavailable.iter().any(|u| u.path == "hbone" && !u.reason.is_empty());
    assert!(hbone_measured || hbone_unavailable);
    let md = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
    assert!(md.contains("## Ratios of medians") && md.contains("relative to the direct path"));
    assert!(std::fs::read_to_string(dir.0.join("latency.svg")).unwrap().contains("<polyline"));
    assert!(std::fs::read_dir(dir.0.join("hist")).unwrap().count() >= 4, "hgrm files written");
    subsets_run_only_what_was_asked_and_unknown_names_are_refused();
}

/// Part of the test above (both bind the proxy's default ports, so they cannot run at once).
fn subsets_run_only_what_was_asked_and_unknown_names_are_refused() {
    let dir = common::TestDir::new("perf-subset");
    let proxy = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"));
    let opts = |tests: &[&str], paths: &[&str]| RunOpts {
        scenario: Scenario::Local,
        quick: true,
        proxy: proxy.clone(),
        compare: None,
        out: dir.0.clone(),
        reps: Some(1),
        progress: false,
        policies: 0,
        tests: tests.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
        profile: false,
        node_b: None,
    };
    let err = perf::run(&opts(&["rr_2b"], &[])).expect_err("an unknown test is refused").to_string();
    assert!(err.contains("rr_2b") && err.contains("rr_1b"), "{err}");
    let err = perf::run(&opts(&[], &["udp"])).expect_err("an unknown path is refused").to_string();
    assert!(err.contains("udp"), "{err}");
    let report = perf::run(&opts(&["rr_1b"], &["tcp"])).expect("the harness runs");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // The proxy's start is recorded whatever the subset; the tests are only those asked for.
    let seen: Vec<(String, String)> =
        report.records.iter().filter(|r| r.test != "start").map(|r| (r.test.clone(), r.path.clone())).collect();
    assert_eq!(seen, vec![("rr_1b".to_string(), "tcp".to_string())], "one test on one path");
}

fn md_has_start_ratios(dir: &std::path::Path) -> bool {
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    md.contains("## Start: until ready") && md.contains("| anonymous RSS at start, MiB | local |")
}

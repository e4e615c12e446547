//! Turns raw records into `report.json`, `report.md`, `latency.svg` and `hist/*.hgrm`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use crate::load;
use crate::scenario::{Record, Report};

/// Median, min and max of a set of values.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some(Stat { median, min: v[0], max: v[v.len() - 1], n: v.len() })
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(s: Option<Stat>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 => fmt_num(s.median),
        Some(s) => format!("{} [{}-{}]", fmt_num(s.median), fmt_num(s.min), fmt_num(s.max)),
    }
}

type Key = (String, String, String);
/// A table column: records of one row -> the cell.
type Column = Box<dyn Fn(&[&Record]) -> String>;
/// A figure: record -> value.
type Figure = Box<dyn Fn(&Record) -> Option<f64>>;

fn group(records: &[Record]) -> BTreeMap<Key, Vec<&Record>> {
    let mut g: BTreeMap<Key, Vec<&Record>> = BTreeMap::new();
    for r in records {
        g.entry((r.test.clone(), r.path.clone(), r.proxy.clone())).or_default().push(r);
    }
    g
}

fn values(rs: &[&Record], f: impl Fn(&Record) -> Option<f64>) -> Option<Stat> {
    stat(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
}

fn metric(name: &'static str) -> impl Fn(&Record) -> Option<f64> {
    move |r: &Record| r.metrics.get(name).and_then(|v| v.as_f64())
}

fn eff(name: &'static str) -> impl Fn(&Record) -> Option<f64> {
    move |r: &Record| r.efficiency.get(name).and_then(|v| v.as_f64())
}

fn lat(f: fn(&load::Percentiles) -> f64) -> impl Fn(&Record) -> Option<f64> {
    move |r: &Record| r.latency.as_ref().map(f)
}

fn mib(r: &Record) -> Option<f64> {
    r.peak_rss_bytes.map(|b| b as f64 / (1024.0 * 1024.0))
}

const TESTS: [(&str, &str); 8] = [
    ("start", "Start: until ready, and resident memory then"),
    ("bulk_1", "Bulk throughput, 1 stream"),
    ("bulk_8", "Bulk throughput, 8 streams"),
    ("rr_1b", "Request/response, 1 byte, closed loop"),
    ("rr_1k", "Request/response, 1 KiB, closed loop"),
    ("rr_open_1b", "Request/response, 1 byte, open loop at a fixed rate"),
    ("connrate", "Connection rate, 8 clients (connect, 1-byte echo, close)"),
    ("idle", "Idle connections held open"),
];

/// Writes every output file and fills `report.merged`.
pub fn finish(report: &mut Report, out: &Path) -> anyhow::Result<()> {
    let groups = group(&report.records);
    for ((test, path, proxy), rs) in &groups {
        let mut merged = load::new_histogram();
        for r in rs {
            for (v, c) in r.histogram.iter().flatten() {
                merged.saturating_record_n(*v, *c);
            }
        }
        if !merged.is_empty() {
            std::fs::write(out.join("hist").join(format!("{test}-{path}-{proxy}.hgrm")), load::hgrm(&merged))?;
            report.merged.push((test.clone(), path.clone(), proxy.clone(), merged));
        }
    }
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(out.join("report.md"), markdown(report, &groups))?;
    if report.records.iter().any(|r| r.profile.is_some()) {
        std::fs::write(out.join("profile.md"), profile_markdown(&groups))?;
    }
    std::fs::write(out.join("latency.svg"), crate::plot::svg(&report.merged))?;
    Ok(())
}

fn markdown(report: &Report, groups: &BTreeMap<Key, Vec<&Record>>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# perf report: `{:?}` scenario\n", report.scenario);
    let _ = writeln!(
        md,
        "Started {} on {} cores ({}), kernel {}. {} repetition(s){}. Cells are the median over repetitions \
         with [min-max]; CPU figures are the proxy's (all its processes) while the test ran.\n",
        report.started,
        report.host["cores"],
        report.host["cpu"].as_str().unwrap_or("?"),
        report.host["kernel"].as_str().unwrap_or("?"),
        report.reps,
        if report.quick { ", quick mode (tiny counts: a smoke test, not a measurement)" } else { "" }
    );
    if report.policies > 0 {
        let _ = writeln!(
            md,
            "{} authorization policies in the config, all evaluated for every inbound connection.\n",
            report.policies
        );
    }
    for p in &report.proxies {
        let _ = writeln!(md, "- proxy `{}`: `{}`", p.label, p.binary);
    }
    for u in &report.unavailable {
        let _ = writeln!(md, "- path `{}` through `{}` unavailable: {}", u.path, u.proxy, u.reason);
    }
    for f in &report.failures {
        let _ = writeln!(
            md,
            "- FAILED: `{}` on `{}` through `{}`, repetition {}: {}",
            f.test,
            f.path,
            f.proxy,
            f.rep + 1,
            f.error
        );
    }
    let _ = writeln!(md);

    let keys_for = |test: &'static str| groups.iter().filter(move |((t, _, _), _)| t == test);
    for (test, title) in TESTS {
        if keys_for(test).next().is_none() {
            continue;
        }
        let _ = writeln!(md, "## {title} (`{test}`)\n");
        let (head, cols): (&str, Vec<Column>) = match test {
            "bulk_1" | "bulk_8" => (
                "| path | proxy | Gbit/s | proxy CPU s per GB | peak RSS MiB | context switches per MB |\n|---|---|---|---|---|---|",
                vec![
                    Box::new(|rs| cell(values(rs, metric("gbit_per_s")))),
                    Box::new(|rs| cell(values(rs, eff("cpu_s_per_gb")))),
                    Box::new(|rs| cell(values(rs, mib))),
                    Box::new(|rs| cell(values(rs, eff("context_switches_per_mb")))),
                ],
            ),
            "connrate" => (
                "| path | proxy | connections/s | p50 us | p99 us | p99.9 us | proxy CPU us per connection | context switches per connection | errors |\n|---|---|---|---|---|---|---|---|---|",
                vec![
                    Box::new(|rs| cell(values(rs, metric("per_second")))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p50_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p99_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p999_us)))),
                    Box::new(|rs| cell(values(rs, eff("cpu_us_per_connection")))),
                    Box::new(|rs| cell(values(rs, eff("context_switches_per_connection")))),
                    Box::new(|rs| cell(values(rs, metric("errors")))),
                ],
            ),
            "start" => (
                "| instance | proxy | ready after ms | RSS MiB | anonymous RSS MiB |\n|---|---|---|---|---|",
                vec![
                    Box::new(|rs| cell(values(rs, metric("ready_ms")))),
                    Box::new(|rs| cell(values(rs, |r| metric("rss_bytes")(r).map(|b| b / 1048576.0)))),
                    Box::new(|rs| cell(values(rs, |r| metric("rss_anon_bytes")(r).map(|b| b / 1048576.0)))),
                ],
            ),
            "idle" => (
                "| path | proxy | connections | bytes per idle connection | RSS before MiB | RSS with MiB |\n|---|---|---|---|---|---|",
                vec![
                    Box::new(|rs| cell(values(rs, metric("connections")))),
                    Box::new(|rs| cell(values(rs, eff("bytes_per_idle_connection")))),
                    Box::new(|rs| cell(values(rs, |r| metric("rss_before_bytes")(r).map(|b| b / 1048576.0)))),
                    Box::new(|rs| cell(values(rs, |r| metric("rss_with_bytes")(r).map(|b| b / 1048576.0)))),
                ],
            ),
            _ => (
                "| path | proxy | p50 us | p90 us | p99 us | p99.9 us | max us | proxy CPU us per round trip | context switches per round trip |\n|---|---|---|---|---|---|---|---|---|",
                vec![
                    Box::new(|rs| cell(values(rs, lat(|p| p.p50_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p90_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p99_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.p999_us)))),
                    Box::new(|rs| cell(values(rs, lat(|p| p.max_us)))),
                    Box::new(|rs| cell(values(rs, eff("cpu_us_per_round_trip")))),
                    Box::new(|rs| cell(values(rs, eff("context_switches_per_round_trip")))),
                ],
            ),
        };
        let _ = writeln!(md, "{head}");
        for ((_, path, proxy), rs) in keys_for(test) {
            let cells: Vec<String> = cols.iter().map(|c| c(rs)).collect();
            let _ = writeln!(md, "| {path} | {proxy} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
    }
    ratios(&mut md, report, groups);
    md
}

/// `profile.md`: per test, path, proxy and proxy instance, CPU samples by category (summed
/// over repetitions), syscalls and context switches per unit of work, and the hottest symbols.
fn profile_markdown(groups: &BTreeMap<Key, Vec<&Record>>) -> String {
    use crate::profile::CATEGORIES;
    let mut md = String::from(
        "# Profiles\n\nSelf time sampled with `perf record -e cpu-clock` while each test ran, summed over \
         repetitions, in percent of the instance's samples. `proxy` is the proxy's own code (and \
         whatever LTO inlined into it); `other` is mostly libc. Syscalls and context switches are \
         counted by `perf stat` per unit of work (MB, round trip or connection). Raw files: `profile/`.\n\n",
    );
    let _ = writeln!(
        md,
        "| test | path | proxy | instance | samples | {} | syscalls/unit | ctx switches/unit |",
        CATEGORIES.join(" % | ") + " %"
    );
    let _ = writeln!(md, "|{}", "---|".repeat(CATEGORIES.len() + 7));
    let mut tops = String::new();
    for ((test, path, proxy), rs) in groups {
        let mut tags: Vec<&String> = rs.iter().filter_map(|r| r.profile.as_ref()).flat_map(|p| p.keys()).collect();
        tags.sort();
        tags.dedup();
        for tag in tags {
            let profs: Vec<(&Record, &crate::profile::Profile)> =
                rs.iter().filter_map(|r| Some((*r, r.profile.as_ref()?.get(tag)?))).collect();
            let samples: u64 = profs.iter().map(|(_, p)| p.samples).sum();
            if samples == 0 {
                continue;
            }
            let weighted = |f: &dyn Fn(&crate::profile::Profile) -> f64| {
                profs.iter().map(|(_, p)| f(p) * p.samples as f64).sum::<f64>() / samples as f64
            };
            let cats: Vec<String> = CATEGORIES
                .iter()
                .map(|c| format!("{:.1}", weighted(&|p| p.categories.get(*c).copied().unwrap_or(0.0))))
                .collect();
            let unit = match test.as_str() {
                t if t.starts_with("bulk") => "mb",
                "connrate" => "connection",
                _ => "round_trip",
            };
            // Counts per unit, from this instance alone.
            let per_unit = |count: fn(&crate::profile::Profile) -> Option<u64>| {
                let v: Vec<f64> = profs
                    .iter()
                    .filter_map(|(r, p)| {
                        let units = match unit {
                            "mb" => r.metrics.get("bytes")?.as_f64()? / 1e6,
                            "connection" => r.metrics.get("connections")?.as_f64()?,
                            _ => {
                                let cpu = r.cpu_seconds?;
                                cpu * 1e6 / r.efficiency.get("cpu_us_per_round_trip")?.as_f64()?
                            }
                        };
                        Some(count(p)? as f64 / units)
                    })
                    .collect();
                stat(&v).map(|s| fmt_num(s.median)).unwrap_or_else(|| "-".into())
            };
            let _ = writeln!(
                md,
                "| {test} | {path} | {proxy} | {tag} | {samples} | {} | {} | {} |",
                cats.join(" | "),
                per_unit(|p| p.syscalls),
                per_unit(|p| p.context_switches)
            );
            // Hottest symbols, merged over repetitions.
            let mut syms: BTreeMap<(String, String), f64> = BTreeMap::new();
            for (_, p) in &profs {
                for (pct, cat, sym) in &p.top {
                    *syms.entry((cat.clone(), sym.clone())).or_default() += pct * p.samples as f64 / samples as f64;
                }
            }
            let mut syms: Vec<_> = syms.into_iter().collect();
            syms.sort_by(|a, b| b.1.total_cmp(&a.1));
            let _ = writeln!(tops, "\n### {test}, {path}, {proxy}, {tag}\n");
            for ((cat, sym), pct) in syms.iter().take(12) {
                let short: String = sym.chars().take(110).collect();
                let _ = writeln!(tops, "- {pct:.1}% {cat}: `{short}`");
            }
        }
    }
    md.push_str("\n## Hottest symbols\n");
    md.push_str(&tops);
    md
}

/// Side-by-side ratios of medians measured in the same run.
fn ratios(md: &mut String, report: &Report, groups: &BTreeMap<Key, Vec<&Record>>) {
    let med = |test: &str, path: &str, proxy: &str, f: &dyn Fn(&Record) -> Option<f64>| {
        groups
            .get(&(test.to_string(), path.to_string(), proxy.to_string()))
            .and_then(|rs| values(rs, f))
            .map(|s| s.median)
    };
    let figures: [(&str, &str, Figure); 6] = [
        ("bulk_1", "Gbit/s, 1 stream", Box::new(metric("gbit_per_s"))),
        ("bulk_1", "CPU s per GB", Box::new(eff("cpu_s_per_gb"))),
        ("rr_1b", "rr 1 B p50", Box::new(lat(|p| p.p50_us))),
        ("rr_1b", "rr 1 B p99", Box::new(lat(|p| p.p99_us))),
        ("rr_1b", "CPU us per round trip", Box::new(eff("cpu_us_per_round_trip"))),
        ("connrate", "connections/s", Box::new(metric("per_second"))),
    ];
    let main = &report.proxies[0].label;
    let _ = writeln!(md, "## Ratios of medians\n");
    let _ = writeln!(md, "Through `{main}` relative to the direct path (same run):\n");
    let _ = writeln!(md, "| figure | path | direct | through proxy | ratio |\n|---|---|---|---|---|");
    for (test, name, f) in &figures {
        if name.starts_with("CPU") {
            continue;
        }
        for path in ["tcp", "hbone"] {
            if let (Some(d), Some(p)) = (med(test, "direct", "none", f.as_ref()), med(test, path, main, f.as_ref())) {
                let _ = writeln!(md, "| {name} | {path} | {} | {} | {:.2} |", fmt_num(d), fmt_num(p), p / d);
            }
        }
    }
    let _ = writeln!(md);
    if let Some(other) = report.proxies.get(1).map(|p| &p.label) {
        let _ = writeln!(md, "`{other}` relative to `{main}` (ratio = {other} / {main}):\n");
        let _ = writeln!(md, "| figure | path | {main} | {other} | ratio |\n|---|---|---|---|---|");
        for (test, name, f) in &figures {
            for path in ["tcp", "hbone"] {
                if let (Some(a), Some(b)) = (med(test, path, main, f.as_ref()), med(test, path, other, f.as_ref())) {
                    let _ = writeln!(md, "| {name} | {path} | {} | {} | {:.2} |", fmt_num(a), fmt_num(b), b / a);
                }
            }
        }
        // Start-up, per proxy instance (the "path" of a start record).
        let mut instances: Vec<&str> =
            groups.keys().filter(|(t, _, _)| t == "start").map(|(_, path, _)| path.as_str()).collect();
        instances.dedup();
        let start_figures: [(&str, Figure); 2] = [
            ("ready after ms", Box::new(metric("ready_ms"))),
            ("anonymous RSS at start, MiB", Box::new(|r| metric("rss_anon_bytes")(r).map(|b| b / 1048576.0))),
        ];
        for inst in instances {
            for (name, f) in &start_figures {
                if let (Some(a), Some(b)) =
                    (med("start", inst, main, f.as_ref()), med("start", inst, other, f.as_ref()))
                {
                    let _ = writeln!(md, "| {name} | {inst} | {} | {} | {:.2} |", fmt_num(a), fmt_num(b), b / a);
                }
            }
        }
        let _ = writeln!(md);
    }
}

/// Rebuilds a histogram from saved (value, count) pairs.
pub fn histogram_from(counts: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = load::new_histogram();
    for (v, c) in counts {
        h.saturating_record_n(*v, *c);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(stat(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(stat(&[]).is_none());
        assert_eq!(cell(stat(&[5.0])), "5.00");
        assert_eq!(cell(stat(&[1.0, 2.0, 30.0])), "2.00 [1.00-30.0]");
    }

    #[test]
    fn histogram_roundtrip() {
        let mut h = load::new_histogram();
        for v in [1_000u64, 5_000, 5_000, 90_000] {
            h.record(v).unwrap();
        }
        let back = histogram_from(&load::histogram_counts(&h));
        assert_eq!(back.len(), 4);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }
}

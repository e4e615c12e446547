//! An SVG plot of latency distributions: one panel per latency test, one line per path and
//! proxy, percentile on a log scale (as HdrHistogram plots do) so the tail is visible.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
/// Percentiles plotted: x = log10(1 / (1 - q)).
const QS: [f64; 13] = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999];
const X_MAX: f64 = 5.0;

pub fn svg(series: &[(String, String, String, Histogram<u64>)]) -> String {
    let tests: Vec<&str> = {
        let mut t: Vec<&str> = series.iter().map(|(t, ..)| t.as_str()).collect();
        t.dedup();
        t
    };
    let (w, panel_h, margin) = (760.0, 300.0, 60.0);
    let height = (tests.len().max(1) as f64) * (panel_h + margin) + margin;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##
    );
    if tests.is_empty() {
        let _ = writeln!(s, r##"<text x="20" y="40">no latency data</text>"##);
    }
    for (i, test) in tests.iter().enumerate() {
        let top = margin + i as f64 * (panel_h + margin);
        let (left, right, bottom) = (80.0, w - 200.0, top + panel_h);
        let lines: Vec<&(String, String, String, Histogram<u64>)> = series.iter().filter(|(t, ..)| t == test).collect();
        let y_max = lines.iter().map(|(.., h)| h.value_at_quantile(0.99999) as f64 / 1000.0).fold(1.0, f64::max) * 1.1;
        let x = |q: f64| left + (1.0 / (1.0 - q)).log10().min(X_MAX) / X_MAX * (right - left);
        let y = |us: f64| bottom - us / y_max * panel_h;
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}" font-size="14" font-weight="bold">{test}: latency by percentile</text>"##,
            top - 12.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{}" height="{panel_h}" fill="none" stroke="#888"/>"##,
            right - left
        );
        for (label, q) in
            [("0%", 0.0), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999), ("99.99%", 0.9999), ("99.999%", 0.99999)]
        {
            let _ = writeln!(
                s,
                r##"<line x1="{0}" x2="{0}" y1="{top}" y2="{bottom}" stroke="#eee"/><text x="{0}" y="{1}" text-anchor="middle">{label}</text>"##,
                x(q),
                bottom + 16.0
            );
        }
        for k in 0..=4 {
            let v = y_max * k as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{right}" y1="{0}" y2="{0}" stroke="#eee"/><text x="{1}" y="{2}" text-anchor="end">{v:.0} us</text>"##,
                y(v),
                left - 6.0,
                y(v) + 4.0
            );
        }
        for (j, (_, path, proxy, h)) in lines.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let pts: Vec<String> =
                QS.iter().map(|q| format!("{:.1},{:.1}", x(*q), y(h.value_at_quantile(*q) as f64 / 1000.0))).collect();
            let _ = writeln!(
                s,
                r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
                pts.join(" ")
            );
            let ly = top + 16.0 + j as f64 * 18.0;
            let _ = writeln!(
                s,
                r##"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{path} / {proxy}</text>"##,
                right + 10.0,
                right + 30.0,
                right + 36.0,
                ly + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

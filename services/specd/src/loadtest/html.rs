//! The HTML report of a ghz scenario run: one self-contained page (inline SVG, no scripts, nothing
//! fetched) with the summary, latency percentiles and histogram, throughput and latency over time,
//! and the status codes and errors.

use serde_json::Value;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 640.0;
const H: f64 = 220.0;
const PAD: f64 = 44.0;

fn axes(title: &str, x_label: &str, y_label: &str, y_max: f64) -> String {
    let mut s = format!(
        r##"<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><title>{t}</title>
<text x="{cx}" y="16" text-anchor="middle" class="title">{t}</text>
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" class="axis"/><line x1="{PAD}" y1="24" x2="{PAD}" y2="{b}" class="axis"/>
<text x="{cx}" y="{xl}" text-anchor="middle" class="label">{x}</text>
<text x="12" y="{cy}" text-anchor="middle" class="label" transform="rotate(-90 12 {cy})">{y}</text>
"##,
        t = esc(title),
        cx = W / 2.0,
        b = H - PAD,
        r = W - 10.0,
        xl = H - 8.0,
        x = esc(x_label),
        cy = H / 2.0,
        y = esc(y_label),
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = (H - PAD) - (H - PAD - 24.0) * i as f64 / 4.0;
        s.push_str(&format!(
            r##"<line x1="{PAD}" y1="{y:.1}" x2="{r}" y2="{y:.1}" class="grid"/><text x="{tx}" y="{ty:.1}" text-anchor="end" class="tick">{v}</text>
"##,
            r = W - 10.0,
            tx = PAD - 4.0,
            ty = y + 4.0,
            v = tick(v)
        ));
    }
    s
}

fn tick(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn sx(x: f64, x_max: f64) -> f64 {
    PAD + (W - 10.0 - PAD) * if x_max > 0.0 { x / x_max } else { 0.0 }
}

fn sy(y: f64, y_max: f64) -> f64 {
    (H - PAD) - (H - PAD - 24.0) * if y_max > 0.0 { y / y_max } else { 0.0 }
}

fn bars(title: &str, x_label: &str, y_label: &str, items: &[(String, f64)]) -> String {
    let y_max = items.iter().map(|i| i.1).fold(0.0, f64::max).max(1e-9);
    let mut s = axes(title, x_label, y_label, y_max);
    let n = items.len().max(1) as f64;
    let slot = (W - 10.0 - PAD) / n;
    for (i, (label, v)) in items.iter().enumerate() {
        let x = PAD + slot * i as f64 + slot * 0.15;
        let y = sy(*v, y_max);
        s.push_str(&format!(
            r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" class="bar"><title>{l}: {v}</title></rect><text x="{lx:.1}" y="{ly}" text-anchor="middle" class="tick">{l}</text>
"##,
            w = slot * 0.7,
            h = (H - PAD) - y,
            l = esc(label),
            v = tick(*v),
            lx = x + slot * 0.35,
            ly = H - PAD + 14.0,
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// A named line: its legend, its CSS class and its (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn lines(title: &str, y_label: &str, series: &[Series]) -> String {
    let x_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1.0);
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut s = axes(title, "seconds into the run", y_label, y_max);
    for (i, (name, class, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x, x_max), sy(y, y_max)))
            .collect();
        s.push_str(&format!(
            r##"<polyline points="{}" class="{class}"/><text x="{lx}" y="{ly}" class="legend {class}t">{}</text>
"##,
            path.join(" "),
            esc(name),
            lx = W - 150.0,
            ly = 34.0 + 14.0 * i as f64,
        ));
    }
    s.push_str(&format!(
        r##"<text x="{x}" y="{y}" text-anchor="end" class="tick">{m:.0}</text></svg>
"##,
        x = W - 10.0,
        y = H - PAD + 14.0,
        m = x_max
    ));
    s
}

fn scatter(title: &str, details: &[(f64, f64, bool)]) -> String {
    let x_max = details.iter().map(|d| d.0).fold(0.0, f64::max).max(1.0);
    let y_max = details.iter().map(|d| d.1).fold(0.0, f64::max).max(1e-9);
    let mut s = axes(
        title,
        "request start (seconds into the run)",
        "latency (ms)",
        y_max,
    );
    for &(x, y, ok) in details {
        s.push_str(&format!(
            r##"<circle cx="{:.1}" cy="{:.1}" r="2.2" class="{}"/>"##,
            sx(x, x_max),
            sy(y, y_max),
            if ok { "ok" } else { "err" }
        ));
    }
    s.push_str("\n</svg>\n");
    s
}

/// The page for `report` (the JSON `ghz::report` builds); `starts` are each call's start (seconds into
/// the run), latency (ms) and success, for the scatter plot.
pub fn page(report: &Value, starts: &[(f64, f64, bool)]) -> String {
    let ms = |k: &str| report[k].as_u64().unwrap_or(0) as f64 / 1e6;
    let sp = &report["specd"];
    let name = report["name"].as_str().unwrap_or("");
    let title = if name.is_empty() {
        "specd loadtest".to_string()
    } else {
        format!("specd loadtest: {name}")
    };
    let mut rows = vec![
        (
            "Call",
            esc(report["options"]["call"].as_str().unwrap_or("")),
        ),
        (
            "Host",
            esc(report["options"]["host"].as_str().unwrap_or("")),
        ),
        ("Date", esc(report["date"].as_str().unwrap_or(""))),
        (
            "End reason",
            esc(report["endReason"].as_str().unwrap_or("")),
        ),
        ("Count", report["count"].to_string()),
        ("Total", format!("{:.1} ms", ms("total"))),
        (
            "Requests/s",
            format!("{:.2}", report["rps"].as_f64().unwrap_or(0.0)),
        ),
        (
            "Tokens/s",
            format!("{:.2}", sp["tokens_per_s"].as_f64().unwrap_or(0.0)),
        ),
        ("Average", format!("{:.1} ms", ms("average"))),
        ("Fastest", format!("{:.1} ms", ms("fastest"))),
        ("Slowest", format!("{:.1} ms", ms("slowest"))),
    ];
    for (k, label) in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")] {
        rows.push((
            label,
            format!(
                "p50 {} ms, p90 {} ms, p99 {} ms",
                sp[k]["p50"], sp[k]["p90"], sp[k]["p99"]
            ),
        ));
    }
    rows.push((
        "Acceptance",
        format!(
            "{:.3} ({} of {} drafted tokens)",
            sp["acceptance"].as_f64().unwrap_or(0.0),
            sp["accepted"],
            sp["drafted"]
        ),
    ));
    let table: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{k}</th><td>{v}</td></tr>\n"))
        .collect();
    let pct: Vec<(String, f64)> = report["latencyDistribution"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                format!("p{}", l["percentage"]),
                l["latency"].as_u64().unwrap_or(0) as f64 / 1e6,
            )
        })
        .collect();
    let hist: Vec<(String, f64)> = report["histogram"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                format!("{:.0}", b["mark"].as_f64().unwrap_or(0.0) * 1e3),
                b["count"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let timeline = sp["timeline"].as_array().cloned().unwrap_or_default();
    let series = |k: &str| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .map(|s| (s["t"].as_f64().unwrap_or(0.0), s[k].as_f64().unwrap_or(0.0)))
            .collect()
    };
    let codes: String = report["statusCodeDistribution"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{v}</td></tr>\n", esc(k)))
        .collect();
    let errors: String = report["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("<tr><td>{v}</td><td>{}</td></tr>\n", esc(k)))
        .collect();
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; max-width: 1340px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }}
th {{ font-weight: 600; }}
.grid-2 {{ display: flex; flex-wrap: wrap; gap: 16px; }}
svg {{ background: #fafafa; border: 1px solid #ddd; }}
.title {{ font-size: 13px; font-weight: 600; }} .label, .tick, .legend {{ font-size: 11px; fill: #555; }}
.axis {{ stroke: #888; }} .grid {{ stroke: #e6e6e6; }}
.bar {{ fill: #4c78a8; }}
.s1 {{ fill: none; stroke: #4c78a8; stroke-width: 2; }} .s1t {{ fill: #4c78a8; }}
.s2 {{ fill: none; stroke: #f58518; stroke-width: 2; }} .s2t {{ fill: #f58518; }}
.s3 {{ fill: none; stroke: #e45756; stroke-width: 2; }} .s3t {{ fill: #e45756; }}
.ok {{ fill: #4c78a8; opacity: .7; }} .err {{ fill: #e45756; }}
</style></head><body>
<h1>{title}</h1>
<table>
{table}</table>
<h2>Latency</h2>
<div class="grid-2">
{pct_svg}{hist_svg}{scatter_svg}{lat_svg}</div>
<h2>Throughput</h2>
<div class="grid-2">
{tok_svg}{req_svg}</div>
<h2>Status codes</h2>
<table>
{codes}</table>
<h2>Errors</h2>
<table>
{errors}</table>
</body></html>
"##,
        title = esc(&title),
        pct_svg = bars("Latency percentiles (ms)", "percentile", "ms", &pct),
        hist_svg = bars(
            "Latency histogram (OK calls)",
            "bucket upper bound (ms)",
            "calls",
            &hist
        ),
        scatter_svg = scatter("Latency of each call (red: error)", starts),
        lat_svg = lines(
            "Median latency of calls finishing each second",
            "ms",
            &[("p50 latency", "s1", series("latency_ms_p50"))]
        ),
        tok_svg = lines(
            "Generated tokens per second",
            "tokens/s",
            &[("tokens", "s1", series("tokens"))]
        ),
        req_svg = lines(
            "Calls finishing per second",
            "calls/s",
            &[
                ("finished", "s2", series("finished")),
                ("errors", "s3", series("errors"))
            ]
        ),
        codes = codes,
        errors = if errors.is_empty() {
            "<tr><td>none</td></tr>\n".to_string()
        } else {
            errors
        },
    )
}

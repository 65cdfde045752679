//! Deployment files against the real binary and a real local cluster (`specd up --trainer` on
//! SmolLM2, skipped when the model file is absent and `SPECD_REQUIRE_MODELS` is unset):
//!
//! - every ghz scenario in `loadtest/ghz/` runs briefly through `specd loadtest --ghz-config` (its
//!   host pointed at the cluster, its length cut to seconds) with every call OK, and writes ghz's JSON
//!   report shape and an HTML report with plots;
//! - every metric name the Grafana dashboard and the alert rules refer to (`scripts/metric_names.py`)
//!   is exported on the cluster's live `/metrics` after that traffic;
//! - `--check-config` accepts what the roles accept and refuses bad values with the flag's name.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specd_tests::{model_file, specd_bin, temp_dir, SMOLLM_FILE};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

fn check_config(args: &[&str]) -> (bool, String) {
    let out = Command::new(specd_bin())
        .args(args)
        .arg("--check-config")
        .env_remove("SPECD_ETCD")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_accepts_valid_roles_and_names_the_bad_flag() {
    let etcd = ["--etcd", "http://127.0.0.1:2379"];
    for role in ["router", "drafter", "target", "trainer"] {
        let mut args = vec![role];
        args.extend(etcd);
        let (ok, out) = check_config(&args);
        assert!(ok, "{role}: {out}");
        assert!(out.contains("configuration ok"), "{role}: {out}");
        // No file is read: a models directory that does not exist is fine here.
        let (ok, out) = check_config(&[role, etcd[0], etcd[1], "--models-dir", "/nonexistent"]);
        assert!(ok, "{role}: {out}");
    }
    let bad: &[(&[&str], &str)] = &[
        (&["router"], "--etcd"),
        (&["target", "--etcd", "localhost"], "--etcd"),
        (
            &["target", "--etcd", "http://e:1", "--sample-rate", "2"],
            "--sample-rate",
        ),
        (
            &["drafter", "--etcd", "http://e:1", "--kinds", "magic"],
            "magic",
        ),
        (
            &["trainer", "--etcd", "http://e:1", "--train-loss", "l3"],
            "--train-loss",
        ),
        (
            &["router", "--etcd", "http://e:1", "--log-format", "xml"],
            "xml",
        ),
        (
            &["router", "--etcd", "http://e:1", "--model-preset", "gpt5"],
            "gpt5",
        ),
        (
            &["router", "--etcd", "http://e:1", "--no-such-flag"],
            "--no-such-flag",
        ),
        (&["up", "--capacity", "0"], "--capacity"),
        (&["up", "--tp", "0"], "--tp"),
        (
            &["target", "--etcd", "http://e:1", "--rank", "0"],
            "--world",
        ),
        (
            &[
                "target",
                "--etcd",
                "http://e:1",
                "--rank",
                "2",
                "--world",
                "2",
                "--tp-group",
                "g",
            ],
            "--rank 2",
        ),
        (
            &[
                "target",
                "--etcd",
                "http://e:1",
                "--rank",
                "1",
                "--world",
                "2",
            ],
            "--tp-group",
        ),
        (
            &["target", "--etcd", "http://e:1", "--tp-group", "g"],
            "--rank",
        ),
        (
            &[
                "target",
                "--etcd",
                "http://e:1",
                "--tp",
                "2",
                "--rank",
                "0",
                "--world",
                "2",
                "--tp-group",
                "g",
            ],
            "one or the other",
        ),
    ];
    // A rank of a group of processes, and the group's size from the environment as a chart sets it.
    for rank in ["0", "1"] {
        let args = [
            "target",
            etcd[0],
            etcd[1],
            "--rank",
            rank,
            "--world",
            "2",
            "--tp-group",
            "g",
        ];
        let (ok, out) = check_config(&args);
        assert!(ok, "{args:?}: {out}");
    }
    for (args, want) in bad {
        let (ok, out) = check_config(args);
        assert!(!ok, "{args:?} was accepted: {out}");
        assert!(out.contains(want), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{args:?}: {out}");
    }
    // Scenario files are checked without a server.
    for f in scenarios() {
        let (ok, out) = check_config(&["loadtest", "--ghz-config", f.to_str().unwrap()]);
        assert!(ok, "{}: {out}", f.display());
    }
}

fn scenarios() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("loadtest/ghz"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "expected the ghz scenarios in loadtest/ghz");
    v
}

#[test]
fn ghz_scenarios_run_against_a_local_cluster_and_dashboards_use_live_metrics() {
    let Some(model) = model_file(SMOLLM_FILE) else {
        return;
    };
    let dir = temp_dir();
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut child = Command::new(specd_bin())
        .args(["up", "--model-preset", "smollm", "--models-dir"])
        .arg(model.parent().unwrap())
        .args(["--grpc-addr", &grpc, "--http-addr", &http, "--trainer"])
        .arg("--weights-dir")
        .arg(dir.path().join("weights"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ERROR") || line.contains("panicked") {
                eprintln!("specd up: {line}");
            }
        }
    });
    let _up = Up(child);
    let t0 = Instant::now();
    while http_get(&http, "/health").is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "specd up did not serve"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for f in scenarios() {
        let text = std::fs::read_to_string(&f).unwrap();
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        let out_json = dir.path().join("report.json");
        let out_html = dir.path().join("report.html");
        let mut cmd = Command::new(specd_bin());
        cmd.args(["loadtest", "--ghz-config"])
            .arg(&f)
            .args(["--set", &format!("host={grpc}")])
            .args(["--set", "max-duration=60s", "--require-ok"])
            .arg("--output")
            .arg(&out_json)
            .arg("--html")
            .arg(&out_html);
        // Briefly: a few seconds of a timed scenario, a few calls of a counted one.
        if raw.get("duration").is_some() {
            cmd.args(["--set", "duration=4s", "--set", "duration-stop=wait"]);
        } else {
            cmd.args(["--set", "total=6"]);
        }
        let out = cmd.output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {said}", f.display());
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
        for k in [
            "count",
            "total",
            "average",
            "fastest",
            "slowest",
            "rps",
            "latencyDistribution",
            "statusCodeDistribution",
            "errorDistribution",
            "histogram",
            "details",
        ] {
            assert!(report.get(k).is_some(), "{}: no {k}", f.display());
        }
        let count = report["count"].as_u64().unwrap();
        assert!(count >= 1, "{}: {said}", f.display());
        assert_eq!(
            report["statusCodeDistribution"]["OK"].as_u64(),
            Some(count),
            "{}: {said}",
            f.display()
        );
        assert!(report["specd"]["tokens"].as_u64().unwrap() > 0);
        assert_eq!(report["latencyDistribution"].as_array().unwrap().len(), 7);
        let html = std::fs::read_to_string(&out_html).unwrap();
        assert!(html.matches("<svg").count() >= 5, "{}", f.display());
        assert!(said.contains("Requests/sec"), "{said}");
    }
    // The dashboard and alerts refer only to metrics the cluster exports.
    let metrics = http_get(&http, "/metrics").unwrap();
    let names = Command::new("python3")
        .arg(repo().join("scripts/metric_names.py"))
        .output()
        .unwrap();
    assert!(names.status.success(), "metric_names.py failed");
    let names = String::from_utf8(names.stdout).unwrap();
    // Series that exist only once their event has happened (an error, a fallback, a swap, a training
    // step): a few seconds of healthy traffic cannot produce them; scripts/check-deploy-files.sh checks
    // statically that the services define them.
    const ON_EVENT: [&str; 16] = [
        "specd_drafter_swap_seconds",
        "specd_drafter_swaps_total",
        "specd_drafter_version",
        "specd_fallbacks_total",
        "specd_prefills_cancelled_total",
        "specd_request_errors_total",
        "specd_trainer_evaluations_total",
        "specd_trainer_gate_acceptance",
        "specd_trainer_loss",
        "specd_trainer_positions_total",
        "specd_trainer_publishes_total",
        "specd_trainer_rollbacks_total",
        "specd_trainer_step_seconds",
        "specd_trainer_steps_total",
        "specd_trainer_weight_fetches_total",
        "specd_worker_idle_streams_closed_total",
    ];
    let referenced: Vec<&str> = names.split_whitespace().collect();
    let live = |n: &str| metrics.lines().any(|l| l.starts_with(n));
    assert!(
        referenced.iter().filter(|n| live(n)).count() >= 20,
        "too few of the dashboard's metrics are live: {referenced:?}"
    );
    let missing: Vec<&str> = referenced
        .iter()
        .copied()
        .filter(|n| n.starts_with("specd_") && !ON_EVENT.contains(n) && !live(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or alerts use metrics the live cluster does not export: {missing:?}"
    );
}

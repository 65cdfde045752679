//! `specd loadtest --ghz-config FILE`: runs a ghz scenario file (ghz's own JSON config keys, so the same
//! file works with `ghz --config FILE` where ghz is installed) against a router, and writes ghz's JSON
//! report shape plus specd's token-level figures, and an HTML report with plots.
//!
//! Supported keys: `call` (`specd.v1.Generation.Generate` or `.GenerateStream`, `/` accepted as the
//! method separator), `host`, `insecure` (must be true: specd serves plaintext gRPC for now), `data`
//! (one request object, or an array used round robin; protojson field names, snake_case or
//! lowerCamelCase; `{{.RequestNumber}}` and `{{.WorkerID}}` in strings are replaced as ghz does),
//! `data-file`, `metadata`, `total`, `concurrency`, `connections`, `rps`, `duration`, `duration-stop`
//! (`close`, `wait`, `ignore`), `max-duration`, `timeout`, `skipFirst`, `load-schedule` (`const`,
//! `step`, `line`) with `load-start`, `load-step`, `load-end`, `load-step-duration`,
//! `load-max-duration`, `concurrency-schedule` with the same `concurrency-*` keys, `stream-call-count`
//! and `stream-call-duration` (a server stream is closed by the client after that many messages or
//! that long; ghz counts it as OK), `name`, `tags`, `format` and `output`. Keys that only matter to
//! ghz itself (`proto`, `protoset`, `import-paths`, `cpus`, `debug`, `connect-timeout`, `keepalive`,
//! `async`, `count-errors`, `reflect-metadata`) are accepted and ignored; TLS keys and unknown keys
//! are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Map, Value};
use specd_proto::v1::generate_request::Input;
use specd_proto::v1::generation_client::GenerationClient;
use specd_proto::v1::{ChatMessage, ChatMessages, GenerateRequest};
use tonic::transport::Channel;

/// Keys ghz reads that change nothing here.
const IGNORED: [&str; 10] = [
    "proto",
    "protoset",
    "import-paths",
    "cpus",
    "debug",
    "connect-timeout",
    "keepalive",
    "async",
    "count-errors",
    "reflect-metadata",
];
/// ghz's TLS keys: specd has no TLS yet, so a scenario asking for it is refused, not run in plaintext.
const TLS: [&str; 6] = ["cacert", "cert", "key", "skipTLS", "cname", "authority"];

/// The two generation calls a scenario can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Generate,
    GenerateStream,
}

/// How a rate or a concurrency changes over the run (ghz's `const`, `step` and `line`).
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Const(f64),
    /// `start`, plus `step` every `every`, up to `end` (0: no end), changing for at most `max`.
    Step {
        start: f64,
        step: f64,
        end: f64,
        every: Duration,
        max: Option<Duration>,
    },
    /// `start`, plus `step` per second, up to `end` (0: no end), changing for at most `max`.
    Line {
        start: f64,
        step: f64,
        end: f64,
        max: Option<Duration>,
    },
}

impl Schedule {
    /// The value `t` into the run.
    pub fn at(&self, t: Duration) -> f64 {
        let clamp = |v: f64, step: f64, end: f64| {
            if end > 0.0 {
                if step >= 0.0 {
                    v.min(end)
                } else {
                    v.max(end)
                }
            } else {
                v
            }
        };
        match self {
            Schedule::Const(v) => *v,
            Schedule::Step {
                start,
                step,
                end,
                every,
                max,
            } => {
                let t = max.map_or(t, |m| t.min(m));
                let n = (t.as_secs_f64() / every.as_secs_f64().max(1e-3)).floor();
                clamp(start + step * n, *step, *end).max(0.0)
            }
            Schedule::Line {
                start,
                step,
                end,
                max,
            } => {
                let t = max.map_or(t, |m| t.min(m));
                clamp(start + step * t.as_secs_f64(), *step, *end).max(0.0)
            }
        }
    }

    /// Requests allowed to start by `t` (the integral of a rate schedule).
    #[cfg(test)]
    fn allowed_by(&self, t: Duration) -> f64 {
        let mut pace = Pace::default();
        pace.advance(self, t);
        pace.allowed
    }
}

/// A running integral of a rate schedule: the pacer advances it as time passes instead of integrating
/// from the start on every check.
#[derive(Debug, Default)]
struct Pace {
    /// How far it has integrated.
    t: f64,
    /// Requests allowed by `t`.
    allowed: f64,
}

impl Pace {
    /// Integrates `rate` up to `to` in steps of at most 10 ms (exact enough for pacing, simple for
    /// every schedule kind).
    fn advance(&mut self, rate: &Schedule, to: Duration) {
        let end = to.as_secs_f64();
        while self.t < end {
            let w = 0.01f64.min(end - self.t);
            self.allowed += rate.at(Duration::from_secs_f64(self.t)) * w;
            self.t += w;
        }
    }
}

/// What to do with calls still running when `duration` is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationStop {
    /// Cancel them; they count as `Canceled`.
    Close,
    /// Let them finish and count them.
    Wait,
    /// Cancel them and leave them out of the report.
    Ignore,
}

/// A ghz scenario, validated.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub call: Call,
    pub host: String,
    pub data: Vec<Value>,
    pub metadata: BTreeMap<String, String>,
    pub total: usize,
    pub concurrency: Schedule,
    pub max_concurrency: usize,
    pub connections: usize,
    pub rate: Option<Schedule>,
    pub duration: Option<Duration>,
    pub duration_stop: DurationStop,
    pub max_duration: Option<Duration>,
    pub timeout: Duration,
    pub skip_first: usize,
    pub stream_call_count: Option<usize>,
    pub stream_call_duration: Option<Duration>,
    pub tags: BTreeMap<String, String>,
    pub format: Option<String>,
    pub output: Option<PathBuf>,
    /// The config as read (after overrides), echoed in the report's `options`.
    pub raw: Map<String, Value>,
}

/// Parses a Go duration (`300ms`, `1m30s`, `2.5s`); a bare number is seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    let mut total = 0.0f64;
    let mut rest = s;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .with_context(|| {
                format!("duration {s:?}: a number needs a unit (ns, us, ms, s, m, h)")
            })?;
        let value: f64 = rest[..n]
            .parse()
            .with_context(|| format!("duration {s:?}: bad number"))?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => bail!("duration {s:?}: unknown unit {other:?}"),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn duration_value(key: &str, v: &Value) -> anyhow::Result<Option<Duration>> {
    let d = match v {
        Value::Null => return Ok(None),
        Value::String(s) if s.is_empty() || s == "0" => return Ok(None),
        Value::String(s) => parse_duration(s).with_context(|| key.to_string())?,
        Value::Number(n) => Duration::from_nanos(n.as_u64().context(key.to_string())?),
        _ => bail!("{key} must be a duration such as \"30s\""),
    };
    Ok((!d.is_zero()).then_some(d))
}

fn number(key: &str, v: &Value) -> anyhow::Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .with_context(|| format!("{key} must be a number"))
}

fn count(key: &str, v: &Value) -> anyhow::Result<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .with_context(|| format!("{key} must be a whole number at least 0"))
}

fn string_map(key: &str, v: &Value) -> anyhow::Result<BTreeMap<String, String>> {
    let obj = v
        .as_object()
        .with_context(|| format!("{key} must be an object of strings"))?;
    obj.iter()
        .map(|(k, v)| {
            let s = v
                .as_str()
                .with_context(|| format!("{key}.{k} must be a string"))?;
            Ok((k.clone(), s.to_string()))
        })
        .collect()
}

/// Applies a `KEY=VALUE` override (VALUE parsed as JSON, else taken as a string), as ghz's flags
/// override its config file.
pub fn apply_override(raw: &mut Map<String, Value>, set: &str) -> anyhow::Result<()> {
    let (k, v) = set
        .split_once('=')
        .with_context(|| format!("--set {set:?}: expected KEY=VALUE"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    raw.insert(k.to_string(), value);
    Ok(())
}

fn schedule(
    raw: &Map<String, Value>,
    prefix: &str,
    kind_key: &str,
    base: f64,
    default_start: f64,
) -> anyhow::Result<Schedule> {
    let get = |k: &str| raw.get(&format!("{prefix}-{k}"));
    let kind = raw
        .get(kind_key)
        .and_then(Value::as_str)
        .unwrap_or("const")
        .to_ascii_lowercase();
    let start =
        get("start").map_or(Ok(default_start), |v| number(&format!("{prefix}-start"), v))?;
    let step = get("step").map_or(Ok(0.0), |v| number(&format!("{prefix}-step"), v))?;
    let end = get("end").map_or(Ok(0.0), |v| number(&format!("{prefix}-end"), v))?;
    let max = get("max-duration").map_or(Ok(None), |v| {
        duration_value(&format!("{prefix}-max-duration"), v)
    })?;
    match kind.as_str() {
        "const" => Ok(Schedule::Const(base)),
        "step" => {
            let every = get("step-duration")
                .map_or(Ok(None), |v| {
                    duration_value(&format!("{prefix}-step-duration"), v)
                })?
                .with_context(|| format!("{kind_key} step needs {prefix}-step-duration"))?;
            if step == 0.0 {
                bail!("{kind_key} step needs a non-zero {prefix}-step");
            }
            Ok(Schedule::Step {
                start,
                step,
                end,
                every,
                max,
            })
        }
        "line" => {
            if step == 0.0 {
                bail!("{kind_key} line needs a non-zero {prefix}-step");
            }
            Ok(Schedule::Line {
                start,
                step,
                end,
                max,
            })
        }
        other => bail!("{kind_key} must be const, step or line, got {other:?}"),
    }
}

impl Scenario {
    /// Reads `path` (JSON), applies `overrides` and validates.
    pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut raw: Map<String, Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON object of ghz config keys", path.display()))?;
        for o in overrides {
            apply_override(&mut raw, o)?;
        }
        Self::from_map(raw, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("scenario {}", path.display()))
    }

    /// Validates a ghz config object; relative `data-file` paths are resolved against `dir`.
    pub fn from_map(raw: Map<String, Value>, dir: &Path) -> anyhow::Result<Self> {
        const KNOWN: [&str; 33] = [
            "call",
            "host",
            "insecure",
            "data",
            "data-file",
            "metadata",
            "total",
            "concurrency",
            "connections",
            "rps",
            "duration",
            "duration-stop",
            "max-duration",
            "timeout",
            "skipFirst",
            "load-schedule",
            "load-start",
            "load-step",
            "load-end",
            "load-step-duration",
            "load-max-duration",
            "concurrency-schedule",
            "concurrency-start",
            "concurrency-step",
            "concurrency-end",
            "concurrency-step-duration",
            "concurrency-max-duration",
            "stream-call-count",
            "stream-call-duration",
            "name",
            "tags",
            "format",
            "output",
        ];
        for k in raw.keys() {
            if TLS.contains(&k.as_str()) {
                bail!("{k}: specd serves plaintext gRPC (no TLS yet); use \"insecure\": true");
            }
            if !KNOWN.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) {
                bail!("unknown ghz config key {k:?}");
            }
        }
        let call_name = raw
            .get("call")
            .and_then(Value::as_str)
            .context("\"call\" is required (specd.v1.Generation.Generate or .GenerateStream)")?
            .to_string();
        let call = match call_name.replace('/', ".").as_str() {
            "specd.v1.Generation.Generate" => Call::Generate,
            "specd.v1.Generation.GenerateStream" => Call::GenerateStream,
            other => bail!(
                "call {other:?}: specd loadtest runs specd.v1.Generation.Generate and .GenerateStream"
            ),
        };
        let host = raw
            .get("host")
            .and_then(Value::as_str)
            .context("\"host\" is required (the router's gRPC address, HOST:PORT)")?
            .to_string();
        if raw.get("insecure").and_then(Value::as_bool) != Some(true) {
            bail!("\"insecure\": true is required: specd serves plaintext gRPC (no TLS yet)");
        }
        let mut data = match (
            raw.get("data"),
            raw.get("data-file").and_then(Value::as_str),
        ) {
            (Some(_), Some(_)) => bail!("give data or data-file, not both"),
            (Some(d), None) => d.clone(),
            (None, Some(f)) => {
                let p = if Path::new(f).is_absolute() || Path::new(f).exists() {
                    PathBuf::from(f)
                } else {
                    dir.join(f)
                };
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("data-file {}", p.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("data-file {}: not JSON", p.display()))?
            }
            (None, None) => bail!("data or data-file is required (a GenerateRequest as JSON)"),
        };
        let data = match data.take() {
            Value::Array(items) if items.is_empty() => bail!("data array must not be empty"),
            Value::Array(items) => items,
            obj @ Value::Object(_) => vec![obj],
            _ => bail!("data must be a GenerateRequest object or an array of them"),
        };
        for (i, d) in data.iter().enumerate() {
            request(d, 0, 0).with_context(|| format!("data[{i}]"))?;
        }
        let metadata = raw
            .get("metadata")
            .map_or(Ok(BTreeMap::new()), |v| string_map("metadata", v))?;
        for k in metadata.keys() {
            if tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes())
                .is_err()
            {
                bail!("metadata key {k:?} is not a valid gRPC metadata name");
            }
        }
        let total = raw.get("total").map_or(Ok(200), |v| count("total", v))?;
        let conc = raw
            .get("concurrency")
            .map_or(Ok(50), |v| count("concurrency", v))?
            .max(1);
        let concurrency = schedule(
            &raw,
            "concurrency",
            "concurrency-schedule",
            conc as f64,
            1.0,
        )?;
        let max_concurrency = match &concurrency {
            Schedule::Const(_) => conc,
            Schedule::Step { end, .. } | Schedule::Line { end, .. } if *end > 0.0 => {
                (*end as usize).max(1)
            }
            _ => conc.max(1),
        };
        let rps = raw.get("rps").map_or(Ok(0.0), |v| number("rps", v))?;
        let load_kind = raw
            .get("load-schedule")
            .and_then(Value::as_str)
            .unwrap_or("const");
        let rate = if load_kind == "const" && rps <= 0.0 {
            None
        } else {
            let start = raw
                .get("load-start")
                .map_or(Ok(rps), |v| number("load-start", v))?;
            Some(schedule(&raw, "load", "load-schedule", rps, start)?)
        };
        let duration = raw
            .get("duration")
            .map_or(Ok(None), |v| duration_value("duration", v))?;
        let duration_stop = match raw
            .get("duration-stop")
            .and_then(Value::as_str)
            .unwrap_or("close")
            .to_ascii_lowercase()
            .as_str()
        {
            "wait" => DurationStop::Wait,
            "ignore" => DurationStop::Ignore,
            _ => DurationStop::Close,
        };
        let max_duration = raw
            .get("max-duration")
            .map_or(Ok(None), |v| duration_value("max-duration", v))?;
        if total == 0 && duration.is_none() && max_duration.is_none() {
            bail!("total 0 with no duration would run forever");
        }
        let timeout = raw
            .get("timeout")
            .map_or(Ok(None), |v| duration_value("timeout", v))?
            .unwrap_or(Duration::from_secs(20));
        let stream_call_count = raw
            .get("stream-call-count")
            .map(|v| count("stream-call-count", v))
            .transpose()?
            .filter(|&n| n > 0);
        let stream_call_duration = raw
            .get("stream-call-duration")
            .map_or(Ok(None), |v| duration_value("stream-call-duration", v))?;
        if call == Call::Generate && (stream_call_count.is_some() || stream_call_duration.is_some())
        {
            bail!("stream-call-count and stream-call-duration apply to GenerateStream only");
        }
        let format = raw
            .get("format")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(f) = &format {
            if !matches!(f.as_str(), "summary" | "json" | "pretty" | "html") {
                bail!("format {f:?}: specd loadtest writes summary, json, pretty or html");
            }
        }
        Ok(Scenario {
            name: raw
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            call,
            host,
            data,
            metadata,
            total,
            concurrency,
            max_concurrency,
            connections: raw
                .get("connections")
                .map_or(Ok(1), |v| count("connections", v))?
                .max(1),
            rate,
            duration,
            duration_stop,
            max_duration,
            timeout,
            skip_first: raw
                .get("skipFirst")
                .map_or(Ok(0), |v| count("skipFirst", v))?,
            stream_call_count,
            stream_call_duration,
            tags: raw
                .get("tags")
                .map_or(Ok(BTreeMap::new()), |v| string_map("tags", v))?,
            format,
            output: raw.get("output").and_then(Value::as_str).map(PathBuf::from),
            raw,
        })
    }
}

fn field<'a>(obj: &'a Map<String, Value>, snake: &str) -> Option<&'a Value> {
    obj.get(snake).or_else(|| {
        let mut camel = String::new();
        let mut up = false;
        for c in snake.chars() {
            if c == '_' {
                up = true;
            } else if up {
                camel.push(c.to_ascii_uppercase());
                up = false;
            } else {
                camel.push(c);
            }
        }
        obj.get(&camel)
    })
}

fn template(s: &str, request: usize, worker: usize) -> String {
    s.replace("{{.RequestNumber}}", &request.to_string())
        .replace("{{.WorkerID}}", &worker.to_string())
}

fn text(v: &Value, key: &str, request: usize, worker: usize) -> anyhow::Result<String> {
    v.as_str()
        .map(|s| template(s, request, worker))
        .with_context(|| format!("{key} must be a string"))
}

fn unsigned(v: &Value, key: &str) -> anyhow::Result<u64> {
    // protojson writes 64-bit integers as strings.
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("{key} must be a non-negative integer"))
}

/// One GenerateRequest from protojson (`request` and `worker` fill ghz's template variables).
pub fn request(v: &Value, request_no: usize, worker: usize) -> anyhow::Result<GenerateRequest> {
    const FIELDS: [&str; 15] = [
        "model",
        "prompt",
        "chat",
        "raw_prompt",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop",
        "drafter",
        "draft_len",
        "request_id",
        "session_id",
        "",
    ];
    let obj = v
        .as_object()
        .context("a request must be a JSON object (GenerateRequest)")?;
    for k in obj.keys() {
        let snake: String = k
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        if snake.is_empty() || !FIELDS.contains(&snake.as_str()) {
            bail!("unknown GenerateRequest field {k:?}");
        }
    }
    let t = |k: &str| -> anyhow::Result<Option<String>> {
        field(obj, k)
            .map(|v| text(v, k, request_no, worker))
            .transpose()
    };
    let input = match (field(obj, "prompt"), field(obj, "chat")) {
        (Some(_), Some(_)) => bail!("give prompt or chat, not both"),
        (Some(p), None) => Input::Prompt(text(p, "prompt", request_no, worker)?),
        (None, Some(c)) => {
            let msgs = c
                .get("messages")
                .and_then(Value::as_array)
                .context("chat must be {\"messages\": [{\"role\": ..., \"content\": ...}]}")?;
            let messages = msgs
                .iter()
                .map(|m| {
                    Ok(ChatMessage {
                        role: text(
                            m.get("role").unwrap_or(&Value::Null),
                            "role",
                            request_no,
                            worker,
                        )?,
                        content: text(
                            m.get("content").unwrap_or(&Value::Null),
                            "content",
                            request_no,
                            worker,
                        )?,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Input::Chat(ChatMessages { messages })
        }
        (None, None) => bail!("a request needs prompt or chat"),
    };
    let float = |k: &str| -> anyhow::Result<Option<f32>> {
        field(obj, k)
            .map(|v| number(k, v).map(|x| x as f32))
            .transpose()
    };
    let u32_of = |k: &str| -> anyhow::Result<Option<u32>> {
        field(obj, k)
            .map(|v| {
                unsigned(v, k)
                    .and_then(|n| u32::try_from(n).map_err(|_| anyhow::anyhow!("{k} too large")))
            })
            .transpose()
    };
    Ok(GenerateRequest {
        model: t("model")?.unwrap_or_default(),
        input: Some(input),
        raw_prompt: field(obj, "raw_prompt")
            .map(|v| v.as_bool().context("raw_prompt must be true or false"))
            .transpose()?
            .unwrap_or(false),
        max_new_tokens: u32_of("max_new_tokens")?.unwrap_or(0),
        temperature: float("temperature")?,
        top_k: u32_of("top_k")?,
        top_p: float("top_p")?,
        seed: field(obj, "seed")
            .map(|v| unsigned(v, "seed"))
            .transpose()?,
        stop: field(obj, "stop")
            .map(|v| {
                v.as_array()
                    .context("stop must be an array of strings")?
                    .iter()
                    .map(|s| text(s, "stop", request_no, worker))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default(),
        drafter: t("drafter")?.unwrap_or_default(),
        draft_len: u32_of("draft_len")?,
        request_id: t("request_id")?.unwrap_or_default(),
        session_id: t("session_id")?.unwrap_or_default(),
    })
}

/// One call's outcome.
#[derive(Debug, Clone)]
pub struct CallResult {
    /// When it started, from the run's start.
    pub start: Duration,
    pub wall: SystemTime,
    pub latency: Duration,
    /// ghz's status name (`OK`, `Unavailable`, ...).
    pub status: String,
    /// ghz's error string; empty on success.
    pub error: String,
    pub tokens: usize,
    pub ttft: Option<Duration>,
    pub drafted: u64,
    pub accepted: u64,
}

/// ghz's (Go's) name of a status code.
pub fn status_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        tonic::Code::Cancelled => "Canceled".into(),
        other => format!("{other:?}"),
    }
}

async fn run_call(
    client: &mut GenerationClient<Channel>,
    sc: &Scenario,
    req: GenerateRequest,
    run_start: Instant,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Option<CallResult> {
    let mut request = tonic::Request::new(req);
    request.set_timeout(sc.timeout);
    for (k, v) in &sc.metadata {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            request.metadata_mut().insert(k, v);
        }
    }
    let t0 = Instant::now();
    let wall = SystemTime::now();
    let mut out = CallResult {
        start: t0 - run_start,
        wall,
        latency: Duration::ZERO,
        status: "OK".into(),
        error: String::new(),
        tokens: 0,
        ttft: None,
        drafted: 0,
        accepted: 0,
    };
    let work = async {
        match sc.call {
            Call::Generate => {
                let r = client.generate(request).await?.into_inner();
                out.tokens = r.token_ids.len();
                out.ttft = r
                    .timings
                    .map(|t| Duration::from_secs_f64(t.ttft_ms.max(0.0) / 1000.0));
                if let Some(s) = r.speculation {
                    out.drafted = s.drafted.into();
                    out.accepted = s.accepted.into();
                }
            }
            Call::GenerateStream => {
                let mut stream = client.generate_stream(request).await?.into_inner();
                let mut messages = 0usize;
                loop {
                    if sc.stream_call_count.is_some_and(|n| messages >= n)
                        || sc.stream_call_duration.is_some_and(|d| t0.elapsed() >= d)
                    {
                        break; // the client closes the stream, as ghz does; counted OK
                    }
                    let next = match sc.stream_call_duration {
                        Some(d) => {
                            let left = d.saturating_sub(t0.elapsed());
                            match tokio::time::timeout(left, stream.message()).await {
                                Ok(m) => m?,
                                Err(_) => break,
                            }
                        }
                        None => stream.message().await?,
                    };
                    let Some(m) = next else { break };
                    messages += 1;
                    if !m.token_ids.is_empty() && out.ttft.is_none() {
                        out.ttft = Some(t0.elapsed());
                    }
                    out.tokens += m.token_ids.len();
                    if let Some(s) = m.speculation {
                        out.drafted = s.drafted.into();
                        out.accepted = s.accepted.into();
                    }
                }
            }
        }
        Ok::<_, tonic::Status>(())
    };
    let mut stop = stop.clone();
    let result = tokio::select! {
        r = work => r,
        _ = stop.wait_for(|s| *s) => {
            match sc.duration_stop {
                DurationStop::Ignore => return None,
                _ => Err(tonic::Status::cancelled("the run's duration is up")),
            }
        }
    };
    out.latency = t0.elapsed();
    if let Err(e) = result {
        out.status = status_name(e.code());
        out.error = format!(
            "rpc error: code = {} desc = {}",
            status_name(e.code()),
            e.message()
        );
    }
    Some(out)
}

/// Runs `sc` and returns the results in start order, the wall time and ghz's end reason.
pub async fn run(sc: Arc<Scenario>) -> anyhow::Result<(Vec<CallResult>, Duration, &'static str)> {
    let mut channels = Vec::new();
    for _ in 0..sc.connections {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", sc.host))?
                .connect_timeout(Duration::from_secs(10))
                .connect()
                .await
                .with_context(|| format!("connecting to {}", sc.host))?,
        );
    }
    let start = Instant::now();
    // `stop` cancels the calls running; `no_more` only stops new ones from starting.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let no_more = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    // The pacer hands out request numbers at the scheduled rate; without a rate, workers take them
    // as fast as they finish.
    let (tx, rx) = async_channel(sc.max_concurrency);
    let pacer = {
        let (sc, no_more) = (Arc::clone(&sc), Arc::clone(&no_more));
        tokio::spawn(async move {
            let mut i = 0usize;
            let mut pace = Pace::default();
            loop {
                if no_more.load(Ordering::Relaxed) || (sc.duration.is_none() && i >= sc.total) {
                    return;
                }
                if let Some(rate) = &sc.rate {
                    // Wait until the schedule allows request i.
                    loop {
                        pace.advance(rate, start.elapsed());
                        if pace.allowed >= (i + 1) as f64 {
                            break;
                        }
                        if no_more.load(Ordering::Relaxed) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                tokio::select! {
                    sent = tx.send(i) => if sent.is_err() { return },
                    _ = async { while !no_more.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(20)).await } } => return,
                }
                i += 1;
            }
        })
    };
    let mut workers = Vec::new();
    for w in 0..sc.max_concurrency {
        let (sc, rx, results, stop, no_more) = (
            Arc::clone(&sc),
            rx.clone(),
            Arc::clone(&results),
            stop_rx.clone(),
            Arc::clone(&no_more),
        );
        let mut client = GenerationClient::new(channels[w % channels.len()].clone())
            .max_decoding_message_size(specd_service::grpc::MAX_MESSAGE_BYTES);
        workers.push(tokio::spawn(async move {
            loop {
                // A worker beyond the scheduled concurrency waits for the schedule to reach it.
                while (w as f64) >= sc.concurrency.at(start.elapsed()).floor().max(1.0) {
                    if no_more.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let Some(i) = rx.recv().await else { return };
                if no_more.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(req) = request(&sc.data[i % sc.data.len()], i, w) else {
                    continue; // every data item was validated when the scenario loaded
                };
                if let Some(r) = run_call(&mut client, &sc, req, start, &stop).await {
                    results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                }
            }
        }));
    }
    drop(rx);
    let all_done = async {
        let _ = pacer.await;
        for w in workers {
            let _ = w.await;
        }
    };
    tokio::pin!(all_done);
    // The run ends when every request is done, or `duration` (how long to run) or `max-duration`
    // (a bound on a run by count) is up.
    let limit = match (sc.duration, sc.max_duration) {
        (Some(d), Some(m)) => Some(d.min(m)),
        (d, m) => d.or(m),
    };
    let mut reason = "normal";
    if let Some(limit) = limit {
        tokio::select! {
            _ = &mut all_done => {}
            _ = tokio::time::sleep(limit) => {
                no_more.store(true, Ordering::Relaxed);
                if sc.duration.is_none() {
                    reason = "timeout";
                }
                if sc.duration_stop != DurationStop::Wait || sc.duration.is_none() {
                    let _ = stop_tx.send(true);
                }
                all_done.await;
            }
        }
    } else {
        all_done.await;
    }
    let wall = start.elapsed();
    let mut results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    results.sort_by_key(|r| r.start);
    let results = results.into_iter().skip(sc.skip_first).collect();
    Ok((results, wall, reason))
}

/// A multi-consumer channel of request numbers (tokio's mpsc has one consumer).
fn async_channel(cap: usize) -> (Sender, Receiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (Sender(tx), Receiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

struct Sender(tokio::sync::mpsc::Sender<usize>);
impl Sender {
    async fn send(&self, i: usize) -> Result<(), ()> {
        self.0.send(i).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct Receiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<usize>>>);
impl Receiver {
    async fn recv(&self) -> Option<usize> {
        self.0.lock().await.recv().await
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// RFC 3339 in UTC, as ghz's report `date`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// ghz's percentile pick over sorted seconds.
fn ghz_percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let ip = p / 100.0 * sorted.len() as f64;
    let mut di = ip as usize;
    if ip == di as f64 {
        di = di.saturating_sub(1);
    }
    sorted[di.min(sorted.len() - 1)]
}

fn ms(d: f64) -> f64 {
    (d * 1e3 * 1000.0).round() / 1000.0
}

/// Per-second figures for the plots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub t: u64,
    pub finished: usize,
    pub errors: usize,
    pub tokens: usize,
    pub latency_ms_p50: f64,
}

/// The report: ghz's keys, plus `specd` with token-level figures.
pub fn report(sc: &Scenario, results: &[CallResult], wall: Duration, reason: &str) -> Value {
    let count = results.len();
    let total_latency: f64 = results.iter().map(|r| r.latency.as_secs_f64()).sum();
    let mut ok: Vec<f64> = results
        .iter()
        .filter(|r| r.error.is_empty())
        .map(|r| r.latency.as_secs_f64())
        .collect();
    ok.sort_by(f64::total_cmp);
    let mut status: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        *status.entry(r.status.clone()).or_default() += 1;
        if !r.error.is_empty() {
            *errors.entry(r.error.clone()).or_default() += 1;
        }
    }
    let (fastest, slowest) = (
        ok.first().copied().unwrap_or(0.0),
        ok.last().copied().unwrap_or(0.0),
    );
    let latency_dist: Vec<Value> = if ok.is_empty() {
        Vec::new()
    } else {
        [10, 25, 50, 75, 90, 95, 99]
            .iter()
            .map(|&p| {
                json!({"percentage": p, "latency": nanos(Duration::from_secs_f64(ghz_percentile(&ok, p as f64)))})
            })
            .collect()
    };
    let histogram: Vec<Value> = if ok.is_empty() {
        Vec::new()
    } else {
        let bc = 10;
        let width = (slowest - fastest) / bc as f64;
        let marks: Vec<f64> = (0..=bc)
            .map(|i| {
                if i == bc {
                    slowest
                } else {
                    fastest + width * i as f64
                }
            })
            .collect();
        let mut counts = vec![0usize; bc + 1];
        for &l in &ok {
            let b = marks.iter().position(|&m| l <= m).unwrap_or(bc);
            counts[b] += 1;
        }
        marks
            .iter()
            .zip(&counts)
            .map(|(&m, &c)| json!({"mark": m, "count": c, "frequency": c as f64 / ok.len() as f64}))
            .collect()
    };
    let details: Vec<Value> = results
        .iter()
        .take(10_000)
        .map(|r| {
            json!({
                "timestamp": rfc3339(r.wall),
                "latency": nanos(r.latency),
                "error": r.error,
                "status": r.status,
            })
        })
        .collect();
    // specd's own figures.
    let good: Vec<&CallResult> = results.iter().filter(|r| r.error.is_empty()).collect();
    let tokens: usize = good.iter().map(|r| r.tokens).sum();
    let mut ttft: Vec<f64> = good
        .iter()
        .filter_map(|r| r.ttft.map(|t| t.as_secs_f64()))
        .collect();
    ttft.sort_by(f64::total_cmp);
    let mut tpot: Vec<f64> = good
        .iter()
        .filter(|r| r.tokens > 1)
        .filter_map(|r| {
            r.ttft
                .map(|t| (r.latency.as_secs_f64() - t.as_secs_f64()) / (r.tokens - 1) as f64)
        })
        .collect();
    tpot.sort_by(f64::total_cmp);
    let (drafted, accepted): (u64, u64) = good
        .iter()
        .fold((0, 0), |(d, a), r| (d + r.drafted, a + r.accepted));
    let pick = |v: &[f64], p: f64| ms(ghz_percentile(v, p));
    let seconds = timeline(results);
    let wall_s = wall.as_secs_f64().max(1e-9);
    let mut options = Map::new();
    for k in [
        "host",
        "call",
        "insecure",
        "total",
        "concurrency",
        "rps",
        "connections",
        "duration",
        "timeout",
        "data",
        "metadata",
        "load-schedule",
        "concurrency-schedule",
    ] {
        if let Some(v) = sc.raw.get(k) {
            options.insert(k.to_string(), v.clone());
        }
    }
    options.insert(
        "CPUs".into(),
        json!(std::thread::available_parallelism().map_or(1, |n| n.get())),
    );
    json!({
        "name": sc.name,
        "endReason": reason,
        "options": options,
        "date": rfc3339(SystemTime::now()),
        "count": count,
        "total": nanos(wall),
        "average": if count > 0 { nanos(Duration::from_secs_f64(total_latency / count as f64)) } else { 0 },
        "fastest": nanos(Duration::from_secs_f64(fastest)),
        "slowest": nanos(Duration::from_secs_f64(slowest)),
        "rps": if count > 0 { count as f64 / wall_s } else { 0.0 },
        "errorDistribution": errors,
        "statusCodeDistribution": status,
        "latencyDistribution": latency_dist,
        "histogram": histogram,
        "details": details,
        "tags": sc.tags,
        "specd": {
            "ok": good.len(),
            "tokens": tokens,
            "tokens_per_s": (tokens as f64 / wall_s * 1000.0).round() / 1000.0,
            "ttft_ms": {"p50": pick(&ttft, 50.0), "p90": pick(&ttft, 90.0), "p99": pick(&ttft, 99.0)},
            "tpot_ms": {"p50": pick(&tpot, 50.0), "p90": pick(&tpot, 90.0), "p99": pick(&tpot, 99.0)},
            "drafted": drafted,
            "accepted": accepted,
            "acceptance": if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 },
            "timeline": seconds,
        },
    })
}

fn timeline(results: &[CallResult]) -> Vec<Second> {
    let end = results
        .iter()
        .map(|r| (r.start + r.latency).as_secs())
        .max()
        .unwrap_or(0);
    let mut secs: Vec<Second> = (0..=end)
        .map(|t| Second {
            t,
            ..Default::default()
        })
        .collect();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); secs.len()];
    for r in results {
        let t = (r.start + r.latency).as_secs() as usize;
        let s = &mut secs[t];
        s.finished += 1;
        if r.error.is_empty() {
            s.tokens += r.tokens;
            lat[t].push(r.latency.as_secs_f64());
        } else {
            s.errors += 1;
        }
    }
    for (s, l) in secs.iter_mut().zip(&mut lat) {
        l.sort_by(f64::total_cmp);
        s.latency_ms_p50 = ms(ghz_percentile(l, 50.0));
    }
    secs
}

/// ghz's summary, as text.
pub fn summary(sc: &Scenario, r: &Value) -> String {
    let ns = |k: &str| r[k].as_u64().unwrap_or(0) as f64 / 1e6;
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(s, "\nSummary:");
    if !sc.name.is_empty() {
        let _ = writeln!(s, "  Name:\t\t{}", sc.name);
    }
    let _ = writeln!(s, "  Count:\t{}", r["count"]);
    let _ = writeln!(s, "  Total:\t{:.2} ms", ns("total"));
    let _ = writeln!(s, "  Slowest:\t{:.2} ms", ns("slowest"));
    let _ = writeln!(s, "  Fastest:\t{:.2} ms", ns("fastest"));
    let _ = writeln!(s, "  Average:\t{:.2} ms", ns("average"));
    let _ = writeln!(
        s,
        "  Requests/sec:\t{:.2}",
        r["rps"].as_f64().unwrap_or(0.0)
    );
    let sp = &r["specd"];
    let _ = writeln!(
        s,
        "  Tokens/sec:\t{:.2}  (TTFT p50 {} ms p99 {} ms, TPOT p50 {} ms p99 {} ms, acceptance {:.3})",
        sp["tokens_per_s"].as_f64().unwrap_or(0.0),
        sp["ttft_ms"]["p50"],
        sp["ttft_ms"]["p99"],
        sp["tpot_ms"]["p50"],
        sp["tpot_ms"]["p99"],
        sp["acceptance"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(s, "\nLatency distribution:");
    for l in r["latencyDistribution"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  {} % in {:.2} ms",
            l["percentage"],
            l["latency"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    let _ = writeln!(s, "\nStatus code distribution:");
    for (k, v) in r["statusCodeDistribution"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(s, "  [{k}]\t{v} responses");
    }
    if let Some(e) = r["errorDistribution"].as_object().filter(|e| !e.is_empty()) {
        let _ = writeln!(s, "\nError distribution:");
        for (k, v) in e {
            let _ = writeln!(s, "  [{v}]\t{k}");
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        serde_json::from_value(json!({
            "call": "specd.v1.Generation.GenerateStream",
            "host": "127.0.0.1:50051",
            "insecure": true,
            "data": {"prompt": "hi {{.RequestNumber}}", "maxNewTokens": 8, "temperature": 0},
        }))
        .unwrap()
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2.5s").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_scenario_reads_ghz_keys_and_defaults() {
        let sc = Scenario::from_map(base(), Path::new(".")).unwrap();
        assert_eq!(sc.call, Call::GenerateStream);
        assert_eq!((sc.total, sc.max_concurrency), (200, 50));
        assert_eq!(sc.timeout, Duration::from_secs(20));
        assert!(sc.rate.is_none());
        let req = request(&sc.data[0], 7, 0).unwrap();
        assert_eq!(req.max_new_tokens, 8);
        assert_eq!(req.input, Some(Input::Prompt("hi 7".into())));
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_key() {
        let cases = [
            ("insecure", json!(false), "insecure"),
            ("cacert", json!("ca.pem"), "TLS"),
            ("totl", json!(3), "unknown ghz config key"),
            ("call", json!("helloworld.Greeter.SayHello"), "call"),
            (
                "data",
                json!({"prompt": "x", "max_tokens": 3}),
                "max_tokens",
            ),
            ("data", json!([]), "empty"),
            ("load-schedule", json!("step"), "load-step-duration"),
            ("timeout", json!("5 fortnights"), "timeout"),
        ];
        for (k, v, want) in cases {
            let mut raw = base();
            raw.insert(k.into(), v);
            let err = format!("{:#}", Scenario::from_map(raw, Path::new(".")).unwrap_err());
            assert!(err.contains(want), "{k}: {err}");
        }
    }

    #[test]
    fn schedules_follow_ghz_semantics() {
        let step = Schedule::Step {
            start: 1.0,
            step: 2.0,
            end: 5.0,
            every: Duration::from_secs(1),
            max: None,
        };
        assert_eq!(step.at(Duration::from_millis(500)), 1.0);
        assert_eq!(step.at(Duration::from_millis(1500)), 3.0);
        assert_eq!(step.at(Duration::from_secs(10)), 5.0);
        let line = Schedule::Line {
            start: 0.0,
            step: 4.0,
            end: 0.0,
            max: Some(Duration::from_secs(2)),
        };
        assert_eq!(line.at(Duration::from_secs(1)), 4.0);
        assert_eq!(line.at(Duration::from_secs(5)), 8.0);
        // A constant 10/s allows 10 requests in the first second.
        let c = Schedule::Const(10.0);
        assert!((c.allowed_by(Duration::from_secs(1)) - 10.0).abs() < 0.2);
    }

    #[test]
    fn the_report_has_ghz_shape_and_specd_figures() {
        let sc = Scenario::from_map(base(), Path::new(".")).unwrap();
        let mk = |ms: u64, err: bool| CallResult {
            start: Duration::from_millis(ms),
            wall: SystemTime::UNIX_EPOCH,
            latency: Duration::from_millis(100 + ms),
            status: if err {
                "Unavailable".into()
            } else {
                "OK".into()
            },
            error: if err {
                "rpc error: code = Unavailable desc = x".into()
            } else {
                String::new()
            },
            tokens: 10,
            ttft: Some(Duration::from_millis(10)),
            drafted: 4,
            accepted: 3,
        };
        let results = vec![mk(0, false), mk(50, false), mk(100, true)];
        let r = report(&sc, &results, Duration::from_secs(1), "normal");
        assert_eq!(r["count"], 3);
        assert_eq!(r["statusCodeDistribution"]["OK"], 2);
        assert_eq!(r["statusCodeDistribution"]["Unavailable"], 1);
        assert_eq!(r["fastest"], 100_000_000u64);
        assert_eq!(r["slowest"], 150_000_000u64);
        assert_eq!(r["latencyDistribution"].as_array().unwrap().len(), 7);
        assert_eq!(r["specd"]["tokens"], 20);
        assert_eq!(r["specd"]["acceptance"], 0.75);
        assert_eq!(r["date"].as_str().unwrap().len(), 20);
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_000_000)),
            "2026-12-23T04:26:40Z"
        );
    }
}

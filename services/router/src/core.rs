//! The router's request path, shared by the gRPC and the HTTP front ends: validate and tokenize,
//! admit, run the speculation loop, decode text, and account for it (metrics, timings).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use specd_coord::Role;
use specd_core::SamplingParams;
use specd_service::Drain;
use specd_tokenizer::{chat_prompt_ids, ChatMessage, GgufMeta, SpecdTokenizer};
use tokio::sync::mpsc;
use tonic::Status;

use crate::admission::Admission;
use crate::output::Output;
use crate::pool::Pool;
use crate::spec::{self, Finish, GenRequest, Learned, Pushed, Sink, SpecConfig, SpecStats};

/// Most stop strings per request, and most bytes per stop string.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Longest caller-chosen request id.
pub const MAX_REQUEST_ID: usize = 128;
/// Largest pinned draft length.
pub const MAX_DRAFT_LEN: u32 = 32;
/// Drafter names a request may ask for.
pub const DRAFTER_KINDS: &[&str] = &["auto", "none", "model", "self", "ngram"];

/// The model this router serves, read from the target's GGUF metadata (no weights are loaded).
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub id: String,
    /// Other names accepted for the model (the preset name).
    pub aliases: Vec<String>,
    pub family: String,
    pub context: usize,
    pub tokenizer: Arc<SpecdTokenizer>,
}

impl ModelMeta {
    /// Reads the tokenizer and shape of the GGUF at `path`; the model id is the file stem.
    pub fn from_gguf(path: &Path, aliases: Vec<String>) -> anyhow::Result<Self> {
        let meta =
            GgufMeta::open(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let tokenizer = SpecdTokenizer::from_gguf_meta(&meta)
            .map_err(|e| anyhow::anyhow!("tokenizer of {}: {e}", path.display()))?;
        let family = meta.architecture().unwrap_or("unknown").to_string();
        let context = meta
            .get_u32(&format!("{family}.context_length"))
            .unwrap_or(4096) as usize;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            id,
            aliases,
            family,
            context,
            tokenizer: Arc::new(tokenizer),
        })
    }

    pub fn fingerprint(&self) -> &str {
        self.tokenizer.fingerprint()
    }

    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.id || self.aliases.iter().any(|a| a == name)
    }
}

/// Router limits and defaults.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub spec: SpecConfig,
    pub max_concurrent: usize,
    pub max_queue: usize,
    /// Used when a request leaves max_new_tokens at 0.
    pub default_max_new_tokens: u32,
    /// Used when a request leaves temperature unset.
    pub default_temperature: f32,
    /// Largest prompt (or sum of chat message contents) in bytes, refused before any tokenizing.
    pub max_prompt_bytes: usize,
}

/// Default [`RouterConfig::max_prompt_bytes`]: far above what any served context holds as text (a
/// 32K-token context is about 128 KB), small enough that tokenizing one is a bounded cost.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 1 << 20;

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            spec: SpecConfig::default(),
            max_concurrent: 64,
            max_queue: 256,
            default_max_new_tokens: 256,
            default_temperature: 1.0,
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
        }
    }
}

/// What to continue.
#[derive(Clone, Debug)]
pub enum Input {
    /// Text; the chat template is applied as one user message unless `raw`.
    Prompt {
        text: String,
        raw: bool,
    },
    Chat(Vec<ChatMessage>),
}

/// A generation request as either front end received it.
#[derive(Clone, Debug, Default)]
pub struct ApiRequest {
    pub model: String,
    pub input: Option<Input>,
    pub max_new_tokens: u32,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub drafter: String,
    pub draft_len: Option<u32>,
    pub request_id: String,
    pub session_id: String,
}

/// A validated request. Its prompt is tokenized once it is admitted ([`Router::tokenize_prepared`]), so
/// that the cost of tokenizing is bounded by admission like the rest of the work.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The input still to tokenize; `None` once `gen.prompt_ids` holds it.
    pub input: Option<Input>,
    pub gen: GenRequest,
    pub stop: Vec<String>,
    pub received: Instant,
}

/// Text and tokens newly accepted, for streaming.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub text: String,
    pub token_ids: Vec<u32>,
}

/// Latencies in ms.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub queue_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// A finished request.
#[derive(Clone, Debug)]
pub struct Completed {
    pub request_id: String,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub stats: SpecStats,
    pub timings: Timings,
}

/// Everything a router needs to serve requests.
pub struct Router {
    pub pool: Pool,
    pub model: ModelMeta,
    pub cfg: RouterConfig,
    pub admission: Admission,
    pub drain: Drain,
    learned: Learned,
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

impl Router {
    pub fn new(pool: Pool, model: ModelMeta, cfg: RouterConfig, drain: Drain) -> Self {
        Self {
            admission: Admission::new(cfg.max_concurrent, cfg.max_queue),
            pool,
            model,
            cfg,
            drain,
            learned: Learned::default(),
        }
    }

    /// Drafter kinds live drafter workers offer for this model.
    pub fn drafter_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .pool
            .workers(Role::Drafter)
            .iter()
            .filter(|w| w.record.tokenizer_fingerprint == self.model.fingerprint())
            .flat_map(|w| w.record.drafter_kinds.clone())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// Validates and tokenizes; every refusal is INVALID_ARGUMENT naming the field (NOT_FOUND for an
    /// unknown model), counted in `specd_request_errors_total` under `api`.
    pub fn prepare(&self, r: ApiRequest, api: &'static str) -> Result<Prepared, Status> {
        self.prepare_inner(r).inspect_err(|s| count_error(api, s))
    }

    fn prepare_inner(&self, r: ApiRequest) -> Result<Prepared, Status> {
        let received = Instant::now();
        if !self.model.matches(&r.model) {
            return Err(Status::not_found(format!(
                "model: {:?} is not served here (serving {:?})",
                r.model, self.model.id
            )));
        }
        let limit = self.cfg.max_prompt_bytes;
        let input = match r.input {
            None => return Err(invalid("prompt", "one of prompt or chat is required")),
            Some(Input::Prompt { text, raw }) => {
                if text.is_empty() {
                    return Err(invalid("prompt", "must not be empty"));
                }
                if text.len() > limit {
                    return Err(invalid(
                        "prompt",
                        format!("{} bytes exceed the limit of {limit}", text.len()),
                    ));
                }
                Input::Prompt { text, raw }
            }
            Some(Input::Chat(messages)) => {
                if messages.is_empty() {
                    return Err(invalid("messages", "must hold at least one message"));
                }
                let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
                if bytes > limit {
                    return Err(invalid(
                        "messages",
                        format!("{bytes} bytes of content exceed the limit of {limit}"),
                    ));
                }
                Input::Chat(messages)
            }
        };
        let context = self.model.context;
        let max_new = if r.max_new_tokens == 0 {
            self.cfg.default_max_new_tokens
        } else {
            r.max_new_tokens
        } as usize;
        if max_new > context {
            return Err(invalid(
                "max_new_tokens",
                format!("{max_new} exceeds the model's context of {context}"),
            ));
        }
        let temperature = r.temperature.unwrap_or(self.cfg.default_temperature);
        if !(temperature.is_finite()
            && (0.0..=specd_core::sampling::MAX_TEMPERATURE).contains(&temperature))
        {
            return Err(invalid(
                "temperature",
                format!(
                    "must be in [0, {}], got {temperature}",
                    specd_core::sampling::MAX_TEMPERATURE
                ),
            ));
        }
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {top_p}")));
        }
        let params = SamplingParams {
            temperature,
            top_k: r.top_k.unwrap_or(0) as usize,
            top_p,
            seed: r.seed,
        };
        if r.stop.len() > MAX_STOPS {
            return Err(invalid("stop", format!("at most {MAX_STOPS} stop strings")));
        }
        if let Some(s) = r
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(invalid(
                "stop",
                format!(
                    "stop strings must be 1 to {MAX_STOP_BYTES} bytes, got {} bytes",
                    s.len()
                ),
            ));
        }
        let drafter = match r.drafter.as_str() {
            "" | "auto" => self.cfg.spec.auto_kind.clone(),
            k if DRAFTER_KINDS.contains(&k) => k.to_string(),
            other => {
                return Err(invalid(
                    "drafter",
                    format!("unknown drafter {other:?} (auto, none, model, self, ngram)"),
                ))
            }
        };
        if let Some(k) = r.draft_len {
            if k == 0 || k > MAX_DRAFT_LEN {
                return Err(invalid(
                    "draft_len",
                    format!("must be in 1..={MAX_DRAFT_LEN}, got {k}"),
                ));
            }
        }
        if r.request_id.len() > MAX_REQUEST_ID {
            return Err(invalid(
                "request_id",
                format!("at most {MAX_REQUEST_ID} bytes"),
            ));
        }
        let request_id = if r.request_id.is_empty() {
            specd_service::random_id()
        } else {
            r.request_id
        };
        Ok(Prepared {
            input: Some(input),
            gen: GenRequest {
                request_id,
                prompt_ids: Vec::new(),
                max_new_tokens: max_new,
                params,
                drafter,
                draft_len: r.draft_len.map(|k| k as usize),
                session: (!r.session_id.is_empty()).then_some(r.session_id),
                stop_ids: self.model.tokenizer.stop_ids().to_vec(),
                deadline: None,
            },
            stop: r.stop,
            received,
        })
    }

    /// Tokenizes a prepared request's input (on the blocking pool: a long prompt takes a while) and
    /// checks it fits the context; a no-op once done. Chat content is encoded as plain text between the
    /// template's own control tokens ([`chat_prompt_ids`]): typed special tokens cannot forge a turn.
    /// A raw prompt is the caller's whole templated prompt and is encoded as written.
    pub async fn tokenize_prepared(&self, p: &mut Prepared) -> Result<(), Status> {
        let Some(input) = p.input.take() else {
            return Ok(());
        };
        let tok = Arc::clone(&self.model.tokenizer);
        let ids = tokio::task::spawn_blocking(move || match input {
            Input::Prompt { text, raw } => if raw || tok.chat_template().is_none() {
                tok.encode(&text, false)
            } else {
                chat_prompt_ids(&tok, &[ChatMessage::user(text)], true)
            }
            .map_err(|e| invalid("prompt", e)),
            Input::Chat(messages) => {
                chat_prompt_ids(&tok, &messages, true).map_err(|e| invalid("messages", e))
            }
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizing: {e}")))??;
        let context = self.model.context;
        if ids.is_empty() {
            return Err(invalid("prompt", "tokenizes to nothing"));
        }
        if ids.len() >= context {
            return Err(invalid(
                "prompt",
                format!(
                    "{} tokens leave no room in the model's context of {context}",
                    ids.len()
                ),
            ));
        }
        p.gen.prompt_ids = ids;
        Ok(())
    }

    /// Admits and runs a prepared request. With `deltas`, text is sent there as it is accepted.
    pub async fn execute(
        &self,
        mut p: Prepared,
        deadline: Option<tokio::time::Instant>,
        deltas: Option<mpsc::UnboundedSender<Delta>>,
        api: &'static str,
    ) -> Result<Completed, Status> {
        self.execute_inner(&mut p, deadline, deltas)
            .await
            .inspect_err(|s| count_error(api, s))
    }

    async fn execute_inner(
        &self,
        p: &mut Prepared,
        deadline: Option<tokio::time::Instant>,
        deltas: Option<mpsc::UnboundedSender<Delta>>,
    ) -> Result<Completed, Status> {
        let _in_flight = self
            .drain
            .enter()
            .ok_or_else(|| Status::unavailable("router is draining"))?;
        metrics::gauge!("specd_num_requests_waiting").increment(1.0);
        let admitted = self.admission.admit(deadline).await;
        metrics::gauge!("specd_num_requests_waiting").decrement(1.0);
        let _slot = admitted?;
        self.tokenize_prepared(p).await?;
        let queue_ms = ms(p.received);
        metrics::histogram!("specd_request_queue_time_seconds").record(queue_ms / 1000.0);
        metrics::gauge!("specd_num_requests_running").increment(1.0);
        let _running = Decrement("specd_num_requests_running");
        p.gen.deadline = deadline;
        let mut sink = TextSink {
            output: Output::new(&self.model.tokenizer, p.stop.clone()),
            deltas,
            first_at: None,
            error: None,
        };
        let run = spec::run(
            &self.pool,
            self.model.fingerprint(),
            self.model.context,
            &self.cfg.spec,
            &self.learned,
            &p.gen,
            &mut sink,
        );
        let (tokens, finish, stats) = match deadline {
            Some(d) => tokio::time::timeout_at(d, run)
                .await
                .map_err(|_| Status::deadline_exceeded("deadline passed during generation"))??,
            None => run.await?,
        };
        if let Some(e) = sink.error.take() {
            return Err(e);
        }
        let tail = sink.output.finish();
        if !tail.is_empty() {
            if let Some(tx) = &sink.deltas {
                let _ = tx.send(Delta {
                    text: tail,
                    token_ids: Vec::new(),
                });
            }
        }
        let finish = if sink.output.stopped() {
            Finish::Stop
        } else {
            finish
        };
        let total_ms = ms(p.received);
        let ttft_ms = sink
            .first_at
            .map_or(total_ms, |t| (t - p.received).as_secs_f64() * 1000.0);
        let n = tokens.len();
        metrics::histogram!("specd_time_to_first_token_seconds").record(ttft_ms / 1000.0);
        metrics::histogram!("specd_e2e_request_latency_seconds").record(total_ms / 1000.0);
        if n > 1 {
            metrics::histogram!("specd_time_per_output_token_seconds")
                .record((total_ms - ttft_ms) / 1000.0 / (n - 1) as f64);
        }
        metrics::histogram!("specd_request_prompt_tokens").record(p.gen.prompt_ids.len() as f64);
        metrics::histogram!("specd_request_generation_tokens").record(n as f64);
        metrics::counter!("specd_prompt_tokens_total").increment(p.gen.prompt_ids.len() as u64);
        metrics::counter!("specd_generation_tokens_total").increment(n as u64);
        metrics::counter!("specd_requests_total", "finish" => finish_name(finish)).increment(1);
        Ok(Completed {
            request_id: p.gen.request_id.clone(),
            text: sink.output.text().to_string(),
            token_ids: tokens,
            finish,
            prompt_tokens: p.gen.prompt_ids.len(),
            stats,
            timings: Timings {
                queue_ms,
                ttft_ms,
                total_ms,
            },
        })
    }
}

/// Counts a failed request by front end and status code.
pub fn count_error(api: &'static str, s: &Status) {
    metrics::counter!("specd_request_errors_total", "api" => api, "code" => code_name(s.code()))
        .increment(1);
}

struct Decrement(&'static str);

impl Drop for Decrement {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

struct TextSink {
    output: Output,
    deltas: Option<mpsc::UnboundedSender<Delta>>,
    first_at: Option<Instant>,
    error: Option<Status>,
}

impl Sink for TextSink {
    /// Decodes token by token, so that a stop string ends the output at the token that completed it
    /// whatever number of tokens the step accepted at once.
    fn push(&mut self, tokens: &[u32]) -> Pushed {
        self.first_at.get_or_insert_with(Instant::now);
        let mut text = String::new();
        let mut taken = 0;
        // Without stop strings nothing can end the output mid-batch: one push for all of it.
        let pieces: Vec<&[u32]> = if self.output.has_stops() {
            tokens.chunks(1).collect()
        } else {
            vec![tokens]
        };
        for piece in pieces {
            match self.output.push(piece) {
                Ok(t) => text.push_str(&t),
                Err(e) => {
                    self.error = Some(e);
                    return Pushed {
                        taken,
                        go_on: false,
                    };
                }
            }
            taken += piece.len();
            if self.output.stopped() {
                break;
            }
        }
        if let Some(tx) = &self.deltas {
            let sent = tx.send(Delta {
                text,
                token_ids: tokens[..taken].to_vec(),
            });
            if sent.is_err() {
                return Pushed {
                    taken,
                    go_on: false,
                };
            }
        }
        Pushed {
            taken,
            go_on: !self.output.stopped(),
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

pub fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "cancelled",
    }
}

pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use specd_tokenizer::testing::tiny_tokenizer;

    fn sink(tok: &SpecdTokenizer, stop: &str) -> TextSink {
        TextSink {
            output: Output::new(tok, vec![stop.to_string()]),
            deltas: None,
            first_at: None,
            error: None,
        }
    }

    /// However the tokens arrive (one step accepting them all, or one at a time), the output ends at
    /// the token that completed the stop string: same text, same tokens, same usage.
    #[test]
    fn a_stop_string_cuts_the_tokens_where_it_completes_whatever_the_batching() {
        let tok = tiny_tokenizer();
        let ids = tok
            .encode("hello world and more words after", false)
            .expect("encode");
        let stop = "world";
        let end = (1..=ids.len())
            .find(|&n| tok.decode(&ids[..n], true).expect("decode").contains(stop))
            .expect("the stop string occurs");
        assert!(end < ids.len(), "tokens follow the stop string");
        let mut whole = sink(&tok, stop);
        let p = whole.push(&ids);
        assert_eq!(
            p,
            Pushed {
                taken: end,
                go_on: false
            }
        );
        let mut single = sink(&tok, stop);
        let mut taken = 0;
        for t in &ids {
            let p = single.push(std::slice::from_ref(t));
            taken += p.taken;
            if !p.go_on {
                break;
            }
        }
        assert_eq!(taken, end);
        assert_eq!(whole.output.text(), single.output.text());
        assert_eq!(whole.output.text(), "hello ");
    }
}

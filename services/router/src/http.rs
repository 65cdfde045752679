//! The OpenAI-compatible HTTP front end (axum): `POST /v1/completions`, `POST /v1/chat/completions`
//! (both with `stream: true` as server-sent events), `GET /v1/models`, plus `GET /health` and
//! `GET /metrics`.
//!
//! Errors use OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status of
//! the gRPC code: INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503 (both with
//! `Retry-After: 1`),
//! DEADLINE_EXCEEDED 504. specd's own knobs ride along as extra fields (`top_k`, `drafter`, `draft_len`,
//! `session_id`, `request_id`); parameters specd cannot honour (n > 1, logprobs, penalties, ...) are
//! refused with 400 rather than silently ignored.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use specd_tokenizer::ChatMessage;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::core::{ApiRequest, Completed, Delta, Input, Router};
use crate::spec::Finish;

/// The HTTP routes of a router.
pub fn app(router: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route(
            "/metrics",
            get(|| async { specd_service::metrics::render() }),
        )
        .with_state(router)
}

/// An error answer in OpenAI's shape.
pub struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError(s)
    }
}

pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_body(s: &Status) -> Value {
    let kind = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => "invalid_request_error",
        tonic::Code::ResourceExhausted => "rate_limit_error",
        _ => "server_error",
    };
    // Messages name the field first ("temperature: ..."): pass it as `param`.
    let param = s
        .message()
        .split_once(':')
        .map(|(f, _)| f)
        .filter(|f| !f.contains(' '))
        .map(|f| Value::String(f.to_string()))
        .unwrap_or(Value::Null);
    json!({"error": {"message": s.message(), "type": kind, "param": param, "code": crate::core::code_name(s.code())}})
}

/// Seconds a client is asked to wait before retrying a 429 or a 503 (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.0.code());
        let mut r = (status, Json(error_body(&self.0))).into_response();
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECS),
            );
        }
        r
    }
}

/// A prompt: one string, or a list holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// A stop parameter: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    best_of: Option<u32>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    echo: Option<bool>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    // specd extensions
    drafter: Option<String>,
    draft_len: Option<u32>,
    session_id: Option<String>,
    request_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Option<Prompt>,
    #[serde(flatten)]
    common: Common,
}

/// Chat content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Option<Vec<Message>>,
    #[serde(flatten)]
    common: Common,
}

fn bad(field: &str, msg: impl std::fmt::Display) -> ApiError {
    let s = Status::invalid_argument(format!("{field}: {msg}"));
    crate::core::count_error("http", &s);
    ApiError(s)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(bad("body", "is not valid UTF-8"));
    }
    serde_json::from_slice(body).map_err(|e| bad("body", format!("invalid JSON request: {e}")))
}

impl Common {
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("n", "only n = 1 is supported"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(bad("best_of", "only best_of = 1 is supported"));
        }
        let truthy = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
        };
        if truthy(&self.logprobs) || truthy(&self.top_logprobs) {
            return Err(bad("logprobs", "log probabilities are not supported"));
        }
        if self.echo == Some(true) {
            return Err(bad("echo", "echo is not supported"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(bad("presence_penalty", "penalties are not supported"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(bad("frequency_penalty", "penalties are not supported"));
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(bad("logit_bias", "logit bias is not supported"));
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad("tools", "tool calls are not supported"));
        }
        Ok(())
    }

    fn into_request(self, input: Input) -> ApiRequest {
        ApiRequest {
            model: self.model,
            input: Some(input),
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(0),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
            drafter: self.drafter.unwrap_or_default(),
            draft_len: self.draft_len,
            request_id: self.request_id.unwrap_or_default(),
            session_id: self.session_id.unwrap_or_default(),
        }
    }
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        // OpenAI has no "cancelled"; a cancelled request has no reader anyway.
        Finish::Cancelled => "stop",
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(c: &Completed) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.token_ids.len(),
        "total_tokens": c.prompt_tokens + c.token_ids.len(),
    })
}

fn speculation(c: &Completed) -> Value {
    json!({
        "drafter": c.stats.drafter,
        "drafted": c.stats.drafted,
        "accepted": c.stats.accepted,
        "steps": c.stats.steps,
        "accepted_per_position": c.stats.accepted_per_position,
        "queue_ms": c.timings.queue_ms,
        "ttft_ms": c.timings.ttft_ms,
        "total_ms": c.timings.total_ms,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(router): State<Arc<Router>>, body: Bytes) -> Result<Response, ApiError> {
    let body: CompletionBody = parse(&body)?;
    body.common.check_supported()?;
    let text = match body.prompt {
        None => return Err(bad("prompt", "is required")),
        Some(Prompt::One(s)) => s,
        Some(Prompt::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(Prompt::Many(_)) => {
            return Err(bad("prompt", "exactly one prompt per request is supported"))
        }
    };
    run(
        router,
        body.common,
        Input::Prompt { text, raw: true },
        Kind::Completion,
    )
    .await
}

async fn chat_completions(
    State(router): State<Arc<Router>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ChatBody = parse(&body)?;
    body.common.check_supported()?;
    let Some(messages) = body.messages else {
        return Err(bad("messages", "is required"));
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(bad(
                        "messages",
                        format!(
                            "message #{i}: content part type {:?} is not supported",
                            p.kind
                        ),
                    ));
                }
                parts
                    .into_iter()
                    .map(|p| p.text)
                    .collect::<Vec<_>>()
                    .join("")
            }
        };
        // OpenAI's newer "developer" role is the system prompt.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        out.push(ChatMessage::new(role, content));
    }
    run(router, body.common, Input::Chat(out), Kind::Chat).await
}

async fn run(
    router: Arc<Router>,
    common: Common,
    input: Input,
    kind: Kind,
) -> Result<Response, ApiError> {
    let stream = common.stream;
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let prepared = router.prepare(common.into_request(input), "http")?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        prepared.gen.request_id
    );
    let model = router.model.id.clone();
    let created = now_secs();
    if !stream {
        let c = router.execute(prepared, None, None, "http").await?;
        let choice = match kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": null,
                "finish_reason": finish_str(c.finish),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": c.text,
                "logprobs": null,
                "finish_reason": finish_str(c.finish),
            }),
        };
        let object = if kind == Kind::Chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return Ok(Json(json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(&c),
            "specd": speculation(&c),
        }))
        .into_response());
    }

    // Streaming: deltas become SSE chunks; an error after the start becomes an error chunk.
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Value>();
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    if kind == Kind::Chat {
        let _ = events_tx.send(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
    }
    tokio::spawn(async move {
        let (delta_tx, mut delta_rx) = mpsc::unbounded_channel::<Delta>();
        let exec = router.execute(prepared, None, Some(delta_tx), "http");
        tokio::pin!(exec);
        let piece = |text: String| match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
            }
        };
        let result = loop {
            tokio::select! {
                r = &mut exec => break r,
                Some(d) = delta_rx.recv() => {
                    if !d.text.is_empty() && events_tx.send(chunk(piece(d.text))).is_err() {
                        return;
                    }
                }
                _ = events_tx.closed() => return,
            }
        };
        while let Ok(d) = delta_rx.try_recv() {
            if !d.text.is_empty() {
                let _ = events_tx.send(chunk(piece(d.text)));
            }
        }
        match result {
            Ok(c) => {
                let last = match kind {
                    Kind::Chat => {
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_str(c.finish)})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_str(c.finish)})
                    }
                };
                let mut last = chunk(last);
                last["specd"] = speculation(&c);
                let _ = events_tx.send(last);
                if include_usage {
                    let mut u = chunk(json!(null));
                    u["choices"] = json!([]);
                    u["usage"] = usage(&c);
                    let _ = events_tx.send(u);
                }
            }
            Err(s) => {
                let _ = events_tx.send(error_body(&s));
            }
        }
    });
    let events = UnboundedReceiverStream::new(events_rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn models(State(router): State<Arc<Router>>) -> Json<Value> {
    let info = crate::api::model_info(&router);
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.id,
            "object": "model",
            "created": 0,
            "owned_by": "specd",
            "context_length": info.context_length,
            "drafters": info.drafters,
        }],
    }))
}

/// 200 while the router takes requests and has a target to place them on, 503 otherwise.
async fn health(State(router): State<Arc<Router>>) -> Response {
    let targets = router
        .pool
        .workers(specd_coord::Role::Target)
        .iter()
        .filter(|w| w.record.tokenizer_fingerprint == router.model.fingerprint())
        .count();
    let ok = !router.drain.is_draining() && targets > 0;
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "draining": router.drain.is_draining(),
        "targets": targets,
        "drafters": router.pool.workers(specd_coord::Role::Drafter).len(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_and_unavailability_say_when_to_retry() {
        let r = ApiError(Status::resource_exhausted("full")).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
        let r = ApiError(Status::unavailable("draining")).into_response();
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
        let r = ApiError(Status::invalid_argument("temperature: bad")).into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }
}

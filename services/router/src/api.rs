//! The public gRPC service `specd.v1.Generation`: wire conversion around [`crate::core::Router`].
//!
//! Deadlines come from the client's `grpc-timeout`; a cancelled call (or a dropped stream) drops the
//! request's worker streams at once, which frees the worker-side sequences.

use std::sync::Arc;
use std::time::Duration;

use specd_proto::v1 as pb;
use specd_proto::v1::generation_server::Generation;
use specd_tokenizer::ChatMessage;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::core::{ApiRequest, Completed, Input, Router};
use crate::spec::Finish;

/// The gRPC front end.
#[derive(Clone)]
pub struct GenerationService {
    router: Arc<Router>,
}

impl GenerationService {
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

/// The deadline a `grpc-timeout` header asks for (`<digits><unit>`, unit one of H M S m u n).
pub fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    tokio::time::Instant::now().checked_add(d)
}

fn api_request(r: pb::GenerateRequest) -> ApiRequest {
    let input = r.input.map(|i| match i {
        pb::generate_request::Input::Prompt(text) => Input::Prompt {
            text,
            raw: r.raw_prompt,
        },
        pb::generate_request::Input::Chat(c) => Input::Chat(
            c.messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect(),
        ),
    });
    ApiRequest {
        model: r.model,
        input,
        max_new_tokens: r.max_new_tokens,
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        seed: r.seed,
        stop: r.stop,
        drafter: r.drafter,
        draft_len: r.draft_len,
        request_id: r.request_id,
        session_id: r.session_id,
    }
}

fn finish_reason(f: Finish) -> pb::FinishReason {
    match f {
        Finish::Stop => pb::FinishReason::Stop,
        Finish::Length => pb::FinishReason::Length,
        Finish::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn summary(c: &Completed) -> (pb::Usage, pb::SpeculationStats, pb::Timings) {
    (
        pb::Usage {
            prompt_tokens: c.prompt_tokens as u32,
            completion_tokens: c.token_ids.len() as u32,
        },
        pb::SpeculationStats {
            drafted: c.stats.drafted as u32,
            accepted: c.stats.accepted as u32,
            steps: c.stats.steps as u32,
            accepted_per_position: c.stats.accepted_per_position.clone(),
            drafter: c.stats.drafter.clone(),
        },
        pb::Timings {
            queue_ms: c.timings.queue_ms,
            ttft_ms: c.timings.ttft_ms,
            total_ms: c.timings.total_ms,
        },
    )
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let span = tracing::info_span!("generate", request_id = tracing::field::Empty);
        specd_service::telemetry::extract(request.metadata(), &span);
        let router = Arc::clone(&self.router);
        async move {
            let prepared = router.prepare(api_request(request.into_inner()), "grpc")?;
            tracing::Span::current().record("request_id", prepared.gen.request_id.as_str());
            let c = router.execute(prepared, deadline, None, "grpc").await?;
            let (usage, speculation, timings) = summary(&c);
            Ok(Response::new(pb::GenerateResponse {
                text: c.text,
                token_ids: c.token_ids,
                finish_reason: finish_reason(c.finish) as i32,
                usage: Some(usage),
                speculation: Some(speculation),
                timings: Some(timings),
                request_id: c.request_id,
                model: router.model.id.clone(),
            }))
        }
        .instrument(span)
        .await
    }

    type GenerateStreamStream = UnboundedReceiverStream<Result<pb::GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = deadline_of(request.metadata());
        let span = tracing::info_span!("generate_stream", request_id = tracing::field::Empty);
        specd_service::telemetry::extract(request.metadata(), &span);
        let prepared = self
            .router
            .prepare(api_request(request.into_inner()), "grpc")?;
        span.record("request_id", prepared.gen.request_id.as_str());
        let request_id = prepared.gen.request_id.clone();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let router = Arc::clone(&self.router);
        tokio::spawn(
            async move {
                let (delta_tx, mut delta_rx) = mpsc::unbounded_channel();
                let run = router.execute(prepared, deadline, Some(delta_tx), "grpc");
                tokio::pin!(run);
                // Err: the client went away.
                let forward = |d: crate::core::Delta| {
                    out_tx
                        .send(Ok(pb::GenerateStreamResponse {
                            text_delta: d.text,
                            token_ids: d.token_ids,
                            request_id: request_id.clone(),
                            ..Default::default()
                        }))
                        .map_err(|_| ())
                };
                let result = loop {
                    tokio::select! {
                        r = &mut run => break r,
                        Some(d) = delta_rx.recv() => {
                            if forward(d).is_err() {
                                // The client went away: dropping `run` frees the workers.
                                return;
                            }
                        }
                        _ = out_tx.closed() => return,
                    }
                };
                while let Ok(d) = delta_rx.try_recv() {
                    if forward(d).is_err() {
                        return;
                    }
                }
                let last = result.map(|c| {
                    let (usage, speculation, timings) = summary(&c);
                    pb::GenerateStreamResponse {
                        finish_reason: Some(finish_reason(c.finish) as i32),
                        usage: Some(usage),
                        speculation: Some(speculation),
                        timings: Some(timings),
                        request_id: c.request_id,
                        ..Default::default()
                    }
                });
                let _ = out_tx.send(last);
            }
            .instrument(span),
        );
        Ok(Response::new(UnboundedReceiverStream::new(out_rx)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let r = request.into_inner();
        let model = &self.router.model;
        if !(r.model.is_empty() || r.model == model.id || model.aliases.contains(&r.model)) {
            return Err(Status::not_found(format!(
                "model: {:?} is not served here (serving {:?})",
                r.model, model.id
            )));
        }
        let limit = self.router.cfg.max_prompt_bytes;
        if r.text.len() > limit {
            return Err(Status::invalid_argument(format!(
                "text: {} bytes exceed the limit of {limit}",
                r.text.len()
            )));
        }
        // Tokenizing is work like generating: refused while draining, bounded by admission.
        let _in_flight = self
            .router
            .drain
            .enter()
            .ok_or_else(|| Status::unavailable("router is draining"))?;
        let _slot = self.router.admission.admit(deadline).await?;
        let tok = std::sync::Arc::clone(&model.tokenizer);
        let ids = tokio::task::spawn_blocking(move || tok.encode(&r.text, r.add_special_tokens))
            .await
            .map_err(|e| Status::internal(format!("tokenizing: {e}")))?
            .map_err(|e| Status::invalid_argument(format!("text: {e}")))?;
        let tokens = ids
            .iter()
            .map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default())
            .collect();
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: ids,
            tokens,
        }))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![model_info(&self.router)],
        }))
    }
}

/// The served model as `ListModels` describes it.
pub fn model_info(router: &Router) -> pb::ModelInfo {
    let m = &router.model;
    let mut drafters = vec!["auto".to_string(), "none".to_string()];
    for k in router.drafter_kinds() {
        if !drafters.contains(&k) {
            drafters.push(k);
        }
    }
    pb::ModelInfo {
        id: m.id.clone(),
        family: m.family.clone(),
        context_length: m.context as u32,
        tokenizer_fingerprint: m.fingerprint().to_string(),
        drafters,
    }
}

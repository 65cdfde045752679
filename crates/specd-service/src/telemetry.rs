//! Logs and traces.
//!
//! [`init`] installs, once per process: an env-filtered `tracing` subscriber writing text or JSON lines
//! to stderr (`SPECD_LOG` or `RUST_LOG` filters, default `info`), an OpenTelemetry layer that turns spans into
//! OpenTelemetry spans, and the W3C trace-context propagator. Spans are exported over OTLP/gRPC when an
//! endpoint is given (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`); without one they still get
//! trace ids, so the trace context still travels and log lines of one request share a trace id.
//!
//! [`inject`] writes the current span's context into outgoing gRPC metadata (`traceparent`), and
//! [`extract`] makes an incoming request's span a child of the caller's: a request keeps one trace id
//! from the router to every worker it touches.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => anyhow::bail!("unknown log format {other:?} (text, json)"),
        }
    }
}

/// How to set up logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC collector, such as `http://127.0.0.1:4317`. `None`: spans are not exported.
    pub otlp_endpoint: Option<String>,
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs logging and tracing for the process. A second call (a service started inside `specd up`
/// after another) does nothing.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<()> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(cfg.service.clone())
            .build(),
    );
    if let Some(endpoint) = &cfg.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("specd");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.set(provider);

    let filter = EnvFilter::try_from_env("SPECD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    // Another subscriber already installed (tests): keep it.
    let _ = result;
    Ok(())
}

/// Flushes exported spans (call before the process exits).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the current span's trace context into `metadata` (outgoing call).
pub fn inject(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// Makes `span` a child of the trace context found in `metadata` (incoming call), if any.
pub fn extract(metadata: &MetadataMap, span: &tracing::Span) {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(cx);
}

/// The trace id of `span` in hex, for responses and log correlation (all zeros when tracing is off).
pub fn trace_id(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    span.context().span().span_context().trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_travels_through_grpc_metadata() {
        init(&TelemetryConfig {
            service: "test".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
        })
        .expect("init");
        let caller = tracing::info_span!("router.step");
        let mut metadata = MetadataMap::new();
        caller.in_scope(|| inject(&mut metadata));
        let header = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .expect("traceparent header")
            .to_string();
        let caller_trace = trace_id(&caller);
        assert_ne!(caller_trace, "00000000000000000000000000000000");
        assert!(
            header.contains(&caller_trace),
            "{header} carries {caller_trace}"
        );

        let callee = tracing::info_span!("target.verify");
        extract(&metadata, &callee);
        assert_eq!(
            trace_id(&callee),
            caller_trace,
            "the worker's span joins the router's trace"
        );

        let unrelated = tracing::info_span!("other");
        extract(&MetadataMap::new(), &unrelated);
        assert_ne!(trace_id(&unrelated), caller_trace);
    }
}

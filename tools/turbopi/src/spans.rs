//! The tracing switches of `infer` and `bench`: the same destinations as the nodes (OTLP,
//! a JSON-lines file, or off), from flags or else the standard variables.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use node_common::trace::{TraceConfig, Tracer};

#[derive(Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Write one span per stage per frame to this JSON-lines file (default: env TRACE_FILE;
    /// read it with `turbopi trace report`).
    #[arg(long, value_name = "FILE")]
    pub trace_file: Option<PathBuf>,
    /// Export the spans over OTLP/gRPC to this endpoint, e.g. http://localhost:4317
    /// (default: env DORA_OTLP_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TraceArgs {
    /// The flags when any is given, else the environment as the nodes read it.
    pub fn config(&self) -> Result<TraceConfig> {
        if self.trace_file.is_none() && self.otlp_endpoint.is_none() {
            return TraceConfig::from_env().context("tracing");
        }
        Ok(TraceConfig {
            otlp: self.otlp_endpoint.clone(),
            file: self.trace_file.clone(),
        })
    }
}

/// The CLI's tracer: spans attributed to node `turbopi` and `backend`.
pub fn tracer(cfg: &TraceConfig, backend: &str) -> Result<Tracer> {
    Tracer::new("turbopi", backend, cfg).context("tracing")
}

//! Frames a node cannot serve. Each is logged with its reason, counted for the node's summary,
//! traced (a span of the stage marked `turbopi.rejected`), and, when the node declares a
//! `rejected` output, sent there: a Utf8 message holding the reason, with the frame's `seq`
//! and the node's id. The openpi server listens on it, so a client whose frame was refused
//! is answered at once with the reason instead of waiting for its request to time out.

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, MetadataParameters, Parameter};

use crate::trace::Tracer;
use crate::{str_param, FrameMeta};

/// The output (and, at the server, the input prefix) that carries rejections.
pub const REJECTED: &str = "rejected";

/// Metadata key of the node that rejected the frame.
pub const REJECTED_BY: &str = "rejected_by";

/// Whether the node's dataflow declares its `rejected` output.
pub fn declares_rejected(node: &DoraNode) -> bool {
    let output: DataId = REJECTED.to_string().into();
    node.node_config().outputs.contains(&output)
}

/// A node's record of what it refused.
pub struct Rejections {
    node: String,
    output: Option<DataId>,
    /// Frames refused (each reported on `rejected`).
    pub frames: u64,
    /// Messages refused that belong to no frame (no `seq`, a duplicate part).
    pub messages: u64,
}

impl Rejections {
    /// Rejections of node `node`, sent on `rejected` when `send` (the output is declared:
    /// [`declares_rejected`]).
    pub fn new(node: &str, send: bool) -> Self {
        Rejections {
            node: node.to_string(),
            output: send.then(|| REJECTED.to_string().into()),
            frames: 0,
            messages: 0,
        }
    }

    /// Frame `meta` is refused by `stage` for `err`.
    pub fn frame(
        &mut self,
        node: &mut DoraNode,
        tracer: &Tracer,
        stage: &'static str,
        meta: FrameMeta,
        err: &eyre::Report,
    ) {
        self.frames += 1;
        let reason = format!("{err:#}");
        eprintln!("{}: rejected frame {}: {reason}", self.node, meta.seq);
        tracer.record_rejected(stage, meta.seq, meta.trace, &reason);
        if let Some(out) = &self.output {
            let mut md = meta.params();
            md.insert(REJECTED_BY.into(), Parameter::String(self.node.clone()));
            if let Err(e) = node.send_output(out.clone(), md, reason) {
                eprintln!(
                    "{}: sending the rejection of frame {}: {e}",
                    self.node, meta.seq
                );
            }
        }
    }

    /// A message that belongs to no frame is refused.
    pub fn message(&mut self, err: &eyre::Report) {
        self.messages += 1;
        crate::report_rejected(&self.node, err);
    }

    /// For the node's summary line.
    pub fn summary(&self) -> String {
        format!(
            "{} frames rejected, {} messages refused",
            self.frames, self.messages
        )
    }
}

/// A `rejected` message: the frame, the node that refused it and why.
pub fn parse_rejection(
    input: &str,
    md: &MetadataParameters,
    data: &dora_node_api::DoraArray,
) -> eyre::Result<(u64, String, String)> {
    let meta = FrameMeta::from_metadata(input, md)?;
    let by = str_param(md, REJECTED_BY).unwrap_or("a node").to_string();
    let reason: &str = data
        .try_into()
        .map_err(|_| eyre::eyre!("input `{input}`: expected a Utf8 reason"))?;
    Ok((meta.seq, by, reason.to_string()))
}

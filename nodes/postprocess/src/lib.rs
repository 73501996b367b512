//! Action post-process: un-normalise with openpi's norm_stats.json (z-score for pi0,
//! quantiles for pi0.5) and slice to the robot's action dims; passes through without stats.

use std::path::PathBuf;

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, eyre, Result, WrapErr};
use node_common::{env_opt, expect_tensor, report_rejected, Dim, FrameMeta, SeqGaps};
use operators::postprocess::{load_action_stats, NormMode, PostProcess};

pub struct Settings {
    pub action_dim: usize,
    pub post: PostProcess,
}

impl Settings {
    /// Env: `ACTION_DIM` (model action dims, 32), `ACTION_DIMS` (robot dims, default all),
    /// `NORM_STATS` (path to norm_stats.json; unset = pass through), `NORM` (`zscore` for pi0,
    /// `quantile` for pi0.5; required with NORM_STATS).
    pub fn from_env() -> Result<Self> {
        let action_dim: usize = node_common::env_or("ACTION_DIM", 32)?;
        let robot_dims: usize = env_opt("ACTION_DIMS")?.unwrap_or(action_dim);
        let stats = match env_opt::<PathBuf>("NORM_STATS")? {
            Some(p) => Some(load_action_stats(&p).wrap_err("env NORM_STATS")?),
            None => None,
        };
        let mode = match env_opt::<String>("NORM")?.as_deref() {
            Some("zscore") => NormMode::ZScore,
            Some("quantile") => NormMode::Quantile,
            Some(other) => {
                bail!("env NORM={other:?}: expected `zscore` (pi0) or `quantile` (pi0.5)")
            }
            None if stats.is_some() => {
                bail!("env NORM is required with NORM_STATS: `zscore` (pi0) or `quantile` (pi0.5)")
            }
            None => NormMode::Quantile,
        };
        let post = PostProcess::new(stats, mode, action_dim, robot_dims)
            .wrap_err("env ACTION_DIMS / NORM_STATS")?;
        Ok(Settings { action_dim, post })
    }
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    run_with(&Settings::from_env()?, node, events)
}

pub fn run_with(settings: &Settings, mut node: DoraNode, mut events: EventStream) -> Result<()> {
    let out: DataId = "actions".to_string().into();
    let tracer = node_common::tracer(&node, "cpu")?;
    let mut gaps = SeqGaps::default();
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
            continue;
        };
        if id.as_str() != "actions" {
            continue;
        }
        let md = &metadata.parameters;
        let result = (|| {
            let meta = FrameMeta::from_metadata("actions", md)?;
            gaps.observe(meta.seq);
            let span = tracer.start("postprocess", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let (shape, a) = expect_tensor::<f32>(
                "actions",
                md,
                &data,
                "float32",
                &[Dim::Any, Dim::Is(settings.action_dim)],
            )?;
            let y = settings.post.run(a)?;
            node.send_output(
                out.clone(),
                meta.tensor_params(&[shape[0], settings.post.robot_dims()], "float32"),
                y,
            )
            .map_err(|e| eyre!("sending actions: {e}"))?;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            report_rejected("postprocess", &e);
        }
    }
    eprintln!("postprocess: {} frames, {} gaps", gaps.frames, gaps.gaps);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_common::testing::{event, json, run_node, values, TensorInput};
    use operators::postprocess::NormStats;

    #[test]
    fn unnormalises_slices_and_rejects_a_wrong_shape() {
        let stats = NormStats {
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            q01: Some(vec![-2.0, 0.0, 0.0]),
            q99: Some(vec![2.0, 1.0, 1.0]),
        };
        let settings = Settings {
            action_dim: 3,
            post: PostProcess::new(Some(stats), NormMode::Quantile, 3, 2).unwrap(),
        };
        let msg = |seq, shape: &'static [usize], v: &[f32]| TensorInput {
            id: "actions",
            seq,
            shape,
            dtype: "float32",
            arrow_type: "Float32",
            values: json(v),
            extra: vec![],
        };
        let events = vec![
            event(0.0, msg(0, &[2, 3], &[0.0, 1.0, 0.5, -1.0, -1.0, 0.5])),
            event(0.01, msg(1, &[2, 4], &[0.0; 8])),
        ];
        let out = run_node("postprocess", events, |node, ev| {
            run_with(&settings, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1);
        let got = values(&out[0]);
        assert_eq!(got.len(), 4, "2 rows x 2 robot dims");
        assert!(
            (got[0] - 1e-6).abs() < 1e-5 && (got[2] + 2.0).abs() < 1e-5,
            "{got:?}"
        );
    }
}

//! Action post-processing: un-normalise the model's actions with openpi's `norm_stats.json`
//! (z-score for pi0, quantiles for pi0.5) and slice them to the robot's action dims.

use std::path::Path;

pub use crate::norm_stats::{NormMode, NormStats};
use crate::{Error, Result};

/// Reads the `actions` entry of an openpi `norm_stats.json`.
pub fn load_action_stats(path: &Path) -> Result<NormStats> {
    let stats = crate::norm_stats::read(path, |entries| match entries.get("actions") {
        Some(s) => s.check("actions", NormMode::ZScore),
        None => Err("no `norm_stats.actions` entry".into()),
    })?;
    stats.get("actions").cloned().ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        reason: "no `norm_stats.actions` entry".into(),
    })
}

/// The post-process stage: optional un-normalisation, then the first `robot_dims` dims.
#[derive(Debug, Clone)]
pub struct PostProcess {
    stats: Option<NormStats>,
    mode: NormMode,
    action_dim: usize,
    robot_dims: usize,
}

impl PostProcess {
    /// `stats = None` passes actions through (only the slice applies). `robot_dims` must be
    /// in 1..=action_dim.
    pub fn new(
        stats: Option<NormStats>,
        mode: NormMode,
        action_dim: usize,
        robot_dims: usize,
    ) -> Result<Self> {
        if robot_dims == 0 || robot_dims > action_dim {
            return Err(Error::Input(format!(
                "robot action dims must be in 1..={action_dim}, got {robot_dims}"
            )));
        }
        if let Some(s) = &stats {
            s.check("actions", mode)
                .map_err(|e| Error::Input(format!("norm stats: {e}")))?;
            let n = s.dims(NormMode::ZScore).max(s.dims(mode));
            if n > action_dim {
                return Err(Error::Input(format!(
                    "norm stats have {n} action dims, the model has {action_dim}"
                )));
            }
        }
        Ok(PostProcess {
            stats,
            mode,
            action_dim,
            robot_dims,
        })
    }

    pub fn robot_dims(&self) -> usize {
        self.robot_dims
    }

    /// actions [rows, action_dim] -> [rows, robot_dims].
    pub fn run(&self, actions: &[f32]) -> Result<Vec<f32>> {
        let ad = self.action_dim;
        if !actions.len().is_multiple_of(ad) {
            return Err(Error::Input(format!(
                "postprocess: {} values are not rows of {ad} action dims",
                actions.len()
            )));
        }
        let mut out = Vec::with_capacity(actions.len() / ad * self.robot_dims);
        for row in actions.chunks_exact(ad) {
            for (d, &x) in row.iter().enumerate().take(self.robot_dims) {
                out.push(self.unnormalize(d, x));
            }
        }
        Ok(out)
    }

    fn unnormalize(&self, d: usize, x: f32) -> f32 {
        match &self.stats {
            Some(s) => s.unnormalize(self.mode, d, x as f64) as f32,
            None => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> NormStats {
        NormStats {
            mean: vec![1.0, -2.0],
            std: vec![2.0, 0.5],
            q01: Some(vec![-1.0, 0.0]),
            q99: Some(vec![3.0, 10.0]),
        }
    }

    #[test]
    fn zscore_and_quantile_follow_openpi() {
        let p = PostProcess::new(Some(stats()), NormMode::ZScore, 3, 3).unwrap();
        let y = p.run(&[0.5, 2.0, 7.0]).unwrap();
        assert!((y[0] - (0.5 * (2.0 + 1e-6) + 1.0) as f32).abs() < 1e-6);
        assert!((y[1] - (2.0 * (0.5 + 1e-6) - 2.0) as f32).abs() < 1e-6);
        assert!(
            (y[2] - 7.0 * (1.0 + 1e-6) as f32).abs() < 1e-5,
            "padded std 1, mean 0"
        );
        let q = PostProcess::new(Some(stats()), NormMode::Quantile, 3, 2).unwrap();
        let y = q.run(&[-1.0, 1.0, 5.0, 0.0, 0.0, 5.0]).unwrap();
        assert_eq!(y.len(), 4, "sliced to 2 robot dims");
        assert!((y[0] - -1.0).abs() < 1e-6);
        assert!((y[1] - 10.0).abs() < 1e-4);
        assert!((y[2] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn passthrough_and_bad_arguments() {
        let p = PostProcess::new(None, NormMode::Quantile, 2, 2).unwrap();
        assert_eq!(p.run(&[0.25, -3.0]).unwrap(), vec![0.25, -3.0]);
        assert!(PostProcess::new(None, NormMode::ZScore, 2, 3).is_err());
        let mut s = stats();
        s.q99 = None;
        let err = PostProcess::new(Some(s), NormMode::Quantile, 4, 2).unwrap_err();
        assert!(err.to_string().contains("q01"), "{err}");
        assert!(p.run(&[1.0, 2.0, 3.0]).is_err());
    }

    #[test]
    fn reads_openpi_norm_stats_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("norm_stats.json");
        std::fs::write(
            &path,
            r#"{"norm_stats": {"state": {"mean": [0], "std": [1]},
                "actions": {"mean": [1, 2], "std": [3, 4], "q01": [0, 0], "q99": [1, 1]}}}"#,
        )
        .unwrap();
        let s = load_action_stats(&path).unwrap();
        assert_eq!(s.std, vec![3.0, 4.0]);
        std::fs::write(
            &path,
            r#"{"norm_stats": {"state": {"mean": [0], "std": [1]}}}"#,
        )
        .unwrap();
        let err = load_action_stats(&path).unwrap_err().to_string();
        assert!(
            err.contains("norm_stats.json") && err.contains("actions"),
            "{err}"
        );
    }
}

//! openpi's `Normalize` / `Unnormalize` transforms over a `norm_stats.json`: the `state` and
//! `actions` entries applied to whole vectors, with openpi's rules for vectors longer than
//! the statistics. The arithmetic is [`crate::norm_stats`]'s, shared with the post-process
//! stage.

use std::collections::BTreeMap;
use std::path::Path;

use crate::norm_stats::{self, NormMode, NormStats};
use crate::{Error, Result};

/// The `state` and `actions` statistics of a `norm_stats.json` (either may be absent, then
/// that key passes through, as in openpi).
#[derive(Debug, Clone)]
pub struct Stats {
    pub state: Option<NormStats>,
    pub actions: Option<NormStats>,
    pub mode: NormMode,
}

impl Stats {
    /// Reads `path`; with `quantile` (pi0.5) every entry must carry `q01` and `q99`.
    pub fn load(path: &Path, quantile: bool) -> Result<Self> {
        let mode = mode(quantile);
        let entries = norm_stats::read(path, |e| check_all(e, mode))?;
        Ok(Self::from_entries(&entries, mode))
    }

    pub fn from_json(text: &str, quantile: bool) -> std::result::Result<Self, String> {
        let mode = mode(quantile);
        let entries = norm_stats::parse(text)?;
        check_all(&entries, mode)?;
        Ok(Self::from_entries(&entries, mode))
    }

    fn from_entries(entries: &BTreeMap<String, NormStats>, mode: NormMode) -> Self {
        Stats {
            state: entries.get("state").cloned(),
            actions: entries.get("actions").cloned(),
            mode,
        }
    }

    /// Normalises `x` in place with `s` sliced to its length (openpi's `Normalize`); the
    /// statistics must cover every dimension of `x`.
    pub fn normalize(&self, key: &str, s: &NormStats, x: &mut [f64]) -> Result<()> {
        let n = s.dims(self.mode);
        if n < x.len() {
            return Err(Error::Input(format!(
                "`{key}` has {} dims but its norm stats cover {n}",
                x.len()
            )));
        }
        for (d, v) in x.iter_mut().enumerate() {
            *v = s.normalize(self.mode, d, *v);
        }
        Ok(())
    }

    /// Un-normalises rows of `dim` values in place (openpi's `Unnormalize`, see
    /// [`NormStats::unnormalize`]). The statistics may not be longer than a row.
    pub fn unnormalize(&self, key: &str, s: &NormStats, x: &mut [f64], dim: usize) -> Result<()> {
        let n = s.dims(self.mode);
        if n > dim {
            return Err(Error::Input(format!(
                "norm stats of `{key}` have {n} dims, more than the model's {dim}"
            )));
        }
        for row in x.chunks_exact_mut(dim) {
            for (d, v) in row.iter_mut().enumerate() {
                *v = s.unnormalize(self.mode, d, *v);
            }
        }
        Ok(())
    }

    /// Checks at start-up that the statistics fit a model of `action_dim` dims.
    pub fn check(&self, action_dim: usize) -> std::result::Result<(), String> {
        for (key, s) in [("state", &self.state), ("actions", &self.actions)] {
            if let Some(s) = s {
                let n = s.dims(self.mode);
                if n > action_dim {
                    return Err(format!(
                        "`{key}` has {n} dims, more than the model's action_dim {action_dim}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn mode(quantile: bool) -> NormMode {
    if quantile {
        NormMode::Quantile
    } else {
        NormMode::ZScore
    }
}

/// Every entry checked for `mode` (openpi reads them all).
fn check_all(
    entries: &BTreeMap<String, NormStats>,
    mode: NormMode,
) -> std::result::Result<(), String> {
    entries.iter().try_for_each(|(key, s)| s.check(key, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"norm_stats": {
        "state": {"mean": [1, 2, 3], "std": [2, 4, 0.5], "q01": [0, -1, 2], "q99": [2, 1, 4]},
        "actions": {"mean": [0.5, -1], "std": [2, 3], "q01": [-2, 0], "q99": [2, 10]}}}"#;

    #[test]
    fn zscore_and_quantile_match_openpi_formulas() {
        let z = Stats::from_json(JSON, false).unwrap();
        let s = z.state.clone().unwrap();
        let mut x = vec![3.0, 2.0];
        z.normalize("state", &s, &mut x).unwrap();
        assert_eq!(x, vec![(3.0 - 1.0) / (2.0 + 1e-6), 0.0]);
        let q = Stats::from_json(JSON, true).unwrap();
        let mut x = vec![1.0, 1.0, 5.0];
        q.normalize("state", &s, &mut x).unwrap();
        assert_eq!(x[0], (1.0 - 0.0) / (2.0 + 1e-6) * 2.0 - 1.0);
        assert_eq!(x[2], (5.0 - 2.0) / (2.0 + 1e-6) * 2.0 - 1.0);
        let mut long = vec![0.0; 4];
        let e = q.normalize("state", &s, &mut long).unwrap_err().to_string();
        assert!(e.contains("4 dims") && e.contains("cover 3"), "{e}");

        let a = z.actions.clone().unwrap();
        // Two rows of 3: z-score pads mean 0, std 1.
        let mut x = vec![1.0, 1.0, 1.0, -1.0, 0.0, 2.0];
        z.unnormalize("actions", &a, &mut x, 3).unwrap();
        assert_eq!(x[0], 1.0 * (2.0 + 1e-6) + 0.5);
        assert_eq!(x[2], 1.0 * (1.0 + 1e-6));
        let mut x = vec![1.0, -1.0, 7.0];
        q.unnormalize("actions", &a, &mut x, 3).unwrap();
        assert_eq!(x[0], (1.0 + 1.0) / 2.0 * (4.0 + 1e-6) - 2.0);
        assert_eq!(x[1], 0.0);
        assert_eq!(x[2], 7.0, "beyond the quantiles: unchanged");
        assert!(z.check(2).is_err() && z.check(3).is_ok());
    }

    #[test]
    fn quantile_mode_needs_quantiles() {
        let e = Stats::from_json(
            r#"{"norm_stats": {"state": {"mean": [0], "std": [1]}}}"#,
            true,
        )
        .unwrap_err();
        assert!(e.contains("q01"), "{e}");
        assert!(Stats::from_json(r#"{"stats": {}}"#, false).is_err());
    }
}

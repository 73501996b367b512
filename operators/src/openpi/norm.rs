//! openpi's `Normalize` / `Unnormalize` over `norm_stats.json`, in f64 as numpy computes
//! them: z-score `(x - mean) / (std + 1e-6)` for pi0, quantiles
//! `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` for pi0.5, and their inverses with openpi's
//! padding rules for vectors longer than the statistics.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::postprocess::NormStats;
use crate::{Error, Result};

#[derive(Deserialize)]
struct File {
    norm_stats: BTreeMap<String, NormStats>,
}

/// The `state` and `actions` statistics of a `norm_stats.json` (either may be absent, then
/// that key passes through, as in openpi).
#[derive(Debug, Clone)]
pub struct Stats {
    pub state: Option<NormStats>,
    pub actions: Option<NormStats>,
    pub quantile: bool,
}

impl Stats {
    /// Reads `path`; with `quantile` (pi0.5) every entry must carry `q01` and `q99`.
    pub fn load(path: &Path, quantile: bool) -> Result<Self> {
        let text = crate::fsio::read_string_limited(
            path,
            crate::fsio::limit::NORM_STATS_JSON,
            "norm_stats.json",
        )?;
        Self::from_json(&text, quantile).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn from_json(text: &str, quantile: bool) -> std::result::Result<Self, String> {
        let file: File = serde_json::from_str(text).map_err(|e| {
            format!("not an openpi norm_stats.json ({{\"norm_stats\": {{\"state\": ..., \"actions\": ...}}}}): {e}")
        })?;
        for (key, s) in &file.norm_stats {
            if s.mean.len() != s.std.len() {
                return Err(format!(
                    "`{key}`: mean has {} entries but std has {}",
                    s.mean.len(),
                    s.std.len()
                ));
            }
            if quantile {
                match (&s.q01, &s.q99) {
                    (Some(a), Some(b)) if a.len() == b.len() => {}
                    _ => {
                        return Err(format!(
                            "`{key}`: quantile normalisation (pi0.5) needs `q01` and `q99` of equal length"
                        ))
                    }
                }
            }
        }
        Ok(Stats {
            state: file.norm_stats.get("state").cloned(),
            actions: file.norm_stats.get("actions").cloned(),
            quantile,
        })
    }

    /// Entries of the statistics of `s` used for a vector (mean or q01 length).
    fn dims(&self, s: &NormStats) -> usize {
        if self.quantile {
            s.q01.as_ref().map_or(0, Vec::len)
        } else {
            s.mean.len()
        }
    }

    /// Normalises `x` in place with `s` sliced to its length (openpi's `Normalize`); the
    /// statistics must cover every dimension of `x`.
    pub fn normalize(&self, key: &str, s: &NormStats, x: &mut [f64]) -> Result<()> {
        let n = self.dims(s);
        if n < x.len() {
            return Err(Error::Input(format!(
                "`{key}` has {} dims but its norm stats cover {n}",
                x.len()
            )));
        }
        for (d, v) in x.iter_mut().enumerate() {
            *v = if self.quantile {
                let (lo, hi) = quantiles(s, d);
                (*v - lo) / (hi - lo + 1e-6) * 2.0 - 1.0
            } else {
                (*v - s.mean[d]) / (s.std[d] + 1e-6)
            };
        }
        Ok(())
    }

    /// Un-normalises rows of `dim` values in place (openpi's `Unnormalize`): z-score pads mean
    /// with 0 and std with 1, quantiles leave dims beyond the statistics unchanged. The
    /// statistics may not be longer than a row.
    pub fn unnormalize(&self, key: &str, s: &NormStats, x: &mut [f64], dim: usize) -> Result<()> {
        let n = self.dims(s);
        if n > dim {
            return Err(Error::Input(format!(
                "norm stats of `{key}` have {n} dims, more than the model's {dim}"
            )));
        }
        for row in x.chunks_exact_mut(dim) {
            for (d, v) in row.iter_mut().enumerate() {
                if self.quantile {
                    if d < n {
                        let (lo, hi) = quantiles(s, d);
                        *v = (*v + 1.0) / 2.0 * (hi - lo + 1e-6) + lo;
                    }
                } else {
                    let std = s.std.get(d).copied().unwrap_or(1.0);
                    let mean = s.mean.get(d).copied().unwrap_or(0.0);
                    *v = *v * (std + 1e-6) + mean;
                }
            }
        }
        Ok(())
    }

    /// Checks at start-up that the statistics fit a model of `action_dim` dims.
    pub fn check(&self, action_dim: usize) -> std::result::Result<(), String> {
        for (key, s) in [("state", &self.state), ("actions", &self.actions)] {
            if let Some(s) = s {
                let n = self.dims(s);
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

/// (q01, q99) of dim `d`; `Stats::from_json` checked both exist with equal lengths.
fn quantiles(s: &NormStats, d: usize) -> (f64, f64) {
    let q = |v: &Option<Vec<f64>>| v.as_ref().and_then(|v| v.get(d)).copied().unwrap_or(0.0);
    (q(&s.q01), q(&s.q99))
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

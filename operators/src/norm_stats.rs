//! openpi's normalisation statistics (`norm_stats.json`) and the one implementation of its
//! `Normalize` / `Unnormalize`, in f64 as numpy computes them: z-score
//! `(x - mean) / (std + 1e-6)` for pi0, quantiles `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`
//! for pi0.5. The post-process stage and the openpi server's transforms both use it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// One entry of openpi's norm stats (`mean`, `std`, optional `q01`, `q99`).
#[derive(Debug, Clone, Deserialize)]
pub struct NormStats {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    #[serde(default)]
    pub q01: Option<Vec<f64>>,
    #[serde(default)]
    pub q99: Option<Vec<f64>>,
}

/// How values are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMode {
    /// (x - mean) / (std + 1e-6); back: x * (std + 1e-6) + mean (pi0).
    ZScore,
    /// (x - q01) / (q99 - q01 + 1e-6) * 2 - 1; back: (x + 1) / 2 * (q99 - q01 + 1e-6) + q01
    /// (pi0.5).
    Quantile,
}

impl NormMode {
    /// openpi's choice for a model: quantiles for pi0.5, z-score for pi0.
    pub fn for_model(pi05: bool) -> Self {
        if pi05 {
            NormMode::Quantile
        } else {
            NormMode::ZScore
        }
    }
}

impl NormStats {
    /// Checks the entry `key` for `mode`: `mean` and `std` of one length, and for quantiles
    /// `q01` and `q99` present with one length.
    pub fn check(&self, key: &str, mode: NormMode) -> std::result::Result<(), String> {
        if self.mean.len() != self.std.len() {
            return Err(format!(
                "`{key}`: mean has {} entries but std has {}",
                self.mean.len(),
                self.std.len()
            ));
        }
        let quantiles = matches!((&self.q01, &self.q99), (Some(a), Some(b)) if a.len() == b.len());
        if mode == NormMode::Quantile && !quantiles {
            return Err(format!(
                "`{key}`: quantile normalisation (pi0.5) needs `q01` and `q99` of equal length"
            ));
        }
        Ok(())
    }

    /// The dimensions the statistics cover in `mode`: `mean`'s length (z-score) or `q01`'s.
    pub fn dims(&self, mode: NormMode) -> usize {
        match mode {
            NormMode::ZScore => self.mean.len(),
            NormMode::Quantile => self.q01.as_ref().map_or(0, Vec::len),
        }
    }

    /// (q01, q99) of dimension `d`, when both cover it.
    fn quantiles(&self, d: usize) -> Option<(f64, f64)> {
        let q = |v: &Option<Vec<f64>>| v.as_ref().and_then(|v| v.get(d)).copied();
        Some((q(&self.q01)?, q(&self.q99)?))
    }

    /// `x` of dimension `d` normalised (openpi's `Normalize`); `d` must be below
    /// [`NormStats::dims`].
    pub fn normalize(&self, mode: NormMode, d: usize, x: f64) -> f64 {
        match mode {
            NormMode::ZScore => {
                let std = self.std.get(d).copied().unwrap_or(1.0);
                let mean = self.mean.get(d).copied().unwrap_or(0.0);
                (x - mean) / (std + 1e-6)
            }
            NormMode::Quantile => {
                let (lo, hi) = self.quantiles(d).unwrap_or((0.0, 0.0));
                (x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0
            }
        }
    }

    /// `x` of dimension `d` un-normalised (openpi's `Unnormalize`): z-score pads mean with
    /// 0 and std with 1 beyond the statistics, quantiles leave those dimensions unchanged.
    pub fn unnormalize(&self, mode: NormMode, d: usize, x: f64) -> f64 {
        match mode {
            NormMode::ZScore => {
                let std = self.std.get(d).copied().unwrap_or(1.0);
                let mean = self.mean.get(d).copied().unwrap_or(0.0);
                x * (std + 1e-6) + mean
            }
            NormMode::Quantile => match self.quantiles(d) {
                Some((lo, hi)) => (x + 1.0) / 2.0 * (hi - lo + 1e-6) + lo,
                None => x,
            },
        }
    }
}

#[derive(Deserialize)]
struct File {
    norm_stats: BTreeMap<String, NormStats>,
}

/// The entries of a `norm_stats.json` text (`{"norm_stats": {"state": ..., "actions": ...}}`).
pub fn parse(text: &str) -> std::result::Result<BTreeMap<String, NormStats>, String> {
    let file: File = serde_json::from_str(text).map_err(|e| {
        format!("not an openpi norm_stats.json ({{\"norm_stats\": {{\"state\": ..., \"actions\": ...}}}}): {e}")
    })?;
    Ok(file.norm_stats)
}

/// Reads `path` with `check` applied to its entries; errors name the file.
pub fn read(
    path: &Path,
    check: impl FnOnce(&BTreeMap<String, NormStats>) -> std::result::Result<(), String>,
) -> Result<BTreeMap<String, NormStats>> {
    let text = crate::fsio::read_string_limited(
        path,
        crate::fsio::limit::NORM_STATS_JSON,
        "norm_stats.json",
    )?;
    let config = |reason| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let stats = parse(&text).map_err(config)?;
    check(&stats).map_err(config)?;
    Ok(stats)
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

    /// Normalising then un-normalising gives the value back, in both modes, and dimensions
    /// beyond the statistics follow openpi's padding.
    #[test]
    fn unnormalize_inverts_normalize() {
        let s = stats();
        for mode in [NormMode::ZScore, NormMode::Quantile] {
            for d in 0..2 {
                for x in [-3.0, 0.0, 0.25, 7.5] {
                    let back = s.unnormalize(mode, d, s.normalize(mode, d, x));
                    assert!((back - x).abs() < 1e-12, "{mode:?} {d} {x}: {back}");
                }
            }
        }
        assert_eq!(s.unnormalize(NormMode::Quantile, 5, 0.5), 0.5);
        assert_eq!(s.unnormalize(NormMode::ZScore, 5, 2.0), 2.0 * (1.0 + 1e-6));
        assert_eq!(
            (s.dims(NormMode::ZScore), s.dims(NormMode::Quantile)),
            (2, 2)
        );
    }

    #[test]
    fn checks_name_the_entry() {
        let mut s = stats();
        assert!(s.check("actions", NormMode::Quantile).is_ok());
        s.q99 = Some(vec![1.0]);
        let e = s.check("actions", NormMode::Quantile).unwrap_err();
        assert!(e.contains("`actions`") && e.contains("q01"), "{e}");
        assert!(s.check("actions", NormMode::ZScore).is_ok());
        s.std.pop();
        let e = s.check("state", NormMode::ZScore).unwrap_err();
        assert!(
            e.contains("`state`: mean has 2 entries but std has 1"),
            "{e}"
        );
        assert!(parse(r#"{"stats": {}}"#).is_err());
    }
}

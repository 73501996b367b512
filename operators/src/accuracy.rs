//! How far one precision's actions are from another's on the same checkpoint and the same
//! observations and noise (`turbopi accuracy`): the cosine of each action chunk with its
//! reference, and the largest absolute difference relative to the reference's largest
//! |action|. Sums in f64, so the measure adds no error of its own at these sizes.

use crate::backend::Runner;
use crate::observation::Observation;
use crate::{Error, Result};

/// The bar of `--dtype fp8` against bf16 (issue 18): cosine at least this...
pub const FP8_MIN_COSINE: f64 = 0.999;
/// ...and a largest difference of at most this fraction of the largest |action|.
pub const FP8_MAX_RELATIVE: f64 = 5e-2;

/// One chunk against its reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// cos(reference, candidate) over the whole chunk; NaN where either is all zeros or
    /// holds a NaN.
    pub cosine: f64,
    /// max |candidate - reference|.
    pub max_abs: f64,
    /// max |reference|.
    pub max_reference: f64,
}

impl Agreement {
    /// `max_abs / max_reference` (infinite for an all-zero reference with a difference).
    pub fn relative(&self) -> f64 {
        if self.max_abs == 0.0 {
            0.0
        } else {
            self.max_abs / self.max_reference
        }
    }
}

/// `candidate` against `reference`, element by element; an error if their lengths differ.
pub fn agreement(reference: &[f32], candidate: &[f32]) -> Result<Agreement> {
    if reference.len() != candidate.len() {
        return Err(Error::Input(format!(
            "accuracy: the chunks differ in size ({} reference values, {} candidate values)",
            reference.len(),
            candidate.len()
        )));
    }
    let (mut dot, mut rr, mut cc, mut max_abs, mut max_reference) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&r, &c) in reference.iter().zip(candidate) {
        let (r, c) = (r as f64, c as f64);
        dot += r * c;
        rr += r * r;
        cc += c * c;
        max_abs = nan_max(max_abs, (c - r).abs());
        max_reference = nan_max(max_reference, r.abs());
    }
    let norm = (rr * cc).sqrt();
    let cosine = if norm > 0.0 { dot / norm } else { f64::NAN };
    Ok(Agreement {
        cosine,
        max_abs,
        max_reference,
    })
}

/// The larger of `a` and `b`, NaN if either is: a NaN must not vanish into `f64::max`, it
/// makes the difference NaN, which fails every bar.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The worst and the mean over many chunks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub chunks: usize,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    pub max_relative: f64,
    pub mean_relative: f64,
}

impl Summary {
    /// Whether every chunk met `min_cosine` and `max_relative` (NaN meets nothing).
    pub fn meets(&self, min_cosine: f64, max_relative: f64) -> bool {
        self.chunks > 0 && self.min_cosine >= min_cosine && self.max_relative <= max_relative
    }
}

/// The worst and mean of `all`; a NaN in any chunk makes the worst NaN.
pub fn summarise(all: &[Agreement]) -> Summary {
    let n = all.len().max(1) as f64;
    let worst = |v: &mut dyn Iterator<Item = f64>, better: fn(f64, f64) -> f64| {
        v.fold(None, |acc: Option<f64>, x| match acc {
            _ if x.is_nan() => Some(f64::NAN),
            Some(a) if a.is_nan() => Some(a),
            Some(a) => Some(better(a, x)),
            None => Some(x),
        })
        .unwrap_or(f64::NAN)
    };
    Summary {
        chunks: all.len(),
        min_cosine: worst(&mut all.iter().map(|a| a.cosine), f64::min),
        mean_cosine: all.iter().map(|a| a.cosine).sum::<f64>() / n,
        max_relative: worst(&mut all.iter().map(Agreement::relative), f64::max),
        mean_relative: all.iter().map(Agreement::relative).sum::<f64>() / n,
    }
}

/// The actions of `runner` for each observation (each carries its noise), `steps` steps.
pub fn actions_of(
    runner: &mut dyn Runner,
    observations: &[Observation],
    steps: usize,
) -> Result<Vec<Vec<f32>>> {
    observations
        .iter()
        .enumerate()
        .map(|(i, obs)| {
            let noise = obs.noise.as_deref().ok_or_else(|| {
                Error::Input(format!("accuracy: observation {i} carries no noise"))
            })?;
            Ok(runner.infer(obs, noise, steps)?.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Setting;
    use crate::checkpoint::Checkpoint;
    use crate::policy::Policy;

    #[test]
    fn agreement_measures_angle_and_largest_difference() {
        let r = [1.0f32, -2.0, 4.0];
        let same = agreement(&r, &r).unwrap();
        assert!((same.cosine - 1.0).abs() < 1e-15 && same.max_abs == 0.0);
        assert_eq!(same.relative(), 0.0);
        let flipped: Vec<f32> = r.iter().map(|v| -v).collect();
        assert!((agreement(&r, &flipped).unwrap().cosine + 1.0).abs() < 1e-15);
        let off = agreement(&r, &[1.0, -2.0, 4.2]).unwrap();
        assert!((off.max_abs - 0.2).abs() < 1e-6 && off.max_reference == 4.0);
        assert!((off.relative() - 0.05).abs() < 1e-6);
        // Scaling the candidate leaves the cosine at 1 but not the difference.
        let doubled: Vec<f32> = r.iter().map(|v| 2.0 * v).collect();
        let d = agreement(&r, &doubled).unwrap();
        assert!((d.cosine - 1.0).abs() < 1e-12 && d.relative() == 1.0);
        let nan = agreement(&r, &[1.0, f32::NAN, 4.0]).unwrap();
        assert!(nan.max_abs.is_nan() && nan.cosine.is_nan());
        let err = agreement(&r, &[1.0]).unwrap_err().to_string();
        assert!(err.contains("3 reference values, 1 candidate"), "{err}");
    }

    #[test]
    fn a_nan_chunk_fails_the_summary() {
        let good = agreement(&[1.0, 2.0], &[1.0, 2.01]).unwrap();
        let nan = agreement(&[1.0, 2.0], &[f32::NAN, 2.0]).unwrap();
        let s = summarise(&[good, good]);
        assert!(s.meets(0.999, 5e-2), "{s:?}");
        let s = summarise(&[good, nan, good]);
        assert!(s.min_cosine.is_nan() && s.max_relative.is_nan());
        assert!(!s.meets(0.999, 5e-2));
        assert!(!summarise(&[]).meets(0.0, 1.0));
    }

    /// FP8 emulation on the small golden pi0.5: the actions move (the weights did change)
    /// but stay within the bars of issue 18 against f32, over several observations.
    #[test]
    fn fp8_emulation_moves_the_actions_within_the_bar() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/pi05_small/checkpoint");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = ckpt.config.clone();
        let obs: Vec<_> = (0..4)
            .map(|i| Setting::Libero.observation(&cfg, 40 + i))
            .collect();
        let mut f32_policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let reference = actions_of(&mut f32_policy, &obs, 10).unwrap();
        let mut fp8 = Policy::load(&ckpt, |_, _| {}).unwrap();
        fp8.quantise_fp8();
        assert_eq!(crate::backend::Runner::describe(&fp8), "cpu fp8 (emulated)");
        let got = actions_of(&mut fp8, &obs, 10).unwrap();
        let all: Vec<_> = reference
            .iter()
            .zip(&got)
            .map(|(r, c)| agreement(r, c).unwrap())
            .collect();
        let s = summarise(&all);
        assert!(s.meets(FP8_MIN_COSINE, FP8_MAX_RELATIVE), "{s:?}");
        assert!(
            all.iter().all(|a| a.max_abs > 0.0),
            "fp8 changed nothing: {all:?}"
        );
    }

    /// FP8 in the expert alone: the vision tower and the prefix stay f32 (their stages say
    /// so), the description names the stage, and the actions move (the expert's weights
    /// changed), but not as they do with every stage in FP8.
    #[test]
    fn fp8_of_some_stages_leaves_the_others_f32() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/pi05_small/checkpoint");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = ckpt.config.clone();
        let obs: Vec<_> = (0..3)
            .map(|i| Setting::Libero.observation(&cfg, 60 + i))
            .collect();
        let run = |stages: Option<crate::fp8::Stages>| {
            let mut p = Policy::load(&ckpt, |_, _| {}).unwrap();
            if let Some(s) = stages {
                p.quantise_fp8_stages(s);
            }
            let described = crate::backend::Runner::describe(&p);
            (
                p.fp8_stages(),
                described,
                actions_of(&mut p, &obs, 10).unwrap(),
            )
        };
        let expert = crate::fp8::Stages {
            expert: true,
            ..crate::fp8::Stages::NONE
        };
        let (_, _, reference) = run(None);
        let (stages, described, got) = run(Some(expert));
        assert_eq!(stages, expert);
        assert_eq!(described, "cpu fp8 (emulated; expert only)");
        let (_, all_described, all) = run(Some(crate::fp8::Stages::ALL));
        assert_eq!(all_described, "cpu fp8 (emulated)");
        let worst = |c: &[Vec<f32>]| {
            reference
                .iter()
                .zip(c)
                .map(|(r, c)| agreement(r, c).unwrap().max_abs)
                .fold(0.0f64, f64::max)
        };
        let (moved_expert, moved_all) = (worst(&got), worst(&all));
        assert!(moved_expert > 0.0, "the expert's FP8 changed nothing");
        assert!(moved_expert != moved_all, "{moved_expert} {moved_all}");
    }
}

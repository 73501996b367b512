//! `turbopi accuracy`: the actions of one checkpoint in two precisions (or on two backends)
//! over the same observations and noise, compared chunk by chunk: what `--dtype fp8` (or
//! bf16) costs against f32 or bf16. Random weights are written once to a temporary
//! checkpoint, so both sides load the same weights whatever their backends.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use operators::accuracy::{self, Agreement, FP8_MAX_RELATIVE, FP8_MIN_COSINE};
use operators::backend::{self, BackendKind, Precision};
use operators::bench::Setting;
use operators::checkpoint::{Checkpoint, WriteDtype};
use operators::Config;

#[derive(Debug, Clone, Args)]
pub struct AccuracyArgs {
    /// Compare on this checkpoint instead of random weights.
    #[arg(long, conflicts_with = "preset")]
    pub checkpoint: Option<PathBuf>,
    /// Random weights (bf16, --seed) of this preset (pi0, pi05, pi0-small, pi05-small);
    /// default: the setting's full-size model.
    #[arg(long)]
    pub preset: Option<String>,
    /// The observations' shape: libero (2 + 1 masked cameras, 20 prompt tokens) or pi0
    /// (3 cameras, 48 tokens); random pixels, prompt, state and noise per observation.
    #[arg(long, default_value = "libero")]
    pub setting: String,
    /// The backend of the precision under test.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// The precision under test: f32, bf16 (cuda) or fp8 (cuda: sm_89+; cpu: emulated).
    #[arg(long, default_value = "fp8")]
    pub dtype: String,
    /// The reference precision.
    #[arg(long, default_value = "f32")]
    pub against: String,
    /// The reference's backend (default: --backend).
    #[arg(long)]
    pub against_backend: Option<String>,
    /// Observations (each with its own seed: --seed + i).
    #[arg(long, default_value_t = 20)]
    pub observations: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One side of the comparison, loaded, run over every observation and dropped before the
/// other loads (two full-size f32 models do not fit in many machines' memory together).
fn actions(
    side: &str,
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
    observations: &[operators::Observation],
    steps: usize,
) -> Result<(String, Vec<Vec<f32>>)> {
    let t = Instant::now();
    let mut runner = backend::load(kind, precision, ckpt, |_, _| {}).with_context(|| {
        format!(
            "loading the {side} ({} {})",
            backend_name(kind),
            precision.name()
        )
    })?;
    let loaded = t.elapsed();
    let what = runner.describe();
    eprintln!("{side}: {what}, loaded in {:.1} s", loaded.as_secs_f64());
    let t = Instant::now();
    let out = accuracy::actions_of(runner.as_mut(), observations, steps)
        .with_context(|| format!("running the {side} ({what})"))?;
    eprintln!(
        "{side}: {} observations in {:.1} s",
        observations.len(),
        t.elapsed().as_secs_f64()
    );
    Ok((what, out))
}

fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "cpu",
        BackendKind::Cuda => "cuda",
    }
}

pub fn run(args: &AccuracyArgs) -> Result<()> {
    anyhow::ensure!(args.observations > 0, "--observations must be at least 1");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let setting: Setting = args.setting.parse()?;
    let kind: BackendKind = args.backend.parse()?;
    let against_kind: BackendKind = args
        .against_backend
        .as_deref()
        .unwrap_or(&args.backend)
        .parse()?;
    let precision: Precision = args.dtype.parse()?;
    let against: Precision = args.against.parse()?;
    backend::check(against_kind, against).context("the reference (--against)")?;
    backend::check(kind, precision).context("the precision under test (--dtype)")?;

    // The weights: the checkpoint, or random ones written once for both sides.
    let scratch;
    let (dir, source) = match &args.checkpoint {
        Some(dir) => (dir.clone(), dir.display().to_string()),
        None => {
            let cfg: Config = crate::bench::model_config(setting, args.preset.as_deref())?;
            scratch = tempfile::tempdir().context("making a directory for the random weights")?;
            let t = Instant::now();
            operators::random::write_random_checkpoint(
                scratch.path(),
                &cfg,
                WriteDtype::Bf16,
                args.seed,
                |_, _| {},
            )?;
            eprintln!(
                "random bf16 weights (seed {}) written in {:.1} s",
                args.seed,
                t.elapsed().as_secs_f64()
            );
            let name = args.preset.as_deref().unwrap_or(match setting {
                Setting::Libero => "pi05",
                Setting::Pi0 => "pi0",
            });
            (
                scratch.path().to_path_buf(),
                format!("{name}, random bf16 weights, seed {}", args.seed),
            )
        }
    };
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let observations: Vec<_> = (0..args.observations as u64)
        .map(|i| setting.observation(&ckpt.config, args.seed + i))
        .collect();

    let (reference_is, reference) = actions(
        "reference",
        against_kind,
        against,
        &ckpt,
        &observations,
        args.steps,
    )?;
    let (candidate_is, candidate) = actions(
        "candidate",
        kind,
        precision,
        &ckpt,
        &observations,
        args.steps,
    )?;
    let all = reference
        .iter()
        .zip(&candidate)
        .map(|(r, c)| accuracy::agreement(r, c))
        .collect::<operators::Result<Vec<_>>>()?;
    let mut out = std::io::stdout().lock();
    write!(
        out,
        "{}",
        report(
            &format!(
                "{source}; setting {}, {} steps, {} observations (seeds {}..{})",
                setting.name(),
                args.steps,
                args.observations,
                args.seed,
                args.seed + args.observations as u64 - 1
            ),
            &candidate_is,
            &reference_is,
            &all,
            precision == Precision::Fp8,
        )
    )?;
    Ok(())
}

/// The table: one line per observation, then the worst and mean, and with `fp8_bar` whether
/// fp8's bar was met.
pub fn report(
    what: &str,
    candidate: &str,
    reference: &str,
    all: &[Agreement],
    fp8_bar: bool,
) -> String {
    let mut s = format!("turbopi accuracy: {candidate} against {reference}\n  {what}\n");
    s += "  obs   cosine      max |diff|   max |ref|   relative\n";
    for (i, a) in all.iter().enumerate() {
        s += &format!(
            "  {i:<4}  {:<10.7}  {:<11.3e}  {:<10.4}  {:.3e}\n",
            a.cosine,
            a.max_abs,
            a.max_reference,
            a.relative()
        );
    }
    let sum = accuracy::summarise(all);
    s += &format!(
        "  worst: cosine {:.7} (mean {:.7}), relative {:.3e} (mean {:.3e})\n",
        sum.min_cosine, sum.mean_cosine, sum.max_relative, sum.mean_relative
    );
    if fp8_bar {
        let met = sum.meets(FP8_MIN_COSINE, FP8_MAX_RELATIVE);
        s += &format!(
            "  fp8 bar (cosine >= {FP8_MIN_COSINE}, relative <= {FP8_MAX_RELATIVE:.0e}): {}\n",
            if met { "met" } else { "MISSED" }
        );
    }
    s
}

//! `turbopi bench`: end-to-end latency of the policy on a named workload
//! (operators::bench::Setting), with random weights built in memory unless a checkpoint is
//! given. One harness for every backend, so the numbers compare. `--rtc` also times frames
//! guided by real-time chunking (exact on the CPU, the Jacobian term dropped on the GPU).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use operators::backend::{self, BackendKind, Precision, Runner};
use operators::bench::{
    bench_batches, bench_guided, bench_pipelined, bench_runner_observed, format_batches,
    BatchReport, BenchReport, Setting,
};
use operators::checkpoint::Checkpoint;
use operators::Config;

/// What `turbopi bench` takes.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// `libero` (pi0.5, 2 + 1 masked cameras, 20/200 tokens, horizon 10) or `pi0`.
    pub setting: String,
    /// `cpu` or `cuda`.
    pub backend: String,
    /// `f32`, `bf16` or `fp8`; defaults to bf16 on cuda and f32 on cpu.
    pub dtype: Option<String>,
    /// A checkpoint to load instead of random weights (its config replaces the setting's).
    pub checkpoint: Option<PathBuf>,
    /// A named preset for the random weights (the setting's model when absent); the
    /// `libero` setting keeps its horizon of 10.
    pub preset: Option<String>,
    /// Real prompt tokens instead of the setting's (`--prompt-tokens`).
    pub prompt_tokens: Option<usize>,
    pub steps: usize,
    pub iters: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Batch sizes to time besides single frames (`--batch 1,2,4`); none by default.
    pub batch: Vec<usize>,
    /// Also time frames guided by real-time chunking (`--rtc`): the leftover is the
    /// unguided chunk's second half, delay 3, beta 5.
    pub rtc: bool,
    /// Where each timed frame's stage spans go (off by default).
    pub trace: node_common::trace::TraceConfig,
}

/// What `turbopi bench` measured: single frames, `--batch`'s sizes (empty without it) and
/// `--rtc`'s guided frames.
pub type Reports = (BenchReport, Vec<BatchReport>, Option<BenchReport>);

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            setting: "libero".into(),
            backend: "cuda".into(),
            dtype: None,
            checkpoint: None,
            preset: None,
            prompt_tokens: None,
            steps: 10,
            iters: 100,
            warmup: 10,
            seed: 0,
            batch: vec![],
            rtc: false,
            trace: Default::default(),
        }
    }
}

/// Loads the policy, runs the benchmark and prints a report; returns the numbers.
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    run_all(args).map(|(single, _, _)| single)
}

/// [`run`], with the batched timings of `--batch` and the guided ones of `--rtc`.
pub fn run_all(args: &BenchArgs) -> Result<Reports> {
    if let Some(&b) = args
        .batch
        .iter()
        .find(|&&b| b == 0 || b > operators::MAX_BATCH)
    {
        anyhow::bail!(
            "--batch {b}: batch sizes are 1 to {} (operators::MAX_BATCH)",
            operators::MAX_BATCH
        );
    }
    let setting: Setting = args.setting.parse()?;
    let kind: BackendKind = args.backend.parse()?;
    let precision: Precision = match &args.dtype {
        Some(d) => d.parse()?,
        None if kind == BackendKind::Cuda => Precision::Bf16,
        None => Precision::F32,
    };
    let t0 = Instant::now();
    let (mut runner, cfg) = match &args.checkpoint {
        Some(dir) => {
            let ckpt =
                Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let runner = backend::load(kind, precision, &ckpt, |_, _| {})?;
            (runner, ckpt.config.clone())
        }
        None => {
            let cfg = model_config(setting, args.preset.as_deref())?;
            (random_runner(kind, precision, &cfg, args.seed)?, cfg)
        }
    };
    let setup = t0.elapsed();
    let obs = match args.prompt_tokens {
        Some(n) => setting
            .observation_with_prompt(&cfg, args.seed, n)
            .context("--prompt-tokens")?,
        None => setting.observation(&cfg, args.seed),
    };
    let noise = obs
        .noise
        .clone()
        .context("bench observations carry noise")?;
    // One trace per timed frame (frame i is seq i), recorded after the frame's timing.
    let tracer = crate::spans::tracer(&args.trace, &runner.describe())?;
    let gpu = kind == BackendKind::Cuda;
    let report = bench_runner_observed(
        runner.as_mut(),
        &obs,
        &noise,
        args.steps,
        args.iters,
        args.warmup,
        &mut |i, times| {
            tracer.record_stages(i as u64, None, times, SystemTime::now(), gpu);
        },
    )?;
    print!(
        "{}",
        format_report(
            setting,
            &cfg,
            &obs,
            args,
            &runner.describe(),
            setup,
            &report
        )
    );
    // Overlapped frames (backends that support it): throughput against 1 / mean latency.
    if let Some(fps) = bench_pipelined(runner.as_mut(), &obs, &noise, args.steps, args.iters)? {
        println!(
            "  pipelined (2 frames in flight, {} frames): {fps:.1} frames/s, against {:.1} frames/s one at a time",
            args.iters,
            1e3 / report.mean_ms
        );
    }
    let batches = if args.batch.is_empty() {
        vec![]
    } else {
        let noises: Vec<Vec<f32>> = (0..operators::MAX_BATCH as u64)
            .map(|i| operators::observation::noise_from_seed(&cfg, args.seed.wrapping_add(i)))
            .collect();
        let reports = bench_batches(
            runner.as_mut(),
            &obs,
            &noises,
            args.steps,
            &args.batch,
            args.iters,
            args.warmup.min(2),
        )?;
        print!("{}", format_batches(&reports));
        reports
    };
    // Before the guided frames: the census reports the last graph run.
    if let Some(census) = runner.census()? {
        print!("{}", census.report(args.steps, report.denoise_ms));
    }
    let guided = if args.rtc {
        let g = bench_guided(
            runner.as_mut(),
            &cfg,
            &obs,
            &noise,
            args.steps,
            args.iters,
            args.warmup,
        )?;
        print!("{}", format_guided(runner.as_ref(), &cfg, &report, &g));
        Some(g)
    } else {
        None
    };
    if operators::settings::profile()? {
        match runner.profile_denoise(args.steps)? {
            Some(table) => print!("{table}"),
            None => println!("  (TURBOPI_PROFILE: this backend has no denoise profile)"),
        }
        if let Some(table) = runner.profile_prefix()? {
            print!("{table}");
        }
        if let Some(table) = runner.profile_vision()? {
            print!("{table}");
        }
    }
    Ok((report, batches, guided))
}

/// The lines of `--rtc`: the guided frames' latency next to the unguided ones'.
fn format_guided(
    runner: &dyn Runner,
    cfg: &Config,
    plain: &BenchReport,
    g: &BenchReport,
) -> String {
    let how = runner
        .rtc_jacobian()
        .map_or("no guidance", |j| j.describe());
    let h = cfg.action_horizon;
    format!(
        "  guided (RTC, {how}; leftover rows {}..{h}, delay {}, beta 5):\n  \
         end to end (host): p50 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  (unguided p50 {:.2} ms  p99 {:.2} ms: +{:.1}% p50)\n  \
         stages (mean):     vision {:.2} ms  prefix {:.2} ms  denoise {:.2} ms  (unguided denoise {:.2} ms)\n",
        h / 2,
        3.min(h - h / 2),
        g.p50_ms,
        g.p99_ms,
        g.mean_ms,
        plain.p50_ms,
        plain.p99_ms,
        100.0 * (g.p50_ms / plain.p50_ms - 1.0),
        g.vision_ms,
        g.prefix_ms,
        g.denoise_ms,
        plain.denoise_ms,
    )
}

/// A policy of `cfg` with random weights: built on the device for cuda; through a random
/// checkpoint in a temporary directory for cpu (the CPU backend loads only checkpoints).
/// The model of random weights for `setting`: `preset`'s (the `libero` setting keeps its
/// horizon of 10 at most), or the setting's full-size model.
pub fn model_config(setting: Setting, preset: Option<&str>) -> Result<Config> {
    Ok(match preset {
        Some(p) => {
            let base = Config::preset(p)?;
            match setting {
                Setting::Libero => Config {
                    action_horizon: base.action_horizon.min(10),
                    ..base
                },
                Setting::Pi0 => base,
            }
        }
        None => setting.config(),
    })
}

fn random_runner(
    kind: BackendKind,
    precision: Precision,
    cfg: &Config,
    seed: u64,
) -> Result<Box<dyn Runner>> {
    match kind {
        BackendKind::Cuda => cuda_random(cfg, precision, seed),
        BackendKind::Cpu => {
            let dir = std::env::temp_dir().join(format!("turbopi-bench-{}", std::process::id()));
            let result = cpu_random(&dir, cfg, precision, seed);
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
    }
}

fn cpu_random(
    dir: &std::path::Path,
    cfg: &Config,
    precision: Precision,
    seed: u64,
) -> Result<Box<dyn Runner>> {
    operators::random::write_random_checkpoint(
        dir,
        cfg,
        operators::checkpoint::WriteDtype::Bf16,
        seed,
        |_, _| {},
    )?;
    let ckpt = Checkpoint::open(dir)?;
    Ok(backend::load(
        BackendKind::Cpu,
        precision,
        &ckpt,
        |_, _| {},
    )?)
}

#[cfg(feature = "cuda")]
fn cuda_random(cfg: &Config, precision: Precision, seed: u64) -> Result<Box<dyn Runner>> {
    Ok(Box::new(operators::cuda::CudaPolicy::random(
        cfg, precision, seed,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_random(_: &Config, _: Precision, _: u64) -> Result<Box<dyn Runner>> {
    anyhow::bail!(
        "CUDA support is not built in: rebuild with `cargo build --release --features cuda`"
    )
}

fn describe_setting(setting: Setting, cfg: &Config, obs: &operators::Observation) -> String {
    let real_images = obs.image_masks.iter().filter(|&&m| m).count();
    let real_tokens = obs.token_mask.iter().filter(|&&m| m).count();
    format!(
        "{} ({}, {real_images} of {} cameras, {real_tokens} of {} prompt tokens, horizon {})",
        setting.name(),
        if cfg.pi05 { "pi0.5" } else { "pi0" },
        cfg.num_images,
        cfg.max_token_len,
        cfg.action_horizon
    )
}

/// The report as printed: workload, setup time, end-to-end percentiles, stage means.
pub fn format_report(
    setting: Setting,
    cfg: &Config,
    obs: &operators::Observation,
    args: &BenchArgs,
    runner: &str,
    setup: Duration,
    r: &BenchReport,
) -> String {
    let weights = match (&args.checkpoint, &args.preset) {
        (Some(p), _) => format!("checkpoint {}", p.display()),
        (None, Some(p)) => format!("random weights of preset {p} (seed {})", args.seed),
        (None, None) => format!("random weights (seed {})", args.seed),
    };
    format!(
        "bench {}\n  {runner}, {weights}, {} steps; setup {:.1} s; {} frames after {} warm-up\n  \
         end to end (host): p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  mean {:.2} ms  min {:.2} ms  max {:.2} ms\n  \
         stages (mean):     vision {:.2} ms  prefix {:.2} ms  denoise {:.2} ms\n",
        describe_setting(setting, cfg, obs),
        args.steps,
        setup.as_secs_f64(),
        r.iters,
        args.warmup,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.mean_ms,
        r.min_ms,
        r.max_ms,
        r.vision_ms,
        r.prefix_ms,
        r.denoise_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_bench_runs_on_a_small_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::pi05_small();
        operators::random::write_random_checkpoint(
            dir.path(),
            &cfg,
            operators::checkpoint::WriteDtype::F32,
            1,
            |_, _| {},
        )
        .unwrap();
        let args = BenchArgs {
            backend: "cpu".into(),
            checkpoint: Some(dir.path().to_path_buf()),
            steps: 2,
            iters: 3,
            warmup: 1,
            ..BenchArgs::default()
        };
        let r = run(&args).unwrap();
        assert_eq!(r.iters, 3);
        assert!(r.p50_ms > 0.0 && r.denoise_ms > 0.0);
        let batched = BenchArgs {
            batch: vec![1, 3],
            ..args.clone()
        };
        let (_, b, _) = run_all(&batched).unwrap();
        let sizes: Vec<usize> = b.iter().map(|r| r.batch).collect();
        assert_eq!(sizes, [1, 3]);
        assert!(b.iter().all(|r| r.iters == 3 && r.frames_per_s > 0.0));
        // --rtc: guided frames (exact VJP on the CPU) are timed too, and cost more.
        let rtc = BenchArgs {
            rtc: true,
            ..args.clone()
        };
        let (single, _, guided) = run_all(&rtc).unwrap();
        let g = guided.expect("--rtc times guided frames");
        assert_eq!(g.iters, 3);
        assert!(g.denoise_ms > single.denoise_ms, "{g:?} vs {single:?}");
        assert!(run_all(&args).unwrap().2.is_none());
        let too_big = BenchArgs {
            batch: vec![2, 9],
            ..args.clone()
        };
        let e = run_all(&too_big).unwrap_err().to_string();
        assert!(e.contains("--batch 9: batch sizes are 1 to 8"), "{e}");
        // --prompt-tokens within the model's prompt, and named when outside it.
        let longer = BenchArgs {
            prompt_tokens: Some(5),
            ..args.clone()
        };
        assert_eq!(run(&longer).unwrap().iters, 3);
        let too_long = BenchArgs {
            prompt_tokens: Some(10_000),
            ..args.clone()
        };
        let e = format!("{:#}", run(&too_long).unwrap_err());
        assert!(
            e.contains("--prompt-tokens: 10000 prompt tokens: the model takes 1 to"),
            "{e}"
        );
        let bad = BenchArgs {
            setting: "nope".into(),
            ..args
        };
        assert!(run(&bad).is_err());
    }
}

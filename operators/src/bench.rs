//! One benchmark harness for every backend and placement: a fixed workload (observation,
//! noise, step count), warm-up frames, then timed frames. Reports end-to-end host latency
//! percentiles and the mean time of each stage as the runner measures it (GPU time from CUDA
//! events on the GPU backend), so numbers from different configurations compare. Frames
//! guided by real-time chunking ([`bench_guided`]) are timed by the same loop.

use std::str::FromStr;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::backend::Runner;
use crate::config::Config;
use crate::observation::{noise_from_seed, Observation};
use crate::rtc::Guide;
use crate::{Error, Result, StageTimes};

/// What a backend launches per frame and what its denoise loop must read, for the report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    /// Kernels each stage's graph launches per frame: vision, prefix, denoise (all steps).
    pub kernels: [usize; 3],
    /// Memory copies and sets in each stage's graph.
    pub copies: [usize; 3],
    /// Launches in each stage's graph that start while their predecessor drains
    /// (programmatic dependent launch, `TURBOPI_PDL`).
    pub programmatic: [usize; 3],
    /// Bytes of weights one denoise step reads (the expert's linears and the action heads).
    pub denoise_step_weight_bytes: usize,
    /// The card's peak memory bandwidth (bytes/s), from its memory clock and bus width.
    pub peak_bandwidth: Option<f64>,
}

impl Census {
    /// Lines for `turbopi bench`: kernels per stage, and the denoise loop's weight bandwidth
    /// at `denoise_ms` for `steps` steps.
    pub fn report(&self, steps: usize, denoise_ms: f64) -> String {
        let [v, p, d] = self.kernels;
        let [cv, cp, cd] = self.copies;
        let early: usize = self.programmatic.iter().sum();
        let bytes = self.denoise_step_weight_bytes as f64 * steps as f64;
        let rate = bytes / (denoise_ms / 1e3);
        let share = match self.peak_bandwidth {
            Some(peak) if peak > 0.0 => {
                format!(
                    "{:.0}% of the card's peak {:.2} TB/s",
                    100.0 * rate / peak,
                    peak / 1e12
                )
            }
            _ => "the card's peak unknown".into(),
        };
        format!(
            "  kernels per frame: vision {v}, prefix {p}, denoise {d} ({} steps), total {} (+ {} copies; {early} launched early, PDL)\n  \
             denoise weight bandwidth: {:.2} GB of weights per frame in {denoise_ms:.2} ms = {:.2} TB/s, {share}\n",
            steps,
            v + p + d,
            cv + cp + cd,
            bytes / 1e9,
            rate / 1e12,
        )
    }
}

/// The named workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// pi0.5 as in LIBERO: 2 real cameras + 1 masked, 20 real of 200 prompt tokens, horizon 10.
    Libero,
    /// pi0: 3 real cameras, 48 prompt tokens, horizon 50.
    Pi0,
}

/// Names of the settings, for help texts.
pub const SETTINGS: &[&str] = &["libero", "pi0"];

impl FromStr for Setting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "libero" => Ok(Setting::Libero),
            "pi0" => Ok(Setting::Pi0),
            other => Err(Error::Input(format!(
                "unknown bench setting `{other}`; expected one of: {}",
                SETTINGS.join(", ")
            ))),
        }
    }
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Libero => "libero",
            Setting::Pi0 => "pi0",
        }
    }

    /// The model of the setting (full size).
    pub fn config(self) -> Config {
        match self {
            Setting::Libero => Config {
                action_horizon: 10,
                ..Config::pi05()
            },
            Setting::Pi0 => Config::pi0(),
        }
    }

    /// (real cameras, real prompt tokens) of the setting for a model with `cfg`'s sizes.
    fn shape(self, cfg: &Config) -> (usize, usize) {
        match self {
            Setting::Libero => (cfg.num_images.min(2), cfg.max_token_len.min(20)),
            Setting::Pi0 => (cfg.num_images, cfg.max_token_len),
        }
    }

    /// A synthetic observation of the setting for `cfg`: random pixels, the setting's camera
    /// masks, a right-padded prompt of random ids, a random state.
    pub fn observation(self, cfg: &Config, seed: u64) -> Observation {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (real_images, real_tokens) = self.shape(cfg);
        let n = cfg.num_images * cfg.image_size * cfg.image_size * 3;
        // Camera bytes, as the dataflow and the openpi server hand them to the policy.
        let images = crate::Pixels::Bytes((0..n).map(|_| rng.random::<u8>()).collect());
        let image_masks = (0..cfg.num_images).map(|i| i < real_images).collect();
        let l = cfg.max_token_len;
        let vocab = cfg.vocab_size.min(i32::MAX as usize) as i32;
        let tokens = (0..l)
            .map(|i| {
                if i < real_tokens {
                    rng.random_range(0..vocab)
                } else {
                    0
                }
            })
            .collect();
        let token_mask = (0..l).map(|i| i < real_tokens).collect();
        let state = Some(
            (0..cfg.action_dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        );
        Observation {
            images,
            image_masks,
            tokens,
            token_mask,
            state,
            noise: Some(noise_from_seed(cfg, seed)),
        }
    }
}

/// Latency of `iters` timed frames (after `warmup` untimed ones), in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub iters: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Mean stage times as the runner reports them (GPU time on GPU backends).
    pub vision_ms: f64,
    pub prefix_ms: f64,
    pub denoise_ms: f64,
}

/// The value at quantile `q` of sorted `v` (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The latency of batches of one size ([`bench_batches`]), in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// Observations per batch.
    pub batch: usize,
    /// Timed batches.
    pub iters: usize,
    /// Percentiles of one batch's latency.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean latency of a batch divided by its size: what one frame costs.
    pub per_frame_ms: f64,
    /// Frames answered per second over the timed batches.
    pub frames_per_s: f64,
}

/// For each size in `batches`, runs `warmup` untimed and `iters` timed batches of that many
/// copies of `obs` through [`Runner::infer_batch`], row i with noise `noises[i]` (at least
/// as many as the largest batch); every row must succeed.
pub fn bench_batches(
    runner: &mut dyn Runner,
    obs: &Observation,
    noises: &[Vec<f32>],
    steps: usize,
    batches: &[usize],
    iters: usize,
    warmup: usize,
) -> Result<Vec<BatchReport>> {
    if iters == 0 {
        return Err(Error::Input("bench: iters must be at least 1".into()));
    }
    let mut reports = Vec::with_capacity(batches.len());
    for &b in batches {
        if b == 0 || b > crate::MAX_BATCH || b > noises.len() {
            return Err(Error::Input(format!(
                "bench: batch size {b}; expected 1 to {}",
                crate::MAX_BATCH.min(noises.len())
            )));
        }
        let rows: Vec<crate::BatchRow> = noises[..b]
            .iter()
            .map(|noise| crate::BatchRow { obs, noise })
            .collect();
        let run = |runner: &mut dyn Runner| -> Result<()> {
            let out = runner.infer_batch(&rows, steps)?;
            match out.actions.into_iter().find_map(|a| a.err()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        for _ in 0..warmup {
            run(runner)?;
        }
        let mut total = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            run(runner)?;
            total.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let sum: f64 = total.iter().sum();
        total.sort_by(f64::total_cmp);
        reports.push(BatchReport {
            batch: b,
            iters,
            p50_ms: percentile(&total, 0.50),
            p99_ms: percentile(&total, 0.99),
            per_frame_ms: sum / (iters * b) as f64,
            frames_per_s: (iters * b) as f64 / (sum / 1e3),
        });
    }
    Ok(reports)
}

/// The table `turbopi bench --batch` prints.
pub fn format_batches(reports: &[BatchReport]) -> String {
    let mut out = String::from(
        "  batched (Runner::infer_batch, copies of the observation, each row its own noise):\n  \
         batch  batches  p50 ms/batch  p99 ms/batch  ms/frame  frames/s\n",
    );
    for r in reports {
        out.push_str(&format!(
            "  {:>5}  {:>7}  {:>12.2}  {:>12.2}  {:>8.2}  {:>8.1}\n",
            r.batch, r.iters, r.p50_ms, r.p99_ms, r.per_frame_ms, r.frames_per_s
        ));
    }
    out
}

/// Runs `warmup` untimed and `iters` timed frames of `runner` on `obs` and `noise`.
pub fn bench_runner(
    runner: &mut dyn Runner,
    obs: &Observation,
    noise: &[f32],
    steps: usize,
    iters: usize,
    warmup: usize,
) -> Result<BenchReport> {
    bench_runner_observed(runner, obs, noise, steps, iters, warmup, &mut |_, _| {})
}

/// [`bench_runner`], calling `on_frame(i, stage times)` right after timed frame `i` ends
/// (outside the timed region), e.g. to trace it.
pub fn bench_runner_observed(
    runner: &mut dyn Runner,
    obs: &Observation,
    noise: &[f32],
    steps: usize,
    iters: usize,
    warmup: usize,
    on_frame: &mut dyn FnMut(usize, &crate::StageTimes),
) -> Result<BenchReport> {
    time_frames(iters, warmup, on_frame, &mut || {
        runner.infer(obs, noise, steps).map(|(_, t)| t)
    })
}

/// The guide of `bench --rtc`: the previous chunk `actions` [horizon, action_dim]'s rows from
/// `horizon / 2` on as the leftover, delay 3 (at most the leftover's rows), beta 5.
pub fn synthetic_guide(cfg: &Config, actions: &[f32]) -> Result<Guide> {
    let (h, ad) = (cfg.action_horizon, cfg.action_dim);
    if actions.len() != h * ad {
        return Err(Error::Input(format!(
            "bench: a chunk of {} values, expected [{h}, {ad}]",
            actions.len()
        )));
    }
    let s = h / 2;
    Ok(Guide {
        prefix: actions[s * ad..].to_vec(),
        delay: 3.min(h - s),
        beta: 5.0,
    })
}

/// [`bench_runner`] of frames guided by real-time chunking ([`Runner::infer_guided`]) toward
/// [`synthetic_guide`] of the unguided chunk of `obs` and `noise`.
pub fn bench_guided(
    runner: &mut dyn Runner,
    cfg: &Config,
    obs: &Observation,
    noise: &[f32],
    steps: usize,
    iters: usize,
    warmup: usize,
) -> Result<BenchReport> {
    let (prev, _) = runner.infer(obs, noise, steps)?;
    let guide = synthetic_guide(cfg, &prev)?;
    time_frames(iters, warmup, &mut |_, _| {}, &mut || {
        runner
            .infer_guided(obs, noise, steps, &guide)
            .map(|(_, t)| t)
    })
}

/// Runs `warmup` untimed and `iters` timed frames of `frame`, calling `on_frame` after each
/// timed one (outside the timed region).
fn time_frames(
    iters: usize,
    warmup: usize,
    on_frame: &mut dyn FnMut(usize, &StageTimes),
    frame: &mut dyn FnMut() -> Result<StageTimes>,
) -> Result<BenchReport> {
    if iters == 0 {
        return Err(Error::Input("bench: iters must be at least 1".into()));
    }
    for _ in 0..warmup {
        frame()?;
    }
    let mut total = Vec::with_capacity(iters);
    let (mut vision, mut prefix, mut denoise) = (0.0, 0.0, 0.0);
    for i in 0..iters {
        let t0 = Instant::now();
        let times = frame()?;
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        on_frame(i, &times);
        vision += times.vision.as_secs_f64() * 1e3;
        prefix += times.prefix.as_secs_f64() * 1e3;
        denoise += times.denoise.as_secs_f64() * 1e3;
    }
    let n = iters as f64;
    let mean = total.iter().sum::<f64>() / n;
    total.sort_by(f64::total_cmp);
    Ok(BenchReport {
        iters,
        p50_ms: percentile(&total, 0.50),
        p90_ms: percentile(&total, 0.90),
        p99_ms: percentile(&total, 0.99),
        mean_ms: mean,
        min_ms: total[0],
        max_ms: total[total.len() - 1],
        vision_ms: vision / n,
        prefix_ms: prefix / n,
        denoise_ms: denoise / n,
    })
}

/// Throughput with frames overlapped (two in flight, the next submitted as soon as one is
/// collected), in frames per second; None for a backend that does not overlap frames.
pub fn bench_pipelined(
    runner: &mut dyn Runner,
    obs: &Observation,
    noise: &[f32],
    steps: usize,
    frames: usize,
) -> Result<Option<f64>> {
    if frames == 0 {
        return Err(Error::Input("bench: frames must be at least 1".into()));
    }
    let t0 = Instant::now();
    if !runner.submit(obs, noise, steps)? {
        return Ok(None);
    }
    for _ in 1..frames {
        if runner.in_flight() >= 2 {
            runner.collect()?;
        }
        runner.submit(obs, noise, steps)?;
    }
    while runner.collect()?.is_some() {}
    Ok(Some(frames as f64 / t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::StageTimes;
    use std::time::Duration;

    struct Fake(u64);
    impl Runner for Fake {
        fn infer(
            &mut self,
            _: &Observation,
            noise: &[f32],
            _: usize,
        ) -> Result<(Vec<f32>, StageTimes)> {
            self.0 += 1;
            let t = StageTimes {
                vision: Duration::from_millis(1),
                prefix: Duration::from_millis(2),
                denoise: Duration::from_millis(3),
            };
            Ok((noise.to_vec(), t))
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn the_synthetic_guide_is_the_second_half_of_the_chunk() {
        let cfg = Config::pi05_small();
        let (h, ad) = (cfg.action_horizon, cfg.action_dim);
        let chunk: Vec<f32> = (0..h * ad).map(|i| i as f32).collect();
        let g = synthetic_guide(&cfg, &chunk).unwrap();
        assert_eq!(g.prefix, &chunk[h / 2 * ad..]);
        assert_eq!(g.delay, 3.min(h - h / 2));
        assert!(g.prepare(h, ad).is_ok());
        assert!(synthetic_guide(&cfg, &chunk[1..]).is_err());
    }

    #[test]
    fn settings_build_the_documented_workloads() {
        let cfg = Setting::Libero.config();
        assert!(cfg.pi05);
        assert_eq!(cfg.action_horizon, 10);
        let obs = Setting::Libero.observation(&cfg, 1);
        assert_eq!(obs.image_masks, vec![true, true, false]);
        assert_eq!(obs.tokens.len(), 200);
        assert_eq!(obs.token_mask.iter().filter(|&&m| m).count(), 20);
        assert!(obs.images.unit().iter().all(|v| (-1.0..=1.0).contains(v)));
        let cfg = Setting::Pi0.config();
        let obs = Setting::Pi0.observation(&cfg, 1);
        assert_eq!(obs.image_masks, vec![true; 3]);
        assert_eq!(obs.token_mask.iter().filter(|&&m| m).count(), 48);
        assert_eq!(obs.noise.as_ref().map(Vec::len), Some(50 * 32));
        assert!("nope".parse::<Setting>().is_err());
    }

    #[test]
    fn bench_counts_frames_and_averages_stages() {
        let cfg = Config::pi0_small();
        let obs = Setting::Pi0.observation(&cfg, 2);
        let noise = obs.noise.clone().unwrap();
        let mut r = Fake(0);
        let rep = bench_runner(&mut r, &obs, &noise, 3, 5, 2).unwrap();
        assert_eq!(r.0, 7);
        assert_eq!(rep.iters, 5);
        assert!((rep.denoise_ms - 3.0).abs() < 1e-9);
        assert!(rep.p50_ms <= rep.p99_ms && rep.min_ms <= rep.p50_ms);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        // Without guidance the fake answers "not implemented".
        let e = bench_guided(&mut r, &cfg, &obs, &noise, 3, 5, 2).unwrap_err();
        assert!(
            e.to_string().contains("RTC guidance is not implemented"),
            "{e}"
        );
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
    }
}

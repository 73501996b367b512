//! The CUDA policy end to end: f32 (strict mode) against the golden vectors of the Python
//! reference, bf16 against the CPU backend, the denoise graph reused across prefix lengths
//! and step counts, and the full-size pi0 / pi0.5 with random weights against the CPU.
//! Runs only with `--features cuda`, and fails (does not skip) without a GPU.
//!
//! Golden data: `$TURBOPI_GOLDEN`, else tests/golden next to this crate at build time.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::time::Instant;

use operators::backend::{Precision, Runner};
use operators::bench::Setting;
use operators::checkpoint::{Checkpoint, WriteDtype};
use operators::cuda::CudaPolicy;
use operators::fp8::Stages;
use operators::policy::BatchRow;
use operators::rtc::{Guide, Jacobian};
use operators::{npy, observation, random, Config, Error, Observation, Pixels, Policy, MAX_BATCH};

const GOLDEN_TOLERANCE: f32 = 1e-4;
/// bf16 against the CPU, relative to the largest |action|.
const BF16_TOLERANCE: f32 = 2e-2;
/// Full-size f32 against the CPU, relative to the largest |action| (summation order differs
/// over 2k-16k wide dot products through 45 layers).
const F32_FULL_TOLERANCE: f32 = 1e-3;
/// `--dtype fp8` on the GPU against the CPU's emulation of the same scheme (same codes and
/// scales for the weights), relative to the largest |action|. Between the products the
/// GPU's activations are bf16 where the CPU's are f32, so an activation near the middle of
/// two E4M3 codes may round to the other one; the emulation itself moves the golden models'
/// actions by up to 9.6e-2 from f32 (docs/fp8.md). Issue 18's accuracy bar (5e-2) is the
/// tolerance.
const FP8_TOLERANCE: f32 = 5e-2;
/// bf16 guided (real-time chunking, Jacobian dropped): the first `d` actions within this
/// fraction of the largest |action| of the leftover they are pulled to. The CPU's f32 run of
/// the same guides on the golden models (10 steps) lands 0.09-0.10 from leftovers of largest
/// |action| 2.6-3.4 (a fraction of 0.03-0.04), the unguided chunks 3.6-4.3; bf16 rounding
/// gets a margin of about 2.5x on top.
const RTC_BF16_PULL: f32 = 0.1;

fn golden_root() -> PathBuf {
    operators::settings::golden()
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden"))
}

fn golden_cases() -> Vec<PathBuf> {
    let root = golden_root();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| {
            panic!(
                "golden data at {}: {e} (set TURBOPI_GOLDEN)",
                root.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("checkpoint").is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 3,
        "expected the golden cases under {}, found {cases:?}",
        root.display()
    );
    cases
}

fn load(case: &std::path::Path) -> (Checkpoint, Observation, Vec<f32>) {
    let ckpt = Checkpoint::open(&case.join("checkpoint")).unwrap();
    let obs = Observation::load(&case.join("observation"), &ckpt.config).unwrap();
    let noise = obs
        .noise
        .clone()
        .expect("golden observations carry noise.npy");
    (ckpt, obs, noise)
}

fn cuda(ckpt: &Checkpoint, precision: Precision) -> CudaPolicy {
    CudaPolicy::load(ckpt, precision, |_, _| {})
        .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

/// (max |a - b|, its index, max |b|).
fn diff(a: &[f32], b: &[f32]) -> (f32, usize, f32) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d.is_nan() || d > worst.0 {
            worst = (d, i);
            if d.is_nan() {
                break;
            }
        }
    }
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (worst.0, worst.1, scale)
}

#[test]
fn f32_matches_golden_vectors() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let mut policy = cuda(&ckpt, Precision::F32);
        for steps in [10, 3, 1] {
            let want = npy::read_f32(&case.join(format!("actions_steps{steps}.npy"))).unwrap();
            let (got, times) = policy.infer(&obs, &noise, steps).unwrap();
            let (err, at, scale) = diff(&got, &want.data);
            println!(
                "{} steps {steps}: max abs err {err:.3e} (max |action| {scale:.3}); vision {:?} prefix {:?} denoise {:?}",
                case.display(),
                times.vision,
                times.prefix,
                times.denoise
            );
            assert!(
                err <= GOLDEN_TOLERANCE,
                "{} steps {steps}: max abs error {err:e} at {at} (got {}, want {})",
                case.display(),
                got[at],
                want.data[at]
            );
        }
    }
}

#[test]
fn bf16_matches_cpu_on_golden_models() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        let mut policy = cuda(&ckpt, Precision::Bf16);
        for steps in [10, 1] {
            let (want, _) = cpu.infer(&obs, &noise, steps).unwrap();
            let (got, _) = policy.infer(&obs, &noise, steps).unwrap();
            let (err, at, scale) = diff(&got, &want);
            println!(
                "{} bf16 steps {steps}: max abs err {err:.3e} (max |action| {scale:.3})",
                case.display()
            );
            assert!(
                err <= BF16_TOLERANCE * scale,
                "{} bf16 steps {steps}: error {err:e} at {at} > {BF16_TOLERANCE} x {scale}",
                case.display()
            );
        }
    }
}

/// Cameras handed over as bytes (as the dataflow and the openpi server hand them) are
/// uploaded as bytes and mapped to [-1, 1] on the GPU: the same actions, bit for bit, as the
/// same cameras mapped on the host, in f32 and bf16, and with the pipelined runner.
#[test]
fn fp8_matches_the_cpu_emulation_on_golden_models() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let mut cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        // Unasked, all three stages, or where cuBLASLt applies no per-row scales (Hopper)
        // the expert alone, saying why.
        let auto = cuda(&ckpt, Precision::Fp8);
        let expert_only = Stages {
            expert: true,
            ..Stages::NONE
        };
        let d = auto.describe();
        assert!(
            auto.fp8_stages().is_all()
                || (auto.fp8_stages() == expert_only && d.contains("TURBOPI_FP8_STAGES=all")),
            "{d}"
        );
        drop(auto);
        // Asked for all three: every card with FP8 tensor cores runs them, since cuBLASLt
        // has E4M3 products there (with the scales applied by it or after it,
        // `fp8::w8a8`). The CPU emulates the same stages.
        let mut policy =
            CudaPolicy::load_with_stages(&ckpt, Precision::Fp8, Some(Stages::ALL), |_, _| {})
                .unwrap();
        let stages = policy.fp8_stages();
        assert!(stages.is_all(), "{}", policy.describe());
        println!("{}: {}", case.display(), policy.describe());
        cpu.quantise_fp8_stages(stages);
        assert!(
            policy.describe().contains("cuda fp8"),
            "{}",
            policy.describe()
        );
        let mut bf16 = cuda(&ckpt, Precision::Bf16);
        for steps in [10, 1] {
            let (want, _) = cpu.infer(&obs, &noise, steps).unwrap();
            let (got, _) = policy.infer(&obs, &noise, steps).unwrap();
            let (again, _) = policy.infer(&obs, &noise, steps).unwrap();
            let (plain, _) = bf16.infer(&obs, &noise, steps).unwrap();
            let (err, at, scale) = diff(&got, &want);
            let (moved, _, _) = diff(&got, &plain);
            println!(
                "{} fp8 steps {steps}: max abs err {err:.3e} against the cpu emulation (max |action| {scale:.3}, rel {:.2e}); {moved:.3e} from bf16",
                case.display(),
                err / scale
            );
            assert!(
                err <= FP8_TOLERANCE * scale,
                "{} fp8 steps {steps}: error {err:e} at {at} (got {}, want {}) > {FP8_TOLERANCE} x {scale}",
                case.display(),
                got[at],
                want[at]
            );
            assert!(moved > 0.0, "{}: fp8 gave bf16's actions", case.display());
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}: fp8 replays differ",
                case.display()
            );
        }
        // A batch: each row within the tolerance of the row run alone (the W8A8 products'
        // algorithms may differ with the row count; the expert's rows do not).
        let flipped: Vec<f32> = noise.iter().map(|v| -v).collect();
        let (alone, _) = policy.infer(&obs, &flipped, 10).unwrap();
        let (first, _) = policy.infer(&obs, &noise, 10).unwrap();
        let rows = two_noises(&obs, &noise, &flipped);
        let out = policy.infer_batch(&rows, 10).unwrap();
        for (r, (b, single)) in out.actions.iter().zip([&first, &alone]).enumerate() {
            let b = b.as_ref().unwrap_or_else(|e| panic!("batch row {r}: {e}"));
            let (err, _, scale) = diff(b, single);
            println!(
                "{} fp8 batch row {r}: {err:.3e} from the row alone",
                case.display()
            );
            assert!(err <= FP8_TOLERANCE * scale, "fp8 batch row {r}: {err:e}");
        }
    }
}

#[test]
fn fp8_runs_the_bench_settings_on_random_device_weights() {
    // Weights generated on the device and quantised there (`--dtype fp8` in `turbopi
    // bench`): finite actions, replays to the bit, and how far they are from bf16's on the
    // same values (the same seed gives the same values before quantisation).
    for setting in [Setting::Libero, Setting::Pi0] {
        let cfg = setting.config();
        let obs = setting.observation(&cfg, 3);
        let noise = obs.noise.clone().unwrap();
        let mut actions = Vec::new();
        for precision in [Precision::Bf16, Precision::Fp8] {
            let mut policy = CudaPolicy::random(&cfg, precision, 3)
                .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
            policy.warm_up(10).unwrap();
            let (first, times) = policy.infer(&obs, &noise, 10).unwrap();
            let (again, _) = policy.infer(&obs, &noise, 10).unwrap();
            assert!(
                first.iter().all(|v| v.is_finite()),
                "{precision:?}: non-finite"
            );
            assert_eq!(
                first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{precision:?}: replays differ"
            );
            println!("{} on {}: {times:?}", setting.name(), policy.describe());
            actions.push(first);
        }
        let a = operators::accuracy::agreement(&actions[0], &actions[1]).unwrap();
        println!(
            "{}: fp8 against bf16 on the same random weights: cosine {:.7}, relative {:.2e}",
            setting.name(),
            a.cosine,
            a.relative()
        );
        assert!(
            a.cosine > 0.9,
            "{}: fp8 far from bf16: {a:?}",
            setting.name()
        );
        assert!(
            a.max_abs > 0.0,
            "{}: fp8 gave bf16's actions",
            setting.name()
        );
    }
}

#[test]
fn camera_bytes_give_the_actions_of_their_values() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let n = obs.images.len();
        let bytes: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
        let as_bytes = Observation {
            images: Pixels::Bytes(bytes),
            ..obs.clone()
        };
        let as_values = Observation {
            images: Pixels::Unit(as_bytes.images.unit().into_owned()),
            ..obs.clone()
        };
        for precision in [Precision::F32, Precision::Bf16] {
            let mut p = cuda(&ckpt, precision);
            let (a, _) = p.infer(&as_values, &noise, 3).unwrap();
            let (b, _) = p.infer(&as_bytes, &noise, 3).unwrap();
            assert_eq!(a, b, "{}: {precision:?}", case.display());
            let (c, _) = p.infer(&obs, &noise, 3).unwrap();
            assert_ne!(a, c, "{}: other cameras, other actions", case.display());
            p.submit(&as_bytes, &noise, 3).unwrap();
            p.submit(&as_values, &noise, 3).unwrap();
            let (d, _) = p.collect().unwrap().unwrap();
            let (e, _) = p.collect().unwrap().unwrap();
            assert_eq!((&d, &e), (&a, &a), "{}: pipelined", case.display());
        }
    }
}

#[test]
fn split_stages_match_the_fused_policy() {
    // What the split graph does: one stage per process there, each loading only its own
    // weights, host tensors in between (f32 embeddings, the K/V cache as f32 holding exactly
    // the device's values). GEMM algorithm picks are shared (by process, and through the
    // kernel cache across processes), so the stages give the fused policy's actions bit for
    // bit. Also CPU stages feeding a CUDA stage.
    use operators::backend::{DenoiseStage, PrefixStage, VisionStage};
    use operators::cuda::{CudaDenoise, CudaPrefix, CudaVision};
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        for precision in [Precision::F32, Precision::Bf16] {
            let mut fused = cuda(&ckpt, precision);
            let mut v = CudaVision::load(&ckpt, precision).unwrap();
            let mut p = CudaPrefix::load(&ckpt, precision).unwrap();
            let mut d = CudaDenoise::load(&ckpt, precision).unwrap();
            let whole = fused.weight_bytes();
            assert!(whole > 0);
            for steps in [10, 3] {
                let (want, _) = fused.infer(&obs, &noise, steps).unwrap();
                let emb =
                    VisionStage::encode(&mut v, &obs.images.unit(), &obs.image_masks).unwrap();
                let cache =
                    PrefixStage::encode(&mut p, &emb, &obs.tokens, &obs.token_mask).unwrap();
                let got = d
                    .sample(&cache, obs.state.as_deref(), &noise, steps)
                    .unwrap();
                let (err, at, scale) = diff(&got, &want);
                println!(
                    "{} {precision:?} steps {steps}: split vs fused max abs err {err:.3e} (max |action| {scale:.3})",
                    case.display()
                );
                // bf16 (what the GPU graphs run): bit for bit. f32: a full run on an H200
                // once showed 8.3e-7 (pi0_small, 10 steps; equal in a run of this test
                // alone): within the golden tolerance, but a non-deterministic step is left.
                if precision == Precision::Bf16 {
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{} {precision:?} steps {steps}: split differs from fused by {err:e} at {at}",
                        case.display()
                    );
                } else {
                    assert!(
                        err <= GOLDEN_TOLERANCE,
                        "{} {precision:?} steps {steps}: split differs from fused by {err:e} at {at}",
                        case.display()
                    );
                }
            }
        }
        // The CUDA stages accept the CPU stages' tensors (and vice versa): f32 mode agrees with
        // the CPU within the golden tolerance.
        let cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (want, _) = cpu.infer(&obs, &noise, 10).unwrap();
        let mut d = operators::cuda::CudaDenoise::load(&ckpt, Precision::F32).unwrap();
        let mut v = operators::VisionEncoder::load(
            &ckpt,
            &mut operators::weights::Loader::new(&ckpt, |_, _| {}),
        )
        .unwrap();
        let mut p = operators::PrefixEncoder::load(
            &ckpt,
            &mut operators::weights::Loader::new(&ckpt, |_, _| {}),
        )
        .unwrap();
        let emb = VisionStage::encode(&mut v, &obs.images.unit(), &obs.image_masks).unwrap();
        let cache = PrefixStage::encode(&mut p, &emb, &obs.tokens, &obs.token_mask).unwrap();
        let got = d.sample(&cache, obs.state.as_deref(), &noise, 10).unwrap();
        let (err, _, scale) = diff(&got, &want);
        println!(
            "{} cpu vision+prefix -> cuda denoise: max abs err {err:.3e} (max |action| {scale:.3})",
            case.display()
        );
        assert!(err <= GOLDEN_TOLERANCE, "{}: {err:e}", case.display());
        // A cache of the wrong shape is an error that names it.
        let mut bad = cache.clone();
        bad.k.pop();
        let e = d
            .sample(&bad, obs.state.as_deref(), &noise, 10)
            .unwrap_err();
        assert!(e.to_string().contains("K/V cache"), "{e}");
    }
}

#[test]
fn pipelined_frames_match_one_at_a_time() {
    // Two frames in flight (the next frame's vision and prefix while this one denoises, two
    // K/V cache slots): the same actions, bit for bit, as one frame at a time, across prefix
    // lengths and noises.
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let other = variant(&obs);
        let flipped: Vec<f32> = noise.iter().map(|v| -v).collect();
        let frames = [
            (&obs, &noise),
            (&other, &flipped),
            (&obs, &flipped),
            (&other, &noise),
            (&obs, &noise),
        ];
        for precision in [Precision::F32, Precision::Bf16] {
            let mut p = cuda(&ckpt, precision);
            let want: Vec<Vec<f32>> = frames
                .iter()
                .map(|(o, n)| p.infer(o, n, 10).unwrap().0)
                .collect();
            let mut got = Vec::new();
            for (o, n) in frames {
                if p.in_flight() == 2 {
                    got.push(p.collect().unwrap().unwrap().0);
                }
                p.submit(o, n, 10).unwrap();
            }
            // A third frame in flight, or a one-at-a-time frame meanwhile, is refused.
            let e = p.submit(&obs, &noise, 10).unwrap_err();
            assert!(e.to_string().contains("two frames are in flight"), "{e}");
            let e = p.infer(&obs, &noise, 10).unwrap_err();
            assert!(e.to_string().contains("collect them first"), "{e}");
            while let Some((a, _)) = p.collect().unwrap() {
                got.push(a);
            }
            assert!(p.collect().unwrap().is_none());
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{} {precision:?}: frame {i}", case.display());
            }
            println!("{} {precision:?}: 5 pipelined frames equal", case.display());
        }
    }
}

#[test]
fn batched_rows_match_single_rows() {
    // Rows of different prefix lengths, cameras (values or bytes) and noise in one batch (one
    // vision run over every row's cameras, each row's prefix into its own K/V cache, one
    // denoise loop over all): each row's actions are those
    // of the row run alone, within the tolerance of its precision (the batch's products have
    // other shapes, so other kernels and summation orders); a bad row fails alone; a frame
    // run alone afterwards is unchanged, bit for bit.
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let other = variant(&obs);
        let flipped: Vec<f32> = noise.iter().map(|v| -v).collect();
        let mut bad = obs.clone();
        bad.image_masks.pop();
        // Cameras as bytes too: a batch of bytes only uploads bytes, a mixed one values.
        let n = obs.images.len();
        let as_bytes = Observation {
            images: Pixels::Bytes((0..n).map(|i| (i * 37 % 256) as u8).collect()),
            ..other.clone()
        };
        let good = [
            (&obs, &noise),
            (&other, &flipped),
            (&obs, &flipped),
            (&other, &noise),
            (&as_bytes, &noise),
            (&as_bytes, &flipped),
        ];
        for (precision, tolerance) in [
            (Precision::F32, GOLDEN_TOLERANCE),
            (Precision::Bf16, BF16_TOLERANCE),
        ] {
            let mut p = cuda(&ckpt, precision);
            let want: Vec<Vec<f32>> = good
                .iter()
                .map(|(o, n)| p.infer(o, n, 10).unwrap().0)
                .collect();
            // Three good rows around a bad one; then every slot, the good rows over and over.
            let mut rows: Vec<BatchRow> = good[..3]
                .iter()
                .map(|(o, n)| BatchRow { obs: o, noise: n })
                .collect();
            rows.insert(
                2,
                BatchRow {
                    obs: &bad,
                    noise: &noise,
                },
            );
            let expect: Vec<Option<usize>> = vec![Some(0), Some(1), None, Some(2)];
            let full: Vec<usize> = (0..MAX_BATCH).map(|i| i % good.len()).collect();
            let full_rows: Vec<BatchRow> = full
                .iter()
                .map(|&i| BatchRow {
                    obs: good[i].0,
                    noise: good[i].1,
                })
                .collect();
            let full_expect: Vec<Option<usize>> = full.iter().map(|&i| Some(i)).collect();
            let bytes_rows: Vec<BatchRow> = good[4..]
                .iter()
                .map(|(o, n)| BatchRow { obs: o, noise: n })
                .collect();
            let bytes_expect = vec![Some(4), Some(5)];
            let batches = [
                (&rows, &expect),
                (&full_rows, &full_expect),
                (&bytes_rows, &bytes_expect),
            ];
            for (rows, expect) in batches {
                let out = p.infer_batch(rows, 10).unwrap();
                assert_eq!(out.actions.len(), rows.len());
                let mut worst = 0.0f32;
                for (r, (got, want_i)) in out.actions.iter().zip(expect.iter()).enumerate() {
                    match want_i {
                        None => {
                            let e = got.as_ref().unwrap_err();
                            assert!(e.to_string().contains("vision: expected"), "row {r}: {e}");
                        }
                        Some(i) => {
                            let got = got.as_ref().unwrap_or_else(|e| panic!("row {r}: {e}"));
                            let (err, at, scale) = diff(got, &want[*i]);
                            worst = worst.max(err / scale);
                            assert!(
                                err <= tolerance * scale,
                                "{} {precision:?}: batch of {}, row {r}: error {err:e} at {at} > {tolerance} x {scale}",
                                case.display(),
                                rows.len()
                            );
                        }
                    }
                }
                assert!(out.times.denoise > std::time::Duration::ZERO);
                println!(
                    "{} {precision:?}: batch of {} rows, worst relative error {worst:.2e}; times {:?}",
                    case.display(),
                    rows.len(),
                    out.times
                );
            }
            let again = p.infer(&obs, &noise, 10).unwrap().0;
            assert_eq!(
                again,
                want[0],
                "{} {precision:?}: a frame after batches",
                case.display()
            );
        }
    }
}

/// Another observation of the same model: one more camera masked (or unmasked) and a
/// different number of real tokens, so the prefix length changes.
fn variant(obs: &Observation) -> Observation {
    let mut o = obs.clone();
    let n = o.image_masks.len();
    o.image_masks[n - 1] = !o.image_masks[n - 1];
    if o.image_masks.iter().all(|m| !m) {
        o.image_masks[0] = true;
    }
    let real = o.token_mask.iter().filter(|&&m| m).count();
    let keep = real.saturating_sub(2).max(1);
    for (i, m) in o.token_mask.iter_mut().enumerate() {
        *m = i < keep;
    }
    let values = o.images.unit().into_owned();
    let flipped = values.iter().enumerate();
    o.images = Pixels::Unit(
        flipped
            .map(|(i, &v)| if i % 7 == 0 { -v } else { v })
            .collect(),
    );
    o
}

#[test]
fn denoise_graph_is_reused_across_prefix_lengths_and_step_counts() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        let mut policy = cuda(&ckpt, Precision::F32);
        let other = variant(&obs);
        for (o, steps) in [
            (&obs, 10),
            (&other, 10),
            (&obs, 3),
            (&other, 3),
            (&obs, 10),
            (&other, 1),
        ] {
            let (want, _) = cpu.infer(o, &noise, steps).unwrap();
            let (got, _) = policy.infer(o, &noise, steps).unwrap();
            let (err, at, _) = diff(&got, &want);
            assert!(
                err <= GOLDEN_TOLERANCE,
                "{} steps {steps} (masks {:?}): error {err:e} at {at}",
                case.display(),
                o.image_masks
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let case = golden_cases()
        .into_iter()
        .find(|c| c.ends_with("pi0_small"))
        .expect("pi0_small case");
    let (ckpt, obs, noise) = load(&case);
    let mut policy = cuda(&ckpt, Precision::F32);
    let mut no_state = obs.clone();
    no_state.state = None;
    assert!(matches!(
        policy.infer(&no_state, &noise, 10),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        policy.infer(&obs, &noise[1..], 10),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        policy.infer(&obs, &noise, 0),
        Err(Error::Input(_))
    ));
    let mut bad_token = obs.clone();
    bad_token.tokens[0] = ckpt.config.vocab_size as i32;
    bad_token.token_mask[0] = true;
    assert!(matches!(
        policy.infer(&bad_token, &noise, 10),
        Err(Error::Input(_))
    ));
    // Nothing visible: refused, as on the CPU; the prefix stage alone refuses it too.
    let mut blind = obs.clone();
    blind.image_masks.iter_mut().for_each(|m| *m = false);
    blind.token_mask.iter_mut().for_each(|m| *m = false);
    let e = policy.infer(&blind, &noise, 10).unwrap_err().to_string();
    assert!(e.contains("shows the model nothing"), "{e}");
    let mut prefix = operators::cuda::CudaPrefix::load(&ckpt, Precision::F32).unwrap();
    let e = prefix.run(&[], 0, &[]).err().map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("shows the model nothing")),
        "{e:?}"
    );
    // Only the cameras masked: served.
    let mut no_cameras = obs.clone();
    no_cameras.image_masks.iter_mut().for_each(|m| *m = false);
    let (a, _) = policy.infer(&no_cameras, &noise, 10).unwrap();
    assert!(a.iter().all(|v| v.is_finite()));
    // Still usable afterwards.
    let want = npy::read_f32(&case.join("actions_steps10.npy")).unwrap();
    let (got, _) = policy.infer(&obs, &noise, 10).unwrap();
    assert!(diff(&got, &want.data).0 <= GOLDEN_TOLERANCE);
    let d = policy.describe();
    assert!(d.starts_with("cuda f32 on "), "{d}");
}

#[test]
fn bench_settings_run_on_random_device_weights() {
    // The benchmark's path: weights generated on the device, the denoise graph built by
    // warm_up, then replayed. Replays of the same frame must agree with the first frame.
    for setting in [Setting::Libero, Setting::Pi0] {
        let cfg = setting.config();
        let t = Instant::now();
        let mut policy = CudaPolicy::random(&cfg, Precision::Bf16, 3)
            .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
        policy.warm_up(10).unwrap();
        let setup = t.elapsed();
        let obs = setting.observation(&cfg, 3);
        let noise = obs.noise.clone().unwrap();
        let (first, _) = policy.infer(&obs, &noise, 10).unwrap();
        assert!(
            first.iter().all(|v| v.is_finite()),
            "{}: non-finite actions",
            setting.name()
        );
        for _ in 0..3 {
            let (again, times) = policy.infer(&obs, &noise, 10).unwrap();
            let (err, _, scale) = diff(&again, &first);
            println!(
                "{} on {}: setup {setup:.1?}, {times:?}, replay difference {err:.2e} (max |action| {scale:.3})",
                setting.name(),
                policy.describe()
            );
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{}: replays disagree by {err}",
                setting.name()
            );
        }
    }
}

/// A batch of one observation with two noises.
fn two_noises<'a>(obs: &'a Observation, a: &'a [f32], b: &'a [f32]) -> [BatchRow<'a>; 2] {
    [BatchRow { obs, noise: a }, BatchRow { obs, noise: b }]
}

/// Full-size model with random bf16 weights: CPU f32 against CUDA f32 and bf16.
fn full_size(cfg: Config, seed: u64) {
    // Fail before spending minutes on the checkpoint when there is no GPU.
    operators::cuda::Device::open(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    random::write_random_checkpoint(
        &dir.path().join("ckpt"),
        &cfg,
        WriteDtype::Bf16,
        seed,
        |_, _| {},
    )
    .unwrap();
    observation::write_sample(&dir.path().join("obs"), &cfg, seed).unwrap();
    let ckpt = Checkpoint::open(&dir.path().join("ckpt")).unwrap();
    let obs = Observation::load(&dir.path().join("obs"), &cfg).unwrap();
    let noise = obs.noise.clone().unwrap();
    println!("checkpoint written in {:.1?}", t.elapsed());
    let steps = 10;
    let t = Instant::now();
    let want = {
        let cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        cpu.infer(&obs, &noise, steps).unwrap().0
    };
    println!("cpu f32: {:.1?}", t.elapsed());
    for (precision, tolerance) in [
        (Precision::F32, F32_FULL_TOLERANCE),
        (Precision::Bf16, BF16_TOLERANCE),
    ] {
        let t = Instant::now();
        let mut policy = cuda(&ckpt, precision);
        let loaded = t.elapsed();
        let (got, times) = policy.infer(&obs, &noise, steps).unwrap();
        let (_, again) = policy.infer(&obs, &noise, steps).unwrap();
        let (err, at, scale) = diff(&got, &want);
        println!(
            "{}: load {loaded:.1?}; max abs err {err:.3e} (max |action| {scale:.3}, rel {:.2e}); first frame {times:?}; second {again:?}",
            policy.describe(),
            err / scale
        );
        assert!(
            err <= tolerance * scale,
            "{precision:?}: error {err:e} at {at} (got {}, want {}) > {tolerance} x {scale}",
            got[at],
            want[at]
        );
        // A batch of the same observation with two noises: each row within the precision's
        // tolerance of the row run alone.
        let flipped: Vec<f32> = noise.iter().map(|v| -v).collect();
        let alone = policy.infer(&obs, &flipped, steps).unwrap().0;
        let rows = two_noises(&obs, &noise, &flipped);
        let out = policy.infer_batch(&rows, steps).unwrap();
        for (r, (b, single)) in out.actions.iter().zip([&got, &alone]).enumerate() {
            let b = b.as_ref().unwrap_or_else(|e| panic!("batch row {r}: {e}"));
            let (err, at, scale) = diff(b, single);
            println!("batch of 2, row {r}: max abs err {err:.3e} against the row alone (rel {:.2e}); batch {:?}", err / scale, out.times);
            assert!(
                err <= tolerance * scale,
                "{precision:?}: batch row {r} error {err:e} at {at} > {tolerance} x {scale}"
            );
        }
    }
}

#[test]
fn full_size_pi0_random_weights_match_cpu() {
    full_size(Config::pi0(), 7);
}

#[test]
fn full_size_pi05_random_weights_match_cpu() {
    full_size(Config::pi05(), 8);
}

/// Real-time chunking's setting for the golden models (horizon 5 or 6): the leftover is the
/// previous chunk (another noise) from row 2 on, the first 2 actions frozen, beta 5.
fn rtc_guide(prev: &[f32], ad: usize) -> Guide {
    Guide {
        prefix: prev[2 * ad..].to_vec(),
        delay: 2,
        beta: 5.0,
    }
}

/// max |a_i - leftover_i| over the first `d` = 2 actions.
fn frozen_err(a: &[f32], guide: &Guide, ad: usize) -> f32 {
    (0..guide.delay * ad)
        .map(|i| (a[i] - guide.prefix[i]).abs())
        .fold(0.0f32, f32::max)
}

/// The CUDA policy's guided frames (Jacobian dropped) in f32 against the CPU policy running
/// the same approximation (`Policy::infer_guided_with(.., Jacobian::Dropped)`, whose update
/// is the kernel's f32 twin): within the golden bar relative to the largest |action|, at 10
/// and 3 steps. Unguided frames around them keep their actions bit for bit (separate
/// graphs), a bad guide is refused with the CPU's reason, and a guided frame is refused while
/// frames are in flight.
#[test]
fn f32_guided_matches_cpu_with_the_jacobian_dropped() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let cfg = ckpt.config.clone();
        let ad = cfg.action_dim;
        let cpu = Policy::load(&ckpt, |_, _| {}).unwrap();
        let mut policy = cuda(&ckpt, Precision::F32);
        assert_eq!(Runner::rtc_jacobian(&policy), Some(Jacobian::Dropped));
        let other_noise = observation::noise_from_seed(&cfg, 7);
        let (unguided, _) = policy.infer(&obs, &noise, 10).unwrap();
        for steps in [10, 3] {
            let (prev, _) = cpu.infer(&obs, &other_noise, steps).unwrap();
            let guide = rtc_guide(&prev, ad);
            let (want, _) = cpu
                .infer_guided_with(&obs, &noise, steps, &guide, Jacobian::Dropped)
                .unwrap();
            let (got, _) = policy.infer_guided(&obs, &noise, steps, &guide).unwrap();
            let (err, at, scale) = diff(&got, &want);
            let (free, _) = cpu.infer(&obs, &noise, steps).unwrap();
            println!(
                "{} guided f32 steps {steps}: max abs err {err:.3e} (max |action| {scale:.3}); first d vs leftover: guided {:.4}, unguided {:.4}",
                case.display(),
                frozen_err(&got, &guide, ad),
                frozen_err(&free, &guide, ad),
            );
            assert!(
                err <= GOLDEN_TOLERANCE * scale,
                "{} guided steps {steps}: error {err:e} at {at} > {GOLDEN_TOLERANCE} x {scale}",
                case.display()
            );
            assert!(
                diff(&want, &free).0 > 1e3 * GOLDEN_TOLERANCE * scale,
                "{}: the guide changes the chunk",
                case.display()
            );
        }
        let (again, _) = policy.infer(&obs, &noise, 10).unwrap();
        assert_eq!(again, unguided, "{}: unguided after guided", case.display());
        let bad = Guide {
            prefix: vec![0.5; ad + 1],
            delay: 1,
            beta: 5.0,
        };
        let e = policy.infer_guided(&obs, &noise, 10, &bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("RTC: the previous chunk's leftover holds"),
            "{e}"
        );
        let guide = rtc_guide(&unguided, ad);
        policy.submit(&obs, &noise, 10).unwrap();
        let e = policy.infer_guided(&obs, &noise, 10, &guide).unwrap_err();
        assert!(e.to_string().contains("in flight"), "{e}");
        assert!(policy.collect().unwrap().is_some());
        assert!(policy.infer_guided(&obs, &noise, 10, &guide).is_ok());
    }
}

/// bf16 guided frames pull the first `d` actions onto the leftover (within RTC_BF16_PULL of
/// its largest |action|), where the unguided chunk of the same noise is far from it.
#[test]
fn bf16_guided_pulls_the_frozen_prefix() {
    for case in golden_cases() {
        let (ckpt, obs, noise) = load(&case);
        let ad = ckpt.config.action_dim;
        let mut policy = cuda(&ckpt, Precision::Bf16);
        let other_noise = observation::noise_from_seed(&ckpt.config, 7);
        let (prev, _) = policy.infer(&obs, &other_noise, 10).unwrap();
        let guide = rtc_guide(&prev, ad);
        let (free, _) = policy.infer(&obs, &noise, 10).unwrap();
        let (guided, _) = policy.infer_guided(&obs, &noise, 10, &guide).unwrap();
        let scale = guide.prefix.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (g, f) = (
            frozen_err(&guided, &guide, ad),
            frozen_err(&free, &guide, ad),
        );
        println!(
            "{} guided bf16: first d actions vs leftover {g:.4}, unguided {f:.4} (max |leftover| {scale:.3})",
            case.display()
        );
        assert!(guided.iter().all(|v| v.is_finite()));
        assert!(
            g <= RTC_BF16_PULL * scale,
            "{}: guided {g} vs unguided {f}",
            case.display()
        );
        assert!(
            f > 3.0 * RTC_BF16_PULL * scale,
            "{}: unguided {f} is not far",
            case.display()
        );
    }
}

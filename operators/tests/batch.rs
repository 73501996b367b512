//! Batched inference on the CPU backend: B observations in one forward per stage give each
//! row, bit for bit, the actions the same observation gets alone with the same noise (f32),
//! for pi0 and pi0.5 (and pi0.5 with one K/V head), with prompts of odd lengths, different
//! image masks and states per row; a bad row fails alone; too many rows fail the call.

use std::path::PathBuf;

use operators::backend::Runner;
use operators::checkpoint::Checkpoint;
use operators::observation::noise_from_seed;
use operators::{BatchRow, Config, Observation, Pixels, Policy, StageTimes, MAX_BATCH};
use rand::{Rng, SeedableRng};

const STEPS: usize = 3;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name)
}

/// Observation `i` of a batch: its own pixels, masks, an odd number of real prompt tokens
/// (then padding), and state.
fn observation(cfg: &Config, i: usize) -> Observation {
    let mut rng = rand::rngs::StdRng::seed_from_u64(40 + i as u64);
    let (n, s) = (cfg.num_images, cfg.image_size);
    let images: Vec<f32> = (0..n * s * s * 3)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    // Row 3 shows no camera at all: only its prompt is visible.
    let image_masks: Vec<bool> = (0..n)
        .map(|cam| match i % 4 {
            0 => true,
            1 => cam != n - 1,
            2 => cam == n - 1,
            _ => false,
        })
        .collect();
    let real = (2 * i + 1).min(cfg.max_token_len);
    let mut tokens: Vec<i32> = (0..real)
        .map(|_| rng.random_range(0..cfg.vocab_size as i32))
        .collect();
    let mut token_mask = vec![true; real];
    tokens.resize(cfg.max_token_len, 0);
    token_mask.resize(cfg.max_token_len, false);
    let state = (0..cfg.action_dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Observation {
        images: images.into(),
        image_masks,
        tokens,
        token_mask,
        state: Some(state),
        noise: None,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn load(name: &str) -> (Policy, Config) {
    let ckpt = Checkpoint::open(&golden(name).join("checkpoint")).unwrap();
    let cfg = ckpt.config.clone();
    (Policy::load(&ckpt, |_, _| {}).unwrap(), cfg)
}

#[test]
fn batched_actions_equal_single_actions_bit_for_bit() {
    for name in ["pi05_small", "pi0_small", "pi05_mqa"] {
        let (policy, cfg) = load(name);
        let observations: Vec<Observation> = (0..4).map(|i| observation(&cfg, i)).collect();
        let noises: Vec<Vec<f32>> = (0..4)
            .map(|i| noise_from_seed(&cfg, 7 + i as u64))
            .collect();
        let single: Vec<Vec<f32>> = observations
            .iter()
            .zip(&noises)
            .map(|(obs, noise)| policy.infer(obs, noise, STEPS).unwrap().0)
            .collect();
        assert_ne!(
            single[0], single[1],
            "{name}: rows 0 and 1 got the same actions"
        );
        for b in 1..=4 {
            let rows: Vec<BatchRow> = observations[..b]
                .iter()
                .zip(&noises)
                .map(|(obs, noise)| BatchRow { obs, noise })
                .collect();
            let out = policy.infer_batch(&rows, STEPS).unwrap();
            assert_eq!(out.actions.len(), b);
            for (i, got) in out.actions.iter().enumerate() {
                let got = got
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{name} B={b} row {i}: {e}"));
                assert_eq!(
                    bits(got),
                    bits(&single[i]),
                    "{name}: row {i} of a batch of {b} differs from the same observation alone"
                );
            }
        }
        // The same observation twice in a batch, with different noise: each its own.
        let rows = [
            BatchRow {
                obs: &observations[2],
                noise: &noises[2],
            },
            BatchRow {
                obs: &observations[2],
                noise: &noises[0],
            },
        ];
        let out = policy.infer_batch(&rows, STEPS).unwrap();
        let want = policy.infer(&observations[2], &noises[0], STEPS).unwrap().0;
        assert_eq!(bits(out.actions[0].as_ref().unwrap()), bits(&single[2]));
        assert_eq!(bits(out.actions[1].as_ref().unwrap()), bits(&want));
    }
}

#[test]
fn a_bad_row_fails_alone_and_too_many_rows_fail_the_call() {
    let (policy, cfg) = load("pi0_small");
    let good: Vec<Observation> = (0..3).map(|i| observation(&cfg, i)).collect();
    let noise: Vec<Vec<f32>> = (0..6).map(|i| noise_from_seed(&cfg, i)).collect();
    let mut bad_token = good[0].clone();
    bad_token.tokens[0] = cfg.vocab_size as i32 + 5;
    let mut blind = good[1].clone();
    blind.image_masks.fill(false);
    blind.token_mask.fill(false);
    let mut no_state = good[2].clone();
    no_state.state = None;
    let rows = [
        BatchRow {
            obs: &good[0],
            noise: &noise[0],
        },
        BatchRow {
            obs: &bad_token,
            noise: &noise[1],
        },
        BatchRow {
            obs: &good[1],
            noise: &noise[2],
        },
        BatchRow {
            obs: &blind,
            noise: &noise[3],
        },
        BatchRow {
            obs: &no_state,
            noise: &noise[4],
        },
        BatchRow {
            obs: &good[2],
            noise: &noise[5][1..],
        },
    ];
    let out = policy.infer_batch(&rows, STEPS).unwrap();
    let err = |i: usize| match &out.actions[i] {
        Ok(_) => panic!("row {i} ran"),
        Err(e) => e.to_string(),
    };
    assert!(err(1).contains("token id"), "{}", err(1));
    assert!(err(3).contains("shows the model nothing"), "{}", err(3));
    assert!(err(4).contains("pi0 needs a state"), "{}", err(4));
    assert!(err(5).contains("noise has"), "{}", err(5));
    for (i, obs) in [(0, &good[0]), (2, &good[1])] {
        let want = policy.infer(obs, &noise[i], STEPS).unwrap().0;
        let got = out.actions[i].as_ref().unwrap();
        assert_eq!(bits(got), bits(&want), "row {i} beside bad rows");
    }

    // Every row bad: each gets its error, nothing runs.
    let out = policy.infer_batch(&[rows[1], rows[3]], STEPS).unwrap();
    assert!(out.actions.iter().all(Result::is_err), "{:?}", out.actions);

    let many: Vec<BatchRow> = (0..MAX_BATCH + 1).map(|_| rows[0]).collect();
    let e = policy.infer_batch(&many, STEPS).unwrap_err().to_string();
    assert!(e.contains("a batch of 9 observations; at most 8"), "{e}");
    let e = policy.infer_batch(&rows[..1], 0).unwrap_err().to_string();
    assert!(e.contains("steps must be at least 1"), "{e}");
}

/// A backend without a batched forward: the trait's default runs the rows one after another.
struct OneAtATime(Policy);

impl Runner for OneAtATime {
    fn infer(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> operators::Result<(Vec<f32>, StageTimes)> {
        self.0.infer(obs, noise, steps)
    }
    fn describe(&self) -> String {
        "one at a time".into()
    }
}

#[test]
fn the_default_batch_runs_rows_one_after_another() {
    let (policy, cfg) = load("pi05_small");
    let obs: Vec<Observation> = (0..3).map(|i| observation(&cfg, i)).collect();
    let noise: Vec<Vec<f32>> = (0..3).map(|i| noise_from_seed(&cfg, i)).collect();
    let mut bad = obs[1].clone();
    bad.images = Pixels::Unit(bad.images.unit()[1..].to_vec());
    let rows = [
        BatchRow {
            obs: &obs[0],
            noise: &noise[0],
        },
        BatchRow {
            obs: &bad,
            noise: &noise[1],
        },
        BatchRow {
            obs: &obs[2],
            noise: &noise[2],
        },
    ];
    let mut runner = OneAtATime(policy);
    let out = runner.infer_batch(&rows, STEPS).unwrap();
    let batched = runner.0.infer_batch(&rows, STEPS).unwrap();
    for i in [0, 2] {
        assert_eq!(
            bits(out.actions[i].as_ref().unwrap()),
            bits(batched.actions[i].as_ref().unwrap())
        );
    }
    for o in [&out, &batched] {
        let e = o.actions[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("vision: expected 3 images"), "{e}");
    }
    let many: Vec<BatchRow> = (0..MAX_BATCH + 1).map(|_| rows[0]).collect();
    assert!(runner.infer_batch(&many, STEPS).is_err());
}

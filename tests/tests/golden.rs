//! The CPU backend against golden vectors from the independent Python reference
//! (tools/reference/pi_reference.py): max abs error <= 1e-4 at 10, 3 and 1 steps.

use operators::checkpoint::Checkpoint;
use operators::{npy, Observation, Policy};
use tests::{golden_cases, max_abs_diff};

const TOLERANCE: f32 = 1e-4;

#[test]
fn cpu_matches_reference_golden_vectors() {
    let cases = golden_cases();
    assert!(
        cases.len() >= 3,
        "expected the committed golden cases, found {cases:?}"
    );
    let mut checked = 0;
    for case in &cases {
        let ckpt = Checkpoint::open(&case.join("checkpoint")).unwrap();
        let policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let obs = Observation::load(&case.join("observation"), &ckpt.config).unwrap();
        let noise = obs
            .noise
            .clone()
            .expect("golden observations carry noise.npy");
        for steps in [10, 3, 1] {
            let want = npy::read_f32(&case.join(format!("actions_steps{steps}.npy"))).unwrap();
            assert_eq!(
                want.shape,
                vec![ckpt.config.action_horizon, ckpt.config.action_dim]
            );
            let (got, _) = policy.infer(&obs, &noise, steps).unwrap();
            let (err, at) = max_abs_diff(&got, &want.data);
            let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            println!(
                "{} steps {steps}: max abs err {err:.3e} (max |action| {scale:.3})",
                case.display()
            );
            assert!(
                err <= TOLERANCE,
                "{} steps {steps}: max abs error {err:e} at index {at} (got {}, want {})",
                case.display(),
                got[at],
                want.data[at]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, cases.len() * 3);
}

/// A frame that shows the model nothing (every camera masked, no real prompt token) is
/// refused with a clear error by the fused policy and by the prefix stage alone; with only
/// the cameras masked, or only the prompt, the policy still answers with finite actions.
#[test]
fn nothing_visible_is_refused_and_partly_visible_is_served() {
    let case = golden_cases()
        .into_iter()
        .find(|c| c.ends_with("pi05_small"))
        .expect("the pi05_small golden case");
    let ckpt = Checkpoint::open(&case.join("checkpoint")).unwrap();
    let policy = Policy::load(&ckpt, |_, _| {}).unwrap();
    let obs = Observation::load(&case.join("observation"), &ckpt.config).unwrap();
    let noise = obs.noise.clone().unwrap();

    let mut blind = obs.clone();
    blind.image_masks.iter_mut().for_each(|m| *m = false);
    blind.token_mask.iter_mut().for_each(|m| *m = false);
    let e = policy.infer(&blind, &noise, 2).unwrap_err().to_string();
    assert!(e.contains("shows the model nothing"), "{e}");
    // The split stages: vision over no camera gives no tokens, the prefix refuses.
    let emb = policy
        .vision
        .run(&blind.images.unit(), &blind.image_masks)
        .unwrap();
    assert_eq!((emb.real_images, emb.tokens.len()), (0, 0));
    let e = policy
        .prefix
        .run(&emb, &blind.tokens, &blind.token_mask)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("shows the model nothing"), "{e}");

    let mut no_cameras = obs.clone();
    no_cameras.image_masks.iter_mut().for_each(|m| *m = false);
    let mut no_prompt = obs.clone();
    no_prompt.token_mask.iter_mut().for_each(|m| *m = false);
    for o in [&no_cameras, &no_prompt] {
        let (a, _) = policy.infer(o, &noise, 2).unwrap();
        assert_eq!(a.len(), noise.len());
        assert!(a.iter().all(|v| v.is_finite()));
    }
}

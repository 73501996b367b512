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

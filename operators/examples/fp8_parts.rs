//! What each stage's FP8 costs: the actions of CHECKPOINT in f32, then with FP8 (the CPU
//! emulation of `--dtype fp8`) on some stages only, over N observations of SETTING (libero or
//! pi0; seeds 0..N), 10 steps. Each variant runs on a fresh load of the f32 model, so one
//! full-size model is in memory at a time.
//!
//! cargo run --release -p operators --example fp8_parts -- CHECKPOINT [N] [SETTING] [VARIANT..]
//!
//! VARIANTs (default: expert vision prefix prefix+expert all):
//!   expert          the action expert's weights (W8A16, as --dtype fp8)
//!   vision, prefix  that stage's weights and activations (W8A8, as --dtype fp8)
//!   vision-w, prefix-w   that stage's weights only (W8A16)
//!   prefix+expert   both, as --dtype fp8
//!   all             every stage: --dtype fp8
//!   all-w           every stage's weights only
//!
//! CHECKPOINT `random`: the setting's full-size model with random bf16 weights (seed 0),
//! written to a temporary directory: the weights `turbopi accuracy --setting SETTING`
//! compares on, so variant `all` gives that command's numbers.

use operators::accuracy::{actions_of, agreement, summarise};
use operators::bench::Setting;
use operators::checkpoint::Checkpoint;
use operators::policy::Policy;

const VARIANTS: &[&str] = &[
    "expert",
    "vision",
    "vision-w",
    "prefix",
    "prefix-w",
    "prefix+expert",
    "all",
    "all-w",
];

/// Quantises the stages `variant` names (one of [`VARIANTS`]).
fn apply(policy: &mut Policy, variant: &str) {
    match variant {
        "expert" => policy.denoise.quantise_fp8(),
        "vision" => policy.vision.quantise_fp8(),
        "vision-w" => policy.vision.quantise_fp8_weights(),
        "prefix" => policy.prefix.quantise_fp8(),
        "prefix-w" => policy.prefix.quantise_fp8_weights(),
        "prefix+expert" => {
            policy.prefix.quantise_fp8();
            policy.denoise.quantise_fp8();
        }
        "all" => policy.quantise_fp8(),
        "all-w" => {
            policy.vision.quantise_fp8_weights();
            policy.prefix.quantise_fp8_weights();
            policy.denoise.quantise_fp8();
        }
        _ => unreachable!("variants are checked against VARIANTS"),
    }
}

fn main() -> operators::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fp8_parts CHECKPOINT [N] [SETTING] [VARIANT..]";
    let bad = |what: String| operators::Error::Input(format!("{what}; {usage}"));
    let dir = args.next().ok_or_else(|| bad("no CHECKPOINT".into()))?;
    let n: u64 = match args.next() {
        Some(v) => v
            .parse()
            .map_err(|_| bad(format!("N `{v}` is not a count")))?,
        None => 6,
    };
    let setting: Setting = args.next().as_deref().unwrap_or("libero").parse()?;
    let mut variants: Vec<String> = args.collect();
    if variants.is_empty() {
        variants = ["expert", "vision", "prefix", "prefix+expert", "all"]
            .map(String::from)
            .to_vec();
    }
    if let Some(v) = variants.iter().find(|v| !VARIANTS.contains(&v.as_str())) {
        return Err(bad(format!(
            "unknown variant `{v}` (expected one of {VARIANTS:?})"
        )));
    }
    let scratch = tempfile::tempdir().map_err(|e| operators::Error::Input(e.to_string()))?;
    let path = if dir == "random" {
        operators::random::write_random_checkpoint(
            scratch.path(),
            &setting.config(),
            operators::checkpoint::WriteDtype::Bf16,
            0,
            |_, _| {},
        )?;
        scratch.path().to_path_buf()
    } else {
        std::path::PathBuf::from(&dir)
    };
    let ckpt = Checkpoint::open(&path)?;
    let obs: Vec<_> = (0..n)
        .map(|i| setting.observation(&ckpt.config, i))
        .collect();
    let reference = actions_of(&mut Policy::load(&ckpt, |_, _| {})?, &obs, 10)?;
    println!(
        "{dir}: {n} {} observations, 10 steps, FP8 against f32",
        setting.name()
    );
    for v in &variants {
        let mut policy = Policy::load(&ckpt, |_, _| {})?;
        apply(&mut policy, v);
        let got = actions_of(&mut policy, &obs, 10)?;
        drop(policy);
        let all = reference
            .iter()
            .zip(&got)
            .map(|(r, c)| agreement(r, c))
            .collect::<operators::Result<Vec<_>>>()?;
        let s = summarise(&all);
        println!(
            "{v:<16} worst cosine {:.7} (mean {:.7}), worst relative {:.3e} (mean {:.3e})",
            s.min_cosine, s.mean_cosine, s.max_relative, s.mean_relative
        );
    }
    Ok(())
}

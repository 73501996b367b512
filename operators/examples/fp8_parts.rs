//! What each stage's FP8 costs: the actions of CHECKPOINT in f32, then with only the action
//! expert, only the vision tower, and only the prefix in FP8 (the CPU emulation of
//! `--dtype fp8`), over N observations of SETTING (libero or pi0; seeds 0..N), 10 steps.
//! Loads the f32 model once and reloads only the small stages between runs, so a full-size
//! model fits in 24 GB.
//!
//! cargo run --release -p operators --example fp8_parts -- CHECKPOINT [N] [SETTING]
//!
//! CHECKPOINT `random`: the setting's full-size model with random bf16 weights (seed 0),
//! written to a temporary directory: the weights `turbopi accuracy --setting SETTING`
//! compares on, so the last line (all three stages) is that command's.

use operators::accuracy::{actions_of, agreement, summarise};
use operators::bench::Setting;
use operators::checkpoint::Checkpoint;
use operators::policy::{Denoiser, Policy, VisionEncoder};
use operators::weights::Loader;

fn main() -> operators::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: fp8_parts CHECKPOINT [N] [SETTING]");
    let n: u64 = args.next().map_or(6, |v| v.parse().expect("N: a count"));
    let setting: Setting = args.next().as_deref().unwrap_or("libero").parse()?;
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
    let mut policy = Policy::load(&ckpt, |_, _| {})?;
    let reference = actions_of(&mut policy, &obs, 10)?;
    let report = |what: &str, policy: &mut Policy| -> operators::Result<()> {
        let got = actions_of(policy, &obs, 10)?;
        let all = reference
            .iter()
            .zip(&got)
            .map(|(r, c)| agreement(r, c))
            .collect::<operators::Result<Vec<_>>>()?;
        let s = summarise(&all);
        println!(
            "{what:<28} worst cosine {:.7} (mean {:.7}), worst relative {:.3e} (mean {:.3e})",
            s.min_cosine, s.mean_cosine, s.max_relative, s.mean_relative
        );
        Ok(())
    };
    println!(
        "{dir}: {n} {} observations, 10 steps, FP8 against f32",
        setting.name()
    );
    policy.denoise.quantise_fp8();
    report("expert only (W8A16)", &mut policy)?;
    policy.denoise = Denoiser::load(&ckpt, &mut Loader::new(&ckpt, |_, _| {}))?;
    policy.vision.quantise_fp8();
    report("vision only (W8A8)", &mut policy)?;
    policy.vision = VisionEncoder::load(&ckpt, &mut Loader::new(&ckpt, |_, _| {}))?;
    policy.prefix.quantise_fp8();
    report("prefix only (W8A8)", &mut policy)?;
    policy.denoise.quantise_fp8();
    report("prefix and expert", &mut policy)?;
    policy.vision.quantise_fp8();
    report("all three (--dtype fp8)", &mut policy)?;
    Ok(())
}

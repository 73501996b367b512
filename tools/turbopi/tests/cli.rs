//! The `turbopi` binary end to end: the happy path on a small random checkpoint, and every
//! kind of bad input rejected with a non-zero exit and a message naming the problem.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use operators::checkpoint::{tensor_specs, write_safetensors, WriteDtype};
use operators::{npy, Config};

fn turbopi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(args)
        .output()
        .expect("the turbopi binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs `args`, asserts failure without a panic, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = turbopi(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {args:?}; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    stderr
}

fn random_checkpoint(dir: &Path, preset: &str) {
    let out = turbopi(&["checkpoint", "random", "--preset", preset, "--out", s(dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn random_checkpoint_then_infer_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi05-small");
    let out_file = tmp.path().join("actions.npy");
    let out = turbopi(&[
        "infer",
        "--checkpoint",
        s(&ck),
        "--observation",
        s(&ck.join("observation")),
        "--steps",
        "3",
        "--out",
        s(&out_file),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["vision", "prefix", "denoise", "total"] {
        assert!(stdout.contains(stage), "no {stage} time in: {stdout}");
    }
    let cfg = Config::pi05_small();
    let a = npy::read_f32(&out_file).unwrap();
    assert_eq!(a.shape, vec![cfg.action_horizon, cfg.action_dim]);
    assert!(a.data.iter().all(|v| v.is_finite()));
    let noise = npy::read_f32(&ck.join("observation/noise.npy")).unwrap();
    assert_ne!(a.data, noise.data, "the policy must move the noise");
}

#[test]
fn inspect_reports_parts_and_dtypes() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let out = turbopi(&[
        "checkpoint",
        "random",
        "--preset",
        "pi0-small",
        "--dtype",
        "bf16",
        "--out",
        s(&ck),
    ]);
    assert!(out.status.success());
    let out = turbopi(&["checkpoint", "inspect", s(&ck)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "vision (SigLIP)",
        "prefix (Gemma)",
        "action expert",
        "BF16",
        "valid: all",
    ] {
        assert!(
            stdout.contains(needle),
            "`{needle}` missing from:\n{stdout}"
        );
    }
    let expected: usize = tensor_specs(&Config::pi0_small())
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert!(
        stdout.contains(&expected.to_string()),
        "total {expected} missing:\n{stdout}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi0-small");
    let st = ck.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(&st, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    std::fs::write(&st, b"abc").unwrap();
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::remove_file(&st).unwrap();
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Writes a checkpoint for `cfg` whose tensor list is edited by `edit`.
fn write_edited(
    dir: &Path,
    cfg: &Config,
    edit: impl Fn(&mut Vec<(String, Vec<usize>, WriteDtype)>),
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty()).unwrap();
    let mut tensors: Vec<_> = tensor_specs(cfg)
        .into_iter()
        .map(|t| (t.key, t.shape, WriteDtype::F32))
        .collect();
    edit(&mut tensors);
    let shapes: Vec<usize> = tensors.iter().map(|t| t.1.iter().product()).collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        &BTreeMap::new(),
        |i, out| out.resize(shapes[i], 0.01),
    )
    .unwrap();
}

#[test]
fn missing_or_misshaped_tensor_names_the_key_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::pi05_small();
    let key = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight";
    let ck = tmp.path().join("missing");
    write_edited(&ck, &cfg, |t| t.retain(|(k, _, _)| k != key));
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(err.contains("missing tensor") && err.contains(key), "{err}");

    let ck = tmp.path().join("shape");
    write_edited(&ck, &cfg, |t| {
        for (k, shape, _) in t.iter_mut() {
            if k == key {
                *shape = vec![7, 5];
            }
        }
    });
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    let expected = format!("[{}, {}]", cfg.expert_mlp_dim, cfg.expert_width);
    assert!(
        err.contains(key) && err.contains("[7, 5]") && err.contains(&expected),
        "{err}"
    );

    // The alias of the tied embedding is accepted in place of lm_head.
    let ck = tmp.path().join("alias");
    write_edited(&ck, &cfg, |t| {
        for (k, _, _) in t.iter_mut() {
            if k == operators::checkpoint::EMBED {
                *k = operators::checkpoint::EMBED_ALIAS.to_string();
            }
        }
    });
    let out = turbopi(&["checkpoint", "inspect", s(&ck)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_config_field_is_named_and_unknown_fields_warn() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi0-small");
    let path = ck.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // A field of neither schema is a warning (openpi's `paligemma_variant` would switch the
    // file to openpi's schema, whose sizes then must agree).
    v.as_object_mut()
        .unwrap()
        .insert("precision".into(), "bfloat16".into());
    std::fs::write(&path, v.to_string()).unwrap();
    let out = turbopi(&["checkpoint", "inspect", s(&ck)]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("precision"),
        "{stderr}"
    );

    v.as_object_mut().unwrap().remove("rope_theta");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = fails(&["checkpoint", "inspect", s(&ck)]);
    assert!(
        err.contains("config.json") && err.contains("missing field `rope_theta`"),
        "{err}"
    );
}

#[test]
fn bad_observations_name_the_file_and_the_expectation() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi0-small");
    let cfg = Config::pi0_small();
    let out_file = tmp.path().join("a.npy");
    let run = |obs: &Path| {
        fails(&[
            "infer",
            "--checkpoint",
            s(&ck),
            "--observation",
            s(obs),
            "--out",
            s(&out_file),
        ])
    };
    let fresh = |name: &str| {
        let dir = tmp.path().join(name);
        operators::observation::write_sample(&dir, &cfg, 1).unwrap();
        dir
    };
    let n = cfg.num_images;

    let obs = fresh("dtype");
    npy::write_f32(
        &obs.join("images.npy"),
        &[n, 32, 32, 3],
        &vec![0.0; n * 32 * 32 * 3],
    )
    .unwrap();
    let err = run(&obs);
    assert!(
        err.contains("images.npy") && err.contains("uint8") && err.contains("float32"),
        "{err}"
    );

    let obs = fresh("shape");
    npy::write_u8(
        &obs.join("images.npy"),
        &[n - 1, 32, 32, 3],
        &vec![0; (n - 1) * 32 * 32 * 3],
    )
    .unwrap();
    let err = run(&obs);
    assert!(
        err.contains("images.npy") && err.contains(&format!("[{n}, H, W, 3]")),
        "{err}"
    );

    let obs = fresh("masks");
    npy::write_bool(&obs.join("image_masks.npy"), &[n + 1], &vec![true; n + 1]).unwrap();
    let err = run(&obs);
    assert!(
        err.contains("image_masks.npy") && err.contains(&format!("bool [{n}]")),
        "{err}"
    );

    let obs = fresh("tokens");
    npy::write_i32(
        &obs.join("tokens.npy"),
        &[3],
        &[1, 2, cfg.vocab_size as i32],
    )
    .unwrap();
    npy::write_bool(&obs.join("token_mask.npy"), &[3], &[true; 3]).unwrap();
    let err = run(&obs);
    assert!(
        err.contains("tokens.npy") && err.contains("token ids"),
        "{err}"
    );

    let obs = fresh("state");
    npy::write_f32(
        &obs.join("state.npy"),
        &[cfg.action_dim + 1],
        &vec![0.0; cfg.action_dim + 1],
    )
    .unwrap();
    let err = run(&obs);
    assert!(
        err.contains("state.npy") && err.contains(&format!("float32 [{}]", cfg.action_dim)),
        "{err}"
    );

    let obs = fresh("nostate");
    std::fs::remove_file(obs.join("state.npy")).unwrap();
    let err = run(&obs);
    assert!(
        err.contains("state.npy") && err.contains("pi0 needs"),
        "{err}"
    );

    let obs = fresh("noise");
    npy::write_f32(&obs.join("noise.npy"), &[2, 2], &[0.0; 4]).unwrap();
    let err = run(&obs);
    assert!(
        err.contains("noise.npy") && err.contains("float32 ["),
        "{err}"
    );

    let obs = fresh("garbage");
    std::fs::write(obs.join("token_mask.npy"), b"not an npy file").unwrap();
    let err = run(&obs);
    assert!(err.contains("token_mask.npy"), "{err}");
}

#[test]
fn unknown_preset_and_zero_steps_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&[
        "checkpoint",
        "random",
        "--preset",
        "pi7",
        "--out",
        s(tmp.path()),
    ]);
    assert!(
        err.contains("unknown preset `pi7`") && err.contains("pi05-small"),
        "{err}"
    );
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi05-small");
    let err = fails(&[
        "infer",
        "--checkpoint",
        s(&ck),
        "--observation",
        s(&ck.join("observation")),
        "--steps",
        "0",
        "--out",
        s(&tmp.path().join("a.npy")),
    ]);
    assert!(err.contains("--steps"), "{err}");
}

/// `infer --openpi`: a LIBERO observation in openpi's wire format through the server's
/// transforms; bad files and settings are named.
#[test]
fn infer_openpi_observation_and_its_errors() {
    use operators::openpi::msgpack::Out;
    use operators::openpi::tokenizer::tiny_tokenizer_json;
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    random_checkpoint(&ck, "pi0-small");
    let obs = dir.path().join("obs.msgpack");
    let img = |seed: usize| Out::NdArray {
        dtype: "|u1",
        shape: vec![40, 48, 3],
        data: (0..40 * 48 * 3).map(|i| ((i + seed) % 256) as u8).collect(),
    };
    let msg = Out::Map(vec![
        ("observation/image".into(), img(1)),
        ("observation/wrist_image".into(), img(2)),
        (
            "observation/state".into(),
            Out::f64_array(vec![8], &[0.25; 8]),
        ),
        ("prompt".into(), Out::Str("open the drawer".into())),
    ]);
    std::fs::write(&obs, msg.encode()).unwrap();
    let out = dir.path().join("a.npy");
    let base = ["infer", "--checkpoint", s(&ck), "--openpi", s(&obs)];
    let args = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .map(|a| a.to_string())
            .chain(["--out".to_string(), s(&out).to_string()])
            .collect()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        fails(&a)
    };
    let e = run(args(&[]));
    assert!(e.contains("--openpi needs --robot"), "{e}");
    // Norm stats at CHECKPOINT/assets/droid/norm_stats.json by default.
    let e = run(args(&["--robot", "droid"]));
    assert!(e.contains("assets/droid/norm_stats.json"), "{e}");
    let e = run(args(&["--robot", "libero", "--norm-stats", "none"]));
    assert!(
        e.contains("tokenizer"),
        "no tokenizer for a text prompt: {e}"
    );
    std::fs::write(ck.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let a = args(&["--robot", "libero", "--norm-stats", "none"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let ok = turbopi(&a);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let actions = npy::read_f64(&out).unwrap();
    assert_eq!(actions.shape, vec![10, 7]);
    assert!(actions.data.iter().all(|v| v.is_finite()));
    std::fs::write(&obs, [0xc1u8, 0]).unwrap();
    let e = run(args(&["--robot", "libero", "--norm-stats", "none"]));
    assert!(e.contains("malformed msgpack at byte 0"), "{e}");
}

#[test]
fn kernels_compile_checks_its_arguments() {
    // clap rejects a malformed architecture or dtype (exit 2) before anything is compiled.
    for (flag, value, why) in [
        ("--arch", "sm_90,sm_9x", "sm_<major><minor>"),
        ("--arch", "90", "sm_<major><minor>"),
        ("--dtype", "f16", "expected `f32`, `bf16` or `fp8`"),
        ("--dtype", "fp8", "the bf16 program's"),
    ] {
        let mut args = vec!["kernels", "compile", "--arch", "sm_90"];
        if flag == "--arch" {
            args[3] = value;
        } else {
            args.extend([flag, value]);
        }
        let out = turbopi(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    let out = turbopi(&["kernels", "compile"]);
    assert_eq!(out.status.code(), Some(2), "--arch is required");
}

#[test]
fn kernels_compile_reports_per_arch_and_dtype_or_says_what_is_missing() {
    let out = turbopi(&["kernels", "compile", "--arch", "sm_87", "--dtype", "bf16"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !cfg!(feature = "cuda") {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("CUDA support is not built in"), "{stderr}");
    } else if out.status.success() {
        // NVRTC is installed (a GPU machine): one line, with the cubin's size.
        assert!(
            stdout.starts_with("sm_87   bf16  ok      cubin "),
            "{stdout}"
        );
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(stderr.contains("NVRTC not found"), "{stdout}{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `turbopi accuracy` on one checkpoint: fp8 (emulated) against f32 over three
/// observations, a table line per observation and the fp8 bar's verdict; f32 against itself
/// is exact; a precision the backend lacks is named.
#[test]
fn accuracy_compares_two_precisions_chunk_by_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi05-small");
    let run = |extra: &[&str]| {
        let mut args = vec!["accuracy", "--checkpoint", s(&ck), "--observations", "3"];
        args.extend(extra);
        let out = turbopi(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let fp8 = run(&[]);
    assert!(fp8.contains("cpu fp8 (emulated) against cpu f32"), "{fp8}");
    let rows: Vec<&str> = fp8
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 3, "{fp8}");
    // Columns: obs, cosine, max |diff|, max |ref|, relative. FP8 moves every chunk a little.
    for row in &rows {
        let cols: Vec<f64> = row.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert!(cols[1] > 0.99 && cols[1] < 1.0, "{row}");
        assert!(cols[2] > 0.0, "{row}");
    }
    assert!(
        fp8.contains("fp8 bar (cosine >= 0.999, relative <= 5e-2):"),
        "{fp8}"
    );

    let same = run(&["--dtype", "f32"]);
    assert!(same.contains("worst: cosine 1.0000000"), "{same}");
    assert!(same.contains("relative 0.000e0 "), "{same}");
    assert!(!same.contains("fp8 bar"), "{same}");

    // Refused before either side runs: no random weights written, nothing loaded.
    let err = fails(&["accuracy", "--checkpoint", s(&ck), "--dtype", "bf16"]);
    assert!(err.contains("the precision under test (--dtype)"), "{err}");
    assert!(err.contains("bf16 runs on cuda"), "{err}");
    assert!(
        !err.contains("reference:"),
        "the reference ran first: {err}"
    );
    let err = fails(&["accuracy", "--checkpoint", s(&ck), "--against", "fp4"]);
    assert!(err.contains("unknown dtype `fp4`"), "{err}");

    // `infer --dtype fp8` on the cpu says what ran.
    let out = turbopi(&[
        "infer",
        "--checkpoint",
        s(&ck),
        "--observation",
        s(&ck.join("observation")),
        "--steps",
        "2",
        "--dtype",
        "fp8",
        "--out",
        s(&tmp.path().join("a.npy")),
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cpu fp8 (emulated)"), "{text}");
}

/// `TURBOPI_FP8_STAGES` narrows `--dtype fp8` to some stages; the output says which, and a
/// bad list is refused with the variable and value named.
#[test]
fn fp8_stages_narrow_the_emulation_and_bad_lists_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    random_checkpoint(&ck, "pi05-small");
    let run = |stages: &str| {
        Command::new(env!("CARGO_BIN_EXE_turbopi"))
            .args(["accuracy", "--checkpoint", s(&ck), "--observations", "2"])
            .env("TURBOPI_FP8_STAGES", stages)
            .output()
            .expect("the turbopi binary runs")
    };
    let out = run("expert");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("cpu fp8 (emulated; expert only) against cpu f32"),
        "{text}"
    );
    let out = run("vision,gemma");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("TURBOPI_FP8_STAGES=\"vision,gemma\"")
            && err.contains("unknown stage `gemma`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

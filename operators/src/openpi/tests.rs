//! The robot transforms on observations encoded as openpi-client encodes them.

use super::msgpack::{decode, Limits, Out};
use super::tokenizer::tiny_tokenizer_json;
use super::*;

fn u8_image(h: usize, w: usize, seed: usize) -> Out {
    Out::NdArray {
        dtype: "|u1",
        shape: vec![h, w, 3],
        data: (0..h * w * 3)
            .map(|i| ((i * 7 + seed * 31) % 256) as u8)
            .collect(),
    }
}

fn f64_vec(v: &[f64]) -> Out {
    Out::f64_array(vec![v.len()], v)
}

struct Fixture {
    _dir: tempfile::TempDir,
    cfg: Config,
    stats: PathBuf,
    tokenizer: PathBuf,
}

const STATS: &str = r#"{"norm_stats": {
    "state": {"mean": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
              "std": [1, 2, 1, 2, 1, 2, 1, 2],
              "q01": [-1, -1, -1, -1, -1, -1, -1, -1], "q99": [1, 2, 1, 2, 1, 2, 1, 2]},
    "actions": {"mean": [0, 0, 0, 0, 0, 0, 0, 1], "std": [1, 1, 1, 1, 1, 1, 1, 3],
                "q01": [-2, -2, -2, -2, -2, -2, -2, 0], "q99": [2, 2, 2, 2, 2, 2, 2, 1]}}}"#;

fn fixture(pi05: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("norm_stats.json");
    std::fs::write(&stats, STATS).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, tiny_tokenizer_json()).unwrap();
    let cfg = if pi05 {
        Config::pi05_small()
    } else {
        Config::pi0_small()
    };
    Fixture {
        _dir: dir,
        cfg,
        stats,
        tokenizer,
    }
}

fn transforms(f: &Fixture, robot: Robot) -> Transforms {
    let mut s = Settings::new(robot, &f.cfg);
    s.norm_stats = Some(f.stats.clone());
    s.tokenizer = Some(f.tokenizer.clone());
    Transforms::new(s, &f.cfg).unwrap()
}

fn libero_obs(extra: Vec<(&str, Out)>, skip: &str) -> Vec<u8> {
    let mut m: Vec<(String, Out)> = vec![
        ("observation/image".into(), u8_image(32, 32, 1)),
        ("observation/wrist_image".into(), u8_image(48, 40, 2)),
        (
            "observation/state".into(),
            f64_vec(&[0.5, -0.5, 0.25, 0.0, 1.0, 2.0, -1.0, 0.1]),
        ),
        ("prompt".into(), Out::Str("pick up the cup".into())),
    ];
    m.retain(|(k, _)| k != skip);
    m.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    Out::Map(m).encode()
}

#[test]
fn libero_pi0_inputs_follow_openpi() {
    let f = fixture(false);
    let t = transforms(&f, Robot::Libero);
    let bytes = libero_obs(vec![], "");
    let obs = decode(&bytes, Limits::default()).unwrap();
    let (inp, ctx) = t.inputs(&obs).unwrap();
    let s = f.cfg.image_size;
    assert_eq!(inp.images.len(), 3 * s * s * 3);
    assert_eq!(inp.image_masks, vec![true, true, false]);
    // The 32x32 base image is already the model's size: unchanged.
    let Out::NdArray { data, .. } = u8_image(32, 32, 1) else {
        panic!()
    };
    assert_eq!(&inp.images[..s * s * 3], &data[..]);
    // The 48x40 wrist image is resized with padding by Pillow's rules.
    let Out::NdArray { data: wrist, .. } = u8_image(48, 40, 2) else {
        panic!()
    };
    let want = resize::resize_with_pad(&wrist, 48, 40, s).unwrap();
    assert_eq!(&inp.images[s * s * 3..2 * s * s * 3], &want[..]);
    assert!(inp.images[2 * s * s * 3..].iter().all(|&v| v == 0));
    // pi0: z-score state, padded to action_dim 8 (8 state dims here).
    let want0 = ((0.5 - 0.1) / (1.0 + 1e-6)) as f32;
    assert_eq!(inp.state[0], want0);
    assert_eq!(inp.state.len(), f.cfg.action_dim);
    // pi0 prompt: <bos> text "\n", padded to max_token_len.
    let tok = tokenizer::PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
    let want = tok
        .tokenize("pick up the cup", None, f.cfg.max_token_len)
        .unwrap();
    assert_eq!(inp.tokens, want.ids);
    assert_eq!(inp.token_mask, want.mask);
    assert_eq!(inp.tokens.len(), f.cfg.max_token_len);

    // Outputs: z-score un-normalisation, the first 7 dims.
    let h = f.cfg.action_horizon;
    let model: Vec<f32> = (0..h * 8).map(|i| (i as f32 - 40.0) / 17.0).collect();
    let out = t.outputs(&model, &ctx).unwrap();
    assert_eq!(out.len(), h * 7);
    assert_eq!(out[0], model[0] as f64 * (1.0 + 1e-6));
    assert_eq!(
        out[7],
        model[8] as f64 * (1.0 + 1e-6),
        "row 1 starts at model row 1"
    );
    assert_eq!(t.action_shape(), [h, 7]);
}

#[test]
fn pi05_uses_quantiles_and_the_discrete_state_prompt() {
    let f = fixture(true);
    let t = transforms(&f, Robot::Libero);
    let bytes = libero_obs(vec![], "");
    let obs = decode(&bytes, Limits::default()).unwrap();
    let (inp, ctx) = t.inputs(&obs).unwrap();
    let raw = [0.5, -0.5, 0.25, 0.0, 1.0, 2.0, -1.0, 0.1];
    let q99 = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0];
    let norm: Vec<f64> = raw
        .iter()
        .zip(q99)
        .map(|(x, hi)| (x - -1.0) / (hi - -1.0 + 1e-6) * 2.0 - 1.0)
        .collect();
    assert_eq!(inp.state[1], norm[1] as f32);
    let tok = tokenizer::PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
    // The small preset's 16 tokens cut the discrete-state prompt.
    let want = tok.tokenize("pick up the cup", Some(&norm), 16).unwrap();
    assert_eq!(inp.tokens, want.ids);
    assert!(inp.truncated_prompt);
    // Without discrete state: the pi0 format.
    let mut s = Settings::new(Robot::Libero, &f.cfg);
    s.norm_stats = Some(f.stats.clone());
    s.tokenizer = Some(f.tokenizer.clone());
    s.discrete_state = false;
    let plain = Transforms::new(s, &f.cfg).unwrap();
    let (inp2, _) = plain.inputs(&obs).unwrap();
    assert_eq!(
        inp2.tokens,
        tok.tokenize("pick up the cup", None, 16).unwrap().ids
    );
    // Quantile un-normalisation; dim 7 has q01 0, q99 1.
    let h = f.cfg.action_horizon;
    let model: Vec<f32> = (0..h * 8).map(|i| ((i % 8) as f32 - 3.5) / 4.0).collect();
    let out = t.outputs(&model, &ctx).unwrap();
    let x = model[0] as f64;
    assert_eq!(out[0], (x + 1.0) / 2.0 * (4.0 + 1e-6) - 2.0);
}

#[test]
fn droid_concatenates_joints_and_a_scalar_gripper() {
    let f = fixture(false);
    let t = transforms(&f, Robot::Droid);
    let gripper = Out::Map(vec![
        ("__npgeneric__".into(), Out::Bool(true)),
        ("data".into(), Out::Float(0.75)),
        ("dtype".into(), Out::Str("<f8".into())),
    ]);
    let obs = |g: Out| {
        Out::Map(vec![
            (
                "observation/exterior_image_1_left".into(),
                u8_image(32, 32, 3),
            ),
            ("observation/wrist_image_left".into(), u8_image(32, 32, 4)),
            (
                "observation/joint_position".into(),
                f64_vec(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
            ),
            ("observation/gripper_position".into(), g),
            ("prompt".into(), Out::Str("open the drawer".into())),
        ])
        .encode()
    };
    let a = obs(gripper);
    let b = obs(f64_vec(&[0.75]));
    let (ia, ctx) = t.inputs(&decode(&a, Limits::default()).unwrap()).unwrap();
    let (ib, _) = t.inputs(&decode(&b, Limits::default()).unwrap()).unwrap();
    assert_eq!(
        ia, ib,
        "scalar and [1] gripper positions are the same state"
    );
    assert_eq!(ia.state[7], ((0.75 - 0.8) / (2.0 + 1e-6)) as f32);
    let h = f.cfg.action_horizon;
    let out = t.outputs(&vec![0.5; h * 8], &ctx).unwrap();
    assert_eq!(out.len(), h * 8);
    assert_eq!(out[7], 0.5 * (3.0 + 1e-6) + 1.0);
}

#[test]
fn aloha_cameras_state_deltas_and_outputs() {
    let mut cfg = Config::pi0_small();
    cfg.action_dim = 16;
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, tiny_tokenizer_json()).unwrap();
    let mut s = Settings::new(Robot::Aloha, &cfg);
    s.tokenizer = Some(tokenizer);
    assert_eq!(s.delta_mask.as_ref().map(Vec::len), Some(14));
    let t = Transforms::new(s, &cfg).unwrap();
    let chw = |seed: usize| Out::NdArray {
        dtype: "|u1",
        shape: vec![3, 32, 32],
        data: (0..3 * 32 * 32).map(|i| ((i + seed) % 251) as u8).collect(),
    };
    let state: Vec<f64> = (0..14).map(|i| 0.02 + i as f64 * 0.002).collect();
    let obs = Out::Map(vec![
        (
            "images".into(),
            Out::Map(vec![
                ("cam_high".into(), chw(0)),
                ("cam_right_wrist".into(), chw(5)),
            ]),
        ),
        ("state".into(), f64_vec(&state)),
        ("prompt".into(), Out::Str("fold".into())),
    ])
    .encode();
    let (inp, ctx) = t.inputs(&decode(&obs, Limits::default()).unwrap()).unwrap();
    assert_eq!(
        inp.image_masks,
        vec![true, false, true],
        "left wrist missing"
    );
    // CHW -> HWC: pixel (0, 0) of cam_high is channels 0, 1024, 2048 of the CHW data.
    assert_eq!(
        &inp.images[..3],
        &[0, (1024 % 251) as u8, (2048 % 251) as u8]
    );
    // Joint 1 flips sign; the gripper (6) goes to pi's angular space.
    assert_eq!(inp.state[1], -state[1] as f32);
    let g = aloha::decode_state(&state)[6];
    assert!(g.is_finite() && g != state[6]);
    // Zero actions: joints become the state (delta -> absolute), flipped back; grippers
    // (absolute) come from the zero prediction.
    let h = cfg.action_horizon;
    let out = t.outputs(&vec![0.0; h * 16], &ctx).unwrap();
    assert_eq!(out.len(), h * 14);
    let gripper = (0.5476 - -0.6213) / (1.4910 - -0.6213);
    for row in out.chunks_exact(14) {
        for d in 0..14 {
            let want = if d == 6 || d == 13 { gripper } else { state[d] };
            assert_eq!(row[d], want, "dim {d}");
        }
    }
    let bad = Out::Map(vec![(
        "images".into(),
        Out::Map(vec![("cam_top".into(), chw(0))]),
    )])
    .encode();
    let e = t
        .inputs(&decode(&bad, Limits::default()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown camera `cam_top`"), "{e}");
}

#[test]
fn bad_observations_are_named() {
    let f = fixture(false);
    let t = transforms(&f, Robot::Libero);
    let err = |bytes: Vec<u8>| {
        t.inputs(&decode(&bytes, Limits::default()).unwrap())
            .unwrap_err()
            .to_string()
    };
    let e = err(libero_obs(vec![], "observation/wrist_image"));
    assert!(e.contains("missing key `observation/wrist_image`"), "{e}");
    let e = err(libero_obs(vec![], "prompt"));
    assert!(e.contains("missing key `prompt`"), "{e}");
    let e = err(libero_obs(
        vec![(
            "observation/image",
            Out::NdArray {
                dtype: "<i4",
                shape: vec![32, 32, 3],
                data: vec![0; 32 * 32 * 3 * 4],
            },
        )],
        "observation/image",
    ));
    assert!(
        e.contains("`observation/image`") && e.contains("<i4"),
        "{e}"
    );
    let e = err(libero_obs(
        vec![("observation/state", f64_vec(&[f64::NAN; 8]))],
        "observation/state",
    ));
    assert!(e.contains("non-finite"), "{e}");
    let e = err(libero_obs(
        vec![("observation/state", f64_vec(&[0.0; 9]))],
        "observation/state",
    ));
    assert!(e.contains("9 dims"), "{e}");
    let e = err(Out::Array(vec![]).encode());
    assert!(e.contains("expected the observation as a map"), "{e}");
    let e = err(libero_obs(
        vec![("tokenized_prompt", Out::Array(vec![Out::Int(2)]))],
        "",
    ));
    assert!(e.contains("not both"), "{e}");
    let e = err(libero_obs(
        vec![(
            "tokenized_prompt",
            Out::Array(vec![Out::Int(2), Out::Int(999)]),
        )],
        "prompt",
    ));
    assert!(e.contains("token id 999"), "{e}");
}

#[test]
fn pretokenized_prompts_and_default_prompt() {
    let f = fixture(false);
    let t = transforms(&f, Robot::Libero);
    let bytes = libero_obs(
        vec![
            (
                "tokenized_prompt",
                Out::NdArray {
                    dtype: "<i8",
                    shape: vec![3],
                    data: [2i64, 40, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
            (
                "tokenized_prompt_mask",
                Out::Array(vec![Out::Bool(true), Out::Bool(true), Out::Bool(false)]),
            ),
        ],
        "prompt",
    );
    let (inp, _) = t
        .inputs(&decode(&bytes, Limits::default()).unwrap())
        .unwrap();
    assert_eq!(&inp.tokens[..4], &[2, 40, 7, 0]);
    assert_eq!(&inp.token_mask[..4], &[true, true, false, false]);
    let mut s = Settings::new(Robot::Libero, &f.cfg);
    s.default_prompt = Some("stack".into());
    s.tokenizer = Some(f.tokenizer.clone());
    let d = Transforms::new(s, &f.cfg).unwrap();
    let bytes = libero_obs(vec![], "prompt");
    let (inp, _) = d
        .inputs(&decode(&bytes, Limits::default()).unwrap())
        .unwrap();
    let tok = tokenizer::PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
    assert_eq!(inp.tokens, tok.tokenize("stack", None, 16).unwrap().ids);
    // No tokenizer: text prompts are refused with the alternative named.
    let s = Settings::new(Robot::Libero, &f.cfg);
    let none = Transforms::new(s, &f.cfg).unwrap();
    let bytes = libero_obs(vec![], "");
    let e = none
        .inputs(&decode(&bytes, Limits::default()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenized_prompt"), "{e}");
}

#[test]
fn settings_are_checked_against_the_model() {
    let cfg = Config::pi0_small();
    let s = Settings::new(Robot::Aloha, &cfg);
    let e = Transforms::new(s, &cfg).err().unwrap().to_string();
    assert!(e.contains("14 dims") && e.contains("action_dim 8"), "{e}");
    assert_eq!(
        parse_delta_mask("6,-1").unwrap(),
        Some(vec![true, true, true, true, true, true, false])
    );
    assert_eq!(parse_delta_mask("none").unwrap(), None);
    assert!(parse_delta_mask("6;1").is_err());
    assert_eq!("droid".parse::<Robot>(), Ok(Robot::Droid));
    assert!("franka".parse::<Robot>().is_err());
}

/// openpi-client packs numpy scalars (`np.float32(0.1)`, `np.int64(2)`, `np.bool_(True)`) as
/// `__npgeneric__` maps: a state given as a list of them is the state of the same numbers as
/// an array. The bytes come from openpi-client's own packer
/// (tests/fixtures/openpi/np_scalars.py).
#[test]
fn lists_of_numpy_scalars_from_openpi_client_are_numbers() {
    let packed = include_bytes!("../../tests/fixtures/openpi/np_scalars.msgpack");
    let cases = decode(packed, Limits::default()).unwrap();
    let Value::Map(cases) = cases else {
        panic!("the fixture is a map of case name to [scalars, arrays]")
    };
    assert_eq!(cases.len(), 6);
    let f = fixture(false);
    let mut aloha_cfg = f.cfg.clone();
    aloha_cfg.action_dim = 16;
    for (name, pair) in &cases {
        let name = name.key_str().unwrap();
        let Value::Array(pair) = pair else {
            panic!("{name}")
        };
        let [Value::Bin(scalars), Value::Bin(arrays)] = &pair[..] else {
            panic!("{name}")
        };
        let (robot, cfg) = match name {
            "libero" | "tokenized" | "libero_nested" => (Robot::Libero, &f.cfg),
            "droid" | "droid_scalar_gripper" => (Robot::Droid, &f.cfg),
            "aloha" => (Robot::Aloha, &aloha_cfg),
            other => panic!("unknown case {other}"),
        };
        let mut s = Settings::new(robot, cfg);
        s.norm_stats = (robot != Robot::Aloha).then(|| f.stats.clone());
        s.tokenizer = Some(f.tokenizer.clone());
        let t = Transforms::new(s, cfg).unwrap();
        let scalars = decode(scalars, Limits::default()).unwrap();
        let arrays = decode(arrays, Limits::default()).unwrap();
        // The scalars really are __npgeneric__ maps in a list.
        let key = match robot {
            Robot::Libero if name == "tokenized" => "tokenized_prompt",
            Robot::Libero => "observation/state",
            Robot::Droid => "observation/joint_position",
            Robot::Aloha => "state",
        };
        let Some(Value::Array(items)) = scalars.get(key) else {
            panic!("{name}: `{key}` is not a list")
        };
        let first = if name == "libero_nested" {
            let Value::Array(inner) = &items[0] else {
                panic!("{name}")
            };
            &inner[0]
        } else {
            &items[0]
        };
        assert!(first.get("__npgeneric__").is_some(), "{name}: {first:?}");
        if name == "libero_nested" {
            // [[x], [y], ...] is [8, 1], not a vector: refused like the [8, 1] array.
            let e = t.inputs(&scalars).unwrap_err().to_string();
            assert!(e.contains("found shape [8, 1]"), "{name}: {e}");
            assert_eq!(e, t.inputs(&arrays).unwrap_err().to_string());
            continue;
        }
        let (a, _) = t.inputs(&scalars).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (b, _) = t.inputs(&arrays).unwrap();
        assert_eq!(a, b, "{name}");
        if name == "libero" {
            // np.float32(0.5) normalised with mean 0.1, std 1.
            assert_eq!(a.state[0], ((0.5f32 as f64 - 0.1) / (1.0 + 1e-6)) as f32);
        }
        if name == "tokenized" {
            assert_eq!(&a.tokens[..4], &[2, 40, 7, 0]);
            assert_eq!(&a.token_mask[..3], &[true, true, false]);
        }
    }
}

#[test]
fn numpy_scalars_as_raw_bytes_and_mixed_lists() {
    let np = |data: Out, dtype: &str| {
        Out::Map(vec![
            ("__npgeneric__".into(), Out::Bool(true)),
            ("data".into(), data),
            ("dtype".into(), Out::Str(dtype.into())),
        ])
    };
    let list = Out::Array(vec![
        np(Out::Float(0.5), "<f4"),
        Out::Int(2),
        np(Out::Bool(true), "|b1"),
        Out::Float(-1.25),
    ]);
    let v = list.encode();
    let v = decode(&v, Limits::default()).unwrap();
    assert_eq!(
        ndarray::numbers(&v, "s").unwrap(),
        (vec![4], vec![0.5, 2.0, 1.0, -1.25])
    );
    // `data` as the scalar's little-endian bytes (Out has no bin variant: by hand).
    let raw = |data: &[u8], dtype: &str| {
        let mut m = vec![0x83, 0xad];
        m.extend(b"__npgeneric__");
        m.extend([0xc3, 0xa4]);
        m.extend(b"data");
        m.extend([0xc4, data.len() as u8]);
        m.extend(data);
        m.push(0xa5);
        m.extend(b"dtype");
        m.push(0xa0 | dtype.len() as u8);
        m.extend(dtype.as_bytes());
        m
    };
    let v = raw(&1.5f32.to_le_bytes(), "<f4");
    let v = decode(&v, Limits::default()).unwrap();
    assert_eq!(ndarray::numbers(&v, "g").unwrap(), (vec![], vec![1.5]));
    let v = raw(&[0xff, 0xfe], ">i2");
    let v = decode(&v, Limits::default()).unwrap();
    assert_eq!(ndarray::numbers(&v, "g").unwrap(), (vec![], vec![-2.0]));
    // 2 bytes for a <f4, and a text dtype: refused, naming the key.
    let v = raw(&[0, 0], "<f4");
    let v = decode(&v, Limits::default()).unwrap();
    let e = ndarray::numbers(&v, "observation/state")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`observation/state`") && e.contains("needs 4 bytes"),
        "{e}"
    );
    let v = raw(b"ab", "|S2");
    let v = decode(&v, Limits::default()).unwrap();
    let e = ndarray::numbers(&v, "x").unwrap_err().to_string();
    assert!(e.contains("dtype `|S2`"), "{e}");
    // Items of different shapes.
    let ragged = Out::Array(vec![Out::Int(1), Out::Array(vec![Out::Int(2)])]).encode();
    let v = decode(&ragged, Limits::default()).unwrap();
    let e = ndarray::numbers(&v, "x").unwrap_err().to_string();
    assert!(e.contains("different shapes ([] and [1])"), "{e}");
    // A text scalar is not a number.
    let v = np(Out::Str("abc".into()), "<U3").encode();
    let v = decode(&v, Limits::default()).unwrap();
    let e = ndarray::numbers(&v, "x").unwrap_err().to_string();
    assert!(e.contains("expected a number, found a string"), "{e}");
}

/// A prompt over MAX_PROMPT_BYTES is refused before the tokenizer sees any of it; one at the
/// limit (surrounded by whitespace that openpi strips) is tokenized whole.
#[test]
fn huge_prompts_are_refused_before_tokenizing() {
    use tokenizer::{LONGEST_ENCODED, MAX_PROMPT_BYTES};
    let f = fixture(false);
    let t = transforms(&f, Robot::Libero);
    let huge = "pick up the cup ".repeat((1 << 20) / 16);
    LONGEST_ENCODED.with(|l| l.set(0));
    let bytes = libero_obs(vec![("prompt", Out::Str(huge))], "prompt");
    let e = t
        .inputs(&decode(&bytes, Limits::default()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`prompt`") && e.contains(&format!("more than the {MAX_PROMPT_BYTES}")),
        "{e}"
    );
    assert_eq!(
        LONGEST_ENCODED.with(|l| l.get()),
        0,
        "nothing was tokenized"
    );

    // At the limit after stripping: accepted, tokenized whole, truncated to max_token_len.
    let body: String = "pick up_the cup\n"
        .repeat(MAX_PROMPT_BYTES / 16)
        .trim()
        .to_string()
        + &"x".repeat(MAX_PROMPT_BYTES - (MAX_PROMPT_BYTES / 16 * 16 - 1));
    assert_eq!(body.len(), MAX_PROMPT_BYTES);
    let padded = format!("{}{body}{}", " \n".repeat(1 << 18), "\t".repeat(1 << 18));
    let bytes = libero_obs(vec![("prompt", Out::Str(padded))], "prompt");
    let (inp, _) = t
        .inputs(&decode(&bytes, Limits::default()).unwrap())
        .unwrap();
    assert!(LONGEST_ENCODED.with(|l| l.get()) <= MAX_PROMPT_BYTES);
    let tok = tokenizer::PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
    let want = tok.tokenize(&body, None, f.cfg.max_token_len).unwrap();
    assert_eq!(inp.tokens, want.ids);
    assert!(inp.truncated_prompt);
    // One byte more is refused.
    let e = tok
        .tokenize(&(body + "y"), None, f.cfg.max_token_len)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{} bytes", MAX_PROMPT_BYTES + 1)),
        "{e}"
    );
}

/// A finite state that overflows float32 (after normalisation) is refused, not sent to the
/// model as infinity (found by tests/fuzz_msgpack.rs).
#[test]
fn states_beyond_float32_are_refused() {
    let f = fixture(false);
    let t = transforms(&f, Robot::Libero);
    for big in [1e39, -1e300] {
        let bytes = libero_obs(
            vec![(
                "observation/state",
                f64_vec(&[0.0, 0.0, 0.0, big, 0.0, 0.0, 0.0, 0.0]),
            )],
            "observation/state",
        );
        let e = t
            .inputs(&decode(&bytes, Limits::default()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("index 3") && e.contains("float32"), "{e}");
    }
}

//! Fuzzing of the readers of a checkpoint and an observation: `.npy` arrays (alone and in an
//! observation directory), `model.safetensors` headers and `config.json`. Seeded mutation
//! loops (see fuzz_support/mod.rs): every case must end in a valid result or an error that
//! names the file, without a panic, and within a bounded heap. A config the checks accept
//! is also run: a random checkpoint of it is written, loaded and run for one step.
//!
//! `TURBOPI_FUZZ_CASES=N` runs N cases per target, `TURBOPI_FUZZ_SEED=S` another seed;
//! `cargo test --release -p operators --test fuzz -- --nocapture` prints the counts.

mod fuzz_support;

use std::path::{Path, PathBuf};

use fuzz_support::{mutate_bytes, run, CountingAlloc, Outcome, Rng};
use operators::checkpoint::{tensor_specs, Checkpoint, WriteDtype, EMBED_ALIAS};
use operators::config::{MAX_ACTIVATION_BYTES, MAX_PARAMETERS, PRESETS};
use operators::random::write_random_checkpoint;
use operators::{npy, Config, Observation, Policy};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Bytes that mean something to the header parsers.
const PY_TOKENS: &[&[u8]] = &[
    b"(",
    b")",
    b"[",
    b"]",
    b"{",
    b"}",
    b"'",
    b"\"",
    b",",
    b":",
    b" ",
    b"L",
    b"True",
    b"False",
    b"None",
    b"'descr'",
    b"'shape'",
    b"'fortran_order'",
    b"18446744073709551616",
    b"-1",
    b"99999999999999999999999",
    b"\\",
    b"\xe9",
    b"\x00",
];

/// A header dict from parts, each possibly odd.
fn npy_header(rng: &mut Rng, shape: &[u64], descr: &str) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| {
            if rng.one_in(20) {
                format!("{d}L")
            } else {
                d.to_string()
            }
        })
        .collect();
    let mut shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    match rng.below(30) {
        0 => shape_text = format!("[{}]", dims.join(", ")),
        1 => shape_text = format!("({shape_text},)"),
        2 => shape_text = format!("{}{}", "(".repeat(20_000), ")".repeat(rng.below(3))),
        3 => shape_text = format!("({})", "(".repeat(1 + rng.below(40))),
        4 => shape_text = "None".into(),
        _ => {}
    }
    let fortran = if rng.one_in(8) {
        *rng.pick(&["True", "0", "None", "'x'"])
    } else {
        "False"
    };
    let mut entries = vec![
        format!("'descr': '{descr}'"),
        format!("'fortran_order': {fortran}"),
        format!("'shape': {shape_text}"),
    ];
    match rng.below(12) {
        0 => {
            let i = rng.below(entries.len());
            entries.remove(i);
        }
        1 => {
            let e = rng.pick(&entries).clone();
            entries.push(e);
        }
        2 => entries.push("'extra': 1".into()),
        3 => entries[0] = "'descr': [('a', '<f4'), ('b', [('c', '|u1')])]".into(),
        4 => entries.swap(0, 2),
        _ => {}
    }
    let sep = if rng.one_in(5) { ",\n " } else { ", " };
    format!(
        "{{{}{}}}",
        entries.join(sep),
        if rng.one_in(2) { ", " } else { "" }
    )
}

/// A `.npy` file: mostly well-formed around one or two odd parts, sometimes byte-mutated.
fn npy_file(rng: &mut Rng) -> Vec<u8> {
    let (descr, size) = *rng.pick(&[
        ("|u1", 1u64),
        ("|b1", 1),
        ("<i4", 4),
        ("<i8", 8),
        ("<f4", 4),
        ("<f8", 8),
        (">f4", 4),
        ("=f4", 4),
        (">u1", 1),
        ("<i2", 2),
        ("<U3", 12),
        ("|O", 8),
        ("<i3000000000000000000", 1),
        ("", 1),
        ("<f", 4),
    ]);
    let rank = if rng.one_in(40) {
        rng.below(3000)
    } else {
        rng.below(5)
    };
    let shape: Vec<u64> = (0..rank)
        .map(|_| match rng.below(10) {
            0 => rng.interesting_u64(),
            1 => 0,
            _ => 1 + rng.below(6) as u64,
        })
        .collect();
    let header = npy_header(rng, &shape, descr);
    let version = if rng.one_in(10) {
        *rng.pick(&[(0u8, 0u8), (1, 1), (4, 0), (255, 255)])
    } else {
        *rng.pick(&[(1, 0), (1, 0), (2, 0), (3, 0)])
    };
    let len_bytes = if version.0 == 1 { 2 } else { 4 };
    let mut header = header.into_bytes();
    if version.0 == 3 && rng.one_in(4) {
        header.extend_from_slice("'é'".as_bytes());
    }
    // Pad like numpy, so that the data starts 64-byte aligned.
    let unpadded = 6 + 2 + len_bytes + header.len() + 1;
    header.resize(
        header.len() + unpadded.next_multiple_of(64) - unpadded,
        b' ',
    );
    header.push(b'\n');
    let mut header_len = header.len() as u64;
    if rng.one_in(8) {
        header_len = match rng.below(3) {
            0 => rng.interesting_u64(),
            1 => header_len.wrapping_add(rng.below(9) as u64).wrapping_sub(4),
            _ => 0,
        };
    }
    let nbytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= 1 << 16);
    let mut data_len = nbytes.unwrap_or(rng.below(64) as u64) as usize;
    if rng.one_in(6) {
        data_len = (data_len + rng.below(9)).saturating_sub(4);
    }
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version.0, version.1]);
    if len_bytes == 2 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(&header);
    // Data that is valid for every dtype read: bools and small integers.
    out.extend((0..data_len).map(|_| rng.below(2) as u8));
    if rng.one_in(4) {
        mutate_bytes(rng, &mut out, PY_TOKENS);
    }
    out
}

/// The files of an observation directory, for the first byte of an npy input.
const OBSERVATION_FILES: [&str; 6] = [
    "images.npy",
    "image_masks.npy",
    "tokens.npy",
    "token_mask.npy",
    "state.npy",
    "noise.npy",
];

/// Checks an error message: it must name `file`.
fn names(err: &impl std::fmt::Display, file: &str) -> Result<Outcome, String> {
    let msg = err.to_string();
    if msg.contains(file) {
        Ok(Outcome::Error(msg))
    } else {
        Err(format!("the error does not name {file}: {msg}"))
    }
}

/// Every reader of `npy` on one file; with a first byte below 6 the file also replaces one
/// array of a valid pi0 observation directory, which is then loaded.
#[test]
fn fuzz_npy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.npy");
    let obs_dir = dir.path().join("observation");
    let cfg = Config::pi0_small();
    operators::observation::write_sample(&obs_dir, &cfg, 3).unwrap();
    let originals: Vec<Vec<u8>> = OBSERVATION_FILES
        .iter()
        .map(|f| std::fs::read(obs_dir.join(f)).unwrap())
        .collect();

    let s = run(
        "npy",
        10_000,
        |rng| {
            let slot = rng.below(12) as u8;
            let mut input = vec![slot];
            if slot < 6 && rng.one_in(2) {
                // An observation file with some bytes changed, in place or not.
                let mut bytes = originals[slot as usize].clone();
                if rng.one_in(2) {
                    mutate_bytes(rng, &mut bytes, PY_TOKENS);
                } else {
                    for _ in 0..1 + rng.below(3) {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                }
                input.extend(bytes);
            } else {
                input.extend(npy_file(rng));
            }
            input
        },
        |input| {
            let (slot, bytes) = (input[0] as usize, &input[1..]);
            if let Some(name) = OBSERVATION_FILES.get(slot) {
                let path = obs_dir.join(name);
                std::fs::write(&path, bytes).unwrap();
                let loaded = Observation::load(&obs_dir, &cfg);
                std::fs::write(&path, &originals[slot]).unwrap();
                return match loaded {
                    Ok(obs) => {
                        let want = cfg.num_images * cfg.image_size * cfg.image_size * 3;
                        if obs.images.len() != want {
                            return Err(format!(
                                "{} image values, expected {want}",
                                obs.images.len()
                            ));
                        }
                        Ok(Outcome::Valid)
                    }
                    Err(e) => names(&e, name),
                };
            }
            std::fs::write(&file, bytes).unwrap();
            let results = [
                npy::read_u8(&file).map(|a| (a.shape, a.data.len())),
                npy::read_bool(&file).map(|a| (a.shape, a.data.len())),
                npy::read_i32(&file).map(|a| (a.shape, a.data.len())),
                npy::read_f32(&file).map(|a| (a.shape, a.data.len())),
                npy::read_f64(&file).map(|a| (a.shape, a.data.len())),
            ];
            let mut outcome = None;
            for r in results {
                match r {
                    Ok((shape, len)) => {
                        if shape.iter().product::<usize>() != len {
                            return Err(format!("shape {shape:?} with {len} elements"));
                        }
                        outcome = Some(Outcome::Valid);
                    }
                    Err(e) => {
                        let o = names(&e, "x.npy")?;
                        outcome.get_or_insert(o);
                    }
                }
            }
            Ok(outcome.unwrap_or(Outcome::Valid))
        },
    );
    assert_eq!(s.errors + s.valid, s.cases);
    if s.cases >= 1000 {
        assert!(s.valid > s.cases / 20, "too few valid inputs: {}", s.valid);
        assert!(s.errors > s.cases / 4, "too few errors: {}", s.errors);
    }
}

/// A safetensors header edit: a tensor's dtype, shape or offsets, a key, the metadata.
fn edit_header(rng: &mut Rng, header: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::{json, Value};
    let keys: Vec<String> = header.keys().cloned().collect();
    if keys.is_empty() {
        header.insert("x".into(), json!({}));
        return;
    }
    let key = rng.pick(&keys).clone();
    // Sets `field` of tensor `key` where that entry is still an object.
    let set = |header: &mut serde_json::Map<String, Value>, key: &str, field: &str, v: Value| {
        if let Some(entry) = header.get_mut(key).and_then(Value::as_object_mut) {
            entry.insert(field.into(), v);
        }
    };
    let odd_number = |rng: &mut Rng| -> Value {
        match rng.below(6) {
            0 => json!(-1),
            1 => json!(1.5),
            2 => json!("3"),
            3 => Value::Null,
            _ => json!(rng.interesting_u64()),
        }
    };
    match rng.below(9) {
        0 => {
            let dtype = *rng.pick(&[
                "F32", "BF16", "F16", "F64", "I64", "BOOL", "F8_E4M3", "U8", "x",
            ]);
            set(header, &key, "dtype", json!(dtype));
        }
        1 => {
            let rank = rng.below(5);
            let shape: Vec<Value> = (0..rank)
                .map(|_| {
                    if rng.one_in(4) {
                        odd_number(rng)
                    } else {
                        json!(rng.below(70))
                    }
                })
                .collect();
            set(header, &key, "shape", Value::Array(shape));
        }
        2 => {
            let a = if rng.one_in(2) {
                odd_number(rng)
            } else {
                json!(rng.below(1 << 20))
            };
            let b = if rng.one_in(2) {
                odd_number(rng)
            } else {
                json!(rng.below(1 << 20))
            };
            set(header, &key, "data_offsets", json!([a, b]));
        }
        3 => {
            header.remove(&key);
        }
        4 => {
            if let Some(v) = header.remove(&key) {
                let new = match rng.below(3) {
                    0 => EMBED_ALIAS.to_string(),
                    1 => format!("{key}.x"),
                    _ => String::new(),
                };
                header.insert(new, v);
            }
        }
        5 => {
            header.insert("__metadata__".into(), json!({"format": rng.below(9)}));
        }
        6 => {
            let v = odd_number(rng);
            header.insert(key, v);
        }
        7 => {
            // Swap two tensors' offsets: same sizes sometimes, so some stay valid.
            let other = rng.pick(&keys).clone();
            if let (Some(a), Some(b)) = (
                header
                    .get(&key)
                    .and_then(|v| v.get("data_offsets"))
                    .cloned(),
                header
                    .get(&other)
                    .and_then(|v| v.get("data_offsets"))
                    .cloned(),
            ) {
                set(header, &key, "data_offsets", b);
                set(header, &other, "data_offsets", a);
            }
        }
        _ => {
            let dims: Vec<u64> = (0..1 + rng.below(3))
                .map(|_| rng.interesting_u64())
                .collect();
            header.insert(
                format!("extra.{}", rng.below(100)),
                json!({"dtype": "F32", "shape": dims, "data_offsets": [0, 4]}),
            );
        }
    }
}

/// `model.safetensors` of a small checkpoint (config.json kept valid), its header edited as
/// JSON or as bytes, its length field and data length changed; opened and, when it opens,
/// every tensor the policy needs read.
#[test]
fn fuzz_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    write_random_checkpoint(
        &ckpt_dir,
        &Config::pi0_small(),
        WriteDtype::Bf16,
        7,
        |_, _| {},
    )
    .unwrap();
    let weights = ckpt_dir.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&original[8..8 + header_len]).unwrap();
    let data = original[8 + header_len..].to_vec();
    let json_tokens: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b",",
        b":",
        b"-1",
        b"18446744073709551616",
        b"1e999",
        b"null",
        b"\"F32\"",
        b"\"dtype\"",
        b"\"shape\"",
        b"\"data_offsets\"",
        b"\\u0000",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];

    let s = run(
        "safetensors",
        3000,
        |rng| {
            let mut h = header.clone();
            for _ in 0..rng.below(4) {
                edit_header(rng, &mut h);
            }
            let mut text = serde_json::Value::Object(h).to_string().into_bytes();
            if rng.one_in(4) {
                mutate_bytes(rng, &mut text, json_tokens);
            }
            if rng.one_in(30) {
                text = format!("{}{}", "[".repeat(100_000), "]".repeat(rng.below(3))).into_bytes();
            }
            let mut len = text.len() as u64;
            if rng.one_in(8) {
                len = match rng.below(3) {
                    0 => rng.interesting_u64(),
                    1 => len.wrapping_add(rng.below(17) as u64).wrapping_sub(8),
                    _ => 0,
                };
            }
            let mut out = len.to_le_bytes().to_vec();
            out.extend_from_slice(&text);
            let keep = match rng.below(10) {
                0 => rng.below(data.len() + 1),
                1 => data.len() + rng.below(9),
                _ => data.len(),
            };
            out.extend_from_slice(&data[..keep.min(data.len())]);
            out.resize(out.len() + keep.saturating_sub(data.len()), 0);
            if rng.one_in(40) {
                out.truncate(rng.below(12));
            }
            out
        },
        |input| {
            std::fs::write(&weights, input).unwrap();
            let ckpt = match Checkpoint::open(&ckpt_dir) {
                Ok(c) => c,
                Err(e) => return names(&e, "model.safetensors"),
            };
            for t in tensor_specs(&ckpt.config) {
                match ckpt.read_f32(&t.key, &t.shape) {
                    Ok(v) if v.len() == t.shape.iter().product::<usize>() => {}
                    Ok(v) => {
                        return Err(format!("{}: {} values for {:?}", t.key, v.len(), t.shape))
                    }
                    Err(_) if t.optional => {}
                    Err(e) => return Err(format!("opened, but reading {} failed: {e}", t.key)),
                }
            }
            Ok(Outcome::Valid)
        },
    );
    assert_eq!(s.errors + s.valid, s.cases);
    if s.cases >= 1000 {
        assert!(s.valid > s.cases / 50, "too few valid inputs: {}", s.valid);
    }
}

/// A JSON value of the kinds that break a config: huge, negative, zero, fractional, of the
/// wrong type.
fn odd_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(-(rng.below(1 << 20) as i64)),
        3 => json!(1.5),
        4 => json!(1e308),
        5 => json!(1e-320),
        6 => json!("8"),
        7 => serde_json::Value::Null,
        8 => json!(true),
        9 => json!([]),
        10 => json!({}),
        11 => json!(2u64.pow(61)),
        12 => json!(18446744073709551584u64),
        _ => json!(rng.interesting_u64()),
    }
}

/// `config.json`: fields set to odd values, to values near the limits, or to small values
/// that keep the config valid; fields removed or added; text mutated. An accepted config must
/// have bounded totals and a tensor list that matches them, and (when small) a random
/// checkpoint of it must load and run.
#[test]
fn fuzz_config() {
    let dir = tempfile::tempdir().unwrap();
    let bases: Vec<serde_json::Value> = PRESETS
        .iter()
        .map(|p| serde_json::from_str(&Config::preset(p).unwrap().to_json_pretty()).unwrap())
        .collect();
    let small = [bases[2].clone(), bases[3].clone()];
    let limit_of = |field: &str| {
        operators::config::LIMITS
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, l)| *l as u64)
    };
    let json_tokens: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b",",
        b":",
        b"-",
        b"0",
        b"1e400",
        b"null",
        b"true",
        b"\"head_dim\": 16,",
        b"\"action_horizon\": ",
    ];
    let mut runs = 0usize;
    let max_runs = (fuzz_support::cases_from_env(10_000) / 40).max(1);
    let s = run(
        "config",
        10_000,
        |rng| {
            let mut v = if rng.one_in(6) {
                rng.pick(&bases).clone()
            } else {
                rng.pick(&small).clone()
            };
            let map = v.as_object_mut().unwrap();
            for _ in 0..1 + rng.below(3) {
                let field = rng.pick(operators::config::FIELDS).to_string();
                let value = match rng.below(8) {
                    0 | 1 => odd_value(rng),
                    2 => match limit_of(&field) {
                        Some(l) => serde_json::json!(l + rng.below(3) as u64 - 1),
                        None => odd_value(rng),
                    },
                    3 => {
                        map.remove(&field);
                        continue;
                    }
                    4 if rng.one_in(4) => {
                        map.insert("precision".into(), "bfloat16".into());
                        continue;
                    }
                    // Small values: often valid, so that the run below sees odd shapes.
                    _ => {
                        let top = if rng.one_in(2) { 4 } else { 64 };
                        serde_json::json!(1 + rng.below(top))
                    }
                };
                if field == "pi05" && rng.one_in(2) {
                    map.insert(field, serde_json::json!(rng.one_in(2)));
                } else {
                    map.insert(field, value);
                }
            }
            let mut text = v.to_string().into_bytes();
            if rng.one_in(5) {
                mutate_bytes(rng, &mut text, json_tokens);
            }
            if rng.one_in(50) {
                text = "[".repeat(50_000).into_bytes();
            }
            text
        },
        |input| {
            let text = match std::str::from_utf8(input) {
                Ok(t) => t,
                Err(_) => return Ok(Outcome::Error("not UTF-8".into())),
            };
            let cfg = match Config::from_json_str(text) {
                Ok((c, _)) => c,
                Err(e) if e.is_empty() => return Err("an empty error message".into()),
                Err(e) => return Ok(Outcome::Error(e)),
            };
            cfg.validate()
                .map_err(|e| format!("accepted, then invalid: {e}"))?;
            let params = cfg.parameter_count().ok_or("parameter count overflows")?;
            let act = cfg.activation_bytes().ok_or("activation bytes overflow")?;
            if params > MAX_PARAMETERS || act > MAX_ACTIVATION_BYTES {
                return Err(format!(
                    "accepted with {params} parameters, {act} activation bytes"
                ));
            }
            if params <= 1 << 20 {
                let listed: u64 = tensor_specs(&cfg)
                    .iter()
                    .map(|t| t.shape.iter().product::<usize>() as u64)
                    .sum();
                if listed != params {
                    return Err(format!(
                        "tensor list has {listed} parameters, config {params}"
                    ));
                }
            }
            if params <= 300_000 && act <= 8 << 20 && runs < max_runs {
                runs += 1;
                run_config(&cfg, &dir.path().join("run"))?;
            }
            Ok(Outcome::Valid)
        },
    );
    println!("fuzz config: {runs} accepted configs run end to end (one denoise step)");
    assert_eq!(s.errors + s.valid, s.cases);
    if s.cases >= 1000 {
        assert!(runs >= max_runs / 2, "only {runs} configs ran");
        assert!(s.valid > s.cases / 20 && s.errors > s.cases / 4);
    }
}

/// What `checkpoint random`, `checkpoint inspect` and `infer` do with `cfg`: write, open,
/// load, run one step on a sample observation.
fn run_config(cfg: &Config, dir: &Path) -> Result<(), String> {
    let fail = |what: &str, e: operators::Error| format!("valid config, but {what} failed: {e}");
    let _ = std::fs::remove_dir_all(dir);
    write_random_checkpoint(dir, cfg, WriteDtype::Bf16, 1, |_, _| {})
        .map_err(|e| fail("writing a random checkpoint", e))?;
    let ckpt = Checkpoint::open(dir).map_err(|e| fail("opening it", e))?;
    let policy = Policy::load(&ckpt, |_, _| {}).map_err(|e| fail("loading it", e))?;
    let obs_dir: PathBuf = dir.join("observation");
    operators::observation::write_sample(&obs_dir, cfg, 2)
        .map_err(|e| fail("writing an observation", e))?;
    let obs = Observation::load(&obs_dir, cfg).map_err(|e| fail("loading the observation", e))?;
    let noise = operators::observation::noise_from_seed(cfg, 5);
    let (actions, _) = policy
        .infer(&obs, &noise, 1)
        .map_err(|e| fail("inference", e))?;
    if actions.len() != cfg.action_horizon * cfg.action_dim {
        return Err(format!("{} actions for {cfg:?}", actions.len()));
    }
    Ok(())
}

/// Every reader of a user's file refuses a directory or a device (here /dev/zero, which
/// would otherwise be read until memory runs out) at once, naming the file.
#[test]
fn every_reader_refuses_devices_and_directories() {
    use operators::openpi::{norm, tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let mut targets = vec![dir.path().join("sub")];
    std::fs::create_dir(&targets[0]).unwrap();
    #[cfg(unix)]
    {
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        targets.push(zero);
    }
    for p in &targets {
        let t = std::time::Instant::now();
        let errors: Vec<String> = vec![
            Config::from_json_file(p).err().map(|e| e.to_string()),
            npy::read_u8(p).err().map(|e| e.to_string()),
            npy::read_f32(p).err().map(|e| e.to_string()),
            operators::postprocess::load_action_stats(p)
                .err()
                .map(|e| e.to_string()),
            norm::Stats::load(p, false).err().map(|e| e.to_string()),
            tokenizer::PromptTokenizer::from_file(p)
                .err()
                .map(|e| e.to_string()),
        ]
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
        for err in errors {
            assert!(
                err.starts_with(&p.display().to_string())
                    && (err.contains("is a directory") || err.contains("is not a regular file")),
                "{err}"
            );
        }
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    // A checkpoint whose config.json, or whose model.safetensors, is a device.
    #[cfg(unix)]
    for name in ["config.json", "model.safetensors"] {
        let ckpt = dir.path().join(format!("ckpt-{name}"));
        write_random_checkpoint(&ckpt, &Config::pi0_small(), WriteDtype::Bf16, 1, |_, _| {})
            .unwrap();
        std::fs::remove_file(ckpt.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", ckpt.join(name)).unwrap();
        let err = Checkpoint::open(&ckpt).err().unwrap().to_string();
        assert!(
            err.contains(&format!(
                "{name}: is not a regular file (a device, FIFO or socket)"
            )),
            "{err}"
        );
    }
}

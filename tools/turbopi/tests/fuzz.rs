//! Fuzzing of what `turbopi graph check`, `turbopi graph plan` and `turbopi trace report`
//! read: dataflow YAML (mutated from the shipped graphs and the test fixtures, pointed at a
//! small checkpoint and prompt folders, one of them with a pathologically nested `.npy`
//! header) and JSON-lines span files. Seeded mutation loops (see
//! operators/tests/fuzz_support/mod.rs): every case must end in a result or an error naming
//! the file, without a panic, within a bounded heap.
//!
//! `TURBOPI_FUZZ_CASES=N` runs N cases per target, `TURBOPI_FUZZ_SEED=S` another seed;
//! `cargo test --release -p turbopi --test fuzz -- --nocapture` prints the counts.

#[path = "../../../operators/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::path::{Path, PathBuf};

use fuzz_support::{mutate_bytes, run, CountingAlloc, Outcome, Rng};
use operators::checkpoint::WriteDtype;
use operators::random::write_random_checkpoint;
use operators::Config;
use serde_json::{json, Value};
use turbopi::{graph, plan, trace};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `line` with the value of `key: ` replaced by `value`: a `${VAR:-default}` to the end of
/// the line, a flow-style value up to `,` or `}`.
fn set_value(line: &str, key: &str, value: &str) -> String {
    let Some(start) = line.find(key).map(|i| i + key.len()) else {
        return line.to_string();
    };
    let rest = &line[start..];
    let end = if rest.starts_with("${") {
        rest.len()
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    format!("{}{value}{}", &line[..start], &rest[end..])
}

/// The shipped graphs and the fixtures, their checkpoints and prompts pointed at the fuzz
/// folder's.
fn seed_graphs() -> Vec<String> {
    let mut files = Vec::new();
    for dir in [
        repo().join("graphs"),
        repo().join("tools/turbopi/tests/fixtures/graphs"),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| set_value(&set_value(l, "CHECKPOINT: ", "ckpt"), "PROMPT: ", "prompt"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Words substituted into the YAML: node kinds, the fuzz folder's paths (good, nested,
/// devices), env values that must be refused, YAML syntax.
const YAML_WORDS: &[&str] = &[
    "camera",
    "decode",
    "vision",
    "prefix",
    "denoise",
    "policy",
    "postprocess",
    "action-sink",
    "openpi-server",
    "ckpt",
    "ckpt0",
    "prompt",
    "nested",
    "zero",
    "/dev/zero",
    ".",
    "",
    "missing",
    "0",
    "-1",
    "18446744073709551616",
    "1e999",
    ".nan",
    "cuda",
    "cuda-ipc",
    "host",
    "true",
    "~",
    "null",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "*a",
    "&a",
    "!!binary",
    "|",
    ">",
    "? ",
    "---",
    "...",
    "%YAML 1.2",
    ":",
    "- ",
    "\t",
    "images",
    "tokens",
    "release",
    "actions",
    "kv_cache",
];

/// Lines inserted into the YAML.
const YAML_LINES: &[&str] = &[
    "  - id: x\n    path: policy\n    inputs: {images: x/images}\n    outputs: [actions]",
    "    env: {CHECKPOINT: ckpt, PROMPT: nested}",
    "    env: {CHECKPOINT: zero, PROMPT: zero}",
    "    env: {CHECKPOINT: ckpt0, PROMPT: prompt, BACKEND: cuda, TRANSPORT: cuda-ipc, RING_SLOTS: 99999999999999999999}",
    "    deploy: {machine: b}",
    "    inputs: {release: denoise/release, tokens: camera/frames}",
    "      STEPS: -1",
    "      IMAGE_SIZE: 18446744073709551615",
    "      NUM_IMAGES: 0",
    "      ACTION_DIMS: 99999",
    "      PIPELINE: true",
    "      METADATA: '{\"a\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]}'",
    "      DELTA_ACTIONS: '-1,99999999999999999999'",
    "      ROBOT: mars",
    "      queue_size: 18446744073709551615",
    "x: &a [1, 2, 3]\ny: *a",
];

fn mutate_yaml(rng: &mut Rng, text: &str) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.below(4) {
        let n = lines.len().max(1);
        let i = rng.below(n).min(lines.len().saturating_sub(1));
        match rng.below(8) {
            0 if !lines.is_empty() => {
                lines.remove(i);
            }
            1 if !lines.is_empty() => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 if !lines.is_empty() => {
                let j = rng.below(lines.len());
                lines.swap(i, j);
            }
            3 if !lines.is_empty() => {
                lines[i] = if rng.one_in(2) {
                    format!("  {}", lines[i])
                } else {
                    lines[i].strip_prefix("  ").unwrap_or(&lines[i]).to_string()
                };
            }
            4 => lines.insert(i.min(lines.len()), rng.pick(YAML_LINES).to_string()),
            _ if !lines.is_empty() => {
                // Replace one word of the line (or append one).
                let words: Vec<&str> = lines[i].split([' ', ',', '{', '}', '/', ':']).collect();
                let word = rng.pick(&words).to_string();
                let new = rng.pick(YAML_WORDS);
                lines[i] = if word.is_empty() {
                    format!("{} {new}", lines[i])
                } else {
                    lines[i].replacen(&word, new, 1)
                };
            }
            _ => lines.push(rng.pick(YAML_LINES).to_string()),
        }
    }
    let mut bytes = lines.join("\n").into_bytes();
    if rng.one_in(4) {
        let dict: Vec<&[u8]> = YAML_WORDS.iter().map(|w| w.as_bytes()).collect();
        mutate_bytes(rng, &mut bytes, &dict);
    }
    match rng.below(60) {
        0 => bytes = "[".repeat(100_000).into_bytes(),
        1 => {
            // A billion laughs: ten levels of ten aliases each.
            let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
            for i in 1..10 {
                let p = format!("*a{}", i - 1);
                s += &format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", "));
            }
            s += "nodes: *a9\n";
            bytes = s.into_bytes();
        }
        _ => {}
    }
    bytes
}

/// The folder a graph is checked in: checkpoints, prompts (one with a 20,000-deep nested
/// header), and a checkpoint and prompt whose files are /dev/zero.
fn graph_folder() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_random_checkpoint(
        &r.join("ckpt"),
        &Config::pi05_small(),
        WriteDtype::Bf16,
        3,
        |_, _| {},
    )
    .unwrap();
    write_random_checkpoint(
        &r.join("ckpt0"),
        &Config::pi0_small(),
        WriteDtype::Bf16,
        4,
        |_, _| {},
    )
    .unwrap();
    operators::observation::write_sample(&r.join("prompt"), &Config::pi05_small(), 5).unwrap();
    std::fs::create_dir(r.join("nested")).unwrap();
    std::fs::copy(
        r.join("prompt/token_mask.npy"),
        r.join("nested/token_mask.npy"),
    )
    .unwrap();
    std::fs::write(r.join("nested/tokens.npy"), nested_npy()).unwrap();
    std::fs::create_dir(r.join("zero")).unwrap();
    #[cfg(unix)]
    for f in [
        "config.json",
        "model.safetensors",
        "tokens.npy",
        "token_mask.npy",
    ] {
        std::os::unix::fs::symlink("/dev/zero", r.join("zero").join(f)).unwrap();
    }
    root
}

/// A format 2.0 `.npy` whose shape is 20,000 nested `(`: it used to overflow the stack.
fn nested_npy() -> Vec<u8> {
    let header = format!(
        "{{'descr': '<i4', 'fortran_order': False, 'shape': {}}}\n",
        "(".repeat(20_000)
    );
    let mut out = b"\x93NUMPY\x02\x00".to_vec();
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// `graph check` (with the consistency check) and `graph plan` (its table and DOT) on a
/// mutated graph.
#[test]
fn fuzz_graph_yaml() {
    let root = graph_folder();
    let file = root.path().join("graph.yml");
    let seeds = seed_graphs();
    let s = run(
        "graph",
        1500,
        |rng| {
            let seed = rng.pick(&seeds).clone();
            if rng.one_in(10) {
                seed.into_bytes()
            } else {
                mutate_yaml(rng, &seed)
            }
        },
        |input| {
            std::fs::write(&file, input).unwrap();
            let clear = |e: anyhow::Error| {
                let msg = format!("{e:#}");
                if msg.contains("graph.yml") {
                    Ok(Outcome::Error(msg))
                } else {
                    Err(format!("the error does not name graph.yml: {msg}"))
                }
            };
            let outcome = match graph::check(&file) {
                Ok(mut report) => {
                    if let Err(e) = graph::check_consistency(&file, &mut report) {
                        return clear(e);
                    }
                    match report.errors.first() {
                        None => Outcome::Valid,
                        Some(e) if e.is_empty() => return Err("an empty problem".into()),
                        Some(e) => Outcome::Error(e.clone()),
                    }
                }
                Err(e) => clear(e)?,
            };
            match plan::plan(&file) {
                Ok(p) => {
                    let (table, dot) = (p.table(), p.dot());
                    if !table.starts_with("node") || !dot.starts_with("digraph") {
                        return Err(format!("odd plan output: {table}\n{dot}"));
                    }
                }
                Err(e) => {
                    clear(e)?;
                }
            }
            Ok(outcome)
        },
    );
    assert_eq!(s.errors + s.valid, s.cases);
    if s.cases >= 1000 {
        assert!(s.valid > s.cases / 50, "too few valid graphs: {}", s.valid);
    }
}

/// A span record of the kind the nodes write.
fn span(name: &str, seq: u64, start: u64, end: u64, gpu: Option<f64>) -> Value {
    let mut v = json!({
        "name": name, "trace_id": format!("{:032x}", seq + 1), "span_id": format!("{:016x}", start),
        "node": name, "seq": seq, "backend": "cpu", "start_unix_ns": start,
        "end_unix_ns": end, "cpu_ms": (end - start) as f64 / 1e6,
    });
    if let Some(g) = gpu {
        v["gpu_ms"] = json!(g);
    }
    v
}

fn odd_json(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => json!(-1),
        1 => json!(1.5),
        2 => json!(1e308),
        3 => json!(-0.0),
        4 => json!(""),
        5 => json!(" "),
        6 => Value::Null,
        7 => json!([]),
        8 => json!("é∑😀"),
        9 => json!("x".repeat(65_536 + rng.below(3))),
        10 => json!("s".repeat(1 + rng.below(300))),
        _ => json!(rng.interesting_u64()),
    }
}

/// A span file: some frames of some stages, then fields, lines and bytes changed.
fn span_file(rng: &mut Rng) -> Vec<u8> {
    let stages = node_common::trace::STAGES;
    let frames = 1 + rng.below(25) as u64;
    let mut t = 1_700_000_000_000_000_000u64;
    let mut lines: Vec<Value> = Vec::new();
    for seq in 0..frames {
        for &stage in stages.iter().take(1 + rng.below(stages.len())) {
            let dur = 1 + rng.below(50_000_000) as u64;
            let gpu = rng.one_in(3).then(|| rng.below(60_000) as f64 / 1e3);
            lines.push(span(stage, seq, t, t + dur, gpu));
            t += dur + rng.below(1_000_000) as u64;
        }
    }
    let fields = [
        "name",
        "trace_id",
        "span_id",
        "node",
        "seq",
        "backend",
        "start_unix_ns",
        "end_unix_ns",
        "cpu_ms",
        "gpu_ms",
        "parent_span_id",
        "extra",
    ];
    for _ in 0..rng.below(4) {
        let i = rng.below(lines.len());
        let field = *rng.pick(&fields);
        match rng.below(4) {
            0 => {
                if let Some(o) = lines[i].as_object_mut() {
                    o.remove(field);
                }
            }
            1 => {
                let v = json!(rng.interesting_u64());
                lines[i][field] = v;
            }
            _ => {
                let v = odd_json(rng);
                lines[i][field] = v;
            }
        }
    }
    let mut text: Vec<String> = lines.iter().map(Value::to_string).collect();
    match rng.below(6) {
        0 => {
            let i = rng.below(text.len());
            text.insert(i, String::new());
        }
        1 => {
            // Shuffled, as appending processes leave them.
            for i in (1..text.len()).rev() {
                let j = rng.below(i + 1);
                text.swap(i, j);
            }
        }
        2 => text.push("{\"name\": ".into()),
        _ => {}
    }
    let mut bytes = text
        .join(if rng.one_in(8) { "\r\n" } else { "\n" })
        .into_bytes();
    if rng.one_in(3) {
        mutate_bytes(
            rng,
            &mut bytes,
            &[
                b"{", b"}", b"\"", b",", b":", b"-", b"null", b"\n", b"1e999", b"\xff",
            ],
        );
    }
    if rng.one_in(80) {
        bytes = "[".repeat(100_000).into_bytes();
    }
    bytes
}

/// `trace report`'s text and Chrome trace (and now and then its SVG or PNG plot) of a
/// mutated span file. The first input byte picks the outputs.
#[test]
fn fuzz_trace_report() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spans.jsonl");
    let chrome = dir.path().join("chrome.json");
    let s = run(
        "trace",
        2000,
        |rng| {
            let mut input = vec![rng.below(100) as u8];
            input.extend(span_file(rng));
            input
        },
        |input| {
            std::fs::write(&file, &input[1..]).unwrap();
            let plot = match input[0] {
                0 | 1 => Some(dir.path().join("plot.svg")),
                2 => Some(dir.path().join("plot.png")),
                _ => None,
            };
            match trace::report_text(&file, Some(&chrome), plot.as_deref()) {
                Ok(text) if text.contains("frames over") => Ok(Outcome::Valid),
                Ok(text) => Err(format!("odd report: {text}")),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg.contains("spans.jsonl") {
                        Ok(Outcome::Error(msg))
                    } else {
                        Err(format!("the error does not name spans.jsonl: {msg}"))
                    }
                }
            }
        },
    );
    assert_eq!(s.errors + s.valid, s.cases);
    if s.cases >= 1000 {
        assert!(
            s.valid > s.cases / 10,
            "too few valid span files: {}",
            s.valid
        );
        assert!(s.errors > s.cases / 10, "too few errors: {}", s.errors);
    }
}

/// A device or directory where a graph or span file is expected is refused at once.
#[test]
fn graph_and_trace_readers_refuse_devices_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = vec![dir.path().to_path_buf()];
    if cfg!(unix) {
        paths.push(PathBuf::from("/dev/zero"));
    }
    for p in &paths {
        let t = std::time::Instant::now();
        for err in [
            graph::check(p).err().map(|e| format!("{e:#}")),
            plan::plan(p).err().map(|e| format!("{e:#}")),
            trace::report_text(p, None, None)
                .err()
                .map(|e| format!("{e:#}")),
        ] {
            let err = err.unwrap_or_default();
            assert!(
                err.contains("is a directory") || err.contains("is not a regular file"),
                "{}: {err}",
                p.display()
            );
        }
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }
}

/// `graph check` on a prompt folder whose tokens.npy nests 20,000 tuples: an error naming
/// the node, the folder and the file, where it used to overflow the stack.
#[test]
fn graph_check_names_a_nested_prompt_header() {
    let root = graph_folder();
    let file = root.path().join("graph.yml");
    std::fs::write(
        &file,
        "nodes:\n  - id: policy\n    path: policy\n    inputs: {images: policy/actions}\n    outputs: [actions]\n    env: {CHECKPOINT: ckpt, PROMPT: nested}\n",
    )
    .unwrap();
    let report = graph::check(&file).unwrap();
    assert!(
        report.errors.iter().any(|e| e.contains("node `policy`: env PROMPT=\"nested\"")
            && e.contains("tokens.npy: not a valid .npy file: header: tuples and lists nested more than 16 deep")),
        "{:?}",
        report.errors
    );
}

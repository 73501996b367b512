//! Process-wide settings: every `TURBOPI_*` environment variable the libraries, the CLI and
//! the tests read, in one table with its default and meaning ([`SETTINGS`], rendered in
//! docs/settings.md), and one parser per kind of value. Booleans parse one way everywhere
//! ([`parse_bool`]: `1|0|true|false|on|off|yes|no`, any case); any other value is an error
//! that names the variable and what it accepts, never silently read as the default.
//!
//! The nodes' own variables (`BACKEND`, `STEPS`, `PIPELINE`, ...) are per node, set in the
//! graph's YAML, and read through node-common's env helpers, whose booleans use
//! [`parse_bool`] too.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::{Error, Result};

/// What a setting holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// On or off: [`parse_bool`].
    Flag,
    /// A non-negative integer (a count or a device index).
    Count,
    /// An integer seed, decimal or `0x` hex.
    Seed,
    /// A folder.
    Path,
    /// A folder, or a boolean: off disables the feature, on keeps the default folder.
    FlagOrPath,
    /// A comma-separated list of names.
    List,
    /// One of a few words (the meaning names them).
    Choice,
}

/// Who reads a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBy {
    /// The CUDA backend, in every process that runs it (CLI and nodes alike).
    CudaBackend,
    /// Both backends, in every process that loads a policy or a stage.
    Backends,
    /// The `turbopi` CLI.
    Cli,
    /// The test suites.
    Tests,
}

/// One process-wide setting.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub kind: Kind,
    /// The value when the variable is unset or empty, as the docs show it.
    pub default: &'static str,
    pub read_by: ReadBy,
    pub meaning: &'static str,
}

/// The words [`parse_bool`] accepts, for error messages.
pub const BOOL_WORDS: &str = "1, 0, true, false, on, off, yes or no";

/// How many settings [`SETTINGS`] holds.
const COUNT: usize = 25;

/// Every process-wide `TURBOPI_*` variable (docs/settings.md lists them with the nodes'
/// variables; a test keeps both in step with the sources).
pub static SETTINGS: [Setting; COUNT] = [
    Setting {
        name: "TURBOPI_CUDA_DEVICE",
        kind: Kind::Count,
        default: "0",
        read_by: ReadBy::CudaBackend,
        meaning: "the GPU (CUDA device index) the CUDA backend opens",
    },
    Setting {
        name: "TURBOPI_STREAM_PRIORITIES",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "ranks the vision, prefix and denoise streams by the critical path to the actions (off: every stream at the default priority, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_STAGE_GRAPHS",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "captures vision and prefix as CUDA graphs after their first run (off: runs them eagerly every frame, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_FUSED_GATE",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "pi0.5's gated residuals as one cuBLASLt GEMM with the gate as per-row alpha, where cuBLASLt supports it (off: the product and a gated add, two launches)",
    },
    Setting {
        name: "TURBOPI_SKINNY_GEMM",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "products of at most 16 rows (the action expert's at pi0.5's horizon) in bf16 on turbo-pi's few-row tensor-core kernel, gated residuals included (off: cuBLASLt, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_SKINNY_GEGLU",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "on the few-row kernel, GeGLU in the gate|up product's epilogue: one launch instead of the product and gelu_gate (off: two launches, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_SKINNY_FP8_WIDE",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "with FP8 expert weights, products of 17 to 64 rows (pi0's 51 suffix tokens) in one launch of the few-row FP8 kernel's wide form, which reads the codes once for all rows (off: one launch per 16 rows, each reading every code, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_FP8_FOLD",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "with --dtype fp8 where cuBLASLt applies no per-row scales to an FP8 product (Hopper), the scales applied by the kernel that reads the product next: gelu_gate for the prefix's gate|up, the bias and GELU pass for the vision tower's q|k|v and fc1; one pass over the product fewer (off: rescale_e4m3 stores each product, then the next kernel reads it, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_FP8_STAGES",
        kind: Kind::List,
        default: "all",
        read_by: ReadBy::Backends,
        meaning: "with --dtype fp8 (or DTYPE fp8), the stages whose large linear layers are FP8: `all`, or a comma-separated list of `vision`, `prefix`, `expert`; the others keep bf16 (cuda) or f32 (cpu). Read by both backends. Unset, the CUDA backend puts the expert alone in FP8 where cuBLASLt applies no per-row scales to FP8 products (Hopper: W8A8 with the scales after it ran slower than bf16 there) and all three elsewhere",
    },
    Setting {
        name: "TURBOPI_OVERLAP_SMS",
        kind: Kind::Count,
        default: "0",
        read_by: ReadBy::CudaBackend,
        meaning: "the SMs the vision and prefix stages' cuBLASLt products may target (0: all): with two frames in flight (PIPELINE, thor_pipelined.yml, the bench's pipelined line) the denoise loop's small kernels then find SMs free instead of waiting behind the next frame's prefix; it slows those stages when frames do not overlap. For A/B runs",
    },
    Setting {
        name: "TURBOPI_LT_EPILOGUES",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "bf16: the vision tower's q|k|v bias and fc1's bias and tanh-GELU in cuBLASLt's GEMM epilogue, one launch each instead of the product and bias_act, where cuBLASLt offers an algorithm (on an H100 it offers none for an f32 bias into bf16, so both run as two launches there; off: always two launches, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_SKINNY_ROPE",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "on the few-row kernel where kernels do not start early (TURBOPI_PDL off, or before sm_90), RoPE and the K/V cache write in the q|k|v product's epilogue: one launch instead of the product and rope_qkv (off: two launches everywhere, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_PDL",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "programmatic dependent launch inside the captured graphs on sm_90 and newer: a turbo-pi kernel that follows another starts while its predecessor drains and waits for its results on the device (off: every launch waits for the previous one to finish, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_GEMM_DETERMINISTIC",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "cuBLASLt algorithms limited to run-to-run deterministic ones where any is offered (off: in-place split-K reductions may be picked, whose rounding can differ between runs and between processes)",
    },
    Setting {
        name: "TURBOPI_FUSED_ATTENTION",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "the tensor-core flash attention kernel where it applies (off: attention on the GEMM path, for A/B runs)",
    },
    Setting {
        name: "TURBOPI_VISION_ATTENTION",
        kind: Kind::Choice,
        default: "flash",
        read_by: ReadBy::CudaBackend,
        meaning: "bf16: how the vision tower's attention runs on the tensor cores: `flash` (one block per 64 query rows of a camera's head, an online softmax over every key: one launch, no workspace) or `chunks` (one block per 64 rows and 64 keys, then a launch that combines the chunks; for A/B runs)",
    },
    Setting {
        name: "TURBOPI_PREFIX_ATTENTION",
        kind: Kind::Choice,
        default: "gemm",
        read_by: ReadBy::CudaBackend,
        meaning: "bf16: how the prefix's attention runs: `gemm` (two cuBLASLt products around a masked softmax), `flash` (the tensor-core kernel with an online softmax, the keys split the fewest ways whose blocks cover every SM; 0.17 ms a frame slower on an H100), or `flash:N` (split N ways, 1 to 64)",
    },
    Setting {
        name: "TURBOPI_GEMM_AUTOTUNE",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "times cuBLASLt's candidate algorithms once per GEMM shape and keeps the fastest (off: the heuristic's first algorithm)",
    },
    Setting {
        name: "TURBOPI_GEMM_TUNE_COLD",
        kind: Kind::Flag,
        default: "on",
        read_by: ReadBy::CudaBackend,
        meaning: "the autotuner flushes the L2 cache before each timed run, so weights come from memory as in a frame (off: back-to-back runs with the weights cached; picks of either kind are kept apart)",
    },
    Setting {
        name: "TURBOPI_KERNEL_CACHE",
        kind: Kind::FlagOrPath,
        default: "$XDG_CACHE_HOME/turbopi/kernels, else ~/.cache/turbopi/kernels",
        read_by: ReadBy::CudaBackend,
        meaning: "folder of compiled kernels (cubins by source, options and architecture), so NVRTC runs once per kernel set; off: compile every time",
    },
    Setting {
        name: "TURBOPI_PROFILE",
        kind: Kind::Flag,
        default: "off",
        read_by: ReadBy::Cli,
        meaning: "`turbopi bench`: after the timed frames, prints the device time of one denoise step per kind of operation (from an extra eager run)",
    },
    Setting {
        name: "TURBOPI_GOLDEN",
        kind: Kind::Path,
        default: "tests/golden of the source tree",
        read_by: ReadBy::Tests,
        meaning: "the golden vectors the GPU tests compare against (for test binaries run away from the source tree, as tools/gpu_tests.sh does)",
    },
    Setting {
        name: "TURBOPI_FUZZ_CASES",
        kind: Kind::Count,
        default: "each target's own",
        read_by: ReadBy::Tests,
        meaning: "cases per fuzz target",
    },
    Setting {
        name: "TURBOPI_FUZZ_SEED",
        kind: Kind::Seed,
        default: "a fixed seed",
        read_by: ReadBy::Tests,
        meaning: "the fuzz targets' first seed (decimal or 0x hex); a failure prints the seed to rerun with",
    },
    Setting {
        name: "TURBOPI_FUZZ_VERBOSE",
        kind: Kind::Flag,
        default: "off",
        read_by: ReadBy::Tests,
        meaning: "fuzz targets also print the most frequent error kinds",
    },
];

/// The entry of `name` in [`SETTINGS`].
pub fn lookup(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

fn invalid(name: &str, value: &str, expected: &str) -> Error {
    Error::InvalidConfig(format!("env {name}={value:?}: expected {expected}"))
}

/// A boolean: exactly `1|0|true|false|on|off|yes|no`, in any case, surrounding blanks
/// ignored. Anything else is an error naming `name` and the accepted words.
pub fn parse_bool(name: &str, value: &str) -> Result<bool> {
    let v = value.trim();
    let on = ["1", "true", "on", "yes"];
    let off = ["0", "false", "off", "no"];
    if on.iter().any(|w| v.eq_ignore_ascii_case(w)) {
        Ok(true)
    } else if off.iter().any(|w| v.eq_ignore_ascii_case(w)) {
        Ok(false)
    } else {
        Err(invalid(name, value, &format!("a boolean: {BOOL_WORDS}")))
    }
}

/// One of `accepted` (exactly, after trimming blanks); anything else is an error naming
/// `name` and every accepted value.
pub fn parse_choice<'a>(name: &str, value: &str, accepted: &[&'a str]) -> Result<&'a str> {
    let v = value.trim();
    accepted.iter().copied().find(|&a| a == v).ok_or_else(|| {
        let list: Vec<String> = accepted.iter().map(|a| format!("`{a}`")).collect();
        invalid(name, value, &format!("one of {}", list.join(", ")))
    })
}

/// `name`'s value; `None` when unset or empty (a graph's `${VAR:-}` gives an empty value).
pub fn raw(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(Error::InvalidConfig(format!("env {name}: {e}"))),
    }
}

/// Flag `name` read now (not cached); `default` when unset.
pub fn read_flag(name: &str, default: bool) -> Result<bool> {
    match raw(name)? {
        Some(v) => parse_bool(name, &v),
        None => Ok(default),
    }
}

/// Count `name` read now (not cached); `default` when unset.
pub fn read_count(name: &str, default: usize) -> Result<usize> {
    match raw(name)? {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| invalid(name, &v, "a non-negative integer")),
        None => Ok(default),
    }
}

/// Seed `name` read now (decimal or `0x` hex); `default` when unset.
pub fn read_seed(name: &str, default: u64) -> Result<u64> {
    match raw(name)? {
        Some(v) => {
            let t = v.trim();
            match t.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            }
            .map_err(|_| invalid(name, &v, "an integer (decimal or 0x hex)"))
        }
        None => Ok(default),
    }
}

/// The cache of each flag, by its index in [`SETTINGS`]: the value, or the error's text.
static FLAGS: [OnceLock<std::result::Result<bool, String>>; COUNT] =
    [const { OnceLock::new() }; COUNT];

/// Flag `name` (a [`Kind::Flag`] of [`SETTINGS`]), read once per process and then cached,
/// so that it may be asked for on every launch. `default` is the table's default.
pub fn flag(name: &str, default: bool) -> Result<bool> {
    let Some(i) = SETTINGS
        .iter()
        .position(|s| s.name == name && s.kind == Kind::Flag)
    else {
        return Err(Error::InvalidConfig(format!(
            "internal: {name} is not a flag of operators::settings::SETTINGS"
        )));
    };
    debug_assert_eq!(
        SETTINGS[i].default,
        if default { "on" } else { "off" },
        "{name}: the default differs from the settings table"
    );
    FLAGS[i]
        .get_or_init(|| read_flag(name, default).map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::InvalidConfig)
}

/// `TURBOPI_CUDA_DEVICE`: the device index the CUDA backend opens (default 0), cached.
pub fn cuda_device() -> Result<usize> {
    static DEVICE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    DEVICE
        .get_or_init(|| read_count("TURBOPI_CUDA_DEVICE", 0).map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::InvalidConfig)
}

/// `TURBOPI_KERNEL_CACHE`: the folder of compiled kernels, or `None` when off (or when
/// neither `XDG_CACHE_HOME` nor `HOME` gives a default).
pub fn kernel_cache() -> Result<Option<PathBuf>> {
    let name = "TURBOPI_KERNEL_CACHE";
    let default = || {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("turbopi").join("kernels"))
    };
    match raw(name)? {
        None => Ok(default()),
        Some(v) => match parse_bool(name, &v) {
            Ok(true) => Ok(default()),
            Ok(false) => Ok(None),
            Err(_) => Ok(Some(PathBuf::from(v))),
        },
    }
}

/// `TURBOPI_OVERLAP_SMS`: the SMs the vision and prefix stages' cuBLASLt products may
/// target, `None` for all (unset or 0).
pub fn overlap_sms() -> Result<Option<u32>> {
    let name = "TURBOPI_OVERLAP_SMS";
    let n = read_count(name, 0)?;
    let n = u32::try_from(n).map_err(|_| invalid(name, &n.to_string(), "a number of SMs"))?;
    Ok((n > 0).then_some(n))
}

/// How the vision tower's attention runs ([`vision_attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAttention {
    /// One block per 64 query rows over every key (online softmax).
    Flash,
    /// One block per 64 rows and 64 keys, then a combine.
    Chunks,
}

/// `TURBOPI_VISION_ATTENTION` (default `flash`), read now.
pub fn vision_attention() -> Result<VisionAttention> {
    let name = "TURBOPI_VISION_ATTENTION";
    Ok(match raw(name)? {
        None => VisionAttention::Flash,
        Some(v) => match parse_choice(name, &v, &["flash", "chunks"])? {
            "chunks" => VisionAttention::Chunks,
            _ => VisionAttention::Flash,
        },
    })
}

/// How the prefix's attention runs ([`prefix_attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixAttention {
    /// Two cuBLASLt products around a masked softmax.
    Gemm,
    /// The tensor-core kernel with an online softmax, the keys split `splits` ways (`None`:
    /// the fewest whose blocks cover every SM).
    Flash { splits: Option<usize> },
}

/// `TURBOPI_PREFIX_ATTENTION` (default `gemm`), read now.
pub fn prefix_attention() -> Result<PrefixAttention> {
    let name = "TURBOPI_PREFIX_ATTENTION";
    match raw(name)? {
        None => Ok(PrefixAttention::Gemm),
        Some(v) => parse_prefix_attention(name, &v),
    }
}

/// A [`PrefixAttention`]: `gemm`, `flash` or `flash:N` (N from 1 to 64); anything else is an
/// error naming `name` and the accepted forms.
pub fn parse_prefix_attention(name: &str, v: &str) -> Result<PrefixAttention> {
    let t = v.trim();
    let bad = || invalid(name, v, "`flash`, `flash:N` (N from 1 to 64) or `gemm`");
    match t {
        "gemm" => Ok(PrefixAttention::Gemm),
        "flash" => Ok(PrefixAttention::Flash { splits: None }),
        _ => {
            let n: usize = t
                .strip_prefix("flash:")
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(bad)?;
            if (1..=64).contains(&n) {
                Ok(PrefixAttention::Flash { splits: Some(n) })
            } else {
                Err(bad())
            }
        }
    }
}

/// `TURBOPI_FP8_STAGES`: the stages `--dtype fp8` puts in FP8 (default all; the CUDA
/// backend narrows an unset one where W8A8 would run slower: [`fp8_stages_asked`]).
pub fn fp8_stages() -> Result<crate::fp8::Stages> {
    Ok(fp8_stages_asked()?.unwrap_or(crate::fp8::Stages::ALL))
}

/// `TURBOPI_FP8_STAGES` where it is set, None where it is not.
pub fn fp8_stages_asked() -> Result<Option<crate::fp8::Stages>> {
    let name = "TURBOPI_FP8_STAGES";
    raw(name)?
        .map(|v| crate::fp8::Stages::parse(name, &v))
        .transpose()
}

/// `TURBOPI_PROFILE`: `turbopi bench` prints a denoise profile (default off).
pub fn profile() -> Result<bool> {
    read_flag("TURBOPI_PROFILE", false)
}

/// `TURBOPI_GOLDEN`: the golden vectors' folder, when set.
pub fn golden() -> Result<Option<PathBuf>> {
    Ok(raw("TURBOPI_GOLDEN")?.map(PathBuf::from))
}

/// `TURBOPI_FUZZ_CASES`: cases per fuzz target (`default`: the target's own).
pub fn fuzz_cases(default: usize) -> Result<usize> {
    read_count("TURBOPI_FUZZ_CASES", default)
}

/// `TURBOPI_FUZZ_SEED`: the fuzz targets' first seed.
pub fn fuzz_seed(default: u64) -> Result<u64> {
    read_seed("TURBOPI_FUZZ_SEED", default)
}

/// `TURBOPI_FUZZ_VERBOSE`: fuzz targets print their error kinds (default off).
pub fn fuzz_verbose() -> Result<bool> {
    read_flag("TURBOPI_FUZZ_VERBOSE", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_attention_parses_its_forms_and_names_bad_ones() {
        let p = |v: &str| parse_prefix_attention("TURBOPI_PREFIX_ATTENTION", v);
        assert_eq!(p("gemm").unwrap(), PrefixAttention::Gemm);
        assert_eq!(
            p(" flash ").unwrap(),
            PrefixAttention::Flash { splits: None }
        );
        assert_eq!(
            p("flash:3").unwrap(),
            PrefixAttention::Flash { splits: Some(3) }
        );
        for bad in [
            "flash:0", "flash:65", "flash:", "flash:x", "GEMM", "fused", "2",
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.contains("TURBOPI_PREFIX_ATTENTION") && e.contains("flash:N"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn booleans_parse_one_way() {
        for v in ["1", "true", "TRUE", "On", " yes ", "YES"] {
            assert!(parse_bool("X", v).unwrap(), "{v}");
        }
        for v in ["0", "false", "False", "OFF", "no", "\tNo\n"] {
            assert!(!parse_bool("X", v).unwrap(), "{v}");
        }
        for v in ["", "2", "y", "n", "enabled", "true1", "o n", "-1"] {
            let e = parse_bool("SOME_FLAG", v).unwrap_err().to_string();
            assert!(
                e.contains("SOME_FLAG") && e.contains(BOOL_WORDS),
                "{v:?}: {e}"
            );
        }
    }

    #[test]
    fn choices_name_every_accepted_value() {
        assert_eq!(
            parse_choice("T", " host ", &["host", "cuda-ipc"]).unwrap(),
            "host"
        );
        let e = parse_choice("TRANSPORT", "ipc", &["host", "cuda-ipc"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TRANSPORT=\"ipc\"") && e.contains("`host`, `cuda-ipc`"),
            "{e}"
        );
    }

    #[test]
    fn the_table_is_consistent() {
        for (i, s) in SETTINGS.iter().enumerate() {
            assert!(s.name.starts_with("TURBOPI_"), "{}", s.name);
            assert!(
                SETTINGS[..i].iter().all(|o| o.name != s.name),
                "{} twice",
                s.name
            );
            assert!(!s.meaning.is_empty() && !s.default.is_empty(), "{}", s.name);
            if s.kind == Kind::Flag {
                assert!(
                    parse_bool(s.name, s.default).is_ok(),
                    "{}: a flag's default is a boolean word",
                    s.name
                );
            }
        }
        assert_eq!(
            lookup("TURBOPI_FUSED_GATE").map(|s| s.kind),
            Some(Kind::Flag)
        );
        assert!(lookup("NO_SUCH_SETTING").is_none());
    }

    #[test]
    fn unknown_flags_are_refused() {
        let e = flag("TURBOPI_CUDA_DEVICE", false).unwrap_err().to_string();
        assert!(e.contains("not a flag"), "{e}");
        let e = flag("NO_SUCH_SETTING", false).unwrap_err().to_string();
        assert!(e.contains("NO_SUCH_SETTING"), "{e}");
    }

    /// Every `TURBOPI_*` name in the workspace's Rust sources and graphs is in
    /// docs/settings.md, and every process setting of [`SETTINGS`] too.
    #[test]
    fn docs_table_lists_every_turbopi_variable() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let docs = std::fs::read_to_string(root.join("docs/settings.md")).unwrap();
        let documented: std::collections::BTreeSet<String> = docs
            .lines()
            .filter(|l| l.starts_with('|'))
            .flat_map(turbopi_names)
            .collect();
        let mut found = std::collections::BTreeMap::<String, PathBuf>::new();
        let mut stack = vec![
            root.join("operators"),
            root.join("nodes"),
            root.join("tools"),
            root.join("tests"),
            root.join("graphs"),
        ];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if path.is_dir() {
                    if !matches!(name, "target" | "golden" | "out") && !name.starts_with('.') {
                        stack.push(path);
                    }
                } else if name.ends_with(".rs") || name.ends_with(".yml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for n in turbopi_names(&text) {
                        found.entry(n).or_insert_with(|| path.clone());
                    }
                }
            }
        }
        assert!(
            found.contains_key("TURBOPI_FUSED_GATE"),
            "the scan found nothing"
        );
        let missing: Vec<String> = found
            .iter()
            .filter(|(n, _)| !documented.contains(*n))
            .map(|(n, p)| format!("{n} (read in {})", p.display()))
            .collect();
        assert!(missing.is_empty(), "not in docs/settings.md: {missing:?}");
        for s in &SETTINGS {
            assert!(
                documented.contains(s.name),
                "{} not in docs/settings.md",
                s.name
            );
        }
    }

    /// The names of `TURBOPI_` variables in `text` (not the bare prefix of `TURBOPI_*`).
    fn turbopi_names(text: &str) -> Vec<String> {
        let mut out = vec![];
        let mut rest = text;
        while let Some(i) = rest.find("TURBOPI_") {
            let tail = &rest[i + "TURBOPI_".len()..];
            let len = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..len].trim_end_matches('_');
            if !name.is_empty() {
                out.push(format!("TURBOPI_{name}"));
            }
            rest = &tail[len..];
        }
        out
    }
}

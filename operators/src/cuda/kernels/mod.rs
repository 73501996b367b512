//! The kernels: one CUDA file per family (`*.cu`, plus the shared `prelude.cuh`) next to its
//! Rust launchers (`*.rs`, each naming its CPU twin in [`crate::cpu`]). The `registry!` table
//! below is the only list of them: the program NVRTC compiles, the [`Kernels`] struct and its
//! lookup, and the tests all come from it. Values the CUDA files share with Rust reach them as
//! `-D` defines ([`defines`]), so each exists once, in Rust.

pub mod activation;
pub mod attention;
pub mod embed;
pub mod euler;
pub mod fp8;
pub mod layer_norm;
pub mod mlp;
pub mod patch;
pub mod residual;
pub mod rms_norm;
pub mod rope;
pub mod skinny;

use std::fmt::Write as _;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

use crate::cuda::device::{CudaResult, DType};
use crate::{cpu, Result};

/// Where a file's kernels exist in a compiled module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// In every program.
    Always,
    /// In the bf16 program for sm_80 or newer only (tensor-core instructions; elsewhere the
    /// file compiles to nothing).
    Bf16Sm80,
}

impl Needs {
    /// Whether the kernels are in the program of `act` for compute capability `cc`.
    pub fn met(self, act: DType, cc: (i32, i32)) -> bool {
        match self {
            Needs::Always => true,
            Needs::Bf16Sm80 => act == DType::Bf16 && cc.0 >= 8,
        }
    }
}

/// One source file of the program.
#[derive(Debug)]
pub struct KernelFile {
    /// The name NVRTC reports errors under (set by `#line`): `kernels/<file>`.
    pub path: &'static str,
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub kernels: &'static [&'static str],
    pub needs: Needs,
}

/// `file, needs => [kernel, ...]`, in program order: the files (embedded with `include_str!`)
/// become [`FILES`]; each kernel becomes a field of [`Kernels`] (an `Option` unless its file
/// is `Always` present), found by name in the loaded module.
macro_rules! registry {
    (@field Always) => { CudaFunction };
    (@field $needs:ident) => { Option<CudaFunction> };
    (@find Always, $find:ident, $act:ident, $cc:ident, $kernel:ident) => {
        $find(stringify!($kernel))?
    };
    (@find $needs:ident, $find:ident, $act:ident, $cc:ident, $kernel:ident) => {
        if Needs::$needs.met($act, $cc) {
            Some($find(stringify!($kernel))?)
        } else {
            None
        }
    };
    ($($file:literal, $needs:ident => [$($kernel:ident),* $(,)?]),* $(,)?) => {
        /// Every source file of the program, in order.
        pub const FILES: &[KernelFile] = &[$(KernelFile {
            path: concat!("kernels/", $file),
            source: include_str!($file),
            kernels: &[$(stringify!($kernel)),*],
            needs: Needs::$needs,
        }),*];

        /// The compiled kernels of one precision (`act` = F32 or Bf16), loaded by
        /// [`Kernels::load`].
        pub struct Kernels {
            pub act: DType,
            $($(pub(crate) $kernel: registry!(@field $needs),)*)*
            _module: Arc<CudaModule>,
        }

        impl Kernels {
            /// Finds every kernel of `act` on compute capability `cc` in `module`.
            fn lookup(module: Arc<CudaModule>, act: DType, cc: (i32, i32)) -> Result<Kernels> {
                let find = |name: &str| {
                    module
                        .load_function(name)
                        .cuda(&format!("finding kernel `{name}` in the compiled module"))
                };
                Ok(Kernels {
                    act,
                    $($($kernel: registry!(@find $needs, find, act, cc, $kernel),)*)*
                    _module: Arc::clone(&module),
                })
            }
        }
    };
}

registry! {
    "prelude.cuh", Always => [],
    "layer_norm.cu", Always => [layer_norm],
    "rms_norm.cu", Always => [rms_norm],
    "mlp.cu", Always => [gelu_gate],
    "activation.cu", Always => [bias_act],
    "residual.cu", Always => [add_residual, add_act],
    "rope.cu", Always => [rope_qkv],
    "attention.cu", Always => [softmax_masked, unpermute_heads],
    "attention_fused.cu", Bf16Sm80 => [attention_chunk, attention_flash, attention_combine],
    "skinny.cu", Bf16Sm80 => [
        skinny_gemm,
        skinny_gemm_geglu,
        skinny_gemm_rope,
        skinny_gemm_fp8,
        skinny_gemm_fp8_wide,
        skinny_gemm_fp8_geglu,
    ],
    "patch.cu", Always => [unit_pixels, im2col, patch_embed_finish],
    "embed.cu", Always => [embed_tokens],
    "euler.cu", Always => [euler_step, euler_step_guided],
    "fill.cu", Always => [fill_uniform],
    "fp8.cu", Always => [quantise_e4m3, rescale_e4m3],
}

impl Kernels {
    /// The kernels of `act` for compute capability `cc` from the loaded program `module`,
    /// ready to launch.
    pub(crate) fn from_module(
        module: Arc<CudaModule>,
        act: DType,
        cc: (i32, i32),
    ) -> Result<Kernels> {
        let k = Kernels::lookup(module, act, cc)?;
        attention::allow_shared_memory(&k)?;
        Ok(k)
    }
}

/// The `-D` defines of the program of `act`: the precision and every value a CUDA file
/// shares with Rust. Each is required: the program stops with an `#error` naming a missing
/// one.
pub fn defines(act: DType) -> Vec<(&'static str, String)> {
    use attention::{
        FUSED_KEYS, FUSED_MAX_HD, FUSED_MAX_SPLITS, FUSED_PAD, FUSED_ROWS, FUSED_THREADS,
    };
    vec![
        ("TP_BF16", u8::from(act == DType::Bf16).to_string()),
        ("TP_GELU_BETA", f32_literal(cpu::GELU_TANH_BETA)),
        ("TP_GELU_KAPPA", f32_literal(cpu::GELU_TANH_KAPPA)),
        ("TP_ACT_SILU", (activation::Act::Silu as i32).to_string()),
        (
            "TP_ACT_GELU_TANH",
            (activation::Act::GeluTanh as i32).to_string(),
        ),
        ("TP_IMAGE_CHANNELS", patch::CHANNELS.to_string()),
        ("TP_FA_KEYS", FUSED_KEYS.to_string()),
        ("TP_FA_ROWS", FUSED_ROWS.to_string()),
        ("TP_FA_THREADS", FUSED_THREADS.to_string()),
        ("TP_FA_PAD", FUSED_PAD.to_string()),
        ("TP_FA_MAX_SPLITS", FUSED_MAX_SPLITS.to_string()),
        ("TP_FA_MAX_HD", FUSED_MAX_HD.to_string()),
        ("TP_SK_UNROLL", skinny::UNROLL.to_string()),
        ("TP_SK_WARPS", skinny::WARPS.to_string()),
        ("TP_SK_TILES", skinny::TILES.to_string()),
        ("TP_SK8W_WARPS", skinny::WIDE_WARPS.to_string()),
        ("TP_SK8W_TILES", skinny::WIDE_TILES.to_string()),
    ]
}

/// `v` as a CUDA float literal of the same value: Rust prints the shortest decimal that
/// parses back to `v` (and "1.0", never "1", so the `f` suffix is always valid).
fn f32_literal(v: f32) -> String {
    format!("{v:?}f")
}

/// The whole program (the same text for both precisions: [`defines`] differ): a check that
/// every define was given, then each of [`FILES`] after `#line 1 "kernels/<file>"`, so that
/// NVRTC reports an error at the line of the kernel's own file.
pub fn program_source() -> String {
    let mut s =
        String::from("// turbo-pi kernels: operators/src/cuda/kernels, in registry order\n");
    for (name, _) in defines(DType::F32) {
        let _ = write!(
            s,
            "#if !defined({name})\n#error \"{name} must be given as -D{name}=... (kernels::defines)\"\n#endif\n"
        );
    }
    for file in FILES {
        let _ = writeln!(s, "#line 1 \"{}\"", file.path);
        s.push_str(file.source);
        if !file.source.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the `__global__` functions defined in `src`, in order (skipping a
    /// `__launch_bounds__(..)` between `void` and the name).
    fn global_kernels(src: &str) -> Vec<&str> {
        let mut names = Vec::new();
        for (at, _) in src.match_indices("__global__ void") {
            let mut rest = src[at + "__global__ void".len()..].trim_start();
            if let Some(after) = rest.strip_prefix("__launch_bounds__") {
                let close = after.find(')').expect("__launch_bounds__(..) closes");
                rest = after[close + 1..].trim_start();
            }
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(&rest[..end]);
        }
        names
    }

    fn registered() -> Vec<&'static str> {
        FILES
            .iter()
            .flat_map(|f| f.kernels.iter().copied())
            .collect()
    }

    #[test]
    fn each_file_defines_exactly_its_registered_kernels() {
        for file in FILES {
            assert_eq!(global_kernels(file.source), file.kernels, "{}", file.path);
        }
        let mut names = registered();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a kernel is registered twice");
    }

    #[test]
    fn program_has_one_line_directive_per_file_and_every_kernel_once() {
        let src = program_source();
        for file in FILES {
            let line = format!("#line 1 \"{}\"\n", file.path);
            assert_eq!(src.matches(&line).count(), 1, "{}", file.path);
            assert!(file.path.starts_with("kernels/"));
        }
        assert_eq!(src.matches("#line").count(), FILES.len());
        // Each file right after its directive, in registry order.
        let mut at = 0;
        for file in FILES {
            let head = format!("#line 1 \"{}\"\n{}", file.path, file.source);
            let found = src[at..].find(&head).expect("file after its #line") + at;
            at = found + head.len();
        }
        let mut kernels = global_kernels(&src);
        kernels.sort_unstable();
        let mut want = registered();
        want.sort_unstable();
        assert_eq!(kernels, want);
        assert!(
            !src.contains("#include"),
            "kernels must not need CUDA headers"
        );
    }

    #[test]
    fn every_shared_constant_comes_from_a_define() {
        let names: Vec<&str> = defines(DType::F32).into_iter().map(|(n, _)| n).collect();
        let mut used = Vec::new();
        for file in FILES {
            assert!(
                !file.source.contains("#define") && !file.source.contains("#ifndef"),
                "{}: constants come from kernels::defines, with no fallback",
                file.path
            );
            let bytes = file.source.as_bytes();
            for (at, _) in file.source.match_indices("TP_") {
                let boundary = at == 0 || {
                    let c = bytes[at - 1];
                    !(c.is_ascii_alphanumeric() || c == b'_')
                };
                if !boundary {
                    continue;
                }
                let rest = &file.source[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                if name.ends_with('_') {
                    continue; // a family named in a comment: TP_FA_*
                }
                assert!(
                    names.contains(&name),
                    "{}: {name} is not a define",
                    file.path
                );
                used.push(name);
            }
        }
        for name in &names {
            assert!(used.contains(name), "define {name} is used by no file");
        }
        let src = program_source();
        for name in &names {
            assert!(
                src.contains(&format!("#if !defined({name})\n#error")),
                "{name}"
            );
        }
    }

    #[test]
    fn defines_carry_the_rust_values() {
        for act in [DType::F32, DType::Bf16] {
            let d = defines(act);
            let get = |n: &str| d.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
            assert_eq!(
                get("TP_BF16").as_deref(),
                Some(if act == DType::Bf16 { "1" } else { "0" })
            );
            assert_eq!(get("TP_FA_KEYS"), Some(attention::FUSED_KEYS.to_string()));
            assert_eq!(
                get("TP_FA_MAX_SPLITS"),
                Some(attention::FUSED_MAX_SPLITS.to_string())
            );
            assert_eq!(get("TP_ACT_SILU"), Some("1".to_string()));
            for (name, c) in [
                ("TP_GELU_BETA", cpu::GELU_TANH_BETA),
                ("TP_GELU_KAPPA", cpu::GELU_TANH_KAPPA),
            ] {
                let text = get(name).expect("defined");
                let parsed: f32 = text.trim_end_matches('f').parse().expect("a decimal");
                assert_eq!(parsed.to_bits(), c.to_bits(), "{name} = {text}");
            }
        }
        assert_eq!(f32_literal(1.0), "1.0f");
    }

    #[test]
    fn optional_kernels_need_bf16_on_sm80() {
        assert!(Needs::Always.met(DType::F32, (7, 5)));
        assert!(Needs::Bf16Sm80.met(DType::Bf16, (8, 0)));
        assert!(Needs::Bf16Sm80.met(DType::Bf16, (12, 0)));
        assert!(!Needs::Bf16Sm80.met(DType::F32, (9, 0)));
        assert!(!Needs::Bf16Sm80.met(DType::Bf16, (7, 5)));
    }
}

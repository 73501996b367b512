//! Run-time compilation of the kernels with NVRTC for the device's own architecture (so the
//! same binary serves H100 sm_90 and newer parts), cached in memory as one loaded module per
//! precision and on disk under the user's cache directory, keyed by source, options and
//! NVRTC version.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{sys, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::device::{CudaResult, DType, Device};
use super::{
    activation, attention, embed, euler, layer_norm, mlp, patch, residual, rms_norm, rope, weights,
};
use crate::{Error, Result};

/// Helpers shared by every kernel family. `act_t` is the element type of weights and of the
/// activations that feed GEMMs (f32, or bf16 kept as its 16 bits: the kernels convert by hand
/// and need no CUDA header, so NVRTC needs no include path); the residual stream, norm
/// statistics and softmax are f32. No fast-math: the kernels match the CPU twins.
const PRELUDE: &str = r#"
#if TP_BF16
typedef unsigned short act_t;
#else
typedef float act_t;
#endif

__device__ __forceinline__ float tp_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float tp_load(const unsigned short* p, long long i) {
  return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void tp_store(float* p, long long i, float v) { p[i] = v; }
// Round to nearest even, NaN kept quiet: the same rounding as half::bf16::from_f32.
__device__ __forceinline__ void tp_store(unsigned short* p, long long i, float v) {
  unsigned int u = __float_as_uint(v);
  unsigned short r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r = (unsigned short)((u >> 16) | 0x40u);
  } else {
    r = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  p[i] = r;
}
__device__ __forceinline__ float tp_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float tp_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float tp_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double tp_warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
// `red` is __shared__ double[32]; the leading barrier makes back-to-back calls safe.
__device__ double tp_block_sum_d(double v, double* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = tp_warp_sum_d(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < warps ? red[lane] : 0.0;
    t = tp_warp_sum_d(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// PyTorch's gelu(approximate="tanh"), as cpu::gelu_tanh.
__device__ __forceinline__ float tp_gelu_tanh(float x) {
  const float k_beta = 0.7978846f;
  const float k_kappa = 0.044715f;
  return 0.5f * x * (1.0f + tanhf(k_beta * (x + k_kappa * x * x * x)));
}
// As cpu::silu.
__device__ __forceinline__ float tp_silu(float x) { return x / (1.0f + expf(-x)); }
"#;

/// The full CUDA program for one precision (what NVRTC compiles).
pub fn program_source(act: DType) -> String {
    let mut s = format!(
        "// turbo-pi kernels\n#define TP_BF16 {}\n",
        u8::from(act == DType::Bf16)
    );
    for part in [
        PRELUDE,
        layer_norm::SOURCE,
        rms_norm::SOURCE,
        mlp::SOURCE,
        activation::SOURCE,
        residual::SOURCE,
        rope::SOURCE,
        attention::SOURCE,
        attention::FUSED_SOURCE,
        patch::SOURCE,
        embed::SOURCE,
        euler::SOURCE,
        weights::SOURCE,
    ] {
        s.push_str(part);
        s.push('\n');
    }
    s
}

/// The two kernels of [`attention::fused_attention`].
pub(crate) struct FusedAttention {
    pub(crate) chunk: CudaFunction,
    pub(crate) combine: CudaFunction,
}

/// The compiled kernels of one precision (`act` = F32 or Bf16).
pub struct Kernels {
    pub act: DType,
    pub(crate) layer_norm: CudaFunction,
    pub(crate) rms_norm: CudaFunction,
    pub(crate) gelu_gate: CudaFunction,
    pub(crate) bias_act: CudaFunction,
    pub(crate) add_residual: CudaFunction,
    pub(crate) rope_qkv: CudaFunction,
    pub(crate) softmax_masked: CudaFunction,
    pub(crate) unpermute_heads: CudaFunction,
    pub(crate) im2col: CudaFunction,
    pub(crate) patch_embed_finish: CudaFunction,
    pub(crate) embed_tokens: CudaFunction,
    pub(crate) euler_step: CudaFunction,
    pub(crate) fill_uniform: CudaFunction,
    /// The tensor-core attention (bf16 on sm_80 and newer only).
    pub(crate) fused_attention: Option<FusedAttention>,
    _module: Arc<CudaModule>,
}

impl Kernels {
    /// Compiles (or finds in the disk cache) and loads the kernels for `act` on `dev`.
    pub fn load(dev: &Device, act: DType) -> Result<Kernels> {
        if !matches!(act, DType::F32 | DType::Bf16) {
            return Err(Error::Cuda(format!("internal: kernels for {act:?}")));
        }
        dev.bind()?;
        let src = program_source(act);
        let image = compiled_image(&src, act, dev.cc)?;
        let module = dev
            .ctx
            .load_module(image)
            .cuda("loading the compiled kernels into the context")?;
        let f = |name: &str| {
            module
                .load_function(name)
                .cuda(&format!("finding kernel `{name}` in the compiled module"))
        };
        Ok(Kernels {
            act,
            layer_norm: f("layer_norm")?,
            rms_norm: f("rms_norm")?,
            gelu_gate: f("gelu_gate")?,
            bias_act: f("bias_act")?,
            add_residual: f("add_residual")?,
            rope_qkv: f("rope_qkv")?,
            softmax_masked: f("softmax_masked")?,
            unpermute_heads: f("unpermute_heads")?,
            im2col: f("im2col")?,
            patch_embed_finish: f("patch_embed_finish")?,
            embed_tokens: f("embed_tokens")?,
            euler_step: f("euler_step")?,
            fill_uniform: f("fill_uniform")?,
            fused_attention: if act == DType::Bf16 && dev.cc.0 >= 8 {
                let chunk = f("attention_chunk")?;
                chunk
                    .set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        attention::FUSED_MAX_SMEM as i32,
                    )
                    .cuda("allowing the attention kernel its shared memory")?;
                Some(FusedAttention {
                    chunk,
                    combine: f("attention_combine")?,
                })
            } else {
                None
            },
            _module: module,
        })
    }
}

/// Compiles the kernels of `act` for compute capability `cc` into a cubin with NVRTC. Needs
/// no GPU: it checks the sources, or fills a cache ahead of time.
pub fn compile_kernels(act: DType, cc: (i32, i32)) -> Result<Vec<u8>> {
    // SAFETY: the probe only tries to dlopen NVRTC's candidate names.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(Error::Cuda("NVRTC not found (libnvrtc.so.13)".into()));
    }
    let arch = format!("sm_{}{}", cc.0, cc.1);
    super::device::guard("compiling the kernels", || {
        compile(&program_source(act), &options(act, &arch), true)
    })
}

fn options(act: DType, arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        // Strict mode keeps every multiply and add separately rounded, as the CPU twins.
        format!("--fmad={}", act == DType::Bf16),
        "--std=c++17".into(),
    ]
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: plain out-parameters.
    let _ = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// FNV-1a: a hash that is stable across builds (the std hasher is not), for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TURBOPI_KERNEL_CACHE") {
        if dir == "off" {
            return None;
        }
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("turbopi").join("kernels"))
}

/// A cubin for `sm_XY` (from the disk cache or NVRTC); PTX for `compute_XY` when this NVRTC
/// cannot emit a cubin for the device (the driver then compiles it at load).
fn compiled_image(src: &str, act: DType, cc: (i32, i32)) -> Result<Ptx> {
    let arch = format!("sm_{}{}", cc.0, cc.1);
    let opts = options(act, &arch);
    let ver = nvrtc_version();
    let key = fnv1a(&[
        src.as_bytes(),
        opts.join(" ").as_bytes(),
        format!("nvrtc {}.{}", ver.0, ver.1).as_bytes(),
    ]);
    let cached = cache_dir().map(|d| d.join(format!("{key:016x}-{arch}.cubin")));
    if let Some(path) = &cached {
        if let Ok(bytes) = crate::fsio::read_limited(path, crate::fsio::limit::CUBIN, "cubin") {
            if bytes.len() > 16 && bytes.starts_with(b"\x7fELF") {
                return Ok(Ptx::from_binary(bytes));
            }
        }
    }
    match compile(src, &opts, true) {
        Ok(cubin) => {
            if let Some(path) = &cached {
                store(path, &cubin);
            }
            Ok(Ptx::from_binary(cubin))
        }
        Err(sm_err) => {
            let ptx_opts = options(act, &format!("compute_{}{}", cc.0, cc.1));
            match compile(src, &ptx_opts, false) {
                Ok(mut ptx) => {
                    // NVRTC's PTX ends with a NUL; the loader wants text without it.
                    while ptx.last() == Some(&0) {
                        ptx.pop();
                    }
                    let text = String::from_utf8(ptx)
                        .map_err(|_| Error::Cuda("NVRTC produced non-UTF-8 PTX".into()))?;
                    Ok(Ptx::from_src(text))
                }
                Err(_) => Err(sm_err),
            }
        }
    }
}

/// Best effort: a cache that cannot be written only costs a recompilation next time.
fn store(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Compiles `src` with `opts`; returns the cubin (`cubin == true`) or the PTX.
fn compile(src: &str, opts: &[String], cubin: bool) -> Result<Vec<u8>> {
    let c_src =
        CString::new(src).map_err(|_| Error::Cuda("internal: NUL in kernel source".into()))?;
    let name = c"turbopi_kernels.cu";
    let prog = nvrtc::create_program(&c_src, Some(name)).cuda("creating the NVRTC program")?;
    let out = compile_program(prog, opts, cubin);
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// Compiles the created program `prog` and extracts its cubin or PTX.
fn compile_program(prog: nvrtc_sys::nvrtcProgram, opts: &[String], cubin: bool) -> Result<Vec<u8>> {
    // SAFETY: `prog` was created by the caller, which destroys it only after this returns.
    if let Err(e) = unsafe { nvrtc::compile_program(prog, opts) } {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(prog) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        return Err(Error::Cuda(format!(
            "NVRTC failed to compile the kernels with {opts:?}: {e}\n{log}"
        )));
    }
    if cubin {
        let mut size = 0usize;
        // SAFETY: compiled program; `size` is an out-parameter.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .cuda("reading the cubin size")?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
            .result()
            .cuda("reading the cubin")?;
        Ok(buf)
    } else {
        // SAFETY: compiled program.
        let ptx = unsafe { nvrtc::get_ptx(prog) }.cuda("reading the PTX")?;
        Ok(ptx.into_iter().map(|c| c as u8).collect())
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_has_every_kernel_once_per_precision() {
        for act in [DType::F32, DType::Bf16] {
            let src = program_source(act);
            for name in [
                "layer_norm",
                "rms_norm",
                "gelu_gate",
                "bias_act",
                "add_residual",
                "rope_qkv",
                "softmax_masked",
                "unpermute_heads",
                "im2col",
                "patch_embed_finish",
                "embed_tokens",
                "euler_step",
                "fill_uniform",
            ] {
                let decl = format!("__global__ void {name}(");
                assert_eq!(src.matches(&decl).count(), 1, "{name}");
            }
            assert!(
                !src.contains("#include"),
                "kernels must not need CUDA headers"
            );
        }
        assert_ne!(
            fnv1a(&[program_source(DType::F32).as_bytes()]),
            fnv1a(&[program_source(DType::Bf16).as_bytes()])
        );
    }
}

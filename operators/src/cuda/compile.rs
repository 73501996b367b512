//! Run-time compilation of the kernels with NVRTC for the device's own architecture (so the
//! same binary serves H100 sm_90 and newer parts), cached in memory as one loaded module per
//! precision and on disk under the user's cache directory, keyed by source, options (the
//! `-D` defines among them) and NVRTC version. What the program holds is
//! [`super::kernels`]' business.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::device::{CudaResult, DType, Device};
use super::kernels::{self, program_source};
use crate::{Error, Result};

pub use super::kernels::Kernels;

impl Kernels {
    /// Compiles (or finds in the disk cache) and loads the kernels for `act` on `dev`.
    pub fn load(dev: &Device, act: DType) -> Result<Kernels> {
        if !matches!(act, DType::F32 | DType::Bf16) {
            return Err(Error::Cuda(format!("internal: kernels for {act:?}")));
        }
        dev.bind()?;
        let image = compiled_image(&program_source(), act, dev.cc)?;
        let module = dev
            .ctx
            .load_module(image)
            .cuda("loading the compiled kernels into the context")?;
        Kernels::from_module(module, act, dev.cc)
    }
}

/// Whether NVRTC can be loaded (it is needed to compile the kernels; no GPU is).
pub fn nvrtc_present() -> bool {
    // SAFETY: the probe only tries to dlopen NVRTC's candidate names.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// Compiles the kernels of `act` for compute capability `cc` into a cubin with NVRTC. Needs
/// no GPU: it checks the sources, or fills a cache ahead of time.
pub fn compile_kernels(act: DType, cc: (i32, i32)) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        return Err(Error::Cuda("NVRTC not found (libnvrtc.so.13)".into()));
    }
    let arch = format!("sm_{}{}", cc.0, cc.1);
    super::device::guard("compiling the kernels", || {
        compile(&program_source(), &options(act, &arch), true)
    })
}

/// NVRTC's options for `act` on `arch`: the flags, then the program's `-D` defines (which
/// select the precision and carry the constants shared with Rust).
fn options(act: DType, arch: &str) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        // Strict mode keeps every multiply and add separately rounded, as the CPU twins.
        format!("--fmad={}", act == DType::Bf16),
        "--std=c++17".into(),
    ];
    opts.extend(
        kernels::defines(act)
            .into_iter()
            .map(|(name, value)| format!("-D{name}={value}")),
    );
    opts
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

/// The disk-cache key of a program: its source, its options (the defines among them) and the
/// NVRTC version.
fn cache_key(src: &str, opts: &[String], nvrtc: (i32, i32)) -> u64 {
    fnv1a(&[
        src.as_bytes(),
        opts.join(" ").as_bytes(),
        format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes(),
    ])
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
    let key = cache_key(src, &opts, nvrtc_version());
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
    fn options_carry_every_define_after_the_flags() {
        for act in [DType::F32, DType::Bf16] {
            let opts = options(act, "sm_90");
            assert_eq!(
                &opts[..3],
                [
                    "--gpu-architecture=sm_90".to_string(),
                    format!("--fmad={}", act == DType::Bf16),
                    "--std=c++17".to_string()
                ]
            );
            let defines = kernels::defines(act);
            assert_eq!(opts.len(), 3 + defines.len());
            for (name, value) in &defines {
                let opt = format!("-D{name}={value}");
                assert_eq!(opts.iter().filter(|o| **o == opt).count(), 1, "{opt}");
            }
        }
        let bf16 = options(DType::Bf16, "sm_90");
        assert!(bf16.contains(&"-DTP_BF16=1".to_string()));
        assert!(options(DType::F32, "sm_90").contains(&"-DTP_BF16=0".to_string()));
    }

    #[test]
    fn cache_key_follows_precision_arch_and_source() {
        let src = program_source();
        let key = |act, arch| cache_key(&src, &options(act, arch), (13, 0));
        assert_ne!(key(DType::F32, "sm_90"), key(DType::Bf16, "sm_90"));
        assert_ne!(key(DType::Bf16, "sm_90"), key(DType::Bf16, "sm_87"));
        assert_ne!(
            key(DType::Bf16, "sm_90"),
            cache_key(&src, &options(DType::Bf16, "sm_90"), (12, 8))
        );
        assert_ne!(
            key(DType::Bf16, "sm_90"),
            cache_key(&format!("{src}\n"), &options(DType::Bf16, "sm_90"), (13, 0))
        );
    }
}

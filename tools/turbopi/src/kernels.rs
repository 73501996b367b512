//! `turbopi kernels compile`: the whole CUDA kernel set compiled by NVRTC for named
//! architectures, without running it (issue 14's targets: sm_87 Jetson Orin, sm_90 H100,
//! sm_100 B200, sm_110 Thor). Needs NVRTC at run time, no GPU.

use std::fmt;

use anyhow::{bail, Result};
use clap::Subcommand;
use operators::backend::Precision;

#[derive(Subcommand)]
pub enum KernelsCommand {
    /// Compile every kernel for each architecture and dtype with NVRTC, without a GPU.
    ///
    /// Needs NVRTC (libnvrtc.so.13) at run time. Prints `ok` with the cubin's size, or
    /// NVRTC's log, per architecture and dtype; exits non-zero if any fails. The fused
    /// attention (mma.sync, cp.async, ldmatrix) needs sm_80 or newer: below that the bf16
    /// program leaves it out and attention takes the GEMM path.
    Compile {
        /// Architectures, comma-separated: sm_87,sm_90,sm_100,sm_110 (sm_<major><minor>).
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_arch)]
        arch: Vec<Arch>,
        /// Dtypes of the programs, comma-separated: f32, bf16.
        #[arg(long, value_delimiter = ',', default_value = "f32,bf16", value_parser = parse_dtype)]
        dtype: Vec<Precision>,
        /// Also write each cubin to DIR as `turbopi-<arch>-<dtype>.cubin` (for
        /// `cuobjdump --dump-resource-usage`, or to look at the machine code).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
}

/// A real GPU architecture, `sm_<major><minor>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub major: i32,
    pub minor: i32,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// `sm_87` -> 8.7, `sm_100` -> 10.0 (the last digit is the minor version).
pub fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    let bad = || {
        format!("`{s}` is not an architecture: expected sm_<major><minor> such as sm_87 or sm_100")
    };
    let digits = s.trim().strip_prefix("sm_").ok_or_else(bad)?;
    if digits.len() < 2 || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    let major: i32 = major.parse().map_err(|_| bad())?;
    let minor: i32 = minor.parse().map_err(|_| bad())?;
    if major == 0 {
        return Err(bad());
    }
    Ok(Arch { major, minor })
}

fn parse_dtype(s: &str) -> std::result::Result<Precision, String> {
    match s.trim().parse() {
        Ok(Precision::Fp8) => Err(
            "fp8 has no kernel program of its own: its norms, attention and activations, its \
             quantisation and few-row FP8 product are the bf16 program's (--dtype bf16)"
                .into(),
        ),
        Ok(p) => Ok(p),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(cmd: KernelsCommand) -> Result<()> {
    match cmd {
        KernelsCommand::Compile { arch, dtype, out } => compile(&arch, &dtype, out.as_deref()),
    }
}

#[cfg(feature = "cuda")]
fn compile(archs: &[Arch], dtypes: &[Precision], out: Option<&std::path::Path>) -> Result<()> {
    use anyhow::Context as _;
    use operators::cuda::{compile, DType};
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cubin directory {}", dir.display()))?;
    }
    if !compile::nvrtc_present() {
        bail!(
            "NVRTC not found: `turbopi kernels compile` loads libnvrtc.so.13 at run time \
             (install CUDA 13's NVRTC or add its directory to LD_LIBRARY_PATH)"
        );
    }
    let mut failed = 0;
    for arch in archs {
        for &p in dtypes {
            let (act, name) = match p {
                Precision::F32 => (DType::F32, "f32"),
                Precision::Bf16 | Precision::Fp8 => (DType::Bf16, "bf16"),
            };
            let what = format!("{:<7} {name:<5}", arch.to_string());
            match compile::compile_kernels(act, (arch.major, arch.minor)) {
                Ok(cubin) => {
                    println!("{what} ok      cubin {} bytes", cubin.len());
                    if let Some(dir) = out {
                        let path = dir.join(format!("turbopi-{arch}-{name}.cubin"));
                        std::fs::write(&path, &cubin)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("{what} FAILED");
                    for line in e.to_string().lines() {
                        println!("    {line}");
                    }
                }
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} kernel compilations failed",
            archs.len() * dtypes.len()
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compile(_: &[Arch], _: &[Precision], _: Option<&std::path::Path>) -> Result<()> {
    bail!("CUDA support is not built in: rebuild with `cargo build --release --features cuda`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_parse_as_sm_major_minor() {
        let ok = |s: &str| parse_arch(s).unwrap();
        assert_eq!(ok("sm_87"), Arch { major: 8, minor: 7 });
        assert_eq!(ok("sm_90"), Arch { major: 9, minor: 0 });
        assert_eq!(
            ok("sm_100"),
            Arch {
                major: 10,
                minor: 0
            }
        );
        assert_eq!(
            ok("sm_110"),
            Arch {
                major: 11,
                minor: 0
            }
        );
        assert_eq!(ok("sm_110").to_string(), "sm_110");
        for bad in [
            "",
            "87",
            "sm_",
            "sm_9",
            "sm_90a",
            "compute_90",
            "sm_1000",
            "sm_07",
            "sm_x0",
        ] {
            let e = parse_arch(bad).unwrap_err();
            assert!(e.contains("sm_<major><minor>"), "{bad}: {e}");
        }
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(parse_dtype("bf16"), Ok(Precision::Bf16));
        assert_eq!(parse_dtype("f32"), Ok(Precision::F32));
        assert!(parse_dtype("f16").unwrap_err().contains("f32"));
    }
}

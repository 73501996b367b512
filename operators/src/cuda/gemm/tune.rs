//! Timing a GEMM plan's candidate algorithms on the real operands (see the parent module).
//! With `TURBOPI_GEMM_TUNE_COLD` (default on) each timed run follows a write of twice the L2
//! cache, so that the weights come from memory as they do in a frame, where one denoise step
//! alone reads far more weights than the cache holds; off, the runs go back to back and the
//! weights of the product under test stay in the cache.

use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};

use super::{Gemm, Operands, Plan};
use crate::cuda::device::{CudaResult, Lane};
use crate::{settings, Result};

/// Timed runs per candidate (after one warm-up run).
const TIMED_RUNS: usize = 5;

/// Whether plans time the heuristic's candidates (`TURBOPI_GEMM_AUTOTUNE`, default on).
pub(super) fn autotune_enabled() -> Result<bool> {
    settings::flag("TURBOPI_GEMM_AUTOTUNE", true)
}

/// Whether each timed run starts with the L2 cache flushed (`TURBOPI_GEMM_TUNE_COLD`).
pub(super) fn cold() -> Result<bool> {
    settings::flag("TURBOPI_GEMM_TUNE_COLD", true)
}

/// A device allocation that only lives for one autotuning.
struct Scratch(u64);

impl Scratch {
    fn alloc(bytes: usize) -> Result<Scratch> {
        // SAFETY: the caller bound the context; freed exactly once in Drop.
        let ptr = unsafe { drv::malloc_sync(bytes.max(256)) }
            .cuda("allocating the GEMM autotuning scratch")?;
        Ok(Scratch(ptr))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc in `alloc`, freed only here; the autotuner
        // synchronised the stream that wrote it.
        let _ = unsafe { drv::free_sync(self.0) };
    }
}

/// A buffer of twice the device's L2 cache, written before each cold run to evict it.
struct Flush {
    buf: Scratch,
    bytes: usize,
}

impl Flush {
    fn alloc(ctx: &CudaContext) -> Result<Flush> {
        let l2 = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .cuda("reading the L2 cache size")?;
        let bytes = 2 * usize::try_from(l2).unwrap_or(0).max(16 << 20);
        Ok(Flush {
            buf: Scratch::alloc(bytes)?,
            bytes,
        })
    }

    /// Queues the write on the lane.
    fn evict(&self, lane: &Lane) -> Result<()> {
        // SAFETY: the buffer holds `bytes` bytes (allocated in `alloc`) and lives until the
        // autotuner has synchronised the lane.
        unsafe { drv::memset_d8_async(self.buf.0, 0, self.bytes, lane.stream.cu_stream()) }
            .cuda("flushing the L2 cache")
    }
}

impl Gemm {
    /// Times every candidate on the real operands (output to a scratch buffer, so y is
    /// neither written nor, with beta = 1, accumulated twice) and returns the fastest, or
    /// None when no candidate ran. Synchronises the lane: never called while capturing.
    pub(super) fn fastest(
        &self,
        plan: &Plan,
        found: &[lt_sys::cublasLtMatmulHeuristicResult_t],
        ops: &Operands,
        lane: &Lane,
    ) -> Result<Option<lt_sys::cublasLtMatmulAlgo_t>> {
        self.ctx
            .bind_to_thread()
            .cuda("binding the CUDA context to this thread")?;
        lane.synchronize()?;
        let scratch = Scratch::alloc(ops.d_bytes)?;
        let flush = if cold()? {
            Some(Flush::alloc(&self.ctx)?)
        } else {
            None
        };
        let timed = Operands {
            d: scratch.0,
            ..*ops
        };
        let ev = |what| {
            self.ctx
                .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
                .cuda(what)
        };
        let (start, end) = (
            ev("creating a timing event")?,
            ev("creating a timing event")?,
        );
        let result = (|| -> Result<Option<lt_sys::cublasLtMatmulAlgo_t>> {
            let mut best: Option<(f32, lt_sys::cublasLtMatmulAlgo_t)> = None;
            // The candidates are deterministic (see `plan`) unless none was offered or
            // `TURBOPI_GEMM_DETERMINISTIC` is off.
            for cand in found {
                // SAFETY: the candidate was returned by the heuristic for this plan; `timed`
                // differs from the call's operands only in D, a scratch of D's span and of
                // at least D's alignment (cuMemAlloc aligns to 256 bytes).
                if unsafe { self.launch(plan, &cand.algo, &timed, lane) }.is_err() {
                    continue;
                }
                let mut ok = true;
                let ms = match &flush {
                    // Each run timed alone, after a write of twice the L2 cache.
                    Some(f) => {
                        let mut ms = 0.0f32;
                        for _ in 0..TIMED_RUNS {
                            f.evict(lane)?;
                            start
                                .record(&lane.stream)
                                .cuda("recording a timing event")?;
                            // SAFETY: as above.
                            ok &= unsafe { self.launch(plan, &cand.algo, &timed, lane) }.is_ok();
                            end.record(&lane.stream).cuda("recording a timing event")?;
                            ms += start.elapsed_ms(&end).cuda("timing a GEMM candidate")?;
                        }
                        ms
                    }
                    None => {
                        start
                            .record(&lane.stream)
                            .cuda("recording a timing event")?;
                        for _ in 0..TIMED_RUNS {
                            // SAFETY: as above.
                            ok &= unsafe { self.launch(plan, &cand.algo, &timed, lane) }.is_ok();
                        }
                        end.record(&lane.stream).cuda("recording a timing event")?;
                        start.elapsed_ms(&end).cuda("timing a GEMM candidate")?
                    }
                };
                if ok && ms.is_finite() && best.is_none_or(|(b, _)| ms < b) {
                    best = Some((ms, cand.algo));
                }
            }
            Ok(best.map(|(_, a)| a))
        })();
        // The scratch is freed on return: nothing may still be writing it.
        let synced = lane.synchronize();
        let best = result?;
        synced?;
        Ok(best)
    }
}

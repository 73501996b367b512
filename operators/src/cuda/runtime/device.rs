//! Device plumbing of the CUDA backend: the context (opened without panicking when no driver
//! is installed), device and pinned host buffers, sized device views, streams with their
//! cuBLASLt workspaces, and kernel launches with packed arguments.

use std::any::Any;
use std::ffi::c_void;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaStream};

use crate::{settings, Error, Result};

#[cfg(target_endian = "big")]
compile_error!("kernel arguments are packed into little-endian 8-byte slots");

/// Wraps a CUDA library error with what was being done.
pub(crate) fn cuda_err(what: impl Display, e: impl Display) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// `.cuda("what")` on any result of the CUDA bindings.
pub(crate) trait CudaResult<T> {
    fn cuda(self, what: &str) -> Result<T>;
}

impl<T, E: Display> CudaResult<T> for std::result::Result<T, E> {
    fn cuda(self, what: &str) -> Result<T> {
        self.map_err(|e| cuda_err(what, e))
    }
}

/// A size as the `int` a kernel takes.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Cuda(format!(
            "{what} = {v} does not fit a 32-bit kernel argument"
        ))
    })
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning a panic of the bindings (cudarc panics when a library or one of its
/// symbols is missing at run time) into an error.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Cuda(format!("{what}: {}", panic_text(p)))),
    }
}

/// Element type of device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 => 2,
            DType::U8 => 1,
        }
    }
}

/// The GPU: a retained primary context and what the backend needs to know about it.
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
}

impl Device {
    /// Opens device `ordinal`. Missing libraries are reported as errors, never as panics.
    pub fn open(ordinal: usize) -> Result<Device> {
        // SAFETY: each probe only tries to dlopen the library's candidate names; no symbol
        // is called.
        let (driver, nvrtc, lt) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublaslt::sys::is_culib_present(),
            )
        };
        if !driver {
            return Err(Error::Cuda(
                "no CUDA driver found (libcuda.so): this machine has no NVIDIA driver, or it is not on the library path"
                    .into(),
            ));
        }
        if !nvrtc {
            return Err(Error::Cuda(
                "NVRTC not found (libnvrtc.so.13): install the CUDA 13 runtime compiler or add its lib64 directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        if !lt {
            return Err(Error::Cuda(
                "cuBLASLt not found (libcublasLt.so.13): install CUDA 13's cuBLAS or add its lib64 directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        guard("opening the CUDA device", || {
            result::init().cuda("initialising the CUDA driver (cuInit)")?;
            let count = result::device::get_count().cuda("counting CUDA devices")?;
            if ordinal >= usize::try_from(count).unwrap_or(0) {
                return Err(Error::Cuda(format!(
                    "CUDA device {ordinal} requested, but the driver reports {count} device(s)"
                )));
            }
            let ctx = CudaContext::new(ordinal).cuda("creating the CUDA context")?;
            // SAFETY: this backend orders every buffer between its streams itself with
            // events (vision -> prefix -> denoise) and never hands cudarc slices around, so
            // cudarc's per-slice event tracking is not needed.
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name().cuda("reading the device name")?;
            let cc = ctx
                .compute_capability()
                .cuda("reading the compute capability")?;
            Ok(Device { ctx, name, cc })
        })
    }

    /// Makes the context current on the calling thread (every entry point calls this: the
    /// policy may move between threads).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .cuda("binding the CUDA context to this thread")
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().cuda("querying device memory")
    }

    /// Streaming multiprocessors (1 when the driver does not say).
    pub fn sm_count(&self) -> usize {
        use sys::CUdevice_attribute as A;
        self.ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(1)
    }

    /// Peak memory bandwidth in bytes/s: double data rate at the memory clock over the bus
    /// width (None when the driver does not report them).
    pub fn peak_bandwidth(&self) -> Option<f64> {
        use sys::CUdevice_attribute as A;
        let clock_khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .ok()?;
        let bus_bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .ok()?;
        (clock_khz > 0 && bus_bits > 0)
            .then(|| 2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().cuda("synchronising the device")
    }

    /// Allocates `len` elements of `dtype` (uninitialised).
    pub fn alloc(&self, dtype: DType, len: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::alloc(self, dtype, len)
    }
}

/// A sized, typed device address: `len` elements of `dtype` at `ptr`. Views are plain
/// addresses (like a raw pointer, without a lifetime); they are only made from buffers that
/// the struct launching on them owns, and every launcher checks the lengths it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
}

impl View {
    /// Elements `start..start + len`.
    pub fn at(self, start: usize, len: usize) -> Result<View> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Cuda(format!(
                "internal: device range {start}..{} outside a buffer of {} elements",
                start.saturating_add(len),
                self.len
            )));
        }
        Ok(View {
            ptr: self.ptr + (start * self.dtype.size()) as u64,
            len,
            dtype: self.dtype,
        })
    }

    /// Everything from element `start` on.
    pub fn tail(self, start: usize) -> Result<View> {
        self.at(start, self.len.saturating_sub(start))
    }

    /// Rows `row0..row0 + rows` of a row-major [_, width] buffer.
    pub fn rows(self, row0: usize, rows: usize, width: usize) -> Result<View> {
        self.at(row0 * width, rows * width)
    }

    pub fn bytes(self) -> usize {
        self.len * self.dtype.size()
    }

    /// The same bytes as elements of `dtype` (as many whole ones as fit): scratch memory
    /// that one product uses as f32 and another as bf16.
    pub fn as_type(self, dtype: DType) -> View {
        View {
            ptr: self.ptr,
            len: self.bytes() / dtype.size(),
            dtype,
        }
    }

    /// Checks that the view holds at least `len` elements of `dtype`.
    pub(crate) fn need(self, dtype: DType, len: usize, what: &str) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::Cuda(format!(
                "internal: {what} is {:?}, expected {dtype:?}",
                self.dtype
            )));
        }
        if self.len < len {
            return Err(Error::Cuda(format!(
                "internal: {what} holds {} elements, the launch touches {len}",
                self.len
            )));
        }
        Ok(())
    }
}

/// An owned device allocation (`cuMemAlloc`, not a pool allocation, so that it could later
/// be shared through CUDA IPC).
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
    dtype: DType,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    pub fn alloc(dev: &Device, dtype: DType, len: usize) -> Result<DeviceBuffer> {
        dev.bind()?;
        let bytes = (len * dtype.size()).max(256);
        // SAFETY: the context is current; the allocation is freed exactly once in Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
            Error::Cuda(format!(
                "allocating {:.2} GiB of device memory ({:.2} GiB free): {e}",
                bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            ))
        })?;
        Ok(DeviceBuffer {
            ptr,
            len,
            dtype,
            ctx: dev.ctx.clone(),
        })
    }

    pub fn view(&self) -> View {
        View {
            ptr: self.ptr,
            len: self.len,
            dtype: self.dtype,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed only here. All
            // work using it was synchronised by its owner (policies synchronise every frame).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory, so that uploads and the final download are truly asynchronous.
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is owned (no aliasing handle exists elsewhere); moving it between
// threads is as safe as moving a Vec<u8>.
unsafe impl Send for PinnedBuffer {}

/// Plain element types that may be viewed in pinned memory.
pub(crate) trait Pod: Copy + Default {}
impl Pod for f32 {}
impl Pod for i32 {}
impl Pod for u16 {}
impl Pod for u8 {}

impl PinnedBuffer {
    pub fn alloc(dev: &Device, bytes: usize) -> Result<PinnedBuffer> {
        dev.bind()?;
        let bytes = bytes.max(64);
        // SAFETY: the context is current; freed exactly once in Drop.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.cuda("allocating pinned host memory")?;
        Ok(PinnedBuffer {
            ptr: ptr as *mut u8,
            bytes,
            ctx: dev.ctx.clone(),
        })
    }

    /// The first `len` elements as `T` (cuMemHostAlloc returns page-aligned memory).
    pub(crate) fn slice_mut<T: Pod>(&mut self, len: usize) -> Result<&mut [T]> {
        if len * std::mem::size_of::<T>() > self.bytes {
            return Err(Error::Cuda(format!(
                "internal: pinned buffer of {} bytes is too small for {len} elements",
                self.bytes
            )));
        }
        // SAFETY: in bounds (checked above), page-aligned, exclusively borrowed through
        // &mut self, and any bit pattern is a valid f32/i32.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, len) })
    }

    pub(crate) fn slice<T: Pod>(&self, len: usize) -> Result<&[T]> {
        if len * std::mem::size_of::<T>() > self.bytes {
            return Err(Error::Cuda(format!(
                "internal: pinned buffer of {} bytes is too small for {len} elements",
                self.bytes
            )));
        }
        // SAFETY: as in slice_mut, borrowed shared.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, len) })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc, freed only here, no copy pending (owners
            // synchronise before dropping).
            let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// Bytes of the cuBLASLt workspace of each stream (NVIDIA's recommendation for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// A stream and the cuBLASLt workspace that only its work uses.
pub struct Lane {
    pub stream: Arc<CudaStream>,
    pub workspace: View,
    _workspace: DeviceBuffer,
    /// Programmatic dependent launch is available (sm_90 or newer) and on (`TURBOPI_PDL`).
    pdl: bool,
    /// A graph is being recorded on this lane ([`Lane::recording`]): only then do launches
    /// use programmatic dependencies.
    recording: AtomicBool,
    /// The last work queued on this lane was one of turbo-pi's kernels (each waits for its
    /// predecessor with `tp_pdl_wait`); copies and cuBLASLt calls clear it.
    after_own_kernel: AtomicBool,
    /// Where the inputs of W8A8 products are quantised (`--dtype fp8`), set by the stage
    /// that owns the lane and its buffers.
    fp8_scratch: std::sync::OnceLock<Fp8Scratch>,
    /// The SMs this lane's cuBLASLt products may target (0: all; [`Lane::limit_sms`]).
    sm_target: std::sync::atomic::AtomicU32,
}

/// A stage's room for one product's input quantised to FP8: codes and one scale per row.
/// Work on one lane runs in stream order, so one per lane suffices.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Scratch {
    /// u8, at least rows x K of the largest product.
    pub codes: View,
    /// f32, at least its rows.
    pub scales: View,
    /// At least rows x N f32 values of the largest product: where a product of codes lands
    /// before its scales are applied, as f32 or the activation type
    /// ([`crate::cuda::kernels::fp8::w8a8`]).
    pub out: View,
}

impl Lane {
    pub fn new(dev: &Device) -> Result<Lane> {
        Lane::with_rank(dev, None)
    }

    /// A lane whose stream has priority rank `rank` (0 = the device's highest priority, each
    /// rank one step lower, clamped to the lowest); None: the default priority.
    pub fn with_rank(dev: &Device, rank: Option<usize>) -> Result<Lane> {
        dev.bind()?;
        let stream = match rank {
            None => dev.ctx.new_stream().cuda("creating a CUDA stream")?,
            Some(r) => {
                // `least` is the numerically largest (lowest) priority, `greatest` the highest.
                let (least, greatest) = result::stream::get_priority_range()
                    .cuda("reading the stream priority range")?;
                let p = greatest
                    .saturating_add(i32::try_from(r).unwrap_or(i32::MAX))
                    .min(least);
                dev.ctx
                    .new_stream_with_priority(p)
                    .cuda("creating a CUDA stream with a priority")?
            }
        };
        let ws = DeviceBuffer::alloc(dev, DType::U8, WORKSPACE_BYTES)?;
        Ok(Lane {
            stream,
            workspace: ws.view(),
            _workspace: ws,
            pdl: dev.cc.0 >= 9 && settings::flag("TURBOPI_PDL", true)?,
            recording: AtomicBool::new(false),
            after_own_kernel: AtomicBool::new(false),
            fp8_scratch: std::sync::OnceLock::new(),
            sm_target: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Lets this lane's cuBLASLt products target at most `sms` SMs (0: all), so that work
    /// on other streams finds SMs free (`TURBOPI_OVERLAP_SMS`). Takes effect for shapes
    /// planned afterwards.
    pub fn limit_sms(&self, sms: u32) {
        self.sm_target.store(sms, Ordering::Relaxed);
    }

    /// What [`Lane::limit_sms`] set.
    pub fn sm_target(&self) -> u32 {
        self.sm_target.load(Ordering::Relaxed)
    }

    /// Gives this lane its FP8 input scratch (once; the caller keeps the memory alive as
    /// long as the lane).
    pub(crate) fn attach_fp8_scratch(&self, scratch: Fp8Scratch) -> Result<()> {
        self.fp8_scratch
            .set(scratch)
            .map_err(|_| Error::Cuda("internal: a lane's FP8 scratch set twice".into()))
    }

    /// This lane's FP8 input scratch, if its stage has one.
    pub(crate) fn fp8_scratch(&self) -> Option<Fp8Scratch> {
        self.fp8_scratch.get().copied()
    }

    /// Marks the start (`true`) or end of a graph recording on this lane. While recording,
    /// a turbo-pi kernel queued right after another is launched with a programmatic
    /// dependency on it: it may start while its predecessor drains, and waits for the
    /// predecessor's results on the device (`tp_pdl_wait` in prelude.cuh, which every kernel
    /// calls before it reads anything another launch wrote).
    pub(crate) fn recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
        self.after_own_kernel.store(false, Ordering::Relaxed);
    }

    /// Work other than turbo-pi's kernels (a copy, a cuBLASLt call) was queued: the next
    /// kernel depends on it the ordinary way.
    pub(crate) fn foreign_work(&self) {
        self.after_own_kernel.store(false, Ordering::Relaxed);
    }

    /// Whether kernels recorded on this lane may start while their predecessor drains
    /// (`TURBOPI_PDL` on, sm_90 or newer).
    pub(crate) fn pdl(&self) -> bool {
        self.pdl
    }

    /// Whether the next kernel launch may depend programmatically on the previous one.
    fn programmatic(&self) -> bool {
        self.pdl
            && self.recording.load(Ordering::Relaxed)
            && self.after_own_kernel.load(Ordering::Relaxed)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().cuda("synchronising a stream")
    }

    /// Asynchronous upload of `src` into `dst` on this lane. `src` must stay untouched until
    /// the lane has passed this point (pinned staging buffers are only rewritten after the
    /// frame's final synchronisation).
    pub(crate) fn upload<T: Pod>(&self, src: &[T], dst: View) -> Result<()> {
        self.foreign_work();
        let bytes = std::mem::size_of_val(src);
        if bytes > dst.bytes() {
            return Err(Error::Cuda(format!(
                "internal: upload of {bytes} bytes into a {}-byte view",
                dst.bytes()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `dst` holds at least `bytes` bytes (checked); the caller keeps `src` alive
        // and unchanged until the copy has run (see above).
        unsafe { result::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .cuda("uploading to the device")
    }

    /// Upload of `src` (any host memory) into `dst`, complete when this returns: the lane is
    /// synchronised after it, so `src` may be dropped or reused at once.
    pub(crate) fn upload_now<T: Pod>(&self, src: &[T], dst: View) -> Result<()> {
        self.upload(src, dst)?;
        self.synchronize()
    }

    /// Download of `src` into `dst` (any host memory), complete when this returns. Work on
    /// other streams that writes `src` must have been waited for.
    pub(crate) fn download_now<T: Pod>(&self, src: View, dst: &mut [T]) -> Result<()> {
        self.download(src, dst)?;
        self.synchronize()
    }

    /// Asynchronous download of `src` into `dst` (pinned) on this lane.
    pub(crate) fn download<T: Pod>(&self, src: View, dst: &mut [T]) -> Result<()> {
        self.foreign_work();
        let bytes = std::mem::size_of_val(dst);
        if bytes > src.bytes() {
            return Err(Error::Cuda(format!(
                "internal: download of {bytes} bytes from a {}-byte view",
                src.bytes()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `src` holds `bytes` bytes (checked); `dst` is pinned memory that the caller
        // does not read before synchronising the lane.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr, self.stream.cu_stream()) }
            .cuda("downloading from the device")
    }

    /// Device-to-device copy of `src` into `dst` (captured as a memcpy node in graphs).
    pub(crate) fn copy(&self, src: View, dst: View) -> Result<()> {
        self.foreign_work();
        if src.dtype != dst.dtype || src.len > dst.len {
            return Err(Error::Cuda(format!(
                "internal: copy of {} {:?} into {} {:?}",
                src.len, src.dtype, dst.len, dst.dtype
            )));
        }
        if src.len == 0 {
            return Ok(());
        }
        // SAFETY: both ranges are inside their buffers (views are bounds-checked) and of the
        // same byte size; they belong to distinct buffers.
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, src.bytes(), self.stream.cu_stream()) }
            .cuda("copying on the device")
    }

    /// Fills `v` with 0xFF bytes: NaN in f32 and in bf16, so unwritten elements show up.
    pub fn poison(&self, v: View) -> Result<()> {
        self.foreign_work();
        // SAFETY: the range is inside the view's buffer.
        unsafe { result::memset_d8_async(v.ptr, 0xFF, v.bytes(), self.stream.cu_stream()) }
            .cuda("filling device memory")
    }

    pub(crate) fn zero(&self, v: View) -> Result<()> {
        self.foreign_work();
        // SAFETY: the range is inside the view's buffer.
        unsafe { result::memset_d8_async(v.ptr, 0, v.bytes(), self.stream.cu_stream()) }
            .cuda("clearing device memory")
    }
}

const MAX_ARGS: usize = 32;

/// Kernel arguments, each in an 8-byte slot: cuLaunchKernel reads `sizeof(param)` bytes from
/// each slot, so a 4-byte `int`/`float` sits in the low bytes (little-endian).
pub(crate) struct Args {
    slots: [u64; MAX_ARGS],
    n: usize,
}

impl Args {
    pub(crate) fn new() -> Args {
        Args {
            slots: [0; MAX_ARGS],
            n: 0,
        }
    }

    fn push(mut self, v: u64) -> Args {
        if self.n < MAX_ARGS {
            self.slots[self.n] = v;
        }
        self.n += 1;
        self
    }

    /// A device pointer.
    pub(crate) fn ptr(self, v: View) -> Args {
        self.push(v.ptr)
    }

    /// A device pointer or NULL.
    pub(crate) fn opt(self, v: Option<View>) -> Args {
        self.push(v.map_or(0, |v| v.ptr))
    }

    pub(crate) fn i32(self, v: i32) -> Args {
        self.push(u64::from(v as u32))
    }

    pub(crate) fn i64(self, v: i64) -> Args {
        self.push(v as u64)
    }

    pub(crate) fn u64(self, v: u64) -> Args {
        self.push(v)
    }

    pub(crate) fn f32(self, v: f32) -> Args {
        self.push(u64::from(v.to_bits()))
    }

    pub(crate) fn f64(self, v: f64) -> Args {
        self.push(v.to_bits())
    }
}

/// A 1-D launch: `grid` blocks of `block` threads. A zero-sized grid launches nothing.
pub(crate) fn launch(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    grid: usize,
    block: u32,
    args: Args,
) -> Result<()> {
    launch_grid(f, lane, name, (grid, 1, 1), block, 0, args)
}

/// A launch of `grid` (x, y, z) blocks of `block` threads with `smem` bytes of dynamic shared
/// memory. A grid with a zero extent launches nothing. Inside a recorded graph, after another
/// turbo-pi kernel, it may start while that kernel drains (`TURBOPI_PDL`).
pub(crate) fn launch_grid(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    grid: (usize, usize, usize),
    block: u32,
    smem: u32,
    args: Args,
) -> Result<()> {
    launch_with(f, lane, name, (grid, block, smem), args, true)
}

/// [`launch_grid`] with the early start chosen by the caller: `early` false never starts
/// before the predecessor has finished, for kernels whose blocks, resident early, cost more
/// than the launch they hide (measured: the fused attention of pi0's 51-row expert,
/// docs/benchmarks.md).
pub(crate) fn launch_with(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    (grid, block, smem): ((usize, usize, usize), u32, u32),
    args: Args,
    early: bool,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let dim = |v: usize, max: u32| {
        u32::try_from(v)
            .ok()
            .filter(|&g| g <= max)
            .ok_or_else(|| Error::Cuda(format!("internal: grid of {grid:?} blocks for `{name}`")))
    };
    let grid = (
        dim(grid.0, (1u32 << 31) - 1)?,
        dim(grid.1, 65535)?,
        dim(grid.2, 65535)?,
    );
    if args.n > MAX_ARGS {
        return Err(Error::Cuda(format!(
            "internal: `{name}` takes {} arguments, at most {MAX_ARGS} are supported",
            args.n
        )));
    }
    let mut slots = args.slots;
    let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
    for (p, s) in ptrs.iter_mut().zip(slots.iter_mut()).take(args.n) {
        *p = (s as *mut u64).cast();
    }
    let launched = if early && lane.programmatic() {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: an all-zero value is valid for this plain C union of integers.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: lane.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as for cuLaunchKernel below; `config` and `attr` outlive the call, which
        // reads them before returning. The kernel (like every turbo-pi kernel) calls
        // `tp_pdl_wait` before it reads or writes memory that earlier launches touch, so
        // starting it before its predecessor has finished is safe.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    } else {
        // SAFETY: `f` belongs to the module loaded in this context; `ptrs[..n]` point at
        // slots that outlive the call (cuLaunchKernel copies the values before returning)
        // and hold the kernel's parameters in order, with the types its launcher documents;
        // the launcher checked that every device range the kernel touches lies inside its
        // view, and `smem` is within the limit set on `f` when it was loaded.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                lane.stream.cu_stream(),
                &mut ptrs[..args.n],
            )
        }
    };
    launched.map_err(|e| cuda_err(format_args!("launching `{name}`"), e))?;
    lane.after_own_kernel.store(true, Ordering::Relaxed);
    Ok(())
}

/// Blocks for a grid-stride loop over `n` elements with `block` threads each.
pub(crate) fn blocks_for(n: usize, block: u32) -> usize {
    n.div_ceil(block as usize).min(1 << 20)
}

/// A CUDA event that records timestamps (stage times are read from these).
pub(crate) fn timing_event(dev: &Device) -> Result<cudarc::driver::CudaEvent> {
    dev.ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .cuda("creating a CUDA event")
}

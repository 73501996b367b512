//! Zero-copy tensors between processes on one GPU: a producer's ring of `cuMemAlloc` slots
//! (IPC handles do not work on stream-pool allocations), each with an interprocess event
//! recorded after the slot is written; a consumer opens the handles once (cached), makes its
//! stream wait on the event (no host sync) and copies device to device. Only the two 64-byte
//! handles cross the host. Slots are handed back by the consumer, so a producer never
//! overwrites a slot that is still being read.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Duration;

use cudarc::driver::sys;

use super::device::{CudaResult, DType, Device, DeviceBuffer, Lane, View};
use crate::ring::SlotBook;
use crate::{Error, Result};

/// A CUDA IPC handle (memory or event), as the driver defines it: 64 opaque bytes.
pub type Handle = [u8; 64];

fn handle_bytes(reserved: &[std::ffi::c_char; 64]) -> Handle {
    let mut h = [0u8; 64];
    for (d, &s) in h.iter_mut().zip(reserved) {
        *d = s as u8;
    }
    h
}

fn reserved(h: &Handle) -> [std::ffi::c_char; 64] {
    let mut r = [0 as std::ffi::c_char; 64];
    for (d, &s) in r.iter_mut().zip(h) {
        *d = s as std::ffi::c_char;
    }
    r
}

/// An event that other processes can wait on (no timing, as IPC events require).
struct IpcEvent(sys::CUevent);

// SAFETY: a CUevent is a driver handle usable from any thread of the process.
unsafe impl Send for IpcEvent {}

impl Drop for IpcEvent {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate / cuIpcOpenEventHandle, destroyed once.
        let _ = unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// One slot of a producer's ring.
pub struct Slot {
    buf: DeviceBuffer,
    event: IpcEvent,
    pub mem_handle: Handle,
    pub event_handle: Handle,
}

impl Slot {
    pub fn view(&self) -> View {
        self.buf.view()
    }
}

/// A producer's ring of `n` slots of `bytes` each; which slot holds which frame is kept by a
/// [`SlotBook`].
pub struct Ring {
    slots: Vec<Slot>,
    book: SlotBook,
    pub reclaimed: u64,
}

impl Ring {
    pub fn new(dev: &Device, bytes: usize, n: usize, reclaim_after: Duration) -> Result<Ring> {
        if n == 0 {
            return Err(Error::Input("an IPC ring needs at least one slot".into()));
        }
        dev.bind()?;
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            let buf = DeviceBuffer::alloc(dev, DType::U8, bytes)?;
            let mut mh = sys::CUipcMemHandle_st { reserved: [0; 64] };
            // SAFETY: `buf` is a live cuMemAlloc allocation of this context; `mh` is an
            // out-parameter.
            unsafe { sys::cuIpcGetMemHandle(&mut mh, buf.view().ptr) }
                .result()
                .cuda("exporting a ring slot (cuIpcGetMemHandle)")?;
            let mut ev: sys::CUevent = std::ptr::null_mut();
            let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
                | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
            // SAFETY: the context is current; `ev` is an out-parameter.
            unsafe { sys::cuEventCreate(&mut ev, flags) }
                .result()
                .cuda("creating an interprocess event")?;
            let event = IpcEvent(ev);
            let mut eh = sys::CUipcEventHandle_st { reserved: [0; 64] };
            // SAFETY: `ev` was created with CU_EVENT_INTERPROCESS; `eh` is an out-parameter.
            unsafe { sys::cuIpcGetEventHandle(&mut eh, ev) }
                .result()
                .cuda("exporting an event (cuIpcGetEventHandle)")?;
            slots.push(Slot {
                buf,
                event,
                mem_handle: handle_bytes(&mh.reserved),
                event_handle: handle_bytes(&eh.reserved),
            });
        }
        Ok(Ring {
            slots,
            book: SlotBook::new(n, reclaim_after),
            reclaimed: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots a consumer still holds.
    pub fn busy(&self) -> usize {
        self.book.busy()
    }

    /// A free slot for frame `seq` (marked busy), taking back slots held too long; None when
    /// every slot is still in use.
    pub fn acquire(&mut self, seq: u64) -> Option<usize> {
        let slot = self.book.acquire(seq);
        self.reclaimed = self.book.reclaimed;
        slot
    }

    /// Frees `slot` if it still holds frame `seq`; false for an unknown or stale release.
    pub fn release(&mut self, slot: usize, seq: u64) -> bool {
        self.book.release(slot, seq)
    }

    /// Frees a slot whose frame was not sent after all.
    pub fn cancel(&mut self, slot: usize) {
        self.book.cancel(slot)
    }

    pub fn slot(&self, i: usize) -> Result<&Slot> {
        self.slots
            .get(i)
            .ok_or_else(|| Error::Cuda(format!("internal: ring slot {i} of {}", self.slots.len())))
    }

    /// Copies `src` into slot `i` on `lane` and records the slot's event after the copy.
    pub fn write(&self, i: usize, lane: &Lane, src: View) -> Result<()> {
        let s = self.slot(i)?;
        let dst = View {
            ptr: s.buf.view().ptr,
            len: src.bytes(),
            dtype: DType::U8,
        };
        if src.bytes() > s.buf.view().bytes() {
            return Err(Error::Cuda(format!(
                "internal: {} bytes into a {}-byte ring slot",
                src.bytes(),
                s.buf.view().bytes()
            )));
        }
        let as_bytes = View {
            ptr: src.ptr,
            len: src.bytes(),
            dtype: DType::U8,
        };
        lane.copy(as_bytes, dst)?;
        // SAFETY: the event and the stream belong to this context.
        unsafe { sys::cuEventRecord(s.event.0, lane.stream.cu_stream()) }
            .result()
            .cuda("recording a slot's interprocess event")
    }
}

/// What a consumer needs to read a slot: the producer's handles and the byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub mem_handle: Handle,
    pub event_handle: Handle,
    pub offset: usize,
    pub bytes: usize,
}

struct Mapped {
    ptr: u64,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: opened by cuIpcOpenMemHandle, closed once.
        let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
    }
}

/// A consumer's cache of opened handles (a producer's ring is opened once per slot).
#[derive(Default)]
pub struct Importer {
    mems: HashMap<Handle, Mapped>,
    events: HashMap<Handle, IpcEvent>,
}

// SAFETY: the cached pointers and events are process-wide driver handles.
unsafe impl Send for Importer {}

impl Importer {
    /// Makes `lane` wait for the producer's event, then copies the remote range into `dst`
    /// (device to device). `dst` must hold exactly `remote.bytes`.
    pub fn read(&mut self, dev: &Device, lane: &Lane, remote: &Remote, dst: View) -> Result<()> {
        if dst.bytes() != remote.bytes {
            return Err(Error::Input(format!(
                "an IPC tensor of {} bytes does not fit the {} bytes expected",
                remote.bytes,
                dst.bytes()
            )));
        }
        dev.bind()?;
        let mem_ptr = match self.mems.entry(remote.mem_handle) {
            Entry::Occupied(e) => e.get().ptr,
            Entry::Vacant(v) => {
                let mut ptr: sys::CUdeviceptr = 0;
                let h = sys::CUipcMemHandle_st {
                    reserved: reserved(&remote.mem_handle),
                };
                // SAFETY: `ptr` is an out-parameter; the driver validates the handle.
                unsafe {
                    sys::cuIpcOpenMemHandle_v2(
                        &mut ptr,
                        h,
                        sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                    )
                }
                .result()
                .cuda("opening a producer's ring slot (cuIpcOpenMemHandle)")?;
                v.insert(Mapped { ptr }).ptr
            }
        };
        let event = match self.events.entry(remote.event_handle) {
            Entry::Occupied(e) => e.get().0,
            Entry::Vacant(v) => {
                let mut ev: sys::CUevent = std::ptr::null_mut();
                let h = sys::CUipcEventHandle_st {
                    reserved: reserved(&remote.event_handle),
                };
                // SAFETY: `ev` is an out-parameter; the driver validates the handle.
                unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) }
                    .result()
                    .cuda("opening a producer's event (cuIpcOpenEventHandle)")?;
                v.insert(IpcEvent(ev)).0
            }
        };
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `mem_ptr` is a mapping opened in this context; both are out-parameters.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, mem_ptr) }
            .result()
            .cuda("reading the size of a producer's ring slot")?;
        let end = (mem_ptr - base) as usize + remote.offset + remote.bytes;
        if end > size {
            return Err(Error::Input(format!(
                "an IPC tensor of {} bytes at offset {} overruns the producer's {size}-byte buffer",
                remote.bytes, remote.offset
            )));
        }
        // SAFETY: the event was opened in this context; the stream belongs to it.
        unsafe { sys::cuStreamWaitEvent(lane.stream.cu_stream(), event, 0) }
            .result()
            .cuda("waiting for a producer's event")?;
        let src = View {
            ptr: mem_ptr + remote.offset as u64,
            len: remote.bytes,
            dtype: DType::U8,
        };
        let dst = View {
            ptr: dst.ptr,
            len: remote.bytes,
            dtype: DType::U8,
        };
        lane.copy(src, dst)
    }

    /// Slots opened so far.
    pub fn opened(&self) -> usize {
        self.mems.len()
    }
}

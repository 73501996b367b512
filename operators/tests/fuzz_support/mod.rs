//! The fuzz harness shared by `operators/tests/fuzz.rs`, `operators/tests/fuzz_msgpack.rs`
//! and `tools/turbopi/tests/fuzz.rs` (included there by path): a seeded generator, byte
//! mutations, a counting global allocator that tracks each case's peak heap use, and a loop
//! that runs a target's cases under `catch_unwind`, counts valid inputs and errors, and
//! reports every panic, bound violation or unclear error with the seed, the case and the
//! input.
//!
//! `TURBOPI_FUZZ_CASES=N` runs N cases per target instead of the default, and
//! `TURBOPI_FUZZ_SEED=S` starts from another seed; with neither, every run is the same.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

/// The fixed seed of a default run.
pub const DEFAULT_SEED: u64 = 0x7572_626f_2d70_6931;

/// Heap a case may use at its peak: this much plus [`BYTES_PER_INPUT_BYTE`] per input byte
/// ([`DEFAULT_PEAK_BOUND`], the bound of [`run`]).
pub const PEAK_BOUND_BYTES: usize = 64 << 20;
pub const BYTES_PER_INPUT_BYTE: usize = 8;

/// The heap a case may use at its peak: `fixed` plus `per_input_byte` per byte of its input.
#[derive(Clone, Copy)]
pub struct PeakBound {
    pub fixed: usize,
    pub per_input_byte: usize,
}

pub const DEFAULT_PEAK_BOUND: PeakBound = PeakBound {
    fixed: PEAK_BOUND_BYTES,
    per_input_byte: BYTES_PER_INPUT_BYTE,
};

impl PeakBound {
    /// The bound for an input of `len` bytes.
    pub fn of(&self, len: usize) -> usize {
        self.fixed
            .saturating_add(self.per_input_byte.saturating_mul(len))
    }

    /// `fixed` as text: whole MiB as "64 MiB", anything else in bytes.
    fn fixed_text(&self) -> String {
        if self.fixed.is_multiple_of(1 << 20) {
            format!("{} MiB", self.fixed >> 20)
        } else {
            format!("{} bytes", self.fixed)
        }
    }
}

/// A single allocation larger than this inside a case is refused (the process then aborts
/// with the case named on stderr) rather than attempted.
const HARD_ALLOCATION_LIMIT: usize = 1 << 30;

// ---------------------------------------------------------------------------------------
// Counting allocator

/// The system allocator, counting the bytes live on each thread and their peak.
pub struct CountingAlloc;

thread_local! {
    // Const-initialised `Cell`s of plain integers: no lazy initialisation and no destructor,
    // so the allocator may touch them at any time.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    static TARGET: Cell<&'static str> = const { Cell::new("") };
    static CASE: Cell<usize> = const { Cell::new(0) };
}

/// `n` in decimal, written into `buf` without allocating.
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn refuse_huge(size: usize) -> bool {
    if size <= HARD_ALLOCATION_LIMIT || !IN_CASE.try_with(Cell::get).unwrap_or(false) {
        return false;
    }
    // No allocation here: fixed text and numbers written into stack buffers.
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let target = TARGET.try_with(Cell::get).unwrap_or("");
    let case = CASE.try_with(Cell::get).unwrap_or(0);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"fuzz: refused an allocation of ");
    let _ = err.write_all(decimal(size, &mut a));
    let _ = err.write_all(b" bytes in target ");
    let _ = err.write_all(target.as_bytes());
    let _ = err.write_all(b", case ");
    let _ = err.write_all(decimal(case, &mut b));
    let _ = err.write_all(b" (rerun with the same TURBOPI_FUZZ_SEED)\n");
    true
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged,
// so `System`'s guarantees hold; the bookkeeping only reads and writes thread-local cells.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refuse_huge(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout is valid for `System` (GlobalAlloc's contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refuse_huge(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (by `alloc` above).
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refuse_huge(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` and returns its result with the peak of this thread's heap above what was live
/// when it started (allocations made by other threads, rayon's workers say, are not seen).
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    IN_CASE.with(|c| c.set(true));
    let out = f();
    IN_CASE.with(|c| c.set(false));
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

// ---------------------------------------------------------------------------------------
// Generator

/// SplitMix64: tiny, and the same sequence on every platform and crate version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A number of the kinds that break size arithmetic: small, at powers of two, huge.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => self.below(4) as u64,
            1 => 1u64 << self.below(64),
            2 => (1u64 << self.below(64)).wrapping_sub(1),
            3 => (1u64 << self.below(64)).wrapping_add(1),
            4 => u64::MAX - self.below(64) as u64,
            5 => self.below(100_000) as u64,
            6 => self.next_u64(),
            _ => self.below(70_000) as u64,
        }
    }
}

/// Applies one to four random edits to `bytes`: bit flips, byte sets, insertions (random or
/// from `dict`), deletions, truncation, duplication of a range.
pub fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        let at = if len == 0 { 0 } else { rng.below(len + 1) };
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                bytes[i] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'-', b'"', b'\n']);
            }
            2 if !dict.is_empty() => {
                let token = *rng.pick(dict);
                bytes.splice(at..at, token.iter().copied());
            }
            3 if !dict.is_empty() && len > 0 => {
                // Replace a short range with a token.
                let end = (at + 1 + rng.below(8)).min(len);
                let at = at.min(end);
                let token = *rng.pick(dict);
                bytes.splice(at..end, token.iter().copied());
            }
            4 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                let at = at.min(end);
                bytes.drain(at..end);
            }
            5 => bytes.truncate(at),
            6 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                let at = at.min(end);
                let chunk: Vec<u8> = bytes[at..end].to_vec();
                for _ in 0..1 + rng.below(4) {
                    bytes.splice(at..at, chunk.iter().copied());
                }
            }
            7 => {
                let n = 1 + rng.below(8);
                let random: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                bytes.splice(at..at, random);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    bytes[i] = rng.next_u64() as u8;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The loop

/// What a target made of an input.
pub enum Outcome {
    /// Accepted (and, where the target does more with it, used without trouble).
    Valid,
    /// Refused with this message.
    Error(String),
}

/// A case that went wrong.
struct Failure {
    case: usize,
    what: String,
    input: Vec<u8>,
}

/// `TURBOPI_FUZZ_CASES` ([`operators::settings`]), else `default`.
pub fn cases_from_env(default: usize) -> usize {
    operators::settings::fuzz_cases(default).unwrap_or_else(|e| panic!("{e}"))
}

/// `TURBOPI_FUZZ_SEED` ([`operators::settings`]), else [`DEFAULT_SEED`].
pub fn seed_from_env() -> u64 {
    operators::settings::fuzz_seed(DEFAULT_SEED).unwrap_or_else(|e| panic!("{e}"))
}

/// The seed of case `case` of target `name`: cases are independent, so one can be rerun.
pub fn case_seed(seed: u64, name: &str, case: usize) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ (case as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Totals of one target's run, as printed.
pub struct Summary {
    pub cases: usize,
    pub errors: usize,
    pub valid: usize,
    pub peak_bytes: usize,
}

/// Runs `cases` cases of target `name`: `make` builds an input from the case's generator,
/// `check` feeds it to the code under test and says what came of it. `check` returns
/// `Err(problem)` for an outcome that is wrong although no panic happened (an unclear
/// error, say). Panics, problems and peaks above the bound are collected, each input saved
/// under the target's temp dir, and reported together at the end (the test then fails).
pub fn run(
    name: &'static str,
    default_cases: usize,
    make: impl FnMut(&mut Rng) -> Vec<u8>,
    check: impl FnMut(&[u8]) -> Result<Outcome, String>,
) -> Summary {
    run_bounded(name, default_cases, DEFAULT_PEAK_BOUND, make, check)
}

/// [`run`] with another bound on each case's peak heap.
pub fn run_bounded(
    name: &'static str,
    default_cases: usize,
    peak_bound: PeakBound,
    mut make: impl FnMut(&mut Rng) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> Result<Outcome, String>,
) -> Summary {
    let fixed = peak_bound.fixed_text();
    let per_byte = peak_bound.per_input_byte;
    let cases = cases_from_env(default_cases);
    let seed = seed_from_env();
    let started = Instant::now();
    let (mut errors, mut valid, mut peak_max) = (0, 0, 0);
    let mut failures: Vec<Failure> = Vec::new();
    let mut error_kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for case in 0..cases {
        TARGET.with(|t| t.set(name));
        CASE.with(|c| c.set(case));
        let mut rng = Rng::new(case_seed(seed, name, case));
        let input = make(&mut rng);
        let bound = peak_bound.of(input.len());
        let (result, peak) = measure(|| catch_unwind(AssertUnwindSafe(|| check(&input))));
        peak_max = peak_max.max(peak);
        let mut fail = |what: String| {
            failures.push(Failure {
                case,
                what,
                input: input.clone(),
            })
        };
        match result {
            Ok(Ok(Outcome::Valid)) => valid += 1,
            Ok(Ok(Outcome::Error(msg))) => {
                errors += 1;
                // Group by the message's start (after a leading path), for the summary.
                let text = match msg.split_once(": ") {
                    Some((path, rest)) if path.starts_with('/') => rest,
                    _ => msg.as_str(),
                };
                let kind: String = text.chars().take(60).collect();
                *error_kinds.entry(kind).or_default() += 1;
            }
            Ok(Err(problem)) => fail(problem),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                fail(format!("panicked: {msg}"))
            }
        }
        if peak > bound {
            fail(format!(
                "peak heap {peak} bytes, above the bound {bound} ({fixed} + {per_byte} x {} input bytes)",
                input.len()
            ));
        }
    }
    println!(
        "fuzz {name}: {cases} cases (seed {seed:#x}), {errors} errors, {valid} valid, peak heap per case {:.2} MiB (bound {fixed} + {per_byte} x input), {:.1} s",
        peak_max as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    if operators::settings::fuzz_verbose().unwrap_or_else(|e| panic!("{e}")) {
        let mut kinds: Vec<_> = error_kinds.into_iter().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        for (kind, n) in kinds.iter().take(40) {
            println!("  {n:>6}  {kind}");
        }
    }
    if !failures.is_empty() {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let mut report = format!(
            "fuzz {name}: {} of {cases} cases failed (seed {seed:#x}; rerun with TURBOPI_FUZZ_SEED={seed:#x} TURBOPI_FUZZ_CASES={cases}):\n",
            failures.len()
        );
        for f in failures.iter().take(20) {
            let saved = dir.join(format!("{name}-{seed:x}-{}.bin", f.case));
            let _ = std::fs::write(&saved, &f.input);
            let shown: String = String::from_utf8_lossy(&f.input[..f.input.len().min(300)])
                .escape_debug()
                .collect();
            report += &format!(
                "  case {}: {}\n    input ({} bytes, saved to {}): {shown}\n",
                f.case,
                f.what,
                f.input.len(),
                saved.display()
            );
        }
        panic!("{report}");
    }
    Summary {
        cases,
        errors,
        valid,
        peak_bytes: peak_max,
    }
}

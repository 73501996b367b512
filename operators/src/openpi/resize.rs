//! openpi's server-side `ResizeImages`: `openpi_client.image_tools.resize_with_pad`, i.e.
//! Pillow's `Image.resize(..., BILINEAR)` on a uint8 RGB image that keeps the aspect ratio,
//! pasted centred on a black square. Pillow's 8-bit resampler is reproduced exactly: a
//! triangle filter widened by the scale factor when shrinking (so it antialiases), weights
//! normalised in f64 and rounded to 22-bit fixed point, a horizontal pass then a vertical pass
//! with rounding to u8 in between. That is Pillow up to 12.x (openpi locks 11.2.1); Pillow
//! 13 runs the vertical pass first for some shapes, which can move single pixels by one level.
//!
//! The sums are exact integers, so their order is free: on x86_64 CPUs with AVX2 (detected at
//! run time) the horizontal pass resamples 8 rows at once, one per vector lane, and both passes
//! give the same bytes as the portable loops. The horizontal pass runs a batch of rows ahead
//! of the vertical one, so the intermediate image never exists whole.

use std::ops::Range;

/// Fixed-point precision of Pillow's 8-bit resampler (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// What every fixed-point sum starts from, so that the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Per output pixel: the first input pixel, and the fixed-point weights of the ones it covers,
/// stored at a fixed stride (the widest window) so that one allocation holds them all.
struct Coeffs {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter over the
    /// whole input (box = [0, in_size]).
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the bilinear filter's support is 1
        let inv = 1.0 / filterscale;
        let center = |xx: usize| (xx as f64 + 0.5) * scale;
        let (start, len): (Vec<usize>, Vec<usize>) = (0..out_size)
            .map(|xx| {
                // C's (int) cast truncates toward zero.
                let xmin = ((center(xx) - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center(xx) + support + 0.5) as i64).min(in_size as i64) as usize;
                (xmin, xmax.saturating_sub(xmin))
            })
            .unzip();
        let stride = len.iter().copied().max().unwrap_or(0);
        let mut weights = vec![0; out_size * stride];
        let mut k = vec![0.0f64; stride];
        for (xx, ((&xmin, &n), out)) in start
            .iter()
            .zip(&len)
            .zip(weights.chunks_exact_mut(stride.max(1)))
            .enumerate()
        {
            let k = &mut k[..n];
            for (x, w) in k.iter_mut().enumerate() {
                let t = (((x + xmin) as f64 - center(xx) + 0.5) * inv).abs();
                *w = if t < 1.0 { 1.0 - t } else { 0.0 };
            }
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            for (o, &w) in out.iter_mut().zip(k.iter()) {
                *o = if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                };
            }
        }
        Coeffs {
            start,
            len,
            stride,
            weights,
        }
    }

    fn out_size(&self) -> usize {
        self.start.len()
    }

    /// Output pixel `i`'s first input pixel and weights.
    fn window(&self, i: usize) -> (usize, &[i32]) {
        (
            self.start[i],
            &self.weights[i * self.stride..][..self.len[i]],
        )
    }

    /// Where output pixel `i`'s window ends.
    fn end(&self, i: usize) -> usize {
        self.start[i] + self.len[i]
    }
}

/// Pillow's `clip8`: the fixed-point sum back to a byte.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `rows` rows of `width` bytes from the start of `dst`, `stride` bytes apart.
fn rows_mut(
    dst: &mut [u8],
    stride: usize,
    width: usize,
    rows: usize,
) -> impl Iterator<Item = &mut [u8]> {
    dst.chunks_mut(stride.max(1))
        .take(rows)
        .map(move |r| &mut r[..width])
}

/// The code that runs the passes: portable loops, or AVX2 on the x86_64 CPUs that have it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    Portable,
    /// Only made by [`Kernels::detect`], on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    /// The fastest kernels this CPU runs.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernels::Avx2;
        }
        Kernels::Portable
    }
}

/// Rows the AVX2 horizontal pass resamples together, one per 32-bit lane.
const LANES: usize = 8;

/// The horizontal pass of one resize: resamples rows along the width, w_in -> `c.out_size()`
/// pixels, with the buffers it reuses from one batch of rows to the next.
struct Horizontal {
    kernels: Kernels,
    w_in: usize,
    c: Coeffs,
    /// The AVX2 kernel's transposed input and output rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    cols: (Vec<[u8; LANES]>, Vec<[u8; LANES]>),
}

impl Horizontal {
    fn new(kernels: Kernels, w_in: usize, w_out: usize) -> Self {
        let c = Coeffs::new(w_in, w_out);
        Horizontal {
            kernels,
            w_in,
            c,
            cols: (Vec::new(), Vec::new()),
        }
    }

    /// The rows of `src` ([rows, w_in, 3]) to rows of `dst`, `dst_stride` bytes apart.
    fn run(&mut self, src: &[u8], dst: &mut [u8], dst_stride: usize) {
        match self.kernels {
            Kernels::Portable => horizontal_portable(src, self.w_in, &self.c, dst, dst_stride),
            // SAFETY: `Kernels::Avx2` is only made after `is_x86_feature_detected!("avx2")`.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe {
                let (cols, out_cols) = &mut self.cols;
                avx2::horizontal(src, self.w_in, &self.c, dst, dst_stride, cols, out_cols)
            },
        }
    }
}

/// The horizontal pass one output pixel at a time.
fn horizontal_portable(src: &[u8], w_in: usize, c: &Coeffs, dst: &mut [u8], dst_stride: usize) {
    if w_in == 0 || c.stride == 0 {
        return;
    }
    let (rows, width) = (src.len() / (w_in * 3), c.out_size() * 3);
    for (row, drow) in src
        .chunks_exact(w_in * 3)
        .zip(rows_mut(dst, dst_stride, width, rows))
    {
        let windows = c
            .start
            .iter()
            .zip(&c.len)
            .zip(c.weights.chunks_exact(c.stride));
        for (((&x0, &n), k), o) in windows.zip(drow.chunks_exact_mut(3)) {
            let mut ss = [HALF; 3];
            for (px, &w) in row[x0 * 3..][..n * 3].chunks_exact(3).zip(k) {
                ss[0] = ss[0].wrapping_add(i32::from(px[0]) * w);
                ss[1] = ss[1].wrapping_add(i32::from(px[1]) * w);
                ss[2] = ss[2].wrapping_add(i32::from(px[2]) * w);
            }
            o[0] = clip8(ss[0]);
            o[1] = clip8(ss[1]);
            o[2] = clip8(ss[2]);
        }
    }
}

/// The vertical pass of one resize: resamples along the height, h_in -> `c.out_size()` rows.
struct Vertical {
    kernels: Kernels,
    c: Coeffs,
}

impl Vertical {
    fn new(kernels: Kernels, h_in: usize, h_out: usize) -> Self {
        let c = Coeffs::new(h_in, h_out);
        Vertical { kernels, c }
    }

    /// Output rows `ys` into rows of `dst`, `dst_stride` bytes apart, from rows of `width`
    /// bytes in `src` that start at input row `first`.
    fn run(
        &self,
        src: &[u8],
        first: usize,
        width: usize,
        ys: Range<usize>,
        dst: &mut [u8],
        dst_stride: usize,
    ) {
        let c = &self.c;
        match self.kernels {
            Kernels::Portable => vertical_rows(src, first, width, c, ys, dst, dst_stride),
            // SAFETY: `Kernels::Avx2` is only made after `is_x86_feature_detected!("avx2")`.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { avx2::vertical(src, first, width, c, ys, dst, dst_stride) },
        }
    }
}

/// The vertical pass, written so that the compiler vectorises it along the row for whichever
/// instruction set it is inlined into: each chunk of the row sums its window in registers.
#[inline(always)]
fn vertical_rows(
    src: &[u8],
    first: usize,
    width: usize,
    c: &Coeffs,
    ys: Range<usize>,
    dst: &mut [u8],
    dst_stride: usize,
) {
    const CHUNK: usize = 64;
    if width == 0 {
        return;
    }
    for (y, drow) in ys.clone().zip(rows_mut(dst, dst_stride, width, ys.len())) {
        let (y0, k) = c.window(y);
        let window = &src[(y0 - first) * width..][..k.len() * width];
        // Whole chunks have a length known at compile time: their sums stay in registers.
        let mut chunks = drow.chunks_exact_mut(CHUNK);
        for (i, out) in chunks.by_ref().enumerate() {
            vertical_chunk::<CHUNK>(window, width, k, i * CHUNK, out);
        }
        let rest = chunks.into_remainder();
        vertical_chunk::<CHUNK>(window, width, k, width - rest.len(), rest);
    }
}

/// Bytes `col..col + out.len()` (at most N) of one output row from the rows of `window`.
#[inline(always)]
fn vertical_chunk<const N: usize>(
    window: &[u8],
    width: usize,
    k: &[i32],
    col: usize,
    out: &mut [u8],
) {
    let mut acc = [HALF; N];
    for (row, &w) in window.chunks_exact(width).zip(k) {
        for (a, &v) in acc.iter_mut().zip(&row[col..][..out.len()]) {
            *a = a.wrapping_add(i32::from(v) * w);
        }
    }
    for (o, &a) in out.iter_mut().zip(&acc) {
        *o = clip8(a);
    }
}

/// The passes with AVX2. Every function needs a CPU with AVX2, hence `unsafe`; none touches
/// memory other than through bounds-checked slices.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{horizontal_portable, vertical_rows, Coeffs, HALF, LANES, PRECISION_BITS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// [`super::vertical_rows`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn vertical(
        src: &[u8],
        first: usize,
        width: usize,
        c: &Coeffs,
        ys: Range<usize>,
        dst: &mut [u8],
        dst_stride: usize,
    ) {
        vertical_rows(src, first, width, c, ys, dst, dst_stride)
    }

    /// The horizontal pass on blocks of 8 rows: the block is transposed so that each input
    /// byte column holds the 8 rows' values, every tap is then one multiply-add for the 8 rows,
    /// and the output columns are transposed back into rows. A last, partial block overlaps
    /// the one before (those rows are computed twice, to the same bytes). `cols` and
    /// `out_cols` are the transposed blocks, kept by the caller.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal(
        src: &[u8],
        w_in: usize,
        c: &Coeffs,
        dst: &mut [u8],
        dst_stride: usize,
        cols: &mut Vec<[u8; LANES]>,
        out_cols: &mut Vec<[u8; LANES]>,
    ) {
        let (n, m) = (w_in * 3, c.out_size() * 3);
        let rows = src.len().checked_div(n).unwrap_or(0);
        if rows < LANES {
            return horizontal_portable(src, w_in, c, dst, dst_stride);
        }
        cols.resize(n, [0; LANES]);
        out_cols.resize(m, [0; LANES]);
        let half = _mm256_set1_epi32(HALF);
        for block in (0..rows).step_by(LANES) {
            let y = block.min(rows - LANES);
            transpose_in(&src[y * n..][..LANES * n], n, cols);
            for (x, out) in out_cols.chunks_exact_mut(3).enumerate() {
                let (x0, k) = c.window(x);
                let mut acc = [half; 3];
                for (px, &w) in cols[x0 * 3..][..k.len() * 3].chunks_exact(3).zip(k) {
                    let w = _mm256_set1_epi32(w);
                    for (a, col) in acc.iter_mut().zip(px) {
                        let v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(*col)));
                        *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(v, w));
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    // clip8: the shift, then saturation to i16 and u8 (exact for these sums).
                    let a = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(a);
                    let words = _mm_packs_epi32(
                        _mm256_castsi256_si128(a),
                        _mm256_extracti128_si256::<1>(a),
                    );
                    *o = _mm_cvtsi128_si64(_mm_packus_epi16(words, words)).to_le_bytes();
                }
            }
            transpose_out(out_cols, &mut dst[y * dst_stride..], dst_stride, m);
        }
    }

    /// 16 bytes as a vector.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load16(b: &[u8]) -> __m128i {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        let v = u128::from_le_bytes(a);
        _mm_set_epi64x((v >> 64) as i64, v as i64)
    }

    /// `LANES` rows of `n` bytes in `src` to `cols[j][r]` = byte `j` of row `r`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn transpose_in(src: &[u8], n: usize, cols: &mut [[u8; LANES]]) {
        let full = n / 16 * 16;
        for (j, pairs) in (0..full).step_by(16).zip(cols.chunks_exact_mut(16)) {
            let r: [__m128i; LANES] = std::array::from_fn(|r| load16(&src[r * n + j..][..16]));
            // Interleave bytes of row pairs, then 16-bit units of those, then 32-bit units:
            // each result holds two columns of the 8 rows.
            let a = [
                _mm_unpacklo_epi8(r[0], r[1]),
                _mm_unpackhi_epi8(r[0], r[1]),
                _mm_unpacklo_epi8(r[2], r[3]),
                _mm_unpackhi_epi8(r[2], r[3]),
                _mm_unpacklo_epi8(r[4], r[5]),
                _mm_unpackhi_epi8(r[4], r[5]),
                _mm_unpacklo_epi8(r[6], r[7]),
                _mm_unpackhi_epi8(r[6], r[7]),
            ];
            let b = [
                _mm_unpacklo_epi16(a[0], a[2]),
                _mm_unpackhi_epi16(a[0], a[2]),
                _mm_unpacklo_epi16(a[1], a[3]),
                _mm_unpackhi_epi16(a[1], a[3]),
                _mm_unpacklo_epi16(a[4], a[6]),
                _mm_unpackhi_epi16(a[4], a[6]),
                _mm_unpacklo_epi16(a[5], a[7]),
                _mm_unpackhi_epi16(a[5], a[7]),
            ];
            for (q, two) in pairs.chunks_exact_mut(2).enumerate() {
                let (lo, hi) = (b[q / 2], b[4 + q / 2]);
                let v = if q % 2 == 0 {
                    _mm_unpacklo_epi32(lo, hi)
                } else {
                    _mm_unpackhi_epi32(lo, hi)
                };
                two[0] = _mm_cvtsi128_si64(v).to_le_bytes();
                two[1] = _mm_extract_epi64::<1>(v).to_le_bytes();
            }
        }
        for (j, col) in cols.iter_mut().enumerate().skip(full) {
            for (r, v) in col.iter_mut().enumerate() {
                *v = src[r * n + j];
            }
        }
    }

    /// `cols[i][r]` to byte `i` of row `r` of `dst` (rows `stride` bytes apart), `m` columns.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn transpose_out(cols: &[[u8; LANES]], dst: &mut [u8], stride: usize, m: usize) {
        let full = m / 16 * 16;
        let mut rows = dst.chunks_mut(stride);
        let mut rows: [&mut [u8]; LANES] = std::array::from_fn(|_| match rows.next() {
            Some(row) => &mut row[..m],
            None => &mut [],
        });
        for (i, pairs) in (0..full).step_by(16).zip(cols.chunks_exact(16)) {
            // Each 16-bit unit r of u[q]: row r's bytes of columns 2q and 2q + 1; then an 8x8
            // transpose of 16-bit units.
            let u: [__m128i; 8] = std::array::from_fn(|q| {
                let v = _mm_set_epi64x(
                    i64::from_le_bytes(pairs[2 * q + 1]),
                    i64::from_le_bytes(pairs[2 * q]),
                );
                _mm_unpacklo_epi8(v, _mm_srli_si128::<8>(v))
            });
            let a = [
                _mm_unpacklo_epi16(u[0], u[1]),
                _mm_unpackhi_epi16(u[0], u[1]),
                _mm_unpacklo_epi16(u[2], u[3]),
                _mm_unpackhi_epi16(u[2], u[3]),
                _mm_unpacklo_epi16(u[4], u[5]),
                _mm_unpackhi_epi16(u[4], u[5]),
                _mm_unpacklo_epi16(u[6], u[7]),
                _mm_unpackhi_epi16(u[6], u[7]),
            ];
            let b = [
                _mm_unpacklo_epi32(a[0], a[2]),
                _mm_unpackhi_epi32(a[0], a[2]),
                _mm_unpacklo_epi32(a[1], a[3]),
                _mm_unpackhi_epi32(a[1], a[3]),
                _mm_unpacklo_epi32(a[4], a[6]),
                _mm_unpackhi_epi32(a[4], a[6]),
                _mm_unpacklo_epi32(a[5], a[7]),
                _mm_unpackhi_epi32(a[5], a[7]),
            ];
            for (r, row) in rows.iter_mut().enumerate() {
                let (lo, hi) = (b[r / 2], b[4 + r / 2]);
                let v = if r % 2 == 0 {
                    _mm_unpacklo_epi64(lo, hi)
                } else {
                    _mm_unpackhi_epi64(lo, hi)
                };
                let lo = _mm_cvtsi128_si64(v) as u64 as u128;
                let hi = _mm_extract_epi64::<1>(v) as u64 as u128;
                row[i..i + 16].copy_from_slice(&(hi << 64 | lo).to_le_bytes());
            }
        }
        for (i, col) in cols.iter().enumerate().take(m).skip(full) {
            for (row, &v) in rows.iter_mut().zip(col) {
                row[i] = v;
            }
        }
    }
}

/// Input rows the horizontal pass resamples at a time when both passes run, ahead of what the
/// vertical pass needs: the intermediate rows live in a window of about this many rows plus
/// the vertical taps, small enough to stay in cache, instead of a whole intermediate image.
const BATCH_ROWS: usize = 32;

/// Pillow's `Image.resize((w_out, h_out), BILINEAR)` of an RGB image [h, w, 3], into rows of
/// `dst` `dst_stride` bytes apart. Pillow's order: the horizontal pass on the input rows the
/// vertical pass reads (straight into `dst` when there is no vertical pass), then the vertical
/// pass; a pass whose size does not change is skipped.
fn resize_into(
    kernels: Kernels,
    img: &[u8],
    (h, w): (usize, usize),
    (h_out, w_out): (usize, usize),
    dst: &mut [u8],
    dst_stride: usize,
) {
    let (row_in, row_out) = (w * 3, w_out * 3);
    match (h_out != h, w_out != w) {
        (false, false) => {
            for (o, row) in
                rows_mut(dst, dst_stride, row_out, h_out).zip(img.chunks_exact(row_in.max(1)))
            {
                o.copy_from_slice(row);
            }
        }
        (false, true) => {
            Horizontal::new(kernels, w, w_out).run(&img[..h * row_in], dst, dst_stride)
        }
        (true, false) => {
            Vertical::new(kernels, h, h_out).run(img, 0, row_in, 0..h_out, dst, dst_stride)
        }
        (true, true) => both_passes(
            &mut Horizontal::new(kernels, w, w_out),
            &Vertical::new(kernels, h, h_out),
            &img[..h * row_in],
            dst,
            dst_stride,
        ),
    }
}

/// Both passes: the horizontal one a batch of rows ahead of the vertical one, into a window of
/// rows that slides down the image.
fn both_passes(
    horizontal: &mut Horizontal,
    vertical: &Vertical,
    img: &[u8],
    dst: &mut [u8],
    dst_stride: usize,
) {
    let (row_in, row_out) = (horizontal.w_in * 3, horizontal.c.out_size() * 3);
    let cv = &vertical.c;
    let (h, h_out) = (img.len() / row_in.max(1), cv.out_size());
    let end = (0..h_out).map(|y| cv.end(y)).max().unwrap_or(0);
    // The horizontal pass's rows `lo..hi` of the input.
    let mut window = vec![0u8; (cv.stride + BATCH_ROWS + LANES).min(h) * row_out];
    let (mut lo, mut hi) = (0, 0);
    let mut y = 0;
    while y < h_out {
        let (y0, k) = cv.window(y);
        // Rows before y0 are read by no later output row (the windows only move down).
        window.copy_within((y0 - lo) * row_out..(hi.max(y0) - lo) * row_out, 0);
        (lo, hi) = (y0, hi.max(y0));
        // The next batch, and the rest of the rows if fewer than a vector's worth would be
        // left for a last one. Row y's window ends after `hi`, so the window holds at most
        // its taps + BATCH_ROWS + LANES rows.
        let mut next = (hi + BATCH_ROWS).max(y0 + k.len()).min(end);
        if end - next < LANES {
            next = end;
        }
        horizontal.run(
            &img[hi * row_in..next * row_in],
            &mut window[(hi - lo) * row_out..],
            row_out,
        );
        hi = next;
        // Every output row whose window is now complete.
        let mut ys = y..y + 1;
        while ys.end < h_out && cv.end(ys.end) <= hi {
            ys.end += 1;
        }
        let rows = &mut dst[y * dst_stride..];
        let src = &window[..(hi - lo) * row_out];
        vertical.run(src, lo, row_out, ys.clone(), rows, dst_stride);
        y = ys.end;
    }
}

/// Pillow's `Image.resize((w_out, h_out), BILINEAR)` of an RGB image [h, w, 3].
pub fn resize_bilinear(img: &[u8], h: usize, w: usize, h_out: usize, w_out: usize) -> Vec<u8> {
    let mut out = vec![0u8; h_out * w_out * 3];
    resize_into(
        Kernels::detect(),
        img,
        (h, w),
        (h_out, w_out),
        &mut out,
        w_out * 3,
    );
    out
}

/// The size an image [h, w] takes inside a `size` x `size` square with its aspect ratio kept
/// (openpi: `ratio = max(w / size, h / size)`, `int(h / ratio)`); a side may come out 0 for
/// extremely elongated images, which Pillow refuses.
pub fn fitted_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    let ratio = f64::max(w as f64 / size as f64, h as f64 / size as f64);
    ((h as f64 / ratio) as usize, (w as f64 / ratio) as usize)
}

/// `resize_with_pad(image, size, size)` for an RGB image [h, w, 3]: unchanged when already
/// `size` x `size`; otherwise resized to fit and centred on black (the top and left padding
/// get the floor of half the padding). None when a side would shrink to zero pixels.
pub fn resize_with_pad(img: &[u8], h: usize, w: usize, size: usize) -> Option<Vec<u8>> {
    resize_with_pad_using(Kernels::detect(), img, h, w, size)
}

fn resize_with_pad_using(
    kernels: Kernels,
    img: &[u8],
    h: usize,
    w: usize,
    size: usize,
) -> Option<Vec<u8>> {
    if (h, w) == (size, size) {
        return Some(img.to_vec());
    }
    let (rh, rw) = fitted_size(h, w, size);
    if rh == 0 || rw == 0 {
        return None;
    }
    let (top, left) = ((size - rh) / 2, (size - rw) / 2);
    let mut out = vec![0u8; size * size * 3];
    // The resized rows go straight to their place in the padded square.
    resize_into(
        kernels,
        img,
        (h, w),
        (rh, rw),
        &mut out[(top * size + left) * 3..],
        size * 3,
    );
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The straightforward scalar resampler the fast passes replaced, kept as their reference:
    /// one `Vec` of weights per output pixel, a horizontal then a vertical pass over whole
    /// images, the padded square assembled from a copy.
    mod reference {
        use super::super::{clip8, fitted_size, PRECISION_BITS};

        struct Coeffs {
            start: Vec<usize>,
            weights: Vec<Vec<i32>>,
        }

        fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
            let scale = in_size as f64 / out_size as f64;
            let filterscale = scale.max(1.0);
            let support = filterscale;
            let inv = 1.0 / filterscale;
            let mut start = Vec::with_capacity(out_size);
            let mut weights = Vec::with_capacity(out_size);
            for xx in 0..out_size {
                let center = (xx as f64 + 0.5) * scale;
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let n = xmax.saturating_sub(xmin);
                let mut k: Vec<f64> = (0..n)
                    .map(|x| {
                        let t = ((x + xmin) as f64 - center + 0.5) * inv;
                        let t = t.abs();
                        if t < 1.0 {
                            1.0 - t
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let ww: f64 = k.iter().sum();
                if ww != 0.0 {
                    k.iter_mut().for_each(|w| *w /= ww);
                }
                let one = (1u32 << PRECISION_BITS) as f64;
                weights.push(
                    k.iter()
                        .map(|&w| {
                            if w < 0.0 {
                                (-0.5 + w * one) as i32
                            } else {
                                (0.5 + w * one) as i32
                            }
                        })
                        .collect(),
                );
                start.push(xmin);
            }
            Coeffs { start, weights }
        }

        fn horizontal(img: &[u8], h: usize, w_in: usize, w_out: usize) -> Vec<u8> {
            let c = coeffs(w_in, w_out);
            let mut out = vec![0u8; h * w_out * 3];
            for (row, orow) in img
                .chunks_exact(w_in * 3)
                .zip(out.chunks_exact_mut(w_out * 3))
                .take(h)
            {
                for ((&x0, k), o) in c.start.iter().zip(&c.weights).zip(orow.chunks_exact_mut(3)) {
                    let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                    for (px, &w) in row[x0 * 3..].chunks_exact(3).zip(k) {
                        for ch in 0..3 {
                            ss[ch] = ss[ch].wrapping_add(px[ch] as i32 * w);
                        }
                    }
                    for ch in 0..3 {
                        o[ch] = clip8(ss[ch]);
                    }
                }
            }
            out
        }

        fn vertical(img: &[u8], h_in: usize, w: usize, h_out: usize) -> Vec<u8> {
            let c = coeffs(h_in, h_out);
            let stride = w * 3;
            let mut out = vec![0u8; h_out * stride];
            let mut acc = vec![0i32; stride];
            for ((&y0, k), orow) in c
                .start
                .iter()
                .zip(&c.weights)
                .zip(out.chunks_exact_mut(stride))
            {
                acc.fill(1 << (PRECISION_BITS - 1));
                for (row, &wt) in img[y0 * stride..].chunks_exact(stride).zip(k) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a = a.wrapping_add(v as i32 * wt);
                    }
                }
                for (o, &a) in orow.iter_mut().zip(&acc) {
                    *o = clip8(a);
                }
            }
            out
        }

        pub fn resize_bilinear(
            img: &[u8],
            h: usize,
            w: usize,
            h_out: usize,
            w_out: usize,
        ) -> Vec<u8> {
            if (h, w) == (h_out, w_out) {
                return img.to_vec();
            }
            let t = if w_out != w {
                horizontal(img, h, w, w_out)
            } else {
                img.to_vec()
            };
            if h_out != h {
                vertical(&t, h, w_out, h_out)
            } else {
                t
            }
        }

        pub fn resize_with_pad(img: &[u8], h: usize, w: usize, size: usize) -> Option<Vec<u8>> {
            if (h, w) == (size, size) {
                return Some(img.to_vec());
            }
            let (rh, rw) = fitted_size(h, w, size);
            if rh == 0 || rw == 0 {
                return None;
            }
            let resized = resize_bilinear(img, h, w, rh, rw);
            let (top, left) = ((size - rh) / 2, (size - rw) / 2);
            let mut out = vec![0u8; size * size * 3];
            for y in 0..rh {
                let dst = ((top + y) * size + left) * 3;
                out[dst..dst + rw * 3].copy_from_slice(&resized[y * rw * 3..(y + 1) * rw * 3]);
            }
            Some(out)
        }
    }

    /// The kernels this machine can run: the portable ones, and AVX2 where the CPU has it.
    fn all_kernels() -> Vec<Kernels> {
        let mut k = vec![Kernels::Portable, Kernels::detect()];
        k.dedup();
        k
    }

    /// Where two outputs differ first: (index, got, want), and how many bytes differ.
    fn first_mismatch(got: &[u8], want: &[u8]) -> Option<((usize, u8, u8), usize)> {
        assert_eq!(got.len(), want.len(), "output sizes");
        let mut diff = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (a, b))| a != b);
        let first = diff.next().map(|(i, (&a, &b))| (i, a, b))?;
        Some((first, 1 + diff.count()))
    }

    /// Both kernels against the reference on random images: `resize_with_pad` for camera
    /// shapes, elongated and tiny images and odd sides at several square sizes, then
    /// `resize_bilinear` for shapes that upscale, downscale or keep one axis.
    #[test]
    fn matches_reference_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut image =
            |h: usize, w: usize| -> Vec<u8> { (0..h * w * 3).map(|_| rng.random()).collect() };
        let kernels = all_kernels();
        let padded: &[(usize, usize)] = &[
            (480, 640),
            (720, 1280),
            (256, 256),
            (224, 224),
            (48, 40),
            (1, 500),
            (500, 1),
            (1, 1),
            (2, 3),
            (7, 7),
            (9, 8),
            (17, 33),
            (31, 64),
            (33, 17),
            (101, 67),
            (240, 320),
            (300, 7),
        ];
        let mut too_elongated = vec![];
        for &(h, w) in padded {
            let img = image(h, w);
            for size in [224, 32, 7] {
                let Some(want) = reference::resize_with_pad(&img, h, w, size) else {
                    too_elongated.push((h, w, size));
                    continue;
                };
                for &k in &kernels {
                    let got = resize_with_pad_using(k, &img, h, w, size);
                    let got = got.unwrap_or_else(|| panic!("{h}x{w} -> {size} ({k:?}): None"));
                    let bad = first_mismatch(&got, &want);
                    assert!(
                        bad.is_none(),
                        "{h}x{w} -> {size} ({k:?}): first (index, got, want) and count {bad:?}"
                    );
                }
            }
        }
        // The short side would shrink to 0 pixels: None from both.
        let expected = [
            (1, 500, 224),
            (1, 500, 32),
            (1, 500, 7),
            (500, 1, 224),
            (500, 1, 32),
            (500, 1, 7),
            (300, 7, 32),
            (300, 7, 7),
        ];
        assert_eq!(too_elongated, expected);
        for (h, w, size) in expected {
            assert!(resize_with_pad(&vec![9; h * w * 3], h, w, size).is_none());
        }
        type Size = (usize, usize);
        let resized: &[(Size, Size)] = &[
            ((32, 32), (224, 224)),
            ((224, 224), (32, 32)),
            ((480, 640), (168, 224)),
            ((720, 1280), (126, 224)),
            ((224, 224), (224, 100)),
            ((224, 224), (100, 224)),
            ((64, 48), (64, 200)),
            ((64, 48), (300, 48)),
            ((9, 13), (5, 4)),
            ((9, 13), (20, 31)),
            ((5, 5), (9, 3)),
            ((1, 500), (1, 7)),
            ((500, 1), (7, 1)),
            ((1, 1), (8, 8)),
            ((8, 8), (1, 1)),
            ((15, 16), (15, 17)),
            ((16, 15), (17, 15)),
            ((100, 100), (99, 101)),
            ((3, 1000), (3, 3)),
            ((23, 29), (64, 11)),
        ];
        for &((h, w), (h_out, w_out)) in resized {
            let img = image(h, w);
            let want = reference::resize_bilinear(&img, h, w, h_out, w_out);
            for &k in &kernels {
                // Into rows 5 bytes apart, poisoned: every byte of a row must be written, and
                // none between the rows.
                const POISON: u8 = 0xA5;
                let stride = w_out * 3 + 5;
                let mut dst = vec![POISON; h_out * stride];
                resize_into(k, &img, (h, w), (h_out, w_out), &mut dst, stride);
                let (rows, gaps): (Vec<&[u8]>, Vec<&[u8]>) = dst
                    .chunks_exact(stride)
                    .map(|r| r.split_at(w_out * 3))
                    .unzip();
                let bad = first_mismatch(&rows.concat(), &want);
                assert!(bad.is_none(), "{h}x{w} -> {h_out}x{w_out} ({k:?}): first (index, got, want) and count {bad:?}");
                assert!(
                    gaps.concat().iter().all(|&v| v == POISON),
                    "{h}x{w} -> {h_out}x{w_out} ({k:?}) wrote between rows"
                );
            }
            assert_eq!(resize_bilinear(&img, h, w, h_out, w_out), want);
        }
    }

    #[test]
    fn weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(10, 3), (3, 10), (224, 224), (480, 224), (7, 5)] {
            let c = Coeffs::new(i, o);
            for x in 0..o {
                let (_, k) = c.window(x);
                let s: i64 = k.iter().map(|&w| w as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
        let img: Vec<u8> = (0..4 * 6 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_bilinear(&img, 4, 6, 4, 6), img);
        // A constant image stays constant at any size.
        let flat = vec![77u8; 9 * 13 * 3];
        assert!(resize_bilinear(&flat, 9, 13, 5, 4).iter().all(|&v| v == 77));
        assert!(resize_bilinear(&flat, 9, 13, 20, 31)
            .iter()
            .all(|&v| v == 77));
    }

    #[test]
    fn pads_centred_with_black() {
        // 2 x 4 into 4 x 4: resized to 2 x 4 (unchanged), one black row above and below.
        let img = vec![200u8; 2 * 4 * 3];
        let out = resize_with_pad(&img, 2, 4, 4).unwrap();
        let row = |y: usize| &out[y * 12..(y + 1) * 12];
        assert!(row(0).iter().all(|&v| v == 0));
        assert!(row(1).iter().all(|&v| v == 200));
        assert!(row(2).iter().all(|&v| v == 200));
        assert!(row(3).iter().all(|&v| v == 0));
        // 3 x 8 into 4: ratio 2, resized to 1 x 4, top padding floor(3 / 2) = 1.
        assert_eq!(fitted_size(3, 8, 4), (1, 4));
        assert!(resize_with_pad(&vec![1u8; 1000 * 3], 1, 1000, 32).is_none());
    }

    /// Every case of tests/golden/openpi_resize (openpi-client's `resize_with_pad` with
    /// Pillow, tools/reference/openpi_resize_golden.py), byte for byte.
    #[test]
    fn matches_openpi_client_resize_with_pad() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/openpi_resize");
        let mut cases = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let Some(stem) = name.strip_suffix(".in.npy") else {
                continue;
            };
            let input = crate::npy::read_u8(&path).unwrap();
            let want = crate::npy::read_u8(&dir.join(format!("{stem}.out.npy"))).unwrap();
            let (h, w, size) = (input.shape[0], input.shape[1], want.shape[0]);
            let got = resize_with_pad(&input.data, h, w, size).unwrap();
            let diff = got.iter().zip(&want.data).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{stem}: {diff} of {} bytes differ", got.len());
            cases += 1;
        }
        assert_eq!(cases, 7, "golden cases in {}", dir.display());
    }

    /// Values computed by Pillow 13 (`Image.fromarray(a).resize((2, 1), Image.BILINEAR)`) for
    /// a = [[[0, 10, 255], [100, 20, 0], [50, 30, 128], [255, 40, 7]]] (1 x 4 RGB).
    #[test]
    fn matches_pillow_on_a_known_row() {
        let img = [0u8, 10, 255, 100, 20, 0, 50, 30, 128, 255, 40, 7];
        assert_eq!(
            resize_bilinear(&img, 1, 4, 1, 2),
            vec![50, 17, 128, 145, 33, 58]
        );
    }
}

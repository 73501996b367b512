//! openpi's server-side `ResizeImages`: `openpi_client.image_tools.resize_with_pad`, i.e.
//! Pillow's `Image.resize(..., BILINEAR)` on a uint8 RGB image that keeps the aspect ratio,
//! pasted centred on a black square. Pillow's 8-bit resampler is reproduced exactly: a
//! triangle filter widened by the scale factor when shrinking (so it antialiases), weights
//! normalised in f64 and rounded to 22-bit fixed point, a horizontal pass then a vertical pass
//! with rounding to u8 in between. That is Pillow up to 12.x (openpi locks 11.2.1); Pillow
//! 13 runs the vertical pass first for some shapes, which can move single pixels by one level.

/// Fixed-point precision of Pillow's 8-bit resampler (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel and the fixed-point weights of the ones it covers.
struct Coeffs {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter over the
/// whole input (box = [0, in_size]).
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
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

/// Pillow's `clip8`: the fixed-point sum back to a byte.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples along the width: [h, w_in, 3] -> [h, w_out, 3].
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

/// Resamples along the height: [h_in, w, 3] -> [h_out, w, 3].
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

/// Pillow's `Image.resize((w_out, h_out), BILINEAR)` of an RGB image [h, w, 3].
pub fn resize_bilinear(img: &[u8], h: usize, w: usize, h_out: usize, w_out: usize) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(10, 3), (3, 10), (224, 224), (480, 224), (7, 5)] {
            let c = coeffs(i, o);
            for k in &c.weights {
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

//! Camera images to model input: openpi's `resize_with_pad_torch` on HWC images. The bilinear
//! resize reproduces PyTorch's CPU `F.interpolate(mode="bilinear", align_corners=False,
//! antialias=False)` bit for bit, so golden vectors made with torch match exactly.
//!
//! PyTorch has two CPU kernels for float bilinear resizing, and the compiler fused some of their
//! multiply-adds differently, so they round differently (the source coordinate alone differs
//! by up to an ulp, which moves outputs by up to ~3e-5 for 300-pixel images):
//! - the channels-last kernel, chosen when C > 3 or out_h + out_w <= 128 (and for every
//!   3-channel image when torch runs on one thread): `src = fma(scale, dst + 0.5, -0.5)`, and
//!   the four taps are summed with the products of the two axes' weights;
//! - the generic kernel, chosen otherwise: `src = scale * (dst + 0.5) - 0.5` rounded twice, and
//!   the image is interpolated along the width, then along the height.
//!
//! Both are reproduced with the same dispatch as torch with more than one thread (its default).

/// u8 HWC RGB image -> f32 HWC in [-1,1] of size `size`x`size`: x/255*2-1, then, when the
/// image is not already `size`x`size`, [`resize_with_pad_f32`].
///
/// # Panics
/// If `pixels.len() != height * width * 3`.
pub fn to_model_input(pixels: &[u8], height: usize, width: usize, size: usize) -> Vec<f32> {
    assert_eq!(
        Some(pixels.len()),
        height.checked_mul(width).and_then(|n| n.checked_mul(3)),
        "to_model_input: {} bytes for a {height}x{width} RGB image",
        pixels.len()
    );
    let mut img = Vec::with_capacity(pixels.len());
    extend_unit(&mut img, pixels);
    if height == size && width == size {
        return img;
    }
    resize_with_pad_f32(&img, height, width, 3, size)
}

/// Appends each u8 value `x` of `pixels` as x/255*2-1 in f32 (each operation rounded to f32,
/// as the model input is defined), in one pass over a slice of known length (one reserve, a
/// loop the compiler can vectorise; not separately timed).
pub fn extend_unit(out: &mut Vec<f32>, pixels: &[u8]) {
    out.extend(pixels.iter().map(|&x| unit(x)));
}

/// [`extend_unit`] into `out` (as many values as both have).
pub fn unit_into(out: &mut [f32], pixels: &[u8]) {
    for (o, &x) in out.iter_mut().zip(pixels) {
        *o = unit(x);
    }
}

/// The model's value of a pixel byte.
#[inline]
fn unit(x: u8) -> f32 {
    x as f32 / 255.0 * 2.0 - 1.0
}

/// openpi's `resize_with_pad_torch` for an f32 HWC image with `c` channels: keeps the aspect
/// ratio, resizes bilinearly to fit `size`x`size`, clamps to [-1, 1] and pads with -1 (top and
/// left get the floor of half the padding).
///
/// An image so elongated that one side would shrink to zero pixels (where torch raises an
/// error) comes out as padding only.
///
/// # Panics
/// If `img.len() != h * w * c`.
pub fn resize_with_pad_f32(img: &[f32], h: usize, w: usize, c: usize, size: usize) -> Vec<f32> {
    assert_eq!(
        Some(img.len()),
        h.checked_mul(w).and_then(|n| n.checked_mul(c)),
        "resize_with_pad_f32: {} values for a {h}x{w}x{c} image",
        img.len()
    );
    // Python: ratio = max(cur_width / width, cur_height / height); int(cur_height / ratio).
    let ratio = f64::max(w as f64 / size as f64, h as f64 / size as f64);
    let rh = ((h as f64 / ratio) as usize).min(size);
    let rw = ((w as f64 / ratio) as usize).min(size);
    let mut out = vec![-1.0f32; size * size * c];
    if rh == 0 || rw == 0 || c == 0 {
        return out;
    }
    let (top, left) = ((size - rh) / 2, (size - rw) / 2);
    let kernel = if c > 3 || rh + rw <= 128 {
        Kernel::ChannelsLast
    } else {
        Kernel::Generic
    };
    let rows = taps(h, rh, kernel);
    let cols = taps(w, rw, kernel);
    let px = |y: usize, x: usize, ch: usize| img[(y * w + x) * c + ch];
    for (oy, ty) in rows.iter().enumerate() {
        for (ox, tx) in cols.iter().enumerate() {
            let dst = ((top + oy) * size + left + ox) * c;
            for (ch, o) in out[dst..dst + c].iter_mut().enumerate() {
                let x00 = px(ty.i0, tx.i0, ch);
                let x01 = px(ty.i0, tx.i1, ch);
                let x10 = px(ty.i1, tx.i0, ch);
                let x11 = px(ty.i1, tx.i1, ch);
                let v = match kernel {
                    Kernel::ChannelsLast => {
                        let (w00, w01) = (ty.l0 * tx.l0, ty.l0 * tx.l1);
                        let (w10, w11) = (ty.l1 * tx.l0, ty.l1 * tx.l1);
                        x11.mul_add(w11, x10.mul_add(w10, x00.mul_add(w00, x01 * w01)))
                    }
                    Kernel::Generic => {
                        let t0 = x00.mul_add(tx.l0, x01 * tx.l1);
                        let t1 = x10.mul_add(tx.l0, x11 * tx.l1);
                        t0.mul_add(ty.l0, t1 * ty.l1)
                    }
                };
                *o = v.clamp(-1.0, 1.0);
            }
        }
    }
    out
}

/// Which of PyTorch's CPU bilinear kernels to reproduce (see the module comment).
#[derive(Clone, Copy, PartialEq)]
enum Kernel {
    ChannelsLast,
    Generic,
}

/// The two source pixels of one output pixel along one axis and their weights.
struct Tap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// PyTorch's `compute_source_index_and_lambda` for `align_corners=False` in f32.
fn taps(in_size: usize, out_size: usize, kernel: Kernel) -> Vec<Tap> {
    if in_size == out_size {
        return (0..out_size)
            .map(|i| Tap {
                i0: i,
                i1: i,
                l0: 1.0,
                l1: 0.0,
            })
            .collect();
    }
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|dst| {
            let src = match kernel {
                Kernel::ChannelsLast => scale.mul_add(dst as f32 + 0.5, -0.5),
                Kernel::Generic => scale * (dst as f32 + 0.5) - 0.5,
            };
            let src = if src < 0.0 { 0.0 } else { src };
            let i0 = (src.floor() as usize).min(in_size - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            Tap {
                i0,
                i1: if i0 < in_size - 1 { i0 + 1 } else { i0 },
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy;
    use std::path::Path;

    /// Test pixels shared with tests/fixtures/image/gen.py: the top byte of a splitmix64-style
    /// hash of seed + i.
    fn pixels(n: usize, seed: u64) -> Vec<u8> {
        (0..n as u64)
            .map(|i| {
                let mut z = (seed + i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn same_size_is_the_plain_mapping() {
        let px: Vec<u8> = (0..=255).cycle().take(16 * 16 * 3).collect();
        let out = to_model_input(&px, 16, 16, 16);
        for (o, &x) in out.iter().zip(&px) {
            assert_eq!(o.to_bits(), (x as f32 / 255.0 * 2.0 - 1.0).to_bits());
        }
        assert_eq!(out[0], -1.0);
        assert_eq!(out[255], 1.0);
    }

    #[test]
    fn pads_with_minus_one_around_the_resized_image() {
        // 40x24 -> 32: ratio 1.25, resized 32x19, 6 columns of padding left and 7 right.
        let px = pixels(40 * 24 * 3, 1);
        let out = to_model_input(&px, 40, 24, 32);
        assert_eq!(out.len(), 32 * 32 * 3);
        for y in 0..32 {
            for x in 0..32 {
                let v = &out[(y * 32 + x) * 3..][..3];
                if !(6..25).contains(&x) {
                    assert_eq!(v, [-1.0; 3], "({y}, {x})");
                }
            }
        }
        // 5x7 -> 16: resized 11x16, 2 rows of padding on top and 3 at the bottom.
        let out = to_model_input(&pixels(5 * 7 * 3, 2), 5, 7, 16);
        let padded_row = |y: usize| out[y * 16 * 3..][..16 * 3].iter().all(|&v| v == -1.0);
        assert!((0..2).chain(13..16).all(padded_row));
        assert!(!(2..13).any(padded_row));
    }

    #[test]
    fn degenerate_sizes_are_padding() {
        assert_eq!(
            to_model_input(&[7; 3000], 1, 1000, 8),
            vec![-1.0; 8 * 8 * 3]
        );
        assert_eq!(to_model_input(&[], 0, 0, 4), vec![-1.0; 4 * 4 * 3]);
        assert!(to_model_input(&[1; 12], 2, 2, 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "5 bytes for a 2x2 RGB image")]
    fn rejects_a_wrong_length() {
        to_model_input(&[0; 5], 2, 2, 4);
    }

    /// Outputs of openpi's resize_with_pad_torch from tests/fixtures/image/gen.py: name,
    /// height, width, channels, size and the stride of the stored sample of the output.
    const CASES: [(&str, usize, usize, usize, usize, usize); 9] = [
        ("h40_w24_c3_s32", 40, 24, 3, 32, 1),
        ("h24_w40_c3_s32", 24, 40, 3, 32, 1),
        ("h32_w20_c3_s32", 32, 20, 3, 32, 1),
        ("h7_w5_c3_s16", 7, 5, 3, 16, 1),
        ("h5_w7_c3_s16", 5, 7, 3, 16, 1),
        ("h300_w200_c3_s224", 300, 200, 3, 224, 97),
        ("h480_w640_c3_s224", 480, 640, 3, 224, 97),
        ("h100_w150_c3_s224", 100, 150, 3, 224, 97),
        ("h50_w70_c4_s160", 50, 70, 4, 160, 97),
    ];

    /// Matches torch exactly: the kernels reproduce its arithmetic operation by operation, so
    /// any difference is a change of semantics, not rounding noise.
    #[test]
    fn matches_torch() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image");
        for (k, &(name, h, w, c, size, stride)) in CASES.iter().enumerate() {
            let px = pixels(h * w * c, 1000 * k as u64);
            let out = if c == 3 {
                to_model_input(&px, h, w, size)
            } else {
                let img: Vec<f32> = px.iter().map(|&x| x as f32 / 255.0 * 2.0 - 1.0).collect();
                resize_with_pad_f32(&img, h, w, c, size)
            };
            let ours: Vec<f32> = out.iter().copied().step_by(stride).collect();
            let reference = npy::read_f32(&dir.join(format!("{name}.npy"))).unwrap();
            assert_eq!(reference.shape, [ours.len()], "{name}");
            let diffs: Vec<(usize, f32, f32)> = ours
                .iter()
                .zip(&reference.data)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (&a, &b))| (i * stride, a, b))
                .collect();
            let max = diffs.iter().map(|d| (d.1 - d.2).abs()).fold(0.0, f32::max);
            assert!(
                diffs.is_empty(),
                "{name}: {} of {} values differ (max {max:e}); first (index, ours, torch): {:?}",
                diffs.len(),
                ours.len(),
                &diffs[..diffs.len().min(5)]
            );
        }
    }
}

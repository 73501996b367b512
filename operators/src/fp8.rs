//! FP8 E4M3 (the "fn" variant NVIDIA's tensor cores use: no infinities, one NaN code per
//! sign, largest finite 448) and the scaling `--dtype fp8` applies: weights per output
//! channel at load, activations per row (token) as they enter a linear layer. The CPU
//! backend uses these to emulate FP8 arithmetic (f32 sums of products of E4M3 values, which
//! f32 holds exactly); the CUDA kernels that quantise on the GPU are checked against them.

/// The largest finite E4M3 value; a scale maps a row's largest magnitude to it.
pub const E4M3_MAX: f32 = 448.0;

/// The code of the largest finite magnitude (0x7E) and of NaN (0x7F), before the sign bit.
const MAX_CODE: u8 = 0x7E;
const NAN_CODE: u8 = 0x7F;

/// `x` as E4M3: round to nearest, ties to even, magnitudes beyond the largest finite value
/// saturate to it (NVIDIA's `__NV_SATFINITE`), NaN stays NaN, the sign of zero is kept.
pub fn encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | NAN_CODE;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | MAX_CODE;
    }
    // Below the smallest normal (2^-6) the grid is uniform with step 2^-9; rounding up to 8
    // steps gives code 0x08, the smallest normal, so the codes join without a seam.
    if a < MIN_NORMAL {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // a is a normal f32 here: its exponent is the E4M3 exponent, its top three mantissa bits
    // (rounded to nearest even on the 20 below) the E4M3 mantissa. A carry out of the
    // mantissa lands in the exponent, as it should.
    let bits = a.to_bits();
    let e = (bits >> 23) as i32 - 127;
    let (keep, rest) = ((bits >> 20) & 7, bits & 0xF_FFFF);
    let up = rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1);
    let code = ((((e + 7) as u32) << 3) | keep) + up as u32;
    // a < 448 rounds at most to 448 (0x7E), so the code stays finite.
    sign | (code as u8).min(MAX_CODE)
}

/// 2^-6, the smallest normal E4M3 magnitude.
const MIN_NORMAL: f32 = 0.015625;

/// The value of an E4M3 code (NaN for 0x7F and 0xFF).
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let bits = code & 0x7F;
    if bits == NAN_CODE {
        return f32::NAN;
    }
    let (e, m) = ((bits >> 3) as u32, (bits & 7) as u32);
    let magnitude = if e == 0 {
        m as f32 / 512.0
    } else {
        // Exponent e - 7 and mantissa m / 8 placed in an f32's fields.
        f32::from_bits(((e + 120) << 23) | (m << 20))
    };
    sign * magnitude
}

/// `x` rounded to the E4M3 grid (the value of its code).
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

/// The scale that maps magnitude `amax` onto [`E4M3_MAX`]; 1 for a row of zeros (or of
/// values too small to scale), so such a row stays zeros.
pub fn scale_for(amax: f32) -> f32 {
    let s = amax / E4M3_MAX;
    if s.is_normal() {
        s
    } else {
        1.0
    }
}

/// Rounds each row of `width` values in place to its FP8 value: scale s = max |row| / 448,
/// x -> s * E4M3(x / s). What a weight row (an output channel) keeps after quantisation,
/// and what an activation row (a token) carries into an FP8 GEMM.
pub fn round_rows(values: &mut [f32], width: usize) {
    use rayon::prelude::*;
    if width == 0 {
        return;
    }
    let round_row = |row: &mut [f32]| {
        let s = row_scale(row);
        for v in row.iter_mut() {
            *v = s * round(*v / s);
        }
    };
    // Rows are independent: a weight matrix's channels on all cores, an activation's few
    // tokens on this one.
    if values.len() >= 1 << 16 {
        values.par_chunks_exact_mut(width).for_each(round_row);
    } else {
        values.chunks_exact_mut(width).for_each(round_row);
    }
}

/// A row's scale: max |row| / 448 ([`scale_for`]; NaNs are passed over, as `fmaxf` does).
fn row_scale(row: &[f32]) -> f32 {
    scale_for(row.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// The E4M3 codes of rows of `width` values and each row's scale, as an FP8 GEMM's operand
/// holds them: row r's value c is `scales[r] * decode(codes[r * width + c])`, the value
/// [`round_rows`] gives it. The CPU twin of the GPU's quantisation.
pub fn quantise_rows(values: &[f32], width: usize) -> (Vec<u8>, Vec<f32>) {
    if width == 0 {
        return (vec![], vec![]);
    }
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / width);
    for row in values.chunks_exact(width) {
        let s = row_scale(row);
        codes.extend(row.iter().map(|v| encode(v / s)));
        scales.push(s);
    }
    (codes, scales)
}

/// y[r, c] = (xs[r]·ws[c])·p[r, c], or y[r, c] plus that with `add`, for `xs.len()` rows of
/// `ws.len()` columns (y's row stride `ld`, p dense): a product of E4M3 codes taken with unit
/// scales, brought to the values its operands stand for (the input's row scales `xs`, the
/// weight's `ws`). The CPU twin of the GPU's `rescale_e4m3`, bit for bit in f32.
pub fn rescale_product(y: &mut [f32], ld: usize, p: &[f32], xs: &[f32], ws: &[f32], add: bool) {
    let n = ws.len();
    for (r, &sx) in xs.iter().enumerate() {
        let (yr, pr) = (&mut y[r * ld..r * ld + n], &p[r * n..(r + 1) * n]);
        for ((y, &p), &sw) in yr.iter_mut().zip(pr).zip(ws) {
            let v = (sx * sw) * p;
            *y = if add { *y + v } else { v };
        }
    }
}

/// Which stages `--dtype fp8` puts in FP8 (`TURBOPI_FP8_STAGES`, default all three): the
/// vision tower with the projector, Gemma 2B (the prefix), the action expert. The others
/// keep the backend's base precision (bf16 on cuda, f32 on cpu). The expert alone is the
/// accuracy-safe choice on the models measured so far (docs/fp8.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    pub vision: bool,
    pub prefix: bool,
    pub expert: bool,
}

impl Stages {
    pub const ALL: Stages = Stages {
        vision: true,
        prefix: true,
        expert: true,
    };
    pub const NONE: Stages = Stages {
        vision: false,
        prefix: false,
        expert: false,
    };
    /// The names [`Stages::parse`] accepts.
    pub const NAMES: [&'static str; 3] = ["vision", "prefix", "expert"];

    /// A comma-separated list of [`Stages::NAMES`] (blanks ignored, each at most once), or
    /// `all`. `name` is the setting's name, for the error.
    pub fn parse(name: &str, value: &str) -> crate::Result<Stages> {
        let bad = |why: String| {
            crate::Error::InvalidConfig(format!(
                "env {name}={value:?}: {why}; expected `all` or a comma-separated list of \
                 `vision`, `prefix`, `expert`"
            ))
        };
        if value.trim() == "all" {
            return Ok(Stages::ALL);
        }
        let mut s = Stages::NONE;
        for word in value.split(',').map(str::trim) {
            let slot = match word {
                "vision" => &mut s.vision,
                "prefix" => &mut s.prefix,
                "expert" => &mut s.expert,
                "" => return Err(bad("an empty name".into())),
                other => return Err(bad(format!("unknown stage `{other}`"))),
            };
            if *slot {
                return Err(bad(format!("`{word}` twice")));
            }
            *slot = true;
        }
        Ok(s)
    }

    pub fn any(&self) -> bool {
        self.vision || self.prefix || self.expert
    }

    pub fn is_all(&self) -> bool {
        *self == Stages::ALL
    }

    /// "vision, prefix, expert", or the ones that are in FP8.
    pub fn names(&self) -> String {
        let on = [self.vision, self.prefix, self.expert];
        let names: Vec<&str> = Self::NAMES
            .iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn stages_parse_lists_and_name_what_is_wrong() {
        let p = |v: &str| Stages::parse("TURBOPI_FP8_STAGES", v);
        assert_eq!(p("all").unwrap(), Stages::ALL);
        assert_eq!(p(" vision , prefix,expert ").unwrap(), Stages::ALL);
        let expert = p("expert").unwrap();
        assert_eq!(
            expert,
            Stages {
                expert: true,
                ..Stages::NONE
            }
        );
        assert_eq!(expert.names(), "expert");
        assert!(!expert.is_all() && expert.any());
        assert_eq!(p("prefix,vision").unwrap().names(), "vision, prefix");
        for (v, why) in [
            ("gemma", "unknown stage `gemma`"),
            ("expert,,prefix", "an empty name"),
            ("expert,expert", "`expert` twice"),
            ("none", "unknown stage `none`"),
        ] {
            let e = p(v).unwrap_err().to_string();
            assert!(
                e.contains("TURBOPI_FP8_STAGES") && e.contains(why) && e.contains("`vision`"),
                "{v}: {e}"
            );
        }
    }

    /// Every finite code's value, found by brute force: the oracle for rounding.
    fn finite_values() -> Vec<(u8, f32)> {
        (0..=255u8)
            .filter(|c| c & 0x7F != NAN_CODE)
            .map(|c| (c, decode(c)))
            .collect()
    }

    /// The nearest finite E4M3 value of `x` by search, ties to the even code.
    fn nearest(x: f32, table: &[(u8, f32)]) -> f32 {
        let mut best: Option<(f64, u8, f32)> = None;
        for &(c, v) in table {
            let d = (x as f64 - v as f64).abs();
            let better = match best {
                None => true,
                Some((bd, bc, _)) => d < bd || (d == bd && c & 1 == 0 && bc & 1 == 1),
            };
            if better {
                best = Some((d, c, v));
            }
        }
        best.map_or(f32::NAN, |(_, _, v)| v)
    }

    #[test]
    fn the_grid_is_e4m3fn() {
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xFE), -448.0);
        assert_eq!(decode(0x08), 2f32.powi(-6), "smallest normal");
        assert_eq!(decode(0x01), 2f32.powi(-9), "smallest subnormal");
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x39), 1.125);
        assert!(decode(0x7F).is_nan() && decode(0xFF).is_nan());
        // Within each binade eight equal steps of an eighth of its base; below the smallest
        // normal, steps of 2^-9 from zero.
        for c in 0u8..0x7E {
            let step = decode(c + 1) - decode(c);
            let want = if c < 0x08 {
                2f32.powi(-9)
            } else {
                decode(c & !7) / 8.0
            };
            assert_eq!(step, want, "code {c:#04x}");
            assert_eq!(decode(c | 0x80), -decode(c));
        }
        let finite = finite_values();
        assert_eq!(finite.len(), 254);
        // Every finite code encodes back to itself (both zeros included).
        for (c, v) in finite {
            assert_eq!(encode(v), c, "code {c:#04x} value {v}");
        }
    }

    #[test]
    fn encoding_rounds_to_nearest_even_and_saturates() {
        let table = finite_values();
        // Midpoints between neighbours go to the even code; just off them, to the nearer.
        let mut positives: Vec<f32> = table.iter().map(|&(_, v)| v).filter(|v| *v > 0.0).collect();
        positives.sort_by(f32::total_cmp);
        for pair in positives.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for x in [mid, mid.next_down(), mid.next_up(), -mid] {
                assert_eq!(round(x), nearest(x, &table), "x = {x:e}");
            }
        }
        // Random magnitudes over the whole range and beyond it.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..20_000 {
            let x = rng.random_range(-12.0f32..9.5).exp2() * if rng.random() { 1.0 } else { -1.0 };
            let want = if x.abs() >= 448.0 {
                448f32.copysign(x)
            } else {
                nearest(x, &table)
            };
            // (== takes -0 for 0: the oracle does not know signed zeros, checked below.)
            assert_eq!(round(x), want, "x = {x:e}");
            assert_eq!(round(x).is_sign_negative(), x < 0.0, "x = {x:e}");
        }
        assert_eq!(round(1e30), 448.0);
        assert_eq!(round(f32::NEG_INFINITY), -448.0);
        assert_eq!(
            round(464.0),
            448.0,
            "the midpoint to the NaN code saturates"
        );
        assert!(round(f32::NAN).is_nan());
        assert_eq!(encode(-0.0), 0x80);
        assert_eq!(
            encode(2f32.powi(-11)),
            0x00,
            "a quarter step rounds to zero"
        );
    }

    #[test]
    fn rows_are_scaled_each_to_its_own_largest_value() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let width = 37;
        let mut x: Vec<f32> = (0..4 * width)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        x[width..2 * width].iter_mut().for_each(|v| *v *= 1e4); // a loud row
        x[2 * width..3 * width].fill(0.0); // a silent one
        let before = x.clone();
        round_rows(&mut x, width);
        for (r, (row, orig)) in x.chunks(width).zip(before.chunks(width)).enumerate() {
            let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The largest value survives exactly; every value within half an E4M3 step
            // (2^-4 relative to its binade) of the scaled grid.
            for (q, o) in row.iter().zip(orig) {
                if o.abs() == amax {
                    assert!((q - o).abs() <= amax * 1e-6, "row {r}: {q} vs {o}");
                }
                let tol = (o.abs() / 16.0).max(scale_for(amax) * 2f32.powi(-10));
                assert!((q - o).abs() <= tol, "row {r}: {q} vs {o}");
            }
        }
        assert!(x[2 * width..3 * width].iter().all(|&v| v == 0.0));
        // The codes and scales hold those values exactly.
        let (codes, scales) = quantise_rows(&before, width);
        assert_eq!((codes.len(), scales.len()), (before.len(), 4));
        for (i, (&c, &q)) in codes.iter().zip(&x).enumerate() {
            assert_eq!(
                (scales[i / width] * decode(c)).to_bits(),
                q.to_bits(),
                "value {i}"
            );
        }
        assert_eq!(scales[2], 1.0, "a row of zeros keeps scale 1");
        // A row's result does not depend on the rows beside it.
        let mut alone = before[width..2 * width].to_vec();
        round_rows(&mut alone, width);
        assert_eq!(alone, x[width..2 * width]);
    }

    #[test]
    fn scales_after_the_product_of_codes_give_the_emulated_product() {
        // The W8A8 product as Hopper runs it (the sums of the codes' products, then
        // rescale_product with both row scales) against the CPU emulation's (the rounded
        // values multiplied), stored into a y with a wider row stride and added to one.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (m, n, k, ld) = (5, 7, 40, 9);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4.0..4.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
        let (xc, xs) = quantise_rows(&x, k);
        let (wc, ws) = quantise_rows(&w, k);
        let (mut xr, mut wr) = (x.clone(), w.clone());
        round_rows(&mut xr, k);
        round_rows(&mut wr, k);
        let mut p = vec![0f32; m * n];
        let mut want = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let dot = |a: &[f32], b: &[f32]| -> f64 {
                    a.iter()
                        .zip(b)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum()
                };
                let codes = |cs: &[u8]| cs.iter().map(|&c| decode(c)).collect::<Vec<f32>>();
                let (xv, wv) = (codes(&xc[r * k..][..k]), codes(&wc[c * k..][..k]));
                p[r * n + c] = dot(&xv, &wv) as f32;
                want[r * n + c] = dot(&xr[r * k..][..k], &wr[c * k..][..k]);
            }
        }
        let y0: Vec<f32> = (0..m * ld).map(|_| rng.random_range(-1.0..1.0)).collect();
        for add in [false, true] {
            let mut y = y0.clone();
            rescale_product(&mut y, ld, &p, &xs, &ws, add);
            for r in 0..m {
                for c in 0..n {
                    let base = if add { f64::from(y0[r * ld + c]) } else { 0.0 };
                    let (got, exact) = (f64::from(y[r * ld + c]), base + want[r * n + c]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (exact.abs() + 1.0),
                        "add {add}, [{r}, {c}]: {got} vs {exact}"
                    );
                }
                // The columns past n in each row are not y's.
                assert_eq!(y[r * ld + n..(r + 1) * ld], y0[r * ld + n..(r + 1) * ld]);
            }
        }
    }
}

//! Every CUDA kernel family against its CPU twin on fresh random inputs, in both precisions.
//! Tolerance: |got - want| <= abs + rel * |want| with (1e-5, 1e-5) in f32 and (1e-2, 1e-2)
//! in bf16 (inputs are rounded to bf16 before the CPU sees them, so only the kernel's own
//! rounding and summation order differ). Outputs are poisoned with NaN before each launch
//! so that unwritten elements fail. Runs only with `--features cuda`, and fails (does not
//! skip) without a GPU.
#![cfg(feature = "cuda")]

use operators::cpu::{self, Linear, MatRef};
use operators::cuda::activation::{bias_act, Act, Out};
use operators::cuda::attention::{
    self, attention, fused_attention, fused_fits, softmax_masked, unpermute_heads, Mask, Problem,
    Scratch, Strided, Workspace,
};
use operators::cuda::embed::embed_tokens;
use operators::cuda::euler::{euler_step, euler_step_guided, Guidance};
use operators::cuda::fp8::{self as fp8k, quantise_e4m3, rescale_e4m3, W8a8};
use operators::cuda::layer_norm::layer_norm;
use operators::cuda::mlp::gelu_gate;
use operators::cuda::patch::{im2col, patch_embed_finish, unit_pixels};
use operators::cuda::residual::{add_act, add_residual};
use operators::cuda::rms_norm::{rms_norm, NormParam};
use operators::cuda::rope::{rope_qkv, rope_qkv_batch, Heads, RowBatch};
use operators::cuda::skinny::{self, Epilogue};
use operators::cuda::weights::fill_uniform;
use operators::cuda::{DType, DeviceBuffer, Gpu, Mat, Op, View};
use operators::gemma::Norm;
use rand::{Rng, SeedableRng};

const ACTS: [DType; 2] = [DType::F32, DType::Bf16];

/// Key chunks per block of the fused attention's tests: one (`attention_chunk`), two and
/// every key in one block (`attention_flash`, with and without the combine).
const PER_BLOCK: [usize; 3] = [1, 2, Problem::ALL_KEYS];

fn gpu(act: DType) -> Gpu {
    Gpu::new(act).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"))
}

fn tol(act: DType) -> (f32, f32) {
    match act {
        DType::Bf16 => (1e-2, 1e-2),
        _ => (1e-5, 1e-5),
    }
}

fn rand_vec(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `v` as the device stores it in `dtype`.
fn rounded(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::Bf16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        _ => v.to_vec(),
    }
}

/// Uploads `v` as `dtype`; returns the buffer and the values it holds.
fn up(g: &Gpu, dtype: DType, v: &[f32]) -> (DeviceBuffer, Vec<f32>) {
    (g.upload(dtype, v).unwrap(), rounded(dtype, v))
}

fn nan(g: &Gpu, dtype: DType, n: usize) -> DeviceBuffer {
    g.poisoned(dtype, n).unwrap()
}

/// Asserts |got - want| <= abs + rel |want| everywhere; prints the first mismatches.
fn check(name: &str, got: &[f32], want: &[f32], (abs, rel): (f32, f32)) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad: Vec<usize> = (0..got.len())
        // NaN fails: the comparison is false for it.
        .filter(|&i| {
            let ok = (got[i] - want[i]).abs() <= abs + rel * want[i].abs();
            !ok
        })
        .collect();
    let max = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, |m, d| if d.is_nan() || d > m { d } else { m });
    println!("{name}: {} values, max abs err {max:.3e}", got.len());
    if !bad.is_empty() {
        for &i in bad.iter().take(10) {
            println!("  [{i}] got {} want {}", got[i], want[i]);
        }
        panic!(
            "{name}: {} of {} values outside tolerance",
            bad.len(),
            got.len()
        );
    }
}

#[test]
fn gemm_matches_cpu_matmul() {
    for act in ACTS {
        let g = gpu(act);
        let (m, n, k) = (37, 70, 129);
        let s = 1.0 / (k as f32).sqrt();
        // y[m, n] (ld n + 3) = x[m, k] (ld k + 5) . w[n, k]^T, accumulated onto y (beta = 1).
        let (ldx, ldy) = (k + 5, n + 3);
        let (xb, x) = up(&g, act, &rand_vec(m * ldx, 1, -1.0, 1.0));
        let (wb, w) = up(&g, act, &rand_vec(n * k, 2, -s, s));
        let y0 = rand_vec(m * ldy, 3, -1.0, 1.0);
        let (yb, _) = up(&g, DType::F32, &y0);
        let xm = Mat::new(xb.view(), m, k).ld(ldx);
        let ym = Mat::new(yb.view(), m, n).ld(ldy);
        g.gemm
            .matmul(
                &g.lane,
                xm,
                Mat::new(wb.view(), n, k),
                Op::Wt,
                ym,
                1.0,
                1.0,
                1,
            )
            .unwrap();
        let mut want = y0.clone();
        let xr = MatRef {
            data: &x,
            offset: 0,
            rows: m,
            cols: k,
            row_stride: ldx,
            col_stride: 1,
        };
        let mut prod = vec![0.0f32; m * ldy];
        cpu::matmul_into(&mut prod, 0, ldy, xr, MatRef::new(&w, n, k).t(), 1.0);
        for r in 0..m {
            for c in 0..n {
                want[r * ldy + c] += prod[r * ldy + c];
            }
        }
        check(
            &format!("gemm Wt beta=1 {act:?}"),
            &g.download(yb.view()).unwrap(),
            &want,
            tol(act),
        );

        // Batched y_b = alpha x_b . b_b with b stored [K, N], output in the activation type.
        let batch = 3;
        let (xb, x) = up(&g, act, &rand_vec(batch * m * k, 4, -1.0, 1.0));
        let (bb, b) = up(&g, act, &rand_vec(batch * k * n, 5, -s, s));
        let yb = nan(&g, act, batch * m * n);
        g.gemm
            .matmul(
                &g.lane,
                Mat::new(xb.view(), m, k),
                Mat::new(bb.view(), k, n),
                Op::N,
                Mat::new(yb.view(), m, n),
                0.5,
                0.0,
                batch,
            )
            .unwrap();
        let mut want = vec![0.0f32; batch * m * n];
        for i in 0..batch {
            let mut out = vec![0.0f32; m * n];
            cpu::matmul_into(
                &mut out,
                0,
                n,
                MatRef::new(&x[i * m * k..(i + 1) * m * k], m, k),
                MatRef::new(&b[i * k * n..(i + 1) * k * n], k, n),
                0.5,
            );
            want[i * m * n..(i + 1) * m * n].copy_from_slice(&rounded(act, &out));
        }
        check(
            &format!("gemm N batched {act:?}"),
            &g.download(yb.view()).unwrap(),
            &want,
            tol(act),
        );
    }
}

#[test]
fn layer_norm_matches_cpu() {
    // 1152: one float4 per thread (288 threads); 1000: 256 threads striding over the row.
    for (act, width) in [1152, 1000].into_iter().flat_map(|w| ACTS.map(|a| (a, w))) {
        let g = gpu(act);
        let rows = 5;
        let x0 = rand_vec(rows * width, 10, -2.0, 3.0);
        let (xb, _) = up(&g, DType::F32, &x0);
        let (pb, pre) = up(&g, DType::F32, &rand_vec(width, 11, -0.5, 0.5));
        let (wb, w) = up(&g, DType::F32, &rand_vec(width, 12, 0.5, 1.5));
        let (bb, b) = up(&g, DType::F32, &rand_vec(width, 13, -0.1, 0.1));
        let yb = nan(&g, act, rows * width);
        layer_norm(
            &g.kernels,
            &g.lane,
            xb.view(),
            Some(pb.view()),
            wb.view(),
            bb.view(),
            yb.view(),
            rows,
            width,
            1e-6,
        )
        .unwrap();
        let mut x = x0.clone();
        cpu::add_residual(&mut x, &pre.repeat(rows), None);
        let x_after = x.clone();
        cpu::layer_norm(&mut x, width, &w, &b, 1e-6);
        check(
            &format!("layer_norm {act:?} width {width}"),
            &g.download(yb.view()).unwrap(),
            &rounded(act, &x),
            tol(act),
        );
        check(
            "layer_norm pre-bias written back",
            &g.download(xb.view()).unwrap(),
            &x_after,
            (0.0, 0.0),
        );
    }
}

#[test]
fn rms_norm_plain_and_adaptive_match_gemma_norm() {
    // 1024: one float4 per thread (256 threads); 1000: 256 threads striding over the row.
    for (act, width) in [1024, 1000].into_iter().flat_map(|w| ACTS.map(|a| (a, w))) {
        let g = gpu(act);
        let rows = 6;
        let x = rand_vec(rows * width, 20, -2.0, 2.0);
        let (xb, _) = up(&g, DType::F32, &x);
        // Plain: the device holds 1 + w.
        let w = rand_vec(width, 21, -0.3, 0.3);
        let w1p: Vec<f32> = w.iter().map(|w| 1.0 + w).collect();
        let (wb, _) = up(&g, DType::F32, &w1p);
        let yb = nan(&g, act, rows * width);
        rms_norm(
            &g.kernels,
            &g.lane,
            xb.view(),
            NormParam::OnePlus(wb.view()),
            yb.view(),
            rows,
            width,
            1e-6,
        )
        .unwrap();
        let want = Norm::Plain(w).forward(&x, width, 1e-6, None).x;
        check(
            &format!("rms_norm {act:?} width {width}"),
            &g.download(yb.view()).unwrap(),
            &rounded(act, &want),
            tol(act),
        );

        // Adaptive: modulation = dense(cond) = [scale | shift | gate].
        let dense = Linear {
            weight: rand_vec(3 * width * width, 22, -0.03, 0.03),
            bias: Some(rand_vec(3 * width, 23, -0.1, 0.1)),
            n_in: width,
            n_out: 3 * width,
            fp8: None,
        };
        let cond = rand_vec(width, 24, -1.0, 1.0);
        let modulation = dense.forward(&cond, 1);
        let (mb, _) = up(&g, DType::F32, &modulation);
        let yb = nan(&g, act, rows * width);
        rms_norm(
            &g.kernels,
            &g.lane,
            xb.view(),
            NormParam::Modulation(mb.view()),
            yb.view(),
            rows,
            width,
            1e-6,
        )
        .unwrap();
        let normed = Norm::Adaptive(dense).forward(&x, width, 1e-6, Some(&cond));
        check(
            &format!("rms_norm adaptive {act:?} width {width}"),
            &g.download(yb.view()).unwrap(),
            &rounded(act, &normed.x),
            tol(act),
        );
        // The gate the residual add reads is the third chunk of the same modulation.
        assert_eq!(normed.gate.map(|g| g.len()), Some(width));
    }
}

#[test]
fn gelu_gate_matches_cpu() {
    // 700: one output per thread; 704: eight per thread (16-byte loads in bf16). Plain, and
    // reading an FP8 gate|up product of codes taken with unit scales (the prefix with
    // `--dtype fp8` on Hopper): each value times its row's and its column's scale first, as
    // fp8::rescale_product computes it (in f32, unrounded), with scaled values of a few
    // units, where gelu is far from linear. The output starts all NaN; a scale vector too
    // short is refused.
    for (act, mlp) in [700, 704].into_iter().flat_map(|m| ACTS.map(|a| (a, m))) {
        let g = gpu(act);
        let rows = 9;
        for scaled in [false, true] {
            let name = format!("gelu_gate {act:?} mlp {mlp} scaled {scaled}");
            let amp = if scaled { 3000.0 } else { 4.0 };
            let (gub, gu) = up(&g, act, &rand_vec(rows * 2 * mlp, 30, -amp, amp));
            let xs = rand_vec(rows, 32, 1e-2, 5e-2);
            let ws = rand_vec(2 * mlp, 33, 2e-2, 5e-2);
            let (xsb, _) = up(&g, DType::F32, &xs);
            let (wsb, _) = up(&g, DType::F32, &ws);
            let scales = scaled.then(|| (xsb.view(), wsb.view()));
            let ob = nan(&g, act, rows * mlp);
            gelu_gate(
                &g.kernels,
                &g.lane,
                (gub.view(), ob.view()),
                rows,
                mlp,
                scales,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut v = gu.clone();
            if scaled {
                operators::fp8::rescale_product(&mut v, 2 * mlp, &gu, &xs, &ws, false);
            }
            let mut want = vec![0.0; rows * mlp];
            for r in 0..rows {
                for c in 0..mlp {
                    want[r * mlp + c] =
                        cpu::gelu_tanh(v[r * 2 * mlp + c]) * v[r * 2 * mlp + mlp + c];
                }
            }
            check(
                &name,
                &g.download(ob.view()).unwrap(),
                &rounded(act, &want),
                tol(act),
            );
        }
        let (gub, _) = up(&g, act, &rand_vec(rows * 2 * mlp, 30, -4.0, 4.0));
        let ob = nan(&g, act, rows * mlp);
        let (xsb, _) = up(&g, DType::F32, &vec![1.0; rows]);
        let (wsb, _) = up(&g, DType::F32, &vec![1.0; 2 * mlp - 1]);
        let short = Some((xsb.view(), wsb.view()));
        let refused = gelu_gate(
            &g.kernels,
            &g.lane,
            (gub.view(), ob.view()),
            rows,
            mlp,
            short,
        );
        assert!(refused.is_err(), "{act:?} mlp {mlp}: short weight scales");
    }
}

#[test]
fn bias_act_matches_cpu() {
    // Strides of 310 and 305: one value per thread; 304 and 308: four (vector loads and
    // stores).
    let layouts = [(310, 305), (304, 308)];
    for (act, (ldx, ldo)) in layouts.into_iter().flat_map(|l| ACTS.map(|a| (a, l))) {
        let g = gpu(act);
        let (rows, width) = (7, 300);
        let (xb, x) = up(&g, DType::F32, &rand_vec(rows * ldx, 40, -5.0, 5.0));
        let (bb, b) = up(&g, DType::F32, &rand_vec(width, 41, -1.0, 1.0));
        for (a, f) in [
            (Act::None, (|v| v) as fn(f32) -> f32),
            (Act::Silu, cpu::silu as fn(f32) -> f32),
            (Act::GeluTanh, cpu::gelu_tanh as fn(f32) -> f32),
        ] {
            let of = nan(&g, DType::F32, rows * ldo);
            let oa = nan(&g, act, rows * ldo);
            let out = Out {
                f32: Some(of.view()),
                act: Some(oa.view()),
                ld: ldo,
            };
            bias_act(
                &g.kernels,
                &g.lane,
                xb.view(),
                ldx,
                Some(bb.view()),
                a,
                out,
                rows,
                width,
            )
            .unwrap();
            let got_f = g.download(of.view()).unwrap();
            let got_a = g.download(oa.view()).unwrap();
            let (mut gf, mut ga, mut want) = (vec![], vec![], vec![]);
            for r in 0..rows {
                for c in 0..width {
                    want.push(f(x[r * ldx + c] + b[c]));
                    gf.push(got_f[r * ldo + c]);
                    ga.push(got_a[r * ldo + c]);
                }
                // The padding between rows is never written.
                assert!(got_f[r * ldo + width..(r + 1) * ldo]
                    .iter()
                    .all(|v| v.is_nan()));
            }
            check(
                &format!("bias_act {a:?} f32 out, strides {ldx}/{ldo}"),
                &gf,
                &want,
                tol(DType::F32),
            );
            check(
                &format!("bias_act {a:?} {act:?} out, strides {ldx}/{ldo}"),
                &ga,
                &rounded(act, &want),
                tol(act),
            );
        }
    }
}

#[test]
fn add_residual_matches_cpu() {
    let g = gpu(DType::F32);
    let (rows, width) = (11, 513);
    let x0 = rand_vec(rows * width, 50, -1.0, 1.0);
    let y = rand_vec(rows * width, 51, -1.0, 1.0);
    let gate = rand_vec(width, 52, -2.0, 2.0);
    for gated in [false, true] {
        let (xb, _) = up(&g, DType::F32, &x0);
        let (yb, _) = up(&g, DType::F32, &y);
        let (gb, _) = up(&g, DType::F32, &gate);
        add_residual(
            &g.kernels,
            &g.lane,
            xb.view(),
            yb.view(),
            gated.then(|| gb.view()),
            rows,
            width,
        )
        .unwrap();
        let mut want = x0.clone();
        cpu::add_residual(&mut want, &y, gated.then_some(gate.as_slice()));
        check(
            &format!("add_residual gated={gated}"),
            &g.download(xb.view()).unwrap(),
            &want,
            (0.0, 0.0),
        );
    }
}

/// [kv][rows][group][hd] -> [rows][nh * hd].
fn ungroup(v: &[f32], rows: usize, kv: usize, group: usize, hd: usize) -> Vec<f32> {
    let nh = kv * group;
    let mut out = vec![0.0; rows * nh * hd];
    for g in 0..kv {
        for r in 0..rows {
            for j in 0..group {
                for d in 0..hd {
                    out[r * nh * hd + (g * group + j) * hd + d] =
                        v[((g * rows + r) * group + j) * hd + d];
                }
            }
        }
    }
    out
}

fn group_rows(v: &[f32], rows: usize, kv: usize, group: usize, hd: usize) -> Vec<f32> {
    let nh = kv * group;
    let mut out = vec![0.0; rows * nh * hd];
    for g in 0..kv {
        for r in 0..rows {
            for j in 0..group {
                for d in 0..hd {
                    out[((g * rows + r) * group + j) * hd + d] =
                        v[r * nh * hd + (g * group + j) * hd + d];
                }
            }
        }
    }
    out
}

/// rope_qkv's outputs in `q` (grouped), `k` and `v` (cache rows row0..row0 + rows) against
/// cpu::rope of `qkv` [rows, qkv_width] at positions pos0..; v, a copy of qkv's v, within
/// `v_tol`; the caches outside those rows still NaN.
fn check_rope_outputs(
    g: &Gpu,
    (name, act): (&str, DType),
    qkv: &[f32],
    (qb, kb, vb): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    (rows, heads, pos0, row0): (usize, Heads, usize, usize),
    inv: &[f32],
    v_tol: (f32, f32),
) {
    let Heads { nh, kv, hd } = heads;
    let (qkvw, kvw) = (heads.qkv_width(), heads.kv_width());
    let positions: Vec<usize> = (pos0..pos0 + rows).collect();
    let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
    for r in 0..rows {
        let row = &qkv[r * qkvw..(r + 1) * qkvw];
        q.extend_from_slice(&row[..nh * hd]);
        k.extend_from_slice(&row[nh * hd..nh * hd + kvw]);
        v.extend_from_slice(&row[nh * hd + kvw..]);
    }
    cpu::rope(&mut q, nh, hd, &positions, inv);
    cpu::rope(&mut k, kv, hd, &positions, inv);
    let got_q = ungroup(&g.download(qb.view()).unwrap(), rows, kv, nh / kv, hd);
    check(&format!("{name} q"), &got_q, &rounded(act, &q), tol(act));
    let got_k = g.download(kb.view()).unwrap();
    let got_v = g.download(vb.view()).unwrap();
    let written = row0 * kvw..(row0 + rows) * kvw;
    check(
        &format!("{name} k"),
        &got_k[written.clone()],
        &rounded(act, &k),
        tol(act),
    );
    check(&format!("{name} v"), &got_v[written], &v, v_tol);
    for cache in [&got_k, &got_v] {
        assert!(
            cache[..row0 * kvw].iter().all(|x| x.is_nan()),
            "{name}: wrote before row0"
        );
        assert!(
            cache[(row0 + rows) * kvw..].iter().all(|x| x.is_nan()),
            "{name}: wrote past the rows"
        );
    }
}

#[test]
fn rope_qkv_matches_cpu_rope() {
    for act in ACTS {
        let g = gpu(act);
        for (nh, kv, hd) in [(4, 2, 16), (8, 1, 256)] {
            let heads = Heads { nh, kv, hd };
            let (rows, pos0, row0, cap) = (7, 5usize, 3usize, 12usize);
            let qkvw = heads.qkv_width();
            let kvw = heads.kv_width();
            let (qkvb, qkv) = up(&g, act, &rand_vec(rows * qkvw, 60, -1.0, 1.0));
            let inv = cpu::rope_inv_freq(hd, 10000.0);
            let (ib, _) = up(&g, DType::F32, &inv);
            let (pb, _) = up(&g, DType::I32, &[pos0 as f32]);
            let qb = nan(&g, act, rows * nh * hd);
            let kb = nan(&g, act, cap * kvw);
            let vb = nan(&g, act, cap * kvw);
            rope_qkv(
                &g.kernels,
                &g.lane,
                qkvb.view(),
                qb.view(),
                kb.view(),
                vb.view(),
                ib.view(),
                pb.view(),
                rows,
                heads,
                row0,
            )
            .unwrap();
            let name = format!("rope {nh}/{kv}x{hd} {act:?}");
            let outs = (&qb, &kb, &vb);
            let at = (rows, heads, pos0, row0);
            check_rope_outputs(&g, (&name, act), &qkv, outs, at, &inv, (0.0, 0.0));
        }
    }
}

#[test]
fn rope_qkv_batch_equals_each_sequence_alone() {
    // Three sequences of 5 rows in one launch, each at its own first position (read 3 i32
    // apart) writing its own cache (caches `stride` elements apart, with a gap between them
    // that stays poisoned): the bits of each sequence's rope_qkv alone.
    for act in ACTS {
        let g = gpu(act);
        for (nh, kv, hd) in [(4, 2, 16), (8, 1, 256)] {
            let heads = Heads { nh, kv, hd };
            let (per, seqs, row0, cap) = (5, 3, 4usize, 12usize);
            let (kvw, qkvw) = (heads.kv_width(), heads.qkv_width());
            let stride = cap * kvw + 3 * hd;
            let cache_len = (seqs - 1) * stride + cap * kvw;
            let (qkvb, _) = up(&g, act, &rand_vec(seqs * per * qkvw, 61, -1.0, 1.0));
            let inv = cpu::rope_inv_freq(hd, 10000.0);
            let (ib, _) = up(&g, DType::F32, &inv);
            let firsts = [9.0f32, -1.0, -1.0, 0.0, -1.0, -1.0, 31.0];
            let (pb, _) = up(&g, DType::I32, &firsts);
            let (qb, kb, vb) = (
                nan(&g, act, seqs * per * nh * hd),
                nan(&g, act, cache_len),
                nan(&g, act, cache_len),
            );
            let batch = RowBatch {
                n: seqs,
                per,
                kv_stride: stride,
                prefix_stride: 3,
            };
            let io = (qkvb.view(), qb.view(), kb.view(), vb.view());
            rope_qkv_batch(
                &g.kernels,
                &g.lane,
                io,
                ib.view(),
                pb.view(),
                batch,
                heads,
                row0,
            )
            .unwrap();
            let (q_all, k_all, v_all) = (
                g.download(qb.view()).unwrap(),
                g.download(kb.view()).unwrap(),
                g.download(vb.view()).unwrap(),
            );
            for b in 0..seqs {
                let (q1, k1, v1) = (
                    nan(&g, act, per * nh * hd),
                    nan(&g, act, cap * kvw),
                    nan(&g, act, cap * kvw),
                );
                rope_qkv(
                    &g.kernels,
                    &g.lane,
                    qkvb.view().at(b * per * qkvw, per * qkvw).unwrap(),
                    q1.view(),
                    k1.view(),
                    v1.view(),
                    ib.view(),
                    pb.view().at(3 * b, 1).unwrap(),
                    per,
                    heads,
                    row0,
                )
                .unwrap();
                let name = format!("rope batch {nh}/{kv}x{hd} {act:?}, sequence {b}");
                let q_seq = per * nh * hd;
                let got_q = &q_all[b * q_seq..(b + 1) * q_seq];
                assert_eq!(
                    bits(got_q),
                    bits(&g.download(q1.view()).unwrap()),
                    "{name}: q"
                );
                let c = b * stride..b * stride + cap * kvw;
                let got_k = &k_all[c.clone()];
                assert_eq!(
                    bits(got_k),
                    bits(&g.download(k1.view()).unwrap()),
                    "{name}: k"
                );
                let got_v = &v_all[c];
                assert_eq!(
                    bits(got_v),
                    bits(&g.download(v1.view()).unwrap()),
                    "{name}: v"
                );
            }
            for b in 0..seqs - 1 {
                let gap = b * stride + cap * kvw..(b + 1) * stride;
                assert!(
                    k_all[gap.clone()].iter().all(|x| x.is_nan()),
                    "k gap {b} written"
                );
                assert!(v_all[gap].iter().all(|x| x.is_nan()), "v gap {b} written");
            }
        }
    }
}

#[test]
fn fused_attention_batch_equals_each_sequence_alone() {
    // The expert's queries of three sequences, each over its own cache (`stride` elements
    // apart) with its own prefix length (read 3 i32 apart: 97, 0 and the whole cap), in one
    // launch: the bits of each sequence's attention alone.
    let g = gpu(DType::Bf16);
    let act = DType::Bf16;
    let cases = [(8, 1, 256, 10, 0), (4, 2, 64, 11, 1)];
    for ((nh, kv, hd, s_rows, n_state), per_block) in cases
        .into_iter()
        .flat_map(|c| PER_BLOCK.map(move |pb| (c, pb)))
    {
        let (seqs, cap) = (3, 130);
        let group = nh / kv;
        let kvw = kv * hd;
        let keys = cap + s_rows;
        let stride = keys * kvw + 8 * hd;
        let gr = s_rows * group;
        let q_seq = kv * gr * hd;
        let (qb, _) = up(&g, act, &rand_vec(seqs * q_seq, 290, -1.0, 1.0));
        let cache_len = (seqs - 1) * stride + keys * kvw;
        let (kb, _) = up(&g, act, &rand_vec(cache_len, 291, -2.0, 2.0));
        let (vb, _) = up(&g, act, &rand_vec(cache_len, 292, -1.0, 1.0));
        let (lb, _) = up(
            &g,
            DType::I32,
            &[97.0, -1.0, -1.0, 0.0, -1.0, -1.0, cap as f32],
        );
        let run = |n2: usize, q: View, (k, v): (View, View), plen: View, out: View| {
            let prob = Problem {
                rows: gr,
                keys,
                hd,
                n1: kv,
                n2,
                per_block,
            };
            let (_p, _s, work) = workspace(&g, &prob);
            let fq = Strided {
                view: q,
                ld: hd,
                s1: gr * hd,
                s2: q_seq,
            };
            let fk = Strided {
                view: k,
                ld: kvw,
                s1: hd,
                s2: stride,
            };
            let fv = Strided { view: v, ..fk };
            let fo = Strided { view: out, ..fq };
            assert!(fused_fits(&g.kernels, &prob, &fq, (&fk, &fv), &fo));
            let mask = Mask {
                prefix_len: Some(plen),
                prefix_stride: 3,
                prefix_cap: cap,
                n_state,
                group,
            };
            let scale = attention::scale(hd);
            fused_attention(
                &g.kernels,
                &g.lane,
                &prob,
                fq,
                (fk, fv),
                fo,
                scale,
                &mask,
                work,
            )
            .unwrap();
            g.download(out).unwrap()
        };
        let out = nan(&g, act, seqs * q_seq);
        let all = run(
            seqs,
            qb.view(),
            (kb.view(), vb.view()),
            lb.view(),
            out.view(),
        );
        for b in 0..seqs {
            let one = nan(&g, act, q_seq);
            let kv_b = (
                kb.view().at(b * stride, keys * kvw).unwrap(),
                vb.view().at(b * stride, keys * kvw).unwrap(),
            );
            let q_b = qb.view().at(b * q_seq, q_seq).unwrap();
            let alone = run(1, q_b, kv_b, lb.view().at(3 * b, 1).unwrap(), one.view());
            assert!(alone.iter().all(|x| x.is_finite()), "sequence {b} alone");
            assert_eq!(
                bits(&all[b * q_seq..(b + 1) * q_seq]),
                bits(&alone),
                "attention batch {nh}/{kv}x{hd}, {per_block} chunks per block, sequence {b}"
            );
        }
    }
}

#[test]
fn softmax_masked_matches_cpu() {
    for act in ACTS {
        let g = gpu(act);
        // Rows: 2 batches x (3 queries x group 2); keys: cap 40 prefix slots (plen valid) + 4 suffix.
        let (group, q_rows, batch, cap, suffix) = (2, 3, 2, 40, 4);
        let keys = cap + suffix;
        let per_batch = q_rows * group;
        let rows = batch * per_batch;
        // Rows padded to `ld`: the padding must stay untouched.
        let ld = keys + 4;
        for (plen, n_state) in [(29usize, 1usize), (0, 1), (40, 0)] {
            let (sb, s) = up(&g, DType::F32, &rand_vec(rows * ld, 70, -6.0, 6.0));
            let (lb, _) = up(&g, DType::I32, &[plen as f32]);
            let pb = nan(&g, act, rows * ld);
            let mask = Mask {
                prefix_len: Some(lb.view()),
                prefix_stride: 0,
                prefix_cap: cap,
                n_state,
                group,
            };
            softmax_masked(
                &g.kernels,
                &g.lane,
                sb.view(),
                pb.view(),
                rows,
                per_batch,
                keys,
                ld,
                &mask,
            )
            .unwrap();
            let got = g.download(pb.view()).unwrap();
            let (mut want, mut got_rows) = (Vec::new(), Vec::new());
            for r in 0..rows {
                let mut row = s[r * ld..r * ld + keys].to_vec();
                let q = (r % per_batch) / group;
                cpu::softmax_masked(&mut row, |j| {
                    if j < cap {
                        j < plen
                    } else {
                        (j - cap) < n_state || q >= n_state
                    }
                });
                want.extend(row);
                got_rows.extend_from_slice(&got[r * ld..r * ld + keys]);
                assert!(
                    got[r * ld + keys..(r + 1) * ld].iter().all(|v| v.is_nan()),
                    "padding written"
                );
            }
            check(
                &format!("softmax plen {plen} state {n_state} {act:?}"),
                &got_rows,
                &rounded(act, &want),
                tol(act),
            );
        }
        // A row that sees nothing gets zeros.
        let (sb, _) = up(&g, DType::F32, &rand_vec(8, 71, -1.0, 1.0));
        let (lb, _) = up(&g, DType::I32, &[0.0]);
        let pb = nan(&g, act, 8);
        let mask = Mask {
            prefix_len: Some(lb.view()),
            prefix_stride: 0,
            prefix_cap: 8,
            n_state: 0,
            group: 1,
        };
        softmax_masked(&g.kernels, &g.lane, sb.view(), pb.view(), 1, 1, 8, 8, &mask).unwrap();
        assert_eq!(g.download(pb.view()).unwrap(), vec![0.0; 8]);
    }
}

fn scratch(g: &Gpu, act: DType, n: usize) -> (DeviceBuffer, DeviceBuffer, Scratch) {
    let s = nan(g, DType::F32, n);
    let p = nan(g, act, n);
    let sc = Scratch {
        scores: s.view(),
        probs: p.view(),
    };
    (s, p, sc)
}

#[test]
fn attention_multi_head_matches_cpu() {
    // SigLIP's layout: heads side by side in a fused [T, 3 w] q|k|v buffer, batch = heads.
    for act in ACTS {
        let g = gpu(act);
        let (t, nh, hd) = (50, 4, 72);
        let w = nh * hd;
        let (qkvb, qkv) = up(&g, act, &rand_vec(t * 3 * w, 80, -1.0, 1.0));
        let ob = nan(&g, act, t * w);
        let (_s, _p, sc) = scratch(&g, act, nh * t * attention::score_stride(t));
        let q = Mat {
            view: qkvb.view(),
            rows: t,
            cols: hd,
            ld: 3 * w,
            stride: hd,
            fp8: None,
        };
        let k = Mat {
            view: qkvb.view().tail(w).unwrap(),
            ..q
        };
        let v = Mat {
            view: qkvb.view().tail(2 * w).unwrap(),
            ..q
        };
        let o = Mat {
            view: ob.view(),
            rows: t,
            cols: hd,
            ld: w,
            stride: hd,
            fp8: None,
        };
        attention(
            &g.kernels,
            &g.gemm,
            &g.lane,
            q,
            k,
            v,
            o,
            nh,
            attention::scale(hd),
            &Mask::full(t),
            sc,
        )
        .unwrap();
        let split = |off: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|r| qkv[r * 3 * w + off..r * 3 * w + off + w].to_vec())
                .collect()
        };
        let want = cpu::attention(
            &split(0),
            &split(w),
            &split(2 * w),
            t,
            t,
            nh,
            nh,
            hd,
            &|_, _| true,
        );
        check(
            &format!("attention MHA {act:?}"),
            &g.download(ob.view()).unwrap(),
            &want,
            tol(act),
        );
    }
}

#[test]
fn attention_grouped_with_padded_cache_matches_cpu() {
    // The expert's layout: grouped queries, K/V caches with `plen` valid prefix rows of `cap`
    // and the suffix after them, pi0's block-causal mask.
    for act in ACTS {
        let g = gpu(act);
        for (nh, kv, hd) in [(4, 2, 16), (8, 1, 256)] {
            let group = nh / kv;
            let kvw = kv * hd;
            let (s_rows, cap, plen, n_state) = (11, 30, 21, 1);
            let keys = cap + s_rows;
            let q = rand_vec(s_rows * nh * hd, 90, -1.0, 1.0);
            let (qb, q) = up(&g, act, &group_rows(&q, s_rows, kv, group, hd));
            let q = ungroup(&q, s_rows, kv, group, hd);
            let (kb, kc) = up(&g, act, &rand_vec(keys * kvw, 91, -1.0, 1.0));
            let (vb, vc) = up(&g, act, &rand_vec(keys * kvw, 92, -1.0, 1.0));
            let (lb, _) = up(&g, DType::I32, &[plen as f32]);
            let og = nan(&g, act, s_rows * nh * hd);
            let ob = nan(&g, act, s_rows * nh * hd);
            let (_s, _p, sc) =
                scratch(&g, act, kv * s_rows * group * attention::score_stride(keys));
            let gr = s_rows * group;
            let km = Mat {
                view: kb.view(),
                rows: keys,
                cols: hd,
                ld: kvw,
                stride: hd,
                fp8: None,
            };
            let vm = Mat {
                view: vb.view(),
                ..km
            };
            let mask = Mask {
                prefix_len: Some(lb.view()),
                prefix_stride: 0,
                prefix_cap: cap,
                n_state,
                group,
            };
            attention(
                &g.kernels,
                &g.gemm,
                &g.lane,
                Mat::new(qb.view(), gr, hd),
                km,
                vm,
                Mat::new(og.view(), gr, hd),
                kv,
                attention::scale(hd),
                &mask,
                sc,
            )
            .unwrap();
            unpermute_heads(
                &g.kernels,
                &g.lane,
                og.view(),
                ob.view(),
                s_rows,
                kv,
                group,
                hd,
            )
            .unwrap();
            // CPU: the valid prefix rows then the suffix rows, pi0's mask over the suffix.
            let mut keys_cpu = kc[..plen * kvw].to_vec();
            keys_cpu.extend_from_slice(&kc[cap * kvw..]);
            let mut vals_cpu = vc[..plen * kvw].to_vec();
            vals_cpu.extend_from_slice(&vc[cap * kvw..]);
            let see = |i: usize, j: usize| j < plen || (j - plen) < n_state || i >= n_state;
            let want = cpu::attention(
                &q,
                &keys_cpu,
                &vals_cpu,
                s_rows,
                plen + s_rows,
                nh,
                kv,
                hd,
                &see,
            );
            check(
                &format!("attention grouped {nh}/{kv}x{hd} {act:?}"),
                &g.download(ob.view()).unwrap(),
                &want,
                tol(act),
            );
        }
    }
}

/// A workspace for `p`, poisoned.
fn workspace(g: &Gpu, p: &Problem) -> (DeviceBuffer, DeviceBuffer, Workspace) {
    let (np, ns) = p.workspace();
    let part = nan(g, DType::F32, np.max(1));
    let stats = nan(g, DType::F32, ns.max(1));
    let w = Workspace {
        part: part.view(),
        stats: stats.view(),
    };
    (part, stats, w)
}

#[test]
fn fused_attention_matches_cpu_on_the_expert_layout() {
    // Grouped queries over a K/V cache of `cap` prefix rows (`plen` valid) and the suffix:
    // several key chunks with a partial last one, a single chunk (no combine), GQA, pi0's
    // block-causal mask and pi0.5's full one; and the prefix's layout (Gemma 2B's 8 query
    // heads over one KV head, every key visible: no prefix slots, all rows after n_state).
    let g = gpu(DType::Bf16);
    let act = DType::Bf16;
    let cases = [
        (8, 1, 256, 51, 200, 150, 1),
        (8, 1, 256, 10, 130, 97, 0),
        (4, 2, 64, 11, 30, 21, 1),
        (2, 2, 72, 5, 300, 0, 0),
        (8, 1, 256, 300, 0, 0, 0),
    ];
    for ((nh, kv, hd, s_rows, cap, plen, n_state), per_block) in cases
        .into_iter()
        .flat_map(|c| PER_BLOCK.map(move |pb| (c, pb)))
    {
        let group = nh / kv;
        let kvw = kv * hd;
        let keys = cap + s_rows;
        let q = rand_vec(s_rows * nh * hd, 190, -1.0, 1.0);
        let (qb, q) = up(&g, act, &group_rows(&q, s_rows, kv, group, hd));
        let q = ungroup(&q, s_rows, kv, group, hd);
        let (kb, kc) = up(&g, act, &rand_vec(keys * kvw, 191, -2.0, 2.0));
        let (vb, vc) = up(&g, act, &rand_vec(keys * kvw, 192, -1.0, 1.0));
        let (lb, _) = up(&g, DType::I32, &[plen as f32]);
        let og = nan(&g, act, s_rows * nh * hd);
        let ob = nan(&g, act, s_rows * nh * hd);
        let gr = s_rows * group;
        let prob = Problem {
            rows: gr,
            keys,
            hd,
            n1: kv,
            n2: 1,
            per_block,
        };
        let (_p, _s, work) = workspace(&g, &prob);
        let fq = Strided {
            view: qb.view(),
            ld: hd,
            s1: gr * hd,
            s2: 0,
        };
        let fk = Strided {
            view: kb.view(),
            ld: kvw,
            s1: hd,
            s2: 0,
        };
        let fv = Strided {
            view: vb.view(),
            ..fk
        };
        let fo = Strided {
            view: og.view(),
            ..fq
        };
        assert!(
            fused_fits(&g.kernels, &prob, &fq, (&fk, &fv), &fo),
            "the fused attention must serve {prob:?}"
        );
        let mask = Mask {
            prefix_len: Some(lb.view()),
            prefix_stride: 0,
            prefix_cap: cap,
            n_state,
            group,
        };
        fused_attention(
            &g.kernels,
            &g.lane,
            &prob,
            fq,
            (fk, fv),
            fo,
            attention::scale(hd),
            &mask,
            work,
        )
        .unwrap();
        unpermute_heads(
            &g.kernels,
            &g.lane,
            og.view(),
            ob.view(),
            s_rows,
            kv,
            group,
            hd,
        )
        .unwrap();
        let mut keys_cpu = kc[..plen * kvw].to_vec();
        keys_cpu.extend_from_slice(&kc[cap * kvw..]);
        let mut vals_cpu = vc[..plen * kvw].to_vec();
        vals_cpu.extend_from_slice(&vc[cap * kvw..]);
        let see = |i: usize, j: usize| j < plen || (j - plen) < n_state || i >= n_state;
        let want = cpu::attention(
            &q,
            &keys_cpu,
            &vals_cpu,
            s_rows,
            plen + s_rows,
            nh,
            kv,
            hd,
            &see,
        );
        check(
            &format!("fused attention {nh}/{kv}x{hd}, {keys} keys, {per_block} chunks per block"),
            &g.download(ob.view()).unwrap(),
            &want,
            tol(act),
        );
    }
}

#[test]
fn fused_attention_rows_that_see_nothing_are_zero() {
    let g = gpu(DType::Bf16);
    let act = DType::Bf16;
    let (rows, keys, hd) = (20, 150, 64);
    let (qb, _) = up(&g, act, &rand_vec(rows * hd, 193, -1.0, 1.0));
    let (kb, _) = up(&g, act, &rand_vec(keys * hd, 194, -1.0, 1.0));
    let (vb, _) = up(&g, act, &rand_vec(keys * hd, 195, -1.0, 1.0));
    let (lb, _) = up(&g, DType::I32, &[0.0]);
    for per_block in PER_BLOCK {
        let ob = nan(&g, act, rows * hd);
        let prob = Problem {
            rows,
            keys,
            hd,
            n1: 1,
            n2: 1,
            per_block,
        };
        let (_p, _s, work) = workspace(&g, &prob);
        let op = |view: View| Strided {
            view,
            ld: hd,
            s1: 0,
            s2: 0,
        };
        let mask = Mask {
            prefix_len: Some(lb.view()),
            prefix_stride: 0,
            prefix_cap: keys,
            n_state: 0,
            group: 1,
        };
        fused_attention(
            &g.kernels,
            &g.lane,
            &prob,
            op(qb.view()),
            (op(kb.view()), op(vb.view())),
            op(ob.view()),
            attention::scale(hd),
            &mask,
            work,
        )
        .unwrap();
        assert_eq!(
            g.download(ob.view()).unwrap(),
            vec![0.0; rows * hd],
            "{per_block} chunks per block"
        );
    }
}

#[test]
fn fused_attention_matches_cpu_on_the_vision_layout() {
    // SigLIP: every camera and head in one launch, q|k|v side by side in [T, 3 w] per camera,
    // head_dim 72 (padded to 80 inside the kernel); one chunk and several.
    let g = gpu(DType::Bf16);
    let act = DType::Bf16;
    let cases = [(2, 100, 3, 72), (3, 40, 2, 72), (1, 256, 4, 72)];
    for ((n_img, t, nh, hd), per_block) in cases
        .into_iter()
        .flat_map(|c| PER_BLOCK.map(move |pb| (c, pb)))
    {
        let w = nh * hd;
        let (qkvb, qkv) = up(&g, act, &rand_vec(n_img * t * 3 * w, 196, -1.5, 1.5));
        let ob = nan(&g, act, n_img * t * w);
        let prob = Problem {
            rows: t,
            keys: t,
            hd,
            n1: n_img,
            n2: nh,
            per_block,
        };
        let (_p, _s, work) = workspace(&g, &prob);
        let at = |view: View, ld: usize| Strided {
            view,
            ld,
            s1: t * ld,
            s2: hd,
        };
        let fq = at(qkvb.view(), 3 * w);
        let fk = at(qkvb.view().tail(w).unwrap(), 3 * w);
        let fv = at(qkvb.view().tail(2 * w).unwrap(), 3 * w);
        let fo = at(ob.view(), w);
        assert!(fused_fits(&g.kernels, &prob, &fq, (&fk, &fv), &fo));
        fused_attention(
            &g.kernels,
            &g.lane,
            &prob,
            fq,
            (fk, fv),
            fo,
            attention::scale(hd),
            &Mask::full(t),
            work,
        )
        .unwrap();
        let got = g.download(ob.view()).unwrap();
        let mut want = Vec::with_capacity(n_img * t * w);
        for i in 0..n_img {
            let img = &qkv[i * t * 3 * w..(i + 1) * t * 3 * w];
            let split = |off: usize| -> Vec<f32> {
                (0..t)
                    .flat_map(|r| img[r * 3 * w + off..r * 3 * w + off + w].to_vec())
                    .collect()
            };
            want.extend(cpu::attention(
                &split(0),
                &split(w),
                &split(2 * w),
                t,
                t,
                nh,
                nh,
                hd,
                &|_, _| true,
            ));
        }
        check(
            &format!(
                "fused attention, {n_img} images x {nh} heads, {t} tokens, {per_block} chunks per block"
            ),
            &got,
            &want,
            tol(act),
        );
    }
}

#[test]
fn fused_attention_is_only_offered_where_it_applies() {
    let g32 = gpu(DType::F32);
    let g = gpu(DType::Bf16);
    let buf = g.poisoned(DType::Bf16, 4096).unwrap();
    let op = |view: View, ld: usize| Strided {
        view,
        ld,
        s1: 0,
        s2: 0,
    };
    let prob = |hd: usize, keys: usize| Problem {
        rows: 4,
        keys,
        hd,
        n1: 1,
        n2: 1,
        per_block: 1,
    };
    let v = buf.view();
    let fits = |k: &operators::cuda::Kernels, p: Problem, kv: Strided| {
        fused_fits(k, &p, &op(v, 64), (&kv, &kv), &op(v, 64))
    };
    assert!(fits(&g.kernels, prob(64, 10), op(v, 64)));
    // f32 kernels have no fused attention.
    assert!(!fits(&g32.kernels, prob(64, 10), op(v, 64)));
    // head_dim not a multiple of 8, or too large; too many keys.
    assert!(!fits(&g.kernels, prob(60, 10), op(v, 64)));
    assert!(!fits(&g.kernels, prob(264, 10), op(v, 264)));
    assert!(!fits(&g.kernels, prob(64, 64 * 64 + 1), op(v, 64)));
    // More keys than 64 chunks, two chunks per block: 33 blocks along the keys.
    let two = Problem {
        per_block: 2,
        ..prob(64, 64 * 64 + 1)
    };
    assert!(fits(&g.kernels, two, op(v, 64)));
    let all = Problem {
        per_block: Problem::ALL_KEYS,
        ..prob(64, 64 * 64 * 4)
    };
    assert!(fits(&g.kernels, all, op(v, 64)));
    assert!(!fits(&g32.kernels, all, op(v, 64)));
    // K/V rows that are not 16-byte aligned.
    assert!(!fits(&g.kernels, prob(64, 10), op(v, 68)));
    assert!(!fits(&g.kernels, prob(64, 10), op(v.tail(4).unwrap(), 64)));
    // A refused problem is an error, not a launch.
    let (_p, _s, work) = workspace(&g, &prob(64, 10));
    let err = fused_attention(
        &g.kernels,
        &g.lane,
        &prob(60, 10),
        op(v, 64),
        (op(v, 64), op(v, 64)),
        op(v, 64),
        1.0,
        &Mask::full(10),
        work,
    );
    assert!(err.is_err());
}

#[test]
fn patch_embedding_matches_cpu() {
    for act in ACTS {
        let g = gpu(act);
        let (n, size, p, vw) = (2, 32, 8, 24);
        let grid = size / p;
        let t = grid * grid;
        let pk = 3 * p * p;
        let (pxb, px) = up(
            &g,
            DType::F32,
            &rand_vec(n * size * size * 3, 100, -1.0, 1.0),
        );
        let pb = nan(&g, act, n * t * pk);
        im2col(&g.kernels, &g.lane, pxb.view(), pb.view(), n, size, p).unwrap();
        // The CPU's im2col (siglip.rs): row i*t + gy*grid + gx, column (ch*p + ky)*p + kx.
        let mut patches = vec![0.0f32; n * t * pk];
        for i in 0..n {
            for gy in 0..grid {
                for gx in 0..grid {
                    for ch in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                let (y, x) = (gy * p + ky, gx * p + kx);
                                patches[(i * t + gy * grid + gx) * pk + (ch * p + ky) * p + kx] =
                                    px[((i * size + y) * size + x) * 3 + ch];
                            }
                        }
                    }
                }
            }
        }
        check(
            &format!("im2col {act:?}"),
            &g.download(pb.view()).unwrap(),
            &rounded(act, &patches),
            (0.0, 0.0),
        );
        // Patch Linear + bias + position embedding.
        let patches = rounded(act, &patches);
        let s = 1.0 / (pk as f32).sqrt();
        let (wb, w) = up(&g, act, &rand_vec(vw * pk, 101, -s, s));
        let (bb, b) = up(&g, DType::F32, &rand_vec(vw, 102, -0.1, 0.1));
        let (posb, pos) = up(&g, DType::F32, &rand_vec(t * vw, 103, -0.5, 0.5));
        let xb = nan(&g, DType::F32, n * t * vw);
        g.gemm
            .linear(
                &g.lane,
                Mat::new(pb.view(), n * t, pk),
                Mat::new(wb.view(), vw, pk),
                Mat::new(xb.view(), n * t, vw),
                0.0,
            )
            .unwrap();
        patch_embed_finish(
            &g.kernels,
            &g.lane,
            xb.view(),
            bb.view(),
            posb.view(),
            n * t,
            t,
            vw,
        )
        .unwrap();
        let lin = Linear {
            weight: w,
            bias: Some(b),
            n_in: pk,
            n_out: vw,
            fp8: None,
        };
        let mut want = lin.forward(&patches, n * t);
        for tok in want.chunks_exact_mut(t * vw) {
            tok.iter_mut().zip(&pos).for_each(|(a, p)| *a += p);
        }
        check(
            &format!("patch embedding {act:?}"),
            &g.download(xb.view()).unwrap(),
            &want,
            tol(DType::F32),
        );
    }
}

#[test]
fn embed_tokens_matches_cpu() {
    for act in ACTS {
        let g = gpu(act);
        let (vocab, w) = (97, 2048);
        let (tb, table) = up(&g, act, &rand_vec(vocab * w, 110, -0.05, 0.05));
        let ids = [5.0f32, 0.0, 96.0, 5.0, 41.0];
        let (ib, _) = up(&g, DType::I32, &ids);
        let n = ids.len();
        let ob = nan(&g, DType::F32, (n + 2) * w);
        let rows = ob.view().rows(2, n, w).unwrap();
        let scale = (w as f64).sqrt() as f32;
        embed_tokens(
            &g.kernels,
            &g.lane,
            ib.view(),
            tb.view(),
            rows,
            n,
            vocab,
            w,
            scale,
        )
        .unwrap();
        let got = g.download(ob.view()).unwrap();
        assert!(
            got[..2 * w].iter().all(|v| v.is_nan()),
            "embed wrote outside its rows"
        );
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| {
                table[id as usize * w..(id as usize + 1) * w]
                    .iter()
                    .map(|v| v * scale)
                    .collect::<Vec<_>>()
            })
            .collect();
        check(
            &format!("embed_tokens {act:?}"),
            &got[2 * w..],
            &want,
            (0.0, 0.0),
        );
    }
}

/// Camera bytes to [-1, 1] on the GPU: bit for bit the CPU's `image::extend_unit`, for every
/// byte value, at an odd length, nothing written past it (the output poisoned with NaN
/// first); nothing launched for no values; too short a view refused.
#[test]
fn unit_pixels_matches_cpu_bit_for_bit() {
    for act in ACTS {
        let g = gpu(act);
        let n = 3 * 7 * 5 * 3 + 256 + 1;
        // 131 is odd, so any 256 consecutive i give every byte value.
        let bytes: Vec<u8> = (0..n).map(|i| ((i * 131 + 7) % 256) as u8).collect();
        let as_f32: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
        let src = g.upload(DType::U8, &as_f32).unwrap();
        let dst = nan(&g, DType::F32, n + 5);
        unit_pixels(&g.kernels, &g.lane, src.view(), dst.view(), n).unwrap();
        let got = g.download(dst.view()).unwrap();
        let mut want = Vec::new();
        operators::image::extend_unit(&mut want, &bytes);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[..n]), bits(&want), "{act:?}");
        assert!(
            got[n..].iter().all(|v| v.is_nan()),
            "{act:?}: written past n"
        );
        let empty = nan(&g, DType::F32, 4);
        unit_pixels(&g.kernels, &g.lane, src.view(), empty.view(), 0).unwrap();
        assert!(g.download(empty.view()).unwrap().iter().all(|v| v.is_nan()));
        let e = unit_pixels(&g.kernels, &g.lane, src.view(), dst.view(), n + 6).unwrap_err();
        assert!(e.to_string().contains("camera bytes"), "{e}");
        let e = unit_pixels(&g.kernels, &g.lane, dst.view(), dst.view(), 4).unwrap_err();
        assert!(e.to_string().contains("expected U8"), "{e}");
    }
}

#[test]
fn euler_step_matches_cpu() {
    for act in ACTS {
        let g = gpu(act);
        let (h, ad) = (10, 32);
        let x0 = rand_vec(h * ad, 120, -2.0, 2.0);
        let v = rand_vec(h * ad, 121, -3.0, 3.0);
        let b = rand_vec(ad, 122, -0.2, 0.2);
        let (xb, _) = up(&g, DType::F32, &x0);
        let xa = nan(&g, act, h * ad);
        let (vb, _) = up(&g, DType::F32, &v);
        let (bb, _) = up(&g, DType::F32, &b);
        let dt = (-1.0f64 / 10.0) as f32;
        euler_step(
            &g.kernels,
            &g.lane,
            xb.view(),
            xa.view(),
            vb.view(),
            bb.view(),
            dt,
            h,
            ad,
        )
        .unwrap();
        // The CPU: v = linear output + bias; x += dt * v.
        let want: Vec<f32> = (0..h * ad)
            .map(|i| x0[i] + dt * (v[i] + b[i % ad]))
            .collect();
        check(
            "euler x",
            &g.download(xb.view()).unwrap(),
            &want,
            (0.0, 0.0),
        );
        check(
            &format!("euler x {act:?}"),
            &g.download(xa.view()).unwrap(),
            &rounded(act, &want),
            (0.0, 0.0),
        );
    }
}

/// The Euler step guided by real-time chunking (Jacobian dropped) against its CPU twin
/// `rtc::guided_euler_update` at the guidance weight of its step in the device table: bit
/// for bit in f32 (the same separately rounded operations, in the same order), x_act its
/// cast; odd sizes, rows of full, decaying and zero weight (where x moves as unguided), x_act
/// poisoned with NaN.
#[test]
fn euler_step_guided_matches_cpu() {
    for act in ACTS {
        let g = gpu(act);
        let (h, ad) = (7, 13);
        let n = h * ad;
        let x0 = rand_vec(n, 130, -2.0, 2.0);
        let v_raw = rand_vec(n, 131, -3.0, 3.0);
        let b = rand_vec(ad, 132, -0.2, 0.2);
        // Rows 0-2 frozen (1), 3-4 decaying, 5-6 past the overlap (0, target 0).
        let weight: Vec<f32> = (0..n)
            .map(|i| match i / ad {
                r if r < 3 => 1.0,
                r if r < 5 => 0.9 / (r as f32 - 1.5),
                _ => 0.0,
            })
            .collect();
        let target: Vec<f32> = (0..n)
            .map(|i| {
                if i / ad < 5 {
                    (i as f32 * 0.37).sin()
                } else {
                    0.0
                }
            })
            .collect();
        let coef = [5.0f32, 2.5, 1.75];
        let (step, t, dt) = (1usize, 0.7f32, (-1.0f64 / 7.0) as f32);
        let (xb, _) = up(&g, DType::F32, &x0);
        let xa = nan(&g, act, n);
        let (vb, _) = up(&g, DType::F32, &v_raw);
        let (bb, _) = up(&g, DType::F32, &b);
        let (wb, _) = up(&g, DType::F32, &weight);
        let (yb, _) = up(&g, DType::F32, &target);
        let (cb, _) = up(&g, DType::F32, &coef);
        let guide = Guidance {
            weight: wb.view(),
            target: yb.view(),
            coef: cb.view(),
        };
        let io = (xb.view(), xa.view(), vb.view(), bb.view());
        euler_step_guided(&g.kernels, &g.lane, io, guide, (step, t, dt), h, ad).unwrap();
        // The CPU: v = linear output + bias, then the twin.
        let v: Vec<f32> = (0..n).map(|i| v_raw[i] + b[i % ad]).collect();
        let mut want = x0.clone();
        operators::rtc::guided_euler_update(&mut want, &v, &weight, &target, (t, coef[step], dt));
        let unguided: Vec<f32> = (0..n).map(|i| x0[i] + dt * v[i]).collect();
        assert_eq!(
            &want[5 * ad..],
            &unguided[5 * ad..],
            "zero weight: unguided"
        );
        assert!(
            (0..5 * ad).any(|i| (want[i] - unguided[i]).abs() > 1e-2),
            "the guidance moves the weighted values"
        );
        check(
            &format!("guided euler x ({act:?} program)"),
            &g.download(xb.view()).unwrap(),
            &want,
            (0.0, 0.0),
        );
        check(
            &format!("guided euler x {act:?}"),
            &g.download(xa.view()).unwrap(),
            &rounded(act, &want),
            (0.0, 0.0),
        );
    }
}

#[test]
fn random_fill_is_uniform_in_range() {
    for act in ACTS {
        let g = gpu(act);
        for dtype in [act, DType::F32] {
            let buf = nan(&g, dtype, 100_000);
            fill_uniform(&g.kernels, &g.lane, buf.view(), 7, 0.5, 1.5).unwrap();
            let v = g.download(buf.view()).unwrap();
            assert!(
                v.iter().all(|x| (0.5..=1.5).contains(x)),
                "{dtype:?}: value out of range"
            );
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            assert!((mean - 1.0).abs() < 0.01, "{dtype:?}: mean {mean}");
            let distinct = v
                .iter()
                .map(|x| x.to_bits())
                .collect::<std::collections::HashSet<_>>()
                .len();
            assert!(distinct > 100, "{dtype:?}: only {distinct} distinct values");
        }
    }
}

#[test]
fn views_reject_out_of_range_launches() {
    let g = gpu(DType::F32);
    let small = g.dev.alloc(DType::F32, 10).unwrap();
    let v: View = small.view();
    assert!(v.at(5, 6).is_err());
    let err = layer_norm(&g.kernels, &g.lane, v, None, v, v, v, 2, 8, 1e-6).unwrap_err();
    assert!(err.to_string().contains("layer_norm"), "{err}");
}

/// y0 + x·wᵀ on the CPU (x [m, k] with row stride ldx, y [m, n] with row stride ldy), each
/// product scaled per column by `gate` when given.
#[allow(clippy::too_many_arguments)]
fn cpu_linear_acc(
    y0: &[f32],
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    ldx: usize,
    ldy: usize,
    gate: Option<&[f32]>,
    times: usize,
) -> Vec<f32> {
    let xd: Vec<f32> = (0..m)
        .flat_map(|r| x[r * ldx..r * ldx + k].to_vec())
        .collect();
    let lin = Linear {
        weight: w.to_vec(),
        bias: None,
        n_in: k,
        n_out: n,
        fp8: None,
    };
    let prod = lin.forward(&xd, m);
    let mut dense: Vec<f32> = (0..m)
        .flat_map(|r| y0[r * ldy..r * ldy + n].to_vec())
        .collect();
    for _ in 0..times {
        cpu::add_residual(&mut dense, &prod, gate);
    }
    let mut out = y0.to_vec();
    for r in 0..m {
        out[r * ldy..r * ldy + n].copy_from_slice(&dense[r * n..(r + 1) * n]);
    }
    out
}

#[test]
fn gated_gemm_matches_linear_then_gated_residual() {
    // xe += gate ⊙ (x·Wᵀ) in one call (alpha as a per-row device vector of the transposed
    // product), against cpu::add_residual with the gate after a Linear. Shapes: the denoise
    // residuals (skinny M) and an odd one with padded row strides.
    for act in ACTS {
        let g = gpu(act);
        for (i, &(m, n, k, padx, pady)) in [(10, 256, 512, 0, 0), (51, 70, 129, 5, 3)]
            .iter()
            .enumerate()
        {
            let seed = 700 + 10 * i as u64;
            let (ldx, ldy) = (k + padx, n + pady);
            let s = 1.0 / (k as f32).sqrt();
            let (xb, x) = up(&g, act, &rand_vec(m * ldx, seed, -1.0, 1.0));
            let (wb, w) = up(&g, act, &rand_vec(n * k, seed + 1, -s, s));
            let (gb, gate) = up(&g, DType::F32, &rand_vec(n, seed + 2, -2.0, 2.0));
            let y0 = rand_vec(m * ldy, seed + 3, -1.0, 1.0);
            let (yb, _) = up(&g, DType::F32, &y0);
            let xm = Mat::new(xb.view(), m, k).ld(ldx);
            let wm = Mat::new(wb.view(), n, k);
            let ym = Mat::new(yb.view(), m, n).ld(ldy);
            // Twice: the first call plans (and autotunes), the second reuses the plan; each
            // must accumulate exactly once.
            let mut fused = true;
            for _ in 0..2 {
                fused &= g.gemm.linear_gated(&g.lane, xm, wm, ym, gb.view()).unwrap();
            }
            if !fused {
                // Not an error: the policy then takes its two-launch path (covered by
                // add_residual_matches_cpu and the policy tests).
                println!(
                    "NOTE gated gemm [{m}, {n}, {k}] {act:?}: cuBLASLt has no per-row alpha algorithm; fused path unavailable"
                );
                assert!(g.gemm.gated_fallbacks() >= 1);
                continue;
            }
            let want = cpu_linear_acc(&y0, &x, &w, (m, n, k), ldx, ldy, Some(&gate), 2);
            check(
                &format!("gated gemm [{m}, {n}, {k}] {act:?} fused"),
                &g.download(yb.view()).unwrap(),
                &want,
                tol(act),
            );
        }
    }
}

#[test]
fn autotuned_gemms_match_cpu_and_plans_made_while_capturing_work() {
    // Skinny products as the denoiser runs them, accumulated onto y (beta = 1): the first
    // call of each shape times several candidates (into a scratch buffer, never y), so y
    // must hold y0 + x·wᵀ exactly once, then twice after the second (cached) call.
    for act in ACTS {
        let g = gpu(act);
        for (i, &(m, n, k)) in [(10, 1024, 1024), (51, 2048, 1024), (11, 1024, 4096)]
            .iter()
            .enumerate()
        {
            let seed = 800 + 10 * i as u64;
            let s = 1.0 / (k as f32).sqrt();
            let (xb, x) = up(&g, act, &rand_vec(m * k, seed, -1.0, 1.0));
            let (wb, w) = up(&g, act, &rand_vec(n * k, seed + 1, -s, s));
            let y0 = rand_vec(m * n, seed + 2, -1.0, 1.0);
            let (yb, _) = up(&g, DType::F32, &y0);
            let (xm, wm, ym) = (
                Mat::new(xb.view(), m, k),
                Mat::new(wb.view(), n, k),
                Mat::new(yb.view(), m, n),
            );
            g.gemm.linear(&g.lane, xm, wm, ym, 1.0).unwrap();
            let once = cpu_linear_acc(&y0, &x, &w, (m, n, k), k, n, None, 1);
            check(
                &format!("autotuned gemm [{m}, {n}, {k}] {act:?} first call"),
                &g.download(yb.view()).unwrap(),
                &once,
                tol(act),
            );
            g.gemm.linear(&g.lane, xm, wm, ym, 1.0).unwrap();
            let twice = cpu_linear_acc(&y0, &x, &w, (m, n, k), k, n, None, 2);
            check(
                &format!("autotuned gemm [{m}, {n}, {k}] {act:?} second call"),
                &g.download(yb.view()).unwrap(),
                &twice,
                tol(act),
            );
        }
        println!(
            "{act:?}: {} plans, {} autotuned",
            g.gemm.plan_count(),
            g.gemm.tuned_count()
        );

        // A shape first planned while the stream captures a graph: the plan must neither
        // synchronise nor time (either would break the capture) and the replay must be right.
        let (m, n, k) = (10, 1024, 1024);
        let ldx = k + 8;
        let s = 1.0 / (k as f32).sqrt();
        let (xb, x) = up(&g, act, &rand_vec(m * ldx, 900, -1.0, 1.0));
        let (wb, w) = up(&g, act, &rand_vec(n * k, 901, -s, s));
        let yb = nan(&g, DType::F32, m * n);
        g.synchronize().unwrap();
        let plans = g.gemm.plan_count();
        let tuned = g.gemm.tuned_count();
        g.lane
            .stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
        let queued = g.gemm.linear(
            &g.lane,
            Mat::new(xb.view(), m, k).ld(ldx),
            Mat::new(wb.view(), n, k),
            Mat::new(yb.view(), m, n),
            0.0,
        );
        let graph = g
            .lane
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        queued.unwrap();
        let graph = graph.unwrap().expect("the capture recorded the GEMM");
        assert_eq!(g.gemm.plan_count(), plans + 1, "a new plan during capture");
        assert_eq!(g.gemm.tuned_count(), tuned, "no timing during capture");
        graph.launch().unwrap();
        let want = cpu_linear_acc(&vec![0.0; m * n], &x, &w, (m, n, k), ldx, n, None, 1);
        check(
            &format!("gemm planned during capture {act:?}"),
            &g.download(yb.view()).unwrap(),
            &want,
            tol(act),
        );
    }
}

#[test]
fn skinny_gemm_matches_cpu_linear() {
    // The few-row kernel as the denoiser runs it (store, add onto the residual stream, gated
    // add) and at odd sizes: 1, 9 and 16 rows, K with a remainder past the unrolled loop
    // (2080: nine warps, the last with one chunk) and K shorter than one unrolled slice (160,
    // 96), padded row strides. x's buffer has NaN rows past its last row (never read), y's padding
    // columns are NaN and must stay so, and a stored y starts all NaN (every value written).
    let g = gpu(DType::Bf16);
    let cases: [(usize, usize, usize, usize, usize, &str, DType); 7] = [
        (10, 2560, 1024, 0, 0, "store", DType::Bf16),
        (10, 1024, 2048, 0, 0, "add", DType::F32),
        (10, 1024, 4096, 0, 0, "gated", DType::F32),
        (16, 72, 2080, 8, 3, "gated", DType::F32),
        (1, 8, 32, 0, 1, "store", DType::F32),
        (9, 24, 160, 16, 5, "add", DType::Bf16),
        (16, 16, 96, 0, 0, "store", DType::F32),
    ];
    for (i, &(m, n, k, padx, pady, mode, ydt)) in cases.iter().enumerate() {
        let seed = 1100 + 10 * i as u64;
        let (ldx, ldy) = (k + padx, n + pady);
        let s = 1.0 / (k as f32).sqrt();
        let mut xv = rand_vec(m * ldx, seed, -1.0, 1.0);
        xv.extend(std::iter::repeat_n(f32::NAN, 16 * ldx));
        let (xb, x) = up(&g, DType::Bf16, &xv);
        let (wb, w) = up(&g, DType::Bf16, &rand_vec(n * k, seed + 1, -s, s));
        let (gb, gate) = up(&g, DType::F32, &rand_vec(n, seed + 2, -2.0, 2.0));
        let mut y0 = rounded(ydt, &rand_vec(m * ldy, seed + 3, -1.0, 1.0));
        for r in 0..m {
            for c in n..ldy {
                y0[r * ldy + c] = f32::NAN;
            }
        }
        let (yb, _) = up(&g, ydt, &y0);
        let (epi, base, gate_ref) = match mode {
            "store" => {
                g.lane.poison(yb.view()).unwrap();
                (Epilogue::Store, vec![0.0; m * ldy], None)
            }
            "add" => (Epilogue::Add, y0.clone(), None),
            _ => (Epilogue::Gated(gb.view()), y0.clone(), Some(&gate[..])),
        };
        let (xm, wm, ym) = (
            Mat::new(xb.view(), m, k).ld(ldx),
            Mat::new(wb.view(), n, k),
            Mat::new(yb.view(), m, n).ld(ldy),
        );
        let name = format!("skinny gemm [{m}, {n}, {k}] {mode} -> {ydt:?}");
        assert!(skinny::fits(&g.kernels, &xm, &wm, &ym), "{name}: fits");
        assert!(
            skinny::linear(&g.kernels, &g.lane, xm, wm, ym, epi).unwrap(),
            "{name}: queued"
        );
        let got = g.download(yb.view()).unwrap();
        let mut want = rounded(
            ydt,
            &cpu_linear_acc(&base, &x, &w, (m, n, k), ldx, ldy, gate_ref, 1),
        );
        for r in 0..m {
            for c in n..ldy {
                assert!(
                    got[r * ldy + c].is_nan(),
                    "{name}: padding [{r}, {c}] written"
                );
                want[r * ldy + c] = 0.0;
            }
        }
        let got: Vec<f32> = got
            .iter()
            .map(|v| if v.is_nan() { 0.0 } else { *v })
            .collect();
        let dense = |v: &[f32]| -> Vec<f32> {
            (0..m)
                .flat_map(|r| v[r * ldy..r * ldy + n].to_vec())
                .collect()
        };
        // NaN in the written part fails below (it was zeroed only for the padding check).
        let written = g.download(yb.view()).unwrap();
        assert!(
            dense(&written).iter().all(|v| !v.is_nan()),
            "{name}: NaN written"
        );
        check(&name, &dense(&got), &dense(&want), tol(DType::Bf16));
        // A second run of a store is bit-identical (a fixed order of additions).
        if mode == "store" {
            skinny::linear(&g.kernels, &g.lane, xm, wm, ym, epi).unwrap();
            let again = g.download(yb.view()).unwrap();
            assert!(
                again
                    .iter()
                    .zip(&written)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: a second run differs"
            );
        }
    }
    // Shapes it does not take are left to cuBLASLt: nothing queued, Ok(false).
    let (xb, _) = up(&g, DType::Bf16, &rand_vec(80 * 64, 1, -1.0, 1.0));
    let (wb, _) = up(&g, DType::Bf16, &rand_vec(64 * 64, 2, -1.0, 1.0));
    let yb = nan(&g, DType::F32, 80 * 64);
    for (m, n, k) in [(17, 8, 32), (10, 12, 32), (10, 8, 33)] {
        let (xm, wm, ym) = (
            Mat::new(xb.view(), m, k),
            Mat::new(wb.view(), n, k),
            Mat::new(yb.view(), m, n),
        );
        assert!(
            !skinny::linear(&g.kernels, &g.lane, xm, wm, ym, Epilogue::Store).unwrap(),
            "[{m}, {n}, {k}] is not the kernel's"
        );
    }
    assert!(g.download(yb.view()).unwrap().iter().all(|v| v.is_nan()));
    // The f32 program has no such kernel.
    let f = gpu(DType::F32);
    let (xb, _) = up(&f, DType::F32, &rand_vec(10 * 32, 1, -1.0, 1.0));
    let (wb, _) = up(&f, DType::F32, &rand_vec(8 * 32, 2, -1.0, 1.0));
    let yb = nan(&f, DType::F32, 80);
    let (xm, wm, ym) = (
        Mat::new(xb.view(), 10, 32),
        Mat::new(wb.view(), 8, 32),
        Mat::new(yb.view(), 10, 8),
    );
    assert!(!skinny::linear(&f.kernels, &f.lane, xm, wm, ym, Epilogue::Store).unwrap());
}

/// Bits of a downloaded buffer, for exact comparisons (NaN poison included).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// x [m, K] (row stride ldx, NaN rows past the last) and w [n, K] as bf16, seeded.
fn skinny_operands(
    g: &Gpu,
    (m, n, k, ldx): (usize, usize, usize, usize),
    seed: u64,
) -> (DeviceBuffer, Vec<f32>, DeviceBuffer, Vec<f32>) {
    let s = 1.0 / (k as f32).sqrt();
    let mut xv = rand_vec(m * ldx, seed, -1.0, 1.0);
    xv.extend(std::iter::repeat_n(f32::NAN, 16 * ldx));
    let (xb, x) = up(g, DType::Bf16, &xv);
    let (wb, w) = up(
        g,
        DType::Bf16,
        &rand_vec(n * k, seed + 1, -2.0 * s, 2.0 * s),
    );
    (xb, x, wb, w)
}

/// x·wᵀ on the CPU for x [m, K] with row stride ldx, each value rounded to bf16 as a bf16
/// product output holds it.
fn cpu_product_bf16(
    x: &[f32],
    w: &[f32],
    (m, n, k, ldx): (usize, usize, usize, usize),
) -> Vec<f32> {
    let y0 = vec![0.0; m * n];
    rounded(
        DType::Bf16,
        &cpu_linear_acc(&y0, x, w, (m, n, k), ldx, n, None, 1),
    )
}

/// A GeGLU epilogue against the two launches it replaces and the CPU twin: `product` stores
/// the gate|up product of x [m, K] (row stride ldx) into a bf16 [m, 2·mlp] and `fused` the
/// epilogue's output into a bf16 [m, mlp] with padded rows (row stride mlp + pado); each
/// answers whether it queued. The fused output equals `product` then gelu_gate bit for bit,
/// writes every value and leaves the padding NaN, and is within bf16's tolerance of the CPU
/// twin (`x` against the weights `w` the GPU multiplies by, [2·mlp, K], the product rounded
/// to bf16, then GeGLU).
fn check_geglu_epilogue(
    g: &Gpu,
    name: &str,
    (m, mlp, k, ldx, pado): (usize, usize, usize, usize, usize),
    (x, w): (&[f32], &[f32]),
    product: impl FnOnce(Mat) -> bool,
    fused: impl FnOnce(Mat) -> bool,
) {
    let n = 2 * mlp;
    // Two launches: the product into gu, then gelu_gate.
    let gub = nan(g, DType::Bf16, m * n);
    assert!(
        product(Mat::new(gub.view(), m, n)),
        "{name}: product queued"
    );
    let two = nan(g, DType::Bf16, m * mlp);
    gelu_gate(&g.kernels, &g.lane, (gub.view(), two.view()), m, mlp, None).unwrap();
    // One launch, into an output with padded rows.
    let ldo = mlp + pado;
    let one = nan(g, DType::Bf16, m * ldo);
    assert!(
        fused(Mat::new(one.view(), m, mlp).ld(ldo)),
        "{name}: queued"
    );
    let (two, one) = (
        g.download(two.view()).unwrap(),
        g.download(one.view()).unwrap(),
    );
    let dense: Vec<f32> = (0..m)
        .flat_map(|r| one[r * ldo..r * ldo + mlp].to_vec())
        .collect();
    for r in 0..m {
        for c in mlp..ldo {
            assert!(
                one[r * ldo + c].is_nan(),
                "{name}: padding [{r}, {c}] written"
            );
        }
    }
    assert!(dense.iter().all(|v| !v.is_nan()), "{name}: NaN written");
    assert_eq!(
        bits(&dense),
        bits(&two),
        "{name}: differs from the two launches"
    );
    let gu = cpu_product_bf16(x, w, (m, n, k, ldx));
    let want: Vec<f32> = (0..m * mlp)
        .map(|i| {
            let (r, c) = (i / mlp, i % mlp);
            cpu::gelu_tanh(gu[r * n + c]) * gu[r * n + mlp + c]
        })
        .collect();
    check(name, &dense, &rounded(DType::Bf16, &want), tol(DType::Bf16));
}

/// Shapes no GeGLU epilogue takes (mlp not a multiple of 4, 17 rows, an f32 output), on x
/// [17+, 64] and weights [64+, 64]: `fused` answers Ok(false) and writes nothing.
fn check_geglu_refusals(
    g: &Gpu,
    (xb, wb): (&DeviceBuffer, &DeviceBuffer),
    fused: impl Fn(Mat, Mat, Mat) -> operators::Result<bool>,
) {
    let ob = nan(g, DType::Bf16, 17 * 64);
    for (m, mlp, ydt) in [
        (10, 6, DType::Bf16),
        (17, 32, DType::Bf16),
        (10, 32, DType::F32),
    ] {
        let xm = Mat::new(xb.view(), m, 64);
        let wm = Mat::new(wb.view(), 2 * mlp, 64);
        let out = View {
            dtype: ydt,
            ..ob.view()
        };
        assert!(
            !fused(xm, wm, Mat::new(out, m, mlp)).unwrap(),
            "geglu [{m}, {mlp}] -> {ydt:?} is not the kernel's"
        );
    }
    assert!(g.download(ob.view()).unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn skinny_geglu_equals_product_then_gelu_gate() {
    // GeGLU in the few-row product's epilogue: the same bits as the product (bf16 out) and
    // gelu_gate launched one after the other, and the CPU twin within bf16's tolerance. The
    // expert's shape, odd sizes (1 and 16 rows, mlp 12 and 20, K with a remainder past the
    // unrolled loop), a padded x; the output starts NaN (every value written) and padding
    // columns stay NaN.
    let g = gpu(DType::Bf16);
    let cases = [
        (10, 4096, 1024, 0, 0),
        (16, 12, 96, 8, 3),
        (1, 4, 32, 0, 0),
        (9, 20, 2080, 16, 1),
    ];
    for (i, &(m, mlp, k, padx, pado)) in cases.iter().enumerate() {
        let name = format!("skinny geglu [{m}, {mlp}, {k}]");
        let ldx = k + padx;
        let (xb, x, wb, w) = skinny_operands(&g, (m, 2 * mlp, k, ldx), 1300 + 10 * i as u64);
        let xm = Mat::new(xb.view(), m, k).ld(ldx);
        let wm = Mat::new(wb.view(), 2 * mlp, k);
        check_geglu_epilogue(
            &g,
            &name,
            (m, mlp, k, ldx, pado),
            (&x, &w),
            |gu| skinny::linear(&g.kernels, &g.lane, xm, wm, gu, Epilogue::Store).unwrap(),
            |out| skinny::geglu(&g.kernels, &g.lane, xm, wm, out).unwrap(),
        );
    }
    // Shapes it does not take: nothing queued, Ok(false).
    let (xb, _, wb, _) = skinny_operands(&g, (10, 64, 64, 64), 1390);
    check_geglu_refusals(&g, (&xb, &wb), |x, w, out| {
        skinny::geglu(&g.kernels, &g.lane, x, w, out)
    });
}

#[test]
fn skinny_rope_equals_product_then_rope_qkv() {
    // RoPE and the K/V cache write in the q|k|v product's epilogue: the same bits as the
    // product (bf16 out) and rope_qkv one after the other, over the whole q buffer and both
    // caches (rows before out_row0 and past the last row stay NaN), and the CPU twin
    // (cpu::rope of the bf16 product) within bf16's tolerance. pi0.5's expert heads (8 query
    // heads, 1 KV head of 256) and a small grouped layout (4/2 heads of 16).
    let g = gpu(DType::Bf16);
    for (i, &(nh, kv, hd, m, k)) in [(8, 1, 256, 10, 1024), (4, 2, 16, 7, 96), (2, 2, 8, 16, 32)]
        .iter()
        .enumerate()
    {
        let heads = Heads { nh, kv, hd };
        let name = format!("skinny rope {nh}/{kv}x{hd}, {m} rows, K {k}");
        let (pos0, row0, cap) = (37usize, 5usize, 5 + m + 3);
        let (qkvw, kvw) = (heads.qkv_width(), heads.kv_width());
        let (xb, x, wb, w) = skinny_operands(&g, (m, qkvw, k, k), 1400 + 10 * i as u64);
        let xm = Mat::new(xb.view(), m, k);
        let wm = Mat::new(wb.view(), qkvw, k);
        let inv = cpu::rope_inv_freq(hd, 10000.0);
        let (ib, _) = up(&g, DType::F32, &inv);
        let (pb, _) = up(&g, DType::I32, &[pos0 as f32]);
        let outs = || {
            (
                nan(&g, DType::Bf16, m * nh * hd),
                nan(&g, DType::Bf16, cap * kvw),
                nan(&g, DType::Bf16, cap * kvw),
            )
        };
        // Two launches.
        let qkvb = nan(&g, DType::Bf16, m * qkvw);
        let qkvm = Mat::new(qkvb.view(), m, qkvw);
        assert!(skinny::linear(&g.kernels, &g.lane, xm, wm, qkvm, Epilogue::Store).unwrap());
        let (q2, k2, v2) = outs();
        let (qv, kv2, vv) = (q2.view(), k2.view(), v2.view());
        rope_qkv(
            &g.kernels,
            &g.lane,
            qkvb.view(),
            qv,
            kv2,
            vv,
            ib.view(),
            pb.view(),
            m,
            heads,
            row0,
        )
        .unwrap();
        // One launch.
        let (q1, k1, v1) = outs();
        let out = skinny::RopeOut {
            q: q1.view(),
            k: k1.view(),
            v: v1.view(),
            inv_freq: ib.view(),
            pos0: pb.view(),
            heads,
            out_row0: row0,
        };
        assert!(
            skinny::rope(&g.kernels, &g.lane, xm, wm, out).unwrap(),
            "{name}: queued"
        );
        for (what, one, two) in [("q", &q1, &q2), ("k", &k1, &k2), ("v", &v1, &v2)] {
            let (one, two) = (
                g.download(one.view()).unwrap(),
                g.download(two.view()).unwrap(),
            );
            assert_eq!(
                bits(&one),
                bits(&two),
                "{name}: {what} differs from the two launches"
            );
        }
        // The CPU twin, and nothing written outside the rows.
        let qkv = cpu_product_bf16(&x, &w, (m, qkvw, k, k));
        let (outs, at) = ((&q1, &k1, &v1), (m, heads, pos0, row0));
        let bf = DType::Bf16;
        check_rope_outputs(&g, (&name, bf), &qkv, outs, at, &inv, tol(bf));
    }
    // A head_dim that is not a multiple of 8 is not the kernel's (the caller runs rope_qkv).
    let heads = Heads {
        nh: 2,
        kv: 1,
        hd: 12,
    };
    let (xb, _, wb, _) = skinny_operands(&g, (4, heads.qkv_width(), 32, 32), 1490);
    let (ib, _) = up(&g, DType::F32, &cpu::rope_inv_freq(12, 10000.0));
    let (pb, _) = up(&g, DType::I32, &[0.0]);
    let qb = nan(&g, DType::Bf16, 4 * 24);
    let cb = nan(&g, DType::Bf16, 4 * 12);
    let out = skinny::RopeOut {
        q: qb.view(),
        k: cb.view(),
        v: cb.view(),
        inv_freq: ib.view(),
        pos0: pb.view(),
        heads,
        out_row0: 0,
    };
    let (xm, wm) = (
        Mat::new(xb.view(), 4, 32),
        Mat::new(wb.view(), heads.qkv_width(), 32),
    );
    assert!(!skinny::rope(&g.kernels, &g.lane, xm, wm, out).unwrap());
    assert!(g.download(qb.view()).unwrap().iter().all(|v| v.is_nan()));
}

/// A recorded chain of dependent kernels (each reads what the previous one wrote, over many
/// blocks) replays to the values of the same launches run one after another: on sm_90 and
/// newer the graph's launches are programmatic (they start while their predecessor drains and
/// wait for it on the device), and none may read early.
#[test]
fn programmatic_launches_in_a_graph_keep_the_order() {
    use operators::cuda::runtime::graph::capture;
    let g = gpu(DType::F32);
    let (rows, width) = (64, 4099);
    let n = rows * width;
    let a0 = rand_vec(n, 70, -1e-3, 1e-3);
    let b0 = rand_vec(n, 71, -1e-3, 1e-3);
    let gate = rand_vec(width, 72, 0.5, 1.5);
    let links = 48;
    // a += gate * b; b += a; ... each link reads the other buffer's last write.
    let chain = |a: View, b: View, gv: View| -> operators::Result<()> {
        for i in 0..links {
            let (x, y) = if i % 2 == 0 { (a, b) } else { (b, a) };
            add_residual(
                &g.kernels,
                &g.lane,
                x,
                y,
                (i % 3 == 0).then_some(gv),
                rows,
                width,
            )?;
        }
        Ok(())
    };
    let (ae, _) = up(&g, DType::F32, &a0);
    let (be, _) = up(&g, DType::F32, &b0);
    let (gb, _) = up(&g, DType::F32, &gate);
    chain(ae.view(), be.view(), gb.view()).unwrap();
    let want = [
        g.download(ae.view()).unwrap(),
        g.download(be.view()).unwrap(),
    ];

    let (ag, _) = up(&g, DType::F32, &a0);
    let (bg, _) = up(&g, DType::F32, &b0);
    g.synchronize().unwrap();
    let graph = capture(
        &g.lane,
        || chain(ag.view(), bg.view(), gb.view()),
        "the PDL chain",
    )
    .unwrap();
    let census = graph.census().unwrap();
    assert_eq!(census.kernels, links, "every link is a kernel node");
    if g.dev.cc.0 >= 9 && operators::settings::flag("TURBOPI_PDL", true).unwrap() {
        assert_eq!(
            census.programmatic,
            links - 1,
            "every link after the first depends programmatically on the one before"
        );
    } else {
        assert_eq!(census.programmatic, 0, "no programmatic edges before sm_90");
    }
    graph.launch("the PDL chain").unwrap();
    g.synchronize().unwrap();
    check(
        "PDL chain a",
        &g.download(ag.view()).unwrap(),
        &want[0],
        (0.0, 0.0),
    );
    check(
        "PDL chain b",
        &g.download(bg.view()).unwrap(),
        &want[1],
        (0.0, 0.0),
    );
    println!(
        "chain of {links} launches: {} programmatic edges",
        census.programmatic
    );
}

/// FP8 quantisation per row against fp8::quantise_rows, codes and scales bit for bit, in both
/// programs (bf16 inputs rounded as the device holds them): odd widths, a row of zeros, a row
/// of tiny values (scale 1), a loud row, a NaN; the output row stride wider than the row,
/// its gaps left as poisoned.
#[test]
fn quantise_e4m3_matches_cpu_bit_for_bit() {
    for act in ACTS {
        let g = gpu(act);
        for (rows, width) in [(1, 1), (3, 7), (6, 1000), (9, 2051)] {
            let mut x = rand_vec(rows * width, 60 + width as u64, -3.0, 3.0);
            if rows >= 6 {
                x[width..2 * width].fill(0.0);
                x[2 * width..3 * width].iter_mut().for_each(|v| *v *= 1e-38);
                x[3 * width..4 * width].iter_mut().for_each(|v| *v *= 1e4);
                x[4 * width + width / 2] = f32::NAN;
            }
            let (xb, held) = up(&g, act, &x);
            let ldq = width + 5;
            let q = g.dev.alloc(DType::U8, (rows - 1) * ldq + width).unwrap();
            g.lane.poison(q.view()).unwrap();
            let scale = nan(&g, DType::F32, rows);
            quantise_e4m3(
                &g.kernels,
                &g.lane,
                xb.view(),
                width,
                q.view(),
                ldq,
                scale.view(),
                rows,
                width,
            )
            .unwrap();
            let codes = g.download_bytes(q.view()).unwrap();
            let scales = g.download(scale.view()).unwrap();
            let (want_codes, want_scales) = operators::fp8::quantise_rows(&held, width);
            let what = format!("{act:?} {rows}x{width}");
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scales), bits(&want_scales), "{what}: scales");
            for r in 0..rows {
                let got = &codes[r * ldq..r * ldq + width];
                let want = &want_codes[r * width..(r + 1) * width];
                if let Some(c) = (0..width).find(|&c| got[c] != want[c]) {
                    panic!(
                        "{what}: row {r} col {c}: code {:#04x}, want {:#04x} (x = {:e})",
                        got[c],
                        want[c],
                        held[r * width + c]
                    );
                }
                if r + 1 < rows {
                    assert!(
                        codes[r * ldq + width..(r + 1) * ldq]
                            .iter()
                            .all(|&b| b == 0xFF),
                        "{what}: row {r}: the gap after the row was written"
                    );
                }
            }
        }
    }
}

/// E4M3 codes [rows, width] uploaded with row stride `ld` bytes, the gaps filled with the
/// NaN code 0x7F (read, it would show as ±480 in a product).
fn up_codes(g: &Gpu, codes: &[u8], width: usize, ld: usize) -> DeviceBuffer {
    let rows = codes.len() / width;
    let mut padded = vec![0x7Fu8; rows * ld];
    for (r, row) in codes.chunks_exact(width).enumerate() {
        padded[r * ld..r * ld + width].copy_from_slice(row);
    }
    let as_f32: Vec<f32> = padded.iter().map(|&b| f32::from(b)).collect();
    g.upload(DType::U8, &as_f32).unwrap()
}

/// The value the FP8 kernel gives code `c` before its scale: fp8::decode's, except that the
/// NaN codes (which no quantiser writes) come out as ±480 (skinny.cu says why).
fn fp8_kernel_value(c: u8) -> f32 {
    if c & 0x7F == 0x7F {
        if c & 0x80 != 0 {
            -480.0
        } else {
            480.0
        }
    } else {
        operators::fp8::decode(c)
    }
}

#[test]
fn skinny_fp8_converts_every_code_exactly() {
    // Bit for bit: x rows that pick one k each (x[m, k0 + m] = ±2^(m-8), a power of two, so
    // every product is exact on both sides) give y[m, n] = x · E4M3(code[n, k0 + m]) ·
    // scale[n], the same single f32 rounding on the CPU. Code[n, k] = (7n + k) mod 256: each
    // k sees all 256 codes (subnormals, both zeros, ±448, the NaN codes), and 16 launches
    // with k0 = 0, 16, .., 240 see every k: the K permutation and the conversion together.
    let g = gpu(DType::Bf16);
    let (m, n, k) = (16, 256, 256);
    let codes: Vec<u8> = (0..n * k)
        .map(|i| ((7 * (i / k) + i % k) % 256) as u8)
        .collect();
    let mut scales = rand_vec(n, 1700, 1e-3, 4.0);
    scales[0] = 1.0;
    let wb = up_codes(&g, &codes, k, k);
    let (sb, scales) = up(&g, DType::F32, &scales);
    let yb = nan(&g, DType::F32, m * n);
    let pick = |r: usize| {
        let v = 2f32.powi(r as i32 - 8);
        if r % 2 == 1 {
            -v
        } else {
            v
        }
    };
    for k0 in (0..k).step_by(m) {
        let mut xv = vec![0.0f32; m * k];
        for r in 0..m {
            xv[r * k + k0 + r] = pick(r);
        }
        let (xb, _) = up(&g, DType::Bf16, &xv);
        g.lane.poison(yb.view()).unwrap();
        let (xm, wm, ym) = (
            Mat::new(xb.view(), m, k),
            Mat::new(wb.view(), n, k),
            Mat::new(yb.view(), m, n),
        );
        assert!(
            skinny::linear_fp8(&g.kernels, &g.lane, xm, wm, sb.view(), ym, Epilogue::Store)
                .unwrap(),
            "queued"
        );
        let got = g.download(yb.view()).unwrap();
        for r in 0..m {
            for c in 0..n {
                let code = codes[c * k + k0 + r];
                let want = (pick(r) * fp8_kernel_value(code)) * scales[c];
                // == is bit equality here, but for the sign of zero (an exact zero sum is +0).
                assert!(
                    got[r * n + c] == want,
                    "k {} code {code:#04x} scale {}: got {:e}, want {want:e}",
                    k0 + r,
                    scales[c],
                    got[r * n + c]
                );
            }
        }
    }
}

/// Paddings of row strides (x's, the codes', y's), in elements.
type Pads = (usize, usize, usize);

#[test]
fn skinny_fp8_matches_the_cpu_fp8_linear() {
    // W8A16 against the CPU backend's `--dtype fp8` emulation of the same layer: W quantised
    // per output channel by fp8::quantise_rows (the codes and scales the kernel reads), and
    // cpu::Linear::quantise_fp8(false) (the weights the CPU then multiplies by: scale ·
    // E4M3, to the bit). The expected value is that twin's product (then its residual or gated
    // residual), evaluated in f64 so that the tolerance only has to cover the kernel's
    // roundings; it is a bound per value, derived in `fp8_bound`.
    //
    // Shapes: the expert's (q|k|v, down with its gate, gate|up) at 10 rows; 1, 3 and 16 rows;
    // pi0's 51 rows and 17, 33 and 64 on the wide form (one, three and four row tiles);
    // K from 16 to 16384, K = 32, 96, 160 and 2080 ending halfway through a 64-wide chunk,
    // 16, 48 and 208 a quarter or three quarters through; padded row strides. x's row stride padding and its rows past the last are NaN, the
    // codes' padding the NaN code (never read, or the result shows it); row 1 of x is zeros
    // (its outputs are exactly zero, or y0); weight row 2 is zeros (scale 1), row 3 spans 20
    // binades (E4M3 subnormals). A stored y starts all NaN (every value written); y's padding
    // columns are NaN and stay so.
    let g = gpu(DType::Bf16);
    // (rows, N, K, padding of x's, the codes' and y's row strides, epilogue, y's type)
    let cases: [(usize, usize, usize, Pads, &str, DType); 19] = [
        (51, 2560, 1024, (0, 0, 0), "store", DType::Bf16),
        (51, 1024, 4096, (0, 0, 0), "gated", DType::F32),
        (51, 8192, 1024, (0, 0, 0), "store", DType::Bf16),
        (17, 1024, 2048, (8, 16, 1), "add", DType::F32),
        (33, 40, 16384, (8, 32, 2), "gated", DType::Bf16),
        (64, 24, 208, (16, 16, 5), "add", DType::Bf16),
        (5, 32, 16, (0, 0, 0), "store", DType::F32),
        (40, 16, 48, (8, 16, 3), "gated", DType::F32),
        (10, 2560, 1024, (0, 0, 0), "store", DType::Bf16),
        (10, 1024, 4096, (0, 0, 0), "gated", DType::F32),
        (10, 8192, 1024, (0, 0, 0), "store", DType::Bf16),
        (1, 1024, 2048, (8, 16, 1), "add", DType::F32),
        (3, 256, 16384, (0, 0, 0), "store", DType::F32),
        (3, 40, 16384, (8, 32, 2), "gated", DType::Bf16),
        (16, 72, 2080, (8, 32, 3), "gated", DType::F32),
        (16, 16, 96, (0, 0, 0), "store", DType::F32),
        (16, 8, 32, (24, 16, 0), "store", DType::Bf16),
        (10, 24, 160, (16, 16, 5), "add", DType::Bf16),
        (1, 8, 32, (0, 0, 1), "store", DType::F32),
    ];
    for (i, &(m, n, k, (padx, padw, pady), mode, ydt)) in cases.iter().enumerate() {
        let name = format!("skinny fp8 gemm [{m}, {n}, {k}] {mode} -> {ydt:?}");
        let seed = 1800 + 10 * i as u64;
        let (ldx, ldw, ldy) = (k + padx, k + padw, n + pady);
        let mut xv = rand_vec(m * ldx, seed, -1.0, 1.0);
        for r in 0..m {
            xv[r * ldx + k..(r + 1) * ldx].fill(f32::NAN);
        }
        if m >= 3 {
            xv[ldx..ldx + k].fill(0.0);
        }
        xv.extend(std::iter::repeat_n(f32::NAN, 16 * ldx));
        let (xb, x) = up(&g, DType::Bf16, &xv);
        let s = 1.0 / (k as f32).sqrt();
        let mut w = rand_vec(n * k, seed + 1, -s, s);
        if n >= 4 {
            w[2 * k..3 * k].fill(0.0);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 4);
            for v in &mut w[3 * k..4 * k] {
                *v = s
                    * rng.random_range(-20.0f32..0.0).exp2()
                    * if rng.random() { 1.0 } else { -1.0 };
            }
        }
        let (codes, scales) = operators::fp8::quantise_rows(&w, k);
        let mut twin = Linear {
            weight: w,
            bias: None,
            n_in: k,
            n_out: n,
            fp8: None,
        };
        twin.quantise_fp8(false);
        for (j, (&c, &q)) in codes.iter().zip(&twin.weight).enumerate() {
            let held = scales[j / k] * operators::fp8::decode(c);
            assert_eq!(held.to_bits(), q.to_bits(), "{name}: weight {j}");
        }
        if n >= 4 {
            assert!(
                codes[3 * k..4 * k]
                    .iter()
                    .any(|&c| c & 0x78 == 0 && c & 7 != 0),
                "{name}: no subnormal code"
            );
        }
        let wb = up_codes(&g, &codes, k, ldw);
        let (sb, _) = up(&g, DType::F32, &scales);
        let (gb, gate) = up(&g, DType::F32, &rand_vec(n, seed + 2, -2.0, 2.0));
        let mut y0 = rounded(ydt, &rand_vec(m * ldy, seed + 3, -1.0, 1.0));
        for r in 0..m {
            y0[r * ldy + n..(r + 1) * ldy].fill(f32::NAN);
        }
        let (yb, _) = up(&g, ydt, &y0);
        let (epi, gate_ref) = match mode {
            "store" => {
                g.lane.poison(yb.view()).unwrap();
                (Epilogue::Store, None)
            }
            "add" => (Epilogue::Add, None),
            _ => (Epilogue::Gated(gb.view()), Some(&gate[..])),
        };
        let (xm, wm, ym) = (
            Mat::new(xb.view(), m, k).ld(ldx),
            Mat::new(wb.view(), n, k).ld(ldw),
            Mat::new(yb.view(), m, n).ld(ldy),
        );
        assert!(skinny::fits_fp8(&g.kernels, &xm, &wm, &ym), "{name}: fits");
        assert!(
            skinny::linear_fp8(&g.kernels, &g.lane, xm, wm, sb.view(), ym, epi).unwrap(),
            "{name}: queued"
        );
        let got = g.download(yb.view()).unwrap();
        let (mut dense, mut want, mut bound) = (vec![], vec![], vec![]);
        for r in 0..m {
            for c in 0..n {
                let (mut exact, mut sum_abs) = (0f64, 0f64);
                for j in 0..k {
                    let p = f64::from(x[r * ldx + j]) * f64::from(twin.weight[c * k + j]);
                    exact += p;
                    sum_abs += p.abs();
                }
                let gv = gate_ref.map_or(1.0, |g| f64::from(g[c]));
                let base = if mode == "store" {
                    0.0
                } else {
                    f64::from(y0[r * ldy + c])
                };
                let v = base + gv * exact;
                dense.push(got[r * ldy + c]);
                want.push(v);
                bound.push(fp8_bound((m, k), sum_abs * gv.abs(), base, v, ydt));
            }
            for c in n..ldy {
                assert!(
                    got[r * ldy + c].is_nan(),
                    "{name}: padding [{r}, {c}] written"
                );
            }
        }
        if m >= 3 {
            for c in 0..n {
                let (got, base) = (
                    dense[n + c],
                    if mode == "store" { 0.0 } else { y0[ldy + c] },
                );
                assert_eq!(got, base, "{name}: the zero row, column {c}");
            }
        }
        check_bound(&name, &dense, &want, &bound);
    }
}

/// How far the FP8 kernel's value may be from the exact one `want` (= base + gate · Σ x w
/// over K terms whose magnitudes add up to `sum_abs`, the gate's magnitude included), for a
/// y of type `ydt`. With u = 2^-24 (f32's unit roundoff):
/// - the twin's weights are scale · E4M3 rounded to f32 (≤ u |w| each), the kernel's are
///   exact: ≤ u · sum_abs;
/// - each warp adds its slice in one f32 accumulator, kslice / 16 tensor-core steps of 16
///   exact products each. NVIDIA documents neither how a step aligns its terms nor how it
///   rounds, so take the worst: the 16 products aligned to the step's largest magnitude
///   (the accumulator's included) and truncated there, then the sum truncated to f32: < 17
///   ulp of that magnitude, itself ≤ sum_abs, per step; an ulp is ≤ 2u of it;
/// - then one rounded addition per warp of the warps' sums, the scale and gate products and
///   the addition of base: ≤ u each of magnitudes ≤ sum_abs, |base| and |want| (+ the bound);
/// - a bf16 y finally rounds to bf16: half an ulp, ≤ 2^-8 of the magnitude.
fn fp8_bound((m, k): (usize, usize), sum_abs: f64, base: f64, want: f64, ydt: DType) -> f64 {
    let u = 2f64.powi(-24);
    let (warps, kslice) = skinny::split_k_fp8(k, m);
    let steps = (kslice / 16) as f64;
    let f32_err = 17.0 * 2.0 * u * steps * sum_abs
        + u * (warps as f64 + 3.0) * sum_abs
        + u * (base.abs() + want.abs());
    match ydt {
        DType::Bf16 => f32_err + 2f64.powi(-8) * (want.abs() + f32_err),
        _ => f32_err,
    }
}

/// Asserts |got - want| <= bound everywhere; prints the largest error as a share of its
/// bound and the first mismatches.
fn check_bound(name: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let err = |i: usize| (f64::from(got[i]) - want[i]).abs();
    // NaN fails: the comparison is false for it.
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| {
            let ok = err(i) <= bound[i];
            !ok
        })
        .collect();
    let worst = (0..got.len())
        .filter(|&i| bound[i] > 0.0)
        .map(|i| err(i) / bound[i])
        .fold(0.0f64, f64::max);
    println!(
        "{name}: {} values, largest error {worst:.3} of its bound",
        got.len()
    );
    if !bad.is_empty() {
        for &i in bad.iter().take(10) {
            println!(
                "  [{i}] got {} want {} bound {:.3e}",
                got[i], want[i], bound[i]
            );
        }
        panic!(
            "{name}: {} of {} values outside their bound",
            bad.len(),
            got.len()
        );
    }
}

#[test]
fn skinny_fp8_replays_give_the_same_bits() {
    // The warps' sums are added in a fixed order: a second launch on the same inputs gives
    // the same bits (16 warps at K 4096 and 16384; a bf16 y; a gated add from the same y0).
    let g = gpu(DType::Bf16);
    for (i, &(m, n, k, mode, ydt)) in [
        (10, 1024, 4096, "store", DType::F32),
        (3, 256, 16384, "store", DType::F32),
        (10, 2560, 1024, "store", DType::Bf16),
        (10, 1024, 4096, "gated", DType::F32),
        (51, 2560, 1024, "store", DType::Bf16),
        (51, 1024, 4096, "gated", DType::F32),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("skinny fp8 gemm [{m}, {n}, {k}] {mode} -> {ydt:?}");
        let seed = 1900 + 10 * i as u64;
        let s = 1.0 / (k as f32).sqrt();
        let (xb, _) = up(&g, DType::Bf16, &rand_vec(m * k, seed, -1.0, 1.0));
        let (codes, scales) = operators::fp8::quantise_rows(&rand_vec(n * k, seed + 1, -s, s), k);
        let wb = up_codes(&g, &codes, k, k);
        let (sb, _) = up(&g, DType::F32, &scales);
        let (gb, _) = up(&g, DType::F32, &rand_vec(n, seed + 2, -2.0, 2.0));
        let y0 = rand_vec(m * n, seed + 3, -1.0, 1.0);
        let epi = if mode == "store" {
            Epilogue::Store
        } else {
            Epilogue::Gated(gb.view())
        };
        let (xm, wm) = (Mat::new(xb.view(), m, k), Mat::new(wb.view(), n, k));
        let mut runs = vec![];
        for _ in 0..2 {
            // A fresh y each run: all NaN for a store, y0 for the gated add.
            let yb = if mode == "store" {
                nan(&g, ydt, m * n)
            } else {
                up(&g, ydt, &y0).0
            };
            let ym = Mat::new(yb.view(), m, n);
            assert!(skinny::linear_fp8(&g.kernels, &g.lane, xm, wm, sb.view(), ym, epi).unwrap());
            runs.push(bits(&g.download(yb.view()).unwrap()));
        }
        assert!(
            runs[0].iter().all(|&b| !f32::from_bits(b).is_nan()),
            "{name}: NaN written"
        );
        assert_eq!(runs[0], runs[1], "{name}: a second run differs");
    }
}

#[test]
fn skinny_fp8_geglu_equals_product_then_gelu_gate() {
    // GeGLU in the FP8 product's epilogue: the same bits as the FP8 product (bf16 out) and
    // gelu_gate launched one after the other, and the CPU twin (the weights as
    // cpu::Linear::quantise_fp8 holds them, the product rounded to bf16, then GeGLU) within
    // bf16's tolerance. The expert's shape, odd sizes (1 and 16 rows, mlp 12 and 20, K 16
    // and 2080, ending inside a 64-wide chunk), a padded x; the output starts NaN and its
    // padding columns stay NaN.
    let g = gpu(DType::Bf16);
    let cases = [
        (10, 4096, 1024, 0, 0),
        (16, 12, 96, 8, 3),
        (1, 4, 16, 0, 0),
        (9, 20, 2080, 16, 1),
    ];
    for (i, &(m, mlp, k, padx, pado)) in cases.iter().enumerate() {
        let name = format!("skinny fp8 geglu [{m}, {mlp}, {k}]");
        let n = 2 * mlp;
        let ldx = k + padx;
        let (xb, x, _, _) = skinny_operands(&g, (m, 8, k, ldx), 2100 + 10 * i as u64);
        let s = 1.0 / (k as f32).sqrt();
        let w = rand_vec(n * k, 2101 + 10 * i as u64, -2.0 * s, 2.0 * s);
        let (codes, scales) = operators::fp8::quantise_rows(&w, k);
        let mut twin = Linear {
            weight: w,
            bias: None,
            n_in: k,
            n_out: n,
            fp8: None,
        };
        twin.quantise_fp8(false);
        let wb = up_codes(&g, &codes, k, k);
        let (sb, _) = up(&g, DType::F32, &scales);
        let xm = Mat::new(xb.view(), m, k).ld(ldx);
        let wm = Mat::new(wb.view(), n, k);
        check_geglu_epilogue(
            &g,
            &name,
            (m, mlp, k, ldx, pado),
            (&x, &twin.weight),
            |gu| {
                skinny::linear_fp8(&g.kernels, &g.lane, xm, wm, sb.view(), gu, Epilogue::Store)
                    .unwrap()
            },
            |out| skinny::geglu_fp8(&g.kernels, &g.lane, xm, (wm, sb.view()), out).unwrap(),
        );
    }
    // Shapes it does not take: nothing queued, Ok(false); short scales: an error.
    let (xb, _, _, _) = skinny_operands(&g, (17, 8, 64, 64), 2190);
    let wb = up_codes(&g, &[0x38u8; 64 * 64], 64, 64);
    let (sb, _) = up(&g, DType::F32, &[1.0; 64]);
    check_geglu_refusals(&g, (&xb, &wb), |x, w, out| {
        skinny::geglu_fp8(&g.kernels, &g.lane, x, (w, sb.view()), out)
    });
    let ob = nan(&g, DType::Bf16, 10 * 32);
    let short = sb.view().at(0, 16).unwrap();
    let e = skinny::geglu_fp8(
        &g.kernels,
        &g.lane,
        Mat::new(xb.view(), 10, 64),
        (Mat::new(wb.view(), 64, 64), short),
        Mat::new(ob.view(), 10, 32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("scales"), "{e}");
    assert!(g.download(ob.view()).unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn skinny_fp8_refuses_what_it_does_not_take() {
    // Shapes past the kernel's limits answer Ok(false) and queue nothing (y stays NaN);
    // operands that do not make one product, codes that are not u8 and short scales or
    // gates are errors naming the operand. The f32 program has no such kernel.
    let g = gpu(DType::Bf16);
    let (xb, _) = up(&g, DType::Bf16, &rand_vec(65 * 128, 1, -1.0, 1.0));
    let wb = up_codes(&g, &[0x38u8; 64 * 128], 128, 128);
    let (sb, _) = up(&g, DType::F32, &[1.0; 64]);
    let yb = nan(&g, DType::F32, 65 * 64);
    let mats = |(m, n, k): (usize, usize, usize)| {
        (
            Mat::new(xb.view(), m, k),
            Mat::new(wb.view(), n, k),
            Mat::new(yb.view(), m, n),
        )
    };
    let run = |x: Mat, w: Mat, scales: View, y: Mat, epi: Epilogue| {
        skinny::linear_fp8(&g.kernels, &g.lane, x, w, scales, y, epi)
    };
    for (what, (m, n, k)) in [
        ("65 rows", (65, 8, 32)),
        ("no rows", (0, 8, 32)),
        ("N not a multiple of 8", (10, 12, 32)),
        ("K not a multiple of 16", (10, 8, 40)),
        ("K not a multiple of 16, wide", (51, 8, 24)),
    ] {
        let (xm, wm, ym) = mats((m, n, k));
        assert!(
            !run(xm, wm, sb.view(), ym, Epilogue::Store).unwrap(),
            "{what}"
        );
    }
    let (xm, wm, ym) = mats((10, 8, 32));
    let odd = Mat::new(wb.view(), 8, 32).ld(40);
    assert!(
        !run(xm, odd, sb.view(), ym, Epilogue::Store).unwrap(),
        "codes' row stride 40"
    );
    let shifted = Mat::new(xb.view().tail(4).unwrap(), 10, 32);
    assert!(
        !run(shifted, wm, sb.view(), ym, Epilogue::Store).unwrap(),
        "x not 16-byte aligned"
    );
    let y_u8 = g.dev.alloc(DType::U8, 80).unwrap();
    let ym_u8 = Mat::new(y_u8.view(), 10, 8);
    assert!(
        !run(xm, wm, sb.view(), ym_u8, Epilogue::Store).unwrap(),
        "a u8 y"
    );

    let err = |r: operators::Result<bool>| r.unwrap_err().to_string();
    let bf16_w = Mat::new(xb.view(), 8, 32);
    assert!(err(run(xm, bf16_w, sb.view(), ym, Epilogue::Store)).contains("U8"));
    let e = err(run(
        xm,
        Mat::new(wb.view(), 8, 64),
        sb.view(),
        ym,
        Epilogue::Store,
    ));
    assert!(e.contains("x has 32 columns"), "{e}");
    let e = err(run(
        xm,
        wm,
        sb.view(),
        Mat::new(yb.view(), 10, 16),
        Epilogue::Store,
    ));
    assert!(e.contains("y is [10, 16]"), "{e}");
    let short = sb.view().at(0, 4).unwrap();
    assert!(err(run(xm, wm, short, ym, Epilogue::Store)).contains("scales"));
    assert!(err(run(xm, wm, sb.view(), ym, Epilogue::Gated(short))).contains("gate"));
    assert!(
        g.download(yb.view()).unwrap().iter().all(|v| v.is_nan()),
        "y was written"
    );

    let f = gpu(DType::F32);
    let (xb, _) = up(&f, DType::Bf16, &rand_vec(10 * 32, 1, -1.0, 1.0));
    let wb = up_codes(&f, &[0x38u8; 8 * 32], 32, 32);
    let (sb, _) = up(&f, DType::F32, &[1.0; 8]);
    let yb = nan(&f, DType::F32, 80);
    let (xm, wm, ym) = (
        Mat::new(xb.view(), 10, 32),
        Mat::new(wb.view(), 8, 32),
        Mat::new(yb.view(), 10, 8),
    );
    assert!(
        !skinny::linear_fp8(&f.kernels, &f.lane, xm, wm, sb.view(), ym, Epilogue::Store).unwrap()
    );
}

#[test]
fn fp8_gemm_matches_the_cpu_w8a8_product() {
    // W8A8 on cuBLASLt (`Gemm::linear_fp8`, what the vision tower's and Gemma 2B's products
    // run with `--dtype fp8`): x quantised per row on the GPU (`quantise_e4m3`, checked bit
    // for bit elsewhere), W per output channel by fp8::quantise_rows, both scale vectors
    // applied by cuBLASLt. The expected value is the sum of the exact products of the codes'
    // values times both scales, in f64, from the codes and scales the GPU holds: the test
    // checks the product alone, within `lt_fp8_bound`.
    //
    // Shapes: the stages' (SigLIP q|k|v and fc2, Gemma q|k|v, gate|up and down at a libero
    // prefix), a few rows, odd row counts; y f32 (the residual streams, add) and bf16 (q|k|v,
    // gate|up). Row 1 of x is zeros (scale 1, codes 0: its outputs are exactly 0 or y0);
    // weight row 2 is zeros. A stored y starts all NaN.
    let g = gpu(DType::Bf16);
    // (rows, N, K, epilogue, y's type)
    let cases: [(usize, usize, usize, &str, DType); 8] = [
        (512, 3456, 1152, "store", DType::F32),
        (512, 1152, 4304, "add", DType::F32),
        (532, 2560, 2048, "store", DType::Bf16),
        (532, 2048, 16384, "add", DType::F32),
        (37, 32768, 2048, "store", DType::Bf16),
        (3, 64, 32, "store", DType::F32),
        (1, 16, 64, "add", DType::F32),
        (17, 128, 96, "store", DType::Bf16),
    ];
    for (i, &(m, n, k, mode, ydt)) in cases.iter().enumerate() {
        let name = format!("cuBLASLt fp8 gemm [{m}, {n}, {k}] {mode} -> {ydt:?}");
        let seed = 2900 + 10 * i as u64;
        let mut xv = rand_vec(m * k, seed, -1.0, 1.0);
        if m >= 3 {
            xv[k..2 * k].fill(0.0);
        }
        let (xb, _) = up(&g, DType::Bf16, &xv);
        let xq = nan(&g, DType::U8, m * k);
        let xs = nan(&g, DType::F32, m);
        quantise_e4m3(
            &g.kernels,
            &g.lane,
            xb.view(),
            k,
            xq.view(),
            k,
            xs.view(),
            m,
            k,
        )
        .unwrap();
        let x_codes = g.download_bytes(xq.view()).unwrap();
        let x_scales = g.download(xs.view()).unwrap();
        let s = 1.0 / (k as f32).sqrt();
        let mut w = rand_vec(n * k, seed + 1, -s, s);
        if n >= 3 {
            w[2 * k..3 * k].fill(0.0);
        }
        let (w_codes, w_scales) = operators::fp8::quantise_rows(&w, k);
        let wb = up_codes(&g, &w_codes, k, k);
        let (wsb, _) = up(&g, DType::F32, &w_scales);
        let y0 = rounded(ydt, &rand_vec(m * n, seed + 3, -1.0, 1.0));
        let add = mode == "add";
        let xval: Vec<f64> = x_codes
            .iter()
            .map(|&c| f64::from(operators::fp8::decode(c)))
            .collect();
        let wval: Vec<f64> = w_codes
            .iter()
            .map(|&c| f64::from(operators::fp8::decode(c)))
            .collect();
        // Exact sums of the codes' products, times both scales; their magnitudes' sums.
        let (mut product, mut sum_abs) = (Vec::with_capacity(m * n), Vec::with_capacity(m * n));
        for r in 0..m {
            let xr = &xval[r * k..(r + 1) * k];
            for c in 0..n {
                let wr = &wval[c * k..(c + 1) * k];
                let (mut exact, mut mag) = (0f64, 0f64);
                for (a, b) in xr.iter().zip(wr) {
                    exact += a * b;
                    mag += (a * b).abs();
                }
                let sc = f64::from(x_scales[r]) * f64::from(w_scales[c]);
                product.push(sc * exact);
                sum_abs.push(sc * mag);
            }
        }
        let xm = (Mat::new(xq.view(), m, k), xs.view());
        let wm = (Mat::new(wb.view(), n, k), wsb.view());
        // Each way the product can run: as `w8a8` picks it (what the engine runs), then the
        // unit-scale product and `rescale_e4m3` through each type, whichever `w8a8` picked.
        for way in ["w8a8", "rescaled via Bf16", "rescaled via F32"] {
            let name = format!("{name} {way}");
            let (yb, _) = up(&g, ydt, &y0);
            if !add {
                g.lane.poison(yb.view()).unwrap();
            }
            let y = Mat::new(yb.view(), m, n);
            let tmp = nan(&g, DType::F32, m * n);
            let between = match way {
                "w8a8" => {
                    let ran = fp8k::w8a8(&g.kernels, &g.gemm, &g.lane, xm, wm, y, add, tmp.view())
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                        .unwrap_or_else(|| panic!("{name}: cuBLASLt offers no E4M3 product"));
                    println!("NOTE {name}: {}", ran.describe());
                    match ran {
                        W8a8::Scaled => None,
                        W8a8::ScaledThenAdded => Some(DType::Bf16),
                        W8a8::Rescaled(dt) => Some(dt),
                    }
                }
                _ => {
                    let dt = if way.ends_with("Bf16") {
                        DType::Bf16
                    } else {
                        DType::F32
                    };
                    let t = Mat::new(tmp.view().as_type(dt).at(0, m * n).unwrap(), m, n);
                    let offered = g.gemm.product_e4m3(&g.lane, xm.0, wm.0, t).unwrap();
                    if !offered {
                        // FP8 tensor cores always write bf16; an f32 output may be missing.
                        assert_eq!(dt, DType::F32, "{name}: no bf16 output offered");
                        println!("NOTE {name}: no f32 output offered");
                        let held = g.download(tmp.view()).unwrap();
                        assert!(held.iter().all(|v| v.is_nan()), "{name}: a refusal wrote");
                        continue;
                    }
                    let scales = (xs.view(), wsb.view());
                    rescale_e4m3(
                        &g.kernels,
                        &g.lane,
                        t.view,
                        scales,
                        y,
                        add,
                        (None, Act::None),
                    )
                    .unwrap();
                    Some(dt)
                }
            };
            let got = g.download(yb.view()).unwrap();
            let (mut want, mut bound) = (Vec::with_capacity(m * n), Vec::with_capacity(m * n));
            for i in 0..m * n {
                let base = if add { f64::from(y0[i]) } else { 0.0 };
                want.push(base + product[i]);
                bound.push(lt_fp8_bound(sum_abs[i], base, product[i], between, ydt));
            }
            if m >= 3 {
                for c in 0..n {
                    let base = if add { y0[n + c] } else { 0.0 };
                    assert_eq!(got[n + c], base, "{name}: the zero row, column {c}");
                }
            }
            check_bound(&name, &got, &want, &bound);
        }
    }
}

/// How far cuBLASLt's FP8 product may be from the exact base + `product` (a Σ of products
/// whose magnitudes add up to `sum_abs`, both scales included), where the sum passed through
/// `between` (f32 or bf16) before its scales or the addition, and y is `ydt`. The products of
/// two E4M3 values are exact; Hopper's FP8 tensor cores add them with fewer bits than f32
/// keeps (NVIDIA does not document how many; cuBLASLt, without fast accumulation, moves the
/// partial sums into f32 at intervals), so allow 2^-10 of `sum_abs` for the sums, f32
/// roundings of the scales, beta and the addition, a bf16 `between`'s rounding of the product
/// and a bf16 y's final rounding. A wrong layout, scale or row errs by the size of the values
/// themselves, far outside this.
fn lt_fp8_bound(sum_abs: f64, base: f64, product: f64, between: Option<DType>, ydt: DType) -> f64 {
    let u = 2f64.powi(-24);
    let want = base + product;
    let mut err = 2f64.powi(-10) * sum_abs + 6.0 * u * (sum_abs + base.abs() + want.abs());
    if between == Some(DType::Bf16) {
        err += 2f64.powi(-8) * (product.abs() + err);
    }
    match ydt {
        DType::Bf16 => err + 2f64.powi(-8) * (want.abs() + err),
        _ => err,
    }
}

#[test]
fn rescale_e4m3_matches_cpu() {
    // The scales of an FP8 product taken after cuBLASLt: y = xs[r]·ws[c]·p[r, c], stored
    // over NaN or added, with y and p each f32 or the activation type, against
    // fp8::rescale_product bit for bit (the same f32 operations, then the same bf16
    // rounding). Odd sizes, a y row stride wider than its columns (the gap must stay
    // untouched), a single row, and no rows at all (nothing written).
    for act in ACTS {
        let g = gpu(act);
        for (i, &(rows, n, ld)) in [
            (37usize, 129usize, 129usize),
            (5, 1000, 1003),
            (1, 7, 9),
            (0, 64, 64),
        ]
        .iter()
        .enumerate()
        {
            // (y's type, p's type, add, with a bias)
            for (ydt, pdt, add, with_bias) in [
                (DType::F32, DType::F32, true, false),
                (DType::F32, act, false, false),
                (act, DType::F32, false, false),
                (act, act, true, false),
                (act, act, false, false),
                (act, act, false, true),
                (DType::F32, DType::F32, false, true),
            ] {
                let name = format!(
                    "rescale_e4m3 {act:?} [{rows}, {n}] ld {ld} y {ydt:?} p {pdt:?} add {add} \
                     bias {with_bias}"
                );
                let seed = 3100 + 10 * i as u64;
                let (pb, p) = up(&g, pdt, &rand_vec(rows * n, seed, -3000.0, 3000.0));
                let xs = rand_vec(rows, seed + 1, 1e-4, 2e-2);
                let ws = rand_vec(n, seed + 2, 1e-5, 1e-3);
                let bias = rand_vec(n, seed + 4, -0.5, 0.5);
                let (xsb, _) = up(&g, DType::F32, &xs);
                let (wsb, _) = up(&g, DType::F32, &ws);
                let (bb, _) = up(&g, DType::F32, &bias);
                let y0 = rand_vec((rows * ld).max(1), seed + 3, -1.0, 1.0);
                let (yb, mut want) = up(&g, ydt, &y0);
                if !add {
                    g.lane.poison(yb.view()).unwrap();
                    want = g.download(yb.view()).unwrap();
                }
                let y = Mat::new(yb.view(), rows, n).ld(ld);
                let b = with_bias.then(|| bb.view());
                rescale_e4m3(
                    &g.kernels,
                    &g.lane,
                    pb.view(),
                    (xsb.view(), wsb.view()),
                    y,
                    add,
                    (b, Act::None),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
                let got = g.download(yb.view()).unwrap();
                if rows > 0 {
                    operators::fp8::rescale_product(&mut want, ld, &p, &xs, &ws, add);
                }
                // The bias after the scales, in f32; stored values take y's rounding; the gap
                // between rows keeps what it held.
                for r in 0..rows {
                    let row = &mut want[r * ld..r * ld + n];
                    if with_bias {
                        row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
                    }
                    let held = rounded(ydt, row);
                    row.copy_from_slice(&held);
                }
                assert_eq!(bits(&got), bits(&want), "{name}");
            }
        }
        // A p of the wrong type or too short, and scales or a bias too short, are refused.
        let (pb, _) = up(&g, DType::F32, &[1.0; 12]);
        let (xsb, _) = up(&g, DType::F32, &[1.0; 3]);
        let (wsb, _) = up(&g, DType::F32, &[1.0; 4]);
        let yb = nan(&g, DType::F32, 12);
        let y = Mat::new(yb.view(), 3, 4);
        let codes = g.upload(DType::U8, &[0.0; 12]).unwrap();
        let run = |p: View, xs: View, bias: Option<View>| {
            rescale_e4m3(
                &g.kernels,
                &g.lane,
                p,
                (xs, wsb.view()),
                y,
                false,
                (bias, Act::None),
            )
        };
        assert!(run(codes.view(), xsb.view(), None).is_err(), "u8 p");
        assert!(
            run(pb.view().at(0, 11).unwrap(), xsb.view(), None).is_err(),
            "short p"
        );
        assert!(
            run(pb.view(), xsb.view().at(0, 2).unwrap(), None).is_err(),
            "short xs"
        );
        let short_bias = wsb.view().at(0, 3).unwrap();
        assert!(
            run(pb.view(), xsb.view(), Some(short_bias)).is_err(),
            "short bias"
        );
        let held = g.download(yb.view()).unwrap();
        assert!(held.iter().all(|v| v.is_nan()), "a refused call wrote y");
    }
}

#[test]
fn rescale_e4m3_folds_the_bias_and_gelu() {
    // The vision tower's q|k|v and fc1 with `--dtype fp8` where the scales come after
    // cuBLASLt: y = gelu_tanh(xs·ws·p + bias) (and with no activation) into the activation
    // type, against rescale_product, the bias and cpu::gelu_tanh (within tol: GELU's tanh is
    // not the CPU's bit for bit). Scaled values of a few units, where GELU bends.
    for act in ACTS {
        let g = gpu(act);
        let (rows, n) = (19, 4304);
        for a in [Act::GeluTanh, Act::Silu] {
            let name = format!("rescale_e4m3 {act:?} [{rows}, {n}] {a:?}");
            let (pb, p) = up(&g, act, &rand_vec(rows * n, 3200, -3000.0, 3000.0));
            let xs = rand_vec(rows, 3201, 1e-2, 5e-2);
            let ws = rand_vec(n, 3202, 2e-2, 5e-2);
            let bias = rand_vec(n, 3203, -1.0, 1.0);
            let (xsb, _) = up(&g, DType::F32, &xs);
            let (wsb, _) = up(&g, DType::F32, &ws);
            let (bb, _) = up(&g, DType::F32, &bias);
            let yb = nan(&g, act, rows * n);
            let y = Mat::new(yb.view(), rows, n);
            rescale_e4m3(
                &g.kernels,
                &g.lane,
                pb.view(),
                (xsb.view(), wsb.view()),
                y,
                false,
                (Some(bb.view()), a),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut want = vec![0.0; rows * n];
            operators::fp8::rescale_product(&mut want, n, &p, &xs, &ws, false);
            let f = match a {
                Act::Silu => cpu::silu,
                _ => cpu::gelu_tanh,
            };
            for (i, v) in want.iter_mut().enumerate() {
                *v = f(*v + bias[i % n]);
            }
            check(
                &name,
                &g.download(yb.view()).unwrap(),
                &rounded(act, &want),
                tol(act),
            );
        }
    }
}

#[test]
fn add_act_matches_cpu() {
    // The f32 stream taking an activation-typed product: stored (add 0, over NaN) and
    // added; the same f32 additions as the CPU's on the rounded values, so bit for bit.
    for act in ACTS {
        let g = gpu(act);
        let n = 1000 + 7;
        let (yb, y) = up(&g, act, &rand_vec(n, 3050, -3.0, 3.0));
        let x0 = rand_vec(n, 3051, -1.0, 1.0);
        let (xb, _) = up(&g, DType::F32, &x0);
        add_act(&g.kernels, &g.lane, xb.view(), yb.view(), true, n).unwrap();
        let mut want = x0.clone();
        cpu::add_residual(&mut want, &y, None);
        assert_eq!(
            bits(&g.download(xb.view()).unwrap()),
            bits(&want),
            "{act:?} add"
        );
        g.lane.poison(xb.view()).unwrap();
        add_act(&g.kernels, &g.lane, xb.view(), yb.view(), false, n).unwrap();
        assert_eq!(
            bits(&g.download(xb.view()).unwrap()),
            bits(&y),
            "{act:?} store"
        );
        // A y shorter than n is refused before anything runs.
        let short = yb.view().at(0, n - 1).unwrap();
        assert!(add_act(&g.kernels, &g.lane, xb.view(), short, true, n).is_err());
    }
}

#[test]
fn lt_bias_epilogues_match_the_cpu_linear() {
    // The vision tower's q|k|v (+ bias) and fc1 (+ bias, tanh-GELU) as one cuBLASLt call
    // each (`Gemm::linear_bias`), bf16 out, against the CPU's Linear with its bias and
    // gelu_tanh on the same (bf16-rounded) operands, and against the two-launch path it
    // replaces (the product in f32, then bias_act) within bf16's rounding. A stored y starts
    // all NaN; the call is asked twice (the second from the plan cache).
    let g = gpu(DType::Bf16);
    let cases: [(usize, usize, usize, bool); 5] = [
        (512, 3456, 1152, false),
        (512, 4304, 1152, true),
        (768, 4304, 1152, true),
        (37, 200, 64, true),
        (5, 24, 40, false),
    ];
    for (i, &(m, n, k, gelu)) in cases.iter().enumerate() {
        let name = format!("cuBLASLt bias epilogue [{m}, {n}, {k}] gelu {gelu}");
        let seed = 3100 + 10 * i as u64;
        let s = 1.0 / (k as f32).sqrt();
        let (xb, x) = up(&g, DType::Bf16, &rand_vec(m * k, seed, -2.0, 2.0));
        let (wb, w) = up(&g, DType::Bf16, &rand_vec(n * k, seed + 1, -s, s));
        let (bb, bias) = up(&g, DType::F32, &rand_vec(n, seed + 2, -1.0, 1.0));
        let lin = Linear {
            weight: w,
            bias: Some(bias),
            n_in: k,
            n_out: n,
            fp8: None,
        };
        let mut want = lin.forward(&x, m);
        if gelu {
            want.iter_mut().for_each(|v| *v = cpu::gelu_tanh(*v));
        }
        let epi = if gelu {
            operators::cuda::gemm::LtEpilogue::GeluBias
        } else {
            operators::cuda::gemm::LtEpilogue::Bias
        };
        let (xm, wm) = (Mat::new(xb.view(), m, k), Mat::new(wb.view(), n, k));
        for round in 0..2 {
            let yb = nan(&g, DType::Bf16, m * n);
            let ran = g
                .gemm
                .linear_bias(&g.lane, xm, wm, Mat::new(yb.view(), m, n), bb.view(), epi)
                .unwrap();
            let got = g.download(yb.view()).unwrap();
            if !ran {
                // Hopper's cuBLASLt offers no bias epilogue with an f32 bias into bf16: the
                // engine then runs the two-launch path, checked below. A refusal writes
                // nothing.
                println!("NOTE {name}: no bias epilogue offered (round {round})");
                assert!(
                    got.iter().all(|v| v.is_nan()),
                    "{name}: a refused call wrote y"
                );
                continue;
            }
            check(
                &format!("{name} round {round}"),
                &got,
                &want,
                tol(DType::Bf16),
            );
        }
        // The path it replaces, on the same operands.
        let pre = nan(&g, DType::F32, m * n);
        g.gemm
            .linear(&g.lane, xm, wm, Mat::new(pre.view(), m, n), 0.0)
            .unwrap();
        let old = nan(&g, DType::Bf16, m * n);
        let act = if gelu { Act::GeluTanh } else { Act::None };
        let out = Out {
            f32: None,
            act: Some(old.view()),
            ld: n,
        };
        bias_act(
            &g.kernels,
            &g.lane,
            pre.view(),
            n,
            Some(bb.view()),
            act,
            out,
            m,
            n,
        )
        .unwrap();
        let old = g.download(old.view()).unwrap();
        check(
            &format!("{name} against bias_act"),
            &old,
            &want,
            tol(DType::Bf16),
        );
    }
}

#[test]
fn sm_limited_products_match_the_cpu() {
    // A lane whose cuBLASLt products target 8 SMs (`TURBOPI_OVERLAP_SMS`) computes the same
    // products (against the CPU linear), under a plan of its own: the same shape on the
    // unlimited lane makes another plan.
    let g = gpu(DType::Bf16);
    let (m, n, k) = (532, 2048, 2048);
    let s = 1.0 / (k as f32).sqrt();
    let (xb, x) = up(&g, DType::Bf16, &rand_vec(m * k, 3300, -1.0, 1.0));
    let (wb, w) = up(&g, DType::Bf16, &rand_vec(n * k, 3301, -s, s));
    let want = Linear {
        weight: w,
        bias: None,
        n_in: k,
        n_out: n,
        fp8: None,
    }
    .forward(&x, m);
    let (xm, wm) = (Mat::new(xb.view(), m, k), Mat::new(wb.view(), n, k));
    let plans = g.gemm.plan_count();
    for sms in [8, 0] {
        g.lane.limit_sms(sms);
        assert_eq!(g.lane.sm_target(), sms);
        let yb = nan(&g, DType::F32, m * n);
        g.gemm
            .linear(&g.lane, xm, wm, Mat::new(yb.view(), m, n), 0.0)
            .unwrap();
        let got = g.download(yb.view()).unwrap();
        check(
            &format!("gemm targeting {sms} SMs"),
            &got,
            &want,
            (1e-3, 1e-3),
        );
    }
    assert_eq!(g.gemm.plan_count(), plans + 2, "one plan per SM target");
}

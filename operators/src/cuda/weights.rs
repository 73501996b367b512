//! The device copy of the policy's weights: one allocation laid out from the config, filled
//! either from a checkpoint (through [`crate::weights::Loader`], converted on the host) or
//! with random values generated on the device (benchmarks: no checkpoint to write or read).
//!
//! GEMM weights are stored in the activation type (f32 or bf16); biases, norm weights and the
//! position embedding stay f32. Projections that read the same input are fused into one
//! matrix (SigLIP q|k|v, Gemma q|k|v and gate|up), and Gemma's RMSNorm weights are stored as
//! 1 + w, which is what the CPU multiplies by.
//!
//! With `--dtype fp8` the large linear layers (SigLIP's and Gemma 2B's projections and MLPs,
//! the projector, the action expert's projections and MLP) are stored as E4M3 codes with an
//! f32 scale per output channel, quantised at load on the host from the checkpoint's values
//! with [`crate::fp8::quantise_rows`] (the CPU emulation's weights, bit for bit), or on the
//! device for random weights. docs/fp8.md has the scheme.

use rayon::prelude::*;

use super::compile::Kernels;
use super::device::{blocks_for, launch, Args, DType, Device, DeviceBuffer, Lane, View};
use super::gemm::{Fp8, Mat};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::keys::{self, Param, EMBED, EXPERT, PROJECTOR, VLM};
use crate::weights::Loader;
use crate::{Error, Result};

/// Bump allocation inside one device buffer; run once with base 0 to size it, then again
/// with the real base (the layout is a pure function of the config).
pub(crate) struct Arena {
    base: u64,
    used: usize,
}

impl Arena {
    pub(crate) fn sizing() -> Arena {
        Arena { base: 0, used: 0 }
    }

    pub(crate) fn at(base: u64) -> Arena {
        Arena { base, used: 0 }
    }

    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// `len` elements of `dtype`, 256-byte aligned (what cuBLASLt's fastest kernels want).
    pub(crate) fn take(&mut self, dtype: DType, len: usize) -> View {
        let off = self.used.div_ceil(256) * 256;
        self.used = off + len * dtype.size();
        View {
            ptr: self.base + off as u64,
            len,
            dtype,
        }
    }
}

/// How a piece's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// In the activation type (GEMM operands and the embedding table).
    Act,
    /// f32 as read.
    F32,
    /// f32, 1 + w (Gemma's RMSNorm weight).
    OnePlus,
    /// E4M3 codes (u8), each row's scale in the piece's `fp8` scales.
    Fp8,
}

/// One region of the weight buffer and the checkpoint tensors stacked into it (rows of the
/// first, then of the next...).
struct Piece {
    view: View,
    store: Store,
    sources: Vec<(String, Vec<usize>)>,
    /// [`Store::Fp8`]: f32 [rows], one scale per row of the stacked tensors.
    scales: Option<View>,
}

/// A Linear: weight [n_out, n_in] (act, or E4M3 codes with `fp8`'s scales), optional f32
/// bias [n_out].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lin {
    pub w: View,
    pub b: Option<View>,
    pub n_out: usize,
    pub n_in: usize,
    pub fp8: Option<Fp8>,
}

impl Lin {
    /// The weight as a GEMM operand (with its FP8 scales, if any).
    pub(crate) fn mat(&self) -> Mat {
        Mat {
            fp8: self.fp8,
            ..Mat::new(self.w, self.n_out, self.n_in)
        }
    }

    pub(crate) fn bias(&self) -> Result<View> {
        self.b
            .ok_or_else(|| Error::Cuda("internal: Linear without its bias".into()))
    }
}

pub(crate) struct VisionLayerW {
    pub ln1_w: View,
    pub ln1_b: View,
    /// q|k|v fused: [3 vw, vw], bias [3 vw].
    pub qkv: Lin,
    pub out: Lin,
    pub ln2_w: View,
    pub ln2_b: View,
    pub fc1: Lin,
    pub fc2: Lin,
}

pub(crate) struct VisionW {
    pub patch: Lin,
    pub pos: View,
    pub layers: Vec<VisionLayerW>,
    pub post_w: View,
    pub post_b: View,
    pub proj: Lin,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum NormW {
    /// 1 + w, f32 [width].
    Plain(View),
    /// dense: cond -> (scale, shift, gate), [3 w, w] + bias.
    Adaptive(Lin),
}

pub(crate) struct GemmaLayerW {
    pub norm1: NormW,
    /// q|k|v fused: [(nh + 2 kv) hd, w].
    pub qkv: Lin,
    pub o: Lin,
    pub norm2: NormW,
    /// gate|up fused: [2 mlp, w].
    pub gu: Lin,
    pub down: Lin,
}

pub(crate) struct GemmaW {
    pub layers: Vec<GemmaLayerW>,
    pub final_norm: Option<NormW>,
}

pub(crate) enum HeadsW {
    Pi0 {
        state: Lin,
        /// [ew, 2 ew]: columns 0..ew read the action embedding, ew..2ew the time embedding.
        time_in: Lin,
        time_out: Lin,
    },
    Pi05 {
        time_in: Lin,
        time_out: Lin,
    },
}

/// The prefix stage's weights: the token embedding table and Gemma 2B.
pub(crate) struct PrefixW {
    pub embed: View,
    pub gemma: GemmaW,
}

/// The denoise stage's weights: the expert and the heads around it.
pub(crate) struct DenoiseW {
    pub expert: GemmaW,
    pub action_in: Lin,
    pub action_out: Lin,
    pub heads: HeadsW,
}

/// Lays out weights piece by piece in an arena; the pieces say which checkpoint tensors fill
/// them.
pub(crate) struct Planner {
    arena: Arena,
    act: DType,
    /// The stages whose large linear layers are FP8 (`--dtype fp8`).
    fp8: crate::fp8::Stages,
    pieces: Vec<Piece>,
}

impl Planner {
    fn piece(&mut self, store: Store, sources: Vec<(String, Vec<usize>)>) -> View {
        let len = sources
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let dtype = match store {
            Store::Act => self.act,
            Store::Fp8 => DType::U8,
            Store::F32 | Store::OnePlus => DType::F32,
        };
        let view = self.arena.take(dtype, len);
        let scales = (store == Store::Fp8).then(|| {
            let rows = sources.iter().map(|(_, s)| s[0]).sum();
            self.arena.take(DType::F32, rows)
        });
        self.pieces.push(Piece {
            view,
            store,
            sources,
            scales,
        });
        view
    }

    fn vector(&mut self, key: String, n: usize) -> View {
        self.piece(Store::F32, vec![(key, vec![n])])
    }

    /// Linears `keys[i]` ([outs[i], n_in] each) stacked into one [sum(outs), n_in], in the
    /// activation type.
    fn fused(&mut self, keys: &[&Param], outs: &[usize], n_in: usize, bias: bool) -> Lin {
        self.large(keys, outs, n_in, bias, None)
    }

    /// As [`Planner::fused`] for a large linear layer: in FP8 with `fp8_acts` (Some: whether
    /// its inputs are quantised too, see [`Fp8::acts`]), else in the activation type.
    fn large(
        &mut self,
        keys: &[&Param],
        outs: &[usize],
        n_in: usize,
        bias: bool,
        fp8_acts: Option<bool>,
    ) -> Lin {
        let store = if fp8_acts.is_some() {
            Store::Fp8
        } else {
            Store::Act
        };
        let w = self.piece(
            store,
            keys.iter()
                .zip(outs)
                .map(|(k, &o)| (k.weight(), vec![o, n_in]))
                .collect(),
        );
        let fp8 = match (fp8_acts, self.pieces.last().and_then(|p| p.scales)) {
            (Some(acts), Some(scales)) => Some(Fp8 { scales, acts }),
            _ => None,
        };
        let b = bias.then(|| {
            self.piece(
                Store::F32,
                keys.iter()
                    .zip(outs)
                    .map(|(k, &o)| (k.bias(), vec![o]))
                    .collect(),
            )
        });
        Lin {
            w,
            b,
            n_out: outs.iter().sum(),
            n_in,
            fp8,
        }
    }

    fn linear(&mut self, key: &Param, n_out: usize, n_in: usize, bias: bool) -> Lin {
        self.fused(&[key], &[n_out], n_in, bias)
    }

    fn norm(&mut self, key: &keys::Norm, width: usize, adaptive: bool) -> NormW {
        if adaptive {
            NormW::Adaptive(self.linear(&key.dense(), 3 * width, width, true))
        } else {
            NormW::Plain(self.piece(Store::OnePlus, vec![(key.weight(), vec![width])]))
        }
    }

    /// A Gemma's layers; `fp8`: its projections and MLP in FP8 (Some), and whether they
    /// quantise their inputs.
    #[allow(clippy::too_many_arguments)]
    fn gemma(
        &mut self,
        cfg: &Config,
        root: &str,
        width: usize,
        mlp: usize,
        adaptive: bool,
        final_norm: bool,
        fp8: Option<bool>,
    ) -> GemmaW {
        let (nh, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let layers = (0..cfg.vlm_depth)
            .map(|i| {
                let l = keys::gemma::layer(root, i);
                GemmaLayerW {
                    norm1: self.norm(&l.input_layernorm, width, adaptive),
                    qkv: self.large(
                        &[&l.q, &l.k, &l.v],
                        &[nh * hd, kv * hd, kv * hd],
                        width,
                        false,
                        fp8,
                    ),
                    o: self.large(&[&l.o], &[width], nh * hd, false, fp8),
                    norm2: self.norm(&l.post_attention_layernorm, width, adaptive),
                    gu: self.large(&[&l.gate, &l.up], &[mlp, mlp], width, false, fp8),
                    down: self.large(&[&l.down], &[width], mlp, false, fp8),
                }
            })
            .collect();
        let final_norm =
            final_norm.then(|| self.norm(&keys::gemma::final_norm(root), width, adaptive));
        GemmaW { layers, final_norm }
    }
}

impl Planner {
    /// The vision tower and the projector.
    pub(crate) fn vision(&mut self, cfg: &Config) -> VisionW {
        let p = self;
        let (vw, ps) = (cfg.vision_width, cfg.patch_size);
        let q = p.fp8.vision.then_some(true);
        let patch = keys::siglip::patch();
        let patch_w = p.piece(Store::Act, vec![(patch.weight(), vec![vw, 3, ps, ps])]);
        let patch_b = p.vector(patch.bias(), vw);
        let pos = p.piece(
            Store::F32,
            vec![(keys::siglip::position(), vec![cfg.tokens_per_image(), vw])],
        );
        let layers = (0..cfg.vision_depth)
            .map(|i| {
                let l = keys::siglip::layer(i);
                VisionLayerW {
                    ln1_w: p.vector(l.layer_norm1.weight(), vw),
                    ln1_b: p.vector(l.layer_norm1.bias(), vw),
                    qkv: p.large(&[&l.q, &l.k, &l.v], &[vw, vw, vw], vw, true, q),
                    out: p.large(&[&l.out], &[vw], vw, true, q),
                    ln2_w: p.vector(l.layer_norm2.weight(), vw),
                    ln2_b: p.vector(l.layer_norm2.bias(), vw),
                    fc1: p.large(&[&l.fc1], &[cfg.vision_mlp_dim], vw, true, q),
                    fc2: p.large(&[&l.fc2], &[vw], cfg.vision_mlp_dim, true, q),
                }
            })
            .collect();
        let post = keys::siglip::post_layernorm();
        let post_w = p.vector(post.weight(), vw);
        let post_b = p.vector(post.bias(), vw);
        let proj = p.large(&[&Param(PROJECTOR.into())], &[cfg.vlm_width], vw, true, q);
        VisionW {
            patch: Lin {
                w: patch_w,
                b: Some(patch_b),
                n_out: vw,
                n_in: 3 * ps * ps,
                fp8: None,
            },
            pos,
            layers,
            post_w,
            post_b,
            proj,
        }
    }

    /// The token embedding table and Gemma 2B.
    pub(crate) fn prefix(&mut self, cfg: &Config) -> PrefixW {
        let embed = self.piece(
            Store::Act,
            vec![(EMBED.to_string(), vec![cfg.vocab_size, cfg.vlm_width])],
        );
        let q = self.fp8.prefix.then_some(true);
        let gemma = self.gemma(cfg, VLM, cfg.vlm_width, cfg.vlm_mlp_dim, false, false, q);
        PrefixW { embed, gemma }
    }

    /// The action expert and the action and time heads.
    pub(crate) fn denoise(&mut self, cfg: &Config) -> DenoiseW {
        let p = self;
        let expert = p.gemma(
            cfg,
            EXPERT,
            cfg.expert_width,
            cfg.expert_mlp_dim,
            cfg.pi05,
            true,
            p.fp8.expert.then_some(false),
        );
        let (ew, ad) = (cfg.expert_width, cfg.action_dim);
        use keys::heads;
        let action_in = p.linear(&heads::action_in(), ew, ad, true);
        let action_out = p.linear(&heads::action_out(), ad, ew, true);
        let heads = if cfg.pi05 {
            HeadsW::Pi05 {
                time_in: p.linear(&heads::time_in(), ew, ew, true),
                time_out: p.linear(&heads::time_out(), ew, ew, true),
            }
        } else {
            HeadsW::Pi0 {
                state: p.linear(&heads::state(), ew, ad, true),
                time_in: p.linear(&heads::action_time_in(), ew, 2 * ew, true),
                time_out: p.linear(&heads::action_time_out(), ew, ew, true),
            }
        };
        DenoiseW {
            expert,
            action_in,
            action_out,
            heads,
        }
    }
}

/// The layout of `plan`'s weights in `arena`, the pieces to fill and the bytes used.
fn lay_out<W>(
    (act, fp8): (DType, crate::fp8::Stages),
    arena: Arena,
    plan: impl Fn(&mut Planner) -> W,
) -> (W, Vec<Piece>, usize) {
    let mut p = Planner {
        arena,
        act,
        fp8,
        pieces: Vec::new(),
    };
    let w = plan(&mut p);
    let used = p.arena.used();
    (w, p.pieces, used)
}

/// A stage's weights on the device, laid out but not yet filled.
pub(crate) struct DeviceWeights<W> {
    pub w: W,
    pieces: Vec<Piece>,
    _buf: super::device::DeviceBuffer,
}

impl<W> DeviceWeights<W> {
    /// One allocation for the weights `plan` lays out (in the activation type `act`; the
    /// large linear layers in FP8 with `fp8`).
    pub(crate) fn allocate(
        dev: &Device,
        (act, fp8): (DType, crate::fp8::Stages),
        plan: impl Fn(&mut Planner) -> W,
    ) -> Result<DeviceWeights<W>> {
        let (_, _, bytes) = lay_out((act, fp8), Arena::sizing(), &plan);
        let (free, _) = dev.memory()?;
        if bytes > free {
            return Err(Error::Cuda(format!(
                "the weights need {:.2} GiB of device memory, {:.2} GiB are free",
                bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let buf = super::device::DeviceBuffer::alloc(dev, DType::U8, bytes.max(1))?;
        let (w, pieces, used) = lay_out((act, fp8), Arena::at(buf.view().ptr), &plan);
        debug_assert_eq!(used, bytes);
        Ok(DeviceWeights {
            w,
            pieces,
            _buf: buf,
        })
    }

    /// Total bytes of the weights on the device.
    pub(crate) fn bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| p.view.bytes() + p.scales.map_or(0, |s| s.bytes()))
            .sum()
    }

    /// Fills every piece from `ckpt` through `ld` (which reports progress).
    pub(crate) fn fill_from(&self, ckpt: &Checkpoint, ld: &mut Loader, lane: &Lane) -> Result<()> {
        for piece in &self.pieces {
            let mut off = 0;
            for (key, shape) in &piece.sources {
                let values = ld.tensor(ckpt, key, shape)?;
                let dst = piece.view.at(off, values.len())?;
                off += values.len();
                if let (Store::Fp8, Some(scales)) = (piece.store, piece.scales) {
                    let width = shape.iter().skip(1).product::<usize>();
                    let (codes, s) = quantise_parallel(&values, width);
                    let row = (off - values.len()) / width.max(1);
                    lane.upload_now(&codes, dst)?;
                    lane.upload_now(&s, scales.at(row, s.len())?)?;
                    continue;
                }
                match (piece.store, dst.dtype) {
                    (Store::Act, DType::Bf16) => {
                        let bits: Vec<u16> = values
                            .par_iter()
                            .with_min_len(1 << 16)
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        lane.upload_now(&bits, dst)?;
                    }
                    (Store::OnePlus, _) => {
                        let w: Vec<f32> = values.iter().map(|w| 1.0 + w).collect();
                        lane.upload_now(&w, dst)?;
                    }
                    _ => lane.upload_now(&values, dst)?,
                }
            }
        }
        lane.synchronize()
    }

    /// Fills every piece with uniform values of the scale `random::write_random_checkpoint`
    /// uses (other values: the generator differs), on the device. Each tensor's values
    /// depend only on `seed` and its key, whichever stage or layout holds it.
    /// FP8 layers are filled in the activation type first, then quantised on the device.
    pub(crate) fn fill_random(
        &self,
        (dev, k): (&Device, &Kernels),
        lane: &Lane,
        seed: u64,
    ) -> Result<()> {
        // The activation-type values of FP8 layers, alive until the stream has passed.
        let mut staging: Vec<DeviceBuffer> = Vec::new();
        for piece in &self.pieces {
            let mut off = 0;
            for (key, shape) in &piece.sources {
                let n: usize = shape.iter().product();
                let dst = piece.view.at(off, n)?;
                off += n;
                let (mut centre, bound) = crate::random::init_range(key, shape);
                if piece.store == Store::OnePlus {
                    centre += 1.0;
                }
                let s = seed ^ key_hash(key);
                let (lo, hi) = (centre - bound, centre + bound);
                let (Store::Fp8, Some(scales)) = (piece.store, piece.scales) else {
                    fill_uniform(k, lane, dst, s, lo, hi)?;
                    continue;
                };
                let width = shape.iter().skip(1).product::<usize>();
                let rows = n / width.max(1);
                let values = DeviceBuffer::alloc(dev, k.act, n)?;
                fill_uniform(k, lane, values.view(), s, lo, hi)?;
                let row = (off - n) / width.max(1);
                let scales = scales.at(row, rows)?;
                super::fp8::quantise_e4m3(
                    k,
                    lane,
                    values.view(),
                    width,
                    dst,
                    width,
                    scales,
                    rows,
                    width,
                )?;
                staging.push(values);
            }
        }
        let done = lane.synchronize();
        drop(staging);
        done
    }
}

/// [`crate::fp8::quantise_rows`] over blocks of rows on every core: the same codes and
/// scales, so that loading a full-size checkpoint in FP8 stays within seconds.
fn quantise_parallel(values: &[f32], width: usize) -> (Vec<u8>, Vec<f32>) {
    if width == 0 {
        return (Vec::new(), Vec::new());
    }
    let rows_per_block = (1usize << 16).div_ceil(width).max(1);
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(rows_per_block * width)
        .map(|block| crate::fp8::quantise_rows(block, width))
        .collect();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / width);
    for (c, s) in parts {
        codes.extend_from_slice(&c);
        scales.extend_from_slice(&s);
    }
    (codes, scales)
}

/// FNV-1a of a tensor key (stable across builds), to seed its random values.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fills `dst` (act or f32) with uniform values in [lo, hi).
pub fn fill_uniform(
    k: &Kernels,
    lane: &Lane,
    dst: View,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<()> {
    let (act, f32v) = match dst.dtype {
        DType::F32 => (None, Some(dst)),
        d if d == k.act => (Some(dst), None),
        other => return Err(Error::Cuda(format!("internal: random fill of {other:?}"))),
    };
    let args = Args::new()
        .opt(act)
        .opt(f32v)
        .i64(dst.len as i64)
        .u64(seed)
        .f32(lo)
        .f32(hi);
    launch(
        &k.fill_uniform,
        lane,
        "fill_uniform",
        blocks_for(dst.len, 256),
        256,
        args,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_every_tensor_once_and_is_aligned() {
        for cfg in [Config::pi0_small(), Config::pi05_small()] {
            use crate::fp8::Stages;
            let expert = Stages {
                expert: true,
                ..Stages::NONE
            };
            for (act, fp8) in [
                (DType::F32, Stages::NONE),
                (DType::Bf16, Stages::NONE),
                (DType::Bf16, Stages::ALL),
                (DType::Bf16, expert),
            ] {
                let mut pieces = Vec::new();
                let mut bytes = 0;
                let mut arena = Arena::sizing();
                for stage in 0..3 {
                    let (_, p, used) = lay_out((act, fp8), arena, |pl: &mut Planner| match stage {
                        0 => drop(pl.vision(&cfg)),
                        1 => drop(pl.prefix(&cfg)),
                        _ => drop(pl.denoise(&cfg)),
                    });
                    // Stages lie in separate allocations: lay them end to end here.
                    bytes += used.div_ceil(256) * 256;
                    arena = Arena::at(bytes as u64);
                    pieces.extend(p);
                }
                let mut keys: Vec<&str> = pieces
                    .iter()
                    .flat_map(|p| p.sources.iter().map(|(k, _)| k.as_str()))
                    .collect();
                let n = keys.len();
                keys.sort_unstable();
                keys.dedup();
                assert_eq!(keys.len(), n, "a tensor is loaded twice");
                let want: Vec<String> = crate::checkpoint::tensor_specs(&cfg)
                    .into_iter()
                    .filter(|s| !s.optional)
                    .map(|s| s.key)
                    .collect();
                assert_eq!(n, want.len());
                for k in &want {
                    assert!(keys.binary_search(&k.as_str()).is_ok(), "{k} not loaded");
                }
                let mut end = 0u64;
                for p in &pieces {
                    for v in std::iter::once(p.view).chain(p.scales) {
                        assert_eq!(v.ptr % 256, 0);
                        assert!(v.ptr >= end, "pieces overlap");
                        end = v.ptr + v.bytes() as u64;
                    }
                }
                assert!(end as usize <= bytes);
                // In FP8: the projections and MLPs of SigLIP and both Gemmas and the
                // projector, as codes with a scale per row; nothing else.
                let quantised: Vec<&Piece> =
                    pieces.iter().filter(|p| p.store == Store::Fp8).collect();
                let tensors: usize = quantised.iter().map(|p| p.sources.len()).sum();
                let want = usize::from(fp8.vision) * (cfg.vision_depth * 6 + 1)
                    + usize::from(fp8.prefix) * cfg.vlm_depth * 7
                    + usize::from(fp8.expert) * cfg.vlm_depth * 7;
                assert_eq!(tensors, want, "FP8 tensors ({fp8:?})");
                for p in &quantised {
                    assert_eq!(p.view.dtype, DType::U8);
                    let rows: usize = p.sources.iter().map(|(_, s)| s[0]).sum();
                    let scales = p.scales.expect("an FP8 piece has scales");
                    assert_eq!((scales.dtype, scales.len), (DType::F32, rows));
                    for (key, shape) in &p.sources {
                        assert!(
                            key.ends_with("weight") && shape.len() == 2,
                            "{key} {shape:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn parallel_quantisation_gives_the_serial_codes_and_scales() {
        let width = 1000;
        let values: Vec<f32> = (0..300 * width)
            .map(|i| ((i as f32) * 0.618).sin() * (1.0 + (i / width) as f32))
            .collect();
        let (codes, scales) = quantise_parallel(&values, width);
        let (want_codes, want_scales) = crate::fp8::quantise_rows(&values, width);
        assert_eq!(codes, want_codes);
        assert_eq!(scales.len(), 300);
        for (a, b) in scales.iter().zip(&want_scales) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert_eq!(quantise_parallel(&[], 0), (vec![], vec![]));
    }

    #[test]
    fn random_scale_follows_the_checkpoint_writer() {
        assert_eq!(
            crate::random::init_range("a.layer_norm1.weight", &[8]),
            (1.0, 0.1)
        );
        assert_eq!(
            crate::random::init_range("x.input_layernorm.weight", &[8]),
            (0.0, 0.1)
        );
        assert_eq!(crate::random::init_range("q_proj.bias", &[8]), (0.0, 0.1));
        let (c, b) = crate::random::init_range("q_proj.weight", &[8, 12]);
        assert_eq!(c, 0.0);
        assert!((b - 0.5).abs() < 1e-6);
    }
}

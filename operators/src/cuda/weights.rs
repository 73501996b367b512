//! The device copy of the policy's weights: one allocation laid out from the config, filled
//! either from a checkpoint (through [`crate::weights::Loader`], converted on the host) or
//! with random values generated on the device (benchmarks: no checkpoint to write or read).
//!
//! GEMM weights are stored in the activation type (f32 or bf16); biases, norm weights and the
//! position embedding stay f32. Projections that read the same input are fused into one
//! matrix (SigLIP q|k|v, Gemma q|k|v and gate|up), and Gemma's RMSNorm weights are stored as
//! 1 + w, which is what the CPU multiplies by.

use rayon::prelude::*;

use super::compile::Kernels;
use super::device::{blocks_for, launch, Args, DType, Device, Lane, View};
use crate::checkpoint::{Checkpoint, EMBED, EXPERT, PROJECTOR, VISION, VLM};
use crate::config::Config;
use crate::weights::Loader;
use crate::{Error, Result};

pub(crate) const SOURCE: &str = r#"
// Uniform values in [lo, hi) from a counter hash (splitmix64) of (seed, i); one of the two
// outputs is not null.
extern "C" __global__ void fill_uniform(act_t* out_act, float* out_f32, long long n,
                                        unsigned long long seed, float lo, float hi) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    float v = lo + (hi - lo) * u;
    if (out_act != 0) tp_store(out_act, i, v);
    if (out_f32 != 0) out_f32[i] = v;
  }
}
"#;

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
}

/// One region of the weight buffer and the checkpoint tensors stacked into it (rows of the
/// first, then of the next...).
struct Piece {
    view: View,
    store: Store,
    sources: Vec<(String, Vec<usize>)>,
}

/// A Linear: weight [n_out, n_in] (act), optional f32 bias [n_out].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lin {
    pub w: View,
    pub b: Option<View>,
    pub n_out: usize,
    pub n_in: usize,
}

impl Lin {
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

pub(crate) struct Weights {
    pub vision: VisionW,
    pub embed: View,
    pub prefix: GemmaW,
    pub expert: GemmaW,
    pub action_in: Lin,
    pub action_out: Lin,
    pub heads: HeadsW,
}

struct Planner {
    arena: Arena,
    act: DType,
    pieces: Vec<Piece>,
}

impl Planner {
    fn piece(&mut self, store: Store, sources: Vec<(String, Vec<usize>)>) -> View {
        let len = sources
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let dtype = if store == Store::Act {
            self.act
        } else {
            DType::F32
        };
        let view = self.arena.take(dtype, len);
        self.pieces.push(Piece {
            view,
            store,
            sources,
        });
        view
    }

    fn vector(&mut self, key: String, n: usize) -> View {
        self.piece(Store::F32, vec![(key, vec![n])])
    }

    /// Linears `keys[i]` ([outs[i], n_in] each) stacked into one [sum(outs), n_in].
    fn fused(&mut self, keys: &[String], outs: &[usize], n_in: usize, bias: bool) -> Lin {
        let w = self.piece(
            Store::Act,
            keys.iter()
                .zip(outs)
                .map(|(k, &o)| (format!("{k}.weight"), vec![o, n_in]))
                .collect(),
        );
        let b = bias.then(|| {
            self.piece(
                Store::F32,
                keys.iter()
                    .zip(outs)
                    .map(|(k, &o)| (format!("{k}.bias"), vec![o]))
                    .collect(),
            )
        });
        Lin {
            w,
            b,
            n_out: outs.iter().sum(),
            n_in,
        }
    }

    fn linear(&mut self, key: &str, n_out: usize, n_in: usize, bias: bool) -> Lin {
        self.fused(&[key.to_string()], &[n_out], n_in, bias)
    }

    fn norm(&mut self, key: &str, width: usize, adaptive: bool) -> NormW {
        if adaptive {
            NormW::Adaptive(self.linear(&format!("{key}.dense"), 3 * width, width, true))
        } else {
            NormW::Plain(self.piece(Store::OnePlus, vec![(format!("{key}.weight"), vec![width])]))
        }
    }

    fn gemma(
        &mut self,
        cfg: &Config,
        root: &str,
        width: usize,
        mlp: usize,
        adaptive: bool,
        final_norm: bool,
    ) -> GemmaW {
        let (nh, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let layers = (0..cfg.vlm_depth)
            .map(|i| {
                let l = format!("{root}.layers.{i}");
                let a = format!("{l}.self_attn");
                GemmaLayerW {
                    norm1: self.norm(&format!("{l}.input_layernorm"), width, adaptive),
                    qkv: self.fused(
                        &[
                            format!("{a}.q_proj"),
                            format!("{a}.k_proj"),
                            format!("{a}.v_proj"),
                        ],
                        &[nh * hd, kv * hd, kv * hd],
                        width,
                        false,
                    ),
                    o: self.linear(&format!("{a}.o_proj"), width, nh * hd, false),
                    norm2: self.norm(&format!("{l}.post_attention_layernorm"), width, adaptive),
                    gu: self.fused(
                        &[format!("{l}.mlp.gate_proj"), format!("{l}.mlp.up_proj")],
                        &[mlp, mlp],
                        width,
                        false,
                    ),
                    down: self.linear(&format!("{l}.mlp.down_proj"), width, mlp, false),
                }
            })
            .collect();
        let final_norm = final_norm.then(|| self.norm(&format!("{root}.norm"), width, adaptive));
        GemmaW { layers, final_norm }
    }
}

/// The layout of every weight of `cfg` in `arena`, and the pieces to fill.
fn plan(cfg: &Config, act: DType, arena: Arena) -> (Weights, Vec<Piece>, usize) {
    let mut p = Planner {
        arena,
        act,
        pieces: Vec::new(),
    };
    let (vw, ps) = (cfg.vision_width, cfg.patch_size);
    let v = VISION;
    let patch_w = p.piece(
        Store::Act,
        vec![(
            format!("{v}.embeddings.patch_embedding.weight"),
            vec![vw, 3, ps, ps],
        )],
    );
    let patch_b = p.vector(format!("{v}.embeddings.patch_embedding.bias"), vw);
    let pos = p.piece(
        Store::F32,
        vec![(
            format!("{v}.embeddings.position_embedding.weight"),
            vec![cfg.tokens_per_image(), vw],
        )],
    );
    let layers = (0..cfg.vision_depth)
        .map(|i| {
            let l = format!("{v}.encoder.layers.{i}");
            let a = format!("{l}.self_attn");
            VisionLayerW {
                ln1_w: p.vector(format!("{l}.layer_norm1.weight"), vw),
                ln1_b: p.vector(format!("{l}.layer_norm1.bias"), vw),
                qkv: p.fused(
                    &[
                        format!("{a}.q_proj"),
                        format!("{a}.k_proj"),
                        format!("{a}.v_proj"),
                    ],
                    &[vw, vw, vw],
                    vw,
                    true,
                ),
                out: p.linear(&format!("{a}.out_proj"), vw, vw, true),
                ln2_w: p.vector(format!("{l}.layer_norm2.weight"), vw),
                ln2_b: p.vector(format!("{l}.layer_norm2.bias"), vw),
                fc1: p.linear(&format!("{l}.mlp.fc1"), cfg.vision_mlp_dim, vw, true),
                fc2: p.linear(&format!("{l}.mlp.fc2"), vw, cfg.vision_mlp_dim, true),
            }
        })
        .collect();
    let post_w = p.vector(format!("{v}.post_layernorm.weight"), vw);
    let post_b = p.vector(format!("{v}.post_layernorm.bias"), vw);
    let proj = p.linear(PROJECTOR, cfg.vlm_width, vw, true);
    let vision = VisionW {
        patch: Lin {
            w: patch_w,
            b: Some(patch_b),
            n_out: vw,
            n_in: 3 * ps * ps,
        },
        pos,
        layers,
        post_w,
        post_b,
        proj,
    };
    let embed = p.piece(
        Store::Act,
        vec![(EMBED.to_string(), vec![cfg.vocab_size, cfg.vlm_width])],
    );
    let prefix = p.gemma(cfg, VLM, cfg.vlm_width, cfg.vlm_mlp_dim, false, false);
    let expert = p.gemma(
        cfg,
        EXPERT,
        cfg.expert_width,
        cfg.expert_mlp_dim,
        cfg.pi05,
        true,
    );
    let (ew, ad) = (cfg.expert_width, cfg.action_dim);
    let action_in = p.linear("action_in_proj", ew, ad, true);
    let action_out = p.linear("action_out_proj", ad, ew, true);
    let heads = if cfg.pi05 {
        HeadsW::Pi05 {
            time_in: p.linear("time_mlp_in", ew, ew, true),
            time_out: p.linear("time_mlp_out", ew, ew, true),
        }
    } else {
        HeadsW::Pi0 {
            state: p.linear("state_proj", ew, ad, true),
            time_in: p.linear("action_time_mlp_in", ew, 2 * ew, true),
            time_out: p.linear("action_time_mlp_out", ew, ew, true),
        }
    };
    let used = p.arena.used();
    (
        Weights {
            vision,
            embed,
            prefix,
            expert,
            action_in,
            action_out,
            heads,
        },
        p.pieces,
        used,
    )
}

/// The weights on the device, laid out but not yet filled.
pub(crate) struct DeviceWeights {
    pub w: Weights,
    pieces: Vec<Piece>,
    _buf: super::device::DeviceBuffer,
}

impl DeviceWeights {
    pub(crate) fn allocate(dev: &Device, cfg: &Config, act: DType) -> Result<DeviceWeights> {
        let (_, _, bytes) = plan(cfg, act, Arena::sizing());
        let (free, _) = dev.memory()?;
        if bytes > free {
            return Err(Error::Cuda(format!(
                "the weights need {:.2} GiB of device memory, {:.2} GiB are free",
                bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let buf = super::device::DeviceBuffer::alloc(dev, DType::U8, bytes)?;
        let (w, pieces, used) = plan(cfg, act, Arena::at(buf.view().ptr));
        debug_assert_eq!(used, bytes);
        Ok(DeviceWeights {
            w,
            pieces,
            _buf: buf,
        })
    }

    /// Total bytes of the weights on the device.
    pub(crate) fn bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.view.bytes()).sum()
    }

    /// Fills every piece from `ckpt`; `progress(bytes_read, bytes_total)` as the CPU loader.
    pub(crate) fn fill_from(
        &self,
        ckpt: &Checkpoint,
        lane: &Lane,
        progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        let mut ld = Loader::new(ckpt, progress);
        for piece in &self.pieces {
            let mut off = 0;
            for (key, shape) in &piece.sources {
                let values = ld.tensor(ckpt, key, shape)?;
                let dst = piece.view.at(off, values.len())?;
                off += values.len();
                match (piece.store, dst.dtype) {
                    (Store::Act, DType::Bf16) => {
                        let bits: Vec<u16> = values
                            .par_iter()
                            .with_min_len(1 << 16)
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        upload_sync(lane, &bits, dst)?;
                    }
                    (Store::OnePlus, _) => {
                        let w: Vec<f32> = values.iter().map(|w| 1.0 + w).collect();
                        upload_sync(lane, &w, dst)?;
                    }
                    _ => upload_sync(lane, &values, dst)?,
                }
            }
        }
        lane.synchronize()
    }

    /// Fills every piece with uniform values of the scale `random::write_random_checkpoint`
    /// uses (other values: the generator differs), on the device.
    pub(crate) fn fill_random(&self, k: &Kernels, lane: &Lane, seed: u64) -> Result<()> {
        for (pi, piece) in self.pieces.iter().enumerate() {
            let mut off = 0;
            for (si, (key, shape)) in piece.sources.iter().enumerate() {
                let n: usize = shape.iter().product();
                let dst = piece.view.at(off, n)?;
                off += n;
                let (mut centre, bound) = crate::random::init_range(key, shape);
                if piece.store == Store::OnePlus {
                    centre += 1.0;
                }
                let s = seed ^ ((pi as u64) << 24) ^ ((si as u64) << 8);
                fill_uniform(k, lane, dst, s, centre - bound, centre + bound)?;
            }
        }
        lane.synchronize()
    }
}

/// Host-to-device copy that has completed when it returns (load time only).
fn upload_sync<T: Copy>(lane: &Lane, src: &[T], dst: View) -> Result<()> {
    let bytes = std::mem::size_of_val(src);
    if bytes != dst.bytes() {
        return Err(Error::Cuda(format!(
            "internal: weight upload of {bytes} bytes into {} bytes",
            dst.bytes()
        )));
    }
    // SAFETY: `dst` is exactly `bytes` long inside the weight buffer; the lane is
    // synchronised right after, before `src` is dropped, so the (possibly staged) pageable
    // copy has completed.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, src, lane.stream.cu_stream()) }
        .map_err(|e| Error::Cuda(format!("uploading weights: {e}")))?;
    lane.synchronize()
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
            for act in [DType::F32, DType::Bf16] {
                let (_, pieces, bytes) = plan(&cfg, act, Arena::sizing());
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
                    assert_eq!(p.view.ptr % 256, 0);
                    assert!(p.view.ptr >= end, "pieces overlap");
                    end = p.view.ptr + p.view.bytes() as u64;
                }
                assert!(end as usize <= bytes);
            }
        }
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

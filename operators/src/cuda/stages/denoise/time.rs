//! What a denoise loop reads that depends only on its step grid, computed once per step
//! count with the kernels the loop itself would use: pi0's time half of the action-time MLP
//! (W_t · temb + b) and pi0.5's (scale, shift, gate) of every adaptive norm. CPU twin: the
//! same terms computed per step in [`crate::policy::Denoiser`].

use crate::cuda::activation::{add_bias, bias_act, cast, Act, Out};
use crate::cuda::device::{DType, DeviceBuffer, Lane, View};
use crate::cuda::gemm::{Mat, Op};
use crate::cuda::weights::{DenoiseW, GemmaW, HeadsW, Lin, NormW};
use crate::policy::time_embedding;
use crate::{Error, Result};

use super::super::{lin, Engine};

/// Per step count: what depends only on the time (pi0: W_t · temb + b of the action-time
/// MLP; pi0.5: the (scale, shift, gate) of every adaptive norm), precomputed once with the
/// same kernels the loop would use.
pub(super) struct TimeTable {
    steps: usize,
    /// pi0: f32 [steps, ew].
    pub(super) tb: Option<View>,
    /// pi0.5: f32 [norms][steps][3 ew].
    mods: Option<View>,
    _bufs: Vec<DeviceBuffer>,
}

impl TimeTable {
    pub(super) fn modulation(&self, norm: usize, step: usize, ew: usize) -> Result<View> {
        self.mods
            .ok_or_else(|| Error::Cuda("internal: adaptive norm without modulations".into()))?
            .at((norm * self.steps + step) * 3 * ew, 3 * ew)
    }

    /// The table of `steps` steps for the denoise weights `w` (expert width `ew`), computed
    /// on `l`; returns once the device has finished with the host's time embeddings.
    pub(super) fn build(
        e: &Engine,
        l: &Lane,
        w: &DenoiseW,
        ew: usize,
        steps: usize,
    ) -> Result<TimeTable> {
        let (k, g) = (&e.kernels, &e.gemm);
        let act = e.act();
        // The same t sequence as the sampler: t = 1, t += dt in f32.
        let dt = (-1.0f64 / steps as f64) as f32;
        let mut temb = Vec::with_capacity(steps * ew);
        let mut t = 1.0f32;
        for _ in 0..steps {
            temb.extend(time_embedding(t, ew));
            t += dt;
        }
        let n = steps * ew;
        let temb_f = DeviceBuffer::alloc(&e.dev, DType::F32, n)?;
        let temb_a = DeviceBuffer::alloc(&e.dev, act, n)?;
        l.upload(&temb, temb_f.view())?;
        cast(k, l, temb_f.view(), temb_a.view(), n)?;
        let mut bufs = Vec::new();
        let (mut tb, mut mods) = (None, None);
        match &w.heads {
            HeadsW::Pi0 { time_in, .. } => {
                let out = DeviceBuffer::alloc(&e.dev, DType::F32, n)?;
                let w_t = Mat {
                    view: time_in.w.tail(ew)?,
                    rows: ew,
                    cols: ew,
                    ld: 2 * ew,
                    stride: 0,
                    fp8: None,
                };
                g.matmul(
                    l,
                    Mat::new(temb_a.view(), steps, ew),
                    w_t,
                    Op::Wt,
                    Mat::new(out.view(), steps, ew),
                    1.0,
                    0.0,
                    1,
                )?;
                add_bias(k, l, out.view(), ew, time_in.bias()?, steps, ew)?;
                tb = Some(out.view());
                bufs.push(out);
            }
            HeadsW::Pi05 { time_in, time_out } => {
                let c_f = DeviceBuffer::alloc(&e.dev, DType::F32, n)?;
                let c_a = DeviceBuffer::alloc(&e.dev, act, n)?;
                let (cf, ca) = (c_f.view(), c_a.view());
                let silu_to_act = Out {
                    f32: None,
                    act: Some(ca),
                    ld: ew,
                };
                e.linear(
                    l,
                    Mat::new(temb_a.view(), steps, ew),
                    lin(time_in),
                    Mat::new(cf, steps, ew),
                    0.0,
                )?;
                bias_act(k, l, cf, ew, time_in.b, Act::Silu, silu_to_act, steps, ew)?;
                e.linear(
                    l,
                    Mat::new(ca, steps, ew),
                    lin(time_out),
                    Mat::new(cf, steps, ew),
                    0.0,
                )?;
                bias_act(k, l, cf, ew, time_out.b, Act::Silu, silu_to_act, steps, ew)?;
                let norms = adaptive_norms(&w.expert)?;
                if norms.len() != 2 * w.expert.layers.len() + 1 {
                    return Err(Error::Cuda("internal: adaptive norm count".into()));
                }
                let m = DeviceBuffer::alloc(&e.dev, DType::F32, norms.len() * n * 3)?;
                for (i, dense) in norms.iter().enumerate() {
                    let dst = m.view().at(i * n * 3, n * 3)?;
                    e.linear(
                        l,
                        Mat::new(ca, steps, ew),
                        lin(dense),
                        Mat::new(dst, steps, 3 * ew),
                        0.0,
                    )?;
                    add_bias(k, l, dst, 3 * ew, dense.bias()?, steps, 3 * ew)?;
                }
                mods = Some(m.view());
                bufs.extend([c_f, c_a, m]);
            }
        }
        // `temb` (pageable host memory) must outlive its upload.
        l.synchronize()?;
        bufs.extend([temb_f, temb_a]);
        Ok(TimeTable {
            steps,
            tb,
            mods,
            _bufs: bufs,
        })
    }
}

/// The expert's adaptive norms in table order: per layer input then post-attention, then
/// the final norm.
fn adaptive_norms(expert: &GemmaW) -> Result<Vec<Lin>> {
    let dense = |n: &NormW| match n {
        NormW::Adaptive(l) => Ok(*l),
        NormW::Plain(_) => Err(Error::Cuda("internal: plain norm in pi0.5's expert".into())),
    };
    let mut out = Vec::with_capacity(2 * expert.layers.len() + 1);
    for l in &expert.layers {
        out.push(dense(&l.norm1)?);
        out.push(dense(&l.norm2)?);
    }
    let f = expert
        .final_norm
        .as_ref()
        .ok_or_else(|| Error::Cuda("internal: expert without its final norm".into()))?;
    out.push(dense(f)?);
    Ok(out)
}

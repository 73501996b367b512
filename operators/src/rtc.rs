//! Real-time chunking (RTC; Black, Galliker, Levine 2025, "Real-Time Execution of Action
//! Chunking Flow Policies") written in openpi's time convention: the soft mask over the
//! overlap with the previous chunk, the clipped guidance weight, and the guided velocity,
//! over any velocity field that gives its vector-Jacobian product ([`VelocityField`]).
//!
//! The model's field is `policy::velocity_vjp::DenoiserField` (CPU, exact VJP through the
//! action expert), used by `Runner::infer_guided`. The CUDA backend has no VJP: it guides
//! with the Jacobian term dropped ([`Jacobian::Dropped`], `g ≈ e`), one fused update per
//! step whose f32 CPU twin is [`guided_euler_update`]. docs/rtc.md says what is and is not
//! done.
//!
//! Convention. openpi samples from noise at `t = 1` to actions at `t = 0` with
//! `x += dt * v(x, t)`, `dt = -1/steps`, `v = noise - actions`. The paper integrates
//! `tau = 1 - t` from 0 (noise) to 1 with velocity `v_p = dA/dtau = -v`. Its one-step
//! estimate of the final chunk `A_hat = A + (1 - tau) v_p` is here `A_hat = x - t v(x, t)`,
//! and its guided velocity `v_p + c g` (with `g = (Y - A_hat)^T diag(W) dA_hat/dA`, the
//! ascent direction of `-1/2 |Y - A_hat|^2_W`) becomes `v - c g`, where
//! `g = e - t J^T e`, `e = W (Y - A_hat)` row by row, `J = dv/dx` (so `J^T e` is the VJP of
//! the field), and `c = min(beta, (1 - tau) / (tau r^2))`,
//! `r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)`, which in `t` is
//! `min(beta, (t^2 + (1 - t)^2) / (t (1 - t)))` (equal to beta at `t = 0` and `t = 1`,
//! where the unclipped weight is infinite).

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum RtcError {
    #[error(
        "RTC: the delay ({delay} actions) exceeds the overlap with the previous chunk ({overlap})"
    )]
    DelayPastOverlap { delay: usize, overlap: usize },
    #[error("RTC: the overlap ({overlap} actions) exceeds the horizon ({horizon})")]
    OverlapPastHorizon { overlap: usize, horizon: usize },
    #[error("RTC: the previous chunk's leftover holds {found} values, expected {overlap} actions of {dims} dims")]
    PrefixShape {
        found: usize,
        overlap: usize,
        dims: usize,
    },
    #[error("RTC: the previous chunk's leftover has a non-finite value at index {0}")]
    NonFinite(usize),
    #[error("RTC: beta={0} must be a positive finite number")]
    Beta(f64),
}

/// The error of a backend without RTC guidance (described as `backend`, e.g. "cuda bf16 on
/// NVIDIA H200"): "RTC guidance is not implemented on the CUDA backend yet".
pub fn not_implemented(backend: &str) -> crate::Error {
    let name = if backend.starts_with("cuda") {
        "CUDA".to_string()
    } else {
        format!("`{backend}`")
    };
    crate::Error::Input(format!(
        "RTC guidance is not implemented on the {name} backend yet ({backend}); the CPU backend has it"
    ))
}

/// The guidance for one chunk: the previous chunk's leftover actions, the inference delay and
/// the guidance weight's clip.
#[derive(Debug, Clone, PartialEq)]
pub struct Guide {
    /// The previous chunk's actions for the new chunk's first `overlap` steps, row-major
    /// `[overlap, dims]` (the action queue's leftover at the request).
    pub prefix: Vec<f32>,
    /// `d`: the first `delay` actions are executed from the previous chunk while the new one
    /// is computed (weight 1 in the mask).
    pub delay: usize,
    /// `beta`: the largest guidance weight.
    pub beta: f64,
}

/// The paper's soft mask over a chunk of `horizon` actions whose first `overlap` (`H - s`)
/// overlap the previous chunk: 1 for the first `delay` (`d`), then
/// `c_i (e^{c_i} - 1) / (e - 1)` with `c_i = (overlap - i) / (overlap - d + 1)` up to the end
/// of the overlap, 0 after.
pub fn soft_mask(horizon: usize, delay: usize, overlap: usize) -> Result<Vec<f64>, RtcError> {
    if overlap > horizon {
        return Err(RtcError::OverlapPastHorizon { overlap, horizon });
    }
    if delay > overlap {
        return Err(RtcError::DelayPastOverlap { delay, overlap });
    }
    let e = std::f64::consts::E;
    Ok((0..horizon)
        .map(|i| {
            if i < delay {
                1.0
            } else if i < overlap {
                let c = (overlap - i) as f64 / (overlap - delay + 1) as f64;
                c * (c.exp() - 1.0) / (e - 1.0)
            } else {
                0.0
            }
        })
        .collect())
}

/// The guidance weight at openpi time `t` (1 = noise, 0 = actions), clipped at `beta`.
pub fn guidance_weight(t: f64, beta: f64) -> f64 {
    if t <= 0.0 || t >= 1.0 {
        return beta;
    }
    ((t * t + (1.0 - t) * (1.0 - t)) / (t * (1.0 - t))).min(beta)
}

/// How the guidance direction `g = e - t J^T e` treats the Jacobian `J = dv/dx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jacobian {
    /// The exact vector-Jacobian product through the field (the paper's guidance).
    #[default]
    Exact,
    /// `J^T e` taken as 0 (`dA_hat/dx ≈ I`, so `g ≈ e`): no VJP, one velocity per step. What
    /// the CUDA backend computes; it keeps the pull toward the leftover but not the
    /// correction of how the velocity itself moves with `x`.
    Dropped,
}

impl Jacobian {
    pub fn describe(self) -> &'static str {
        match self {
            Jacobian::Exact => "exact vector-Jacobian product",
            Jacobian::Dropped => "Jacobian term dropped (g = W (Y - A_hat))",
        }
    }
}

/// openpi's time grid of `steps` Euler steps, in f64 as [`sample`] walks it: `t = 1`, then
/// `t += dt` with `dt = -1/steps`; the time at the start of each step.
pub fn step_times(steps: usize) -> Vec<f64> {
    let dt = -1.0 / steps as f64;
    let mut t = 1.0;
    (0..steps)
        .map(|_| {
            let now = t;
            t += dt;
            now
        })
        .collect()
}

/// One step of the guided sampler as a device runs it: the time and the clipped guidance
/// weight, from [`step_times`] and [`guidance_weight`] in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuidedStep {
    pub t: f64,
    pub c: f64,
}

/// The guided Euler update with the Jacobian dropped, in f32 with every operation rounded
/// on its own in this order (the CUDA kernel `euler_step_guided` does the same, after
/// forming `v = v_raw + bias[col]`): `a_hat = x - t v`; `e = w (y - a_hat)`;
/// `vg = v - c e`; `x += dt vg`. All slices `[horizon * dims]`.
pub fn guided_euler_update(
    x: &mut [f32],
    v: &[f32],
    weight: &[f32],
    target: &[f32],
    (t, c, dt): (f32, f32, f32),
) {
    for (i, x) in x.iter_mut().enumerate() {
        let a_hat = *x - t * v[i];
        let e = weight[i] * (target[i] - a_hat);
        let vg = v[i] - c * e;
        *x += dt * vg;
    }
}

/// A flow velocity field over a chunk, flattened `[horizon * dims]`, with its VJP.
pub trait VelocityField {
    /// `v(x, t)`.
    fn velocity(&mut self, x: &[f64], t: f64) -> Vec<f64>;
    /// `(dv/dx)^T cotangent` at `(x, t)`.
    fn vjp(&mut self, x: &[f64], t: f64, cotangent: &[f64]) -> Vec<f64>;
}

/// The checked guidance of a chunk: the mask per value and the target, both `[horizon *
/// dims]` (zero past the overlap).
pub struct Prepared {
    weight: Vec<f64>,
    target: Vec<f64>,
    beta: f64,
    jacobian: Jacobian,
}

impl Guide {
    /// Checks the guide against a chunk of `horizon` actions of `dims` dims.
    pub fn prepare(&self, horizon: usize, dims: usize) -> Result<Prepared, RtcError> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(RtcError::Beta(self.beta));
        }
        if dims == 0 || !self.prefix.len().is_multiple_of(dims) {
            return Err(RtcError::PrefixShape {
                found: self.prefix.len(),
                overlap: self.prefix.len() / dims.max(1),
                dims,
            });
        }
        let overlap = self.prefix.len() / dims;
        if let Some(i) = self.prefix.iter().position(|v| !v.is_finite()) {
            return Err(RtcError::NonFinite(i));
        }
        let mask = soft_mask(horizon, self.delay, overlap)?;
        let weight = mask
            .iter()
            .flat_map(|&w| std::iter::repeat_n(w, dims))
            .collect();
        let mut target: Vec<f64> = self.prefix.iter().map(|&v| f64::from(v)).collect();
        target.resize(horizon * dims, 0.0);
        Ok(Prepared {
            weight,
            target,
            beta: self.beta,
            jacobian: Jacobian::Exact,
        })
    }
}

impl Prepared {
    /// This guidance with the Jacobian treated as `jacobian` (exact unless set).
    pub fn with_jacobian(self, jacobian: Jacobian) -> Prepared {
        Prepared { jacobian, ..self }
    }

    pub fn jacobian(&self) -> Jacobian {
        self.jacobian
    }

    /// The mask per value, f32 `[horizon * dims]`, as a device reads it.
    pub fn weight_f32(&self) -> Vec<f32> {
        self.weight.iter().map(|&w| w as f32).collect()
    }

    /// The target (the leftover, zero past the overlap), f32 `[horizon * dims]`.
    pub fn target_f32(&self) -> Vec<f32> {
        self.target.iter().map(|&y| y as f32).collect()
    }

    /// Per step of a grid of `steps`: the time and the guidance weight.
    pub fn schedule(&self, steps: usize) -> Vec<GuidedStep> {
        step_times(steps)
            .into_iter()
            .map(|t| GuidedStep {
                t,
                c: guidance_weight(t, self.beta),
            })
            .collect()
    }

    /// `e = W (Y - A_hat)`, `A_hat = x - t v`.
    fn error(&self, x: &[f64], t: f64, v: &[f64]) -> Vec<f64> {
        (0..x.len())
            .map(|i| self.weight[i] * (self.target[i] - (x[i] - t * v[i])))
            .collect()
    }

    /// The guidance direction `g = e - t J^T e`, `e = W (Y - A_hat)`, `A_hat = x - t v`,
    /// given `v = v(x, t)`: minus the gradient in `x` of `1/2 sum W (Y - A_hat)^2`. With
    /// [`Jacobian::Dropped`], `g = e` (the field's VJP is not called).
    pub fn direction(
        &self,
        field: &mut dyn VelocityField,
        x: &[f64],
        t: f64,
        v: &[f64],
    ) -> Vec<f64> {
        let e = self.error(x, t, v);
        if self.jacobian == Jacobian::Dropped {
            return e;
        }
        let jt_e = field.vjp(x, t, &e);
        e.iter().zip(&jt_e).map(|(e, j)| e - t * j).collect()
    }

    /// The guided velocity `v - c g` at `(x, t)`.
    pub fn velocity(&self, field: &mut dyn VelocityField, x: &[f64], t: f64) -> Vec<f64> {
        let v = field.velocity(x, t);
        let g = self.direction(field, x, t, &v);
        let c = guidance_weight(t, self.beta);
        v.iter().zip(&g).map(|(v, g)| v - c * g).collect()
    }

    /// `1/2 sum W (Y - A_hat)^2` at `(x, t)` (the loss whose descent `g` is).
    pub fn loss(&self, field: &mut dyn VelocityField, x: &[f64], t: f64) -> f64 {
        let v = field.velocity(x, t);
        (0..x.len())
            .map(|i| {
                let r = self.target[i] - (x[i] - t * v[i]);
                0.5 * self.weight[i] * r * r
            })
            .sum()
    }
}

/// openpi's Euler sampler from `noise` (`t = 1`) in `steps` steps ([`step_times`]), guided
/// when `guide` is given (the velocity of every step is [`Prepared::velocity`], with the
/// guide's [`Jacobian`]).
pub fn sample(
    field: &mut dyn VelocityField,
    noise: &[f64],
    steps: usize,
    guide: Option<&Prepared>,
) -> Vec<f64> {
    let dt = -1.0 / steps as f64;
    let mut x = noise.to_vec();
    for t in step_times(steps) {
        let v = match guide {
            Some(g) => g.velocity(field, &x, t),
            None => field.velocity(&x, t),
        };
        for (x, v) in x.iter_mut().zip(&v) {
            *x += dt * v;
        }
    }
    x
}

/// A differentiable velocity field for tests (here and in the action queue's): not a model.
pub mod testing {
    use super::VelocityField;

    /// A test field with a dense, state- and time-dependent Jacobian: `v = A tanh(B x + t u)
    /// + C x`, its VJP written by hand.
    pub struct TanhField {
        n: usize,
        a: Vec<f64>,
        b: Vec<f64>,
        c: Vec<f64>,
        u: Vec<f64>,
    }

    impl TanhField {
        /// A field over `n` values with weights from `seed`.
        pub fn new(n: usize, seed: u64) -> Self {
            let mut s = seed;
            let mut r = move |scale: f64| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0 * scale
            };
            let k = 1.0 / (n as f64).sqrt();
            TanhField {
                n,
                a: (0..n * n).map(|_| r(k)).collect(),
                b: (0..n * n).map(|_| r(k)).collect(),
                c: (0..n * n).map(|_| r(0.3 * k)).collect(),
                u: (0..n).map(|_| r(1.0)).collect(),
            }
        }
        fn matvec(m: &[f64], x: &[f64], n: usize) -> Vec<f64> {
            (0..n)
                .map(|i| (0..n).map(|j| m[i * n + j] * x[j]).sum())
                .collect()
        }
        fn matvec_t(m: &[f64], x: &[f64], n: usize) -> Vec<f64> {
            (0..n)
                .map(|j| (0..n).map(|i| m[i * n + j] * x[i]).sum())
                .collect()
        }
        fn hidden(&self, x: &[f64], t: f64) -> Vec<f64> {
            Self::matvec(&self.b, x, self.n)
                .iter()
                .zip(&self.u)
                .map(|(z, u)| (z + t * u).tanh())
                .collect()
        }
    }

    impl VelocityField for TanhField {
        fn velocity(&mut self, x: &[f64], t: f64) -> Vec<f64> {
            let h = self.hidden(x, t);
            let ah = Self::matvec(&self.a, &h, self.n);
            let cx = Self::matvec(&self.c, x, self.n);
            ah.iter().zip(&cx).map(|(a, c)| a + c).collect()
        }
        fn vjp(&mut self, x: &[f64], t: f64, e: &[f64]) -> Vec<f64> {
            let h = self.hidden(x, t);
            let ate = Self::matvec_t(&self.a, e, self.n);
            let dz: Vec<f64> = ate.iter().zip(&h).map(|(g, h)| g * (1.0 - h * h)).collect();
            let bt = Self::matvec_t(&self.b, &dz, self.n);
            let ct = Self::matvec_t(&self.c, e, self.n);
            bt.iter().zip(&ct).map(|(b, c)| b + c).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TanhField;
    use super::*;

    #[test]
    fn backends_without_guidance_say_so() {
        let e = not_implemented("cuda bf16 on NVIDIA H200").to_string();
        assert!(
            e.starts_with("RTC guidance is not implemented on the CUDA backend yet"),
            "{e}"
        );
    }

    #[test]
    fn the_soft_mask_is_one_then_decays_then_zero() {
        let m = soft_mask(10, 3, 7).unwrap();
        assert_eq!(&m[..3], &[1.0; 3]);
        assert_eq!(&m[7..], &[0.0; 3]);
        for w in m[2..8].windows(2) {
            assert!(w[1] < w[0], "{m:?}");
        }
        // i = 3: c = 4/5.
        let c: f64 = 0.8;
        assert!((m[3] - c * (c.exp() - 1.0) / (std::f64::consts::E - 1.0)).abs() < 1e-15);
        assert_eq!(
            soft_mask(10, 8, 7),
            Err(RtcError::DelayPastOverlap {
                delay: 8,
                overlap: 7
            })
        );
        assert!(soft_mask(5, 1, 7).is_err());
    }

    #[test]
    fn the_guidance_weight_is_the_papers_clipped_at_beta() {
        for tau in [0.1, 0.3, 0.5, 0.8] {
            let r2 = (1.0 - tau) * (1.0f64 - tau) / (tau * tau + (1.0 - tau) * (1.0 - tau));
            let paper = ((1.0 - tau) / (tau * r2)).min(5.0);
            assert!(
                (guidance_weight(1.0 - tau, 5.0) - paper).abs() < 1e-12,
                "tau {tau}"
            );
        }
        assert_eq!(guidance_weight(1.0, 5.0), 5.0);
        assert_eq!(guidance_weight(0.5, 5.0), 2.0);
        assert_eq!(guidance_weight(0.5, 1.0), 1.0);
    }

    /// The guidance direction is minus the gradient of the masked loss: checked against
    /// central finite differences (f64, step 1e-6) to 1e-6 relative.
    #[test]
    fn the_guidance_direction_matches_finite_differences() {
        let (horizon, dims) = (6, 3);
        let n = horizon * dims;
        let mut field = TanhField::new(n, 7);
        let guide = Guide {
            prefix: (0..4 * dims).map(|i| (i as f32 * 0.37).sin()).collect(),
            delay: 2,
            beta: 5.0,
        }
        .prepare(horizon, dims)
        .unwrap();
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.71).cos()).collect();
        for t in [0.9, 0.5, 0.2] {
            let v = field.velocity(&x, t);
            let g = guide.direction(&mut field, &x, t, &v);
            let h = 1e-6;
            let mut worst: f64 = 0.0;
            let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            for i in 0..n {
                let mut xp = x.clone();
                xp[i] += h;
                let mut xm = x.clone();
                xm[i] -= h;
                let fd =
                    -(guide.loss(&mut field, &xp, t) - guide.loss(&mut field, &xm, t)) / (2.0 * h);
                worst = worst.max((fd - g[i]).abs() / norm);
            }
            assert!(norm > 0.1, "a direction worth checking: {norm}");
            assert!(worst < 1e-6, "t {t}: relative error {worst}");
        }
    }

    /// The f32 update a device runs (Jacobian dropped) against `Prepared`'s f64 update of
    /// the same step: equal within f32 rounding, step after step on the same state; and the
    /// schedule is `sample`'s grid with `c` clipped at beta at `t = 1`.
    #[test]
    fn the_f32_guided_update_matches_the_f64_one() {
        let (horizon, dims, steps) = (7, 3, 10);
        let n = horizon * dims;
        let mut field = TanhField::new(n, 5);
        let guide = Guide {
            prefix: (0..5 * dims).map(|i| (i as f32 * 0.53).cos()).collect(),
            delay: 2,
            beta: 5.0,
        }
        .prepare(horizon, dims)
        .unwrap()
        .with_jacobian(Jacobian::Dropped);
        let (w, y) = (guide.weight_f32(), guide.target_f32());
        assert_eq!(&w[..2 * dims], &[1.0; 6]);
        assert_eq!(&w[5 * dims..], &[0.0; 6]);
        assert_eq!(&y[5 * dims..], &[0.0; 6]);
        let schedule = guide.schedule(steps);
        assert_eq!(schedule.len(), steps);
        assert_eq!(schedule[0], GuidedStep { t: 1.0, c: 5.0 });
        assert!((schedule[5].t - 0.5).abs() < 1e-12 && (schedule[5].c - 2.0).abs() < 1e-9);
        let dt = -1.0 / steps as f64;
        let mut x: Vec<f64> = (0..n).map(|i| 2.0 * (i as f64 * 0.37).sin()).collect();
        let mut worst: f64 = 0.0;
        for step in &schedule {
            let v = field.velocity(&x, step.t);
            let vg = guide.velocity(&mut field, &x, step.t);
            let want: Vec<f64> = x.iter().zip(&vg).map(|(x, v)| x + dt * v).collect();
            let mut got: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let v32: Vec<f32> = v.iter().map(|&v| v as f32).collect();
            let consts = (step.t as f32, step.c as f32, dt as f32);
            guided_euler_update(&mut got, &v32, &w, &y, consts);
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((f64::from(*g) - w).abs() / (1.0 + w.abs()));
            }
            // The guidance moved x (the test is not of a no-op).
            assert!(want.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3));
            x = want;
        }
        assert!(worst < 1e-5, "f32 vs f64 update: {worst:e}");
    }

    /// Guided sampling pulls the first `d` actions onto the previous chunk's leftover: their
    /// error is a small fraction of the unguided sample's.
    #[test]
    fn guidance_pulls_the_frozen_prefix_onto_the_leftover() {
        let (horizon, dims) = (8, 2);
        let n = horizon * dims;
        let mut field = TanhField::new(n, 11);
        let noise: Vec<f64> = (0..n).map(|i| (i as f64 * 1.3).sin()).collect();
        let prefix: Vec<f32> = (0..5 * dims).map(|i| 0.5 - 0.1 * i as f32).collect();
        let guide = Guide {
            prefix: prefix.clone(),
            delay: 3,
            beta: 5.0,
        }
        .prepare(horizon, dims)
        .unwrap();
        let free = sample(&mut field, &noise, 10, None);
        let guided = sample(&mut field, &noise, 10, Some(&guide));
        let dropped = guide.with_jacobian(Jacobian::Dropped);
        let guided_dropped = sample(&mut field, &noise, 10, Some(&dropped));
        let err = |a: &[f64]| {
            (0..3 * dims)
                .map(|i| (a[i] - f64::from(prefix[i])).abs())
                .fold(0.0, f64::max)
        };
        assert!(
            err(&free) > 0.1,
            "the unguided prefix is off: {}",
            err(&free)
        );
        assert!(
            err(&guided) < 0.05 * err(&free),
            "guided {} vs free {}",
            err(&guided),
            err(&free)
        );
        assert!(
            err(&guided_dropped) < 0.2 * err(&free),
            "guided with the Jacobian dropped {} vs free {}",
            err(&guided_dropped),
            err(&free)
        );
        let bad = Guide {
            prefix: vec![f32::NAN; 4],
            delay: 1,
            beta: 5.0,
        };
        assert_eq!(
            bad.prepare(horizon, dims).err(),
            Some(RtcError::NonFinite(0))
        );
        let bad = Guide {
            prefix: vec![0.0; 5],
            delay: 1,
            beta: 5.0,
        };
        assert!(matches!(
            bad.prepare(horizon, dims),
            Err(RtcError::PrefixShape { .. })
        ));
        let bad = Guide {
            prefix: vec![0.0; 4],
            delay: 1,
            beta: 0.0,
        };
        assert_eq!(bad.prepare(horizon, dims).err(), Some(RtcError::Beta(0.0)));
    }
}

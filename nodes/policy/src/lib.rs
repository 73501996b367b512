//! The fused policy: vision, prefix and denoise in one process (one load of the weights, no
//! messages between stages), on the backend named by `BACKEND`.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use dora_node_api::{DoraNode, EventStream};
use eyre::{bail, eyre, Result};
use node_common::join::{FrameJoin, Joined};
use node_common::prompt::{frame_prompt, prompt_from_env, TOKENS};
use node_common::reject::declares_rejected;
use node_common::stage::{self, Cx, Spec, Stage};
use node_common::{
    backend_from_env, batching_from_env, checkpoint_from_env, env_flag, env_or, expect_tensor,
    frame_state, int_param, model_images, Dim, FrameMeta,
};
use operators::backend::{self, Runner};
use operators::observation::noise_from_seed;
use operators::rtc::Guide;
use operators::{BatchRow, Config, Observation, StageTimes, MAX_BATCH};

pub struct Settings {
    pub steps: usize,
    pub seed: u64,
    /// The prompt of env PROMPT (empty when unset; then every frame brings its own).
    pub tokens: Vec<i32>,
    pub token_mask: Vec<bool>,
    /// The inputs that are parts of every frame besides `images` (those of `state` and
    /// `tokens` that the dataflow wires), joined to their frame by `seq`. With `tokens`,
    /// every frame takes the prompt sent with it.
    pub parts: Vec<&'static str>,
    /// Rejected frames are sent on the `rejected` output (declared in the dataflow).
    pub send_rejections: bool,
    /// Overlap frames (the next frame's vision and prefix while this one denoises).
    pub pipeline: bool,
    /// The backend's stage times are device times (CUDA events), traced as `gpu_ms`.
    pub gpu_stage_times: bool,
    /// The most frames run together (1 to [`MAX_BATCH`]; 1: one frame at a time).
    pub max_batch: usize,
    /// How long the first frame of a batch waits for more; zero: a batch is the frames
    /// already waiting.
    pub batch_window: Duration,
    /// Real-time chunking's largest guidance weight, for frames that come with a `guide`.
    pub rtc_beta: f64,
}

/// The optional input that carries real-time chunking's guide of a frame (an action queue's
/// `guide` output): the actions still planned, f32 [rows, action_dim], and `delay_ticks`.
pub const GUIDE: &str = "guide";

/// Env: `CHECKPOINT`, `PROMPT` (dir with tokens.npy, token_mask.npy; not needed when the
/// `tokens` input is wired), `BACKEND` (cpu),
/// `DTYPE` (f32 on cpu, bf16 on cuda), `STEPS` (10), `SEED` (0), `PIPELINE` (false; true:
/// up to two frames in flight, BACKEND=cuda), `MAX_BATCH` (8) and `BATCH_WINDOW_MS` (0):
/// without PIPELINE, frames waiting together run as one batch; `RTC_BETA` (5): with the
/// `guide` input wired, each frame's chunk is guided toward the actions still planned
/// (real-time chunking, docs/rtc.md: exact on BACKEND=cpu, the Jacobian term dropped on
/// BACKEND=cuda; not with PIPELINE).
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let steps: usize = env_or("STEPS", 10)?;
    if steps == 0 {
        bail!("env STEPS must be at least 1");
    }
    let seed: u64 = env_or("SEED", 0)?;
    let pipeline = env_flag("PIPELINE", false)?;
    let (max_batch, batch_window) = batching_from_env()?;
    if pipeline && kind != operators::backend::BackendKind::Cuda {
        bail!("env PIPELINE=true needs BACKEND=cuda (the cpu backend runs one frame at a time)");
    }
    let ckpt = checkpoint_from_env()?;
    let (tokens, token_mask, _) = prompt_from_env(&node, &ckpt.config)?;
    let parts = FrameJoin::wired(&node, &["state", TOKENS, GUIDE]);
    if !ckpt.config.pi05 && !parts.contains(&"state") {
        bail!("the checkpoint is pi0, which needs the robot state: wire the `state` input");
    }
    let rtc_beta: f64 = env_or("RTC_BETA", 5.0)?;
    if !(rtc_beta.is_finite() && rtc_beta > 0.0) {
        bail!("env RTC_BETA={rtc_beta} must be a positive number");
    }
    if parts.contains(&GUIDE) && pipeline {
        bail!("the `guide` input (real-time chunking) runs frames one at a time: unset PIPELINE");
    }
    let mut runner = backend::load(kind, precision, &ckpt, |_, _| {})?;
    // The first frames should cost what later ones do (no drops while graphs are built);
    // prompts of other lengths build their graphs when they first arrive.
    let prompt_len = token_mask.iter().filter(|&&m| m).count().max(1);
    runner.prepare(steps, prompt_len)?;
    eprintln!("policy: {}", runner.describe());
    if parts.contains(&GUIDE) {
        match runner.rtc_jacobian() {
            Some(j) => eprintln!("policy: RTC guidance ({}, beta {rtc_beta})", j.describe()),
            None => bail!(
                "the `guide` input (real-time chunking): {} has no guided denoise",
                runner.describe()
            ),
        }
    }
    let settings = Settings {
        steps,
        seed,
        tokens,
        token_mask,
        parts,
        send_rejections: declares_rejected(&node),
        pipeline,
        gpu_stage_times: kind == operators::backend::BackendKind::Cuda,
        max_batch,
        batch_window,
        rtc_beta,
    };
    if pipeline {
        return run_pipelined(&ckpt.config, runner.as_mut(), &settings, node, events);
    }
    run_with(&ckpt.config, runner.as_mut(), &settings, node, events)
}

/// How a frame ran: when it finished, with how many frames (itself included), and the host's
/// wall time of the call that ran them (None for pipelined frames, which overlap).
struct Ran {
    done: SystemTime,
    batch: usize,
    wall: Option<Duration>,
}

/// Sends one frame's actions [action_horizon, action_dim], after tracing its three stages
/// (back to back from the backend's stage times, the last ending at `ran.done`); the actions
/// carry the denoise span.
fn send_actions(
    cx: &mut Cx,
    cfg: &Config,
    settings: &Settings,
    meta: FrameMeta,
    (actions, times): (Vec<f32>, StageTimes),
    ran: Ran,
) -> Result<()> {
    let Ran { done, batch, wall } = ran;
    let denoise =
        cx.tracer
            .record_stages(meta.seq, meta.trace, &times, done, settings.gpu_stage_times);
    let meta = meta.traced(denoise);
    let mut md = meta.tensor_params(&[cfg.action_horizon, cfg.action_dim], "float32");
    // The policy's own time for the frame (the openpi server reports it as `policy_timing`).
    let infer = times.vision + times.prefix + times.denoise;
    md.insert(
        "infer_ms".into(),
        dora_node_api::Parameter::Float(infer.as_secs_f64() * 1e3),
    );
    // The host's wall time of the call that ran it (the whole batch's): beside the stage
    // times, it shows the backend's host work (staging, launches, waits, copies back).
    // Pipelined frames overlap, so no call is theirs alone: not sent.
    if let Some(wall) = wall {
        md.insert(
            "wall_ms".into(),
            dora_node_api::Parameter::Float(wall.as_secs_f64() * 1e3),
        );
    }
    // The frames run together with this one (itself included).
    md.insert(
        "batch_size".into(),
        dora_node_api::Parameter::Integer(batch as i64),
    );
    cx.send("actions", md, actions)
}

/// The node's stage: frames joined by `seq` from `images` and the wired parts, a rejected
/// one traced as its first stage (`vision`).
fn spec(settings: &Settings, backend: String) -> Spec {
    let mut parts = vec!["images"];
    parts.extend(settings.parts.iter().copied());
    Spec {
        name: "policy",
        traced_as: "vision",
        parts,
        send_rejections: settings.send_rejections,
        backend,
    }
}

/// The model inputs of a joined frame (its images, state and prompt: its `tokens` part, or
/// env PROMPT when that input is not wired) and its noise.
fn observation(
    frame: &Joined,
    cfg: &Config,
    settings: &Settings,
) -> Result<(Observation, Vec<f32>)> {
    let images = frame
        .part("images")
        .ok_or_else(|| eyre!("internal: frame {} without images", frame.seq))?;
    let (images, image_masks) = model_images(&images.metadata, &images.data, cfg)?;
    let fixed = (settings.tokens.clone(), settings.token_mask.clone());
    let (tokens, token_mask) = frame_prompt(frame, &fixed, cfg)?;
    let obs = Observation {
        images,
        image_masks,
        tokens,
        token_mask,
        state: frame_state(frame, cfg.action_dim, !cfg.pi05)?,
        noise: None,
    };
    let noise = noise_from_seed(cfg, settings.seed.wrapping_add(frame.seq));
    Ok((obs, noise))
}

/// The frame's real-time chunking guide: None without a `guide` part or with nothing
/// planned (the first request). The delay is capped at the rows planned, and rows past the
/// model's horizon are not guided.
fn frame_guide(frame: &Joined, cfg: &Config, beta: f64) -> Result<Option<Guide>> {
    let Some(p) = frame.part(GUIDE) else {
        return Ok(None);
    };
    let (shape, planned) = expect_tensor::<f32>(
        GUIDE,
        &p.metadata,
        &p.data,
        "float32",
        &[Dim::Any, Dim::Any],
    )?;
    if shape[0] == 0 {
        return Ok(None);
    }
    if shape[1] != cfg.action_dim {
        bail!(
            "frame {}: guide: {} values per action, the model's actions have {} (the queue must execute model actions)",
            frame.seq,
            shape[1],
            cfg.action_dim
        );
    }
    let delay = int_param(&p.metadata, "delay_ticks")
        .filter(|&d| d >= 0)
        .ok_or_else(|| {
            eyre!(
                "frame {}: guide: metadata `delay_ticks` (a tick count, at least 0) is missing",
                frame.seq
            )
        })?;
    let rows = shape[0].min(cfg.action_horizon);
    Ok(Some(Guide {
        prefix: planned[..rows * cfg.action_dim].to_vec(),
        delay: (delay as usize).min(rows),
        beta,
    }))
}

/// Frames in batches: a joined frame waits with the others until the batch is full
/// (`max_batch`), or until no message is waiting (window zero) or the first frame has waited
/// `batch_window`; then they run in one [`Runner::infer_batch`], each frame with its own
/// noise, and each gets its own actions (or its own rejection) as soon as the batch ends.
/// With `max_batch` 1 every frame runs on its own at once.
struct Batched<'a> {
    cfg: &'a Config,
    runner: &'a mut dyn Runner,
    settings: &'a Settings,
    /// Frames joined and not yet run, with their model inputs and noise.
    waiting: Vec<(FrameMeta, Observation, Vec<f32>)>,
    /// When the oldest waiting frame was joined.
    opened: Option<Instant>,
    /// Batches run, by size (index 0 unused).
    sizes: [u64; MAX_BATCH + 1],
    /// Frames run with a real-time chunking guide.
    guided: u64,
}

impl Batched<'_> {
    fn run_batch(&mut self, cx: &mut Cx) {
        let batch = std::mem::take(&mut self.waiting);
        self.opened = None;
        if batch.is_empty() {
            return;
        }
        let rows: Vec<BatchRow> = batch
            .iter()
            .map(|(_, obs, noise)| BatchRow { obs, noise })
            .collect();
        let started = Instant::now();
        let result = self.runner.infer_batch(&rows, self.settings.steps);
        let wall = Some(started.elapsed());
        let done = SystemTime::now();
        let n = batch.len();
        match result {
            Ok(out) => {
                if let Some(count) = self.sizes.get_mut(n) {
                    *count += 1;
                }
                for ((meta, ..), actions) in batch.into_iter().zip(out.actions) {
                    let sent = match actions {
                        Ok(a) => {
                            let ran = Ran {
                                done,
                                batch: n,
                                wall,
                            };
                            send_actions(cx, self.cfg, self.settings, meta, (a, out.times), ran)
                        }
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = sent {
                        cx.reject(meta, &e);
                    }
                }
            }
            Err(e) => {
                let e = eyre!(e);
                for (meta, ..) in batch {
                    cx.reject(meta, &e);
                }
            }
        }
    }
}

impl Stage for Batched<'_> {
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
        let (obs, noise) = observation(&frame, self.cfg, self.settings)?;
        // A guided frame runs alone, after the frames that came before it.
        if let Some(guide) = frame_guide(&frame, self.cfg, self.settings.rtc_beta)? {
            self.run_batch(cx);
            let started = Instant::now();
            let out = self
                .runner
                .infer_guided(&obs, &noise, self.settings.steps, &guide)?;
            let wall = Some(started.elapsed());
            self.guided += 1;
            if let Some(count) = self.sizes.get_mut(1) {
                *count += 1;
            }
            let done = SystemTime::now();
            let ran = Ran {
                done,
                batch: 1,
                wall,
            };
            return send_actions(cx, self.cfg, self.settings, frame.meta(), out, ran);
        }
        self.opened.get_or_insert_with(Instant::now);
        self.waiting.push((frame.meta(), obs, noise));
        if self.waiting.len() >= self.settings.max_batch {
            self.run_batch(cx);
        }
        Ok(())
    }

    /// Frames waiting: wait for more only until the window closes (zero: not at all).
    fn poll_interval(&self) -> Option<Duration> {
        let opened = self.opened?;
        Some(self.settings.batch_window.saturating_sub(opened.elapsed()))
    }

    fn poll(&mut self, cx: &mut Cx) {
        let Some(opened) = self.opened else {
            return;
        };
        let window = self.settings.batch_window;
        // Window zero: run once nothing more is waiting. Otherwise once the window is over,
        // even while messages keep coming.
        if opened.elapsed() >= window && (cx.idle() || !window.is_zero()) {
            self.run_batch(cx);
        }
    }

    fn finish(&mut self, cx: &mut Cx) {
        self.run_batch(cx);
    }

    fn summary(&self) -> String {
        let guided = if self.guided > 0 {
            format!(", {} guided (RTC)", self.guided)
        } else {
            String::new()
        };
        match node_common::batches_summary(&self.sizes) {
            Some(b) => format!(", {b}{guided}"),
            None => guided,
        }
    }
}

pub fn run_with(
    cfg: &Config,
    runner: &mut dyn Runner,
    settings: &Settings,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    run_batched(cfg, runner, settings, node, events).map(|_| ())
}

/// [`run_with`]; gives the number of batches run of each size (index = size).
pub fn run_batched(
    cfg: &Config,
    runner: &mut dyn Runner,
    settings: &Settings,
    node: DoraNode,
    events: EventStream,
) -> Result<[u64; MAX_BATCH + 1]> {
    let spec = spec(settings, runner.describe());
    let mut stage = Batched {
        cfg,
        runner,
        settings,
        waiting: Vec::new(),
        opened: None,
        sizes: [0; MAX_BATCH + 1],
        guided: 0,
    };
    stage::run(&spec, &mut stage, node, events)?;
    Ok(stage.sizes)
}

/// Frames overlapped on the backend: a frame is submitted as soon as its parts are joined
/// (while up to one other is still running), and its actions are sent as soon as it
/// finishes.
struct Pipelined<'a> {
    cfg: &'a Config,
    runner: &'a mut dyn Runner,
    settings: &'a Settings,
    /// The frames in flight, oldest first.
    pending: VecDeque<FrameMeta>,
    /// Frames submitted while another was running.
    overlapped: u64,
}

impl Pipelined<'_> {
    /// Collects the oldest frame in flight and sends its actions (or rejects it).
    fn finish_oldest(&mut self, cx: &mut Cx) {
        let done = self.runner.collect();
        let Some(meta) = self.pending.pop_front() else {
            node_common::report_rejected(
                "policy",
                &eyre!("internal: a collected frame without its metadata"),
            );
            return;
        };
        let result = match done {
            Ok(Some(done)) => send_actions(
                cx,
                self.cfg,
                self.settings,
                meta,
                done,
                Ran {
                    done: SystemTime::now(),
                    batch: 1,
                    wall: None,
                },
            ),
            Ok(None) => Err(eyre!("internal: frame {} was not in flight", meta.seq)),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            cx.reject(meta, &e);
        }
    }
}

impl Stage for Pipelined<'_> {
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
        let (obs, noise) = observation(&frame, self.cfg, self.settings)?;
        if self.runner.in_flight() >= 2 {
            self.finish_oldest(cx);
        }
        if !self.pending.is_empty() {
            self.overlapped += 1;
        }
        if !self.runner.submit(&obs, &noise, self.settings.steps)? {
            cx.stop(eyre!(
                "env PIPELINE=true needs a backend that overlaps frames (BACKEND=cuda)"
            ));
            return Ok(());
        }
        self.pending.push_back(frame.meta());
        Ok(())
    }

    /// With a frame running, poll briefly so that it is sent as soon as it is done.
    fn poll_interval(&self) -> Option<Duration> {
        (!self.pending.is_empty()).then_some(Duration::from_micros(500))
    }

    fn poll(&mut self, cx: &mut Cx) {
        while self.runner.in_flight() > 0 && self.runner.ready() {
            self.finish_oldest(cx);
        }
    }

    fn finish(&mut self, cx: &mut Cx) {
        while self.runner.in_flight() > 0 {
            self.finish_oldest(cx);
        }
    }

    fn summary(&self) -> String {
        format!(", {} started while another was running", self.overlapped)
    }
}

pub fn run_pipelined(
    cfg: &Config,
    runner: &mut dyn Runner,
    settings: &Settings,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    let spec = spec(settings, runner.describe());
    let mut stage = Pipelined {
        cfg,
        runner,
        settings,
        pending: VecDeque::new(),
        overlapped: 0,
    };
    stage::run(&spec, &mut stage, node, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::Parameter;
    use node_common::testing::{event, golden, json, run_node, values, TensorInput};
    use operators::checkpoint::Checkpoint;
    use operators::image;
    use operators::observation::load_prompt;
    use operators::Policy;

    /// A backend that keeps submitted frames "in flight" until collected.
    struct Overlapping {
        inner: Policy,
        done: std::collections::VecDeque<(Vec<f32>, operators::StageTimes)>,
    }

    impl Runner for Overlapping {
        fn infer(
            &mut self,
            obs: &Observation,
            noise: &[f32],
            steps: usize,
        ) -> operators::Result<(Vec<f32>, operators::StageTimes)> {
            self.inner.infer(obs, noise, steps)
        }
        fn describe(&self) -> String {
            "overlapping test backend".into()
        }
        fn submit(
            &mut self,
            obs: &Observation,
            noise: &[f32],
            steps: usize,
        ) -> operators::Result<bool> {
            let r = self.inner.infer(obs, noise, steps)?;
            self.done.push_back(r);
            Ok(true)
        }
        fn in_flight(&self) -> usize {
            self.done.len()
        }
        fn collect(&mut self) -> operators::Result<Option<(Vec<f32>, operators::StageTimes)>> {
            Ok(self.done.pop_front())
        }
    }

    #[test]
    fn fused_policy_matches_the_operator_and_rejects_a_wrong_shape() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (tokens, token_mask) =
            load_prompt(&golden("pi05_small").join("observation"), &cfg).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 13 % 256) as u8).collect();
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        let msg = |seq, shape: &'static [usize], v: &[u8]| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(v),
            extra: vec![("image_masks", Parameter::ListInt(vec![1, 1, 0]))],
        };
        let events = || {
            vec![
                event(0.0, msg(0, &[1, 2, 3], &[0; 6])),
                event(0.01, msg(9, shape, &px)),
            ]
        };
        let settings = Settings {
            steps: 2,
            seed: 3,
            tokens: tokens.clone(),
            token_mask: token_mask.clone(),
            parts: vec![],
            send_rejections: false,
            pipeline: false,
            gpu_stage_times: false,
            max_batch: 1,
            batch_window: Duration::ZERO,
            rtc_beta: 5.0,
        };
        let out = run_node("policy", events(), |node, ev| {
            run_with(&cfg, &mut policy, &settings, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        // The pipelined loop over a backend that keeps frames in flight: the same output.
        let mut overlapping = Overlapping {
            inner: Policy::load(&ckpt, |_, _| {}).unwrap(),
            done: Default::default(),
        };
        let piped = run_node("policy", events(), |node, ev| {
            run_pipelined(&cfg, &mut overlapping, &settings, node, ev)
        })
        .unwrap();
        assert_eq!(piped.len(), 1, "{piped:?}");
        assert_eq!(values(&piped[0]), values(&out[0]));
        assert_eq!(overlapping.in_flight(), 0, "every frame collected");
        let obs = Observation {
            images: px
                .chunks_exact(s * s * 3)
                .flat_map(|c| image::to_model_input(c, s, s, s))
                .collect::<Vec<f32>>()
                .into(),
            image_masks: vec![true, true, false],
            tokens,
            token_mask,
            state: None,
            noise: None,
        };
        let (want, _) = policy.infer(&obs, &noise_from_seed(&cfg, 12), 2).unwrap();
        let got: Vec<f32> = values(&out[0]).iter().map(|&v| v as f32).collect();
        assert_eq!(got, want);
    }

    /// With `state` and `tokens` wired, each frame runs on the parts sent with it whatever
    /// order they arrive in across inputs (dora does not keep it); a frame whose part was
    /// lost, and one with a bad part, are rejected on `rejected` with the reason, at once.
    #[test]
    fn frames_are_joined_by_seq_in_any_arrival_order() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px = |seq: u64| -> Vec<u8> {
            (0..n * s * s * 3)
                .map(|i| ((i as u64 * 7 + seq * 31) % 256) as u8)
                .collect()
        };
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        let images = |seq| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(&px(seq)),
            extra: vec![("image_masks", Parameter::ListInt(vec![1, 1, 0]))],
        };
        let prompt = |seq: u64| -> Vec<i32> { vec![2, 17 + seq as i32, 99, 4, 0, 0] };
        let mask = vec![1i64, 1, 1, 1, 0, 0];
        let tokens = |seq: u64, ids: Vec<i32>| TensorInput {
            id: "tokens",
            seq,
            shape: &[6],
            dtype: "int32",
            arrow_type: "Int32",
            values: json(&ids),
            extra: vec![("token_mask", Parameter::ListInt(mask.clone()))],
        };
        let state = |seq: u64| TensorInput {
            id: "state",
            seq,
            shape: &[8],
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&[seq as f32 * 0.1; 8]),
            extra: vec![],
        };
        let events = || {
            let t = [
                0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.11,
            ];
            vec![
                // Frame 4: images first, then state and tokens.
                event(t[0], images(4)),
                event(t[1], state(4)),
                event(t[2], tokens(4, prompt(4))),
                // Frame 5: tokens, images, state.
                event(t[3], tokens(5, prompt(5))),
                event(t[4], images(5)),
                // Frame 6 loses its tokens: frame 7's tokens show it.
                event(t[5], images(6)),
                event(t[6], state(5)),
                event(t[7], state(6)),
                event(t[8], tokens(7, prompt(7))),
                event(t[9], state(7)),
                event(t[10], images(7)),
                // Frame 8 has a token id outside the vocabulary.
                event(t[11], tokens(8, vec![2, 300, 0, 0, 0, 0])),
                event(t[11] + 0.01, images(8)),
                event(t[11] + 0.02, state(8)),
            ]
        };
        let settings = Settings {
            steps: 2,
            seed: 1,
            tokens: vec![],
            token_mask: vec![],
            parts: vec!["state", TOKENS],
            send_rejections: true,
            pipeline: false,
            gpu_stage_times: false,
            max_batch: 1,
            batch_window: Duration::ZERO,
            rtc_beta: 5.0,
        };
        let out = run_node("policy", events(), |node, ev| {
            run_with(&cfg, &mut policy, &settings, node, ev)
        })
        .unwrap();
        let ids: Vec<&str> = out.iter().filter_map(|o| o["id"].as_str()).collect();
        assert_eq!(
            ids,
            ["actions", "actions", "rejected", "actions", "rejected"],
            "{out:?}"
        );
        let reason = |o: &serde_json::Map<String, serde_json::Value>| {
            o["data"][0].as_str().unwrap_or_default().to_string()
        };
        let lost = reason(&out[2]);
        assert!(
            lost.contains("frame 6") && lost.contains("`tokens` never arrived"),
            "{lost}"
        );
        assert!(
            reason(&out[4]).contains("token id 300"),
            "{}",
            reason(&out[4])
        );
        for (o, seq) in [(&out[0], 4u64), (&out[1], 5), (&out[3], 7)] {
            let obs = Observation {
                images: px(seq)
                    .chunks_exact(s * s * 3)
                    .flat_map(|c| image::to_model_input(c, s, s, s))
                    .collect::<Vec<f32>>()
                    .into(),
                image_masks: vec![true, true, false],
                tokens: prompt(seq),
                token_mask: mask.iter().map(|&m| m != 0).collect(),
                state: Some(vec![seq as f32 * 0.1; 8]),
                noise: None,
            };
            let (want, _) = policy
                .infer(&obs, &noise_from_seed(&cfg, 1 + seq), 2)
                .unwrap();
            let got: Vec<f32> = values(o).iter().map(|&v| v as f32).collect();
            assert_eq!(got, want, "frame {seq}");
        }
        // The pipelined loop joins the same way.
        let mut overlapping = Overlapping {
            inner: Policy::load(&ckpt, |_, _| {}).unwrap(),
            done: Default::default(),
        };
        let piped = run_node("policy", events(), |node, ev| {
            run_pipelined(&cfg, &mut overlapping, &settings, node, ev)
        })
        .unwrap();
        let piped_ids: Vec<&str> = piped.iter().filter_map(|o| o["id"].as_str()).collect();
        assert_eq!(piped_ids, ids);
        for (a, b) in out.iter().zip(&piped) {
            assert_eq!(a["data"], b["data"]);
        }
    }

    /// Frames waiting together run as one batch (here: up to 3, the window long enough that
    /// only a full batch or the end of the stream runs one), each with its own noise, and
    /// each gets the actions it gets alone, bit for bit; a frame the policy refuses inside a
    /// batch is rejected alone, and the rest of its batch is answered.
    #[test]
    fn waiting_frames_run_as_one_batch_with_their_own_actions() {
        let ckpt = Checkpoint::open(&golden("pi0_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px = |seq: u64| -> Vec<u8> {
            (0..n * s * s * 3)
                .map(|i| ((i as u64 * 11 + seq * 29) % 256) as u8)
                .collect()
        };
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        // Frame 13 shows the model nothing: the node takes it, the policy refuses it.
        let masks = |seq: u64| match seq {
            13 => vec![0i64, 0, 0],
            _ if seq.is_multiple_of(2) => vec![1, 1, 0],
            _ => vec![1, 0, 1],
        };
        let images = |seq| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(&px(seq)),
            extra: vec![("image_masks", Parameter::ListInt(masks(seq)))],
        };
        let real = |seq: u64| if seq == 13 { 0 } else { 1 + (seq as usize % 4) };
        let prompt = |seq: u64| -> (Vec<i32>, Vec<i64>) {
            let ids = (0..6).map(|i| (seq as i32 * 7 + i * 3) % 256).collect();
            let mask = (0..6).map(|i| i64::from(i < real(seq))).collect();
            (ids, mask)
        };
        let tokens = |seq: u64| {
            let (ids, mask) = prompt(seq);
            TensorInput {
                id: "tokens",
                seq,
                shape: &[6],
                dtype: "int32",
                arrow_type: "Int32",
                values: json(&ids),
                extra: vec![("token_mask", Parameter::ListInt(mask))],
            }
        };
        let state = |seq: u64| TensorInput {
            id: "state",
            seq,
            shape: &[8],
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&[seq as f32 * -0.05; 8]),
            extra: vec![],
        };
        let seqs = 10..17u64;
        let mut events = vec![];
        for (k, seq) in seqs.clone().enumerate() {
            let t = k as f64 * 0.01;
            // Parts in a different order every frame.
            let mut parts = vec![images(seq), state(seq), tokens(seq)];
            parts.rotate_left(k % 3);
            for p in parts {
                events.push(event(t, p));
            }
        }
        let settings = Settings {
            steps: 2,
            seed: 5,
            tokens: vec![],
            token_mask: vec![],
            parts: vec!["state", TOKENS],
            send_rejections: true,
            pipeline: false,
            gpu_stage_times: false,
            max_batch: 3,
            batch_window: Duration::from_secs(30),
            rtc_beta: 5.0,
        };
        let mut sizes = [0; MAX_BATCH + 1];
        let out = run_node("policy", events, |node, ev| {
            sizes = run_batched(&cfg, &mut policy, &settings, node, ev)?;
            Ok(())
        })
        .unwrap();
        // 10-12, then 13-15 (13 refused inside the batch), then 16 when the stream ends.
        assert_eq!(sizes[3], 2, "{sizes:?}");
        assert_eq!(sizes[1], 1, "{sizes:?}");
        let ids: Vec<&str> = out.iter().filter_map(|o| o["id"].as_str()).collect();
        assert_eq!(
            ids,
            ["actions", "actions", "actions", "rejected", "actions", "actions", "actions"],
            "{out:?}"
        );
        // Frame 13's rejection, sent in its batch's order.
        let why = out[3]["data"][0].as_str().unwrap_or_default();
        assert!(why.contains("shows the model nothing"), "{why}");
        let mut answered = out.iter().filter(|o| o["id"] == "actions");
        for seq in seqs.filter(|&s| s != 13) {
            let (ids, mask) = prompt(seq);
            let obs = Observation {
                images: px(seq)
                    .chunks_exact(s * s * 3)
                    .flat_map(|c| image::to_model_input(c, s, s, s))
                    .collect::<Vec<f32>>()
                    .into(),
                image_masks: masks(seq).iter().map(|&m| m != 0).collect(),
                tokens: ids,
                token_mask: mask.iter().map(|&m| m != 0).collect(),
                state: Some(vec![seq as f32 * -0.05; 8]),
                noise: None,
            };
            let (want, _) = policy
                .infer(&obs, &noise_from_seed(&cfg, 5 + seq), 2)
                .unwrap();
            let got: Vec<f32> = answered
                .next()
                .map(values)
                .unwrap_or_default()
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "frame {seq}"
            );
        }
    }

    /// A batch does not wait for a full batch: with window zero a frame runs as soon as no
    /// message is waiting, with a window once the window has passed (frames here arrive 1.5 s
    /// apart, far beyond both, so each runs alone). The first is due at 0.5 s, not at once:
    /// dora's testing daemon answers requests on one thread, and `init_testing`'s last one
    /// can wait behind its sleep until an input is due; it then waits at most for the first
    /// frame, never until the second.
    #[test]
    fn a_frame_alone_runs_once_nothing_waits_or_its_window_closes() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (tokens, token_mask) =
            load_prompt(&golden("pi05_small").join("observation"), &cfg).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 7 % 256) as u8).collect();
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        let msg = |seq| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(&px),
            extra: vec![("image_masks", Parameter::ListInt(vec![1, 0, 1]))],
        };
        for window in [Duration::ZERO, Duration::from_millis(20)] {
            let settings = Settings {
                steps: 2,
                seed: 0,
                tokens: tokens.clone(),
                token_mask: token_mask.clone(),
                parts: vec![],
                send_rejections: false,
                pipeline: false,
                gpu_stage_times: false,
                max_batch: MAX_BATCH,
                batch_window: window,
                rtc_beta: 5.0,
            };
            let mut sizes = [0; MAX_BATCH + 1];
            let out = run_node(
                "policy",
                vec![event(0.5, msg(0)), event(2.0, msg(1))],
                |node, ev| {
                    sizes = run_batched(&cfg, &mut policy, &settings, node, ev)?;
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(out.len(), 2, "{out:?}");
            assert_eq!(sizes[1], 2, "window {window:?}: {sizes:?}");
        }
    }

    /// A frame whose parts never all arrive is rejected when the stream ends, not forgotten.
    #[test]
    fn a_frame_still_waiting_at_the_end_is_rejected() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let events = vec![event(
            0.0,
            TensorInput {
                id: "tokens",
                seq: 3,
                shape: &[1],
                dtype: "int32",
                arrow_type: "Int32",
                values: json(&[2]),
                extra: vec![("token_mask", Parameter::ListInt(vec![1]))],
            },
        )];
        let settings = Settings {
            steps: 2,
            seed: 1,
            tokens: vec![],
            token_mask: vec![],
            parts: vec![TOKENS],
            send_rejections: true,
            pipeline: false,
            gpu_stage_times: false,
            max_batch: 1,
            batch_window: Duration::ZERO,
            rtc_beta: 5.0,
        };
        let out = run_node("policy", events, |node, ev| {
            run_with(&cfg, &mut policy, &settings, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["id"], "rejected");
        let why = out[0]["data"][0].as_str().unwrap_or_default();
        assert!(
            why.contains("frame 3") && why.contains("`images` never arrived"),
            "{why}"
        );
    }

    /// With `guide` wired, each frame's chunk is guided by the guide sent with its seq: the
    /// actions equal `Policy::infer_guided` on the same observation, noise and guide (delay
    /// capped at the rows planned); an empty guide runs unguided; a guide with the wrong
    /// width is rejected naming it.
    #[test]
    fn guided_frames_run_with_their_own_guide() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let (tokens, token_mask) =
            load_prompt(&golden("pi05_small").join("observation"), &cfg).unwrap();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (n, s, ad) = (cfg.num_images, cfg.image_size, cfg.action_dim);
        let px: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 13 % 256) as u8).collect();
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        let images = |seq| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(&px),
            extra: vec![("image_masks", Parameter::ListInt(vec![1, 1, 0]))],
        };
        let planned: Vec<f32> = (0..3 * ad).map(|i| (i as f32 * 0.37).sin()).collect();
        let guide = |seq, rows: usize, width: usize, delay: i64| TensorInput {
            id: "guide",
            seq,
            shape: Box::leak(vec![rows, width].into_boxed_slice()),
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&planned[..rows * width]),
            extra: vec![("delay_ticks", Parameter::Integer(delay))],
        };
        let events = vec![
            event(0.0, guide(1, 0, 0, 0)),
            event(0.01, images(1)),
            event(0.02, images(2)),
            event(0.03, guide(2, 3, ad, 7)),
            event(0.04, guide(3, 2, ad - 1, 1)),
            event(0.05, images(3)),
        ];
        let settings = Settings {
            steps: 3,
            seed: 5,
            tokens: tokens.clone(),
            token_mask: token_mask.clone(),
            parts: vec![GUIDE],
            send_rejections: true,
            pipeline: false,
            gpu_stage_times: false,
            max_batch: 1,
            batch_window: Duration::ZERO,
            rtc_beta: 5.0,
        };
        let out = run_node("policy", events, |node, ev| {
            run_with(&cfg, &mut policy, &settings, node, ev)
        })
        .unwrap();
        let ids: Vec<&str> = out.iter().filter_map(|o| o["id"].as_str()).collect();
        assert_eq!(ids, ["actions", "actions", "rejected"], "{out:?}");
        let obs = Observation {
            images: px
                .chunks_exact(s * s * 3)
                .flat_map(|c| image::to_model_input(c, s, s, s))
                .collect::<Vec<f32>>()
                .into(),
            image_masks: vec![true, true, false],
            tokens,
            token_mask,
            state: None,
            noise: None,
        };
        let got = |i: usize| -> Vec<f32> { values(&out[i]).iter().map(|&v| v as f32).collect() };
        let (free, _) = policy.infer(&obs, &noise_from_seed(&cfg, 6), 3).unwrap();
        assert_eq!(got(0), free, "an empty guide runs unguided");
        let g = Guide {
            prefix: planned.clone(),
            delay: 3,
            beta: 5.0,
        };
        let (guided, _) = policy
            .infer_guided(&obs, &noise_from_seed(&cfg, 7), 3, &g)
            .unwrap();
        assert_eq!(got(1), guided);
        let (free2, _) = policy.infer(&obs, &noise_from_seed(&cfg, 7), 3).unwrap();
        assert_ne!(got(1), free2, "the guide changed the chunk");
        let reason = out[2]["data"][0].as_str().unwrap_or_default();
        assert!(
            reason.contains("frame 3") && reason.contains("guide"),
            "{reason}"
        );
    }
}

//! The fused policy: vision, prefix and denoise in one process (one load of the weights, no
//! messages between stages), on the backend named by `BACKEND`.

use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, eyre, Result};
use node_common::prompt::{prompt_from_env, PromptBuffer, TOKENS};
use node_common::trace::Tracer;
use node_common::{
    backend_from_env, checkpoint_from_env, env_or, model_images, report_rejected, FrameMeta,
    SeqGaps, StateBuffer,
};
use operators::backend::{self, Runner};
use operators::observation::noise_from_seed;
use operators::{Config, Observation, StageTimes};
use std::time::SystemTime;

pub struct Settings {
    pub steps: usize,
    pub seed: u64,
    /// The prompt of env PROMPT (empty when unset; then every frame brings its own).
    pub tokens: Vec<i32>,
    pub token_mask: Vec<bool>,
    /// The `tokens` input is wired: every frame takes the prompt sent with it.
    pub tokens_input: bool,
    /// Overlap frames (the next frame's vision and prefix while this one denoises).
    pub pipeline: bool,
    /// The backend's stage times are device times (CUDA events), traced as `gpu_ms`.
    pub gpu_stage_times: bool,
}

/// Env: `CHECKPOINT`, `PROMPT` (dir with tokens.npy, token_mask.npy; not needed when the
/// `tokens` input is wired), `BACKEND` (cpu),
/// `DTYPE` (f32 on cpu, bf16 on cuda), `STEPS` (10), `SEED` (0), `PIPELINE` (false; true:
/// up to two frames in flight, BACKEND=cuda).
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let steps: usize = env_or("STEPS", 10)?;
    if steps == 0 {
        bail!("env STEPS must be at least 1");
    }
    let seed: u64 = env_or("SEED", 0)?;
    let pipeline: bool = env_or("PIPELINE", false)?;
    if pipeline && kind != operators::backend::BackendKind::Cuda {
        bail!("env PIPELINE=true needs BACKEND=cuda (the cpu backend runs one frame at a time)");
    }
    let ckpt = checkpoint_from_env()?;
    let (tokens, token_mask, tokens_input) = prompt_from_env(&node, &ckpt.config)?;
    let mut runner = backend::load(kind, precision, &ckpt, |_, _| {})?;
    // The first frames should cost what later ones do (no drops while graphs are built);
    // prompts of other lengths build their graphs when they first arrive.
    let prompt_len = token_mask.iter().filter(|&&m| m).count().max(1);
    runner.prepare(steps, prompt_len)?;
    eprintln!("policy: {}", runner.describe());
    let settings = Settings {
        steps,
        seed,
        tokens,
        token_mask,
        tokens_input,
        pipeline,
        gpu_stage_times: kind == operators::backend::BackendKind::Cuda,
    };
    if pipeline {
        return run_pipelined(&ckpt.config, runner.as_mut(), &settings, node, events);
    }
    run_with(&ckpt.config, runner.as_mut(), &settings, node, events)
}

/// Sends one frame's actions [action_horizon, action_dim], after tracing its three stages
/// (back to back from the backend's stage times, the last ending at `done`); the actions
/// carry the denoise span.
fn send_actions(
    node: &mut DoraNode,
    tracer: &Tracer,
    cfg: &Config,
    settings: &Settings,
    meta: FrameMeta,
    (actions, times): (Vec<f32>, StageTimes),
    done: SystemTime,
) -> Result<()> {
    let denoise =
        tracer.record_stages(meta.seq, meta.trace, &times, done, settings.gpu_stage_times);
    let meta = meta.traced(denoise);
    let mut md = meta.tensor_params(&[cfg.action_horizon, cfg.action_dim], "float32");
    // The policy's own time for the frame (the openpi server reports it as `policy_timing`).
    let infer = times.vision + times.prefix + times.denoise;
    md.insert(
        "infer_ms".into(),
        dora_node_api::Parameter::Float(infer.as_secs_f64() * 1e3),
    );
    node.send_output("actions".to_string().into(), md, actions)
        .map_err(|e| eyre!("sending actions: {e}"))
}

/// What the node has received: the robot states and prompts waiting for their frames, and the
/// frames' sequence numbers.
#[derive(Default)]
struct Inputs {
    gaps: SeqGaps,
    states: StateBuffer,
    prompts: PromptBuffer,
}

impl Inputs {
    /// Takes in message `id`; an `images` message gives its frame: metadata, observation (with
    /// the frame's state and prompt: its `tokens` message, or env PROMPT when that input is
    /// not wired) and noise.
    fn frame(
        &mut self,
        cfg: &Config,
        settings: &Settings,
        id: &str,
        md: &dora_node_api::MetadataParameters,
        data: &dora_node_api::DoraArray,
    ) -> Result<Option<(FrameMeta, Observation, Vec<f32>)>> {
        match id {
            "state" => self.states.insert(md, data, cfg.action_dim)?,
            TOKENS => self.prompts.insert(md, data, cfg)?,
            "images" => {
                let meta = FrameMeta::from_metadata("images", md)?;
                self.gaps.observe(meta.seq);
                let seq = meta.seq;
                let (images, image_masks) = model_images(md, data, cfg)?;
                let fixed = (settings.tokens.clone(), settings.token_mask.clone());
                let (tokens, token_mask) =
                    self.prompts.for_frame(seq, settings.tokens_input, &fixed)?;
                let obs = Observation {
                    images,
                    image_masks,
                    tokens,
                    token_mask,
                    state: self.states.take(seq, !cfg.pi05)?,
                    noise: None,
                };
                let noise = noise_from_seed(cfg, settings.seed.wrapping_add(seq));
                return Ok(Some((meta, obs, noise)));
            }
            _ => {}
        }
        Ok(None)
    }
}

/// Frames overlapped on the backend: a frame is submitted as soon as it arrives (while up to
/// one other is still running), and its actions are sent as soon as it finishes.
pub fn run_pipelined(
    cfg: &Config,
    runner: &mut dyn Runner,
    settings: &Settings,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let mut inputs = Inputs::default();
    let tracer = node_common::tracer(&node, &runner.describe())?;
    let mut pending: std::collections::VecDeque<FrameMeta> = Default::default();
    let mut overlapped = 0u64;
    let finish = |runner: &mut dyn Runner,
                  node: &mut DoraNode,
                  pending: &mut std::collections::VecDeque<FrameMeta>|
     -> Result<()> {
        let done = runner.collect();
        let meta = pending
            .pop_front()
            .ok_or_else(|| eyre!("internal: a collected frame without its metadata"))?;
        let Some(done) = done? else {
            bail!("internal: frame {} was not in flight", meta.seq);
        };
        send_actions(node, &tracer, cfg, settings, meta, done, SystemTime::now())
    };
    loop {
        // With a frame running, poll briefly so that it is sent as soon as it is done.
        let event = if pending.is_empty() {
            events.recv()
        } else {
            events.recv_timeout(std::time::Duration::from_micros(500))
        };
        match event {
            None | Some(Event::Stop(_)) => break,
            Some(Event::InputClosed { id }) if id.as_str() == "images" => break,
            Some(Event::Input { id, metadata, data }) => {
                let md = &metadata.parameters;
                let result = (|| -> Result<()> {
                    let Some((meta, obs, noise)) =
                        inputs.frame(cfg, settings, id.as_str(), md, &data)?
                    else {
                        return Ok(());
                    };
                    if runner.in_flight() >= 2 {
                        finish(runner, &mut node, &mut pending)?;
                    }
                    if !pending.is_empty() {
                        overlapped += 1;
                    }
                    if !runner.submit(&obs, &noise, settings.steps)? {
                        bail!(
                            "env PIPELINE=true needs a backend that overlaps frames (BACKEND=cuda)"
                        );
                    }
                    pending.push_back(meta);
                    Ok(())
                })();
                if let Err(e) = result {
                    report_rejected("policy", &e);
                }
            }
            Some(_) => {}
        }
        while runner.in_flight() > 0 && runner.ready() {
            if let Err(e) = finish(runner, &mut node, &mut pending) {
                report_rejected("policy", &e);
            }
        }
    }
    while runner.in_flight() > 0 {
        if let Err(e) = finish(runner, &mut node, &mut pending) {
            report_rejected("policy", &e);
        }
    }
    eprintln!(
        "policy: {} frames, {} gaps, {overlapped} started while another was running",
        inputs.gaps.frames, inputs.gaps.gaps
    );
    Ok(())
}

pub fn run_with(
    cfg: &Config,
    runner: &mut dyn Runner,
    settings: &Settings,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let tracer = node_common::tracer(&node, &runner.describe())?;
    let mut inputs = Inputs::default();
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
            continue;
        };
        let md = &metadata.parameters;
        let result = (|| {
            let Some((meta, obs, noise)) = inputs.frame(cfg, settings, id.as_str(), md, &data)?
            else {
                return Ok(());
            };
            let done = runner.infer(&obs, &noise, settings.steps)?;
            let t = SystemTime::now();
            send_actions(&mut node, &tracer, cfg, settings, meta, done, t)
        })();
        if let Err(e) = result {
            report_rejected("policy", &e);
        }
    }
    eprintln!(
        "policy: {} frames, {} gaps",
        inputs.gaps.frames, inputs.gaps.gaps
    );
    Ok(())
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
            tokens_input: false,
            pipeline: false,
            gpu_stage_times: false,
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
                .collect(),
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

    /// With the `tokens` input wired, each frame runs on the prompt sent with it, and a frame
    /// whose prompt did not arrive is rejected.
    #[test]
    fn per_frame_prompts_from_the_tokens_input() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut policy = Policy::load(&ckpt, |_, _| {}).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 7 % 256) as u8).collect();
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
        let prompt: Vec<i32> = vec![2, 17, 99, 4, 0, 0];
        let mask = vec![1i64, 1, 1, 1, 0, 0];
        let tokens = |seq| TensorInput {
            id: "tokens",
            seq,
            shape: &[6],
            dtype: "int32",
            arrow_type: "Int32",
            values: json(&prompt),
            extra: vec![("token_mask", Parameter::ListInt(mask.clone()))],
        };
        let events = vec![
            event(0.0, tokens(4)),
            event(0.01, images(4)),
            event(0.02, images(5)),
        ];
        let settings = Settings {
            steps: 2,
            seed: 1,
            tokens: vec![],
            token_mask: vec![],
            tokens_input: true,
            pipeline: false,
            gpu_stage_times: false,
        };
        let out = run_node("policy", events, |node, ev| {
            run_with(&cfg, &mut policy, &settings, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1, "frame 5 had no prompt: {out:?}");
        let obs = Observation {
            images: px
                .chunks_exact(s * s * 3)
                .flat_map(|c| image::to_model_input(c, s, s, s))
                .collect(),
            image_masks: vec![true, true, false],
            tokens: prompt.clone(),
            token_mask: mask.iter().map(|&m| m != 0).collect(),
            state: None,
            noise: None,
        };
        let (want, _) = policy.infer(&obs, &noise_from_seed(&cfg, 5), 2).unwrap();
        let got: Vec<f32> = values(&out[0]).iter().map(|&v| v as f32).collect();
        assert_eq!(got, want);
    }
}

//! `turbopi infer --openpi OBS.msgpack`: one observation in openpi's wire format (what
//! openpi-client sends) through the same transforms as the `openpi-server` node, so a served
//! frame can be reproduced exactly (frame `seq` of a server with `SEED` uses `--seed SEED+seq`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use operators::openpi::assets::{locate, openpi_cache_dir_from_env, AssetSearch};
use operators::openpi::msgpack::{decode, Limits};
use operators::openpi::{parse_delta_mask, FrameContext, Robot, Settings, Transforms};
use operators::{fsio, npy, Config, Observation};

/// The openpi settings of `turbopi infer`; the same names and defaults as the server's env.
#[derive(Args, Debug, Default)]
pub struct OpenpiArgs {
    /// An observation in openpi's msgpack format (as openpi-client packs it) instead of
    /// --observation; writes the robot's actions, f64 [action_horizon, robot dims].
    #[arg(long, value_name = "FILE")]
    pub openpi: Option<PathBuf>,
    /// The observation format: libero, droid or aloha.
    #[arg(long, requires = "openpi")]
    pub robot: Option<String>,
    /// Assets folder (default: CHECKPOINT/assets, then openpi's other places); norm stats in
    /// ASSETS/ASSET_ID/norm_stats.json.
    #[arg(long, requires = "openpi")]
    pub assets: Option<PathBuf>,
    /// Asset id (default: openpi's for the robot).
    #[arg(long, requires = "openpi")]
    pub asset_id: Option<String>,
    /// norm_stats.json, or `none` (overrides --assets / --asset-id).
    #[arg(long, requires = "openpi")]
    pub norm_stats: Option<String>,
    /// PaliGemma's tokenizer: tokenizer.json or SentencePiece .model, or `none` for
    /// pre-tokenized prompts only (default: CHECKPOINT/tokenizer.json,
    /// CHECKPOINT/paligemma_tokenizer.model, then openpi's cache).
    #[arg(long, requires = "openpi")]
    pub tokenizer: Option<PathBuf>,
    /// pi0.5's discrete-state prompt (default: true for pi0.5).
    #[arg(long, requires = "openpi")]
    pub discrete_state: Option<bool>,
    /// Delta-action mask in make_bool_mask notation (e.g. 6,-1), or none (default: the
    /// robot's).
    #[arg(long, requires = "openpi")]
    pub delta_actions: Option<String>,
    /// ALOHA: convert between ALOHA's joint space and pi's (default true).
    #[arg(long, requires = "openpi")]
    pub adapt_to_pi: Option<bool>,
    /// Prompt for observations without one.
    #[arg(long, requires = "openpi")]
    pub default_prompt: Option<String>,
}

/// An openpi observation ready for the policy, and what its actions need on the way out.
pub struct Frame {
    pub observation: Observation,
    transforms: Transforms,
    ctx: FrameContext,
}

impl OpenpiArgs {
    /// The observation of `--openpi`, None without it.
    pub fn load(&self, checkpoint: &Path, cfg: &Config) -> Result<Option<Frame>> {
        let Some(file) = &self.openpi else {
            return Ok(None);
        };
        let robot: Robot = self
            .robot
            .as_deref()
            .ok_or_else(|| anyhow!("--openpi needs --robot (libero, droid or aloha)"))?
            .parse()
            .map_err(|e| anyhow!("--robot: {e}"))?;
        let mut s = Settings::new(robot, cfg);
        let tokenizer = self
            .tokenizer
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let found = locate(&AssetSearch {
            checkpoint,
            robot,
            tokenizer: tokenizer.as_deref(),
            norm_stats: self.norm_stats.as_deref(),
            assets: self.assets.as_deref(),
            asset_id: self.asset_id.as_deref(),
            cache_dir: openpi_cache_dir_from_env(),
        })?;
        s.norm_stats = found.norm_stats;
        s.tokenizer = found.tokenizer;
        if let Some(d) = self.discrete_state {
            s.discrete_state = d;
        }
        if let Some(m) = &self.delta_actions {
            s.delta_mask = parse_delta_mask(m).map_err(|e| anyhow!("--delta-actions: {e}"))?;
        }
        if let Some(a) = self.adapt_to_pi {
            s.adapt_to_pi = a;
        }
        s.default_prompt = self.default_prompt.clone();
        let transforms = Transforms::new(s, cfg)?;
        let bytes = fsio::read_limited(file, fsio::limit::OPENPI_MSGPACK, "msgpack observation")?;
        let value =
            decode(&bytes, Limits::default()).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        let (input, ctx) = transforms
            .inputs(&value)
            .with_context(|| format!("{}: bad observation", file.display()))?;
        if input.truncated_prompt {
            eprintln!(
                "warning: the prompt is longer than max_token_len {} and was truncated",
                cfg.max_token_len
            );
        }
        let observation = input.observation();
        Ok(Some(Frame {
            observation,
            transforms,
            ctx,
        }))
    }
}

impl Frame {
    /// The robot's actions of the model's `actions`, written as f64 .npy; returns the shape.
    pub fn write_actions(&self, out: &Path, actions: &[f32]) -> Result<[usize; 2]> {
        let robot = self.transforms.outputs(actions, &self.ctx)?;
        let shape = self.transforms.action_shape();
        npy::write_f64(out, &shape, &robot)?;
        Ok(shape)
    }
}

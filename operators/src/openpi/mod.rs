//! openpi's policy transforms for its robot observation formats, so that a client of openpi's
//! `serve_policy.py` gets the same actions from turbo-pi: the robot's input transform (LIBERO,
//! DROID, ALOHA: keys, cameras, image layout, state), `Normalize`, `ResizeImages`,
//! `TokenizePrompt` (pi0.5's discrete-state prompt included) and `PadStatesAndActions` on the
//! way in; `Unnormalize`, `AbsoluteActions` and the robot's output transform on the way out.
//! The server node and `turbopi infer --openpi` share this code.

pub mod assets;
pub mod msgpack;
pub mod ndarray;
pub mod norm;
pub mod resize;
pub mod sentencepiece;
pub mod tokenizer;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::config::Config;
use crate::{Error, Result};
use msgpack::{Out, Value};
use ndarray::{image, numbers, text, Image, Layout, NdArray};
use norm::Stats;
use tokenizer::{pad_tokens, PromptTokenizer, Tokens};

/// The robot observation formats of openpi's example runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Robot {
    /// `observation/image`, `observation/wrist_image` (HWC or CHW), `observation/state`;
    /// actions: the first 7 dims.
    Libero,
    /// `observation/exterior_image_1_left`, `observation/wrist_image_left`,
    /// `observation/joint_position` + `observation/gripper_position`; actions: 8 dims.
    Droid,
    /// `images/{cam_high, cam_low, cam_left_wrist, cam_right_wrist}` (CHW), `state` [14];
    /// actions: 14 dims, converted back to ALOHA's joint and gripper space.
    Aloha,
}

impl FromStr for Robot {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "libero" => Ok(Robot::Libero),
            "droid" => Ok(Robot::Droid),
            "aloha" => Ok(Robot::Aloha),
            other => Err(format!(
                "unknown robot `{other}`: expected libero, droid or aloha"
            )),
        }
    }
}

impl Robot {
    pub fn name(self) -> &'static str {
        match self {
            Robot::Libero => "libero",
            Robot::Droid => "droid",
            Robot::Aloha => "aloha",
        }
    }

    /// The action dims the robot receives.
    pub fn action_dims(self) -> usize {
        match self {
            Robot::Libero => 7,
            Robot::Droid => 8,
            Robot::Aloha => 14,
        }
    }

    /// The `asset_id` of openpi's configs for this robot (`assets/<asset_id>/norm_stats.json`).
    pub fn default_asset_id(self) -> &'static str {
        match self {
            Robot::Libero => "physical-intelligence/libero",
            Robot::Droid => "droid",
            Robot::Aloha => "trossen",
        }
    }

    /// openpi's default delta-action mask (`make_bool_mask` notation): ALOHA trains on joint
    /// deltas with absolute grippers; LIBERO and DROID serve absolute actions.
    pub fn default_delta_actions(self) -> &'static str {
        match self {
            Robot::Aloha => "6,-1,6,-1",
            Robot::Libero | Robot::Droid => "none",
        }
    }

    /// The metadata openpi's server sends on connect for this robot (`policy_metadata`).
    pub fn default_metadata(self) -> serde_json::Value {
        match self {
            Robot::Aloha => serde_json::json!({"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}),
            Robot::Libero | Robot::Droid => serde_json::json!({}),
        }
    }

    /// The keys an observation must carry, for error messages.
    pub fn required_keys(self) -> &'static str {
        match self {
            Robot::Libero => "observation/image, observation/wrist_image, observation/state",
            Robot::Droid => "observation/exterior_image_1_left, observation/wrist_image_left, observation/joint_position, observation/gripper_position",
            Robot::Aloha => "images (with cam_high), state",
        }
    }
}

/// openpi's `make_bool_mask`: "6,-1" -> six true, one false; "none" or "" -> no mask.
pub fn parse_delta_mask(s: &str) -> std::result::Result<Option<Vec<bool>>, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(None);
    }
    let mut mask = Vec::new();
    for part in s.split(',') {
        let n: i64 = part.trim().parse().map_err(|_| {
            format!("`{s}`: expected comma-separated integers like 6,-1 (openpi's make_bool_mask), or none")
        })?;
        mask.extend(std::iter::repeat_n(n > 0, n.unsigned_abs() as usize));
    }
    Ok(Some(mask))
}

/// How observations are turned into model inputs and actions back into robot actions.
pub struct Settings {
    pub robot: Robot,
    /// `norm_stats.json`; None serves un-normalised (openpi without an asset id).
    pub norm_stats: Option<PathBuf>,
    /// pi0.5's state-in-the-prompt format (openpi: `discrete_state_input`, default true for
    /// pi0.5, false for pi0).
    pub discrete_state: bool,
    /// `AbsoluteActions` / `DeltaActions` mask; None when the model predicts absolute actions.
    pub delta_mask: Option<Vec<bool>>,
    /// ALOHA: convert joints and grippers between ALOHA's space and pi's (openpi:
    /// `adapt_to_pi`, default true).
    pub adapt_to_pi: bool,
    /// Prompt used when an observation has none (openpi: `default_prompt`).
    pub default_prompt: Option<String>,
    /// PaliGemma's tokenizer (`tokenizer.json` or SentencePiece `.model`); None accepts only
    /// pre-tokenized prompts. [`assets::locate`] finds it in openpi's places.
    pub tokenizer: Option<PathBuf>,
}

impl Settings {
    /// openpi's defaults for `robot` and the model.
    pub fn new(robot: Robot, cfg: &Config) -> Self {
        Settings {
            robot,
            norm_stats: None,
            discrete_state: cfg.pi05,
            delta_mask: parse_delta_mask(robot.default_delta_actions()).unwrap_or(None),
            adapt_to_pi: true,
            default_prompt: None,
            tokenizer: None,
        }
    }
}

/// `assets/<asset_id>/norm_stats.json` under `assets`.
pub fn norm_stats_path(assets: &Path, asset_id: &str) -> PathBuf {
    assets.join(asset_id).join("norm_stats.json")
}

/// The inputs of one frame, in the shapes the policy's dataflow carries.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    /// u8 [num_images, image_size, image_size, 3].
    pub images: Vec<u8>,
    pub image_masks: Vec<bool>,
    /// Normalised and zero-padded to [action_dim].
    pub state: Vec<f32>,
    /// [max_token_len] ids and mask.
    pub tokens: Vec<i32>,
    pub token_mask: Vec<bool>,
    /// The prompt was longer than `max_token_len` and was cut.
    pub truncated_prompt: bool,
}

impl ModelInput {
    /// The policy's observation of these inputs: the cameras' bytes as they are (each
    /// camera is already the model's size; the backend maps them to [-1, 1] as the dataflow's
    /// policy node does), the state as given. The same values whichever path the frame takes.
    pub fn observation(self) -> crate::Observation {
        crate::Observation {
            images: crate::Pixels::Bytes(self.images),
            image_masks: self.image_masks,
            tokens: self.tokens,
            token_mask: self.token_mask,
            state: Some(self.state),
            noise: None,
        }
    }
}

/// What the output transforms need from the input side: the normalised, padded state.
#[derive(Debug, Clone)]
pub struct FrameContext {
    state: Vec<f64>,
}

/// The loaded transforms of one robot and model.
pub struct Transforms {
    settings: Settings,
    cfg: Config,
    stats: Option<Stats>,
    tokenizer: Option<PromptTokenizer>,
}

/// The cameras of the model's three image slots (base, left wrist, right wrist).
const CAMERAS: usize = 3;

fn missing(robot: Robot, key: &str) -> Error {
    Error::Input(format!(
        "missing key `{key}` (a {} observation needs: {}, and a prompt)",
        robot.name(),
        robot.required_keys()
    ))
}

impl Transforms {
    /// Loads the norm stats and tokenizer named by `settings` and checks them against `cfg`.
    pub fn new(settings: Settings, cfg: &Config) -> Result<Self> {
        let bad = |m: String| Error::InvalidConfig(m);
        if cfg.num_images != CAMERAS {
            return Err(bad(format!(
                "openpi's robot formats fill 3 camera slots (base, left wrist, right wrist); the checkpoint has num_images {}",
                cfg.num_images
            )));
        }
        let dims = settings.robot.action_dims();
        if dims > cfg.action_dim {
            return Err(bad(format!(
                "{} actions have {dims} dims, more than the model's action_dim {}",
                settings.robot.name(),
                cfg.action_dim
            )));
        }
        if let Some(m) = &settings.delta_mask {
            if m.len() > cfg.action_dim {
                return Err(bad(format!(
                    "the delta-action mask covers {} dims, more than the model's action_dim {}",
                    m.len(),
                    cfg.action_dim
                )));
            }
        }
        let stats = match &settings.norm_stats {
            Some(p) => {
                let s = Stats::load(p, cfg.pi05)?;
                s.check(cfg.action_dim).map_err(|reason| Error::Config {
                    path: p.clone(),
                    reason,
                })?;
                Some(s)
            }
            None => None,
        };
        let tokenizer = match &settings.tokenizer {
            Some(p) => Some(PromptTokenizer::from_file(p)?),
            None => None,
        };
        Ok(Transforms {
            settings,
            cfg: cfg.clone(),
            stats,
            tokenizer,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The shape of the actions a robot receives: [action_horizon, robot dims].
    pub fn action_shape(&self) -> [usize; 2] {
        [self.cfg.action_horizon, self.settings.robot.action_dims()]
    }

    /// An observation (a decoded openpi message) to model inputs. Errors name the key and
    /// what was wrong.
    pub fn inputs(&self, obs: &Value) -> Result<(ModelInput, FrameContext)> {
        if !matches!(obs, Value::Map(_)) || NdArray::from_value(obs, "observation").is_some() {
            return Err(Error::Input(format!(
                "expected the observation as a map of keys to values, found {}",
                obs.kind()
            )));
        }
        let robot = self.settings.robot;
        let (cams, mut state) = match robot {
            Robot::Libero => self.libero(obs)?,
            Robot::Droid => self.droid(obs)?,
            Robot::Aloha => self.aloha(obs)?,
        };
        if let Some(bad) = state.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "the robot state holds a non-finite value ({}) at index {bad}",
                state[bad]
            )));
        }
        if let Some(st) = self.stats.as_ref() {
            if let Some(s) = &st.state {
                st.normalize("state", s, &mut state)?;
            }
        }
        // The model takes float32: a finite state can still overflow it (1e39, or a large
        // value over a tiny std), and infinities would reach the model.
        if let Some(bad) = state.iter().position(|&v| !(v as f32).is_finite()) {
            return Err(Error::Input(format!(
                "the robot state at index {bad} is {} after normalisation, beyond float32's range",
                state[bad]
            )));
        }
        let s = self.cfg.image_size;
        let mut images = Vec::with_capacity(CAMERAS * s * s * 3);
        let mut image_masks = Vec::with_capacity(CAMERAS);
        for (key, cam) in cams {
            match cam {
                Some(img) => {
                    let px = resize::resize_with_pad(&img.data, img.height, img.width, s)
                        .ok_or_else(|| {
                            Error::Input(format!(
                                "`{key}`: a {}x{} image is too elongated to fit {s}x{s} (a side would shrink to 0 pixels)",
                                img.height, img.width
                            ))
                        })?;
                    images.extend(px);
                    image_masks.push(true);
                }
                // openpi: np.zeros_like(base_image), masked; resizing zeros gives zeros.
                None => {
                    images.resize(images.len() + s * s * 3, 0);
                    image_masks.push(false);
                }
            }
        }
        let tokens = self.prompt(obs, &state)?;
        let ad = self.cfg.action_dim;
        if state.len() > ad {
            return Err(Error::Input(format!(
                "the robot state has {} dims, more than the model's action_dim {ad}",
                state.len()
            )));
        }
        state.resize(ad, 0.0);
        Ok((
            ModelInput {
                images,
                image_masks,
                state: state.iter().map(|&v| v as f32).collect(),
                tokens: tokens.ids,
                token_mask: tokens.mask,
                truncated_prompt: tokens.truncated,
            },
            FrameContext { state },
        ))
    }

    /// The model's actions [action_horizon, action_dim] to the robot's [action_horizon, dims]
    /// (f64, as openpi returns them).
    pub fn outputs(&self, actions: &[f32], ctx: &FrameContext) -> Result<Vec<f64>> {
        let (h, ad) = (self.cfg.action_horizon, self.cfg.action_dim);
        if actions.len() != h * ad {
            return Err(Error::Input(format!(
                "expected {h}x{ad} model actions, found {} values",
                actions.len()
            )));
        }
        let mut a: Vec<f64> = actions.iter().map(|&v| v as f64).collect();
        let mut state = ctx.state.clone();
        if let Some(st) = &self.stats {
            if let Some(s) = &st.actions {
                st.unnormalize("actions", s, &mut a, ad)?;
            }
            if let Some(s) = &st.state {
                st.unnormalize("state", s, &mut state, ad)?;
            }
        }
        if let Some(mask) = &self.settings.delta_mask {
            for row in a.chunks_exact_mut(ad) {
                for (d, &m) in mask.iter().enumerate() {
                    if m {
                        row[d] += state[d];
                    }
                }
            }
        }
        let dims = self.settings.robot.action_dims();
        let mut out = Vec::with_capacity(h * dims);
        for row in a.chunks_exact(ad) {
            let row = &row[..dims];
            if self.settings.robot == Robot::Aloha && self.settings.adapt_to_pi {
                out.extend(aloha::encode_actions(row));
            } else {
                out.extend_from_slice(row);
            }
        }
        Ok(out)
    }

    /// The response to a client: `actions` plus the timing maps openpi's server sends.
    pub fn response(&self, actions: &[f64], timings: Vec<(String, Out)>) -> Out {
        let [h, d] = self.action_shape();
        let mut m = vec![("actions".to_string(), Out::f64_array(vec![h, d], actions))];
        m.extend(timings);
        Out::Map(m)
    }

    fn get<'v, 'a>(&self, obs: &'v Value<'a>, key: &str) -> Result<&'v Value<'a>> {
        obs.get(key)
            .ok_or_else(|| missing(self.settings.robot, key))
    }

    fn vector(&self, obs: &Value, key: &str) -> Result<Vec<f64>> {
        let (shape, v) = numbers(self.get(obs, key)?, key)?;
        if shape.len() != 1 {
            return Err(Error::Input(format!(
                "`{key}`: expected a 1-D vector, found shape {shape:?}"
            )));
        }
        Ok(v)
    }

    fn libero(&self, obs: &Value) -> Result<(Cameras, Vec<f64>)> {
        let base = image(
            self.get(obs, "observation/image")?,
            "observation/image",
            Layout::HwcOrChw,
        )?;
        let wrist = image(
            self.get(obs, "observation/wrist_image")?,
            "observation/wrist_image",
            Layout::HwcOrChw,
        )?;
        let state = self.vector(obs, "observation/state")?;
        Ok((
            [
                ("observation/image", Some(base)),
                ("observation/wrist_image", Some(wrist)),
                ("right_wrist (padding)", None),
            ],
            state,
        ))
    }

    fn droid(&self, obs: &Value) -> Result<(Cameras, Vec<f64>)> {
        let key = "observation/gripper_position";
        let (shape, gripper) = numbers(self.get(obs, key)?, key)?;
        if shape.len() > 1 {
            return Err(Error::Input(format!(
                "`{key}`: expected a number or a 1-D vector, found shape {shape:?}"
            )));
        }
        let mut state = self.vector(obs, "observation/joint_position")?;
        state.extend(gripper);
        let base = image(
            self.get(obs, "observation/exterior_image_1_left")?,
            "observation/exterior_image_1_left",
            Layout::HwcOrChw,
        )?;
        let wrist = image(
            self.get(obs, "observation/wrist_image_left")?,
            "observation/wrist_image_left",
            Layout::HwcOrChw,
        )?;
        Ok((
            [
                ("observation/exterior_image_1_left", Some(base)),
                ("observation/wrist_image_left", Some(wrist)),
                ("right_wrist (padding)", None),
            ],
            state,
        ))
    }

    fn aloha(&self, obs: &Value) -> Result<(Cameras, Vec<f64>)> {
        let images = self.get(obs, "images")?;
        let Value::Map(entries) = images else {
            return Err(Error::Input(format!(
                "`images`: expected a map of camera name to image, found {}",
                images.kind()
            )));
        };
        for (k, _) in entries {
            let name = k.key_str().unwrap_or("(not text)");
            if !aloha::CAMERAS.contains(&name) {
                return Err(Error::Input(format!(
                    "`images`: unknown camera `{}` (expected some of {})",
                    ndarray::short(name),
                    aloha::CAMERAS.join(", ")
                )));
            }
        }
        let cam = |name: &'static str| -> Result<Option<Image>> {
            match images.get(name) {
                Some(v) => image(v, name, Layout::Chw).map(Some),
                None => Ok(None),
            }
        };
        let base = cam("cam_high")?.ok_or_else(|| missing(Robot::Aloha, "images/cam_high"))?;
        // openpi decodes every camera it is sent, and uses three of them.
        cam("cam_low")?;
        let state = self.vector(obs, "state")?;
        if state.len() != 14 {
            return Err(Error::Input(format!(
                "`state`: expected ALOHA's 14 joint and gripper values, found {}",
                state.len()
            )));
        }
        let state = if self.settings.adapt_to_pi {
            aloha::decode_state(&state)
        } else {
            state
        };
        Ok((
            [
                ("images/cam_high", Some(base)),
                ("images/cam_left_wrist", cam("cam_left_wrist")?),
                ("images/cam_right_wrist", cam("cam_right_wrist")?),
            ],
            state,
        ))
    }

    /// The prompt's tokens: `tokenized_prompt` (+ `tokenized_prompt_mask`) as sent, or
    /// `prompt` (or the default prompt) through the tokenizer.
    fn prompt(&self, obs: &Value, state: &[f64]) -> Result<Tokens> {
        let max_len = self.cfg.max_token_len;
        if let Some(t) = obs.get("tokenized_prompt") {
            if obs.get("prompt").is_some() {
                return Err(Error::Input(
                    "send either `prompt` or `tokenized_prompt`, not both".into(),
                ));
            }
            return self.pretokenized(obs, t, max_len);
        }
        let prompt = match obs.get("prompt") {
            Some(p) => text(p, "prompt")?,
            None => Cow::Borrowed(self.settings.default_prompt.as_deref().ok_or_else(|| {
                Error::Input("missing key `prompt` (and the server has no default prompt)".into())
            })?),
        };
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::Input(
                "this server has no tokenizer: send `tokenized_prompt` (int [L]) and `tokenized_prompt_mask` (bool [L]) instead of `prompt`".into(),
            )
        })?;
        let discrete = self.settings.discrete_state.then_some(state);
        let tokens = tok.tokenize(&prompt, discrete, max_len)?;
        self.check_vocab(&tokens.ids, "prompt")?;
        Ok(tokens)
    }

    fn pretokenized(&self, obs: &Value, t: &Value, max_len: usize) -> Result<Tokens> {
        let key = "tokenized_prompt";
        let ids = int_vector(t, key)?;
        if ids.len() > max_len {
            return Err(Error::Input(format!(
                "`{key}`: {} tokens, more than the model's max_token_len {max_len}",
                ids.len()
            )));
        }
        let ids: Vec<i32> = ids
            .into_iter()
            .map(|v| {
                i32::try_from(v)
                    .map_err(|_| Error::Input(format!("`{key}`: id {v} is out of range")))
            })
            .collect::<Result<_>>()?;
        self.check_vocab(&ids, key)?;
        let mask = match obs.get("tokenized_prompt_mask") {
            Some(m) => {
                let m = int_vector(m, "tokenized_prompt_mask")?;
                if m.len() != ids.len() {
                    return Err(Error::Input(format!(
                        "`tokenized_prompt_mask` has {} entries, `tokenized_prompt` {}",
                        m.len(),
                        ids.len()
                    )));
                }
                Some(m.into_iter().map(|v| v != 0).collect())
            }
            None => None,
        };
        Ok(pad_tokens(ids, mask, max_len))
    }

    fn check_vocab(&self, ids: &[i32], key: &str) -> Result<()> {
        let v = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= v) {
            return Err(Error::Input(format!(
                "`{key}`: token id {bad} is outside the model's vocabulary [0, {v})"
            )));
        }
        Ok(())
    }
}

/// (key for error messages, image) of the three camera slots; None is masked padding.
type Cameras = [(&'static str, Option<Image>); CAMERAS];

/// A 1-D vector of integers (a numpy integer/bool array or a list).
fn int_vector(v: &Value, key: &str) -> Result<Vec<i64>> {
    if let Some(a) = NdArray::from_value(v, key) {
        let a = a?;
        if a.shape.len() != 1 {
            return Err(Error::Input(format!(
                "`{key}`: expected a 1-D vector, found shape {:?}",
                a.shape
            )));
        }
        return a.to_i64(key);
    }
    let (shape, vals) = numbers(v, key)?;
    if shape.len() != 1 {
        return Err(Error::Input(format!(
            "`{key}`: expected a 1-D vector, found shape {shape:?}"
        )));
    }
    vals.iter()
        .map(|&x| {
            if x.fract() == 0.0 && x.abs() < 9.0e15 {
                Ok(x as i64)
            } else {
                Err(Error::Input(format!(
                    "`{key}`: expected integers, found {x}"
                )))
            }
        })
        .collect()
}

/// ALOHA's conversions between its joint/gripper space and pi's (openpi's `aloha_policy`).
pub mod aloha {
    pub const CAMERAS: [&str; 4] = ["cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist"];

    /// Joints whose sign differs between ALOHA and pi.
    const FLIP: [f64; 14] = [
        1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0,
    ];
    const GRIPPERS: [usize; 2] = [6, 13];

    fn normalize(x: f64, lo: f64, hi: f64) -> f64 {
        (x - lo) / (hi - lo)
    }

    fn unnormalize(x: f64, lo: f64, hi: f64) -> f64 {
        x * (hi - lo) + lo
    }

    /// ALOHA's linear gripper position to pi's normalised angle.
    fn gripper_to_angular(v: f64) -> f64 {
        let v = unnormalize(v, 0.01844, 0.05800);
        let (arm, horn) = (0.036f64, 0.022f64);
        let x = (horn.powi(2) + v.powi(2) - arm.powi(2)) / (2.0 * horn * v);
        normalize(x.clamp(-1.0, 1.0).asin(), 0.5476, 1.6296)
    }

    /// pi's gripper value to ALOHA's gripper joint.
    fn gripper_from_angular(v: f64) -> f64 {
        normalize(v + 0.5476, -0.6213, 1.4910)
    }

    /// ALOHA's state [14] to pi's.
    pub fn decode_state(state: &[f64]) -> Vec<f64> {
        let mut s: Vec<f64> = state.iter().zip(FLIP).map(|(v, f)| f * v).collect();
        for g in GRIPPERS {
            s[g] = gripper_to_angular(s[g]);
        }
        s
    }

    /// pi's actions [14] to ALOHA's.
    pub fn encode_actions(row: &[f64]) -> Vec<f64> {
        let mut a: Vec<f64> = row.iter().zip(FLIP).map(|(v, f)| f * v).collect();
        for g in GRIPPERS {
            a[g] = gripper_from_angular(a[g]);
        }
        a
    }
}

#[cfg(test)]
mod tests;

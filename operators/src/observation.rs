//! The observation directory (images, masks, prompt tokens, state, optional noise), checked
//! against the config and turned into model inputs.

use std::borrow::Cow;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::config::Config;
use crate::{image, npy, Error, Result};

/// A frame's cameras, [num_images, image_size, image_size, 3] (HWC RGB).
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// In the model's range [-1, 1].
    Unit(Vec<f32>),
    /// As cameras give them. The model's value of x is x/255*2-1 ([`image::extend_unit`]),
    /// computed where the image is used: the CUDA backend uploads these bytes (a quarter of
    /// the f32 values) and maps them on the GPU, with the same bits.
    Bytes(Vec<u8>),
}

impl Pixels {
    /// Values (one per channel of each pixel).
    pub fn len(&self) -> usize {
        match self {
            Pixels::Unit(v) => v.len(),
            Pixels::Bytes(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in [-1, 1], mapped here for [`Pixels::Bytes`].
    pub fn unit(&self) -> Cow<'_, [f32]> {
        match self {
            Pixels::Unit(v) => Cow::Borrowed(v),
            Pixels::Bytes(b) => {
                let mut v = Vec::with_capacity(b.len());
                image::extend_unit(&mut v, b);
                Cow::Owned(v)
            }
        }
    }
}

impl From<Vec<f32>> for Pixels {
    fn from(v: Vec<f32>) -> Self {
        Pixels::Unit(v)
    }
}

impl From<Vec<u8>> for Pixels {
    fn from(b: Vec<u8>) -> Self {
        Pixels::Bytes(b)
    }
}

/// One frame's model inputs.
#[derive(Debug, Clone)]
pub struct Observation {
    /// [num_images, image_size, image_size, 3].
    pub images: Pixels,
    pub image_masks: Vec<bool>,
    pub tokens: Vec<i32>,
    pub token_mask: Vec<bool>,
    /// [action_dim]; required by pi0.
    pub state: Option<Vec<f32>>,
    /// [action_horizon, action_dim], when the directory provides it.
    pub noise: Option<Vec<f32>>,
}

fn expect_shape(path: &Path, what: &str, found: &[usize], ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Array {
            path: path.to_path_buf(),
            expected: what.to_string(),
            found: format!("shape {found:?}"),
        })
    }
}

impl Observation {
    pub fn load(dir: &Path, cfg: &Config) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Observation(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let n = cfg.num_images;
        let p = dir.join("images.npy");
        let imgs = npy::read_u8(&p)?;
        let s = &imgs.shape;
        expect_shape(
            &p,
            &format!("uint8 [{n}, H, W, 3]"),
            s,
            s.len() == 4 && s[0] == n && s[1] > 0 && s[2] > 0 && s[3] == 3,
        )?;
        let (h, w) = (s[1], s[2]);
        let mut images = Vec::with_capacity(n * cfg.image_size * cfg.image_size * 3);
        for pixels in imgs.data.chunks_exact(h * w * 3) {
            images.extend(image::to_model_input(pixels, h, w, cfg.image_size));
        }

        let p = dir.join("image_masks.npy");
        let masks = npy::read_bool(&p)?;
        expect_shape(&p, &format!("bool [{n}]"), &masks.shape, masks.shape == [n])?;

        let (tokens, token_mask) = load_prompt(dir, cfg)?;

        let ad = cfg.action_dim;
        let p = dir.join("state.npy");
        let state = if p.exists() {
            let s = npy::read_f32(&p)?;
            expect_shape(&p, &format!("float32 [{ad}]"), &s.shape, s.shape == [ad])?;
            Some(s.data)
        } else if cfg.pi05 {
            None
        } else {
            return Err(Error::Observation(format!(
                "{}: missing; pi0 needs the robot state, float32 [{ad}]",
                p.display()
            )));
        };

        let p = dir.join("noise.npy");
        let noise = if p.exists() {
            let z = npy::read_f32(&p)?;
            let hz = cfg.action_horizon;
            expect_shape(
                &p,
                &format!("float32 [{hz}, {ad}]"),
                &z.shape,
                z.shape == [hz, ad],
            )?;
            Some(z.data)
        } else {
            None
        };

        Ok(Observation {
            images: Pixels::Unit(images),
            image_masks: masks.data,
            tokens,
            token_mask,
            state,
            noise,
        })
    }
}

/// Refuses a frame that shows the model nothing: every camera masked and no real prompt
/// token. The prefix would then be empty; rather than define actions for it (openpi's
/// attention over an all-masked prefix is not meaningful either), every backend refuses it.
pub fn check_visible(real_images: usize, real_tokens: usize) -> Result<()> {
    if real_images == 0 && real_tokens == 0 {
        return Err(Error::Input(
            "the observation shows the model nothing: every camera is masked (image_masks all false) and the prompt has no real token (token_mask all false); at least one image or prompt token is needed".into(),
        ));
    }
    Ok(())
}

/// Reads `tokens.npy` (int32 [L], L <= max_token_len, ids in the vocabulary) and
/// `token_mask.npy` (bool [L]) from `dir`.
pub fn load_prompt(dir: &Path, cfg: &Config) -> Result<(Vec<i32>, Vec<bool>)> {
    let p = dir.join("tokens.npy");
    let tokens = npy::read_i32(&p)?;
    let l = cfg.max_token_len;
    expect_shape(
        &p,
        &format!("int32 [L] with L <= max_token_len {l}"),
        &tokens.shape,
        tokens.shape.len() == 1 && tokens.shape[0] <= l,
    )?;
    if let Some(bad) = tokens
        .data
        .iter()
        .find(|&&t| t < 0 || t as usize >= cfg.vocab_size)
    {
        return Err(Error::Array {
            path: p,
            expected: format!("token ids in [0, {})", cfg.vocab_size),
            found: format!("id {bad}"),
        });
    }
    let p = dir.join("token_mask.npy");
    let token_mask = npy::read_bool(&p)?;
    expect_shape(
        &p,
        &format!("bool [{}] (the length of tokens.npy)", tokens.shape[0]),
        &token_mask.shape,
        token_mask.shape == tokens.shape,
    )?;

    Ok((tokens.data, token_mask.data))
}

/// Standard-normal noise [action_horizon, action_dim] from `seed`.
pub fn noise_from_seed(cfg: &Config, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..cfg.action_horizon * cfg.action_dim)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Writes a sample observation for `cfg`: a synthetic scene per camera (the last camera
/// masked when there are three, as openpi's single-arm setups do), a right-padded prompt,
/// a state and noise.
pub fn write_sample(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let (n, s) = (cfg.num_images, cfg.image_size);
    let mut pixels = Vec::with_capacity(n * s * s * 3);
    for cam in 0..n {
        for y in 0..s {
            for x in 0..s {
                let fx = x as f32 / s as f32;
                let fy = y as f32 / s as f32;
                let cx = 0.3 + 0.2 * cam as f32;
                let blob = ((fx - cx).powi(2) + (fy - 0.5).powi(2) < 0.02) as u8;
                pixels.push((255.0 * fx) as u8 ^ (blob * 200));
                pixels.push((255.0 * fy) as u8);
                pixels.push(rng.random_range(0..=255u8) / 4 + 64 * cam as u8);
            }
        }
    }
    npy::write_u8(&dir.join("images.npy"), &[n, s, s, 3], &pixels)?;
    let masks: Vec<bool> = (0..n).map(|i| n < 3 || i + 1 < n).collect();
    npy::write_bool(&dir.join("image_masks.npy"), &[n], &masks)?;
    let l = cfg.max_token_len;
    let real = (l * 2 / 3).max(1);
    let vocab = cfg.vocab_size.min(i32::MAX as usize) as i32;
    let tokens: Vec<i32> = (0..l)
        .map(|i| {
            if i < real {
                rng.random_range(0..vocab)
            } else {
                0
            }
        })
        .collect();
    let token_mask: Vec<bool> = (0..l).map(|i| i < real).collect();
    npy::write_i32(&dir.join("tokens.npy"), &[l], &tokens)?;
    npy::write_bool(&dir.join("token_mask.npy"), &[l], &token_mask)?;
    let state: Vec<f32> = (0..cfg.action_dim)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    npy::write_f32(&dir.join("state.npy"), &[cfg.action_dim], &state)?;
    let noise = noise_from_seed(cfg, seed);
    npy::write_f32(
        &dir.join("noise.npy"),
        &[cfg.action_horizon, cfg.action_dim],
        &noise,
    )?;
    Ok(())
}

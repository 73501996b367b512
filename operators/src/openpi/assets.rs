//! Where PaliGemma's tokenizer and a checkpoint's norm stats are, in openpi's layout: the one
//! search the openpi server and `turbopi infer --openpi` share. A setting given explicitly wins
//! (a missing file is an error, `none` opts out); otherwise the places below are tried in order
//! and, when none has the file, one error lists every place looked at.
//!
//! - Tokenizer: `CHECKPOINT/tokenizer.json` (Hugging Face format),
//!   `CHECKPOINT/paligemma_tokenizer.model`, then openpi's download of
//!   `gs://big_vision/paligemma_tokenizer.model`: `<cache>/big_vision/paligemma_tokenizer.model`,
//!   the cache being `$OPENPI_DATA_HOME` or `~/.cache/openpi` (openpi's `download.get_cache_dir`
//!   and `maybe_download`, which keeps a `gs://bucket/path` at `<cache>/bucket/path`).
//! - Norm stats: `<assets>/<asset_id>/norm_stats.json` with `<assets>` = `CHECKPOINT/assets`
//!   (openpi's `policy_config.create_trained_policy` loads them from there), then the JAX
//!   checkpoint a PyTorch one was converted from, by openpi's naming (`NAME_pytorch` next to
//!   `NAME`, and openpi's download of `gs://openpi-assets/checkpoints/NAME`): openpi's
//!   `convert_jax_model_to_pytorch.py` copies the assets from the wrong folder, so a converted
//!   checkpoint often has none.

use std::path::{Path, PathBuf};

use super::Robot;
use crate::{Error, Result};

/// The file name openpi gives PaliGemma's SentencePiece model.
pub const PALIGEMMA_MODEL: &str = "paligemma_tokenizer.model";

/// What a search starts from.
#[derive(Debug, Clone)]
pub struct AssetSearch<'a> {
    pub checkpoint: &'a Path,
    pub robot: Robot,
    /// The tokenizer given explicitly (env `TOKENIZER`, `--tokenizer`): a file, or `none`.
    pub tokenizer: Option<&'a str>,
    /// The norm stats given explicitly (env `NORM_STATS`, `--norm-stats`): a file, or `none`.
    pub norm_stats: Option<&'a str>,
    /// The assets folder given explicitly (env `ASSETS`, `--assets`).
    pub assets: Option<&'a Path>,
    /// The asset id (env `ASSET_ID`, `--asset-id`); default: openpi's for the robot.
    pub asset_id: Option<&'a str>,
    /// openpi's cache folder ([`openpi_cache_dir`]); None when it cannot be known.
    pub cache_dir: Option<PathBuf>,
}

/// The files found; None where the setting is `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    pub tokenizer: Option<PathBuf>,
    pub norm_stats: Option<PathBuf>,
}

/// openpi's cache folder: `$OPENPI_DATA_HOME` (with `~` expanded), else `~/.cache/openpi`.
/// `data_home` and `home` are the values of those variables (empty counts as unset).
pub fn openpi_cache_dir(data_home: Option<&str>, home: Option<&Path>) -> Option<PathBuf> {
    let home = home.filter(|h| !h.as_os_str().is_empty());
    let expand = |p: &str| -> Option<PathBuf> {
        if p == "~" {
            return home.map(Path::to_path_buf);
        }
        match p.strip_prefix("~/") {
            Some(rest) => home.map(|h| h.join(rest)),
            None => Some(PathBuf::from(p)),
        }
    };
    match data_home.map(str::trim).filter(|s| !s.is_empty()) {
        Some(d) => expand(d),
        None => home.map(|h| h.join(".cache/openpi")),
    }
}

/// [`openpi_cache_dir`] of this process's `OPENPI_DATA_HOME` and `HOME`.
pub fn openpi_cache_dir_from_env() -> Option<PathBuf> {
    let data = std::env::var("OPENPI_DATA_HOME").ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    openpi_cache_dir(data.as_deref(), home.as_deref())
}

/// The places tried for the tokenizer when none is given, with what each one is: the
/// checkpoint's (when there is one), then openpi's cache.
pub fn tokenizer_places(
    checkpoint: Option<&Path>,
    cache_dir: Option<&Path>,
) -> Vec<(PathBuf, String)> {
    let mut places = Vec::new();
    if let Some(ck) = checkpoint {
        places.push((
            ck.join("tokenizer.json"),
            "the checkpoint's Hugging Face tokenizer".to_string(),
        ));
        places.push((
            ck.join(PALIGEMMA_MODEL),
            "the checkpoint's SentencePiece model".to_string(),
        ));
    }
    if let Some(c) = cache_dir {
        places.push((
            c.join("big_vision").join(PALIGEMMA_MODEL),
            "openpi's download of gs://big_vision/paligemma_tokenizer.model".to_string(),
        ));
    }
    places
}

/// The tokenizer: `explicit` (a file, or `none`), else the first of [`tokenizer_places`] that
/// exists; an error lists them all when none does.
pub fn find_tokenizer(
    explicit_value: Option<&str>,
    checkpoint: Option<&Path>,
    cache_dir: Option<&Path>,
) -> Result<Option<PathBuf>> {
    if let Some(v) = explicit_value {
        return explicit(v, "the tokenizer (TOKENIZER, --tokenizer)");
    }
    let places = tokenizer_places(checkpoint, cache_dir);
    if let Some((p, _)) = places.iter().find(|(p, _)| p.is_file()) {
        return Ok(Some(p.clone()));
    }
    let cache_note = match cache_dir {
        Some(_) => "",
        None => "\n  (openpi's cache folder is unknown: neither OPENPI_DATA_HOME nor HOME is set)",
    };
    Err(Error::InvalidConfig(format!(
        "no tokenizer for text prompts; looked for:{}{cache_note}\nset TOKENIZER (turbopi: --tokenizer) to PaliGemma's tokenizer.json or {PALIGEMMA_MODEL} (openpi downloads it from gs://big_vision/{PALIGEMMA_MODEL}), or to `none` to accept only pre-tokenized prompts",
        list(&places)
    )))
}

/// The places tried for the norm stats when no file is given.
pub fn norm_stats_places(
    checkpoint: &Path,
    assets: Option<&Path>,
    asset_id: &str,
    cache_dir: Option<&Path>,
) -> Vec<(PathBuf, String)> {
    let in_assets = |a: &Path| super::norm_stats_path(a, asset_id);
    if let Some(a) = assets {
        return vec![(in_assets(a), "the assets folder given".to_string())];
    }
    let mut places = vec![(
        in_assets(&checkpoint.join("assets")),
        "the checkpoint's assets".to_string(),
    )];
    let name = checkpoint
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix("_pytorch"))
        .filter(|n| !n.is_empty());
    if let Some(name) = name {
        if let Some(parent) = checkpoint.parent() {
            places.push((
                in_assets(&parent.join(name).join("assets")),
                format!("the JAX checkpoint `{name}` next to it"),
            ));
        }
        if let Some(c) = cache_dir {
            places.push((
                in_assets(
                    &c.join("openpi-assets/checkpoints")
                        .join(name)
                        .join("assets"),
                ),
                format!("openpi's download of gs://openpi-assets/checkpoints/{name}"),
            ));
        }
    }
    places.dedup_by(|a, b| a.0 == b.0);
    places
}

fn list(places: &[(PathBuf, String)]) -> String {
    places
        .iter()
        .map(|(p, what)| format!("\n  - {} ({what})", p.display()))
        .collect()
}

fn explicit(value: &str, setting: &str) -> Result<Option<PathBuf>> {
    if value == "none" {
        return Ok(None);
    }
    let p = PathBuf::from(value);
    if !p.is_file() {
        return Err(Error::InvalidConfig(format!(
            "{setting}: {} is not a file",
            p.display()
        )));
    }
    Ok(Some(p))
}

/// Finds the norm stats and the tokenizer (see the module's doc for the order); when both
/// are missing, the error names both searches.
pub fn locate(q: &AssetSearch) -> Result<Assets> {
    let cache = q.cache_dir.as_deref();
    let norm_stats = find_norm_stats(q, cache);
    let tokenizer = find_tokenizer(q.tokenizer, Some(q.checkpoint), cache);
    match (norm_stats, tokenizer) {
        (Ok(norm_stats), Ok(tokenizer)) => Ok(Assets {
            tokenizer,
            norm_stats,
        }),
        (Err(a), Err(b)) => Err(Error::InvalidConfig(format!("{a}\n{b}"))),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

fn find_norm_stats(q: &AssetSearch, cache: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(v) = q.norm_stats {
        return explicit(v, "the norm stats (NORM_STATS, --norm-stats)");
    }
    let id = q.asset_id.unwrap_or(q.robot.default_asset_id());
    let places = norm_stats_places(q.checkpoint, q.assets, id, cache);
    if let Some((p, _)) = places.iter().find(|(p, _)| p.is_file()) {
        return Ok(Some(p.clone()));
    }
    Err(Error::InvalidConfig(format!(
        "no norm stats for asset id `{id}`; looked for:{}\nset ASSETS and ASSET_ID (turbopi: --assets, --asset-id; the file is <assets>/<asset_id>/norm_stats.json), NORM_STATS (--norm-stats) to a norm_stats.json, or NORM_STATS=none to run without normalisation",
        list(&places)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn openpi_cache_dir_follows_openpi() {
        let home = Path::new("/home/u");
        assert_eq!(
            openpi_cache_dir(None, Some(home)),
            Some(PathBuf::from("/home/u/.cache/openpi"))
        );
        assert_eq!(
            openpi_cache_dir(Some("~/data"), Some(home)),
            Some(PathBuf::from("/home/u/data"))
        );
        assert_eq!(
            openpi_cache_dir(Some("/d"), None),
            Some(PathBuf::from("/d"))
        );
        assert_eq!(
            openpi_cache_dir(Some(" "), Some(home)),
            openpi_cache_dir(None, Some(home))
        );
        assert_eq!(openpi_cache_dir(None, None), None);
        assert_eq!(openpi_cache_dir(Some("~/x"), None), None);
    }

    #[test]
    fn search_order_and_the_error_listing_every_place() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ckpts/pi05_libero_pytorch");
        std::fs::create_dir_all(&ck).unwrap();
        let cache = dir.path().join("cache");
        let q = AssetSearch {
            checkpoint: &ck,
            robot: Robot::Libero,
            tokenizer: None,
            norm_stats: None,
            assets: None,
            asset_id: None,
            cache_dir: Some(cache.clone()),
        };
        let e = locate(&q).unwrap_err().to_string();
        let tj = ck.join("tokenizer.json");
        let tm = ck.join("paligemma_tokenizer.model");
        let tc = cache.join("big_vision/paligemma_tokenizer.model");
        for p in [&tj, &tm, &tc] {
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
        assert!(e.contains("`none`"), "{e}");
        // Both searches failed: one error names both.
        assert!(
            e.contains("no norm stats for asset id") && e.contains("no tokenizer"),
            "{e}"
        );
        // Found in order: the cache, then the checkpoint's .model, then its tokenizer.json.
        touch(&tc);
        let none = Some("none");
        let only_tok = AssetSearch {
            norm_stats: none,
            ..q.clone()
        };
        assert_eq!(locate(&only_tok).unwrap().tokenizer, Some(tc.clone()));
        touch(&tm);
        assert_eq!(locate(&only_tok).unwrap().tokenizer, Some(tm.clone()));
        touch(&tj);
        assert_eq!(locate(&only_tok).unwrap().tokenizer, Some(tj.clone()));
        // Explicit wins; a missing explicit file is an error; `none` opts out.
        let other = dir.path().join("tok.model");
        let e = locate(&AssetSearch {
            tokenizer: Some(other.to_str().unwrap()),
            ..only_tok.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("tok.model is not a file"), "{e}");
        touch(&other);
        let found = locate(&AssetSearch {
            tokenizer: Some(other.to_str().unwrap()),
            ..only_tok.clone()
        })
        .unwrap();
        assert_eq!(found.tokenizer, Some(other.clone()));
        let found = locate(&AssetSearch {
            tokenizer: none,
            ..only_tok.clone()
        })
        .unwrap();
        assert_eq!(
            found,
            Assets {
                tokenizer: None,
                norm_stats: None
            }
        );

        // Norm stats: every place in the error, then found in order.
        let e = locate(&q).unwrap_err().to_string();
        let id = "physical-intelligence/libero";
        let in_ck = ck.join("assets").join(id).join("norm_stats.json");
        let sibling = dir
            .path()
            .join("ckpts/pi05_libero/assets")
            .join(id)
            .join("norm_stats.json");
        let in_cache = cache
            .join("openpi-assets/checkpoints/pi05_libero/assets")
            .join(id)
            .join("norm_stats.json");
        for p in [&in_ck, &sibling, &in_cache] {
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
        assert!(e.contains(&format!("asset id `{id}`")), "{e}");
        touch(&in_cache);
        assert_eq!(locate(&q).unwrap().norm_stats, Some(in_cache.clone()));
        touch(&sibling);
        assert_eq!(locate(&q).unwrap().norm_stats, Some(sibling.clone()));
        touch(&in_ck);
        assert_eq!(locate(&q).unwrap().norm_stats, Some(in_ck.clone()));
        // ASSETS and ASSET_ID replace the search.
        let assets = dir.path().join("a");
        let q2 = AssetSearch {
            assets: Some(&assets),
            asset_id: Some("trossen"),
            ..q.clone()
        };
        let e = locate(&q2).unwrap_err().to_string();
        assert!(
            e.contains(&assets.join("trossen/norm_stats.json").display().to_string()),
            "{e}"
        );
        assert!(!e.contains(&in_ck.display().to_string()), "{e}");
        // A checkpoint not named *_pytorch has one place; without a cache folder it says so.
        let plain = dir.path().join("plain");
        let e = locate(&AssetSearch {
            checkpoint: &plain,
            cache_dir: None,
            ..q.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("neither OPENPI_DATA_HOME nor HOME"), "{e}");
        assert_eq!(
            norm_stats_places(&plain, None, "droid", Some(&cache)).len(),
            1
        );
    }
}

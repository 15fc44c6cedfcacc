//! Where a model comes from: a local Hugging Face-format directory, or a hub repo id downloaded with `hf-hub`
//! into the standard cache (`HF_HOME` / `HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache only; a revision pins
//! a commit or branch). Either way the result is a directory that [`medvl_model::load_dir`] reads.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{EngineError, Result};

/// Files a model directory may hold besides the weights; only `config.json` and `tokenizer.json` are required.
const OPTIONAL_FILES: [&str; 6] = [
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer_config.json",
];

/// A model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with `config.json`, `tokenizer.json`, safetensors.
    Local(PathBuf),
    /// A hub repo id such as `Qwen/Qwen2.5-VL-7B-Instruct`, at a revision (branch, tag or commit).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` by default.
        revision: String,
    },
}

impl ModelSource {
    /// An existing directory is local; anything else of the form `owner/name` is a hub repo id.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let looks_like_repo =
            spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
        if !looks_like_repo {
            return Err(EngineError::Source {
                model: spec.into(),
                reason: "no such directory, and not a hub repo id (owner/name)".into(),
            });
        }
        Ok(Self::Hub {
            repo: spec.into(),
            revision: revision.unwrap_or("main").into(),
        })
    }

    /// The local directory holding the model, downloading it first for a hub source.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            Self::Local(dir) => {
                check_dir(dir)?;
                Ok(dir.clone())
            }
            Self::Hub { repo, revision } => download(repo, revision),
        }
    }
}

/// Errors naming the missing file when a directory is not a usable model directory.
pub fn check_dir(dir: &Path) -> Result<()> {
    for file in ["config.json", "tokenizer.json"] {
        if !dir.join(file).is_file() {
            return Err(EngineError::Source {
                model: dir.display().to_string(),
                reason: format!("missing {file}"),
            });
        }
    }
    Ok(())
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(dir.into()),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Fetches one file of the repo into the cache: `Ok(None)` when the repo has no such file.
type Fetch<'a> = Box<dyn Fn(&str) -> Result<Option<PathBuf>> + 'a>;

fn download(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let err = |reason: String| EngineError::Source {
        model: format!("{repo_id}@{revision}"),
        reason,
    };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    // Everything lands in one snapshot directory of the cache; its path is the model directory.
    let fetch: Fetch<'_> = if offline() {
        let cached = cache().repo(repo.clone());
        // A commit revision has no ref file: its snapshot directory is named after it.
        let snapshot = cache()
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(revision);
        Box::new(move |file| {
            Ok(cached
                .get(file)
                .or_else(|| Some(snapshot.join(file)).filter(|p| p.exists())))
        })
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(cache().path().clone())
            .with_progress(true)
            .build()
            .map_err(|e| err(format!("cannot reach the hub: {e}")))?
            .repo(repo);
        Box::new(move |file| match api.get(file) {
            Ok(path) => Ok(Some(path)),
            // ureq reports an HTTP status as "<url>: status code 404".
            Err(e) if e.to_string().contains("status code 404") => Ok(None),
            Err(e) => Err(err(format!("downloading {file}: {e}"))),
        })
    };
    let required = |file: &str| -> Result<PathBuf> {
        fetch(file)?.ok_or_else(|| {
            err(if offline() {
                format!("{file} is not in the HF cache (HF_HUB_OFFLINE is set)")
            } else {
                format!("no {file}")
            })
        })
    };
    let config = required("config.json")?;
    required("tokenizer.json")?;
    for file in OPTIONAL_FILES {
        fetch(file)?;
    }
    match fetch("model.safetensors.index.json")? {
        Some(index) => {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| err(format!("{}: {e}", index.display())))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| err(format!("{}: {e}", index.display())))?;
            let mut shards: Vec<&str> = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                required(shard)?;
            }
        }
        None => {
            required("model.safetensors")?;
        }
    }
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| err("cache path has no parent".into()))?;
    tracing::info!(repo = repo_id, revision, dir = %dir.display(), "model resolved");
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dirs_and_repo_ids() {
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(
            ModelSource::parse(here, None).unwrap(),
            ModelSource::Local(here.into())
        );
        assert_eq!(
            ModelSource::parse("Qwen/Qwen2.5-VL-7B-Instruct", Some("abc123")).unwrap(),
            ModelSource::Hub {
                repo: "Qwen/Qwen2.5-VL-7B-Instruct".into(),
                revision: "abc123".into()
            }
        );
        let err = ModelSource::parse("./no/such/dir/here", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a hub repo id"), "{err}");
    }

    #[test]
    fn a_dir_without_tokenizer_is_named() {
        let err = ModelSource::Local(env!("CARGO_MANIFEST_DIR").into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing config.json"), "{err}");
    }
}

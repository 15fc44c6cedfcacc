//! The parquet shards of a dataset: files of a local folder, or of a Hugging Face hub dataset repository
//! downloaded into the HF cache (`HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` are honoured; with `HF_HUB_OFFLINE=1`
//! only the cache is read). Shards are chosen with a glob relative to the folder or repository root, such as
//! `data/train-*.parquet`, and returned sorted, so a split always reads in the same order.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{DataError, Result};

/// The glob of a split's shards in the layout `datasets.push_to_hub` writes (`data/<split>-00000-of-00003-<hash>.parquet`).
pub fn split_pattern(split: &str) -> String {
    format!("data/{split}-*.parquet")
}

/// The shards of `source` matching `pattern`: `source` is a parquet file (returned as is), a local folder, or a
/// hub dataset `owner/name` with an optional `@revision` (default `main`). None matching is an error naming the
/// source, the pattern and the files there are.
pub fn shards(source: &str, pattern: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(source);
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if path.is_dir() {
        return matching(path, pattern, source);
    }
    let (repo, revision) = source.split_once('@').unwrap_or((source, "main"));
    if repo.split('/').count() != 2 || repo.starts_with('.') || repo.starts_with('/') {
        return Err(DataError::Read {
            path: source.to_string(),
            reason: "neither a file, a folder nor a hub dataset `owner/name[@revision]`".into(),
        });
    }
    download(repo, revision, pattern)
}

/// A shard glob: `*` and `?` never cross a `/`.
fn shard_glob(pattern: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(pattern).map_err(|e| format!("bad pattern `{pattern}`: {e}"))
}

/// How [`shard_glob`] patterns match.
const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Files under `dir` whose path relative to it matches `pattern`, sorted.
fn matching(dir: &Path, pattern: &str, source: &str) -> Result<Vec<PathBuf>> {
    let glob = shard_glob(pattern).map_err(|reason| DataError::Read {
        path: source.to_string(),
        reason,
    })?;
    let mut all = Vec::new();
    walk(dir, &mut all).map_err(|e| DataError::Read {
        path: source.to_string(),
        reason: e.to_string(),
    })?;
    all.sort();
    let relative = |p: &PathBuf| p.strip_prefix(dir).unwrap_or(p).to_path_buf();
    let found: Vec<PathBuf> = all
        .iter()
        .filter(|p| glob.matches_path_with(&relative(p), MATCH))
        .cloned()
        .collect();
    if found.is_empty() {
        let names: Vec<String> = all
            .iter()
            .take(8)
            .map(|p| relative(p).display().to_string())
            .collect();
        return Err(DataError::Read {
            path: source.to_string(),
            reason: format!(
                "no file matches `{pattern}` (found: {})",
                if names.is_empty() {
                    "nothing".to_string()
                } else {
                    names.join(", ")
                }
            ),
        });
    }
    Ok(found)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The files of a repository's cache folder (`<cache>/datasets--owner--name`) at `revision` matching `pattern`:
/// the snapshot of a branch is named by the commit its ref file holds, a commit revision names its own.
fn from_cache(folder: &Path, revision: &str, pattern: &str, shown: &str) -> Result<Vec<PathBuf>> {
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = folder.join("snapshots").join(commit);
    if !snapshot.is_dir() {
        return Err(DataError::Hub {
            repo: shown.to_string(),
            reason: format!(
                "not in the HF cache at {} (HF_HUB_OFFLINE is set)",
                folder.display()
            ),
        });
    }
    matching(&snapshot, pattern, shown)
}

/// Lists the repository at `revision`, downloads every file matching `pattern` into the HF cache (files already
/// there are not fetched again) and returns their cached paths.
fn download(repo_id: &str, revision: &str, pattern: &str) -> Result<Vec<PathBuf>> {
    let err = |reason: String| DataError::Hub {
        repo: format!("{repo_id}@{revision}"),
        reason,
    };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Dataset, revision.to_string());
    let cache = Cache::from_env();
    if offline() {
        let shown = format!("{repo_id}@{revision}");
        return from_cache(
            &cache.path().join(repo.folder_name()),
            revision,
            pattern,
            &shown,
        );
    }
    let glob = shard_glob(pattern).map_err(err)?;
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.path().clone())
        .with_progress(true)
        .build()
        .map_err(|e| err(format!("cannot reach the hub: {e}")))?
        .repo(repo);
    let info = api
        .info()
        .map_err(|e| err(format!("cannot list the repository: {e}")))?;
    let mut files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| glob.matches_with(f, MATCH))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(format!("no file matches `{pattern}`")));
    }
    files
        .iter()
        .map(|file| {
            tracing::info!(repo = repo_id, file, "dataset shard");
            api.get(file)
                .map_err(|e| err(format!("downloading {file}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_match_relative_globs_in_order() {
        let dir = std::env::temp_dir().join(format!("medvl-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "README.md",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap_or_else(|e| panic!("{e}"));
        }
        let source = dir.display().to_string();
        let found = shards(&source, &split_pattern("train")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            found,
            vec![
                dir.join("data/train-00000-of-00002.parquet"),
                dir.join("data/train-00001-of-00002.parquet")
            ]
        );
        // `*` does not cross folders.
        let err = shards(&source, "*.parquet").unwrap_err().to_string();
        assert!(
            err.contains("no file matches `*.parquet`")
                && err.contains("data/test-00000-of-00001.parquet"),
            "{err}"
        );
        let file = dir.join("data/test-00000-of-00001.parquet");
        assert_eq!(
            shards(&file.display().to_string(), "ignored").unwrap_or_else(|e| panic!("{e}")),
            vec![file]
        );
        let err = shards("no/such/place", "x").unwrap_err().to_string();
        assert!(
            err.contains("neither a file, a folder nor a hub dataset"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn offline_reads_the_snapshot_a_ref_names() {
        let folder = std::env::temp_dir().join(format!("medvl-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        let shard = folder.join("snapshots/abc123/data/train-00000-of-00001.parquet");
        std::fs::create_dir_all(shard.parent().unwrap_or(&folder))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(folder.join("refs")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&shard, b"x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(folder.join("refs/main"), "abc123\n").unwrap_or_else(|e| panic!("{e}"));
        let found = |revision| from_cache(&folder, revision, &split_pattern("train"), "o/n");
        assert_eq!(
            found("main").unwrap_or_else(|e| panic!("{e}")),
            vec![shard.clone()]
        );
        assert_eq!(
            found("abc123").unwrap_or_else(|e| panic!("{e}")),
            vec![shard]
        );
        let err = found("dev").unwrap_err().to_string();
        assert!(
            err.starts_with("hub dataset o/n: not in the HF cache"),
            "{err}"
        );
        std::fs::remove_dir_all(&folder).unwrap_or_else(|e| panic!("{e}"));
    }
}

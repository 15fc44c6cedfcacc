//! Medical document datasets for medvl: the normalised [`Sample`], deterministic document-level splits
//! ([`split`]), the MTSamples transcriptions ([`mtsamples`]) and synthetic clinical forms with exact ground truth
//! ([`synth`], drawn by [`render`]). Never depends on the server, training or eval.

pub mod mtsamples;
pub mod render;
pub mod split;
pub mod stats;
pub mod synth;

use serde::{Deserialize, Serialize};

/// Errors of the data crate; each names the file and, where there is one, the row.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A required column is absent.
    #[error("{path}: no column `{column}` (found: {found})")]
    MissingColumn {
        /// The file.
        path: String,
        /// The column.
        column: String,
        /// The header as found.
        found: String,
    },
    /// A row is unusable.
    #[error("{path}, row {row}: {reason}")]
    BadRow {
        /// The file.
        path: String,
        /// 1-based data row (the header is row 0).
        row: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `bytes` to `path` through a temporary file in the same directory renamed into place: readers see the
/// old file or the whole new one, never a partial write.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| DataError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a JSON-lines file: one `T` per non-blank line; a line that does not parse is an error naming the file
/// and the 1-based line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| DataError::BadRow {
                path: path.display().to_string(),
                row: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Where a sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// PathVQA.
    PathVqa,
    /// MTSamples transcriptions.
    MtSamples,
    /// medvl's synthetic clinical forms.
    Synthetic,
}

/// One training or evaluation example, whatever its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Stable id, unique within the source.
    pub id: String,
    /// The document this sample belongs to (splits never separate samples of one document).
    pub document: String,
    /// Source dataset.
    pub source: Source,
    /// Category (medical specialty, form type, question type).
    pub category: String,
    /// The text the page shows (MTSamples), or the question (PathVQA).
    pub text: String,
    /// The target answer or extraction.
    pub target: String,
}

/// Rows skipped by a `skip_bad` read, with the reason for each; nothing is dropped silently.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Skipped {
    /// `(row, reason)` pairs.
    pub rows: Vec<(usize, String)>,
}

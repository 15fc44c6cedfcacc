//! Medical document datasets for medvl: the normalised [`Sample`], deterministic document-level splits
//! ([`split`]), PathVQA ([`pathvqa`]), the MTSamples transcriptions ([`mtsamples`]) and synthetic clinical forms
//! with exact ground truth ([`synth`], drawn by [`render`]); hub parquet shards are found and downloaded by
//! [`hub`] and read row by row by [`table`]; [`chat`] turns samples into training conversations and [`batch`]
//! groups and pads them. Never depends on the server, training or eval.

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod hub;
pub mod mtsamples;
pub mod pathvqa;
pub mod render;
pub mod split;
pub mod stats;
pub mod synth;
pub mod table;

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
    /// A hub repository could not be listed or a file of it downloaded.
    #[error("hub dataset {repo}: {reason}")]
    Hub {
        /// `owner/name`.
        repo: String,
        /// What went wrong.
        reason: String,
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
    parse_jsonl(path, &read_text(path)?)
}

/// A whole text file.
fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| DataError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// [`read_jsonl`] of text already read from `path`.
fn parse_jsonl<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    text: &str,
) -> Result<Vec<T>> {
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

/// What [`write_samples`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Samples (lines of the manifest).
    pub samples: usize,
    /// Distinct image files.
    pub images: usize,
}

/// Writes a stream of samples to `out` as a dataset directory: each encoded image once, under
/// `images/<content id>.<format>` (the id of [`table::content_id`], the extension from the image's magic bytes),
/// and `manifest.jsonl`, one [`Sample`] per line with its images as files relative to `out`. The manifest is
/// written to a temporary file as the stream goes (nothing is held in memory) and renamed into place at the end,
/// so an interrupted run or a bad row (the stream's first error is returned) leaves no manifest behind.
pub fn write_samples(
    samples: impl IntoIterator<Item = Result<Sample>>,
    out: &std::path::Path,
) -> Result<Written> {
    use std::io::Write;
    let images = out.join("images");
    let manifest = out.join("manifest.jsonl");
    let err = |path: &std::path::Path, e: std::io::Error| DataError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&images).map_err(|e| err(&images, e))?;
    let tmp = out.join("manifest.jsonl.tmp");
    let write = || -> Result<Written> {
        let mut lines =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?);
        let mut written = Written::default();
        for sample in samples {
            let mut sample = sample?;
            for image in &mut sample.images {
                if let Image::Encoded(bytes) = image {
                    let extension = image::guess_format(bytes)
                        .ok()
                        .and_then(|f| f.extensions_str().first().copied())
                        .unwrap_or("bin");
                    let name = format!("images/{}.{extension}", table::content_id(bytes));
                    let path = out.join(&name);
                    if !path.exists() {
                        write_atomic(&path, bytes)?;
                        written.images += 1;
                    }
                    *image = Image::File(name.into());
                }
            }
            let line = serde_json::to_string(&sample).map_err(|e| DataError::Write {
                path: manifest.display().to_string(),
                reason: e.to_string(),
            })?;
            writeln!(lines, "{line}").map_err(|e| err(&tmp, e))?;
            written.samples += 1;
        }
        lines
            .into_inner()
            .map_err(|e| err(&tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| err(&tmp, e))?;
        Ok(written)
    };
    match write() {
        Ok(written) => {
            std::fs::rename(&tmp, &manifest).map_err(|e| err(&manifest, e))?;
            Ok(written)
        }
        Err(e) => {
            // Best effort: the error that stopped the stream is the one to report.
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
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

/// An image of a sample: a file (a rendered page, an extracted PathVQA image) or encoded bytes as a parquet row
/// holds them (PNG, JPEG, ...; decoded by the consumer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Image {
    /// A file, relative to the dataset directory or absolute.
    File(std::path::PathBuf),
    /// Encoded bytes held in memory (not serialised: write them to a file first).
    #[serde(skip)]
    Encoded(std::sync::Arc<[u8]>),
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
    /// The images the model sees, in order (empty until a text sample is rendered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    /// The text the page shows (MTSamples, synthetic forms), or the question (PathVQA).
    pub text: String,
    /// The target: the answer (PathVQA), the transcription (MTSamples), or the extraction JSON of every
    /// ground-truth field (synthetic forms).
    pub target: String,
}

/// Rows skipped by a `skip_bad` read, with the reason for each; nothing is dropped silently.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Skipped {
    /// `(row, reason)` pairs.
    pub rows: Vec<(usize, String)>,
}

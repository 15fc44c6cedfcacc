//! Dataset directories, whatever wrote them: `medvl data synth` (forms: pages and a ground-truth file each),
//! `medvl data mtsamples` (transcription pages) or `medvl data pathvqa` ([`crate::write_samples`]: images and
//! samples). Each has a `manifest.jsonl`; its first line says which kind it is. [`Manifest::samples`] gives every
//! kind as [`Sample`]s with their images as files, ready for [`crate::chat`].

use std::path::Path;

use crate::mtsamples::PageEntry;
use crate::synth::{Entry, Truth};
use crate::{DataError, Image, Result, Sample, Source};

/// The manifest of a dataset directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    /// Synthetic forms.
    Forms(Vec<Entry>),
    /// Rendered MTSamples transcriptions.
    Pages(Vec<PageEntry>),
    /// Samples with images (PathVQA).
    Samples(Vec<Sample>),
}

impl Manifest {
    /// Reads `dir/manifest.jsonl`; a line that does not parse as the kind of the first is an error naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.jsonl");
        let text = crate::read_text(&path)?;
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Ok(if serde_json::from_str::<Entry>(first).is_ok() {
            Self::Forms(crate::parse_jsonl(&path, &text)?)
        } else if serde_json::from_str::<PageEntry>(first).is_ok() {
            Self::Pages(crate::parse_jsonl(&path, &text)?)
        } else {
            Self::Samples(crate::parse_jsonl(&path, &text)?)
        })
    }

    /// The dataset as samples, images as files under `dir`. Forms get their extraction target from their ground
    /// truth file ([`Truth::extraction`]), pages their transcription.
    pub fn samples(&self, dir: &Path) -> Result<Vec<Sample>> {
        let files = |pages: &[String]| -> Vec<Image> {
            pages.iter().map(|p| Image::File(dir.join(p))).collect()
        };
        match self {
            Self::Forms(entries) => entries
                .iter()
                .map(|e| {
                    let truth = read_truth(&dir.join(&e.truth))?;
                    Ok(Sample {
                        id: e.id.clone(),
                        document: e.id.clone(),
                        source: Source::Synthetic,
                        category: e.kind.name().into(),
                        images: files(&e.pages),
                        text: String::new(),
                        target: truth.extraction(),
                    })
                })
                .collect(),
            Self::Pages(entries) => Ok(entries
                .iter()
                .map(|e| Sample {
                    id: e.id.clone(),
                    document: e.id.clone(),
                    source: Source::MtSamples,
                    category: e.category.clone(),
                    images: files(&e.pages),
                    text: String::new(),
                    target: e.target.clone(),
                })
                .collect()),
            Self::Samples(samples) => Ok(samples
                .iter()
                .cloned()
                .map(|mut s| {
                    for image in &mut s.images {
                        if let Image::File(p) = image {
                            *p = dir.join(&*p);
                        }
                    }
                    s
                })
                .collect()),
        }
    }
}

/// A ground-truth file of a synthetic form.
pub fn read_truth(path: &Path) -> Result<Truth> {
    let err = |reason: String| DataError::Read {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
}

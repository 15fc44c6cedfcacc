//! Statistics of a dataset directory written by `medvl data synth` ([`crate::synth::write_forms`]),
//! `medvl data mtsamples` ([`crate::mtsamples::write_pages`]) or `medvl data pathvqa` ([`crate::write_samples`]):
//! documents, pages and samples per category, the document-level split sizes, and for synthetic forms the
//! ground-truth records per type.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::dataset::{Manifest, read_truth};
use crate::split::{Split, assign};

/// Documents and pages of one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Documents.
    pub documents: usize,
    /// Pages (images).
    pub pages: usize,
    /// Samples (one per document, except where several questions share an image).
    pub samples: usize,
}

/// What a dataset directory holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `synthetic forms`, `mtsamples pages` or `samples`.
    pub dataset: String,
    /// All documents.
    pub total: Count,
    /// Per form kind or medical specialty.
    pub by_category: BTreeMap<String, Count>,
    /// Documents in train, validation and test of the seed-0 80/10/10 split.
    pub split: [usize; 3],
    /// Synthetic forms: ground-truth records per type (diagnoses, medications, labs, vitals, procedures).
    pub records: BTreeMap<String, usize>,
    /// MTSamples: characters of transcription.
    pub characters: usize,
}

impl Stats {
    /// Reads `dir/manifest.jsonl` (and, for synthetic forms, each ground-truth file).
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let mut stats = Self::default();
        // Several samples may share a document (PathVQA: questions on one image): documents and their pages are
        // counted once, samples each.
        let mut ids = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut add = |stats: &mut Self, document: &str, category: &str, pages: usize| {
            let new = seen.insert(document.to_string());
            if new {
                ids.push(document.to_string());
            }
            for c in [
                &mut stats.total,
                stats.by_category.entry(category.to_string()).or_default(),
            ] {
                c.samples += 1;
                if new {
                    c.documents += 1;
                    c.pages += pages;
                }
            }
        };
        match Manifest::read(dir)? {
            Manifest::Forms(entries) => {
                stats.dataset = "synthetic forms".into();
                for e in entries {
                    add(&mut stats, &e.id, e.kind.name(), e.pages.len());
                    let t = read_truth(&dir.join(&e.truth))?;
                    for (name, n) in [
                        ("diagnoses", t.diagnoses.len()),
                        ("medications", t.medications.len()),
                        ("labs", t.labs.len()),
                        ("vitals", t.vitals.len()),
                        ("procedures", t.procedures.len()),
                    ] {
                        *stats.records.entry(name.into()).or_default() += n;
                    }
                }
            }
            Manifest::Pages(entries) => {
                stats.dataset = "mtsamples pages".into();
                for e in entries {
                    add(&mut stats, &e.id, &e.category, e.pages.len());
                    stats.characters += e.target.chars().count();
                }
            }
            Manifest::Samples(samples) => {
                stats.dataset = "samples".into();
                for s in samples {
                    add(&mut stats, &s.document, &s.category, s.images.len());
                }
            }
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        for s in assign(&refs, 0) {
            stats.split[match s {
                Split::Train => 0,
                Split::Validation => 1,
                Split::Test => 2,
            }] += 1;
        }
        Ok(stats)
    }

    /// The statistics as markdown tables.
    pub fn markdown(&self) -> String {
        let t = &self.total;
        let mut s = format!(
            "{}: {} documents, {} pages, {} samples; split (seed 0) train {} / validation {} / test {}\n\n| category | documents | pages | samples |\n|---|---|---|---|\n",
            self.dataset,
            t.documents,
            t.pages,
            t.samples,
            self.split[0],
            self.split[1],
            self.split[2]
        );
        for (name, c) in &self.by_category {
            s += &format!(
                "| {name} | {} | {} | {} |\n",
                c.documents, c.pages, c.samples
            );
        }
        if !self.records.is_empty() {
            s += "\n| ground-truth records | count |\n|---|---|\n";
            for (name, n) in &self.records {
                s += &format!("| {name} | {n} |\n");
            }
        }
        if self.characters > 0 {
            s += &format!("\n{} characters of transcription\n", self.characters);
        }
        s
    }
}

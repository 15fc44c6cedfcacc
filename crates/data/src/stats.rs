//! Statistics of a dataset directory written by `medvl data synth` ([`crate::synth::write_forms`]) or
//! `medvl data mtsamples` ([`crate::mtsamples::write_pages`]): documents and pages per category, the
//! document-level split sizes, and for synthetic forms the ground-truth records per type.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::mtsamples::PageEntry;
use crate::split::{Split, assign};
use crate::synth::{Entry, Truth};
use crate::{DataError, Result};

/// Documents and pages of one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Documents.
    pub documents: usize,
    /// Pages.
    pub pages: usize,
}

/// What a dataset directory holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `synthetic forms` or `mtsamples pages`.
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
        let path = dir.join("manifest.jsonl");
        // The first line says which dataset wrote the manifest; the typed read below names any bad line.
        let lines: Vec<serde_json::Value> = crate::read_jsonl(&path)?;
        let synthetic = lines
            .into_iter()
            .next()
            .is_some_and(|first| serde_json::from_value::<Entry>(first).is_ok());
        let mut stats = Self::default();
        let mut ids = Vec::new();
        let mut add = |stats: &mut Self, id: &str, category: &str, pages: usize| {
            ids.push(id.to_string());
            for c in [
                &mut stats.total,
                stats.by_category.entry(category.to_string()).or_default(),
            ] {
                c.documents += 1;
                c.pages += pages;
            }
        };
        if synthetic {
            stats.dataset = "synthetic forms".into();
            for e in crate::read_jsonl::<Entry>(&path)? {
                add(&mut stats, &e.id, e.kind.name(), e.pages.len());
                let truth_path = dir.join(&e.truth);
                let bytes = std::fs::read(&truth_path).map_err(|err| DataError::Read {
                    path: truth_path.display().to_string(),
                    reason: err.to_string(),
                })?;
                let t: Truth = serde_json::from_slice(&bytes).map_err(|err| DataError::Read {
                    path: truth_path.display().to_string(),
                    reason: err.to_string(),
                })?;
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
        } else {
            stats.dataset = "mtsamples pages".into();
            for e in crate::read_jsonl::<PageEntry>(&path)? {
                add(&mut stats, &e.id, &e.category, e.pages.len());
                stats.characters += e.target.chars().count();
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
            "{}: {} documents, {} pages; split (seed 0) train {} / validation {} / test {}\n\n| category | documents | pages |\n|---|---|---|\n",
            self.dataset, t.documents, t.pages, self.split[0], self.split[1], self.split[2]
        );
        for (name, c) in &self.by_category {
            s += &format!("| {name} | {} | {} |\n", c.documents, c.pages);
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

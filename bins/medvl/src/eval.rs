//! `medvl eval`: greedy generation over documents with ground truth, scored with `medvl-eval`.
//!
//! The documents are a dataset written by `medvl data synth` (its `manifest.jsonl`), or, without `--data`, forms
//! generated in memory from `--seed` (`--count` of each kind). Writes, under `--out`:
//! - `predictions.jsonl`: one line per document (id, type, output, token counts, seconds), appended as each
//!   document finishes: a re-run skips the documents already there (resumable), and a line cut short by a crash
//!   is dropped and redone;
//! - `evaluation.json`: the aggregate ([`medvl_eval::report::Evaluation`]) and every document's scores;
//! - `report.md`: the markdown tables.
//!
//! `medvl eval compare A B` prints two runs side by side.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::prelude::Backend;
use clap::Args;
use medvl_data::split::Split;
use medvl_data::synth::{Entry, Form, FormKind};
use medvl_engine::{Engine, GenerateParams, Request};
use medvl_eval::report::{DocumentScore, Evaluation, Expected};
use medvl_model::chat::Message;
use serde::{Deserialize, Serialize};

/// The extraction instruction of an evaluation: JSON in the schema the field-level scorer reads, the prompt of
/// training on synthetic forms.
pub const EVAL_PROMPT: &str = medvl_data::chat::EXTRACTION_PROMPT;

/// What to evaluate on and where to write it (the model comes from the run arguments).
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A dataset directory written by `medvl data synth` (its manifest.jsonl); forms made in memory otherwise.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Without --data: forms per kind to make (7 kinds).
    #[arg(long, default_value_t = 15)]
    pub count: usize,
    /// Without --data: the first seed of the forms made.
    #[arg(long, default_value_t = 1_000_000)]
    pub seed: u64,
    /// Only the documents of this split (the deterministic 80/10/10 split by document id).
    #[arg(long)]
    pub split: Option<Split>,
    /// Seed of the split.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// At most this many documents (after the split).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output directory (required; optional here so that `medvl eval compare` parses without it).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// The run's name in reports (the model argument otherwise).
    #[arg(long)]
    pub label: Option<String>,
}

/// One document to evaluate.
pub struct Document {
    /// Id.
    pub id: String,
    /// Type.
    pub kind: FormKind,
    /// Page images (encoded).
    pub pages: Vec<Vec<u8>>,
    /// Ground truth JSON.
    pub truth: serde_json::Value,
}

/// Where a document comes from, before its pages are read or drawn.
enum Source {
    Made(Box<Form>),
    /// A manifest entry and the directory its files are in.
    Written(Entry, PathBuf),
}

impl Source {
    fn id(&self) -> String {
        match self {
            Source::Made(form) => form.id(),
            Source::Written(entry, _) => entry.id.clone(),
        }
    }
}

/// The documents `args` names, in order: the split and the limit are applied before any page is read or drawn.
pub fn documents(args: &EvalArgs) -> anyhow::Result<Vec<Document>> {
    let mut sources: Vec<Source> = match &args.data {
        Some(dir) => medvl_data::synth::read_manifest(dir)?
            .into_iter()
            .map(|entry| Source::Written(entry, dir.clone()))
            .collect(),
        None => FormKind::ALL
            .iter()
            .flat_map(|&kind| {
                (args.seed..args.seed + args.count as u64)
                    .map(move |seed| Source::Made(Box::new(Form::generate(kind, seed))))
            })
            .collect(),
    };
    if let Some(split) = args.split {
        let ids: Vec<String> = sources.iter().map(Source::id).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let splits = medvl_data::split::assign(&ids, args.split_seed);
        sources = sources
            .into_iter()
            .zip(splits)
            .filter(|(_, s)| *s == split)
            .map(|(d, _)| d)
            .collect();
    }
    if let Some(n) = args.limit {
        sources.truncate(n);
    }
    if sources.is_empty() {
        bail!("no documents to evaluate");
    }
    sources
        .into_iter()
        .map(|source| match source {
            Source::Made(form) => made(&form),
            Source::Written(entry, dir) => written(&dir, entry),
        })
        .collect()
}

fn made(form: &Form) -> anyhow::Result<Document> {
    let pages = medvl_data::render::render(&form.blocks, form.truth.seed, None)
        .iter()
        .map(medvl_data::render::png)
        .collect::<Result<_, _>>()
        .context("encoding a page")?;
    Ok(Document {
        id: form.id(),
        kind: form.truth.kind,
        pages,
        truth: serde_json::to_value(&form.truth)?,
    })
}

fn written(dir: &Path, e: Entry) -> anyhow::Result<Document> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let truth = serde_json::from_slice(&read(&e.truth)?)
        .with_context(|| format!("{}: not JSON", dir.join(&e.truth).display()))?;
    Ok(Document {
        pages: e
            .pages
            .iter()
            .map(|p| read(p))
            .collect::<anyhow::Result<_>>()?,
        id: e.id,
        kind: e.kind,
        truth,
    })
}

/// One line of `predictions.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    /// Document id.
    pub id: String,
    /// Document type.
    pub kind: String,
    /// The model's answer.
    pub output: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Wall time of the generation.
    pub seconds: f64,
}

/// The predictions already in `path` (none if it does not exist). A line that does not parse ends the list (a
/// write cut short); the file is rewritten without it so that appends continue cleanly.
fn resume(path: &Path) -> anyhow::Result<Vec<Prediction>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut done = Vec::new();
    let mut clean = true;
    for line in text.lines() {
        match serde_json::from_str::<Prediction>(line) {
            Ok(p) => done.push(p),
            Err(_) => {
                clean = false;
                break;
            }
        }
    }
    if !clean || !(text.is_empty() || text.ends_with('\n')) {
        let mut kept = String::new();
        for p in &done {
            kept += &serde_json::to_string(p)?;
            kept.push('\n');
        }
        medvl_data::write_atomic(path, kept.as_bytes())?;
    }
    Ok(done)
}

/// Runs the evaluation with `engine` (greedy, `max_new_tokens` each) and writes the outputs under `out`.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    args: &EvalArgs,
    out: &Path,
    default_label: &str,
    max_new_tokens: usize,
) -> anyhow::Result<Evaluation> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let docs = documents(args)?;
    let path = out.join("predictions.jsonl");
    let mut predictions = resume(&path)?;
    let done: std::collections::HashSet<String> =
        predictions.iter().map(|p| p.id.clone()).collect();
    let todo: Vec<&Document> = docs.iter().filter(|d| !done.contains(&d.id)).collect();
    tracing::info!(
        documents = docs.len(),
        already_done = docs.len() - todo.len(),
        "evaluating"
    );
    let bar = indicatif::ProgressBar::new(todo.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} documents, {elapsed} (eta {eta})",
        )
        .context("progress bar template")?,
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    for doc in todo {
        let request = Request {
            messages: vec![Message::user_with_images(doc.pages.len(), EVAL_PROMPT)],
            images: doc.pages.clone(),
            params: GenerateParams::greedy(max_new_tokens),
        };
        let start = std::time::Instant::now();
        let g = engine
            .generate(&request, |_| {})
            .with_context(|| format!("generating for document {}", doc.id))?;
        let p = Prediction {
            id: doc.id.clone(),
            kind: doc.kind.name().to_string(),
            output: g.text,
            prompt_tokens: g.prompt_tokens,
            generated_tokens: g.token_ids.len(),
            seconds: start.elapsed().as_secs_f64(),
        };
        // One write per line, synced: a crash loses at most the document in flight.
        let mut line = serde_json::to_string(&p)?;
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .with_context(|| format!("appending to {}", path.display()))?;
        predictions.push(p);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let wanted: std::collections::HashMap<&str, &Document> =
        docs.iter().map(|d| (d.id.as_str(), d)).collect();
    let scores: Vec<DocumentScore> = predictions
        .iter()
        .filter_map(|p| wanted.get(p.id.as_str()).map(|d| (p, d)))
        .map(|(p, d)| {
            DocumentScore::new(&p.id, &p.kind, &p.output, &Expected::from_truth(&d.truth))
        })
        .collect();
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| default_label.to_string());
    let evaluation = Evaluation::new(label, &scores);
    let json = serde_json::json!({ "evaluation": &evaluation, "documents": &scores });
    medvl_data::write_atomic(
        &out.join("evaluation.json"),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    medvl_data::write_atomic(&out.join("report.md"), evaluation.markdown().as_bytes())?;
    Ok(evaluation)
}

/// Reads the evaluation of a run: its directory or its `evaluation.json`.
pub fn read(path: &Path) -> anyhow::Result<Evaluation> {
    let file = if path.is_dir() {
        path.join("evaluation.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    serde_json::from_value(json.get("evaluation").cloned().unwrap_or(json))
        .with_context(|| format!("{}: not a medvl evaluation", file.display()))
}

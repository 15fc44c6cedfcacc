//! PathVQA (hub dataset [`REPO`]): pathology images with questions and answers, parquet shards with `image` (the
//! `datasets` image struct of `bytes` and `path`, `path` often null), `question` and `answer`; splits train,
//! validation and test. [`read`] streams one shard into [`Sample`]s: the image stays encoded (checked to decode),
//! the document is the image's content id (the several questions on one image never straddle a split), the
//! category is `yes/no` or `open` as PathVQA divides its questions.

use std::path::Path;

use crate::table::{Samples, Table, content_id, shard_name};
use crate::{Image, Result, Sample, Source};

/// The hub dataset.
pub const REPO: &str = "flaviagiammarino/path-vqa";

/// The columns a shard must have.
pub const COLUMNS: [&str; 3] = ["image", "question", "answer"];

/// Streams the samples of one shard; see [`Table::samples`] for `skip_bad`. Unusable rows: a null image, an image
/// with only a path, bytes that do not decode as an image, an empty question or answer.
pub fn read(path: &Path, skip_bad: bool) -> Result<Samples> {
    let table = Table::open(path)?;
    table.require(&COLUMNS)?;
    let stem = shard_name(path);
    Ok(table.samples(skip_bad, move |row, record| {
        let bytes = record.image("image")?;
        image::load_from_memory(bytes).map_err(|e| format!("`image` does not decode: {e}"))?;
        let question = record.text("question")?;
        let answer = record.text("answer")?;
        let yes_no = matches!(answer.to_lowercase().as_str(), "yes" | "no");
        Ok(Sample {
            id: format!("pathvqa-{stem}-{row:06}"),
            document: format!("pathvqa-image-{}", content_id(bytes)),
            source: Source::PathVqa,
            category: if yes_no { "yes/no" } else { "open" }.into(),
            images: vec![Image::Encoded(bytes.into())],
            text: question.to_string(),
            target: answer.to_string(),
        })
    }))
}

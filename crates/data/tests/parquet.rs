//! Hub parquet shards, written here with the schemas `datasets` gives them: PathVQA (`image` as the struct of
//! `bytes` and a null `path`, `question`, `answer`) and MTSamples (`text`, `label` as a class label named in the
//! file's `huggingface` metadata). Streams, bad rows (stop or skip and report), directories written whole,
//! statistics and conversations.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use medvl_data::chat::{PromptStyle, Role, conversation};
use medvl_data::dataset::Manifest;
use medvl_data::hub::{shards, split_pattern};
use medvl_data::table::Shards;
use medvl_data::{Image, Source, pathvqa, write_samples};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// One leaf column: per row its definition level and value (used only at the leaf's maximum level).
enum Leaf {
    Bytes(Vec<(i16, Vec<u8>)>),
    Long(Vec<(i16, i64)>),
}

fn write_parquet(path: &Path, schema: &str, leaves: Vec<Leaf>, huggingface: Option<&str>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(
            huggingface.map(|json| vec![KeyValue::new("huggingface".into(), json.to_string())]),
        )
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut leaves = leaves.into_iter();
    while let Some(mut column) = group.next_column().unwrap() {
        match leaves.next().unwrap() {
            Leaf::Bytes(cells) => {
                let w = column.typed::<ByteArrayType>();
                let max = w.get_descriptor().max_def_level();
                let levels: Vec<i16> = cells.iter().map(|c| c.0).collect();
                let values: Vec<ByteArray> = cells
                    .into_iter()
                    .filter(|c| c.0 == max)
                    .map(|c| ByteArray::from(c.1))
                    .collect();
                w.write_batch(&values, Some(&levels), None).unwrap();
            }
            Leaf::Long(cells) => {
                let w = column.typed::<Int64Type>();
                let max = w.get_descriptor().max_def_level();
                let levels: Vec<i16> = cells.iter().map(|c| c.0).collect();
                let values: Vec<i64> = cells.iter().filter(|c| c.0 == max).map(|c| c.1).collect();
                w.write_batch(&values, Some(&levels), None).unwrap();
            }
        }
        column.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

enum Img {
    Bytes(Vec<u8>),
    PathOnly(&'static str),
    Null,
}

const PATHVQA_SCHEMA: &str = "message schema {
    optional group image { optional binary bytes; optional binary path (STRING); }
    optional binary question (STRING);
    optional binary answer (STRING);
}";

fn pathvqa_shard(path: &Path, rows: Vec<(Img, &str, &str)>) {
    let text = |s: &str| (1, s.as_bytes().to_vec());
    let bytes = rows
        .iter()
        .map(|(img, _, _)| match img {
            Img::Bytes(b) => (2, b.clone()),
            Img::PathOnly(_) => (1, vec![]),
            Img::Null => (0, vec![]),
        })
        .collect();
    let paths = rows
        .iter()
        .map(|(img, _, _)| match img {
            Img::Bytes(_) => (1, vec![]),
            Img::PathOnly(p) => (2, p.as_bytes().to_vec()),
            Img::Null => (0, vec![]),
        })
        .collect();
    let questions = rows.iter().map(|r| text(r.1)).collect();
    let answers = rows.iter().map(|r| text(r.2)).collect();
    write_parquet(
        path,
        PATHVQA_SCHEMA,
        vec![
            Leaf::Bytes(bytes),
            Leaf::Bytes(paths),
            Leaf::Bytes(questions),
            Leaf::Bytes(answers),
        ],
        None,
    );
}

fn encoded(seed: u8, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 12, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 13) as u8, (y * 17) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medvl-parquet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    dir
}

#[test]
fn pathvqa_shards_stream_into_a_dataset_directory() {
    let dir = scratch("pathvqa");
    let (a, b, c) = (
        encoded(1, image::ImageFormat::Png),
        encoded(2, image::ImageFormat::Jpeg),
        encoded(3, image::ImageFormat::Png),
    );
    pathvqa_shard(
        &dir.join("data/train-00000-of-00002.parquet"),
        vec![
            (Img::Bytes(a.clone()), "What is present?", "fibrosis"),
            (Img::Bytes(a.clone()), "Is this benign?", "Yes"),
            (Img::Bytes(b.clone()), "Is there necrosis?", "no"),
        ],
    );
    pathvqa_shard(
        &dir.join("data/train-00001-of-00002.parquet"),
        vec![(
            Img::Bytes(c.clone()),
            " How are the cells arranged? ",
            "in sheets",
        )],
    );
    pathvqa_shard(
        &dir.join("data/test-00000-of-00001.parquet"),
        vec![(Img::Bytes(c), "Not train?", "no")],
    );

    let paths = shards(&dir.display().to_string(), &split_pattern("train")).unwrap();
    assert_eq!(paths.len(), 2);
    let samples: Vec<_> = Shards::new(paths.clone(), pathvqa::read, false)
        .collect::<Result<_, _>>()
        .unwrap();
    let summary: Vec<(&str, &str, &str, &str)> = samples
        .iter()
        .map(|s| {
            (
                s.id.as_str(),
                s.category.as_str(),
                s.text.as_str(),
                s.target.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "pathvqa-train-00000-of-00002-000001",
                "open",
                "What is present?",
                "fibrosis"
            ),
            (
                "pathvqa-train-00000-of-00002-000002",
                "yes/no",
                "Is this benign?",
                "Yes"
            ),
            (
                "pathvqa-train-00000-of-00002-000003",
                "yes/no",
                "Is there necrosis?",
                "no"
            ),
            (
                "pathvqa-train-00001-of-00002-000001",
                "open",
                "How are the cells arranged?",
                "in sheets"
            ),
        ]
    );
    assert!(samples.iter().all(|s| s.source == Source::PathVqa));
    // Two questions on one image are one document; the image bytes are kept as they were.
    assert_eq!(samples[0].document, samples[1].document);
    assert_ne!(samples[0].document, samples[2].document);
    assert_eq!(samples[2].images, vec![Image::Encoded(b.clone().into())]);

    let out = dir.join("out");
    let written = write_samples(samples.iter().cloned().map(Ok), &out).unwrap();
    assert_eq!((written.samples, written.images), (4, 3));
    let manifest = Manifest::read(&out).unwrap();
    let read = manifest.samples(&out).unwrap();
    assert_eq!(read.len(), 4);
    let Image::File(jpeg) = &read[2].images[0] else {
        panic!("{:?}", read[2].images)
    };
    assert!(jpeg.starts_with(out.join("images")) && jpeg.extension().unwrap() == "jpg");
    assert_eq!(std::fs::read(jpeg).unwrap(), b);
    let stats = medvl_data::stats::Stats::of_dir(&out).unwrap();
    assert_eq!(
        (
            stats.total.documents,
            stats.total.pages,
            stats.total.samples
        ),
        (3, 3, 4)
    );
    assert_eq!(
        (
            stats.by_category["yes/no"].samples,
            stats.by_category["open"].samples
        ),
        (2, 2)
    );
    assert_eq!(stats.split.iter().sum::<usize>(), 3);

    let chat = conversation(&read[3], PromptStyle::Task);
    assert_eq!(chat.images, read[3].images);
    assert_eq!(
        chat.messages[0].content,
        "How are the cells arranged?\nAnswer with a single word or a short phrase."
    );
    assert_eq!(
        (chat.messages[1].role, chat.messages[1].content.as_str()),
        (Role::Assistant, "in sheets")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_rows_stop_the_stream_or_are_skipped_and_reported() {
    let dir = scratch("bad");
    let shard = dir.join("data/train-00000-of-00001.parquet");
    pathvqa_shard(
        &shard,
        vec![
            (
                Img::Bytes(encoded(1, image::ImageFormat::Png)),
                "Q1?",
                "yes",
            ),
            (Img::Null, "Q2?", "no"),
            (Img::PathOnly("img_2.jpg"), "Q3?", "no"),
            (Img::Bytes(b"\x89PNG but not really".to_vec()), "Q4?", "no"),
            (Img::Bytes(encoded(5, image::ImageFormat::Png)), "Q5?", "  "),
            (Img::Bytes(encoded(6, image::ImageFormat::Png)), "Q6?", "no"),
        ],
    );
    let mut strict = pathvqa::read(&shard, false).unwrap();
    assert_eq!(strict.next().unwrap().unwrap().text, "Q1?");
    let err = strict.next().unwrap().unwrap_err().to_string();
    assert_eq!(err, format!("{}, row 2: `image` is null", shard.display()));
    assert!(strict.next().is_none(), "the stream ends at the error");

    let mut lenient = pathvqa::read(&shard, true).unwrap();
    let kept: Vec<String> = lenient.by_ref().map(|s| s.unwrap().text).collect();
    assert_eq!(kept, vec!["Q1?", "Q6?"]);
    let reasons: Vec<(usize, &str)> = lenient
        .skipped()
        .rows
        .iter()
        .map(|(row, reason)| (*row, reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4);
    assert_eq!(reasons[0], (2, "`image` is null"));
    assert_eq!(
        reasons[1],
        (3, "`image` has no bytes, only a path (img_2.jpg)")
    );
    assert!(
        reasons[2].0 == 4 && reasons[2].1.starts_with("`image` does not decode"),
        "{reasons:?}"
    );
    assert_eq!(reasons[3], (5, "empty `answer`"));

    // Across shards the reasons name the file.
    let mut all = Shards::new(vec![shard.clone()], pathvqa::read, true);
    assert_eq!(all.by_ref().count(), 2);
    assert!(
        all.skipped().rows[0]
            .1
            .starts_with(&format!("{}: ", shard.display()))
    );

    // A directory written from a stream that fails keeps no manifest and no temporary file.
    let out = dir.join("out");
    let err = write_samples(pathvqa::read(&shard, false).unwrap(), &out).unwrap_err();
    assert!(err.to_string().contains("row 2"), "{err}");
    assert!(!out.join("manifest.jsonl").exists() && !out.join("manifest.jsonl.tmp").exists());

    // Missing columns and files that are not parquet are named.
    let other = dir.join("data/questions-only.parquet");
    write_parquet(
        &other,
        "message schema { optional binary question (STRING); }",
        vec![Leaf::Bytes(vec![(1, b"Q?".to_vec())])],
        None,
    );
    let err = pathvqa::read(&other, true).err().unwrap().to_string();
    assert_eq!(
        err,
        format!("{}: no column `image` (found: question)", other.display())
    );
    let garbage = dir.join("data/garbage.parquet");
    std::fs::write(&garbage, b"PAR1 this is not a parquet file").unwrap();
    let err = pathvqa::read(&garbage, true).err().unwrap().to_string();
    assert!(
        err.starts_with(&format!(
            "cannot read {}: not a readable parquet file",
            garbage.display()
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mtsamples_parquet_names_its_class_labels() {
    let dir = scratch("mtsamples");
    let shard = dir.join("data/train-00000-of-00001.parquet");
    let features = r#"{"info": {"features": {"text": {"dtype": "string", "_type": "Value"},
        "label": {"names": ["Allergy / Immunology", "Surgery", "Urology"], "_type": "ClassLabel"}}}}"#;
    let texts = [
        "SUBJECTIVE:,  Sneezing.,PLAN:,  Loratadine.",
        "",
        "PROCEDURE:,  Cystoscopy.",
        "OPERATION:,  Appendectomy.",
    ];
    let schema = "message schema { optional binary text (STRING); optional int64 label; }";
    let write = |labels: Vec<(i16, i64)>, metadata| {
        write_parquet(
            &shard,
            schema,
            vec![
                Leaf::Bytes(texts.iter().map(|t| (1, t.as_bytes().to_vec())).collect()),
                Leaf::Long(labels),
            ],
            metadata,
        );
    };
    write(vec![(1, 0), (1, 1), (1, 2), (1, 7)], Some(features));
    let mut rows = medvl_data::mtsamples::read_parquet(&shard, true).unwrap();
    let samples: Vec<_> = rows.by_ref().map(Result::unwrap).collect();
    let got: Vec<(&str, &str, &str)> = samples
        .iter()
        .map(|s| (s.id.as_str(), s.category.as_str(), s.target.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "mtsamples-train-00000-of-00001-00001",
                "Allergy / Immunology",
                "SUBJECTIVE:\nSneezing.\nPLAN:\nLoratadine."
            ),
            (
                "mtsamples-train-00000-of-00001-00003",
                "Urology",
                "PROCEDURE:\nCystoscopy."
            ),
        ]
    );
    assert_eq!(
        rows.skipped().rows,
        vec![
            (2, "empty `text`".to_string()),
            (4, "`label` 7 is not one of the 3 class labels".to_string())
        ]
    );
    // The page shows the transcription under a generic title.
    let blocks = medvl_data::mtsamples::blocks(&samples[1]);
    assert_eq!(
        blocks[0],
        medvl_data::synth::Block::Title("Medical Transcription".into())
    );
    // Without the dataset's features the label stays a number; a null label is no specialty.
    write(vec![(1, 0), (1, 1), (0, 0), (1, 7)], None);
    let categories: Vec<String> = medvl_data::mtsamples::read_parquet(&shard, true)
        .unwrap()
        .map(|s| s.unwrap().category)
        .collect();
    assert_eq!(categories, vec!["0", "", "7"]);
    // A column of the wrong type is named with what it holds, never its value (documents are private).
    write_parquet(
        &shard,
        "message schema { optional int64 text; }",
        vec![Leaf::Long(vec![(1, 4242)])],
        None,
    );
    let err = medvl_data::mtsamples::read_parquet(&shard, false)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}, row 1: `text` is not text but an integer or a date",
            shard.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

//! MTSamples transcriptions from the original `mtsamples.csv` (`description, medical_specialty, sample_name,
//! transcription, keywords`, often with an unnamed index column first; quoted multi-line fields) or from the hub
//! parquet [`HUB_REPO`] (`text`, and `label`: the specialty as a class label). The
//! transcriptions mark sections with commas (`SUBJECTIVE:,  text ... ,PAST MEDICAL HISTORY:,  ...`); [`sections`]
//! puts each heading on its own line, which is how the pages are rendered: [`blocks`] lays a transcription out
//! (title, specialty, headings, wrapped paragraphs) and [`write_pages`] draws every sample of a CSV as letter pages
//! at 150 dpi with the embedded fonts (several pages when long), deterministic per seed, written atomically with a
//! manifest.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::render::Artefacts;
use crate::synth::Block;
use crate::{DataError, Result, Sample, Skipped, Source};

/// Puts every `HEADING:` of a transcription on its own line and drops the commas that delimited it.
pub fn sections(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ',' {
            // ",HEADING:" where HEADING is upper-case words: a section break.
            let start = i + 1;
            let mut j = start;
            while j < chars.len()
                && (chars[j].is_uppercase()
                    || chars[j] == ' '
                    || chars[j] == '/'
                    || chars[j] == '&')
            {
                j += 1;
            }
            let heading_len = chars[start..j].iter().filter(|c| c.is_uppercase()).count();
            if j < chars.len() && chars[j] == ':' && heading_len >= 2 {
                let heading: String = chars[start..=j].iter().collect();
                out.push('\n');
                out.push_str(heading.trim());
                out.push('\n');
                i = j + 1;
                // The comma after the heading, and the spaces after it.
                if i < chars.len() && chars[i] == ',' {
                    i += 1;
                }
                while i < chars.len() && chars[i] == ' ' {
                    i += 1;
                }
                continue;
            }
        }
        if chars[i] == ':'
            && chars.get(i + 1) == Some(&',')
            && out
                .chars()
                .rev()
                .take_while(|c| *c != '\n')
                .all(|c| c.is_uppercase() || c == ' ' || c == '/' || c == '&')
        {
            // A heading at the very start: "SUBJECTIVE:,  text".
            out.push(':');
            out.push('\n');
            i += 2;
            while i < chars.len() && chars[i] == ' ' {
                i += 1;
            }
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out.trim().to_string()
}

/// Reads `mtsamples.csv`. With `skip_bad`, rows without a transcription are skipped and reported; otherwise the
/// first one is an error naming the file and row.
pub fn read_csv(path: &Path, skip_bad: bool) -> Result<(Vec<Sample>, Skipped)> {
    let shown = path.display().to_string();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_path(path)
        .map_err(|e| DataError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    let header = reader
        .headers()
        .map_err(|e| DataError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: shown.clone(),
                column: name.into(),
                found: header.iter().collect::<Vec<_>>().join(", "),
            })
    };
    let (specialty, name, transcription) = (
        column("medical_specialty")?,
        column("sample_name")?,
        column("transcription")?,
    );
    let mut samples = Vec::new();
    let mut skipped = Skipped::default();
    for (i, record) in reader.records().enumerate() {
        let row = i + 1;
        let record = record.map_err(|e| DataError::BadRow {
            path: shown.clone(),
            row,
            reason: e.to_string(),
        })?;
        let text = record.get(transcription).unwrap_or("").trim();
        if text.is_empty() {
            let reason = "empty transcription".to_string();
            if skip_bad {
                skipped.rows.push((row, reason));
                continue;
            }
            return Err(DataError::BadRow {
                path: shown.clone(),
                row,
                reason,
            });
        }
        let id = format!("mtsamples-{row}");
        let text = sections(text);
        samples.push(Sample {
            document: id.clone(),
            id,
            source: Source::MtSamples,
            category: record.get(specialty).unwrap_or("").trim().to_string(),
            images: Vec::new(),
            target: text.clone(),
            text: format!("{}\n{}", record.get(name).unwrap_or("").trim(), text),
        });
    }
    Ok((samples, skipped))
}

/// The hub dataset of MTSamples transcriptions with their specialty (40 classes).
pub const HUB_REPO: &str = "rungalileo/medical_transcription_40";

/// Streams the transcriptions of a parquet shard of [`HUB_REPO`] (column `text`; `label`, when there, is the
/// specialty: a string, or a class label named by the file's `datasets` features, or its number otherwise). An
/// empty text is an unusable row (see [`crate::table::Table::samples`] for `skip_bad`). Samples are
/// `mtsamples-<shard>-<row>`, sectioned like [`read_csv`]'s; the shard has no sample names, so pages get a generic
/// title.
pub fn read_parquet(path: &Path, skip_bad: bool) -> Result<crate::table::Samples> {
    let table = crate::table::Table::open(path)?;
    table.require(&["text"])?;
    let has_label = table.columns().iter().any(|c| c == "label");
    let names = table.class_names("label");
    let stem = crate::table::shard_name(path);
    Ok(table.samples(skip_bad, move |row, record| {
        let text = sections(record.text("text")?);
        let category = if has_label {
            record.label("label", names.as_deref())?.unwrap_or_default()
        } else {
            String::new()
        };
        let id = format!("mtsamples-{stem}-{row:05}");
        Ok(Sample {
            document: id.clone(),
            id,
            source: Source::MtSamples,
            category,
            images: Vec::new(),
            target: text.clone(),
            text: format!("\n{text}"),
        })
    }))
}

/// Whether a line of a sectioned transcription is a heading (`PAST MEDICAL HISTORY:`).
fn is_heading(line: &str) -> bool {
    let line = line.trim();
    line.ends_with(':')
        && line.chars().filter(|c| c.is_alphabetic()).count() >= 2
        && !line.chars().any(char::is_lowercase)
}

/// The page layout of a sample read by [`read_csv`]: its name as the title, its specialty, then each section
/// heading and paragraph of the transcription in order.
pub fn blocks(sample: &Sample) -> Vec<Block> {
    let name = sample.text.lines().next().unwrap_or("").trim();
    let mut blocks = vec![
        Block::Title(if name.is_empty() {
            "Medical Transcription".into()
        } else {
            name.to_string()
        }),
        Block::Fields(vec![("Specialty".into(), sample.category.clone())]),
    ];
    for line in sample
        .target
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        blocks.push(if is_heading(line) {
            Block::Heading(line.to_string())
        } else {
            Block::Paragraph(line.to_string())
        });
    }
    blocks
}

/// One rendered transcription (a line of `manifest.jsonl` written by [`write_pages`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageEntry {
    /// The sample id (`mtsamples-<row>`).
    pub id: String,
    /// Medical specialty.
    pub category: String,
    /// Page images, relative to the dataset directory.
    pub pages: Vec<String>,
    /// The transcription the pages show, sections on their own lines.
    pub target: String,
}

/// Draws each sample as pages (style and artefacts from `seed` and the sample's row; `artefacts` None draws mild
/// scan artefacts, [`Artefacts::NONE`] none) into `out`: `<id>.page<N>.png` per page, then `manifest.jsonl`; every
/// file written atomically.
pub fn write_pages(
    samples: &[Sample],
    out: &Path,
    seed: u64,
    artefacts: Option<Artefacts>,
) -> Result<Vec<PageEntry>> {
    std::fs::create_dir_all(out).map_err(|e| DataError::Write {
        path: out.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut entries = Vec::new();
    for (i, sample) in samples.iter().enumerate() {
        let mut pages = Vec::new();
        let page_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        for (n, page) in crate::render::render(&blocks(sample), page_seed, artefacts)
            .iter()
            .enumerate()
        {
            let name = format!("{}.page{}.png", sample.id, n + 1);
            crate::render::write_png(&out.join(&name), page)?;
            pages.push(name);
        }
        entries.push(PageEntry {
            id: sample.id.clone(),
            category: sample.category.clone(),
            pages,
            target: sample.target.clone(),
        });
    }
    let mut manifest = String::new();
    for entry in &entries {
        manifest.push_str(&serde_json::to_string(entry).map_err(|e| DataError::Write {
            path: out.join("manifest.jsonl").display().to_string(),
            reason: e.to_string(),
        })?);
        manifest.push('\n');
    }
    crate::write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = ",description,medical_specialty,sample_name,transcription,keywords\n\
        0, A 23-year-old white female presents with complaint of allergies., Allergy / Immunology, Allergic Rhinitis ,\"SUBJECTIVE:,  This 23-year-old white female presents with complaint of allergies.,PAST MEDICAL HISTORY:,  No other problems.\nMEDICATIONS:,  Ortho Tri-Cyclen and Allegra.\",\"allergy, rhinitis\"\n\
        1, Empty one., Surgery, Nothing ,,\n\
        2, Consult., Cardiovascular / Pulmonary, Chest Pain ,\"HISTORY OF PRESENT ILLNESS:,  BP 142/88, HR 78.\",chest\n";

    fn write(tag: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("medvl-mtsamples-{tag}-{}.csv", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn sections_put_headings_on_their_own_lines() {
        assert_eq!(
            sections(
                "SUBJECTIVE:,  Allergies.,PAST MEDICAL HISTORY:,  None, really.,DIAGNOSES:,  1.  Rhinitis."
            ),
            "SUBJECTIVE:\nAllergies.\nPAST MEDICAL HISTORY:\nNone, really.\nDIAGNOSES:\n1.  Rhinitis."
        );
        // Commas inside sentences stay.
        assert_eq!(
            sections("BP 142/88, HR 78, afebrile."),
            "BP 142/88, HR 78, afebrile."
        );
    }

    #[test]
    fn reads_quoted_multiline_rows_and_reports_bad_ones() {
        let path = write("ok", CSV);
        let err = read_csv(&path, false).unwrap_err().to_string();
        assert!(
            err.contains("row 2") && err.contains("empty transcription") && err.contains(".csv"),
            "{err}"
        );
        let (samples, skipped) = read_csv(&path, true).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(samples.len(), 2);
        assert_eq!(skipped.rows, vec![(2, "empty transcription".to_string())]);
        assert_eq!(samples[0].category, "Allergy / Immunology");
        assert!(
            samples[0]
                .target
                .starts_with("SUBJECTIVE:\nThis 23-year-old")
        );
        assert!(
            samples[0]
                .target
                .contains("\nPAST MEDICAL HISTORY:\nNo other problems.")
        );
        assert!(samples[1].target.contains("BP 142/88, HR 78."));
    }

    #[test]
    fn missing_column_is_named() {
        let path = write("cols", "description,sample_name\nx,y\n");
        let err = read_csv(&path, false).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(
            err.contains("medical_specialty") && err.contains("description, sample_name"),
            "{err}"
        );
    }

    #[test]
    fn blocks_lay_out_title_specialty_headings_and_paragraphs() {
        let path = write("blocks", CSV);
        let (samples, _) = read_csv(&path, true).unwrap();
        std::fs::remove_file(&path).ok();
        let text = |t: &str| t.to_string();
        assert_eq!(
            blocks(&samples[0]),
            vec![
                Block::Title(text("Allergic Rhinitis")),
                Block::Fields(vec![(text("Specialty"), text("Allergy / Immunology"))]),
                Block::Heading(text("SUBJECTIVE:")),
                Block::Paragraph(text(
                    "This 23-year-old white female presents with complaint of allergies."
                )),
                Block::Heading(text("PAST MEDICAL HISTORY:")),
                Block::Paragraph(text("No other problems.")),
                Block::Heading(text("MEDICATIONS:")),
                Block::Paragraph(text("Ortho Tri-Cyclen and Allegra.")),
            ]
        );
    }

    #[test]
    fn long_transcriptions_take_several_pages_reproducibly() {
        let long = Sample {
            id: "mtsamples-7".into(),
            document: "mtsamples-7".into(),
            source: Source::MtSamples,
            category: "Surgery".into(),
            images: Vec::new(),
            text: "Laparoscopic Cholecystectomy\nx".into(),
            target: (0..60)
                .map(|i| {
                    format!(
                        "SECTION {i}:\n{}",
                        "The patient tolerated the procedure well. ".repeat(6)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let dir = std::env::temp_dir().join(format!("medvl-mtpages-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let entries =
            write_pages(std::slice::from_ref(&long), &dir, 3, Some(Artefacts::NONE)).unwrap();
        assert_eq!(entries.len(), 1);
        let pages = &entries[0].pages;
        assert!(pages.len() >= 3, "{pages:?}");
        assert_eq!(pages[0], "mtsamples-7.page1.png");
        let first: Vec<Vec<u8>> = pages
            .iter()
            .map(|p| std::fs::read(dir.join(p)).unwrap())
            .collect();
        for png in &first {
            let img = image::load_from_memory(png).unwrap();
            assert_eq!((img.width(), img.height()), crate::render::PAGE);
            // Ink on every page.
            assert!(img.to_luma8().pixels().any(|p| p.0[0] < 100));
        }
        let manifest = std::fs::read_to_string(dir.join("manifest.jsonl")).unwrap();
        let read: PageEntry = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
        assert_eq!(read, entries[0]);
        let stats = crate::stats::Stats::of_dir(&dir).unwrap();
        assert_eq!(stats.dataset, "mtsamples pages");
        assert_eq!((stats.total.documents, stats.total.pages), (1, pages.len()));
        assert_eq!(stats.by_category["Surgery"].pages, pages.len());
        assert_eq!(stats.characters, long.target.chars().count());
        // Same seed, same bytes; another seed, another style.
        write_pages(std::slice::from_ref(&long), &dir, 3, Some(Artefacts::NONE)).unwrap();
        assert_eq!(std::fs::read(dir.join(&pages[0])).unwrap(), first[0]);
        write_pages(std::slice::from_ref(&long), &dir, 4, Some(Artefacts::NONE)).unwrap();
        assert_ne!(std::fs::read(dir.join(&pages[0])).unwrap(), first[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

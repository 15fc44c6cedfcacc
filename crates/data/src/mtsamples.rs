//! MTSamples transcriptions from the original `mtsamples.csv` (`description, medical_specialty, sample_name,
//! transcription, keywords`, often with an unnamed index column first; quoted multi-line fields). The
//! transcriptions mark sections with commas (`SUBJECTIVE:,  text ... ,PAST MEDICAL HISTORY:,  ...`); [`sections`]
//! puts each heading on its own line, which is how the pages are rendered.

use std::path::Path;

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
            target: text.clone(),
            text: format!("{}\n{}", record.get(name).unwrap_or("").trim(), text),
        });
    }
    Ok((samples, skipped))
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
}

//! The reference pipeline's accuracy: for each document, the share of expected terms and of expected values that
//! occur in the model output as case-insensitive substrings ("term accuracy", "value accuracy"), and their mean
//! ("combined"). Kept as defined so that old numbers can be reproduced; its blind spots are why the field-level
//! metric exists: a bare substring counts "42" inside "142", and an output that echoes the whole page scores ~100%
//! whatever it extracted.

use serde::{Deserialize, Serialize};

/// One document's legacy scores, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LegacyScore {
    /// Expected terms found / expected terms (1 when none are expected).
    pub term_accuracy: f64,
    /// Expected values found / expected values (1 when none are expected).
    pub value_accuracy: f64,
    /// Mean of the two.
    pub combined: f64,
}

fn found_share(output: &str, expected: &[&str]) -> f64 {
    if expected.is_empty() {
        return 1.0;
    }
    let output = output.to_lowercase();
    let found = expected
        .iter()
        .filter(|e| output.contains(&e.to_lowercase()))
        .count();
    found as f64 / expected.len() as f64
}

/// Scores one output against its expected terms and values.
pub fn score(output: &str, terms: &[&str], values: &[&str]) -> LegacyScore {
    let term_accuracy = found_share(output, terms);
    let value_accuracy = found_share(output, values);
    LegacyScore {
        term_accuracy,
        value_accuracy,
        combined: (term_accuracy + value_accuracy) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_document() {
        let output =
            "Medications: Metformin 500 mg twice daily. Labs: glucose 142 mg/dL, HbA1c 7.9%.";
        // Terms: metformin yes, lisinopril no, glucose yes, HbA1c yes -> 3/4.
        // Values: "500 mg" yes, "10 mg" no, "142" yes, "42" yes (inside 142: the legacy blind spot) -> 3/4.
        let s = score(
            output,
            &["Metformin", "Lisinopril", "glucose", "HBA1C"],
            &["500 mg", "10 mg", "142", "42"],
        );
        assert_eq!(s.term_accuracy, 0.75);
        assert_eq!(s.value_accuracy, 0.75);
        assert_eq!(s.combined, 0.75);
    }

    #[test]
    fn echoing_the_page_scores_everything() {
        let page = "PATIENT John Doe. Rx Lisinopril 10 mg daily. Na 139, K 4.1.";
        let s = score(page, &["Lisinopril", "Na", "K"], &["10 mg", "139", "4.1"]);
        assert_eq!(s.combined, 1.0);
    }

    #[test]
    fn nothing_expected_is_full_marks_and_case_is_ignored() {
        let s = score("a B c", &["b", "x"], &[]);
        assert_eq!(
            (s.term_accuracy, s.value_accuracy, s.combined),
            (0.5, 1.0, 0.75)
        );
    }
}

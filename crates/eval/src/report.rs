//! One evaluation run: each document's scores (the reference's legacy accuracy and the field-level scores, strict
//! and lenient), their means per document type and overall with bootstrap 95% intervals, the markdown table, and
//! the side-by-side table of two runs (the reference report's section 6 layout: base vs fine-tuned, delta in
//! percentage points).
//!
//! What a document expects comes from its ground-truth JSON (the schema of [`crate::fields`]): the legacy terms are
//! the names of its diagnoses, medications, labs and vitals; the legacy values are medication doses, lab values and
//! vital values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::{Estimate, bootstrap_mean};
use crate::fields::{self, Field, FieldKind, FieldScore, Matching};
use crate::legacy::{self, LegacyScore};

/// What one document expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Legacy terms (entity names).
    pub terms: Vec<String>,
    /// Legacy values.
    pub values: Vec<String>,
    /// Field-level records.
    pub fields: Vec<Field>,
}

fn texts(json: &Value, list: &str, key: &str) -> Vec<String> {
    json.get(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| match item.get(key).unwrap_or(item) {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .filter(|s| !s.trim().is_empty())
        .collect()
}

impl Expected {
    /// From a ground-truth JSON document.
    pub fn from_truth(json: &Value) -> Self {
        let mut terms = texts(json, "diagnoses", "name");
        for list in ["medications", "labs", "vitals"] {
            terms.extend(texts(json, list, "name"));
        }
        let mut values = texts(json, "medications", "dose");
        values.extend(texts(json, "labs", "value"));
        values.extend(texts(json, "vitals", "value"));
        Self {
            terms,
            values,
            fields: fields::fields_from_json(json),
        }
    }
}

/// The scores of one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentScore {
    /// Document id.
    pub id: String,
    /// Document type.
    pub kind: String,
    /// The reference's accuracy.
    pub legacy: LegacyScore,
    /// Field counts per type, values compared exactly (after normalisation).
    pub strict: BTreeMap<FieldKind, FieldScore>,
    /// Field counts per type, a predicted value may state the expected one with more words.
    pub lenient: BTreeMap<FieldKind, FieldScore>,
}

fn total(scores: &BTreeMap<FieldKind, FieldScore>) -> FieldScore {
    scores
        .values()
        .fold(FieldScore::default(), |a, s| FieldScore {
            true_positives: a.true_positives + s.true_positives,
            false_positives: a.false_positives + s.false_positives,
            false_negatives: a.false_negatives + s.false_negatives,
        })
}

impl DocumentScore {
    /// Scores `output` (the model's answer) against `expected`.
    pub fn new(
        id: impl Into<String>,
        kind: impl Into<String>,
        output: &str,
        expected: &Expected,
    ) -> Self {
        let predicted = fields::fields_from_output(output);
        let terms: Vec<&str> = expected.terms.iter().map(String::as_str).collect();
        let values: Vec<&str> = expected.values.iter().map(String::as_str).collect();
        Self {
            id: id.into(),
            kind: kind.into(),
            legacy: legacy::score(output, &terms, &values),
            strict: fields::score(&predicted, &expected.fields, Matching::Strict),
            lenient: fields::score(&predicted, &expected.fields, Matching::Lenient),
        }
    }

    /// All field types together, strict.
    pub fn strict_total(&self) -> FieldScore {
        total(&self.strict)
    }

    /// All field types together, lenient.
    pub fn lenient_total(&self) -> FieldScore {
        total(&self.lenient)
    }
}

/// Means over a set of documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Documents.
    pub documents: usize,
    /// Legacy term accuracy.
    pub term_accuracy: Estimate,
    /// Legacy value accuracy.
    pub value_accuracy: Estimate,
    /// Legacy combined accuracy (the reference's headline number).
    pub combined: Estimate,
    /// Field precision (all types pooled per document), strict.
    pub precision: Estimate,
    /// Field recall, strict.
    pub recall: Estimate,
    /// Field F1, strict.
    pub f1: Estimate,
    /// Field F1, lenient.
    pub lenient_f1: Estimate,
    /// Strict F1 per field type, over the documents that expect or predict that type.
    pub f1_by_field: BTreeMap<FieldKind, Estimate>,
}

impl Summary {
    /// Means of `docs` with intervals from bootstrap resamples seeded by `seed`.
    pub fn of(docs: &[&DocumentScore], seed: u64) -> Self {
        let mean = |f: &dyn Fn(&DocumentScore) -> f64| {
            bootstrap_mean(&docs.iter().map(|d| f(d)).collect::<Vec<_>>(), seed)
        };
        let mut f1_by_field = BTreeMap::new();
        let kinds: std::collections::BTreeSet<FieldKind> =
            docs.iter().flat_map(|d| d.strict.keys().copied()).collect();
        for kind in kinds {
            let values: Vec<f64> = docs
                .iter()
                .filter_map(|d| d.strict.get(&kind).map(FieldScore::f1))
                .collect();
            f1_by_field.insert(kind, bootstrap_mean(&values, seed));
        }
        Self {
            documents: docs.len(),
            term_accuracy: mean(&|d| d.legacy.term_accuracy),
            value_accuracy: mean(&|d| d.legacy.value_accuracy),
            combined: mean(&|d| d.legacy.combined),
            precision: mean(&|d| d.strict_total().precision()),
            recall: mean(&|d| d.strict_total().recall()),
            f1: mean(&|d| d.strict_total().f1()),
            lenient_f1: mean(&|d| d.lenient_total().f1()),
            f1_by_field,
        }
    }

    /// The headline rows: (label, estimate).
    fn rows(&self) -> Vec<(&'static str, Estimate)> {
        vec![
            ("Term accuracy (legacy)", self.term_accuracy),
            ("Value accuracy (legacy)", self.value_accuracy),
            ("Combined (legacy)", self.combined),
            ("Field precision (strict)", self.precision),
            ("Field recall (strict)", self.recall),
            ("Field F1 (strict)", self.f1),
            ("Field F1 (lenient)", self.lenient_f1),
        ]
    }
}

/// Seed of the bootstrap resamples in reports (fixed, so that a report is reproducible).
pub const REPORT_SEED: u64 = 20_241_126;

/// A whole run: overall and per document type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// What was evaluated (model, adapter, quantization), as the user named it.
    pub label: String,
    /// All documents.
    pub overall: Summary,
    /// Per document type.
    pub by_kind: BTreeMap<String, Summary>,
}

fn percent(e: &Estimate) -> String {
    if e.n == 0 {
        return "-".into();
    }
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * e.mean,
        100.0 * e.ci_low,
        100.0 * e.ci_high
    )
}

impl Evaluation {
    /// Aggregates the documents' scores.
    pub fn new(label: impl Into<String>, docs: &[DocumentScore]) -> Self {
        let all: Vec<&DocumentScore> = docs.iter().collect();
        let mut kinds: BTreeMap<String, Vec<&DocumentScore>> = BTreeMap::new();
        for d in docs {
            kinds.entry(d.kind.clone()).or_default().push(d);
        }
        Self {
            label: label.into(),
            overall: Summary::of(&all, REPORT_SEED),
            by_kind: kinds
                .into_iter()
                .map(|(k, d)| (k, Summary::of(&d, REPORT_SEED)))
                .collect(),
        }
    }

    /// The run as markdown: the headline metrics with 95% intervals, strict F1 per field type, and combined and
    /// F1 per document type.
    pub fn markdown(&self) -> String {
        let o = &self.overall;
        let mut s = format!(
            "## {}\n\n{} documents; means over documents with bootstrap 95% intervals.\n\n| Metric | Value |\n|---|---|\n",
            self.label, o.documents
        );
        for (name, e) in o.rows() {
            s += &format!("| {name} | {} |\n", percent(&e));
        }
        s += "\n| Field type | F1 (strict) |\n|---|---|\n";
        for (kind, e) in &o.f1_by_field {
            s += &format!("| {} | {} |\n", field_name(*kind), percent(e));
        }
        s += "\n| Document type | Documents | Combined (legacy) | Field F1 (strict) |\n|---|---|---|---|\n";
        for (kind, k) in &self.by_kind {
            s += &format!(
                "| {kind} | {} | {} | {} |\n",
                k.documents,
                percent(&k.combined),
                percent(&k.f1)
            );
        }
        s
    }
}

fn field_name(kind: FieldKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{kind:?}"))
}

/// Two runs side by side (`a` the baseline): each metric's value with its interval in both and the change in
/// percentage points, overall and per document type.
pub fn compare(a: &Evaluation, b: &Evaluation) -> String {
    let row = |name: &str, x: &Estimate, y: &Estimate| {
        let delta = if x.n == 0 || y.n == 0 {
            "-".into()
        } else {
            format!("{:+.1} pp", 100.0 * (y.mean - x.mean))
        };
        format!("| {name} | {} | {} | {delta} |\n", percent(x), percent(y))
    };
    let mut s = format!(
        "| Metric | {} | {} | Change |\n|---|---|---|---|\n",
        a.label, b.label
    );
    for ((name, x), (_, y)) in a.overall.rows().into_iter().zip(b.overall.rows()) {
        s += &row(name, &x, &y);
    }
    let kinds: std::collections::BTreeSet<&String> =
        a.by_kind.keys().chain(b.by_kind.keys()).collect();
    if !kinds.is_empty() {
        s += &format!(
            "\n| Document type (field F1, strict) | {} | {} | Change |\n|---|---|---|---|\n",
            a.label, b.label
        );
        let none = Estimate {
            mean: f64::NAN,
            ci_low: f64::NAN,
            ci_high: f64::NAN,
            n: 0,
        };
        for kind in kinds {
            let x = a.by_kind.get(kind).map_or(none, |k| k.f1);
            let y = b.by_kind.get(kind).map_or(none, |k| k.f1);
            s += &row(kind, &x, &y);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn truth() -> Value {
        json!({
            "diagnoses": [{"name": "Essential hypertension", "icd10": "I10"}],
            "medications": [{"name": "Lisinopril", "dose": "10 mg", "route": "PO", "frequency": "daily"}],
            "labs": [{"name": "Potassium", "value": "4.1", "unit": "mmol/L", "range": "3.5-5.1", "flag": ""}],
            "vitals": [{"name": "Heart rate", "value": "72", "unit": "bpm"}],
            "procedures": []
        })
    }

    #[test]
    fn expected_terms_values_and_fields_come_from_the_truth() {
        let e = Expected::from_truth(&truth());
        assert_eq!(
            e.terms,
            [
                "Essential hypertension",
                "Lisinopril",
                "Potassium",
                "Heart rate"
            ]
        );
        assert_eq!(e.values, ["10 mg", "4.1", "72"]);
        // Diagnosis 1 + medication name, dose, route, frequency 4 + lab value, unit, range 3 (empty flag dropped)
        // + vital 1.
        assert_eq!(e.fields.len(), 9);
    }

    #[test]
    fn an_exact_answer_scores_one_and_a_hallucination_lowers_precision_only() {
        let e = Expected::from_truth(&truth());
        let exact = DocumentScore::new("a", "lab-panel", &truth().to_string(), &e);
        assert_eq!(exact.legacy.combined, 1.0);
        assert_eq!(exact.strict_total().f1(), 1.0);
        let mut extra = truth();
        extra["medications"]
            .as_array_mut()
            .unwrap_or_else(|| unreachable!())
            .push(json!({"name": "Warfarin", "dose": "5 mg", "route": "PO", "frequency": "daily"}));
        let d = DocumentScore::new("b", "lab-panel", &extra.to_string(), &e);
        let t = d.strict_total();
        // 9 expected, all found; 4 more predicted.
        assert_eq!(
            (t.true_positives, t.false_positives, t.false_negatives),
            (9, 4, 0)
        );
        assert_eq!(t.recall(), 1.0);
        assert!((t.precision() - 9.0 / 13.0).abs() < 1e-12);
        assert_eq!(
            d.legacy.combined, 1.0,
            "the legacy metric cannot see the hallucination"
        );
    }

    #[test]
    fn summary_compare_and_markdown_carry_the_hand_worked_numbers() {
        let e = Expected::from_truth(&truth());
        // Half the documents answer exactly, half answer nothing: F1 1 and 0, mean 0.5.
        let docs: Vec<DocumentScore> = (0..10)
            .map(|i| {
                let output = if i % 2 == 0 {
                    truth().to_string()
                } else {
                    "{}".to_string()
                };
                DocumentScore::new(
                    format!("d{i}"),
                    if i < 6 { "lab-panel" } else { "prescription" },
                    &output,
                    &e,
                )
            })
            .collect();
        let run = Evaluation::new("base", &docs);
        assert_eq!(run.overall.documents, 10);
        assert_eq!(run.overall.f1.mean, 0.5);
        assert!(run.overall.f1.ci_low < 0.5 && run.overall.f1.ci_high > 0.5);
        // d0, d2, d4 of lab-panel's six answer: 0.5; prescription d6, d8 of four: 0.5.
        assert_eq!(run.by_kind["lab-panel"].documents, 6);
        assert_eq!(run.by_kind["prescription"].f1.mean, 0.5);
        let better = Evaluation::new(
            "tuned",
            &docs
                .iter()
                .map(|d| DocumentScore::new(d.id.clone(), d.kind.clone(), &truth().to_string(), &e))
                .collect::<Vec<_>>(),
        );
        let table = compare(&run, &better);
        assert!(table.contains("| Field F1 (strict) | 50.0% ["), "{table}");
        assert!(
            table.contains("| 100.0% [100.0, 100.0] | +50.0 pp |"),
            "{table}"
        );
        let md = run.markdown();
        assert!(md.contains("10 documents"), "{md}");
        assert!(md.contains("| prescription | 4 |"), "{md}");
    }
}

//! Field-level extraction scoring: the model's structured output and the ground truth become sets of
//! (field type, name, value) records; names and values are normalised (case, Unicode, unit spellings, number
//! formats, dosing abbreviations), then matched one to one. Precision, recall and F1 per field type, strict (numbers
//! must be equal) or lenient (a predicted value that states the expected one with extra words still counts).
//!
//! The JSON schema read from both sides (unknown keys are ignored):
//! `{"diagnoses": [str | {"name"}], "medications": [{"name", "dose", "route", "frequency"}],
//!   "labs": [{"name", "value", "unit", "reference_range" (or "range"), "flag"}], "vitals": [{"name", "value", "unit"}]}`

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::text::{contains_word, normalize};

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// A diagnosis (value is the diagnosis itself).
    Diagnosis,
    /// A medication's name (value empty).
    MedicationName,
    /// A medication's dose.
    MedicationDose,
    /// A medication's route.
    MedicationRoute,
    /// A medication's frequency.
    MedicationFrequency,
    /// A lab's value (with its unit when given).
    LabValue,
    /// A lab's unit.
    LabUnit,
    /// A lab's reference range.
    LabRange,
    /// A lab's flag (H, L, ...).
    LabFlag,
    /// A vital sign's value (with its unit when given).
    Vital,
}

/// One extracted fact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Field {
    /// Type.
    pub kind: FieldKind,
    /// Normalised name of the entity (lab, drug, vital); the diagnosis text for diagnoses.
    pub key: String,
    /// Normalised value.
    pub value: String,
}

/// Spelling variants mapped to one canonical token (applied word by word after [`normalize`]).
const SYNONYMS: &[(&str, &str)] = &[
    ("mcg", "ug"),
    ("microgram", "ug"),
    ("micrograms", "ug"),
    ("milligram", "mg"),
    ("milligrams", "mg"),
    ("mmhg", "mmhg"),
    ("10^3/ul", "k/ul"),
    ("x10^3/ul", "k/ul"),
    ("10^9/l", "k/ul"),
    ("q.d.", "daily"),
    ("qd", "daily"),
    ("once-daily", "daily"),
    ("b.i.d.", "bid"),
    ("t.i.d.", "tid"),
    ("q.i.d.", "qid"),
    ("p.o.", "po"),
    ("oral", "po"),
    ("orally", "po"),
    ("i.v.", "iv"),
    ("intravenous", "iv"),
    ("i.m.", "im"),
    ("intramuscular", "im"),
    ("s.c.", "sc"),
    ("subcutaneous", "sc"),
    ("high", "h"),
    ("low", "l"),
    ("bpm", "/min"),
    ("beats/min", "/min"),
];

const PHRASES: &[(&str, &str)] = &[
    ("twice daily", "bid"),
    ("once daily", "daily"),
    ("three times daily", "tid"),
    ("by mouth", "po"),
];

/// Canonical text of a value: normalised, phrases and word spellings unified, numbers written plainly
/// ("1,000" and "1.0e3" become "1000"), a number glued to its unit split from it ("500mg" -> "500 mg").
pub fn canonical(text: &str) -> String {
    let mut t = normalize(text);
    for (from, to) in PHRASES {
        t = t.replace(from, to);
    }
    let mut words = Vec::new();
    for word in t.split_whitespace() {
        let word = word.trim_end_matches([',', ';']);
        let split = word.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','));
        match split {
            // "500mg", "7.9%": a number glued to a unit that starts with a letter (not an exponent) or a percent sign.
            Some(i)
                if i > 0
                    && word[..i].chars().any(|c| c.is_ascii_digit())
                    && word[i..]
                        .starts_with(|c: char| (c.is_alphabetic() && c != 'e') || c == '%') =>
            {
                words.push(number(&word[..i]));
                words.push(synonym(&word[i..]).to_string());
            }
            _ => words.push(number(word)),
        }
    }
    words
        .iter()
        .map(|w| synonym(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn synonym(word: &str) -> &str {
    SYNONYMS
        .iter()
        .find(|(from, _)| *from == word)
        .map_or(word, |(_, to)| to)
}

/// A plain decimal for anything that parses as a number ("1,000" -> "1000", "1.0e3" -> "1000", "7.90" -> "7.9").
fn number(word: &str) -> String {
    let plain = word.replace(',', "");
    if plain.chars().any(|c| c.is_ascii_digit())
        && let Ok(v) = plain.parse::<f64>()
    {
        return format!("{v}");
    }
    word.to_string()
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The records of one structured extraction (see the module docs for the schema).
pub fn fields_from_json(json: &Value) -> Vec<Field> {
    let mut out = Vec::new();
    let mut push = |kind, key: &str, value: &str| {
        let (key, value) = (canonical(key), canonical(value));
        if !(key.is_empty()
            || (value.is_empty()
                && kind != FieldKind::MedicationName
                && kind != FieldKind::Diagnosis))
        {
            out.push(Field { kind, key, value });
        }
    };
    let items = |name: &str| {
        json.get(name)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for d in items("diagnoses") {
        let name = d.get("name").map_or_else(|| text_of(&d), text_of);
        push(FieldKind::Diagnosis, &name, "");
    }
    for m in items("medications") {
        let name = text_of(m.get("name").unwrap_or(&Value::Null));
        push(FieldKind::MedicationName, &name, "");
        for (field, kind) in [
            ("dose", FieldKind::MedicationDose),
            ("route", FieldKind::MedicationRoute),
            ("frequency", FieldKind::MedicationFrequency),
        ] {
            push(kind, &name, &text_of(m.get(field).unwrap_or(&Value::Null)));
        }
    }
    for l in items("labs") {
        let name = text_of(l.get("name").unwrap_or(&Value::Null));
        let unit = text_of(l.get("unit").unwrap_or(&Value::Null));
        let value = text_of(l.get("value").unwrap_or(&Value::Null));
        push(FieldKind::LabValue, &name, &format!("{value} {unit}"));
        push(FieldKind::LabUnit, &name, &unit);
        push(
            FieldKind::LabRange,
            &name,
            &text_of(
                l.get("reference_range")
                    .or_else(|| l.get("range"))
                    .unwrap_or(&Value::Null),
            ),
        );
        push(
            FieldKind::LabFlag,
            &name,
            &text_of(l.get("flag").unwrap_or(&Value::Null)),
        );
    }
    for v in items("vitals") {
        let name = text_of(v.get("name").unwrap_or(&Value::Null));
        let value = format!(
            "{} {}",
            text_of(v.get("value").unwrap_or(&Value::Null)),
            text_of(v.get("unit").unwrap_or(&Value::Null))
        );
        push(FieldKind::Vital, &name, &value);
    }
    out
}

/// Sections a free-text answer may be organised in, recognised from its headings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Diagnoses,
    Medications,
    Labs,
    Vitals,
}

fn heading(line: &str) -> Option<Section> {
    let h = normalize(
        line.trim_start_matches(['#', '*', ' '])
            .trim_end_matches([':', '*', ' ']),
    );
    let has = |words: &[&str]| words.iter().any(|w| h.contains(w));
    if h.split_whitespace().count() > 4 {
        return None;
    }
    if has(&["diagnos", "assessment", "problem"]) {
        Some(Section::Diagnoses)
    } else if has(&["medication", "drugs", "prescription"]) {
        Some(Section::Medications)
    } else if has(&["lab", "result"]) {
        Some(Section::Labs)
    } else if has(&["vital"]) {
        Some(Section::Vitals)
    } else {
        None
    }
}

/// Records of a model answer: the JSON object in it when there is one (also inside a ```json fence or surrounded
/// by prose), otherwise its free text read by headings, bullets and `name: value` lines: diagnoses are whole
/// lines, medications give their name (the words before the first number), labs and vitals give `name: value`.
pub fn fields_from_output(output: &str) -> Vec<Field> {
    if let (Some(start), Some(end)) = (output.find('{'), output.rfind('}'))
        && start < end
        && let Ok(json) = serde_json::from_str::<Value>(&output[start..=end])
    {
        return fields_from_json(&json);
    }
    let mut out = Vec::new();
    let mut section = None;
    for raw in output.lines() {
        let line = raw.trim().trim_start_matches(['-', '*', '•', ' ']).trim();
        if line.is_empty() {
            continue;
        }
        let (name, rest) = match line.split_once(':') {
            Some((n, r)) => (n.trim(), r.trim()),
            None => (line, ""),
        };
        if let Some(s) = heading(name) {
            section = Some(s);
            if rest.is_empty() {
                continue;
            }
        }
        let field = |kind, key: &str, value: &str| Field {
            kind,
            key: canonical(key),
            value: canonical(value),
        };
        match section {
            Some(Section::Diagnoses) => out.push(field(
                FieldKind::Diagnosis,
                if heading(name).is_some() { rest } else { line },
                "",
            )),
            Some(Section::Medications) => {
                let text = if heading(name).is_some() { rest } else { line };
                let drug: String = text
                    .split_whitespace()
                    .take_while(|w| !w.starts_with(|c: char| c.is_ascii_digit()))
                    .collect::<Vec<_>>()
                    .join(" ");
                out.push(field(FieldKind::MedicationName, &drug, ""));
            }
            Some(Section::Labs) if !rest.is_empty() => {
                out.push(field(FieldKind::LabValue, name, value_part(rest)))
            }
            Some(Section::Vitals) if !rest.is_empty() => {
                out.push(field(FieldKind::Vital, name, value_part(rest)))
            }
            _ => {}
        }
    }
    out
}

/// The value and unit of "142 mg/dL (70-99) H": everything before a parenthesis or a trailing flag.
fn value_part(text: &str) -> &str {
    let cut = text.find(['(', '[']).unwrap_or(text.len());
    let text = text[..cut].trim();
    text.strip_suffix(" H")
        .or_else(|| text.strip_suffix(" L"))
        .unwrap_or(text)
        .trim()
}

/// How values must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Canonical values equal.
    Strict,
    /// The predicted value states the expected one, word-bounded ("142 mg/dl (high)" for "142 mg/dl").
    Lenient,
}

/// Counts and scores of one field type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldScore {
    /// Predicted and expected.
    pub true_positives: usize,
    /// Predicted, not expected (hallucinated or wrong).
    pub false_positives: usize,
    /// Expected, not predicted.
    pub false_negatives: usize,
}

impl FieldScore {
    /// tp / (tp + fp); 1 when nothing was predicted.
    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }
    /// tp / (tp + fn); 1 when nothing was expected.
    pub fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }
    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

fn keys_match(predicted: &str, expected: &str) -> bool {
    predicted == expected
}

fn values_match(predicted: &str, expected: &str, matching: Matching) -> bool {
    match matching {
        Matching::Strict => predicted == expected,
        Matching::Lenient => {
            predicted == expected || (!expected.is_empty() && contains_word(predicted, expected))
        }
    }
}

/// Matches predicted to expected records one to one (same type, same key, agreeing value) and counts per type.
pub fn score(
    predicted: &[Field],
    expected: &[Field],
    matching: Matching,
) -> BTreeMap<FieldKind, FieldScore> {
    let mut scores: BTreeMap<FieldKind, FieldScore> = BTreeMap::new();
    let mut used = vec![false; predicted.len()];
    for e in expected {
        let hit = predicted.iter().enumerate().position(|(i, p)| {
            !used[i]
                && p.kind == e.kind
                && keys_match(&p.key, &e.key)
                && values_match(&p.value, &e.value, matching)
        });
        let s = scores.entry(e.kind).or_default();
        match hit {
            Some(i) => {
                used[i] = true;
                s.true_positives += 1;
            }
            None => s.false_negatives += 1,
        }
    }
    for (p, _) in predicted.iter().zip(&used).filter(|(_, u)| !**u) {
        scores.entry(p.kind).or_default().false_positives += 1;
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn truth() -> Vec<Field> {
        fields_from_json(&json!({
            "diagnoses": ["Type 2 diabetes mellitus", {"name": "Essential hypertension"}],
            "medications": [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"},
                            {"name": "Cyanocobalamin", "dose": "1000 mcg", "route": "IM", "frequency": "monthly"}],
            "labs": [{"name": "Glucose", "value": "142", "unit": "mg/dL", "reference_range": "70-99", "flag": "H"},
                     {"name": "PT", "value": "14.2", "unit": "s", "reference_range": "11-13.5", "flag": "H"},
                     {"name": "WBC", "value": "12.4", "unit": "10^3/uL", "reference_range": "4.5-11", "flag": "H"}],
            "vitals": [{"name": "BP", "value": "142/88", "unit": "mmHg"}]
        }))
    }

    #[test]
    fn canonical_spellings() {
        assert_eq!(canonical("1,000 µg"), canonical("1000 mcg"));
        assert_eq!(canonical("1.0e3 ug"), "1000 ug");
        assert_eq!(canonical("500mg"), "500 mg");
        assert_eq!(canonical("twice daily"), canonical("b.i.d."));
        assert_eq!(canonical("q.d."), "daily");
        assert_eq!(canonical("12.4 K/uL"), canonical("12.4 x10^3/uL"));
        assert_eq!(canonical("7.90 %"), "7.9 %");
        assert_ne!(canonical("142"), canonical("42"));
        assert_eq!(canonical("12.4 10^3/uL"), "12.4 k/ul");
    }

    #[test]
    fn perfect_reordered_and_respelled_prediction_scores_one() {
        let predicted = fields_from_json(&json!({
            "vitals": [{"name": "bp", "value": "142/88", "unit": "mmHg"}],
            "labs": [{"name": "WBC", "value": "12.4", "unit": "K/uL", "reference_range": "4.5-11", "flag": "high"},
                     {"name": "pt", "value": "14.2", "unit": "s", "reference_range": "11-13.5", "flag": "H"},
                     {"name": "glucose", "value": 142, "unit": "mg/dl", "reference_range": "70-99", "flag": "H"}],
            "medications": [{"name": "cyanocobalamin", "dose": "1,000 µg", "route": "intramuscular", "frequency": "monthly"},
                            {"name": "metformin", "dose": "500mg", "route": "by mouth", "frequency": "twice daily"}],
            "diagnoses": ["essential hypertension", "type 2 diabetes mellitus"]
        }));
        for (kind, s) in score(&predicted, &truth(), Matching::Strict) {
            assert_eq!((s.precision(), s.recall()), (1.0, 1.0), "{kind:?}: {s:?}");
        }
    }

    #[test]
    fn traps_42_vs_142_pt_vs_ptt_and_hallucinations() {
        let predicted = fields_from_json(&json!({
            "labs": [{"name": "Glucose", "value": "42", "unit": "mg/dL"},
                     {"name": "PTT", "value": "14.2", "unit": "s"},
                     {"name": "WBC", "value": "12.4", "unit": "10^3/uL"},
                     {"name": "Potassium", "value": "4.1", "unit": "mmol/L"}]
        }));
        let s = score(&predicted, &truth(), Matching::Strict)[&FieldKind::LabValue];
        // Only WBC is right; glucose 42 (not 142), PTT (not PT) and the invented potassium are false positives.
        assert_eq!(
            (s.true_positives, s.false_positives, s.false_negatives),
            (1, 3, 2)
        );
        assert_eq!(s.precision(), 0.25);
        assert!((s.recall() - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.f1() - 2.0 * 0.25 * (1.0 / 3.0) / (0.25 + 1.0 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn lenient_accepts_extra_words_strict_does_not() {
        let expected = vec![Field {
            kind: FieldKind::LabValue,
            key: "glucose".into(),
            value: canonical("142 mg/dL"),
        }];
        let predicted = vec![Field {
            kind: FieldKind::LabValue,
            key: "glucose".into(),
            value: canonical("142 mg/dL (fasting)"),
        }];
        assert_eq!(
            score(&predicted, &expected, Matching::Strict)[&FieldKind::LabValue].true_positives,
            0
        );
        assert_eq!(
            score(&predicted, &expected, Matching::Lenient)[&FieldKind::LabValue].true_positives,
            1
        );
        // Lenient still respects number boundaries.
        let wrong = vec![Field {
            kind: FieldKind::LabValue,
            key: "glucose".into(),
            value: canonical("1142 mg/dL"),
        }];
        assert_eq!(
            score(&wrong, &expected, Matching::Lenient)[&FieldKind::LabValue].true_positives,
            0
        );
    }

    #[test]
    fn json_in_prose_and_fenced() {
        let answer = "Here is the extraction:\n```json\n{\"labs\": [{\"name\": \"Glucose\", \"value\": \"142\", \"unit\": \"mg/dL\"}]}\n```";
        let fields = fields_from_output(answer);
        assert!(fields.contains(&Field {
            kind: FieldKind::LabValue,
            key: "glucose".into(),
            value: "142 mg/dl".into()
        }));
    }

    #[test]
    fn free_text_by_headings_and_bullets() {
        let answer = "**Diagnoses:**\n- Type 2 diabetes mellitus\n- Essential hypertension\n\nMedications:\n\
                      - Metformin 500 mg PO BID\n\nLab results\n- Glucose: 142 mg/dL (70-99) H\n- PT: 14.2 s\n\n\
                      Vital signs: \n* BP: 142/88 mmHg";
        let predicted = fields_from_output(answer);
        let scores = score(&predicted, &truth(), Matching::Strict);
        assert_eq!(scores[&FieldKind::Diagnosis].true_positives, 2);
        assert_eq!(scores[&FieldKind::MedicationName].true_positives, 1);
        assert_eq!(scores[&FieldKind::LabValue].true_positives, 2);
        assert_eq!(scores[&FieldKind::Vital].true_positives, 1);
        assert_eq!(scores[&FieldKind::LabValue].false_positives, 0);
    }

    #[test]
    fn empty_prediction_has_zero_recall_and_no_false_positives() {
        let scores = score(&[], &truth(), Matching::Strict);
        let s = scores[&FieldKind::Diagnosis];
        assert_eq!((s.recall(), s.false_positives, s.f1()), (0.0, 0, 0.0));
    }
}

//! Synthetic clinical forms with exact ground truth: a record (patient, diagnoses, medications, labs, vitals,
//! procedures) sampled from curated vocabularies, laid out as one of seven document kinds ([`FormKind`]), rendered
//! to a page ([`crate::render`]). Everything is a pure function of `(kind, seed)`.
//!
//! The ground truth ([`Truth`]) holds each field as the page prints it, so every value can be found in the page's
//! text ([`Form::text`]), which the tests check for every kind and many seeds.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The document kinds: the reference's five evaluation documents, a discharge summary and a prescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormKind {
    /// Medication reconciliation form: a table of home medications with dose, route, frequency, continue/stop.
    MedicationReconciliation,
    /// ICU flowsheet: vitals over the day, drips, labs.
    IcuFlowsheet,
    /// Cardiology consultation note: free text with history, medications, assessment and plan.
    CardiologyConsult,
    /// Complex laboratory panel: a table of results with units, reference ranges and flags.
    LabPanel,
    /// Surgical operative note: procedure, diagnoses, findings as prose.
    OperativeNote,
    /// Discharge summary: diagnoses, procedures, discharge medications, follow-up.
    DischargeSummary,
    /// Prescription: one prescriber, a few medications with directions.
    Prescription,
}

impl FormKind {
    /// Every kind.
    pub const ALL: [FormKind; 7] = [
        Self::MedicationReconciliation,
        Self::IcuFlowsheet,
        Self::CardiologyConsult,
        Self::LabPanel,
        Self::OperativeNote,
        Self::DischargeSummary,
        Self::Prescription,
    ];

    /// The kebab-case name (`medication-reconciliation`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::MedicationReconciliation => "medication-reconciliation",
            Self::IcuFlowsheet => "icu-flowsheet",
            Self::CardiologyConsult => "cardiology-consult",
            Self::LabPanel => "lab-panel",
            Self::OperativeNote => "operative-note",
            Self::DischargeSummary => "discharge-summary",
            Self::Prescription => "prescription",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::MedicationReconciliation => "MEDICATION RECONCILIATION FORM",
            Self::IcuFlowsheet => "ICU NURSING FLOWSHEET",
            Self::CardiologyConsult => "CARDIOLOGY CONSULTATION NOTE",
            Self::LabPanel => "LABORATORY REPORT - COMPREHENSIVE PANEL",
            Self::OperativeNote => "OPERATIVE REPORT",
            Self::DischargeSummary => "DISCHARGE SUMMARY",
            Self::Prescription => "PRESCRIPTION",
        }
    }
}

impl std::str::FromStr for FormKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown form kind `{s}` (kinds: {})", names.join(", "))
            })
    }
}

/// The patient block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Patient {
    /// "Last, First".
    pub name: String,
    /// Medical record number.
    pub mrn: String,
    /// Date of birth, `MM/DD/YYYY`.
    pub dob: String,
    /// `M` or `F`.
    pub sex: String,
}

/// A diagnosis with its ICD-10 code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// Name as printed.
    pub name: String,
    /// ICD-10-CM code.
    pub icd10: String,
}

/// A medication order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Medication {
    /// Generic name.
    pub name: String,
    /// Dose with unit ("500 mg").
    pub dose: String,
    /// Route ("PO", "IV", ...).
    pub route: String,
    /// Frequency ("BID", "q8h", ...).
    pub frequency: String,
}

/// A laboratory result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lab {
    /// Test name.
    pub name: String,
    /// Value as printed.
    pub value: String,
    /// Unit.
    pub unit: String,
    /// Reference range ("3.5-5.1").
    pub range: String,
    /// "H", "L" or "" (within range).
    pub flag: String,
}

/// A vital sign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vital {
    /// Name ("Heart rate").
    pub name: String,
    /// Value as printed ("88", "132/84").
    pub value: String,
    /// Unit ("bpm", "mmHg").
    pub unit: String,
}

/// Every field a form shows, as it shows it: the exact ground truth of extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    /// Document kind.
    pub kind: FormKind,
    /// Seed the document was made from.
    pub seed: u64,
    /// Patient.
    pub patient: Patient,
    /// Diagnoses.
    pub diagnoses: Vec<Diagnosis>,
    /// Medications.
    pub medications: Vec<Medication>,
    /// Laboratory results.
    pub labs: Vec<Lab>,
    /// Vital signs.
    pub vitals: Vec<Vital>,
    /// Procedures.
    pub procedures: Vec<String>,
}

impl Truth {
    /// The extraction target: the ground truth as JSON in the schema of [`crate::chat::EXTRACTION_PROMPT`] (and
    /// of the field-level scorer), keys in the prompt's order, values exactly as printed.
    pub fn extraction(&self) -> String {
        #[derive(Serialize)]
        struct Name<'a> {
            name: &'a str,
        }
        #[derive(Serialize)]
        struct LabResult<'a> {
            name: &'a str,
            value: &'a str,
            unit: &'a str,
            reference_range: &'a str,
            flag: &'a str,
        }
        #[derive(Serialize)]
        struct Extraction<'a> {
            diagnoses: Vec<Name<'a>>,
            medications: &'a [Medication],
            labs: Vec<LabResult<'a>>,
            vitals: &'a [Vital],
        }
        let extraction = Extraction {
            diagnoses: self
                .diagnoses
                .iter()
                .map(|d| Name { name: &d.name })
                .collect(),
            medications: &self.medications,
            labs: self
                .labs
                .iter()
                .map(|l| LabResult {
                    name: &l.name,
                    value: &l.value,
                    unit: &l.unit,
                    reference_range: &l.range,
                    flag: &l.flag,
                })
                .collect(),
            vitals: &self.vitals,
        };
        serde_json::to_string(&extraction).unwrap_or_else(|_| unreachable!("strings serialise"))
    }
}

/// A piece of page layout, in reading order.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// The document title.
    Title(String),
    /// A section heading.
    Heading(String),
    /// `label: value` pairs laid out in columns.
    Fields(Vec<(String, String)>),
    /// A ruled table.
    Table {
        /// Column headers.
        header: Vec<String>,
        /// Rows of cells.
        rows: Vec<Vec<String>>,
    },
    /// Word-wrapped prose.
    Paragraph(String),
    /// Checkboxes with their labels.
    Checks(Vec<(String, bool)>),
}

/// A synthetic form: its ground truth and layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Form {
    /// What the page shows, field by field.
    pub truth: Truth,
    /// How the page shows it.
    pub blocks: Vec<Block>,
}

impl Form {
    /// The form of `kind` made from `seed`.
    pub fn generate(kind: FormKind, seed: u64) -> Self {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (kind as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let truth = sample(kind, seed, &mut rng);
        let blocks = layout(&truth, &mut rng);
        Self { truth, blocks }
    }

    /// The page's text, block by block, one line per row or field (what a perfect reader would see).
    pub fn text(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Title(t) | Block::Heading(t) | Block::Paragraph(t) => {
                    out.push_str(t);
                    out.push('\n');
                }
                Block::Fields(fields) => {
                    for (k, v) in fields {
                        out.push_str(&format!("{k}: {v}\n"));
                    }
                }
                Block::Table { header, rows } => {
                    out.push_str(&header.join(" | "));
                    out.push('\n');
                    for row in rows {
                        out.push_str(&row.join(" | "));
                        out.push('\n');
                    }
                }
                Block::Checks(checks) => {
                    for (label, on) in checks {
                        out.push_str(&format!("[{}] {label}\n", if *on { "x" } else { " " }));
                    }
                }
            }
        }
        out
    }
}

const FIRST: &[&str] = &[
    "James", "Maria", "Robert", "Linda", "Michael", "Aisha", "David", "Mei", "Carlos", "Fatima",
    "John", "Olga", "Samuel", "Priya", "Thomas", "Grace",
];
const LAST: &[&str] = &[
    "Smith", "Garcia", "Johnson", "Nguyen", "Brown", "Okafor", "Miller", "Kowalski", "Davis",
    "Haddad", "Wilson", "Tanaka", "Moore", "Patel", "Taylor", "Anderson",
];

/// (name, ICD-10).
const DIAGNOSES: &[(&str, &str)] = &[
    ("Essential hypertension", "I10"),
    ("Type 2 diabetes mellitus without complications", "E11.9"),
    ("Atrial fibrillation", "I48.91"),
    ("Congestive heart failure", "I50.9"),
    ("Chronic obstructive pulmonary disease", "J44.9"),
    ("Community-acquired pneumonia", "J18.9"),
    ("Acute kidney injury", "N17.9"),
    ("Hyperlipidemia", "E78.5"),
    ("Coronary artery disease", "I25.10"),
    ("Sepsis, unspecified organism", "A41.9"),
    ("Acute appendicitis", "K35.80"),
    ("Cholelithiasis with cholecystitis", "K80.10"),
    ("Hypothyroidism", "E03.9"),
    ("Iron deficiency anemia", "D50.9"),
];

/// (name, doses, routes, frequencies).
type MedSpec = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);
const MEDICATIONS: &[MedSpec] = &[
    (
        "Metformin",
        &["500 mg", "850 mg", "1000 mg"],
        &["PO"],
        &["BID", "daily"],
    ),
    (
        "Lisinopril",
        &["5 mg", "10 mg", "20 mg"],
        &["PO"],
        &["daily"],
    ),
    (
        "Atorvastatin",
        &["20 mg", "40 mg", "80 mg"],
        &["PO"],
        &["daily at bedtime"],
    ),
    (
        "Metoprolol tartrate",
        &["25 mg", "50 mg"],
        &["PO"],
        &["BID"],
    ),
    ("Apixaban", &["2.5 mg", "5 mg"], &["PO"], &["BID"]),
    (
        "Furosemide",
        &["20 mg", "40 mg"],
        &["PO", "IV"],
        &["daily", "BID"],
    ),
    (
        "Insulin glargine",
        &["10 units", "20 units", "30 units"],
        &["SC"],
        &["at bedtime"],
    ),
    (
        "Levothyroxine",
        &["50 mcg", "75 mcg", "100 mcg"],
        &["PO"],
        &["daily"],
    ),
    ("Ceftriaxone", &["1 g", "2 g"], &["IV"], &["q24h"]),
    ("Vancomycin", &["1 g", "1.25 g"], &["IV"], &["q12h"]),
    ("Pantoprazole", &["40 mg"], &["PO", "IV"], &["daily"]),
    (
        "Acetaminophen",
        &["500 mg", "650 mg", "1000 mg"],
        &["PO"],
        &["q6h PRN", "q8h"],
    ),
    ("Heparin", &["5000 units"], &["SC"], &["q8h"]),
    ("Albuterol", &["2.5 mg"], &["nebulized"], &["q4h PRN"]),
    ("Amlodipine", &["5 mg", "10 mg"], &["PO"], &["daily"]),
    ("Clopidogrel", &["75 mg"], &["PO"], &["daily"]),
];

/// (name, unit, low, high, decimals).
const LABS: &[(&str, &str, f64, f64, usize)] = &[
    ("Sodium", "mmol/L", 135.0, 145.0, 0),
    ("Potassium", "mmol/L", 3.5, 5.1, 1),
    ("Chloride", "mmol/L", 98.0, 107.0, 0),
    ("Bicarbonate", "mmol/L", 22.0, 29.0, 0),
    ("BUN", "mg/dL", 7.0, 20.0, 0),
    ("Creatinine", "mg/dL", 0.6, 1.2, 2),
    ("Glucose", "mg/dL", 70.0, 99.0, 0),
    ("Calcium", "mg/dL", 8.6, 10.3, 1),
    ("WBC", "10^3/uL", 4.5, 11.0, 1),
    ("Hemoglobin", "g/dL", 12.0, 16.0, 1),
    ("Platelets", "10^3/uL", 150.0, 400.0, 0),
    ("PT", "sec", 11.0, 13.5, 1),
    ("INR", "", 0.8, 1.1, 1),
    ("PTT", "sec", 25.0, 35.0, 1),
    ("Troponin I", "ng/mL", 0.0, 0.04, 2),
    ("BNP", "pg/mL", 0.0, 100.0, 0),
    ("Lactate", "mmol/L", 0.5, 2.2, 1),
    ("ALT", "U/L", 7.0, 56.0, 0),
    ("AST", "U/L", 10.0, 40.0, 0),
    ("TSH", "mIU/L", 0.4, 4.0, 2),
];

const PROCEDURES: &[&str] = &[
    "Laparoscopic appendectomy",
    "Laparoscopic cholecystectomy",
    "Transthoracic echocardiogram",
    "Cardiac catheterization",
    "Central venous catheter placement",
    "Endotracheal intubation",
    "Upper endoscopy",
    "Chest X-ray",
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T], n: usize) -> Vec<&'a T> {
    items.choose_multiple(rng, n.min(items.len())).collect()
}

fn format_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn lab(rng: &mut ChaCha8Rng, spec: &(&str, &str, f64, f64, usize)) -> Lab {
    let &(name, unit, low, high, decimals) = spec;
    let width = high - low;
    // About a third of results fall outside the range.
    let value = match rng.random_range(0..6) {
        0 => low - width * rng.random_range(0.05..0.4),
        1 => high + width * rng.random_range(0.05..0.8),
        _ => rng.random_range(low..=high),
    }
    .max(0.0);
    let printed = format_value(value, decimals);
    let shown: f64 = printed.parse().unwrap_or(value);
    let flag = if shown < low {
        "L"
    } else if shown > high {
        "H"
    } else {
        ""
    };
    Lab {
        name: name.into(),
        value: printed,
        unit: unit.into(),
        range: format!(
            "{}-{}",
            format_value(low, decimals),
            format_value(high, decimals)
        ),
        flag: flag.into(),
    }
}

fn vitals(rng: &mut ChaCha8Rng) -> Vec<Vital> {
    let v = |name: &str, value: String, unit: &str| Vital {
        name: name.into(),
        value,
        unit: unit.into(),
    };
    vec![
        v(
            "Blood pressure",
            format!(
                "{}/{}",
                rng.random_range(92..178),
                rng.random_range(52..104)
            ),
            "mmHg",
        ),
        v("Heart rate", rng.random_range(48..132).to_string(), "bpm"),
        v(
            "Respiratory rate",
            rng.random_range(10..30).to_string(),
            "/min",
        ),
        v(
            "Temperature",
            format!("{:.1}", rng.random_range(35.8..39.6)),
            "C",
        ),
        v("SpO2", rng.random_range(86..100).to_string(), "%"),
    ]
}

fn sample(kind: FormKind, seed: u64, rng: &mut ChaCha8Rng) -> Truth {
    let patient = Patient {
        name: format!(
            "{}, {}",
            LAST.choose(rng).copied().unwrap_or("Doe"),
            FIRST.choose(rng).copied().unwrap_or("Jane")
        ),
        mrn: format!("{:08}", rng.random_range(10_000_000..99_999_999u32)),
        dob: format!(
            "{:02}/{:02}/{}",
            rng.random_range(1..=12),
            rng.random_range(1..=28),
            rng.random_range(1935..2005)
        ),
        sex: if rng.random_bool(0.5) { "M" } else { "F" }.into(),
    };
    let (n_dx, n_med, n_lab, with_vitals, n_proc) = match kind {
        FormKind::MedicationReconciliation => (2, rng.random_range(5..9), 0, false, 0),
        FormKind::IcuFlowsheet => (2, rng.random_range(3..5), rng.random_range(5..8), true, 1),
        FormKind::CardiologyConsult => (3, rng.random_range(3..6), rng.random_range(3..5), true, 1),
        FormKind::LabPanel => (1, 0, rng.random_range(12..18), false, 0),
        FormKind::OperativeNote => (2, rng.random_range(1..3), 0, false, 1),
        FormKind::DischargeSummary => (3, rng.random_range(4..7), rng.random_range(3..6), true, 2),
        FormKind::Prescription => (1, rng.random_range(1..4), 0, false, 0),
    };
    let diagnoses = pick(rng, DIAGNOSES, n_dx)
        .into_iter()
        .map(|&(name, icd10)| Diagnosis {
            name: name.into(),
            icd10: icd10.into(),
        })
        .collect();
    let medications = pick(rng, MEDICATIONS, n_med)
        .into_iter()
        .map(|&(name, doses, routes, freqs)| Medication {
            name: name.into(),
            dose: doses.choose(rng).copied().unwrap_or_default().into(),
            route: routes.choose(rng).copied().unwrap_or_default().into(),
            frequency: freqs.choose(rng).copied().unwrap_or_default().into(),
        })
        .collect();
    let labs = pick(rng, LABS, n_lab)
        .into_iter()
        .map(|spec| lab(rng, spec))
        .collect();
    let procedures = pick(rng, PROCEDURES, n_proc)
        .into_iter()
        .map(|p| p.to_string())
        .collect();
    Truth {
        kind,
        seed,
        patient,
        diagnoses,
        medications,
        labs,
        vitals: if with_vitals { vitals(rng) } else { Vec::new() },
        procedures,
    }
}

fn med_line(m: &Medication) -> String {
    format!("{} {} {} {}", m.name, m.dose, m.route, m.frequency)
}

fn lab_row(l: &Lab) -> Vec<String> {
    vec![
        l.name.clone(),
        l.value.clone(),
        l.unit.clone(),
        l.range.clone(),
        l.flag.clone(),
    ]
}

fn layout(t: &Truth, rng: &mut ChaCha8Rng) -> Vec<Block> {
    let p = &t.patient;
    let date = format!(
        "{:02}/{:02}/2026",
        rng.random_range(1..=12),
        rng.random_range(1..=28)
    );
    let mut blocks = vec![
        Block::Title(t.kind.title().into()),
        Block::Fields(vec![
            ("Patient".into(), p.name.clone()),
            ("MRN".into(), p.mrn.clone()),
            ("DOB".into(), p.dob.clone()),
            ("Sex".into(), p.sex.clone()),
            ("Date".into(), date),
        ]),
    ];
    let dx_lines = || -> Vec<Block> {
        vec![
            Block::Heading("DIAGNOSES".into()),
            Block::Paragraph(
                t.diagnoses
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("{}. {} ({})", i + 1, d.name, d.icd10))
                    .collect::<Vec<_>>()
                    .join("  "),
            ),
        ]
    };
    let med_table = |extra: Option<&str>| -> Block {
        let mut header: Vec<String> = ["Medication", "Dose", "Route", "Frequency"]
            .map(String::from)
            .to_vec();
        if let Some(e) = extra {
            header.push(e.into());
        }
        Block::Table {
            header,
            rows: t
                .medications
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut row = vec![
                        m.name.clone(),
                        m.dose.clone(),
                        m.route.clone(),
                        m.frequency.clone(),
                    ];
                    if extra.is_some() {
                        row.push(if i % 4 == 3 { "Stop" } else { "Continue" }.into());
                    }
                    row
                })
                .collect(),
        }
    };
    let lab_table = || Block::Table {
        header: ["Test", "Result", "Unit", "Reference range", "Flag"]
            .map(String::from)
            .to_vec(),
        rows: t.labs.iter().map(lab_row).collect(),
    };
    let vitals_fields = || {
        Block::Fields(
            t.vitals
                .iter()
                .map(|v| (v.name.clone(), format!("{} {}", v.value, v.unit)))
                .collect(),
        )
    };
    match t.kind {
        FormKind::MedicationReconciliation => {
            blocks.extend(dx_lines());
            blocks.push(Block::Heading("HOME MEDICATIONS".into()));
            blocks.push(med_table(Some("Action")));
            blocks.push(Block::Checks(vec![
                ("Reviewed with patient".into(), true),
                ("Allergies verified".into(), rng.random_bool(0.7)),
                ("Pharmacy consulted".into(), rng.random_bool(0.3)),
            ]));
        }
        FormKind::IcuFlowsheet => {
            blocks.extend(dx_lines());
            blocks.push(Block::Heading("VITAL SIGNS (0800)".into()));
            blocks.push(vitals_fields());
            blocks.push(Block::Heading("INFUSIONS AND MEDICATIONS".into()));
            blocks.push(med_table(None));
            blocks.push(Block::Heading("LABS".into()));
            blocks.push(lab_table());
            blocks.push(Block::Heading("PROCEDURES".into()));
            blocks.push(Block::Paragraph(t.procedures.join("; ")));
        }
        FormKind::CardiologyConsult => {
            blocks.push(Block::Heading("HISTORY OF PRESENT ILLNESS".into()));
            blocks.push(Block::Paragraph(format!(
                "Patient with a history of {} referred for evaluation. Vital signs: {}.",
                t.diagnoses
                    .iter()
                    .map(|d| format!("{} ({})", d.name, d.icd10))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.vitals
                    .iter()
                    .map(|v| format!("{} {} {}", v.name, v.value, v.unit))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            blocks.push(Block::Heading("CURRENT MEDICATIONS".into()));
            blocks.push(Block::Paragraph(
                t.medications
                    .iter()
                    .map(med_line)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
            blocks.push(Block::Heading("PERTINENT LABS".into()));
            blocks.push(Block::Paragraph(
                t.labs
                    .iter()
                    .map(|l| {
                        let flag = if l.flag.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", l.flag)
                        };
                        format!("{} {} {} (ref {}){flag}", l.name, l.value, l.unit, l.range)
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
            blocks.push(Block::Heading("PLAN".into()));
            blocks.push(Block::Paragraph(format!(
                "Recommend {}. Follow up in cardiology clinic.",
                t.procedures.join(", ")
            )));
        }
        FormKind::LabPanel => {
            blocks.extend(dx_lines());
            blocks.push(Block::Heading("RESULTS".into()));
            blocks.push(lab_table());
        }
        FormKind::OperativeNote => {
            blocks.push(Block::Heading("PREOPERATIVE DIAGNOSIS".into()));
            blocks.push(Block::Paragraph(format!(
                "{} ({})",
                t.diagnoses[0].name, t.diagnoses[0].icd10
            )));
            blocks.push(Block::Heading("PROCEDURE PERFORMED".into()));
            blocks.push(Block::Paragraph(t.procedures.join("; ")));
            blocks.push(Block::Heading("FINDINGS".into()));
            blocks.push(Block::Paragraph(format!(
                "Also noted: {} ({}). Estimated blood loss {} mL. No complications.",
                t.diagnoses[1].name,
                t.diagnoses[1].icd10,
                rng.random_range(5..250)
            )));
            blocks.push(Block::Heading("POSTOPERATIVE ORDERS".into()));
            blocks.push(Block::Paragraph(
                t.medications
                    .iter()
                    .map(med_line)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        FormKind::DischargeSummary => {
            blocks.extend(dx_lines());
            blocks.push(Block::Heading("PROCEDURES THIS ADMISSION".into()));
            blocks.push(Block::Paragraph(t.procedures.join("; ")));
            blocks.push(Block::Heading("VITALS AT DISCHARGE".into()));
            blocks.push(vitals_fields());
            blocks.push(Block::Heading("LABS AT DISCHARGE".into()));
            blocks.push(lab_table());
            blocks.push(Block::Heading("DISCHARGE MEDICATIONS".into()));
            blocks.push(med_table(None));
        }
        FormKind::Prescription => {
            blocks.push(Block::Fields(vec![(
                "Diagnosis".into(),
                format!("{} ({})", t.diagnoses[0].name, t.diagnoses[0].icd10),
            )]));
            blocks.push(Block::Heading("Rx".into()));
            for m in &t.medications {
                blocks.push(Block::Paragraph(format!(
                    "{} {} - take {} {}. Dispense #{}, refills {}.",
                    m.name,
                    m.dose,
                    m.route,
                    m.frequency,
                    rng.random_range(14..91),
                    rng.random_range(0..4)
                )));
            }
            blocks.push(Block::Checks(vec![(
                "Substitution permitted".into(),
                rng.random_bool(0.5),
            )]));
        }
    }
    blocks
}

impl Form {
    /// A training/evaluation sample: the page text as shown, the ground truth as the JSON target.
    pub fn sample(&self) -> crate::Sample {
        let id = self.id();
        crate::Sample {
            document: id.clone(),
            id,
            source: crate::Source::Synthetic,
            category: self.truth.kind.name().into(),
            images: Vec::new(),
            text: self.text(),
            target: self.truth.extraction(),
        }
    }

    /// `<kind>-<seed>`, unique per form.
    pub fn id(&self) -> String {
        format!("{}-{:06}", self.truth.kind.name(), self.truth.seed)
    }
}

/// One form of a dataset written by [`write_forms`] (a line of `manifest.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `<kind>-<seed>`.
    pub id: String,
    /// Document kind.
    pub kind: FormKind,
    /// Seed.
    pub seed: u64,
    /// Page images, relative to the dataset directory.
    pub pages: Vec<String>,
    /// Ground truth JSON file, relative to the dataset directory.
    pub truth: String,
}

/// Writes `count` forms of each kind (seeds `first_seed..first_seed + count`) to `out`: per form its page PNGs
/// and `<id>.json` (the [`Truth`]), then `manifest.jsonl`; every file written atomically (a temporary file
/// renamed into place), so an interrupted run leaves no partial file. `artefacts` None draws scan artefacts per
/// form from its seed.
pub fn write_forms(
    out: &std::path::Path,
    kinds: &[FormKind],
    count: usize,
    first_seed: u64,
    artefacts: Option<crate::render::Artefacts>,
) -> crate::Result<Vec<Entry>> {
    std::fs::create_dir_all(out).map_err(|e| crate::DataError::Write {
        path: out.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut entries = Vec::new();
    for &kind in kinds {
        for seed in first_seed..first_seed + count as u64 {
            let form = Form::generate(kind, seed);
            let id = form.id();
            let mut pages = Vec::new();
            for (i, page) in crate::render::render(&form.blocks, seed, artefacts)
                .iter()
                .enumerate()
            {
                let name = format!("{id}.page{}.png", i + 1);
                crate::render::write_png(&out.join(&name), page)?;
                pages.push(name);
            }
            let truth = format!("{id}.json");
            let json =
                serde_json::to_vec_pretty(&form.truth).map_err(|e| crate::DataError::Write {
                    path: out.join(&truth).display().to_string(),
                    reason: e.to_string(),
                })?;
            crate::write_atomic(&out.join(&truth), &json)?;
            entries.push(Entry {
                id,
                kind,
                seed,
                pages,
                truth,
            });
        }
    }
    let mut manifest = String::new();
    for entry in &entries {
        manifest.push_str(&serde_json::to_string(entry).unwrap_or_default());
        manifest.push('\n');
    }
    crate::write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    Ok(entries)
}

/// The entries of a dataset written by [`write_forms`] (`dir/manifest.jsonl`); a line that is not an entry is an
/// error naming its line.
pub fn read_manifest(dir: &std::path::Path) -> crate::Result<Vec<Entry>> {
    crate::read_jsonl(&dir.join("manifest.jsonl"))
}

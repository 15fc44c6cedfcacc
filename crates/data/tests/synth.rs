//! Synthetic clinical forms: every ground-truth value is printed on the page, generation and rendering are
//! reproducible per seed (golden pixel hashes), datasets are written whole with a manifest.

#![allow(clippy::unwrap_used, missing_docs)]

use medvl_data::render::{Artefacts, PAGE, render};
use medvl_data::synth::{Entry, Form, FormKind, Truth, read_manifest, write_forms};

/// Every value of the truth, as the page must show it.
fn values(t: &Truth) -> Vec<String> {
    let p = &t.patient;
    let mut v = vec![p.name.clone(), p.mrn.clone(), p.dob.clone(), p.sex.clone()];
    for d in &t.diagnoses {
        v.extend([d.name.clone(), d.icd10.clone()]);
    }
    for m in &t.medications {
        v.extend([
            m.name.clone(),
            m.dose.clone(),
            m.route.clone(),
            m.frequency.clone(),
        ]);
    }
    for l in &t.labs {
        v.extend([l.name.clone(), l.value.clone(), l.range.clone()]);
        v.extend(
            [l.unit.clone(), l.flag.clone()]
                .into_iter()
                .filter(|s| !s.is_empty()),
        );
    }
    for s in &t.vitals {
        v.extend([s.name.clone(), s.value.clone(), s.unit.clone()]);
    }
    v.extend(t.procedures.iter().cloned());
    v
}

/// `needle` in `text` as whole tokens: not inside a longer word or number ("42" is not in "142" or "4.2"; a
/// sentence's full stop may follow).
fn shows(text: &str, needle: &str) -> bool {
    let bytes = text.as_bytes();
    let alnum = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric());
    text.match_indices(needle).any(|(i, _)| {
        let end = i + needle.len();
        let before_ok = i == 0 || !(alnum(i - 1) || bytes[i - 1] == b'.');
        let after_ok = match bytes.get(end) {
            None => true,
            Some(b'.') => !alnum(end + 1),
            Some(_) => !alnum(end),
        };
        before_ok && after_ok
    })
}

#[test]
fn every_field_of_the_truth_is_on_the_page() {
    for kind in FormKind::ALL {
        for seed in 0..25 {
            let form = Form::generate(kind, seed);
            let text = form.text();
            for value in values(&form.truth) {
                assert!(
                    shows(&text, &value),
                    "{kind:?} seed {seed}: `{value}` not on the page:\n{text}"
                );
            }
        }
    }
}

#[test]
fn forms_have_the_fields_their_kind_needs() {
    for seed in 0..10 {
        let t = |k| Form::generate(k, seed).truth;
        assert!(t(FormKind::MedicationReconciliation).medications.len() >= 5);
        assert!(t(FormKind::LabPanel).labs.len() >= 12);
        assert_eq!(t(FormKind::IcuFlowsheet).vitals.len(), 5);
        assert!(!t(FormKind::OperativeNote).procedures.is_empty());
        let rx = t(FormKind::Prescription);
        assert!((1..=3).contains(&rx.medications.len()) && rx.labs.is_empty());
        // Flags follow the printed value and range.
        for l in t(FormKind::LabPanel).labs {
            let (lo, hi) = l.range.split_once('-').unwrap();
            let (v, lo, hi): (f64, f64, f64) = (
                l.value.parse().unwrap(),
                lo.parse().unwrap(),
                hi.parse().unwrap(),
            );
            let flag = if v < lo {
                "L"
            } else if v > hi {
                "H"
            } else {
                ""
            };
            assert_eq!(l.flag, flag, "{l:?}");
        }
    }
}

#[test]
fn kinds_parse_from_their_names() {
    for kind in FormKind::ALL {
        assert_eq!(kind.name().parse::<FormKind>().unwrap(), kind);
    }
    let err = "icu".parse::<FormKind>().unwrap_err();
    assert!(
        err.contains("unknown form kind `icu`") && err.contains("lab-panel"),
        "{err}"
    );
}

/// FNV-1a over the pixels.
fn hash(pixels: &[u8]) -> u64 {
    pixels.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn pages_are_reproducible_and_drawn() {
    let form = Form::generate(FormKind::LabPanel, 3);
    let a = render(&form.blocks, 3, None);
    let b = render(&Form::generate(FormKind::LabPanel, 3).blocks, 3, None);
    assert_eq!(a, b);
    let other = render(&Form::generate(FormKind::LabPanel, 4).blocks, 4, None);
    assert_ne!(a[0], other[0]);
    for page in &a {
        assert_eq!(page.dimensions(), PAGE);
        let dark = page.pixels().filter(|p| p.0[0] < 128).count();
        // Text covers a few percent of a page: not blank, not black.
        let share = dark as f64 / (PAGE.0 * PAGE.1) as f64;
        assert!((0.005..0.2).contains(&share), "dark share {share}");
    }
}

/// Golden hashes: the pages of these seeds, clean and with scan artefacts, as rendered when the test was written.
/// A change in layout, fonts, vocabularies or sampling changes them (update deliberately, and look at the pages).
#[test]
fn golden_pages() {
    let clean = render(
        &Form::generate(FormKind::MedicationReconciliation, 1).blocks,
        1,
        Some(Artefacts::NONE),
    );
    let scanned = render(
        &Form::generate(FormKind::DischargeSummary, 2).blocks,
        2,
        None,
    );
    let got = (
        clean.len(),
        hash(clean[0].as_raw()),
        scanned.len(),
        hash(scanned[0].as_raw()),
    );
    assert_eq!(got, GOLDEN, "golden page hashes changed");
}

/// The pages committed under `docs/synthetic` are what the renderer draws today, pixel for pixel.
#[test]
fn committed_pages_are_current() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/synthetic");
    for kind in [
        FormKind::LabPanel,
        FormKind::MedicationReconciliation,
        FormKind::CardiologyConsult,
    ] {
        let form = Form::generate(kind, 1);
        let page = &render(&form.blocks, 1, None)[0];
        let file = docs.join(format!("{}.page1.png", form.id()));
        let committed = image::open(&file).unwrap().to_luma8();
        assert!(
            committed == *page,
            "{} differs from the renderer: regenerate with `medvl data synth --kind lab-panel,\
             medication-reconciliation,cardiology-consult --count 1 --seed 1`",
            file.display()
        );
        let truth: Truth = serde_json::from_slice(
            &std::fs::read(docs.join(format!("{}.json", form.id()))).unwrap(),
        )
        .unwrap();
        assert_eq!(truth, form.truth);
    }
}

const GOLDEN: (usize, u64, usize, u64) = (1, 6099893747793855377, 1, 12323611552261566844);

#[test]
fn datasets_are_written_whole() {
    let dir = std::env::temp_dir().join(format!("medvl-synth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let kinds = [FormKind::Prescription, FormKind::LabPanel];
    let entries = write_forms(&dir, &kinds, 2, 10, Some(Artefacts::NONE)).unwrap();
    assert_eq!(entries.len(), 4);
    let manifest = std::fs::read_to_string(dir.join("manifest.jsonl")).unwrap();
    let read: Vec<Entry> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(read, entries);
    assert_eq!(read_manifest(&dir).unwrap(), entries);
    let stats = medvl_data::stats::Stats::of_dir(&dir).unwrap();
    assert_eq!(
        (stats.total.documents, stats.total.pages),
        (4, entries.iter().map(|e| e.pages.len()).sum())
    );
    assert_eq!(stats.by_category["prescription"].documents, 2);
    assert_eq!(stats.split.iter().sum::<usize>(), 4);
    let medications: usize = entries
        .iter()
        .map(|e| Form::generate(e.kind, e.seed).truth.medications.len())
        .sum();
    assert_eq!(stats.records["medications"], medications);
    assert!(
        stats.markdown().starts_with("synthetic forms: 4 documents"),
        "{}",
        stats.markdown()
    );
    for e in &entries {
        let truth: Truth =
            serde_json::from_slice(&std::fs::read(dir.join(&e.truth)).unwrap()).unwrap();
        assert_eq!(truth, Form::generate(e.kind, e.seed).truth);
        for page in &e.pages {
            let img = image::open(dir.join(page)).unwrap();
            assert_eq!((img.width(), img.height()), PAGE);
        }
    }
    // Only finished files: no temporaries left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    // A damaged manifest is an error naming the file and the line.
    std::fs::write(
        dir.join("manifest.jsonl"),
        format!("{}\n{{\"id\": 3}}\n", manifest.lines().next().unwrap()),
    )
    .unwrap();
    let err = read_manifest(&dir).unwrap_err().to_string();
    assert!(err.contains("manifest.jsonl, row 2:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

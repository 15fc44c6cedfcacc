//! `medvl` end to end on the tiny reference model: the JSON output has the promised fields and the greedy tokens
//! and text of transformers for the same chat prompt (`fixtures/tiny/ask.json`, made by `fixtures/generate.py`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny")
}

fn medvl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medvl"))
        .args(args)
        .output()
        .expect("run medvl")
}

#[derive(serde::Deserialize)]
struct Expected {
    prompt: String,
    prompt_tokens: usize,
    image_tokens: usize,
    token_ids: Vec<u32>,
    text: String,
}

/// The transformers reference for the `ask` prompt (`fixtures/tiny/ask.json`).
fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("ask.json")).unwrap()).unwrap()
}

#[test]
fn ask_json_equals_transformers() {
    let expected = expected();
    let page = fixtures().join("page.png");
    let model = fixtures().join("v5");
    let out = medvl(&[
        "ask",
        page.to_str().unwrap(),
        "--prompt",
        &expected.prompt,
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        &expected.token_ids.len().to_string(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).unwrap();
    assert_eq!(ids, expected.token_ids);
    assert_eq!(json["text"], expected.text);
    assert_eq!(json["prompt_tokens"], expected.prompt_tokens);
    assert_eq!(json["image_tokens"], expected.image_tokens);
    for field in [
        "preprocess_s",
        "prefill_s",
        "decode_s",
        "decode_tokens_per_s",
    ] {
        assert!(
            json[field].as_f64().is_some_and(|v| v >= 0.0),
            "{field}: {}",
            json[field]
        );
    }
}

#[test]
fn streamed_text_equals_json_text() {
    let expected = expected();
    let page = fixtures().join("page.png");
    let model = fixtures().join("hub");
    let out = medvl(&[
        "ask",
        page.to_str().unwrap(),
        "-p",
        &expected.prompt,
        "-m",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "32",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", expected.text)
    );
}

#[test]
fn clear_errors() {
    let page = fixtures().join("page.png");
    let model = fixtures().join("hub");
    let out = medvl(&[
        "ask",
        page.to_str().unwrap(),
        "-p",
        "x",
        "--model",
        "/no/such/model/dir",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = medvl(&[
        "ask",
        "/no/such/page.png",
        "-p",
        "x",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read image /no/such/page.png"));

    let not_image = fixtures().join("ask.json");
    let out = medvl(&[
        "ask",
        not_image.to_str().unwrap(),
        "-p",
        "x",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("image 1") && err.contains("cannot decode image"),
        "{err}"
    );

    let out = medvl(&[
        "ask",
        page.to_str().unwrap(),
        "-p",
        "x",
        "--model",
        fixtures().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing config.json"));
}

/// A hub repo id resolves from the HF cache (`HF_HUB_CACHE`, offline mode), by branch and by commit.
#[test]
fn hub_repo_from_the_offline_cache() {
    let expected = expected();
    let cache = std::env::temp_dir().join(format!("medvl-hf-cache-{}", std::process::id()));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = cache.join("models--medvl--tiny/snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(cache.join("models--medvl--tiny/refs")).unwrap();
    std::fs::write(cache.join("models--medvl--tiny/refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(fixtures().join("v5")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let page = fixtures().join("page.png");
    let run = |model: &str, revision: &str| {
        Command::new(env!("CARGO_BIN_EXE_medvl"))
            .args([
                "ask",
                page.to_str().unwrap(),
                "-p",
                &expected.prompt,
                "--model",
                model,
                "--revision",
                revision,
            ])
            .args(["--max-new-tokens", "8", "--json"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    for revision in ["main", commit] {
        let out = run("medvl/tiny", revision);
        assert!(
            out.status.success(),
            "{revision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).unwrap();
        assert_eq!(ids, expected.token_ids[..8]);
    }
    let out = run("medvl/absent", "main");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not in the HF cache"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).ok();
}

/// `medvl quantize` writes a bitsandbytes NF4 checkpoint that loads back as NF4 and generates exactly what
/// quantizing while loading (`--quant nf4`) generates. (fixtures/check_nf4_checkpoint.py checks such a directory
/// against transformers + bitsandbytes.)
#[test]
fn quantize_then_load_equals_quantize_on_load() {
    let out_dir = std::env::temp_dir().join(format!("medvl-nf4-{}", std::process::id()));
    let model = fixtures().join("v5");
    let out = medvl(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("43 linear layers in NF4"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert!(!out_dir.join("model.safetensors.partial").exists());
    let page = fixtures().join("page.png");
    let ask = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "ask",
            page.to_str().unwrap(),
            "-p",
            "What is the diagnosis?",
            "-m",
            model,
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = medvl(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token_ids"].clone()
    };
    let saved = ask(out_dir.to_str().unwrap(), &[]);
    assert_eq!(saved, ask(model.to_str().unwrap(), &["--quant", "nf4"]));
    // NF4 changes the random tiny model's choices: the dense run differs.
    assert_ne!(saved, ask(model.to_str().unwrap(), &[]));
    std::fs::remove_dir_all(&out_dir).ok();
}

/// `medvl eval` end to end on the tiny model (random weights: no accuracy is expected) over synthetic forms: all
/// outputs written, scores in range; a run cut short resumes without redoing finished documents; `compare` reads
/// two runs.
#[test]
fn eval_writes_scores_resumes_and_compares() {
    let out = std::env::temp_dir().join(format!("medvl-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let model = fixtures().join("v5");
    // `medvl eval` on the first `limit` forms (one per kind), 6 new tokens each, into `dir`.
    let eval_into = |dir: &Path, limit: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--count",
            "1",
            "--limit",
            limit,
            "--max-new-tokens",
            "6",
            "--max-pixels",
            "60000",
            "--out",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = medvl(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let eval = |limit: &str| eval_into(&out, limit, &[]);
    let table = eval("2");
    assert!(table.contains("2 documents"), "{table}");
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = predictions
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // Forms are made per kind in FormKind::ALL order, seeds from 1,000,000.
    assert_eq!(lines[0]["id"], "medication-reconciliation-1000000");
    assert_eq!(lines[0]["kind"], "medication-reconciliation");
    assert_eq!(lines[0]["generated_tokens"], 6);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("evaluation.json")).unwrap()).unwrap();
    let overall = &json["evaluation"]["overall"];
    assert_eq!(overall["documents"], 2);
    for metric in ["combined", "precision", "recall", "f1", "lenient_f1"] {
        let v = overall[metric]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{metric} = {v}");
    }
    assert_eq!(json["documents"].as_array().unwrap().len(), 2);
    assert!(
        std::fs::read_to_string(out.join("report.md"))
            .unwrap()
            .contains("| Field F1 (strict) |")
    );

    // A crash mid-write leaves a torn last line: it is dropped and that document redone, the first kept as is.
    let first = predictions.lines().next().unwrap().to_string();
    std::fs::write(
        out.join("predictions.jsonl"),
        format!("{first}\n{{\"id\": \"ico"),
    )
    .unwrap();
    let table = eval("3");
    assert!(table.contains("3 documents"), "{table}");
    let again = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let ids: Vec<String> = again
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        ids,
        [
            "medication-reconciliation-1000000",
            "icu-flowsheet-1000000",
            "cardiology-consult-1000000"
        ]
    );
    assert_eq!(again.lines().next().unwrap(), first);

    let o = medvl(&[
        "eval",
        "compare",
        out.to_str().unwrap(),
        out.join("evaluation.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| Field F1 (strict) |") && table.contains("+0.0 pp"),
        "{table}"
    );
    // With a LoRA adapter: the run is labelled with it.
    let tuned = out.join("tuned");
    let adapter = fixtures().join("lora");
    eval_into(&tuned, "1", &["--adapter", adapter.to_str().unwrap()]);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tuned.join("evaluation.json")).unwrap()).unwrap();
    let label = json["evaluation"]["label"].as_str().unwrap();
    assert!(
        label.ends_with(&format!("v5 + {}", adapter.display())),
        "{label}"
    );
    let o = medvl(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--count",
        "1",
        "--limit",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out DIR is required"));
    std::fs::remove_dir_all(&out).unwrap();
}

/// `medvl data mtsamples` draws a CSV's transcriptions as pages (bad rows reported, or an error naming the row)
/// and `medvl data stats` counts them.
#[test]
fn mtsamples_pages_and_stats() {
    let dir = std::env::temp_dir().join(format!("medvl-cli-mt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("mtsamples.csv");
    std::fs::write(
        &csv,
        "description,medical_specialty,sample_name,transcription,keywords\n\
         x, Surgery, Appendectomy ,\"PREOPERATIVE DIAGNOSIS:,  Appendicitis.,PROCEDURE:,  Appendectomy.\",k\n\
         y, Surgery, Empty ,,k\n\
         z, Cardiology, Consult ,\"HISTORY:,  Chest pain, BP 142/88.\",k\n",
    )
    .unwrap();
    let out = dir.join("pages");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "data",
            "mtsamples",
            "--csv",
            csv.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--clean",
        ];
        a.extend_from_slice(extra);
        medvl(&a.iter().map(|s| &**s).collect::<Vec<_>>())
    };
    let o = args(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("row 2: empty transcription"), "{err}");
    let o = args(&["--skip-bad"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skipped row 2: empty transcription")
            && err.contains("wrote 2 transcriptions"),
        "{err}"
    );
    assert!(
        out.join("mtsamples-1.page1.png").exists() && out.join("mtsamples-3.page1.png").exists()
    );
    let o = medvl(&["data", "stats", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.starts_with("mtsamples pages: 2 documents, 2 pages"),
        "{table}"
    );
    assert!(
        table.contains("| Cardiology | 1 | 1 | 1 |") && table.contains("| Surgery | 1 | 1 | 1 |"),
        "{table}"
    );

    // The pages as training conversations: the reference's pairing (its instruction, the raw transcription).
    let chat = dir.join("chat.jsonl");
    let o = medvl(&[
        "data",
        "chat",
        out.to_str().unwrap(),
        "--split",
        "all",
        "--style",
        "reference",
        "--out",
        chat.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&chat)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let first = &lines[0];
    assert!(
        first["messages"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("Extract all medical information")
    );
    assert_eq!(
        first["messages"][1]["content"],
        "PREOPERATIVE DIAGNOSIS:\nAppendicitis.\nPROCEDURE:\nAppendectomy."
    );
    let image = first["images"][0]["file"].as_str().unwrap();
    assert!(std::path::Path::new(image).is_file(), "{image}");
    let o = medvl(&[
        "data",
        "chat",
        out.to_str().unwrap(),
        "--split",
        "dev",
        "--out",
        chat.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown split `dev`"));
    let o = medvl(&[
        "data",
        "pathvqa",
        "--source",
        "./no/such/dir",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("neither a file, a folder nor a hub dataset"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Synthetic forms become extraction conversations whose target is the ground truth in the scorer's schema.
#[test]
fn synthetic_forms_as_extraction_conversations() {
    let dir = std::env::temp_dir().join(format!("medvl-cli-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let forms = dir.join("forms");
    let o = medvl(&[
        "data",
        "synth",
        "--kind",
        "prescription",
        "--count",
        "10",
        "--clean",
        "--out",
        forms.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let count = |split: &str| {
        let file = dir.join(format!("{split}.jsonl"));
        let o = medvl(&[
            "data",
            "chat",
            forms.to_str().unwrap(),
            "--split",
            split,
            "--out",
            file.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&file).unwrap().lines().count()
    };
    // 10 documents: 8 / 1 / 1.
    assert_eq!(
        (count("train"), count("validation"), count("test")),
        (8, 1, 1)
    );
    let line = std::fs::read_to_string(dir.join("test.jsonl")).unwrap();
    let c: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let id = c["id"].as_str().unwrap();
    let truth: serde_json::Value =
        serde_json::from_slice(&std::fs::read(forms.join(format!("{id}.json"))).unwrap()).unwrap();
    let target: serde_json::Value =
        serde_json::from_str(c["messages"][1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(target["medications"], truth["medications"]);
    assert_eq!(
        target["diagnoses"][0]["name"],
        truth["diagnoses"][0]["name"]
    );
    assert!(
        c["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("\"reference_range\"")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

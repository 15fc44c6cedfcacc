//! The Qwen2.5-VL chat template, rendered in Rust (no template engine): the model's built-in template, equal to
//! the Jinja template of the hub's `chat_template.json` for text and image content (checked against transformers'
//! `apply_chat_template` by `tests/chat_template.rs`).
//!
//! ```text
//! <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n            (when the first message is not a system one)
//! <|im_start|>{role}\n{text and <|vision_start|><|image_pad|><|vision_end|> parts}<|im_end|>\n   (each message)
//! <|im_start|>assistant\n                                                  (with add_generation_prompt)
//! ```

use serde::{Deserialize, Serialize};

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

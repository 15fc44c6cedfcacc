//! Samples as chat conversations for training: a user turn (the sample's images, then a prompt that matches the
//! task) and the assistant's target. [`PromptStyle::Task`] asks for what the target is: the extraction JSON of a
//! synthetic form under [`EXTRACTION_PROMPT`] (the prompt `medvl eval` scores with), a transcription of an
//! MTSamples page under [`TRANSCRIPTION_PROMPT`], a short answer to a PathVQA question. [`PromptStyle::Reference`]
//! is the reference pipeline's pairing, kept for comparison: every document under the service's extraction
//! instruction ([`REFERENCE_PROMPT`]) with the raw target, and the bare question for PathVQA.

use serde::{Deserialize, Serialize};

use crate::{Image, Sample, Source};

/// The extraction instruction of training and evaluation: JSON in the schema the field-level scorer reads and
/// [`crate::synth::Truth::extraction`] writes.
pub const EXTRACTION_PROMPT: &str = "Extract the medical information in this document as one JSON object with the keys \
\"diagnoses\" (a list of {\"name\"}), \"medications\" (a list of {\"name\", \"dose\", \"route\", \"frequency\"}), \
\"labs\" (a list of {\"name\", \"value\", \"unit\", \"reference_range\", \"flag\"}) and \"vitals\" (a list of \
{\"name\", \"value\", \"unit\"}). Copy values exactly as written; include only what the document says.";

/// The reference service's default extraction instruction, by intent (diagnoses, medications with dose and route,
/// labs with units and ranges, vitals, procedures; a free-form structured answer).
pub const REFERENCE_PROMPT: &str = "Extract all medical information from this document: diagnoses, medications with dose, \
route and frequency, lab values with units and reference ranges, vital signs, and procedures. Answer in structured \
form and only with what the document says.";

/// The instruction for reading a page of running text.
pub const TRANSCRIPTION_PROMPT: &str = "Transcribe this medical document exactly as written. Put each section \
heading (such as HISTORY OF PRESENT ILLNESS:) on its own line, followed by its text.";

/// Which prompts a conversation gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// A prompt that asks for what the target is.
    #[default]
    Task,
    /// The reference pipeline's: the service's extraction instruction for every document, the bare question.
    Reference,
}

impl std::str::FromStr for PromptStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "task" => Ok(Self::Task),
            "reference" => Ok(Self::Reference),
            _ => Err(format!("unknown prompt style `{s}` (task, reference)")),
        }
    }
}

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person asking (the images belong to the first user turn, before its text).
    User,
    /// The model; its turns are the training targets.
    Assistant,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
}

/// A training conversation (a line of the JSON-lines file `medvl data chat` writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The sample id.
    pub id: String,
    /// The document (for splits).
    pub document: String,
    /// Images shown in the first user turn, in order.
    pub images: Vec<Image>,
    /// User and assistant turns, alternating.
    pub messages: Vec<Turn>,
}

/// The prompt a sample gets in `style`.
pub fn prompt(sample: &Sample, style: PromptStyle) -> String {
    match (sample.source, style) {
        (Source::PathVqa, PromptStyle::Reference) => sample.text.clone(),
        (Source::PathVqa, PromptStyle::Task) => {
            format!(
                "{}\nAnswer with a single word or a short phrase.",
                sample.text
            )
        }
        (Source::Synthetic, PromptStyle::Task) => EXTRACTION_PROMPT.into(),
        (Source::MtSamples, PromptStyle::Task) => TRANSCRIPTION_PROMPT.into(),
        (Source::Synthetic | Source::MtSamples, PromptStyle::Reference) => REFERENCE_PROMPT.into(),
    }
}

/// The conversation of a sample: one user turn with its images and [`prompt`], one assistant turn with its target.
pub fn conversation(sample: &Sample, style: PromptStyle) -> Conversation {
    Conversation {
        id: sample.id.clone(),
        document: sample.document.clone(),
        images: sample.images.clone(),
        messages: vec![
            Turn {
                role: Role::User,
                content: prompt(sample, style),
            },
            Turn {
                role: Role::Assistant,
                content: sample.target.clone(),
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{Form, FormKind};

    fn vqa(answer: &str) -> Sample {
        Sample {
            id: "pathvqa-train-000001".into(),
            document: "pathvqa-image-0".into(),
            source: Source::PathVqa,
            category: "yes/no".into(),
            images: vec![Image::File("images/0.jpg".into())],
            text: "Is there fibrosis?".into(),
            target: answer.into(),
        }
    }

    #[test]
    fn prompts_match_the_task() {
        let form = Form::generate(FormKind::LabPanel, 4).sample();
        let c = conversation(&form, PromptStyle::Task);
        assert_eq!(c.messages[0].content, EXTRACTION_PROMPT);
        assert_eq!(
            (c.messages[1].role, c.messages[1].content.as_str()),
            (Role::Assistant, form.target.as_str())
        );
        // The target is the scorer's schema, with the printed values.
        let target: serde_json::Value =
            serde_json::from_str(&form.target).unwrap_or_else(|e| panic!("{e}"));
        let truth = Form::generate(FormKind::LabPanel, 4).truth;
        assert_eq!(
            target["labs"][0]["reference_range"],
            truth.labs[0].range.as_str()
        );
        assert_eq!(
            target["labs"].as_array().map(Vec::len),
            Some(truth.labs.len())
        );
        assert!(
            form.target.starts_with("{\"diagnoses\":[{\"name\":"),
            "{}",
            form.target
        );
        assert_eq!(
            conversation(&form, PromptStyle::Reference).messages[0].content,
            REFERENCE_PROMPT
        );

        let q = vqa("yes");
        assert_eq!(
            conversation(&q, PromptStyle::Task).messages[0].content,
            "Is there fibrosis?\nAnswer with a single word or a short phrase."
        );
        let reference = conversation(&q, PromptStyle::Reference);
        assert_eq!(reference.messages[0].content, "Is there fibrosis?");
        assert_eq!(reference.images, q.images);
        assert_eq!(
            "reference".parse::<PromptStyle>(),
            Ok(PromptStyle::Reference)
        );
        assert!(
            "json"
                .parse::<PromptStyle>()
                .is_err_and(|e| e.contains("`json`"))
        );
    }

    #[test]
    fn conversations_round_trip_through_json() {
        let c = conversation(&vqa("no"), PromptStyle::Task);
        let line = serde_json::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            line.contains(r#""images":[{"file":"images/0.jpg"}]"#),
            "{line}"
        );
        assert!(
            line.contains(r#"{"role":"assistant","content":"no"}"#),
            "{line}"
        );
        let back: Conversation = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, c);
        // Images held in memory must be written to files first.
        let mut bytes = c;
        bytes.images = vec![Image::Encoded(vec![1u8, 2].into())];
        assert!(serde_json::to_string(&bytes).is_err());
    }
}

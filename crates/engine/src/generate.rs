//! One request from messages and images to text: preprocess, chat template, tokenize with `<|image_pad|>`
//! expanded, prefill once, then decode with the KV cache, streaming UTF-8-safe text pieces as they complete.
//!
//! Per decode step the host reads back one value: the token id (device-side argmax) for plain greedy decoding,
//! or the logits row for sampling; with a decode plan attached, only the token id in both cases (the plan samples
//! on the device).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use medvl_model::chat::{ChatTemplate, Message, expand_image_pads};
use medvl_model::image::{PixelValues, ProcessorConfig, preprocess_bytes};
use medvl_model::{QuantizeOptions, QwenVl, Tokenizer, load_dir_with};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::plan::{Decoder, Prefilled};
use crate::sampling::{Sampler, SamplingParams};

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The conversation; each `Part::Image` takes the next entry of `images`.
    pub messages: Vec<Message>,
    /// Encoded image files (PNG, JPEG, WebP, TIFF, BMP), in the order of the image parts.
    pub images: Vec<Vec<u8>>,
    /// How to generate.
    pub params: GenerateParams,
}

/// How to generate, whatever the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Generation ends when the text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks with random weights).
    pub ignore_eos: bool,
}

impl GenerateParams {
    /// Greedy, at most `max_new_tokens`, stopping at end-of-sequence.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl Request {
    /// A single-turn request: the images, then `prompt`.
    pub fn ask(images: Vec<Vec<u8>>, prompt: &str, max_new_tokens: usize) -> Self {
        Self {
            messages: vec![Message::user_with_images(images.len(), prompt)],
            images,
            params: GenerateParams::greedy(max_new_tokens),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// Where the time went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Image decoding, resizing, patchifying; chat template and tokenization.
    pub preprocess_s: f64,
    /// Vision tower + decoder over the prompt, until the first token is known.
    pub prefill_s: f64,
    /// Handing the prefill's keys and values to the decode plan (0 without one).
    #[serde(default)]
    pub handover_s: f64,
    /// Every later token.
    pub decode_s: f64,
    /// Tokens after the first, per second of `decode_s`.
    pub decode_tokens_per_s: f64,
}

/// The result of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated text (special tokens skipped, stop string cut).
    pub text: String,
    /// Generated token ids, end-of-sequence token included when one ended generation.
    pub token_ids: Vec<u32>,
    /// Prompt length in tokens, image tokens included.
    pub prompt_tokens: usize,
    /// Image tokens in the prompt.
    pub image_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// True when the tokens after the first came from the engine's decode plan (medvl's own kernels), false when
    /// from the burn model.
    pub plan_decode: bool,
    /// Where the time went (flattened into the JSON object).
    #[serde(flatten)]
    pub timings: Timings,
}

/// A loaded model with its tokenizer and processor settings, on one device.
#[derive(Debug)]
pub struct Engine<B: Backend> {
    model: QwenVl<B>,
    tokenizer: Tokenizer,
    processor: ProcessorConfig,
    template: ChatTemplate,
    device: B::Device,
    dir: Option<PathBuf>,
    plan: Option<PlanSlot>,
}

/// The engine's decode plan, used by one request at a time, and the tokens a sequence may reach in it.
struct PlanSlot {
    decoder: std::sync::Mutex<Box<dyn Decoder>>,
    capacity: usize,
}

impl std::fmt::Debug for PlanSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecodePlan")
    }
}

impl<B: Backend> Engine<B> {
    /// Loads a model directory (see [`crate::ModelSource`]) onto `device`.
    pub fn load(dir: &Path, device: B::Device) -> Result<Self> {
        Self::load_with(dir, device, None)
    }

    /// [`Self::load`], quantizing dense linear weights to NF4 while loading when `quantize` is given
    /// (pre-quantized bitsandbytes checkpoints load as NF4 either way).
    pub fn load_with(
        dir: &Path,
        device: B::Device,
        quantize: Option<QuantizeOptions>,
    ) -> Result<Self> {
        crate::source::check_dir(dir)?;
        let start = Instant::now();
        let model = load_dir_with::<B>(dir, &device, quantize)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let processor = ProcessorConfig::from_model_dir(dir)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        tracing::info!(dir = %dir.display(), seconds = start.elapsed().as_secs_f64(), "model loaded");
        let mut engine = Self::from_parts(model, tokenizer, processor, template, device);
        engine.dir = Some(dir.to_path_buf());
        Ok(engine)
    }

    /// An engine over a model built some other way (random weights for benchmarks, a model embedded in another
    /// service), with its tokenizer, image processor settings and chat template.
    pub fn from_parts(
        model: QwenVl<B>,
        tokenizer: Tokenizer,
        processor: ProcessorConfig,
        template: ChatTemplate,
        device: B::Device,
    ) -> Self {
        Self {
            model,
            tokenizer,
            processor,
            template,
            device,
            dir: None,
            plan: None,
        }
    }

    /// Decodes requests through `plan` (medvl's own kernels, [`crate::plan`]; greedy or sampled on the device
    /// with the request's seed, the same tokens as burn's path up to rounding) from now on; the prefill stays on
    /// the burn model. Requests whose prompt plus `max_new_tokens` exceeds the plan's capacity keep decoding
    /// through burn.
    pub fn attach_plan(&mut self, plan: Box<dyn Decoder>) {
        self.plan = Some(PlanSlot {
            capacity: plan.capacity(),
            decoder: std::sync::Mutex::new(plan),
        });
    }

    /// Loads a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) onto the model, unmerged
    /// ([`medvl_model::lora`]). A decode plan copies the adapters when it is built from the model: load the
    /// adapter first, then build and attach the plan.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<medvl_model::lora::AdapterSummary> {
        if self.plan.is_some() {
            return Err(EngineError::Plan(
                "a decode plan is attached and would decode without the adapter: load the adapter before building the plan".into(),
            ));
        }
        let summary = medvl_model::lora::apply_adapter(&mut self.model, dir, &self.device)?;
        tracing::info!(dir = %dir.display(), modules = summary.modules, "LoRA adapter loaded");
        Ok(summary)
    }

    /// True when requests decode through a plan.
    pub fn has_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// The model.
    pub fn model(&self) -> &QwenVl<B> {
        &self.model
    }

    /// The model, to change before a decode plan is built from it (e.g.
    /// [`crate::DecodePlan::sharing_model`], which turns some of its weights into views of the plan's).
    pub fn model_mut(&mut self) -> &mut QwenVl<B> {
        &mut self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template (the model directory's own, or the built-in Qwen2.5-VL one).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Image processor settings (from the model directory unless replaced).
    pub fn processor_mut(&mut self) -> &mut ProcessorConfig {
        &mut self.processor
    }

    /// The directory the model was loaded from (none when built with [`Self::from_parts`]).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Runs one request; `on_text` receives each completed piece of text as it is generated.
    pub fn generate(&self, request: &Request, on_text: impl FnMut(&str)) -> Result<Generation> {
        let start = Instant::now();
        let images_in_messages: usize = request.messages.iter().map(Message::images).sum();
        if images_in_messages != request.images.len() {
            return Err(EngineError::Request(format!(
                "the messages hold {images_in_messages} image part(s) but {} image(s) were given",
                request.images.len()
            )));
        }
        let pixels: Vec<PixelValues> = request
            .images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                preprocess_bytes(bytes, &self.processor)
                    .map_err(|e| EngineError::Request(format!("image {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?;
        let merge = self.processor.merge_size;
        let counts: Vec<usize> = pixels.iter().map(|p| p.num_tokens(merge)).collect();
        let text = self.template.render(&request.messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        let ids = expand_image_pads(&ids, self.model.config.tokens.image, &counts)?;
        let preprocess_s = start.elapsed().as_secs_f64();
        let mut generation = self.generate_ids(&ids, &pixels, &request.params, on_text)?;
        generation.timings.preprocess_s = preprocess_s;
        Ok(generation)
    }

    /// Runs a prompt given as token ids (image pads already expanded) with its preprocessed images.
    pub fn generate_ids(
        &self,
        ids: &[u32],
        pixels: &[PixelValues],
        request: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if request.max_new_tokens == 0 {
            return Err(EngineError::Request(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let mut sampler = Sampler::new(request.sampling.clone())?;
        let merge = self.processor.merge_size;
        let span =
            tracing::info_span!("generate", prompt_tokens = ids.len(), images = pixels.len());
        let _enter = span.enter();

        let prefill_start = Instant::now();
        let mut cache = self.model.new_cache();
        let prefill = self.model.prefill(ids, pixels, &mut cache, &self.device)?;
        let l = ids.len();
        let mut history = ids.to_vec();
        let last = prefill.hidden.narrow(1, l - 1, 1);
        let mut token = self.next_token(last, &mut sampler, &history)?;
        let prefill_s = prefill_start.elapsed().as_secs_f64();

        // The rest of the sequence decodes through the plan when there is one and it applies.
        let handover_start = Instant::now();
        let mut plan = match &self.plan {
            Some(slot) if l + request.max_new_tokens <= slot.capacity => {
                let mut plan = slot.decoder.lock().map_err(|_| {
                    EngineError::Plan("an earlier request panicked mid-step".into())
                })?;
                plan.admit(
                    0,
                    &Prefilled::from_cache(&cache, prefill.positions.rope_delta, token)?,
                )?;
                if !sampler.params().is_plain_greedy() {
                    // The plan samples on the device with this sampler's draws; the penalty counts the
                    // prompt and the first token.
                    history.push(token);
                    let result = plan.sample_with(0, &mut sampler, &history);
                    history.pop();
                    if let Err(e) = result {
                        plan.release(0);
                        return Err(e);
                    }
                }
                cache = self.model.new_cache();
                Some(plan)
            }
            _ => None,
        };
        let handover_s = if plan.is_some() {
            handover_start.elapsed().as_secs_f64()
        } else {
            0.0
        };
        tracing::debug!(plan = plan.is_some(), handover_s, "decoding");
        let decode_start = Instant::now();
        let eos = &self.model.config.tokens.eos;
        let mut stream = self.tokenizer.stream(true);
        let mut out_text = String::new();
        let mut emitted = 0;
        let mut generated = Vec::new();
        let finish = loop {
            generated.push(token);
            history.push(token);
            if !request.ignore_eos && eos.contains(&token) {
                break FinishReason::Eos;
            }
            if let Some(piece) = stream.push(token)? {
                out_text.push_str(&piece);
                if let Some(at) = request
                    .stop
                    .iter()
                    .filter_map(|s| out_text.find(s.as_str()))
                    .min()
                {
                    out_text.truncate(at);
                    break FinishReason::Stop;
                }
                // Hold back a tail that could still become a stop string.
                let safe = out_text.len() - held_back(&out_text, &request.stop);
                if safe > emitted {
                    on_text(&out_text[emitted..safe]);
                    emitted = safe;
                }
            }
            if generated.len() >= request.max_new_tokens {
                break FinishReason::Length;
            }
            token = match plan.as_mut() {
                Some(plan) => plan.step()?[0],
                None => {
                    let hidden = self.model.decode(
                        &[token],
                        prefill.positions.rope_delta,
                        &mut cache,
                        &self.device,
                    )?;
                    self.next_token(hidden, &mut sampler, &history)?
                }
            };
        };
        if let Some(plan) = plan.as_mut() {
            plan.release(0);
        }
        if finish != FinishReason::Stop
            && let Some(rest) = stream.flush()?
        {
            out_text.push_str(&rest);
        }
        if out_text.len() > emitted {
            on_text(&out_text[emitted..]);
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let plan_decode = plan.is_some();
        let later = generated.len().saturating_sub(1);
        Ok(Generation {
            text: out_text,
            prompt_tokens: l,
            image_tokens: pixels.iter().map(|p| p.num_tokens(merge)).sum(),
            token_ids: generated,
            finish_reason: finish,
            plan_decode,
            timings: Timings {
                preprocess_s: 0.0,
                prefill_s,
                handover_s,
                decode_s,
                decode_tokens_per_s: if decode_s > 0.0 {
                    later as f64 / decode_s
                } else {
                    0.0
                },
            },
        })
    }

    /// The next token from the last position's hidden state `[1, 1, hidden]`.
    fn next_token(
        &self,
        hidden: Tensor<B, 3>,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32> {
        let vocab = self.model.config.text.vocab_size;
        let logits = self.model.logits(hidden).reshape([vocab]);
        if sampler.params().is_plain_greedy() {
            // Only the id crosses to the host.
            let id = logits.argmax(0).into_data().convert::<i64>();
            let id = id
                .as_slice::<i64>()
                .map_err(|e| EngineError::Request(format!("reading argmax: {e:?}")))?[0];
            return Ok(id as u32);
        }
        let data = logits.into_data().convert::<f32>();
        let mut row = data
            .to_vec::<f32>()
            .map_err(|e| EngineError::Request(format!("reading logits: {e:?}")))?;
        Ok(sampler.sample(&mut row, history))
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n]))
                .take(1)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn held_back_tail_is_a_stop_prefix() {
        let stops = vec!["</answer>".to_string(), "STOP".to_string()];
        assert_eq!(held_back("result: 42 </ans", &stops), 5);
        assert_eq!(held_back("result: 42 ST", &stops), 2);
        assert_eq!(held_back("result: 42", &stops), 0);
    }
}

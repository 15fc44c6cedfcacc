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
use medvl_model::{KvCache, QuantizeOptions, QwenVl, StreamDecoder, Tokenizer, load_dir_with};
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for a free slot of the decode plan ([`Engine::generate_batch`]; 0 for one request).
    #[serde(default)]
    pub queue_s: f64,
    /// Image decoding, resizing, patchifying; chat template and tokenization.
    pub preprocess_s: f64,
    /// Vision tower + decoder over the prompt, until the first token is known.
    pub prefill_s: f64,
    /// Handing the prefill's keys and values to the decode plan (0 without one).
    #[serde(default)]
    pub handover_s: f64,
    /// Every later token (in a batch: from the sequence's admission to its end, other requests' prefills
    /// included).
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

impl PlanSlot {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Box<dyn Decoder>>> {
        self.decoder
            .lock()
            .map_err(|_| EngineError::Plan("an earlier request panicked mid-step".into()))
    }
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
        // What loading (and quantizing) held only for a while goes back to the driver.
        B::memory_cleanup(&device);
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
        // A plan sharing the model's memory freed the weights it stacked: their pool memory goes back to the
        // driver (on CUDA the plan allocates from the same client).
        B::memory_cleanup(&self.device);
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
        let prompt = self.prepare(request)?;
        let mut generation =
            self.generate_ids(&prompt.ids, &prompt.pixels, &request.params, on_text)?;
        generation.timings.preprocess_s = prompt.preprocess_s;
        Ok(generation)
    }

    /// Decodes the images, renders the chat template and tokenizes, image pads expanded.
    fn prepare(&self, request: &Request) -> Result<Prompt> {
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
        Ok(Prompt {
            ids,
            pixels,
            preprocess_s: start.elapsed().as_secs_f64(),
        })
    }

    /// Runs a prompt given as token ids (image pads already expanded) with its preprocessed images.
    pub fn generate_ids(
        &self,
        ids: &[u32],
        pixels: &[PixelValues],
        request: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let sequence = self.prefill(ids, pixels, request)?;
        // The rest of the sequence decodes through the plan when there is one and it applies.
        match &self.plan {
            Some(slot) if sequence.fits(slot.capacity) => {
                let mut plan = slot.lock()?;
                let result = self.decode_alone(sequence, Some(&mut **plan), &mut on_text);
                plan.release(0);
                result
            }
            _ => self.decode_alone(sequence, None, &mut on_text),
        }
    }

    /// Runs several requests together (continuous batching): up to the decode plan's batch of them decode in one
    /// step, and a waiting request is prefilled and takes the slot of one that ends. `on_text` receives the
    /// request's index with each piece of its text. One request's bad input fails that request only (its entry
    /// is an error); a failure of the plan fails the call. Without a plan the requests run one after another;
    /// a request whose prompt plus `max_new_tokens` does not fit the plan's cache decodes through burn when its
    /// turn comes, the others waiting meanwhile.
    pub fn generate_batch(
        &self,
        requests: &[Request],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Result<Generation>>> {
        let Some(slot) = &self.plan else {
            return Ok(requests
                .iter()
                .enumerate()
                .map(|(i, request)| self.generate(request, |piece| on_text(i, piece)))
                .collect());
        };
        let mut plan = slot.lock()?;
        let mut results: Vec<Option<Result<Generation>>> = requests.iter().map(|_| None).collect();
        let outcome = self.run_batch(requests, &mut **plan, &mut results, &mut on_text);
        // Whatever happened, the plan is left with no sequence in it.
        for s in 0..plan.batch() {
            plan.release(s);
        }
        outcome?;
        // `run_batch` returns once no request is waiting or running, each having its result.
        results
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EngineError::Plan("a batched request was left without a result".into()))
    }

    /// The scheduling loop of [`Self::generate_batch`]: admits, steps, and moves the last slot's sequence into
    /// the slot of one that ended (a step decodes slots `0..n`).
    fn run_batch(
        &self,
        requests: &[Request],
        plan: &mut dyn Decoder,
        results: &mut [Option<Result<Generation>>],
        on_text: &mut impl FnMut(usize, &str),
    ) -> Result<()> {
        let batch_start = Instant::now();
        let mut running: Vec<(usize, Sequence<'_, B>)> = Vec::with_capacity(plan.batch());
        let mut waiting = 0..requests.len();
        loop {
            while running.len() < plan.batch()
                && let Some(i) = waiting.next()
            {
                let queue_s = batch_start.elapsed().as_secs_f64();
                let request = &requests[i];
                let started = self.prepare(request).and_then(|prompt| {
                    let mut sequence =
                        self.prefill(&prompt.ids, &prompt.pixels, &request.params)?;
                    sequence.timings.preprocess_s = prompt.preprocess_s;
                    sequence.timings.queue_s = queue_s;
                    Ok(sequence)
                });
                let mut sequence = match started {
                    Ok(sequence) => sequence,
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                };
                let emit = &mut |piece: &str| on_text(i, piece);
                if !sequence.fits(plan.capacity()) {
                    results[i] = Some(self.decode_alone(sequence, None, emit));
                    continue;
                }
                let slot = running.len();
                if let Some(finish) = self.admit(&mut sequence, plan, slot, emit)? {
                    results[i] = Some(sequence.finish(finish, emit));
                    continue;
                }
                running.push((i, sequence));
            }
            if running.is_empty() {
                return Ok(());
            }
            let tokens = plan.step()?;
            let eos = &self.model.config.tokens.eos;
            let mut ended = Vec::new();
            for (slot, ((i, sequence), &token)) in running.iter_mut().zip(&tokens).enumerate() {
                if let Some(finish) = sequence.push(token, eos, &mut |piece| on_text(*i, piece))? {
                    ended.push((slot, finish));
                }
            }
            for (slot, finish) in ended.into_iter().rev() {
                let last = running.len() - 1;
                plan.release(slot);
                if slot != last {
                    plan.move_slot(last, slot)?;
                }
                let (i, mut sequence) = running.swap_remove(slot);
                sequence.timings.decode_s = sequence.decode_start.elapsed().as_secs_f64();
                results[i] = Some(sequence.finish(finish, &mut |piece| on_text(i, piece)));
            }
        }
    }

    /// Prefills a prompt and picks its first token.
    fn prefill(
        &self,
        ids: &[u32],
        pixels: &[PixelValues],
        params: &GenerateParams,
    ) -> Result<Sequence<'_, B>> {
        if params.max_new_tokens == 0 {
            return Err(EngineError::Request(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let span =
            tracing::info_span!("generate", prompt_tokens = ids.len(), images = pixels.len());
        let _enter = span.enter();
        let prefill_start = Instant::now();
        let mut cache = self.model.new_cache();
        let prefill = self.model.prefill(ids, pixels, &mut cache, &self.device)?;
        let last = prefill.hidden.narrow(1, ids.len() - 1, 1);
        let token = self.next_token(last, &mut sampler, ids)?;
        let merge = self.processor.merge_size;
        Ok(Sequence {
            params: params.clone(),
            sampler,
            history: ids.to_vec(),
            cache,
            rope_delta: prefill.positions.rope_delta,
            token,
            prompt_tokens: ids.len(),
            image_tokens: pixels.iter().map(|p| p.num_tokens(merge)).sum(),
            stream: self.tokenizer.stream(true),
            text: String::new(),
            emitted: 0,
            generated: Vec::new(),
            plan_decode: false,
            decode_start: Instant::now(),
            timings: Timings {
                prefill_s: prefill_start.elapsed().as_secs_f64(),
                ..Timings::default()
            },
        })
    }

    /// Puts a prefilled sequence into slot `slot` of `plan` (with its sampler when it samples) after taking its
    /// first token, which may already end it (`Some`; then it is not admitted).
    fn admit(
        &self,
        sequence: &mut Sequence<'_, B>,
        plan: &mut dyn Decoder,
        slot: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<FinishReason>> {
        if let Some(finish) =
            sequence.push(sequence.token, &self.model.config.tokens.eos, on_text)?
        {
            return Ok(Some(finish));
        }
        let start = Instant::now();
        plan.admit(
            slot,
            &Prefilled::from_cache(&sequence.cache, sequence.rope_delta, sequence.token)?,
        )?;
        if !sequence.sampler.params().is_plain_greedy() {
            // The plan samples on the device with this sampler's draws; the penalty counts the prompt and the
            // first token (already in the history).
            if let Err(e) = plan.sample_with(slot, &mut sequence.sampler, &sequence.history) {
                plan.release(slot);
                return Err(e);
            }
        }
        sequence.cache = self.model.new_cache();
        sequence.plan_decode = true;
        sequence.timings.handover_s = start.elapsed().as_secs_f64();
        // The later tokens' time starts once the plan holds the sequence.
        sequence.decode_start = Instant::now();
        Ok(None)
    }

    /// Decodes one prefilled sequence to its end, through slot 0 of `plan` or, without one, through burn.
    fn decode_alone(
        &self,
        mut sequence: Sequence<'_, B>,
        plan: Option<&mut dyn Decoder>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let eos = &self.model.config.tokens.eos;
        let finish = match plan {
            Some(plan) => match self.admit(&mut sequence, plan, 0, on_text)? {
                Some(finish) => finish,
                None => loop {
                    let token = plan.step()?[0];
                    if let Some(finish) = sequence.push(token, eos, on_text)? {
                        break finish;
                    }
                },
            },
            None => {
                sequence.decode_start = Instant::now();
                let mut token = sequence.token;
                loop {
                    if let Some(finish) = sequence.push(token, eos, on_text)? {
                        break finish;
                    }
                    let hidden = self.model.decode(
                        &[token],
                        sequence.rope_delta,
                        &mut sequence.cache,
                        &self.device,
                    )?;
                    token = self.next_token(hidden, &mut sequence.sampler, &sequence.history)?;
                }
            }
        };
        tracing::debug!(plan = sequence.plan_decode, "decoded");
        sequence.timings.decode_s = sequence.decode_start.elapsed().as_secs_f64();
        sequence.finish(finish, on_text)
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

/// A request's prompt, ready for the model.
struct Prompt {
    ids: Vec<u32>,
    pixels: Vec<PixelValues>,
    preprocess_s: f64,
}

/// One sequence from its prefill to its end: how it picks tokens, the tokens and text so far, and its timings.
struct Sequence<'t, B: Backend> {
    params: GenerateParams,
    sampler: Sampler,
    /// Prompt and generated tokens (the repetition penalty's history).
    history: Vec<u32>,
    /// The prefill's cache (emptied once a plan holds the sequence).
    cache: KvCache<B>,
    rope_delta: i64,
    /// The first generated token.
    token: u32,
    prompt_tokens: usize,
    image_tokens: usize,
    stream: StreamDecoder<'t>,
    text: String,
    /// Bytes of `text` passed to the caller.
    emitted: usize,
    generated: Vec<u32>,
    plan_decode: bool,
    decode_start: Instant,
    timings: Timings,
}

impl<B: Backend> Sequence<'_, B> {
    /// Whether the prompt and every token it may generate fit a plan's cache of `capacity` tokens.
    fn fits(&self, capacity: usize) -> bool {
        self.prompt_tokens + self.params.max_new_tokens <= capacity
    }

    /// Takes the next generated token, passing completed text to `on_text` (a tail that could still become a
    /// stop string held back); `Some` when the sequence ends with it.
    fn push(
        &mut self,
        token: u32,
        eos: &[u32],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<FinishReason>> {
        self.generated.push(token);
        self.history.push(token);
        if !self.params.ignore_eos && eos.contains(&token) {
            return Ok(Some(FinishReason::Eos));
        }
        if let Some(piece) = self.stream.push(token)? {
            self.text.push_str(&piece);
            if let Some(at) = self
                .params
                .stop
                .iter()
                .filter_map(|s| self.text.find(s.as_str()))
                .min()
            {
                self.text.truncate(at);
                return Ok(Some(FinishReason::Stop));
            }
            let safe = self.text.len() - held_back(&self.text, &self.params.stop);
            if safe > self.emitted {
                on_text(&self.text[self.emitted..safe]);
                self.emitted = safe;
            }
        }
        if self.generated.len() >= self.params.max_new_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// The result, the text's last pieces passed to `on_text`.
    fn finish(mut self, finish: FinishReason, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        if finish != FinishReason::Stop
            && let Some(rest) = self.stream.flush()?
        {
            self.text.push_str(&rest);
        }
        if self.text.len() > self.emitted {
            on_text(&self.text[self.emitted..]);
        }
        let later = self.generated.len().saturating_sub(1);
        let decode_s = self.timings.decode_s;
        Ok(Generation {
            text: self.text,
            token_ids: self.generated,
            prompt_tokens: self.prompt_tokens,
            image_tokens: self.image_tokens,
            finish_reason: finish,
            plan_decode: self.plan_decode,
            timings: Timings {
                decode_tokens_per_s: if decode_s > 0.0 {
                    later as f64 / decode_s
                } else {
                    0.0
                },
                ..self.timings
            },
        })
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

//! `medvl-bench page`: one document page end to end through the engine, as the reference report measures it:
//! a letter page at 1,260 or 2,772 image tokens, an extraction prompt (the chat template's text around it is about
//! 60 tokens), 256 new tokens forced (end-of-sequence ignored, so random weights are measured fairly), greedy,
//! batch 1. Per weight format (bf16, NF4 with double quantization as bitsandbytes does it, NF4 + a rank-64 LoRA
//! adapter unmerged as PEFT runs QLoRA's result):
//! - load: building the model with random weights (NF4: quantized on the host while building) and the decode plan;
//! - memory: the allocator's bytes in use after the model, after the plan, and reserved after the runs;
//! - per run (after one warm-up run): preprocessing (PNG decode, resize, patchify, template, tokenize), prefill
//!   (vision tower + decoder over the prompt, until the first token is on the host), decode time and tokens/s of
//!   the other 255 tokens, end to end; avg/min/max over the runs;
//! - the prefill split in two, each timed alone with a device sync after it: vision tower, decoder prefill.
//!
//! On CUDA the decode runs through the plan (medvl's kernels) like `medvl ask --device cuda`; `--decode burn`
//! measures burn's decode instead. `--runtime cpu --model toy` is a smoke run of the whole path.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::ValueEnum;
use medvl_engine::generate::{Engine, GenerateParams, Generation, Request};
use medvl_engine::plan::Decoder;
use medvl_model::attention::{SegmentKernel, set_segment_attention_kernel};
use medvl_model::chat::{ChatTemplate, Message, expand_image_pads};
use medvl_model::image::{ProcessorConfig, preprocess_bytes};
use medvl_model::loader::{RandomSource, build};
use medvl_model::{QuantizeOptions, QwenVlConfig, Tokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::RunInfo;

/// The extraction prompt (the reference service's default asks for the same fields).
const PROMPT: &str = "Extract all medical information from this document: diagnoses, medications with dose, route \
                      and frequency, laboratory values with units and reference ranges, vital signs and procedures.";

#[derive(clap::Args)]
pub struct PageArgs {
    #[command(flatten)]
    run: RunInfo,
    /// Where to run (`cpu`: burn's CPU backend, a smoke run).
    #[arg(long, value_enum, default_value = "cuda")]
    device: PageDevice,
    /// Model sizes.
    #[arg(long, value_enum, default_value = "7b")]
    model: PageModel,
    /// Weight formats, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bf16,nf4,nf4-lora"
    )]
    formats: Vec<PageFormat>,
    /// Rank of the `nf4-lora` format's adapter.
    #[arg(long, default_value_t = 64)]
    lora_rank: usize,
    /// Pages, in image tokens: 1260 (an 840x1176 px page, max_pixels 1280*28*28) and/or 2772 (1232x1764 px, the
    /// hub's default max_pixels).
    #[arg(long, value_delimiter = ',', default_value = "1260,2772")]
    image_tokens: Vec<usize>,
    /// Tokens generated per run (end-of-sequence ignored).
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Timed runs per case, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// How the tokens after the first are decoded.
    #[arg(long, value_enum, default_value = "plan")]
    decode: PageDecode,
    /// For NF4 formats, also time the vision tower and the decoder's prefill with the NF4 weights dequantized by
    /// tensor ops instead of the CubeCL kernel (`medvl_model::layers::set_fused_dequantize`), in the same process.
    #[arg(long)]
    compare_nf4_dequant: bool,
    /// Also time the vision tower with burn's attention op in place of medvl's segment attention kernel
    /// (`medvl_model::attention::set_segment_attention_kernel`), in the same process, and report how far its
    /// image features are from the kernel's.
    #[arg(long)]
    compare_vision_attention: bool,
    /// Qwen2.5-VL's `tokenizer.json` (gzip-compressed if the name ends in `.gz`).
    #[arg(long, default_value = "fixtures/qwen/tokenizer.json.gz")]
    tokenizer: PathBuf,
    /// Also run this many page requests at once through the engine's continuous batching
    /// (`Engine::generate_batch`), comma-separated (e.g. `1,8,32`): throughput and per-request latency. The decode
    /// plan is then built for the largest number of sequences.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PageDevice {
    Cuda,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum PageModel {
    /// Qwen2.5-VL-7B-Instruct.
    #[value(name = "7b")]
    Q7b,
    /// Qwen2.5-VL-3B-Instruct.
    #[value(name = "3b")]
    Q3b,
    /// The 3B with 2 decoder layers and 2 vision blocks (smoke runs).
    Toy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PageFormat {
    /// Every weight in bf16 (f32 on the CPU).
    Bf16,
    /// Linear layers NF4 (blocksize 64, double quantization), lm_head, embeddings and norms dense: transformers +
    /// bitsandbytes `load_in_4bit`.
    Nf4,
    /// Every 2-D weight NF4: the linear layers, the lm_head and the token embedding (`QuantizeOptions::everything`,
    /// the smallest model).
    Nf4All,
    /// As `nf4`, with a PEFT LoRA adapter (rank `--lora-rank`, alpha twice the rank: the reference's r=64,
    /// alpha=128) on the 7 projections of every decoder layer, unmerged: written as a random adapter directory
    /// and loaded as `--adapter` loads one.
    Nf4Lora,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PageDecode {
    /// The decode plan (CUDA only), the prefill's keys and values handed over on the device.
    Plan,
    /// The decode plan, the prefill's keys and values handed over through host memory (the baseline of the
    /// on-device handover).
    PlanHostKv,
    /// burn's decode.
    Burn,
}

/// One timed run.
#[derive(Serialize)]
struct Run {
    preprocess_s: f64,
    prefill_s: f64,
    time_to_first_token_s: f64,
    /// The prefill's keys and values handed to the decode plan.
    handover_s: f64,
    decode_s: f64,
    decode_tokens_per_s: f64,
    total_s: f64,
    new_tokens: usize,
}

#[derive(Serialize)]
struct Spread {
    avg: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let v: Vec<f64> = values.collect();
        Self {
            avg: v.iter().sum::<f64>() / v.len().max(1) as f64,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Requests run together through the engine's continuous batching, after a warm-up batch of the same size.
#[derive(Serialize)]
struct Concurrent {
    requests: usize,
    /// From the call to the last request's end.
    wall_s: f64,
    /// Tokens generated by all the requests.
    new_tokens: usize,
    /// `new_tokens / wall_s`.
    tokens_per_s: f64,
    /// Each request from the call to its end (queue, preprocessing, prefill, decode).
    latency_s: Spread,
    /// Each request from the call to its first token.
    time_to_first_token_s: Spread,
    /// Each request's tokens after the first per second from its admission to its end.
    decode_tokens_per_s: Spread,
    /// The driver's peak during the warm-up and the timed batch, MB above the process's start.
    driver_peak_mb: Option<f64>,
    /// Requests whose tokens equal the last single request's (greedy; with random weights a near tie can differ
    /// where more rows take other product kernels, e.g. the tensor-core GEMV from 4 rows).
    same_tokens_as_alone: usize,
}

#[derive(Serialize)]
struct Case {
    format: PageFormat,
    decode: PageDecode,
    image_tokens: usize,
    width: u32,
    height: u32,
    prompt_tokens: usize,
    load_s: f64,
    /// Allocator bytes in use after building the model (its weights), MB.
    model_mb: Option<f64>,
    /// What building the decode plan added to the allocator's bytes in use (it shares the model's weights and
    /// their NF4 block scales, and adds norms, biases, adapters and the KV cache), MB.
    plan_weights_mb: Option<f64>,
    /// Allocator bytes in use and reserved after the runs, MB.
    in_use_mb: Option<f64>,
    reserved_mb: Option<f64>,
    /// Sequences the decode plan holds (its KV cache's batch).
    plan_batch: usize,
    /// Device memory the driver reports in use after loading the model and building the plan, and its peak from
    /// the start of this page to the end of its single-request runs, MB above the process's start (CUDA context included;
    /// with several formats in one process, what earlier formats left in the allocator's pools counts too).
    driver_loaded_mb: Option<f64>,
    driver_peak_mb: Option<f64>,
    /// The vision tower alone (median of the runs), s.
    vision_s: f64,
    /// The decoder's prefill over the prompt alone, image features given (median), s.
    llm_prefill_s: f64,
    /// With `--compare-nf4-dequant`: the vision tower and the decoder's prefill (medians) with the NF4 weights
    /// dequantized by tensor ops instead of the kernel, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    vision_tensor_ops_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llm_prefill_tensor_ops_s: Option<f64>,
    /// With `--compare-vision-attention`: the vision tower with burn's attention op instead of the segment
    /// attention kernel (median), s, and the largest difference between the two towers' image features over the
    /// largest feature's magnitude.
    #[serde(skip_serializing_if = "Option::is_none")]
    vision_burn_attention_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vision_attention_difference: Option<f64>,
    /// With `--compare-vision-attention`: the vision tower with the kernel on the windowed blocks and burn's
    /// attention op on the full-attention blocks (median), s.
    #[serde(skip_serializing_if = "Option::is_none")]
    vision_kernel_windows_only_s: Option<f64>,
    /// With `--compare-vision-attention`: image features that are not finite in each of the three towers.
    #[serde(skip_serializing_if = "Option::is_none")]
    vision_nonfinite: Option<NonFinite>,
    total_s: Spread,
    time_to_first_token_s: Spread,
    decode_tokens_per_s: Spread,
    handover_s: Spread,
    runs: Vec<Run>,
    /// Whether every timed run generated the same tokens (the warm-up, during which burn tunes its kernels, is
    /// left out).
    same_tokens_across_runs: bool,
    /// With `--concurrency`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    concurrent: Vec<Concurrent>,
}

#[derive(Serialize)]
struct Report {
    card: String,
    device: &'static str,
    git_commit: String,
    model: &'static str,
    new_tokens: usize,
    cases: Vec<Case>,
}

/// Writes a PEFT adapter directory with random `A` and `B` (bf16) of rank `rank` and alpha `2 * rank` on the 7
/// projections of every decoder layer of `config` (the reference's QLoRA targets: 161.5 M parameters at rank 64
/// on the 7B).
fn write_random_adapter(dir: &Path, config: &QwenVlConfig, rank: usize, seed: u64) -> Result<()> {
    use safetensors::tensor::TensorView;
    let t = &config.text;
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (qd, kvd) = (
        t.num_attention_heads * t.head_dim(),
        t.num_key_value_heads * t.head_dim(),
    );
    let modules = [
        ("self_attn.q_proj", qd, h),
        ("self_attn.k_proj", kvd, h),
        ("self_attn.v_proj", kvd, h),
        ("self_attn.o_proj", h, qd),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for layer in 0..t.num_hidden_layers {
        for (module, out, inp) in modules {
            let prefix = format!("base_model.model.model.language_model.layers.{layer}.{module}");
            for (suffix, shape) in [("lora_A", [rank, inp]), ("lora_B", [out, rank])] {
                let bytes: Vec<u8> = (0..shape[0] * shape[1])
                    .flat_map(|_| half::bf16::from_f32(rng.random_range(-0.02..0.02)).to_le_bytes())
                    .collect();
                tensors.push((format!("{prefix}.{suffix}.weight"), shape.to_vec(), bytes));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("adapter tensors")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
        .context("writing the random adapter")?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string())
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}

/// Page size in pixels (width, height) for a number of image tokens: the reference report's two pages.
fn page_size(image_tokens: usize) -> Result<(u32, u32)> {
    match image_tokens {
        1260 => Ok((840, 1176)),
        2772 => Ok((1232, 1764)),
        n => bail!(
            "no page size for {n} image tokens: use 1260 (840x1176 px) or 2772 (1232x1764 px)"
        ),
    }
}

/// A synthetic page, PNG-encoded: white, with dark lines of word-sized marks where text would be.
fn page_png(width: u32, height: u32, seed: u64) -> Result<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut page = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let margin = width / 12;
    let mut y = height / 14;
    while y + 14 < height - height / 14 {
        let mut x = margin;
        while x < width - margin {
            let word = rng.random_range(12..70).min(width - margin - x);
            for dy in 0..12 {
                for dx in 0..word {
                    let shade = rng.random_range(0..90u8);
                    page.put_pixel(x + dx, y + dy, image::Rgb([shade, shade, shade]));
                }
            }
            x += word + rng.random_range(6..14);
        }
        y += rng.random_range(20..34);
    }
    let mut png = Vec::new();
    page.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn tokenizer(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let json = if path.extension().is_some_and(|e| e == "gz") {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut json)
            .with_context(|| format!("decompressing {}", path.display()))?;
        json
    } else {
        bytes
    };
    Tokenizer::from_bytes(&json).with_context(|| format!("parsing {}", path.display()))
}

fn config(model: PageModel) -> (QwenVlConfig, &'static str) {
    match model {
        PageModel::Q7b => (QwenVlConfig::qwen2_5_vl_7b(), "Qwen2.5-VL-7B-Instruct"),
        PageModel::Q3b => (QwenVlConfig::qwen2_5_vl_3b(), "Qwen2.5-VL-3B-Instruct"),
        PageModel::Toy => {
            let mut config = QwenVlConfig::qwen2_5_vl_3b();
            config.text.num_hidden_layers = 2;
            config.vision.depth = 2;
            config.vision.fullatt_block_indexes = vec![1];
            (
                config,
                "toy (the 3B with 2 decoder layers, 2 vision blocks)",
            )
        }
    }
}

pub fn run(args: &PageArgs) -> Result<()> {
    if args.concurrency.contains(&0) {
        bail!("--concurrency takes numbers of requests of at least 1");
    }
    match args.device {
        #[cfg(feature = "cuda")]
        PageDevice::Cuda => {
            // Before the process touches the device, so that the CUDA context counts.
            let driver = crate::driver::DriverMemory::start(0)
                .inspect_err(|e| eprintln!("no driver memory figures: {e:#}"))
                .ok();
            run_on::<medvl_model::backend::CudaBf16>(
                args,
                Default::default(),
                "cuda bf16",
                cuda::memory,
                driver.as_ref(),
                |engine, batch, capacity| match args.decode {
                    PageDecode::Plan => cuda::plan(engine, batch, capacity, true).map(Some),
                    PageDecode::PlanHostKv => cuda::plan(engine, batch, capacity, false).map(Some),
                    PageDecode::Burn => Ok(None),
                },
            )
        }
        #[cfg(not(feature = "cuda"))]
        PageDevice::Cuda => bail!("this medvl-bench was built without the `cuda` feature"),
        PageDevice::Cpu => {
            if args.decode != PageDecode::Burn {
                bail!("the decode plan runs on CUDA: use `--decode burn` with `--device cpu`");
            }
            run_on::<medvl_model::backend::Cpu>(
                args,
                Default::default(),
                "cpu f32",
                || None,
                None,
                |_, _, _| Ok(None),
            )
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::{Context, Result};
    use cubecl::Runtime;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use medvl_engine::DecodePlan;
    use medvl_engine::generate::Engine;
    use medvl_engine::plan::Decoder;
    use medvl_model::backend::CudaBf16;

    /// (bytes in use, bytes reserved) of the CUDA allocator burn and the plan share, MB.
    pub(super) fn memory() -> Option<(f64, f64)> {
        let usage = CudaRuntime::client(&CudaDevice::default())
            .memory_usage()
            .ok()?;
        Some((
            usage.bytes_in_use as f64 / 1e6,
            usage.bytes_reserved as f64 / 1e6,
        ))
    }

    /// The decode plan, sharing the model's weights; the prefill's keys and values reach it on the device, or
    /// through host memory.
    pub(super) fn plan(
        engine: &mut Engine<CudaBf16>,
        batch: usize,
        capacity: usize,
        kv_on_device: bool,
    ) -> Result<Box<dyn Decoder>> {
        let client = CudaRuntime::client(&CudaDevice::default());
        let mut plan = DecodePlan::<CudaRuntime, half::bf16>::sharing_model(
            &client,
            engine.model_mut(),
            batch,
            capacity,
        )
        .context("building the decode plan")?;
        if !kv_on_device {
            plan.hand_over_through_host();
        }
        Ok(Box::new(plan))
    }
}

fn run_on<B: Backend>(
    args: &PageArgs,
    device: B::Device,
    device_name: &'static str,
    memory: impl Fn() -> Option<(f64, f64)>,
    driver: Option<&crate::driver::DriverMemory>,
    plan: impl Fn(&mut Engine<B>, usize, usize) -> Result<Option<Box<dyn Decoder>>>,
) -> Result<()> {
    if args.runs == 0 || args.new_tokens == 0 {
        bail!("--runs and --new-tokens must be at least 1");
    }
    let (config, model_name) = config(args.model);
    let tokenizer = tokenizer(&args.tokenizer)?;
    let pages: Vec<(usize, (u32, u32))> = args
        .image_tokens
        .iter()
        .map(|&n| Ok((n, page_size(n)?)))
        .collect::<Result<_>>()?;
    let longest = pages.iter().map(|p| p.0).max().unwrap_or(0);
    // Room for the template's text around the page, the prompt and the new tokens.
    let capacity = longest + 128 + args.new_tokens;
    println!(
        "{model_name} on {device_name}, {} new tokens, {} runs after a warm-up\n\n| weights | image tokens | load s | model MB | plan MB | vision s | LLM prefill s | TTFT s | KV handover s | decode tok/s | page + {} tokens s (min-max) |\n|---|---|---|---|---|---|---|---|---|---|---|",
        args.new_tokens, args.runs, args.new_tokens
    );
    let plan_batch = args.concurrency.iter().copied().max().unwrap_or(1);
    let mut cases = Vec::new();
    for &format in &args.formats {
        let start = Instant::now();
        B::seed(&device, 7);
        let model = match format {
            PageFormat::Bf16 => build(&config, &mut RandomSource::<B>::new(&device))?,
            PageFormat::Nf4 | PageFormat::Nf4Lora => build(
                &config,
                &mut RandomSource::<B>::quantized(&device, QuantizeOptions::default()),
            )?,
            PageFormat::Nf4All => build(
                &config,
                &mut RandomSource::<B>::quantized(&device, QuantizeOptions::everything()),
            )?,
        };
        B::sync(&device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        let built_mb = driver.map(|d| d.used_mb());
        // As `Engine::load` does: what building held only for a while goes back to the driver.
        B::memory_cleanup(&device);
        B::sync(&device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        if let Some((driver, built)) = driver.zip(built_mb) {
            // (`reset_peak` waits for a fresh sample.)
            driver.reset_peak();
            eprintln!(
                "driver: {built:.0} MB in use after building the model, {:.0} MB after releasing the allocator's free pools",
                driver.used_mb()
            );
        }
        let model_mb = memory().map(|m| m.0);
        eprintln!("[{:.1} s] model built", start.elapsed().as_secs_f64());
        let mut engine = Engine::from_parts(
            model,
            tokenizer.clone(),
            ProcessorConfig::default(),
            ChatTemplate::Builtin,
            device.clone(),
        );
        if format == PageFormat::Nf4Lora {
            let dir =
                std::env::temp_dir().join(format!("medvl-bench-adapter-{}", std::process::id()));
            write_random_adapter(&dir, &config, args.lora_rank, 11)?;
            let summary = engine.load_adapter(&dir);
            std::fs::remove_dir_all(&dir).ok();
            let summary = summary.context("loading the random adapter")?;
            eprintln!(
                "[{:.1} s] adapter: {} modules, {:.1} M parameters",
                start.elapsed().as_secs_f64(),
                summary.modules,
                summary.parameters as f64 / 1e6
            );
        }
        let plan_weights_mb = match plan(&mut engine, plan_batch, capacity)? {
            Some(plan) => {
                let mb = memory().zip(model_mb).map(|(m, model)| m.0 - model);
                engine.attach_plan(plan);
                mb
            }
            None => None,
        };
        let load_s = start.elapsed().as_secs_f64();
        let driver_loaded_mb = driver.map(|d| d.used_mb());
        eprintln!("[{load_s:.1} s] engine ready (plan: {})", engine.has_plan());
        for &(image_tokens, (width, height)) in &pages {
            // Each page's peak from its own start: not an earlier page's concurrent batches.
            if let Some(d) = driver {
                d.reset_peak();
            }
            let png = page_png(width, height, image_tokens as u64)?;
            let request = Request {
                messages: vec![Message::user_with_images(1, PROMPT)],
                images: vec![png.clone()],
                params: GenerateParams {
                    ignore_eos: true,
                    ..GenerateParams::greedy(args.new_tokens)
                },
            };
            let warm = engine.generate(&request, |_| {})?;
            eprintln!(
                "[{:.1} s] warm-up: prefill {:.3} s, decode {:.1} tokens/s",
                start.elapsed().as_secs_f64(),
                warm.timings.prefill_s,
                warm.timings.decode_tokens_per_s
            );
            if warm.image_tokens != image_tokens {
                bail!(
                    "the {width}x{height} page gave {} image tokens, expected {image_tokens}",
                    warm.image_tokens
                );
            }
            let mut runs = Vec::new();
            let mut tokens: Vec<Vec<u32>> = Vec::new();
            let mut vision = Vec::new();
            let mut llm = Vec::new();
            for _ in 0..args.runs {
                let start = Instant::now();
                let g = engine.generate(&request, |_| {})?;
                runs.push(run_of(&g, start.elapsed().as_secs_f64()));
                tokens.push(g.token_ids);
                let (v, l) = prefill_split(&engine, &png, &device)?;
                eprintln!(
                    "  run: {:.3} s end to end; vision alone {v:.3} s, LLM prefill alone {l:.3} s",
                    runs.last().map_or(0.0, |r| r.total_s)
                );
                vision.push(v);
                llm.push(l);
            }
            let tensor_ops = if args.compare_nf4_dequant && format != PageFormat::Bf16 {
                medvl_model::layers::set_fused_dequantize(false);
                // One untimed pass first: the tensor-op path's kernels compile on their first use.
                let warm = prefill_split(&engine, &png, &device);
                let split = (0..args.runs)
                    .map(|_| prefill_split(&engine, &png, &device))
                    .collect::<Result<Vec<_>>>();
                medvl_model::layers::set_fused_dequantize(true);
                warm?;
                let (v, l): (Vec<f64>, Vec<f64>) = split?.into_iter().unzip();
                let (v, l) = (median(v), median(l));
                eprintln!("  NF4 dequantized by tensor ops: vision {v:.3} s, LLM prefill {l:.3} s");
                Some((v, l))
            } else {
                None
            };
            let burn_attention = if args.compare_vision_attention {
                let with_kernel = vision_with_kernel(&engine, &png, &device)?;
                let off = vision_with_burn_attention(
                    &engine,
                    &png,
                    &device,
                    args.runs,
                    SegmentKernel::Off,
                    &with_kernel,
                )?;
                eprintln!(
                    "  vision with burn's attention: {:.3} s; image features differ by {:.2e} of the largest \
                     (over the values finite in both); not finite: {} with the kernel, {} with burn's attention",
                    off.vision_s,
                    off.difference,
                    off.nonfinite_with_kernel,
                    off.nonfinite_with_burn
                );
                let windows = vision_with_burn_attention(
                    &engine,
                    &png,
                    &device,
                    args.runs,
                    SegmentKernel::Windows,
                    &with_kernel,
                )?;
                eprintln!(
                    "  vision with the kernel on the windows, burn's attention on the full-attention blocks: {:.3} s; \
                     not finite: {}",
                    windows.vision_s, windows.nonfinite_with_burn
                );
                Some((off, windows))
            } else {
                None
            };
            let usage = memory();
            let driver_peak_mb = driver.map(|d| d.peak_mb());
            let concurrent = args
                .concurrency
                .iter()
                .map(|&requests| {
                    concurrent(
                        &engine,
                        &request,
                        tokens.last().map_or(&[][..], Vec::as_slice),
                        requests,
                        args.new_tokens,
                        driver,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let case = Case {
                format,
                decode: if engine.has_plan() {
                    args.decode
                } else {
                    PageDecode::Burn
                },
                image_tokens,
                width,
                height,
                prompt_tokens: warm.prompt_tokens,
                load_s,
                model_mb,
                plan_weights_mb,
                in_use_mb: usage.map(|m| m.0),
                reserved_mb: usage.map(|m| m.1),
                plan_batch,
                driver_loaded_mb,
                driver_peak_mb,
                vision_s: median(vision),
                llm_prefill_s: median(llm),
                vision_tensor_ops_s: tensor_ops.map(|t| t.0),
                llm_prefill_tensor_ops_s: tensor_ops.map(|t| t.1),
                vision_burn_attention_s: burn_attention.as_ref().map(|t| t.0.vision_s),
                vision_attention_difference: burn_attention.as_ref().map(|t| t.0.difference),
                vision_kernel_windows_only_s: burn_attention.as_ref().map(|t| t.1.vision_s),
                vision_nonfinite: burn_attention.as_ref().map(|(off, windows)| NonFinite {
                    kernel: off.nonfinite_with_kernel,
                    burn_attention: off.nonfinite_with_burn,
                    kernel_windows_only: windows.nonfinite_with_burn,
                }),
                total_s: Spread::of(runs.iter().map(|r| r.total_s)),
                time_to_first_token_s: Spread::of(runs.iter().map(|r| r.time_to_first_token_s)),
                decode_tokens_per_s: Spread::of(runs.iter().map(|r| r.decode_tokens_per_s)),
                handover_s: Spread::of(runs.iter().map(|r| r.handover_s)),
                runs,
                same_tokens_across_runs: tokens.windows(2).all(|w| w[0] == w[1]),
                concurrent,
            };
            let mb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            println!(
                "| {} | {image_tokens} | {:.1} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} ({:.3}-{:.3}) |",
                format
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default(),
                case.load_s,
                mb(case.model_mb),
                mb(case.plan_weights_mb),
                case.vision_s,
                case.llm_prefill_s,
                case.time_to_first_token_s.avg,
                case.handover_s.avg,
                case.decode_tokens_per_s.avg,
                case.total_s.avg,
                case.total_s.min,
                case.total_s.max,
            );
            cases.push(case);
        }
    }
    args.run.write_report(&Report {
        card: args.run.card.clone(),
        device: device_name,
        git_commit: args.run.commit.clone(),
        model: model_name,
        new_tokens: args.new_tokens,
        cases,
    })
}

/// `requests` copies of `request` through the engine at once (after a warm-up batch of the same size, a few
/// tokens each, which compiles the kernels for every batch size the step takes).
fn concurrent<B: Backend>(
    engine: &Engine<B>,
    request: &Request,
    alone: &[u32],
    requests: usize,
    new_tokens: usize,
    driver: Option<&crate::driver::DriverMemory>,
) -> Result<Concurrent> {
    let batch = |tokens: usize| {
        let mut one = request.clone();
        one.params.max_new_tokens = tokens;
        let all = vec![one; requests];
        let start = Instant::now();
        let results = engine.generate_batch(&all, |_, _| {})?;
        let wall_s = start.elapsed().as_secs_f64();
        let done = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        anyhow::Ok((wall_s, done))
    };
    if let Some(driver) = driver {
        driver.reset_peak();
    }
    batch(new_tokens.min(8))?;
    let (wall_s, done) = batch(new_tokens)?;
    let generated: usize = done.iter().map(|g| g.token_ids.len()).sum();
    let timings: Vec<_> = done.iter().map(|g| g.timings).collect();
    let first = |t: &medvl_engine::Timings| t.queue_s + t.preprocess_s + t.prefill_s;
    let case = Concurrent {
        requests,
        wall_s,
        new_tokens: generated,
        tokens_per_s: generated as f64 / wall_s,
        latency_s: Spread::of(timings.iter().map(|t| first(t) + t.handover_s + t.decode_s)),
        time_to_first_token_s: Spread::of(timings.iter().map(first)),
        decode_tokens_per_s: Spread::of(timings.iter().map(|t| t.decode_tokens_per_s)),
        driver_peak_mb: driver.map(|d| d.peak_mb()),
        same_tokens_as_alone: done.iter().filter(|g| g.token_ids == alone).count(),
    };
    eprintln!(
        "  {requests} at once: {:.3} s, {generated} tokens, {:.1} tokens/s; latency {:.3} s avg ({:.3}-{:.3}), first token {:.3} s avg, {:.1} tokens/s per request; {} of {requests} with the single request's tokens",
        case.wall_s,
        case.tokens_per_s,
        case.latency_s.avg,
        case.latency_s.min,
        case.latency_s.max,
        case.time_to_first_token_s.avg,
        case.decode_tokens_per_s.avg,
        case.same_tokens_as_alone
    );
    Ok(case)
}

fn run_of(g: &Generation, total_s: f64) -> Run {
    let t = &g.timings;
    Run {
        preprocess_s: t.preprocess_s,
        prefill_s: t.prefill_s,
        time_to_first_token_s: t.preprocess_s + t.prefill_s,
        handover_s: t.handover_s,
        decode_s: t.decode_s,
        decode_tokens_per_s: t.decode_tokens_per_s,
        total_s,
        new_tokens: g.token_ids.len(),
    }
}

/// The vision tower and the decoder's prefill of one page, each timed alone up to a device sync.
fn prefill_split<B: Backend>(
    engine: &Engine<B>,
    png: &[u8],
    device: &B::Device,
) -> Result<(f64, f64)> {
    let model = engine.model();
    let pixels = preprocess_bytes(png, &ProcessorConfig::default())?;
    let text = engine
        .chat_template()
        .render(&[Message::user_with_images(1, PROMPT)], true)?;
    let ids = engine.tokenizer().encode(&text)?;
    let merge = model.config.vision.spatial_merge_size;
    let ids = expand_image_pads(&ids, model.config.tokens.image, &[pixels.num_tokens(merge)])?;
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"));
    sync()?;
    let start = Instant::now();
    let features = model.encode_images(std::slice::from_ref(&pixels), device)?;
    sync()?;
    let vision_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut cache = model.new_cache();
    let prefill = model.prefill_with_features(&ids, features.as_ref(), &mut cache, device)?;
    sync()?;
    drop(prefill);
    Ok((vision_s, start.elapsed().as_secs_f64()))
}

/// The vision tower of one page with the segment attention kernel everywhere: its image features on the host.
fn vision_with_kernel<B: Backend>(
    engine: &Engine<B>,
    png: &[u8],
    device: &B::Device,
) -> Result<Vec<f32>> {
    let pixels = preprocess_bytes(png, &ProcessorConfig::default())?;
    let features = engine
        .model()
        .encode_images(std::slice::from_ref(&pixels), device)?
        .context("the page gave no image features")?;
    host_values(features.embeds)
}

fn host_values<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("image features: {e:?}"))
}

/// The vision tower of one page with burn's attention op in place of the segment attention kernel where `which`
/// says: its time (median of `runs` after an untimed pass, each up to a device sync) and how far its image
/// features are from `with_kernel`, the tower's with the kernel everywhere (largest difference over the largest
/// magnitude).
fn vision_with_burn_attention<B: Backend>(
    engine: &Engine<B>,
    png: &[u8],
    device: &B::Device,
    runs: usize,
    which: SegmentKernel,
    with_kernel: &[f32],
) -> Result<BurnAttention> {
    let model = engine.model();
    let pixels = preprocess_bytes(png, &ProcessorConfig::default())?;
    let images = std::slice::from_ref(&pixels);
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"));
    set_segment_attention_kernel(which);
    let timed = || -> Result<(f64, Option<Tensor<B, 2>>)> {
        sync()?;
        let start = Instant::now();
        let features = model.encode_images(images, device)?;
        sync()?;
        Ok((start.elapsed().as_secs_f64(), features.map(|f| f.embeds)))
    };
    // The first pass compiles (and autotunes) burn's attention kernels.
    let first = timed();
    let rest = (0..runs.max(1))
        .map(|_| timed())
        .collect::<Result<Vec<_>>>();
    set_segment_attention_kernel(SegmentKernel::All);
    let (_, with_burn) = first?;
    let times = rest?.into_iter().map(|(s, _)| s).collect();
    let (a, b) = (
        with_kernel,
        host_values(with_burn.context("the page gave no image features")?)?,
    );
    let nonfinite = |v: &[f32]| v.iter().filter(|x| !x.is_finite()).count();
    let finite = || {
        a.iter()
            .zip(&b)
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let largest = finite().fold(0.0f32, |m, (_, y)| m.max(y.abs()));
    let diff = finite().fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    Ok(BurnAttention {
        vision_s: median(times),
        // NaN (null in the JSON) when no value is finite in both.
        difference: if finite().next().is_some() {
            f64::from(diff) / f64::from(largest).max(f64::MIN_POSITIVE)
        } else {
            f64::NAN
        },
        nonfinite_with_kernel: nonfinite(a),
        nonfinite_with_burn: nonfinite(&b),
    })
}

/// Image features that are not finite (of `rows x hidden`), per attention path.
#[derive(Serialize)]
struct NonFinite {
    kernel: usize,
    burn_attention: usize,
    kernel_windows_only: usize,
}

/// What [`vision_with_burn_attention`] measures.
struct BurnAttention {
    vision_s: f64,
    /// Largest difference between the two towers' image features, over the values finite in both, relative to
    /// the largest magnitude.
    difference: f64,
    nonfinite_with_kernel: usize,
    nonfinite_with_burn: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

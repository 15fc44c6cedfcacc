//! `medvl-bench decode`: the decode plan (`medvl_engine::plan`) of a Qwen2.5-VL decoder with random weights, per
//! weight format and batch size: weights memory, tokens/s, host time per step.
//!
//! Per case, two timings over the same number of steps:
//! - `step_ms`: one step at a time, reading the tokens back after each (what generation does);
//! - `pipelined_step_ms`: steps launched back to back (each takes its tokens from the previous step's argmax on
//!   the device) and read once at the end: the GPU's time per step when the host never makes it wait.
//!
//! `host_ms` is the host's time to enqueue one step's launches.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::ValueEnum;
use cubecl::prelude::*;
use medvl_engine::plan::{
    DecodePlan, DenseProducts, Nf4Products, OpTime, PlanConfig, RandomFormat, RandomFormats,
};
use medvl_engine::{Sampler, SamplingParams};
use medvl_kernels::nf4::Activation;
use medvl_model::QwenVlConfig;
use serde::Serialize;

use crate::{ActivationKind, RunInfo, RuntimeKind, measure_copy};

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    run: RunInfo,
    /// Run the plain NF4 GEMV as it was before row sets and f32 activations in shared memory
    /// (`nf4::set_previous_gemv`): for a comparison on the same card.
    #[arg(long)]
    previous_gemv: bool,
    /// Run the tensor-core GEMV with the tiling it took before the conflict-free table
    /// (`mma::set_previous_tiling`): for a comparison on the same card.
    #[arg(long)]
    previous_mma: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cuda")]
    runtime: RuntimeKind,
    /// Model sizes.
    #[arg(long, value_enum, default_value = "7b")]
    model: ModelSize,
    /// Weight formats, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dense,nf4,nf4-lm-head,nf4-lora"
    )]
    formats: Vec<Format>,
    /// Batch sizes, comma-separated (at most 32).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Tokens already cached per sequence when timing starts (a page: 1,260 image tokens plus the prompt).
    #[arg(long, default_value_t = 1300)]
    context: usize,
    /// Steps timed per case.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Activation type.
    #[arg(long, value_enum, default_value = "bf16")]
    activations: ActivationKind,
    /// Rank of the adapters of the `nf4-lora` format (the reference's QLoRA: 64).
    #[arg(long, default_value_t = 64)]
    lora_rank: usize,
    /// Bytes the copy probe moves each way (GiB).
    #[arg(long, default_value_t = 1.0)]
    copy_gib: f64,
    /// Sample every sequence on the device at this temperature (0: greedy argmax).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// With `--temperature`: keep the `top_k` most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// With `--temperature`: keep the smallest set of tokens whose probability reaches `top_p`.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

impl DecodeArgs {
    /// How the sequences pick tokens; `None`: greedy.
    fn sampling(&self) -> Option<SamplingParams> {
        (self.temperature > 0.0).then(|| SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: 7,
            ..Default::default()
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModelSize {
    /// Qwen2.5-VL-7B's decoder.
    #[value(name = "7b")]
    Q7b,
    /// Qwen2.5-VL-3B's decoder.
    #[value(name = "3b")]
    Q3b,
    /// A 2-layer toy decoder (smoke runs on software drivers).
    Toy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Format {
    /// Every weight dense in the activation type (bf16 unless `--activations f32`).
    Dense,
    /// Decoder projections NF4 (blocksize 64, double quantization), embedding and lm_head dense: what
    /// transformers + bitsandbytes `load_in_4bit` does.
    Nf4,
    /// As `nf4`, with the lm_head NF4 too.
    Nf4LmHead,
    /// Every weight NF4: the decoder projections, the lm_head and the token embedding (the smallest model;
    /// `QuantizeOptions::everything`).
    Nf4All,
    /// As `nf4`, with LoRA adapters of rank `--lora-rank` on all seven projections of every layer, unmerged
    /// (QLoRA's inference: PEFT over bitsandbytes).
    Nf4Lora,
    /// As `nf4`, with the NF4 products on the plain GEMV (up to 8 rows) and GEMM only, never the tensor-core GEMV
    /// (`medvl_kernels::mma`; `nf4` is the same where the device has no tensor cores): to compare.
    Nf4Gemv,
    /// As `nf4`, with every NF4 product of 1-32 rows on the tensor-core GEMV: to compare.
    Nf4Mma,
    /// As `dense`, with the dense products past 8 rows on the tensor-core GEMM (before the dense tensor-core
    /// GEMV): to compare.
    DenseGemm,
    /// As `dense`, with the dense tensor-core GEMV taking up to 32 rows per launch: to compare.
    DenseMma32,
}

impl Format {
    /// Each kind of weight's format, and whether adapters are on.
    fn formats(self) -> (RandomFormats, bool) {
        use RandomFormat::{Dense, Nf4};
        let (layers, lm_head, embedding) = match self {
            Self::Dense | Self::DenseGemm | Self::DenseMma32 => (Dense, Dense, Dense),
            Self::Nf4LmHead => (Nf4, Nf4, Dense),
            Self::Nf4All => (Nf4, Nf4, Nf4),
            Self::Nf4 | Self::Nf4Lora | Self::Nf4Gemv | Self::Nf4Mma => (Nf4, Dense, Dense),
        };
        let formats = RandomFormats {
            layers,
            lm_head,
            embedding,
        };
        (formats, self == Self::Nf4Lora)
    }
}

#[derive(Serialize)]
struct Case {
    format: Format,
    /// Rank of the LoRA adapters (nf4-lora).
    lora_rank: Option<usize>,
    /// The smallest batch whose NF4 products ran on the tensor-core GEMV (none: never).
    nf4_mma_from: Option<usize>,
    /// The most rows per launch of the dense tensor-core GEMV past 8 rows (none: the GEMM, or no dense layers).
    dense_mma_rows: Option<usize>,
    batch: usize,
    context: usize,
    steps: usize,
    /// How tokens were picked (none: greedy argmax).
    sampling: Option<SamplingParams>,
    weights_mb: f64,
    device_in_use_mb: f64,
    device_reserved_mb: f64,
    step_ms: f64,
    tokens_per_s: f64,
    host_ms: f64,
    pipelined_step_ms: f64,
    pipelined_tokens_per_s: f64,
    /// Each operation timed alone (`DecodePlan::profile`).
    ops: Vec<OpTime>,
}

#[derive(Serialize)]
struct Report {
    card: String,
    runtime: &'static str,
    activations: &'static str,
    git_commit: String,
    model: &'static str,
    copy_gb_per_s: f64,
    /// `--previous-gemv` / `--previous-mma`: the kernels ran with their earlier tilings.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    previous_gemv: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    previous_mma: bool,
    cases: Vec<Case>,
}

pub fn run(args: &DecodeArgs) -> Result<()> {
    medvl_kernels::nf4::set_previous_gemv(args.previous_gemv);
    medvl_kernels::mma::set_previous_tiling(args.previous_mma);
    match (args.runtime, args.activations) {
        #[cfg(feature = "cuda")]
        (RuntimeKind::Cuda, ActivationKind::Bf16) => {
            run_in::<cubecl::cuda::CudaRuntime, half::bf16>(args, "cuda", "bf16")
        }
        #[cfg(feature = "cuda")]
        (RuntimeKind::Cuda, ActivationKind::F32) => {
            run_in::<cubecl::cuda::CudaRuntime, f32>(args, "cuda", "f32")
        }
        #[cfg(feature = "wgpu")]
        (RuntimeKind::Wgpu, ActivationKind::F32) => {
            run_in::<cubecl::wgpu::WgpuRuntime, f32>(args, "wgpu", "f32")
        }
        #[allow(unreachable_patterns)]
        _ => bail!(
            "this build has no such runtime and activation pair (wgpu runs f32 only; rebuild with \
             `--features cuda` or `--features wgpu`)"
        ),
    }
}

fn config(model: ModelSize, batch: usize, capacity: usize) -> (PlanConfig, &'static str) {
    let text = match model {
        ModelSize::Q7b => QwenVlConfig::qwen2_5_vl_7b().text,
        ModelSize::Q3b => QwenVlConfig::qwen2_5_vl_3b().text,
        ModelSize::Toy => {
            let mut text = QwenVlConfig::qwen2_5_vl_3b().text;
            text.num_hidden_layers = 2;
            text.vocab_size = 4096;
            text
        }
    };
    let name = match model {
        ModelSize::Q7b => "Qwen2.5-VL-7B decoder",
        ModelSize::Q3b => "Qwen2.5-VL-3B decoder",
        ModelSize::Toy => "toy (2 layers of the 3B)",
    };
    (PlanConfig::new(&text, batch, capacity), name)
}

fn run_in<R: Runtime, F: Activation>(
    args: &DecodeArgs,
    runtime: &'static str,
    activations: &'static str,
) -> Result<()> {
    let client = R::client(&Default::default());
    let copy_gb_per_s = measure_copy(&client, args.copy_gib)?.gb_per_s;
    client.memory_cleanup();
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let warmup = 3;
    let capacity = args.context + warmup + 2 * args.steps + 1;
    let (config, model) = config(args.model, max_batch, capacity);
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let mut cases = Vec::new();
    println!(
        "{model}, {activations} activations, {} cached tokens per sequence, {}\n\n| weights | batch | weights MB | device MB in use | step ms | tokens/s | host ms/step | pipelined step ms | pipelined tokens/s |\n|---|---|---|---|---|---|---|---|---|",
        args.context,
        match args.sampling() {
            Some(s) => format!(
                "sampled on the device (temperature {}, top-k {}, top-p {})",
                s.temperature, s.top_k, s.top_p
            ),
            None => "greedy".into(),
        }
    );
    for &format in &args.formats {
        let (formats, lora) = format.formats();
        let lora_rank = lora.then_some(args.lora_rank);
        let mut plan = DecodePlan::<R, F>::random(&client, config, formats, lora_rank, 7)?;
        let nf4_mma_from = plan
            .set_nf4_products(match format {
                Format::Nf4Gemv => Nf4Products::Gemv,
                Format::Nf4Mma => Nf4Products::Mma,
                _ => Nf4Products::Auto,
            })
            .filter(|_| formats.layers == RandomFormat::Nf4);
        let dense_mma_rows = plan
            .set_dense_products(match format {
                Format::DenseGemm => DenseProducts::Gemm,
                Format::DenseMma32 => DenseProducts::Mma32,
                _ => DenseProducts::Auto,
            })
            .filter(|_| formats.layers == RandomFormat::Dense);
        let usage = client
            .memory_usage()
            .map_err(|e| anyhow::anyhow!("memory usage: {e:?}"))?;
        for &batch in &args.batches {
            for slot in 0..config.batch {
                plan.release(slot);
            }
            for slot in 0..batch {
                plan.admit_unfilled(slot, args.context, slot as u32)?;
                if let Some(sampling) = args.sampling() {
                    let mut sampler = Sampler::new(SamplingParams {
                        seed: sampling.seed + slot as u64,
                        ..sampling
                    })?;
                    plan.sample_with(slot, &mut sampler, &[])?;
                }
            }
            for _ in 0..warmup {
                plan.step()?;
            }
            let mut host_s = 0.0;
            let start = Instant::now();
            for _ in 0..args.steps {
                let launch = Instant::now();
                plan.launch_step()?;
                host_s += launch.elapsed().as_secs_f64();
                plan.finish_step()?;
            }
            let step_s = start.elapsed().as_secs_f64() / args.steps as f64;
            let start = Instant::now();
            for _ in 0..args.steps {
                plan.launch_step()?;
            }
            plan.finish_step()?;
            let pipelined_s = start.elapsed().as_secs_f64() / args.steps as f64;
            let ops = plan.profile(20)?;
            let case = Case {
                format,
                lora_rank,
                nf4_mma_from,
                dense_mma_rows,
                batch,
                context: args.context,
                steps: args.steps,
                sampling: args.sampling(),
                weights_mb: mb(plan.weight_bytes() as u64),
                device_in_use_mb: mb(usage.bytes_in_use),
                device_reserved_mb: mb(usage.bytes_reserved),
                step_ms: step_s * 1e3,
                tokens_per_s: batch as f64 / step_s,
                host_ms: host_s * 1e3 / args.steps as f64,
                pipelined_step_ms: pipelined_s * 1e3,
                pipelined_tokens_per_s: batch as f64 / pipelined_s,
                ops,
            };
            println!(
                "| {} | {batch} | {:.0} | {:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} |",
                format
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default(),
                case.weights_mb,
                case.device_in_use_mb,
                case.step_ms,
                case.tokens_per_s,
                case.host_ms,
                case.pipelined_step_ms,
                case.pipelined_tokens_per_s
            );
            cases.push(case);
        }
        // Where the time of a step goes, per operation (first and last batch size).
        let mut shown = vec![args.batches[0]];
        shown.extend(args.batches.last().filter(|&&b| b != args.batches[0]));
        for case in shown.iter().filter_map(|&batch| {
            cases
                .iter()
                .rev()
                .find(|c| c.format == format && c.batch == batch)
        }) {
            println!(
                "\n  per operation, batch {}: | op | us per launch (host-bound) | GPU us per launch | launches per step | GPU ms per step | weight GB/s (GPU time) | of copy |",
                case.batch
            );
            for op in &case.ops {
                let gb_per_s = op.weight_bytes as f64 / op.gpu_us / 1e3;
                println!(
                    "  | {} | {:.1} | {:.1} | {} | {:.3} | {} | {} |",
                    op.op,
                    op.us,
                    op.gpu_us,
                    op.per_step,
                    op.gpu_us * op.per_step as f64 / 1e3,
                    if op.weight_bytes > 0 {
                        format!("{gb_per_s:.0}")
                    } else {
                        "-".into()
                    },
                    if op.weight_bytes > 0 {
                        format!("{:.0}%", 100.0 * gb_per_s / copy_gb_per_s)
                    } else {
                        "-".into()
                    },
                );
            }
            let gpu_ms: f64 = case
                .ops
                .iter()
                .map(|op| op.gpu_us * op.per_step as f64 / 1e3)
                .sum();
            println!("  GPU time of one step's launches, summed: {gpu_ms:.3} ms");
            println!();
        }
        drop(plan);
        client.memory_cleanup();
    }
    let report = Report {
        card: args.run.card.clone(),
        runtime,
        activations,
        git_commit: args.run.commit.clone(),
        model,
        copy_gb_per_s,
        previous_gemv: args.previous_gemv,
        previous_mma: args.previous_mma,
        cases,
    };
    args.run.write_report(&report)
}

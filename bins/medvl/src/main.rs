//! `medvl`: read medical documents with Qwen2.5-VL from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use burn::prelude::Backend;
use clap::{Args, Parser, Subcommand, ValueEnum};
use medvl_engine::{Engine, GenerateParams, ModelSource, Request, SamplingParams};
use medvl_model::QuantizeOptions;
use medvl_model::chat::{Message, Part, Role};

mod doctor;
mod eval;

/// The default extraction instruction, with the intent of the reference service's prompt.
const EXTRACT_PROMPT: &str = medvl_data::chat::REFERENCE_PROMPT;

#[derive(Parser, Debug)]
#[command(
    name = "medvl",
    version,
    about = "Read medical documents with Qwen2.5-VL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Extract the medical content of document images (diagnoses, medications, labs, vitals, procedures).
    Extract {
        /// Image files (PNG, JPEG, WebP, TIFF, BMP); several pages go into one prompt.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Ask a question about one or more images.
    Ask {
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// The question.
        #[arg(long, short)]
        prompt: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Generate with every sampling option; images are optional.
    Generate {
        /// An image (repeat for several); none for a text-only prompt.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// The user message.
        #[arg(long, short)]
        prompt: String,
        /// A system message (the template's default otherwise).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop when the text contains this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Generate past end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// What this machine can run, and what to do about what it cannot.
    Doctor,
    /// Score extraction on documents with ground truth (synthetic forms by default): predictions.jsonl,
    /// evaluation.json and report.md under --out; `medvl eval compare A B` for two runs side by side.
    Eval(EvalCli),
    /// Datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write an NF4 checkpoint (bitsandbytes layout, loadable by transformers + bitsandbytes).
    Quantize {
        /// Source model directory or hub repo id.
        #[arg(long, short)]
        model: String,
        /// Hub revision.
        #[arg(long)]
        revision: Option<String>,
        /// Output directory.
        #[arg(long, short)]
        out: PathBuf,
        /// Values per block (a power of two, 32 to 4096).
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep the block scales in f32 (no double quantization).
        #[arg(long)]
        no_double_quant: bool,
        /// Quantize lm_head too.
        #[arg(long)]
        quantize_lm_head: bool,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct EvalCli {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    #[command(flatten)]
    eval: eval::EvalArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Two runs side by side (their directories or evaluation.json files; the first is the baseline).
    Compare {
        /// The baseline run.
        a: PathBuf,
        /// The run compared with it.
        b: PathBuf,
    },
}

/// Reports each row a `--skip-bad` read skipped, with its reason (rows, not their content).
fn print_skipped(skipped: &medvl_data::Skipped) {
    for (row, reason) in &skipped.rows {
        eprintln!("skipped row {row}: {reason}");
    }
}

/// Which parquet shards of a folder or hub dataset to read.
#[derive(Args, Debug, Clone)]
struct ShardArgs {
    /// The split whose shards are read (`data/<split>-*.parquet`).
    #[arg(long, default_value = "train")]
    split: String,
    /// A glob of the shards relative to the folder or repository root, instead of the split's.
    #[arg(long)]
    pattern: Option<String>,
}

impl ShardArgs {
    fn paths(&self, source: &str) -> anyhow::Result<Vec<PathBuf>> {
        let pattern = self
            .pattern
            .clone()
            .unwrap_or_else(|| medvl_data::hub::split_pattern(&self.split));
        Ok(medvl_data::hub::shards(source, &pattern)?)
    }
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Write synthetic clinical forms with exact ground truth: per form its page PNGs and `<id>.json`, then
    /// `manifest.jsonl`, every file written atomically.
    Synth {
        /// Form kinds, comma-separated: medication-reconciliation, icu-flowsheet, cardiology-consult, lab-panel,
        /// operative-note, discharge-summary, prescription (default: all).
        #[arg(long, value_delimiter = ',')]
        kind: Vec<medvl_data::synth::FormKind>,
        /// Forms per kind.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// First seed (forms use seeds seed..seed + count).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory.
        #[arg(long, short)]
        out: PathBuf,
        /// Clean digital pages: no blur, speckle or JPEG round trip.
        #[arg(long)]
        clean: bool,
    },
    /// Documents, pages, samples and records of a dataset directory (`medvl data synth`, `mtsamples` or
    /// `pathvqa`).
    Stats {
        /// The dataset directory (with its manifest.jsonl).
        dir: PathBuf,
    },
    /// Draw MTSamples transcriptions (`mtsamples.csv`, or the hub parquet) as letter pages: `<id>.page<N>.png` per
    /// page, then `manifest.jsonl` (id, specialty, pages, the transcription), every file written atomically.
    Mtsamples {
        /// The CSV (`description, medical_specialty, sample_name, transcription, keywords`).
        #[arg(long, conflicts_with = "parquet", required_unless_present = "parquet")]
        csv: Option<PathBuf>,
        /// Parquet shards (`text`, `label`): a file, a folder, or a hub dataset `owner/name[@revision]` (the
        /// transcriptions of `rungalileo/medical_transcription_40`).
        #[arg(long)]
        parquet: Option<String>,
        #[command(flatten)]
        shards: ShardArgs,
        /// Output directory.
        #[arg(long, short)]
        out: PathBuf,
        /// Seed of the page styles and artefacts.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// At most this many transcriptions (the first ones).
        #[arg(long)]
        limit: Option<usize>,
        /// Skip rows without a transcription (reported) instead of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
        /// Clean digital pages: no blur, speckle or JPEG round trip.
        #[arg(long)]
        clean: bool,
    },
    /// Read PathVQA parquet shards into a dataset directory: each image once under `images/`, then
    /// `manifest.jsonl` (one sample per question), streamed and written atomically.
    Pathvqa {
        /// A parquet file, a folder of shards, or a hub dataset `owner/name[@revision]`.
        #[arg(long, default_value = medvl_data::pathvqa::REPO)]
        source: String,
        #[command(flatten)]
        shards: ShardArgs,
        /// Output directory.
        #[arg(long, short)]
        out: PathBuf,
        /// At most this many samples (the first ones).
        #[arg(long)]
        limit: Option<usize>,
        /// Skip unusable rows (null or undecodable image, empty question or answer; each reported) instead of
        /// stopping at the first.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Write a dataset directory as training conversations (JSON lines: id, document, images, messages) for one
    /// split of the document-level 80/10/10 split.
    Chat {
        /// The dataset directory (`medvl data synth`, `mtsamples` or `pathvqa`).
        dir: PathBuf,
        /// Prompts: `task` (ask for what the target is: extraction JSON, transcription, short answer) or
        /// `reference` (the reference pipeline's: its extraction instruction for every document).
        #[arg(long, default_value = "task")]
        style: medvl_data::chat::PromptStyle,
        /// train, validation, test, or all.
        #[arg(long, default_value = "train")]
        split: String,
        /// Seed of the split.
        #[arg(long, default_value_t = 0)]
        split_seed: u64,
        /// The JSON-lines file to write.
        #[arg(long, short)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// A local model directory (config.json, tokenizer.json, safetensors) or a hub repo id.
    #[arg(
        long,
        short,
        env = "MEDVL_MODEL",
        default_value = "Qwen/Qwen2.5-VL-7B-Instruct"
    )]
    model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Compute dtype (cpu: f32 only; cuda: bf16 or f32).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Lower bound on the resized image area in pixels (the model directory's setting otherwise).
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Upper bound on the resized image area in pixels.
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Print one JSON object (text, token ids, token counts, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Quantize the linear layers while loading (pre-quantized checkpoints are NF4 regardless).
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), applied unmerged on top
    /// of the (dense or NF4) weights, in the prefill and in the decode plan.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// How tokens after the first are decoded: `plan` (medvl's own CUDA kernels, greedy or sampled), `burn` (the
    /// burn model, as the prefill), `auto` (plan on CUDA, burn on the CPU).
    #[arg(long, value_enum, default_value_t = DecodeArg::Auto)]
    decode: DecodeArg,
    /// Most tokens (prompt plus generated) a request decodes through the plan; the plan's KV cache is sized for
    /// it. Longer requests decode through burn.
    #[arg(long, default_value_t = 8192)]
    context: usize,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeArg {
    Auto,
    Plan,
    Burn,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum QuantArg {
    /// bitsandbytes NF4, blocksize 64, double quantization, lm_head and embedding kept dense (as transformers).
    Nf4,
    /// As `nf4`, with the lm_head and the token embedding NF4 too: the smallest model, at NF4's precision there.
    Nf4All,
}

#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// > 1 discourages repeats (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DtypeArg {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("MEDVL_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to do with a loaded engine.
enum Job {
    /// Generate for one request and print the answer.
    Generate(Request),
    /// Evaluate over a dataset, writing under the path.
    Eval(eval::EvalArgs, PathBuf),
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (images, messages, params, run) = match cli.command {
        Command::Doctor => return doctor::run(),
        Command::Eval(EvalCli {
            command: Some(EvalCommand::Compare { a, b }),
            ..
        }) => {
            println!(
                "{}",
                medvl_eval::report::compare(&eval::read(&a)?, &eval::read(&b)?)
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Eval(EvalCli {
            command: None,
            eval,
            run,
        }) => {
            let Some(out) = eval.out.clone() else {
                bail!("--out DIR is required: where predictions, evaluation.json and report.md go");
            };
            return with_engine(&run, Job::Eval(eval, out));
        }
        Command::Data(DataCommand::Synth {
            kind,
            count,
            seed,
            out,
            clean,
        }) => {
            use medvl_data::synth::FormKind;
            let kinds = if kind.is_empty() {
                FormKind::ALL.to_vec()
            } else {
                kind
            };
            let artefacts = clean.then_some(medvl_data::render::Artefacts::NONE);
            let entries = medvl_data::synth::write_forms(&out, &kinds, count, seed, artefacts)
                .with_context(|| format!("writing forms to {}", out.display()))?;
            let pages: usize = entries.iter().map(|e| e.pages.len()).sum();
            eprintln!(
                "wrote {} forms ({pages} pages) to {}",
                entries.len(),
                out.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Data(DataCommand::Stats { dir }) => {
            let stats = medvl_data::stats::Stats::of_dir(&dir)?;
            println!("{}", stats.markdown());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Data(DataCommand::Mtsamples {
            csv,
            parquet,
            shards,
            out,
            seed,
            limit,
            skip_bad,
            clean,
        }) => {
            let (mut samples, skipped) = match (csv, parquet) {
                (Some(csv), _) => medvl_data::mtsamples::read_csv(&csv, skip_bad)?,
                (None, Some(source)) => {
                    let mut rows = medvl_data::table::Shards::new(
                        shards.paths(&source)?,
                        medvl_data::mtsamples::read_parquet,
                        skip_bad,
                    );
                    let samples = rows
                        .by_ref()
                        .take(limit.unwrap_or(usize::MAX))
                        .collect::<Result<Vec<_>, _>>()?;
                    (samples, rows.skipped())
                }
                (None, None) => bail!("--csv FILE or --parquet SOURCE is required"),
            };
            print_skipped(&skipped);
            if let Some(n) = limit {
                samples.truncate(n);
            }
            let artefacts = clean.then_some(medvl_data::render::Artefacts::NONE);
            let entries = medvl_data::mtsamples::write_pages(&samples, &out, seed, artefacts)
                .with_context(|| format!("writing pages to {}", out.display()))?;
            let pages: usize = entries.iter().map(|e| e.pages.len()).sum();
            eprintln!(
                "wrote {} transcriptions ({pages} pages) to {}; {} rows skipped",
                entries.len(),
                out.display(),
                skipped.rows.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Data(DataCommand::Pathvqa {
            source,
            shards,
            out,
            limit,
            skip_bad,
        }) => {
            let mut rows = medvl_data::table::Shards::new(
                shards.paths(&source)?,
                medvl_data::pathvqa::read,
                skip_bad,
            );
            let written =
                medvl_data::write_samples(rows.by_ref().take(limit.unwrap_or(usize::MAX)), &out)
                    .with_context(|| format!("writing PathVQA to {}", out.display()))?;
            let skipped = rows.skipped();
            print_skipped(&skipped);
            eprintln!(
                "wrote {} samples ({} images) to {}; {} rows skipped",
                written.samples,
                written.images,
                out.display(),
                skipped.rows.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Data(DataCommand::Chat {
            dir,
            style,
            split,
            split_seed,
            out,
        }) => {
            let wanted = match split.as_str() {
                "all" => None,
                one => Some(
                    one.parse::<medvl_data::split::Split>()
                        .map_err(|e| anyhow::anyhow!("{e}, or all"))?,
                ),
            };
            let samples = medvl_data::dataset::Manifest::read(&dir)?.samples(&dir)?;
            let documents: Vec<&str> = samples.iter().map(|s| s.document.as_str()).collect();
            let splits = medvl_data::split::assign(&documents, split_seed);
            let mut lines = String::new();
            let mut count = 0;
            for (sample, s) in samples.iter().zip(splits) {
                if wanted.is_none_or(|w| w == s) {
                    let conversation = medvl_data::chat::conversation(sample, style);
                    lines += &serde_json::to_string(&conversation)?;
                    lines.push('\n');
                    count += 1;
                }
            }
            medvl_data::write_atomic(&out, lines.as_bytes())?;
            eprintln!("wrote {count} conversations ({split}) to {}", out.display());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Quantize {
            model,
            revision,
            out,
            blocksize,
            no_double_quant,
            quantize_lm_head,
        } => {
            let dir = ModelSource::parse(&model, revision.as_deref())?.resolve()?;
            let mut options = QuantizeOptions {
                blocksize,
                double_quant: !no_double_quant,
                ..Default::default()
            };
            if quantize_lm_head {
                options = options.with_lm_head();
            }
            let report = medvl_model::quantize::quantize_dir(&dir, &out, &options)
                .with_context(|| format!("quantizing {} into {}", dir.display(), out.display()))?;
            eprintln!(
                "wrote {}: {} linear layers in NF4, {} tensors kept, {:.1} MB",
                out.display(),
                report.quantized,
                report.kept,
                report.bytes as f64 / 1e6
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Extract { images, run } => {
            let messages = vec![Message::user_with_images(images.len(), EXTRACT_PROMPT)];
            (
                images,
                messages,
                GenerateParams::greedy(run.max_new_tokens),
                run,
            )
        }
        Command::Ask {
            images,
            prompt,
            run,
        } => {
            let messages = vec![Message::user_with_images(images.len(), prompt)];
            (
                images,
                messages,
                GenerateParams::greedy(run.max_new_tokens),
                run,
            )
        }
        Command::Generate {
            images,
            prompt,
            system,
            sampling,
            stop,
            ignore_eos,
            run,
        } => {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(Message::text(Role::System, system));
            }
            let mut content = vec![Part::Image; images.len()];
            content.push(Part::Text { text: prompt });
            messages.push(Message {
                role: Role::User,
                content,
            });
            let sampling = SamplingParams {
                temperature: sampling.temperature,
                top_k: sampling.top_k,
                top_p: sampling.top_p,
                repetition_penalty: sampling.repetition_penalty,
                seed: sampling.seed,
            };
            let params = GenerateParams {
                sampling,
                max_new_tokens: run.max_new_tokens,
                stop,
                ignore_eos,
            };
            (images, messages, params, run)
        }
    };
    let images = images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read image {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = Request {
        messages,
        images,
        params,
    };
    with_engine(&run, Job::Generate(request))
}

/// Loads the engine `run` describes and does `job` with it.
fn with_engine(run: &RunArgs, job: Job) -> anyhow::Result<ExitCode> {
    let dir = ModelSource::parse(&run.model, run.revision.as_deref())?.resolve()?;
    match (run.device, run.dtype) {
        (DeviceArg::Cpu, None | Some(DtypeArg::F32)) => {
            if run.decode == DecodeArg::Plan {
                bail!("--decode plan runs medvl's CUDA kernels: use it with --device cuda");
            }
            execute::<medvl_model::backend::Cpu>(&dir, Default::default(), run, &job, |_| Ok(None))
        }
        (DeviceArg::Cpu, Some(DtypeArg::Bf16)) => {
            bail!("--device cpu computes in f32; use --dtype f32 or --device cuda")
        }
        (DeviceArg::Cuda, dtype) => cuda(&dir, dtype, run, &job),
    }
}

#[cfg(feature = "cuda")]
fn cuda(
    dir: &std::path::Path,
    dtype: Option<DtypeArg>,
    run: &RunArgs,
    job: &Job,
) -> anyhow::Result<ExitCode> {
    use medvl_model::backend::{CudaBf16, CudaF32};
    match dtype.unwrap_or(DtypeArg::Bf16) {
        DtypeArg::Bf16 => execute::<CudaBf16>(dir, Default::default(), run, job, |engine| {
            cuda_plan::<burn::tensor::bf16>(engine, run)
        }),
        DtypeArg::F32 => execute::<CudaF32>(dir, Default::default(), run, job, |engine| {
            cuda_plan::<f32>(engine, run)
        }),
    }
}

/// The decode plan of a model loaded on CUDA, on the same device, unless `--decode burn`. The plan shares the
/// model's weights (one copy on the device).
#[cfg(feature = "cuda")]
fn cuda_plan<F: medvl_kernels::nf4::Activation + medvl_engine::share::FloatElement>(
    engine: &mut Engine<medvl_engine::share::Cube<cubecl::cuda::CudaRuntime, F>>,
    run: &RunArgs,
) -> anyhow::Result<Option<Box<dyn medvl_engine::plan::Decoder>>> {
    use cubecl::Runtime;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    if run.decode == DecodeArg::Burn {
        return Ok(None);
    }
    let client = CudaRuntime::client(&CudaDevice::default());
    let plan = medvl_engine::DecodePlan::<CudaRuntime, F>::sharing_model(
        &client,
        engine.model_mut(),
        1,
        run.context,
    )
    .context("building the decode plan")?;
    Ok(Some(Box::new(plan)))
}

#[cfg(not(feature = "cuda"))]
fn cuda(
    _: &std::path::Path,
    _: Option<DtypeArg>,
    _: &RunArgs,
    _: &Job,
) -> anyhow::Result<ExitCode> {
    bail!(
        "this medvl was built without CUDA support; rebuild with `cargo build --release --features cuda`"
    )
}

fn execute<B: Backend>(
    dir: &std::path::Path,
    device: B::Device,
    run: &RunArgs,
    job: &Job,
    plan: impl FnOnce(&mut Engine<B>) -> anyhow::Result<Option<Box<dyn medvl_engine::plan::Decoder>>>,
) -> anyhow::Result<ExitCode> {
    let quantize = run.quant.map(|quant| match quant {
        QuantArg::Nf4 => QuantizeOptions::default(),
        QuantArg::Nf4All => QuantizeOptions::everything(),
    });
    let mut engine = Engine::<B>::load_with(dir, device, quantize)
        .with_context(|| format!("loading {}", dir.display()))?;
    if let Some(adapter) = &run.adapter {
        engine
            .load_adapter(adapter)
            .with_context(|| format!("loading the adapter {}", adapter.display()))?;
    }
    if let Some(plan) = plan(&mut engine)? {
        engine.attach_plan(plan);
    }
    let processor = engine.processor_mut();
    if let Some(v) = run.min_pixels {
        processor.min_pixels = v;
    }
    if let Some(v) = run.max_pixels {
        processor.max_pixels = v;
    }
    let request = match job {
        Job::Generate(request) => request,
        Job::Eval(args, out) => {
            let mut label = run.model.clone();
            if run.quant.is_some() {
                label += " (NF4)";
            }
            if let Some(adapter) = &run.adapter {
                label += &format!(" + {}", adapter.display());
            }
            let evaluation = eval::run(&engine, args, out, &label, run.max_new_tokens)?;
            println!("{}", evaluation.markdown());
            return Ok(ExitCode::SUCCESS);
        }
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let json = run.json;
    let generation = engine.generate(request, |piece| {
        if !json {
            // A closed stdout (a pipe to `head`) must not abort generation.
            let _ = write!(stdout, "{piece}").and_then(|()| stdout.flush());
        }
    })?;
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&generation)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens ({} image), {} generated, prefill {:.2} s, {:.1} tokens/s{}, {:?}]",
            generation.prompt_tokens,
            generation.image_tokens,
            generation.token_ids.len(),
            generation.timings.prefill_s,
            generation.timings.decode_tokens_per_s,
            if generation.plan_decode {
                " (decode plan)"
            } else {
                ""
            },
            generation.finish_reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

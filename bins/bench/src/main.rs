//! `medvl-bench`: benchmarks on the GPU.
//!
//! `medvl-bench decode` times the decode plan of Qwen2.5-VL's decoder with random weights (see `decode.rs`).
//!
//! `medvl-bench page` times a document page end to end through the engine (see `page.rs`).
//!
//! `medvl-bench kernels` rates the NF4 decode GEMV at the shapes of Qwen2.5-VL-7B's decoder against the card's
//! copy bandwidth measured in the same run, and writes the numbers as JSON.
//!
//! Two times per case: `kernel_us`, the GPU time of one launch (launches queued behind a long copy so that the
//! GPU never waits for the host: (wall time of copy + N launches - wall time of the copy) / N), and `launch_us`,
//! the wall time per launch when launches run back to back from the host (what a decode step built from single
//! launches pays when the kernel is shorter than the host's launch cost).

mod decode;
#[cfg(feature = "cuda")]
mod driver;
mod page;
#[cfg(feature = "cuda")]
mod prefill;
mod report;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use cubecl::prelude::*;
use medvl_engine::plan::random_nf4;
use medvl_kernels::Buffer;
use medvl_kernels::gemm::{self, GemmTiling};
use medvl_kernels::mma::{self, MmaTiling};
use medvl_kernels::nf4::{self, GemvTiling, Nf4Matrix};
use medvl_kernels::probe::CopyProbe;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Parser)]
#[command(name = "medvl-bench", version, about = "medvl benchmarks on the GPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// NF4 GEMV GB/s per shape and batch against the measured copy bandwidth.
    Kernels(KernelArgs),
    /// The decode step of the 7B decoder (random weights) per weight format and batch: tokens/s, memory.
    Decode(decode::DecodeArgs),
    /// A page end to end through the engine (random weights): load, memory, vision and decoder prefill, time
    /// to first token, decode tokens/s, page + 256 tokens avg/min/max.
    Page(page::PageArgs),
    /// docs/BENCHMARK_REPORT.md and its SVG charts from benchmark JSON reports (medvl's and the Python
    /// baselines'), the two stacks side by side.
    Report(report::ReportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RuntimeKind {
    /// NVIDIA GPUs.
    Cuda,
    /// wgpu (Vulkan/Metal; a software driver on CPU-only machines: a smoke run, not a measurement).
    Wgpu,
}

/// What a benchmark's report records, and where it goes.
#[derive(clap::Args)]
pub(crate) struct RunInfo {
    /// The card's name, recorded in the report (e.g. from `nvidia-smi --query-gpu=name --format=csv,noheader`).
    #[arg(long, default_value = "unknown")]
    pub(crate) card: String,
    /// The git commit the binary was built from, recorded in the report.
    #[arg(long, default_value = "unknown")]
    pub(crate) commit: String,
    /// Write the report here (JSON).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct KernelArgs {
    #[command(flatten)]
    run: RunInfo,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cuda")]
    runtime: RuntimeKind,
    /// Bytes the copy probe moves each way (GiB).
    #[arg(long, default_value_t = 1.0)]
    copy_gib: f64,
    /// Launches timed per case.
    #[arg(long, default_value_t = 100)]
    launches: usize,
    /// Only the small shapes (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Only the shapes whose name contains this (e.g. `gate+up`).
    #[arg(long)]
    only: Option<String>,
    /// Measure every candidate tiling of the aligned kernel, not just the one `gemv` picks.
    #[arg(long)]
    sweep: bool,
    /// Activation rows the plain GEMV is timed at.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    gemv_batches: Vec<usize>,
    /// Measure every candidate tiling of the tensor-core GEMV at 1, 8 and 16 rows, not just the one `gemv_mma`
    /// picks.
    #[arg(long)]
    mma_sweep: bool,
    /// Leave out the plain GEMV and GEMM (only the tensor-core GEMV).
    #[arg(long)]
    mma_only: bool,
    /// Activation type (`bf16` as in the model; `f32` where the runtime has no bf16, e.g. wgpu).
    #[arg(long, value_enum, default_value = "bf16")]
    activations: ActivationKind,
    /// Instead of the decode products: the prefill's, dequantize + burn's matmul (what the model runs) against
    /// the fused NF4 GEMM, at page-sized row counts (CUDA, bf16).
    #[arg(long)]
    prefill: bool,
    /// Time the plain GEMV's default tiling twice per case: as it is, and the tiling `gemv` took before row sets,
    /// f32 activations in shared memory and lane pairs sharing scales (`nf4::set_previous_gemv`), in the same run.
    #[arg(long)]
    compare_gemv: bool,
    /// Launches timed per prefill case.
    #[arg(long, default_value_t = 10)]
    prefill_launches: usize,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ActivationKind {
    Bf16,
    F32,
}

/// One measured case.
#[derive(Serialize)]
struct Case {
    name: &'static str,
    rows: usize,
    cols: usize,
    /// Activation rows.
    batch: usize,
    /// `gemv rows/plane x loads in flight / split-K planes` or `gemm m fragments x n planes / k chunks`.
    tiling: String,
    default_tiling: bool,
    weight_mb: f64,
    kernel_us: f64,
    gb_per_s: f64,
    fraction_of_copy: f64,
    launch_us: f64,
    /// `--compare-gemv`: the GEMV before the shuffle lookup and shared-memory activations, same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_kernel_us: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    card: String,
    runtime: &'static str,
    activations: &'static str,
    git_commit: String,
    copy_gb_per_s: f64,
    cases: Vec<Case>,
    /// `--prefill`: the prefill's products both ways.
    #[cfg(feature = "cuda")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    prefill: Vec<prefill::PrefillCase>,
}

/// The decode-path matrices of Qwen2.5-VL-7B's decoder, `[out, in]`, and the fused ones a decode plan uses.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q_proj / o_proj", 3584, 3584),
    ("k_proj / v_proj", 512, 3584),
    ("qkv fused", 4608, 3584),
    ("gate_proj / up_proj", 18944, 3584),
    ("gate+up fused", 37888, 3584),
    ("down_proj", 3584, 18944),
    ("lm_head (NF4)", 152064, 3584),
];

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("MEDVL_LOG"))
        .init();
    match Cli::parse().command {
        Command::Decode(args) => decode::run(&args),
        Command::Page(args) => page::run(&args),
        Command::Report(args) => report::run(args),
        Command::Kernels(args) => match args.runtime {
            #[cfg(feature = "cuda")]
            RuntimeKind::Cuda => kernels::<cubecl::cuda::CudaRuntime>(&args, "cuda"),
            #[cfg(feature = "wgpu")]
            RuntimeKind::Wgpu => kernels::<cubecl::wgpu::WgpuRuntime>(&args, "wgpu"),
            #[allow(unreachable_patterns)]
            _ => bail!(
                "this build has no such runtime: rebuild with `--features cuda` or `--features wgpu`"
            ),
        },
    }
}

/// The tilings measured per case: the default one first, then the others.
fn tilings(rows: usize, cols: usize, batch: usize) -> Vec<GemvTiling> {
    let default = GemvTiling::for_shape(rows, cols, batch);
    let mut all = vec![default];
    for (rows_per_plane, unroll, split, sets, paired) in [
        (4, 1, 1, 2, false),
        (4, 2, 1, 2, true),
        (2, 1, 1, 2, true),
        (4, 1, 1, 1, true),
        (4, 2, 1, 1, false),
        (1, 4, 1, 1, false),
        (4, 1, 4, 1, false),
        (4, 1, 4, 1, true),
        (2, 1, 4, 1, true),
        (4, 2, 2, 1, true),
        (4, 2, 2, 1, false),
    ] {
        let t = GemvTiling {
            rows_per_plane,
            unroll,
            split,
            sets,
            paired,
        };
        if !all.contains(&t) {
            all.push(t);
        }
    }
    all
}

/// A GEMV tiling as the tables print it: `gemv {rows per plane}x{unroll}/{split}`, then ` s{sets}` for row sets and
/// ` p` for paired scales.
fn gemv_label(t: GemvTiling) -> String {
    let sets = if t.sets > 1 {
        format!(" s{}", t.sets)
    } else {
        String::new()
    };
    let paired = if t.paired { " p" } else { "" };
    format!(
        "gemv {}x{}/{}{sets}{paired}",
        t.rows_per_plane, t.unroll, t.split
    )
}

/// The copy probe of `gib` GiB each way, its bandwidth printed.
pub(crate) fn measure_copy<R: Runtime>(client: &ComputeClient<R>, gib: f64) -> Result<CopyProbe> {
    let probe = CopyProbe::measure(client, gib)?;
    println!(
        "copy probe: {gib:.2} GiB each way in {:.3} ms = {:.0} GB/s (read + write)",
        probe.seconds * 1e3,
        probe.gb_per_s
    );
    Ok(probe)
}

fn kernels<R: Runtime>(args: &KernelArgs, runtime: &'static str) -> Result<()> {
    match args.activations {
        ActivationKind::Bf16 => kernels_in::<R, half::bf16>(args, runtime, "bf16"),
        ActivationKind::F32 => kernels_in::<R, f32>(args, runtime, "f32"),
    }
}

fn kernels_in<R: Runtime, F: nf4::Activation>(
    args: &KernelArgs,
    runtime: &'static str,
    activations: &'static str,
) -> Result<()> {
    let client = R::client(&Default::default());
    let mut rng = ChaCha8Rng::seed_from_u64(0);

    let probe = measure_copy(&client, args.copy_gib)?;
    let copy_gb_per_s = probe.gb_per_s;
    let tensor_cores = gemm::supported::<R, F>(&client);
    if args.prefill {
        #[cfg(feature = "cuda")]
        {
            if runtime != "cuda" || activations != "bf16" {
                bail!("--prefill runs on CUDA in bf16 (the model's path)");
            }
            let report = Report {
                card: args.run.card.clone(),
                runtime,
                activations,
                git_commit: args.run.commit.clone(),
                copy_gb_per_s,
                cases: Vec::new(),
                prefill: prefill::measure(&probe, args.prefill_launches)?,
            };
            return args.run.write_report(&report);
        }
        #[cfg(not(feature = "cuda"))]
        bail!("--prefill needs the `cuda` feature");
    }

    let shapes: Vec<_> = SHAPES
        .iter()
        .filter(|s| !args.quick || s.1 * s.2 < 20_000_000)
        .filter(|s| {
            args.only
                .as_ref()
                .is_none_or(|only| s.0.contains(only.as_str()))
        })
        .collect();
    let mut cases = Vec::new();
    println!(
        "| matrix | out x in | rows | kernel (tiling) | weight MB | kernel us | GB/s | of copy | launch us |\n|---|---|---|---|---|---|---|---|---|"
    );
    for &&(name, rows, cols) in &shapes {
        let matrix = Nf4Matrix::upload(&client, &random_nf4(&mut rng, rows, cols))
            .with_context(|| format!("upload {rows}x{cols}"))?;
        // The GEMV at 1, 4 and 8 rows (every tiling with --sweep), then the tensor-core GEMM at 16 and 32.
        let mut runs: Vec<(usize, Kernel)> = args
            .gemv_batches
            .iter()
            .copied()
            .flat_map(|b| {
                let mut t = tilings(rows, cols, b);
                t.truncate(if args.sweep { t.len() } else { 1 });
                t.into_iter().map(move |t| (b, Kernel::Gemv(t)))
            })
            .collect();
        if tensor_cores {
            runs.extend([16usize, 32].map(|m| (m, Kernel::Gemm(GemmTiling::for_shape(rows, m)))));
        }
        if args.mma_only {
            runs.clear();
        }
        if mma::supported::<R, F>(&client) {
            runs.extend(
                [1usize, 4, 8, 16, 32]
                    .map(|m| (m, Kernel::Mma(MmaTiling::for_shape(rows, cols, m)))),
            );
            if args.mma_sweep {
                for m in [1usize, 8, 16] {
                    for split in [2, 4, 8] {
                        for unroll in [1, 2] {
                            for (copies, cubes_per_sm) in
                                [(1, 0), (32, 0), (1, 4), (32, 2), (32, 4), (32, 6)]
                            {
                                let t = MmaTiling {
                                    split,
                                    unroll,
                                    copies,
                                    cubes_per_sm,
                                };
                                if t != MmaTiling::for_shape(rows, cols, m) {
                                    runs.push((m, Kernel::Mma(t)));
                                }
                            }
                        }
                    }
                }
            }
        }
        for (batch, kernel) in runs {
            let x = Buffer::<F>::from_slice(&client, &vec![F::from_int(1); batch * cols]);
            let y = Buffer::<F>::empty(&client, batch * rows);
            let launch = || -> Result<()> {
                match kernel {
                    Kernel::Gemv(t) => nf4::gemv_tiled(&client, &x, batch, &matrix, &y, t)?,
                    Kernel::Gemm(t) => gemm::gemm_nf4_tiled(&client, &x, batch, &matrix, &y, t)?,
                    Kernel::Mma(t) => mma::gemv_mma_tiled(&client, &x, batch, &matrix, &y, t)?,
                }
                Ok(())
            };
            let previous_s = match kernel {
                // The default tiling against the previous default (`nf4::gemv` picks it).
                Kernel::Gemv(t)
                    if args.compare_gemv && t == GemvTiling::for_shape(rows, cols, batch) =>
                {
                    nf4::set_previous_gemv(true);
                    let timed = probe.time(&client, args.launches, || -> Result<()> {
                        nf4::gemv(&client, &x, batch, &matrix, &y)?;
                        Ok(())
                    });
                    nf4::set_previous_gemv(false);
                    Some(timed?.0)
                }
                _ => None,
            };
            let (kernel_s, launch_s) = probe.time(&client, args.launches, launch)?;
            let bytes = matrix.weight_bytes() + batch * (rows + cols) * size_of::<F>();
            let gb_per_s = bytes as f64 / kernel_s / 1e9;
            let (tiling, default_tiling) = match kernel {
                Kernel::Gemv(t) => (gemv_label(t), t == GemvTiling::for_shape(rows, cols, batch)),
                Kernel::Gemm(t) => (
                    format!("gemm {}x{}/{}", t.m_frags, t.n_planes, t.k_chunks),
                    t == GemmTiling::for_shape(rows, batch),
                ),
                Kernel::Mma(t) => (
                    format!(
                        "mma {}/{}/{}/{}",
                        t.split, t.unroll, t.copies, t.cubes_per_sm
                    ),
                    t == MmaTiling::for_shape(rows, cols, batch),
                ),
            };
            let case = Case {
                name,
                rows,
                cols,
                batch,
                tiling,
                default_tiling,
                weight_mb: matrix.weight_bytes() as f64 / 1e6,
                kernel_us: kernel_s * 1e6,
                gb_per_s,
                fraction_of_copy: gb_per_s / copy_gb_per_s,
                launch_us: launch_s * 1e6,
                previous_kernel_us: previous_s.map(|s| s * 1e6),
            };
            if let Some(previous) = case.previous_kernel_us {
                println!(
                    "| {name} | {rows}x{cols} | {batch} | {} (previous default) | {:.1} | {previous:.1} | {:.0} | {:.0}% | - |",
                    gemv_label(GemvTiling::previous_for_shape(rows, batch)),
                    case.weight_mb,
                    bytes as f64 / previous / 1e3,
                    100.0 * bytes as f64 / previous / 1e3 / copy_gb_per_s,
                );
            }
            println!(
                "| {name} | {rows}x{cols} | {batch} | {}{} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.1} |",
                case.tiling,
                if case.default_tiling {
                    " (default)"
                } else {
                    ""
                },
                case.weight_mb,
                case.kernel_us,
                case.gb_per_s,
                100.0 * case.fraction_of_copy,
                case.launch_us
            );
            cases.push(case);
        }
    }

    let report = Report {
        card: args.run.card.clone(),
        runtime,
        activations,
        git_commit: args.run.commit.clone(),
        copy_gb_per_s,
        cases,
        #[cfg(feature = "cuda")]
        prefill: Vec::new(),
    };
    args.run.write_report(&report)
}

/// Which NF4 product a case measures.
#[derive(Clone, Copy)]
enum Kernel {
    Gemv(GemvTiling),
    Gemm(GemmTiling),
    Mma(MmaTiling),
}

impl RunInfo {
    /// Writes `report` as JSON to `--out`, when given.
    /// Writes `report` to `--out` (when given) with an `environment` object added: the card, compute capability,
    /// driver and CUDA version (NVML, where there is an NVIDIA driver), the versions of medvl, burn and CubeCL.
    pub(crate) fn write_report(&self, report: &impl Serialize) -> Result<()> {
        if let Some(out) = &self.out {
            let mut value = serde_json::to_value(report)?;
            if let Some(fields) = value.as_object_mut() {
                fields.insert(
                    "environment".into(),
                    serde_json::to_value(Environment::probe())?,
                );
            }
            write_atomic(out, &serde_json::to_vec_pretty(&value)?)?;
            println!("wrote {}", out.display());
        }
        Ok(())
    }
}

/// What a benchmark ran on and with.
#[derive(Serialize)]
struct Environment {
    medvl: &'static str,
    burn: &'static str,
    cubecl: &'static str,
    /// `None` without an NVIDIA driver (or without the `cuda` feature).
    #[cfg(feature = "cuda")]
    gpu: Option<driver::Gpu>,
}

impl Environment {
    fn probe() -> Self {
        Self {
            medvl: env!("CARGO_PKG_VERSION"),
            burn: env!("MEDVL_BURN_VERSION"),
            cubecl: env!("MEDVL_CUBECL_VERSION"),
            #[cfg(feature = "cuda")]
            gpu: driver::Gpu::probe(0)
                .inspect_err(|e| eprintln!("no GPU figures for the report: {e:#}"))
                .ok(),
        }
    }
}

/// Writes through a temporary file in the same directory and renames it over `path`.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

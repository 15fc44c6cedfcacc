//! `medvl-bench report`: `docs/BENCHMARK_REPORT.md` and its SVG charts, regenerated from the JSON reports the
//! benchmarks write (`medvl-bench page` / `decode` and the Python baselines of `benches/python/`).
//!
//! Each input file is recognised by its content: a page report has `image_tokens` in its cases, a decode report
//! `batch`; a report with a `stack` field is the Python stack's. medvl's rows are put next to the Python rows of
//! the same format and size, and a ratio is given only when both ran on the same card.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde::Deserialize;

/// Arguments of `medvl-bench report`.
#[derive(clap::Args)]
pub(crate) struct ReportArgs {
    /// Benchmark reports (JSON) to put in the report: medvl's page and decode reports and the Python
    /// baselines', in any order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The Markdown report; the charts go to a folder named after it beside it (`BENCHMARK_REPORT/`).
    #[arg(long, default_value = "docs/BENCHMARK_REPORT.md")]
    out: PathBuf,
}

/// Average, minimum and maximum over the timed runs.
#[derive(Deserialize, Clone, Copy)]
struct Stat {
    avg: f64,
    min: f64,
    max: f64,
}

/// What a report was measured with (reports written since 2026-11-28 have it).
#[derive(Deserialize, Default)]
struct Environment {
    medvl: Option<String>,
    burn: Option<String>,
    cubecl: Option<String>,
    gpu: Option<Gpu>,
}

#[derive(Deserialize)]
struct Gpu {
    compute_capability: Option<String>,
    driver: Option<String>,
    /// medvl: the CUDA version the driver supports; Python: the one torch was built with.
    cuda: Option<String>,
}

#[derive(Deserialize)]
struct PageReport {
    card: String,
    #[serde(default)]
    environment: Environment,
    /// Python only: its software stack.
    stack: Option<String>,
    git_commit: Option<String>,
    new_tokens: usize,
    cases: Vec<PageCase>,
}

#[derive(Deserialize)]
struct PageCase {
    format: String,
    image_tokens: usize,
    load_s: f64,
    /// medvl: the model's device memory, and the decode plan's own on top.
    model_mb: Option<f64>,
    plan_weights_mb: Option<f64>,
    /// Python: the model's weights, and the allocator's peak.
    weights_mb: Option<f64>,
    peak_mb: Option<f64>,
    /// Both stacks: device memory the driver reports after loading, and its peak, MB above the process's start.
    driver_loaded_mb: Option<f64>,
    driver_peak_mb: Option<f64>,
    vision_s: Option<f64>,
    llm_prefill_s: Option<f64>,
    total_s: Stat,
    time_to_first_token_s: Stat,
    decode_tokens_per_s: Stat,
    /// medvl: requests run together through the engine.
    #[serde(default)]
    concurrent: Vec<ConcurrentCase>,
}

#[derive(Deserialize)]
struct ConcurrentCase {
    requests: usize,
    wall_s: f64,
    tokens_per_s: f64,
    latency_s: Stat,
    time_to_first_token_s: Stat,
    decode_tokens_per_s: Stat,
    driver_peak_mb: Option<f64>,
}

/// The Python stack's format a medvl format is compared with: its own, or for `nf4-all` (every weight NF4, which
/// transformers + bitsandbytes do not offer) the closest one, `nf4`.
fn baseline_format(format: &str) -> &str {
    match format {
        "nf4-all" => "nf4",
        other => other,
    }
}

#[derive(Deserialize)]
struct DecodeReport {
    card: String,
    #[serde(default)]
    environment: Environment,
    stack: Option<String>,
    git_commit: Option<String>,
    /// Python: the format of every case.
    weights: Option<String>,
    copy_gb_per_s: Option<f64>,
    cases: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct DecodeCase {
    /// medvl: the format of this case.
    format: Option<String>,
    batch: usize,
    context: usize,
    tokens_per_s: f64,
    host_ms: Option<f64>,
}

enum Input {
    Page(PageReport),
    Decode(DecodeReport),
}

fn read(path: &Path) -> Result<Input> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let first = value.get("cases").and_then(|c| c.get(0));
    let parse = |what| format!("{}: not a {what} report", path.display());
    match first {
        Some(case) if case.get("image_tokens").is_some() => Ok(Input::Page(
            serde_json::from_value(value).with_context(|| parse("page"))?,
        )),
        Some(case) if case.get("batch").is_some() => Ok(Input::Decode(
            serde_json::from_value(value).with_context(|| parse("decode"))?,
        )),
        _ => bail!(
            "{}: neither a page nor a decode report (no cases with `image_tokens` or `batch`)",
            path.display()
        ),
    }
}

/// Which stack a report is from.
fn stack_name(stack: &Option<String>) -> &'static str {
    if stack.is_some() {
        "transformers"
    } else {
        "medvl"
    }
}

/// One row of the page table.
struct PageRow<'a> {
    file: usize,
    report: &'a PageReport,
    case: &'a PageCase,
}

impl PageRow<'_> {
    fn python(&self) -> bool {
        self.report.stack.is_some()
    }

    /// Weights on the device (medvl: the model and the plan's own buffers).
    fn weights_mb(&self) -> Option<f64> {
        match (self.case.model_mb, self.case.plan_weights_mb) {
            (Some(model), plan) => Some(model + plan.unwrap_or(0.0)),
            (None, _) => self.case.weights_mb,
        }
    }
}

/// The report's Markdown and charts.
pub(crate) fn run(args: ReportArgs) -> Result<()> {
    let inputs = args
        .inputs
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>>>()?;
    let charts = args.out.with_extension("");
    let chart_dir_name = charts
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "charts".into());
    std::fs::create_dir_all(&charts).with_context(|| format!("create {}", charts.display()))?;

    let mut md = String::new();
    writeln!(
        md,
        "# Benchmark report\n\nGenerated by `medvl-bench report` from the JSON reports below; do not edit by hand \
         (`just bench` measures and regenerates it). Qwen2.5-VL-7B with random weights at the real shapes \
         (`--random-weights`): the times do not depend on the values, and every run generates its full token \
         count (end of sequence ignored). medvl and the Python stack (transformers + bitsandbytes) are compared \
         only where they ran on the same card.\n"
    )?;
    environment(&mut md, &args.inputs, &inputs)?;

    let pages: Vec<PageRow> = inputs
        .iter()
        .enumerate()
        .filter_map(|(file, input)| match input {
            Input::Page(report) => Some((file, report)),
            Input::Decode(_) => None,
        })
        .flat_map(|(file, report)| {
            report
                .cases
                .iter()
                .map(move |case| PageRow { file, report, case })
        })
        .collect();
    if !pages.is_empty() {
        page_section(&mut md, &pages, &charts, &chart_dir_name)?;
    }
    let decodes: Vec<(usize, &DecodeReport)> = inputs
        .iter()
        .enumerate()
        .filter_map(|(file, input)| match input {
            Input::Decode(report) => Some((file, report)),
            Input::Page(_) => None,
        })
        .collect();
    if !decodes.is_empty() {
        decode_section(&mut md, &decodes, &charts, &chart_dir_name)?;
    }
    crate::write_atomic(&args.out, md.as_bytes())?;
    println!(
        "wrote {} and its charts in {}",
        args.out.display(),
        charts.display()
    );
    Ok(())
}

fn environment(md: &mut String, paths: &[PathBuf], inputs: &[Input]) -> Result<()> {
    writeln!(
        md,
        "## Environment\n\nCompute capability, driver and CUDA as recorded by the run (CUDA: the version the driver \
         supports for medvl, the one torch was built with for transformers; `-` in reports written before these were \
         recorded).\n\n| # | report | kind | stack | card | compute capability | driver | CUDA | commit |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    for (i, (path, input)) in paths.iter().zip(inputs).enumerate() {
        let (kind, card, stack, commit, env) = match input {
            Input::Page(r) => ("page", &r.card, &r.stack, &r.git_commit, &r.environment),
            Input::Decode(r) => ("decode", &r.card, &r.stack, &r.git_commit, &r.environment),
        };
        let stack = match (stack, &env.medvl) {
            (Some(python), _) => python.clone(),
            (None, Some(medvl)) => format!(
                "medvl {medvl} (burn {}, cubecl {})",
                env.burn.as_deref().unwrap_or("?"),
                env.cubecl.as_deref().unwrap_or("?")
            ),
            (None, None) => "medvl".into(),
        };
        let gpu = |field: fn(&Gpu) -> &Option<String>| {
            env.gpu
                .as_ref()
                .and_then(|g| field(g).clone())
                .unwrap_or_else(|| "-".into())
        };
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        writeln!(
            md,
            "| {} | `{file}` | {kind} | {stack} | {card} | {} | {} | {} | {} |",
            i + 1,
            gpu(|g| &g.compute_capability),
            gpu(|g| &g.driver),
            gpu(|g| &g.cuda),
            commit.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn page_section(md: &mut String, rows: &[PageRow], charts: &Path, dir: &str) -> Result<()> {
    let new_tokens: BTreeSet<usize> = rows.iter().map(|r| r.report.new_tokens).collect();
    let tokens = new_tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" / ");
    writeln!(
        md,
        "## A page end to end\n\nOne page image and the extraction prompt, then {tokens} generated tokens. \
         Weights MB: medvl the model plus the decode plan's own buffers, transformers the model's weights. Peak: \
         the allocator's (transformers). Driver MB: device memory in use as the driver reports it (`nvidia-smi`; \
         CUDA context and allocator pools included) after loading and at the peak of the runs, above what was in \
         use before the process started. Times in seconds; end to end is avg (min-max) over the timed runs after a \
         warm-up. Speed-up: transformers' end-to-end time over medvl's, same card and format (`nf4-all`, every \
         weight NF4, against transformers' `nf4`), against the Python report nearest in the list below (reports of one \
         command are listed together). #: the report a row comes from (Environment above); rows of different \
         reports come from different commands.\n"
    )?;
    writeln!(
        md,
        "| weights | image tokens | stack | # | load s | weights MB | peak MB | driver MB loaded / peak | vision s | LLM prefill s | first token s | decode tokens/s | page + {tokens} tokens s | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut keys: Vec<(String, usize)> = rows
        .iter()
        .map(|r| (r.case.format.clone(), r.case.image_tokens))
        .collect();
    keys.sort();
    keys.dedup();
    let mut bars = Vec::new();
    for (format, image_tokens) in &keys {
        let same: Vec<&PageRow> = rows
            .iter()
            .filter(|r| &r.case.format == format && r.case.image_tokens == *image_tokens)
            .collect();
        for row in &same {
            let c = row.case;
            let speedup = if row.python() {
                String::new()
            } else {
                let baseline = baseline_format(format);
                // The Python report nearest in the input order: the one from the same command when each
                // command's reports are listed together.
                rows.iter()
                    .filter(|p| {
                        p.python()
                            && p.report.card == row.report.card
                            && p.case.format == baseline
                            && p.case.image_tokens == *image_tokens
                    })
                    .min_by_key(|p| p.file.abs_diff(row.file))
                    .map(|p| {
                        let ratio = p.case.total_s.avg / c.total_s.avg;
                        if baseline == format {
                            format!("{ratio:.1}x")
                        } else {
                            format!("{ratio:.1}x (vs {baseline})")
                        }
                    })
                    .unwrap_or_default()
            };
            let driver = match (c.driver_loaded_mb, c.driver_peak_mb) {
                (None, None) => "-".to_string(),
                (loaded, peak) => format!("{} / {}", opt(loaded, 0), opt(peak, 0)),
            };
            writeln!(
                md,
                "| {format} | {image_tokens} | {} | {} | {:.1} | {} | {} | {driver} | {} | {} | {:.3} | {:.1} | {:.3} ({:.3}-{:.3}) | {speedup} |",
                stack_name(&row.report.stack),
                row.file + 1,
                c.load_s,
                opt(row.weights_mb(), 0),
                opt(c.peak_mb, 0),
                opt(c.vision_s, 3),
                opt(c.llm_prefill_s, 3),
                c.time_to_first_token_s.avg,
                c.decode_tokens_per_s.avg,
                c.total_s.avg,
                c.total_s.min,
                c.total_s.max,
            )?;
            bars.push(Bar {
                label: format!("{format} {image_tokens}"),
                python: row.python(),
                value: c.total_s,
            });
        }
    }
    let memory: Vec<Bar> = keys
        .iter()
        .flat_map(|(format, image_tokens)| {
            rows.iter()
                .filter(move |r| &r.case.format == format && r.case.image_tokens == *image_tokens)
        })
        .filter_map(|r| {
            r.weights_mb().map(|mb| Bar {
                label: format!("{} {}", r.case.format, r.case.image_tokens),
                python: r.python(),
                value: Stat {
                    avg: mb,
                    min: mb,
                    max: mb,
                },
            })
        })
        .collect();
    bar_chart(
        &charts.join("page.svg"),
        &format!("A page + {tokens} tokens, end to end, s (blue medvl, orange transformers: py)"),
        &bars,
    )?;
    bar_chart(
        &charts.join("memory.svg"),
        "Weights on the GPU, MB (blue medvl, orange transformers: py)",
        &memory,
    )?;
    writeln!(
        md,
        "\n![page end to end]({dir}/page.svg)\n\n![weights memory]({dir}/memory.svg)\n"
    )?;
    concurrent_section(md, rows, charts, dir)
}

/// Pages requested at once through the engine's continuous batching (medvl only).
fn concurrent_section(md: &mut String, rows: &[PageRow], charts: &Path, dir: &str) -> Result<()> {
    let rows: Vec<&PageRow> = rows
        .iter()
        .filter(|r| !r.case.concurrent.is_empty())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "### Pages at once\n\nThe same page requested N times at once through medvl's engine \
         (`Engine::generate_batch`: continuous batching, each request prefilled when a decode slot is free, the \
         decode steps shared), after a warm-up batch of the same size. Tokens/s: all requests' generated tokens over \
         the wall time. Latency and first token: per request from the call, avg (min-max). Decode tokens/s: per \
         request from its admission to its end. Driver peak: MB above the process's start.\n\n\
         | weights | image tokens | # | requests | wall s | tokens/s | latency s | first token s | decode tokens/s per request | driver peak MB |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut series = Vec::new();
    for row in rows {
        let c = row.case;
        let mut points = Vec::new();
        for run in &c.concurrent {
            writeln!(
                md,
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.1} | {} |",
                c.format,
                c.image_tokens,
                row.file + 1,
                run.requests,
                run.wall_s,
                run.tokens_per_s,
                run.latency_s.avg,
                run.latency_s.min,
                run.latency_s.max,
                run.time_to_first_token_s.avg,
                run.decode_tokens_per_s.avg,
                opt(run.driver_peak_mb, 0),
            )?;
            points.push((run.requests as f64, run.tokens_per_s));
        }
        series.push((
            format!("{} {} (#{})", c.format, c.image_tokens, row.file + 1),
            points,
        ));
    }
    line_chart(
        &charts.join("concurrent.svg"),
        "Pages at once: generated tokens/s against requests",
        "requests at once",
        &series,
    )?;
    writeln!(md, "\n![pages at once]({dir}/concurrent.svg)\n")?;
    Ok(())
}

fn decode_section(
    md: &mut String,
    reports: &[(usize, &DecodeReport)],
    charts: &Path,
    dir: &str,
) -> Result<()> {
    writeln!(
        md,
        "## Decode\n\nThe decoder's token step with a cache of the given length per sequence: tokens/s summed over \
         the batch. medvl runs its decode plan (`medvl-bench decode`); transformers its `generate` loop. Host ms: \
         the host's time per step (medvl). Ratio: medvl over transformers, same card and format.\n"
    )?;
    writeln!(
        md,
        "| weights | batch | context | stack | # | tokens/s | host ms/step | ratio |\n|---|---|---|---|---|---|---|---|"
    )?;
    // (format, batch, context, stack, file, card, tokens/s, host ms)
    type Row<'a> = (String, usize, usize, bool, usize, &'a str, f64, Option<f64>);
    let mut rows: Vec<Row> = Vec::new();
    for &(file, report) in reports {
        for case in &report.cases {
            let Some(format) = case.format.clone().or_else(|| report.weights.clone()) else {
                bail!("decode report #{}: a case without a format", file + 1);
            };
            // transformers' bf16 is medvl's dense format.
            let format = if format == "bf16" {
                "dense".to_string()
            } else {
                format
            };
            rows.push((
                format,
                case.batch,
                case.context,
                report.stack.is_some(),
                file,
                &report.card,
                case.tokens_per_s,
                case.host_ms,
            ));
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1, a.2, a.3, a.4).cmp(&(&b.0, b.1, b.2, b.3, b.4)));
    for row in &rows {
        let ratio = if row.3 {
            String::new()
        } else {
            rows.iter()
                .find(|p| p.3 && p.0 == row.0 && p.1 == row.1 && p.5 == row.5)
                .map(|p| format!("{:.1}x", row.6 / p.6))
                .unwrap_or_default()
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {ratio} |",
            row.0,
            row.1,
            row.2,
            if row.3 { "transformers" } else { "medvl" },
            row.4 + 1,
            row.6,
            opt(row.7, 2),
        )?;
    }
    let copies: Vec<String> = reports
        .iter()
        .filter_map(|(file, r)| {
            r.copy_gb_per_s
                .map(|c| format!("#{}: {c:.0} GB/s", file + 1))
        })
        .collect();
    if !copies.is_empty() {
        writeln!(
            md,
            "\nThe card's copy bandwidth measured in the same run: {}.",
            copies.join(", ")
        )?;
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for row in &rows {
        // One line per stack, format and report (#): reports of other runs are not joined.
        let name = format!(
            "{} {} (#{})",
            if row.3 { "transformers" } else { "medvl" },
            row.0,
            row.4 + 1
        );
        let point = (row.1 as f64, row.6);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push(point),
            None => series.push((name, vec![point])),
        }
    }
    line_chart(
        &charts.join("decode.svg"),
        "Decode tokens/s by batch size (higher is better)",
        "batch (sequences decoded together)",
        &series,
    )?;
    writeln!(md, "\n![decode tokens/s]({dir}/decode.svg)\n")?;
    Ok(())
}

/// One bar: its group's label, whose it is, and its value (with the range drawn as a whisker).
struct Bar {
    label: String,
    python: bool,
    value: Stat,
}

const MEDVL: RGBColor = RGBColor(31, 119, 180);
const PYTHON: RGBColor = RGBColor(255, 127, 14);

fn chart_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("chart {}: {e:?}", path.display())
}

/// Bars side by side in the order given, medvl blue and transformers orange, each labelled under the axis.
fn bar_chart(path: &Path, title: &str, bars: &[Bar]) -> Result<()> {
    let err = chart_err(path);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let top = bars.iter().map(|b| b.value.max).fold(0.0, f64::max) * 1.15;
        let labels: Vec<String> = bars
            .iter()
            .map(|b| format!("{} {}", b.label, if b.python { "(py)" } else { "" }))
            .collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..top.max(1e-9))
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let color = if b.python { PYTHON } else { MEDVL };
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), b.value.avg),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(&err)?;
        chart
            .draw_series(
                bars.iter()
                    .enumerate()
                    .filter(|(_, b)| b.value.max > b.value.min)
                    .map(|(i, b)| {
                        PathElement::new(
                            vec![
                                (SegmentValue::CenterOf(i), b.value.min),
                                (SegmentValue::CenterOf(i), b.value.max),
                            ],
                            BLACK.stroke_width(2),
                        )
                    }),
            )
            .map_err(&err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                EmptyElement::at((SegmentValue::CenterOf(i), b.value.max))
                    + Text::new(
                        format!("{:.*}", if b.value.avg < 10.0 { 2 } else { 0 }, b.value.avg),
                        (-12, -18),
                        ("sans-serif", 13).into_font(),
                    )
            }))
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    crate::write_atomic(path, svg.as_bytes())
}

/// Lines over log-scaled axes, one per series, with a legend.
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = chart_err(path);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        // x: log2 of the batch on a linear axis, so that the labels fall on the batch sizes.
        let points = series.iter().flat_map(|(_, p)| p.iter());
        let (x_max, y_min, y_max) = points.fold((1.0f64, f64::MAX, 1.0f64), |(x, lo, hi), p| {
            (x.max(p.0), lo.min(p.1), hi.max(p.1))
        });
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                -0.3..x_max.log2() + 0.3,
                ((y_min * 0.7).max(0.1)..y_max * 1.5).log_scale(),
            )
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(x_max.log2().ceil() as usize + 1)
            .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc(x_desc)
            .y_desc("tokens/s")
            .draw()
            .map_err(&err)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let dashed = name.starts_with("transformers");
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|&(x, y)| (x.log2(), y)),
                    color.stroke_width(if dashed { 1 } else { 3 }),
                ))
                .map_err(&err)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Circle::new((x.log2(), y), 4, color.filled())),
                )
                .map_err(&err)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    crate::write_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PAGE: &str = r#"{"card": "H100", "device": "cuda bf16", "git_commit": "abc", "model": "m", "new_tokens": 256,
      "environment": {"medvl": "0.1.0", "burn": "0.21.0", "cubecl": "0.10.0", "gpu": {"name": "H100",
      "compute_capability": "9.0", "driver": "580.159", "cuda": "13.0", "memory_mb": 85000.0}},
      "cases": [{"format": "nf4", "decode": "plan", "image_tokens": 2772, "load_s": 90.0, "model_mb": 5000.0,
      "plan_weights_mb": 100.0, "in_use_mb": 1.0, "reserved_mb": 2.0, "vision_s": 0.8, "llm_prefill_s": 0.4,
      "driver_loaded_mb": 5400.0, "driver_peak_mb": 7000.0,
      "total_s": {"avg": 2.0, "min": 1.5, "max": 2.5}, "time_to_first_token_s": {"avg": 1.0, "min": 1.0, "max": 1.0},
      "decode_tokens_per_s": {"avg": 250.0, "min": 240.0, "max": 260.0}, "runs": []},
      {"format": "nf4-all", "decode": "plan", "image_tokens": 2772, "load_s": 80.0, "model_mb": 4000.0,
      "plan_weights_mb": 100.0, "vision_s": 0.8, "llm_prefill_s": 0.4,
      "total_s": {"avg": 1.6, "min": 1.5, "max": 1.7}, "time_to_first_token_s": {"avg": 1.0, "min": 1.0, "max": 1.0},
      "decode_tokens_per_s": {"avg": 260.0, "min": 250.0, "max": 270.0}, "runs": [],
      "concurrent": [{"requests": 1, "wall_s": 1.6, "new_tokens": 256, "tokens_per_s": 160.0,
        "latency_s": {"avg": 1.6, "min": 1.6, "max": 1.6}, "time_to_first_token_s": {"avg": 1.0, "min": 1.0, "max": 1.0},
        "decode_tokens_per_s": {"avg": 260.0, "min": 260.0, "max": 260.0}, "driver_peak_mb": 6000.0},
        {"requests": 8, "wall_s": 6.4, "new_tokens": 2048, "tokens_per_s": 320.0,
        "latency_s": {"avg": 5.0, "min": 3.0, "max": 6.4}, "time_to_first_token_s": {"avg": 2.5, "min": 1.0, "max": 4.0},
        "decode_tokens_per_s": {"avg": 90.0, "min": 80.0, "max": 100.0}}]}]}"#;
    const PY_PAGE: &str = r#"{"card": "H100", "stack": "transformers", "new_tokens": 256,
      "cases": [{"format": "nf4", "image_tokens": 2772, "load_s": 50.0, "weights_mb": 5964.0, "peak_mb": 6656.0,
      "driver_loaded_mb": 6500.0, "driver_peak_mb": 7800.0, "total_s": {"avg": 24.0, "min": 24.0, "max": 24.0}, "time_to_first_token_s": {"avg": 0.5, "min": 0.5, "max": 0.5},
      "decode_tokens_per_s": {"avg": 11.0, "min": 11.0, "max": 11.0}, "runs": []}]}"#;
    const DECODE: &str = r#"{"card": "H100", "runtime": "cuda", "activations": "bf16", "git_commit": "abc",
      "copy_gb_per_s": 2800.0, "cases": [
      {"format": "dense", "batch": 1, "context": 1300, "tokens_per_s": 150.0, "host_ms": 2.0, "weights_mb": 1.0},
      {"format": "dense", "batch": 8, "context": 1300, "tokens_per_s": 700.0, "host_ms": 2.5, "weights_mb": 1.0}]}"#;
    const PY_DECODE: &str = r#"{"card": "H100", "stack": "transformers", "weights": "bf16", "weights_mb": 16584.0,
      "cases": [{"batch": 1, "context": 1300, "tokens": 64, "step_ms": 97.0, "tokens_per_s": 10.0, "peak_mb": 1.0}]}"#;

    fn write_inputs(dir: &Path, files: &[(&str, &str)]) -> Vec<PathBuf> {
        files
            .iter()
            .map(|(name, text)| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn report_pairs_medvl_with_python_on_the_same_card() {
        let dir = std::env::temp_dir().join(format!("medvl-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inputs = write_inputs(
            &dir,
            &[
                ("page.json", PAGE),
                ("py.json", PY_PAGE),
                ("decode.json", DECODE),
                ("pyd.json", PY_DECODE),
                (
                    "page2.json",
                    &PAGE.replace("\"avg\": 2.0,", "\"avg\": 3.0,"),
                ),
                (
                    "py2.json",
                    &PY_PAGE.replace("\"avg\": 24.0,", "\"avg\": 30.0,"),
                ),
            ],
        );
        let out = dir.join("REPORT.md");
        run(ReportArgs {
            inputs,
            out: out.clone(),
        })
        .unwrap();
        let md = std::fs::read_to_string(&out).unwrap();
        // 24 s against 2 s; the plan's memory counted with the model's.
        assert!(md.contains("| nf4 | 2772 | medvl | 1 | 90.0 | 5100 | - | 5400 / 7000 | 0.800 | 0.400 | 1.000 | 250.0 | 2.000 (1.500-2.500) | 12.0x |"), "{md}");
        assert!(
            md.contains("| nf4 | 2772 | transformers | 2 | 50.0 | 5964 | 6656 | 6500 / 7800 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | `page.json` | page | medvl 0.1.0 (burn 0.21.0, cubecl 0.10.0) | H100 | 9.0 | 580.159 | 13.0 | abc |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | `py.json` | page | transformers | H100 | - | - | - | - |"),
            "{md}"
        );
        // A later command's pair: 30 s against 3 s (the first Python report would give 8x).
        assert!(md.contains("| nf4 | 2772 | medvl | 5 |"), "{md}");
        assert!(md.contains("| 3.000 (1.500-2.500) | 10.0x |"), "{md}");
        // Every weight NF4 against transformers' nf4: 24 s against 1.6 s.
        assert!(md.contains("| nf4-all | 2772 | medvl | 1 | 80.0 | 4100 | - | - | 0.800 | 0.400 | 1.000 | 260.0 | 1.600 (1.500-1.700) | 15.0x (vs nf4) |"), "{md}");
        // Requests at once.
        assert!(
            md.contains(
                "| nf4-all | 2772 | 1 | 8 | 6.40 | 320.0 | 5.00 (3.00-6.40) | 2.50 | 90.0 | - |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| nf4-all | 2772 | 1 | 1 | 1.60 | 160.0 | 1.60 (1.60-1.60) | 1.00 | 260.0 | 6000 |"
            ),
            "{md}"
        );
        // 150 tokens/s against transformers' bf16 10: 15x; batch 8 has no Python row.
        assert!(
            md.contains("| dense | 1 | 1300 | medvl | 3 | 150.0 | 2.00 | 15.0x |"),
            "{md}"
        );
        assert!(
            md.contains("| dense | 8 | 1300 | medvl | 3 | 700.0 | 2.50 |  |"),
            "{md}"
        );
        for chart in ["page.svg", "memory.svg", "decode.svg", "concurrent.svg"] {
            let svg = std::fs::read_to_string(dir.join("REPORT").join(chart)).unwrap();
            assert!(svg.starts_with("<svg"), "{chart}");
            assert!(md.contains(&format!("(REPORT/{chart})")), "{chart}");
        }
        // Labels of the bar chart name the cases.
        let page = std::fs::read_to_string(dir.join("REPORT/page.svg")).unwrap();
        assert!(page.contains("nf4 2772"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn report_refuses_what_it_cannot_read() {
        let dir = std::env::temp_dir().join(format!("medvl-report-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inputs = write_inputs(
            &dir,
            &[("k.json", r#"{"card": "H100", "cases": [{"name": "q"}]}"#)],
        );
        let err = run(ReportArgs {
            inputs,
            out: dir.join("R.md"),
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("k.json: neither a page nor a decode report"),
            "{err}"
        );
        let inputs = write_inputs(
            &dir,
            &[(
                "p.json",
                r#"{"card": "H100", "cases": [{"image_tokens": 1}]}"#,
            )],
        );
        let err = run(ReportArgs {
            inputs,
            out: dir.join("R.md"),
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("p.json: not a page report"),
            "{err}"
        );
        assert!(!dir.join("R.md").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_different_card_gets_no_ratio() {
        let dir = std::env::temp_dir().join(format!("medvl-report-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let other = PY_PAGE.replace("\"H100\"", "\"H200\"");
        let inputs = write_inputs(&dir, &[("page.json", PAGE), ("py.json", &other)]);
        run(ReportArgs {
            inputs,
            out: dir.join("R.md"),
        })
        .unwrap();
        let md = std::fs::read_to_string(dir.join("R.md")).unwrap();
        assert!(md.contains("2.000 (1.500-2.500) |  |"), "{md}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! CPU micro-benchmarks of the request path before the model runs: a letter page through the image processor
//! (PNG decode, `smart_resize`, bicubic resize, normalise, patchify) at the hub's pixel limit and at the 1,280-token
//! limit, and the Qwen tokenizer over an extraction prompt. `cargo bench -p medvl-model --bench cpu`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::io::Read;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medvl_model::image::{ProcessorConfig, preprocess, preprocess_bytes};
use medvl_model::tokenizer::Tokenizer;

/// A white 1275x1650 page (US letter at 150 dpi) with dark word-sized marks on text lines, as PNG.
fn page() -> (image::RgbImage, Vec<u8>) {
    let (w, h) = (1275u32, 1650u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut state = 7u32;
    let mut next = |n: u32| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) % n
    };
    let mut y = 120;
    while y + 16 < h - 120 {
        let mut x = 100;
        while x + 80 < w - 100 {
            let word = 12 + next(60);
            for dy in 0..14 {
                for dx in 0..word {
                    img.put_pixel(x + dx, y + dy, image::Rgb([20, 20, 30]));
                }
            }
            x += word + 8 + next(8);
        }
        y += 22 + next(12);
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    (img, png)
}

fn prompt() -> String {
    let body = "Patient: Doe, Jane (MRN 00412). Diagnoses: Type 2 diabetes mellitus (E11.9), essential hypertension \
                (I10). Medications: metformin 500 mg PO BID; lisinopril 10 mg PO daily; atorvastatin 40 mg PO at \
                bedtime. Labs: glucose 142 mg/dL (70-99) H; HbA1c 7.9 % (4.0-5.6) H; potassium 4.1 mmol/L \
                (3.5-5.1). Vitals: BP 142/88 mmHg, HR 78 /min, SpO2 97 %. ";
    format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nExtract all medical \
         information from this document.\n{}<|im_end|>\n<|im_start|>assistant\n",
        body.repeat(8)
    )
}

fn image_processor(c: &mut Criterion) {
    let (rgb, png) = page();
    let mut group = c.benchmark_group("preprocess letter page");
    for (name, max_pixels) in [
        ("hub limit", 12_845_056u64),
        ("1280 tokens", 1280 * 28 * 28),
    ] {
        let config = ProcessorConfig {
            max_pixels,
            ..Default::default()
        };
        group.bench_function(format!("png, {name}"), |b| {
            b.iter(|| preprocess_bytes(black_box(&png), &config).unwrap())
        });
        group.bench_function(format!("decoded, {name}"), |b| {
            b.iter(|| preprocess(black_box(&rgb), &config).unwrap())
        });
    }
    group.finish();
}

fn tokenizer(c: &mut Criterion) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/qwen/tokenizer.json.gz"
    );
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    let tokenizer = Tokenizer::from_bytes(&json).unwrap();
    let text = prompt();
    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("extraction prompt", |b| {
        b.iter(|| tokenizer.encode(black_box(&text)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, image_processor, tokenizer);
criterion_main!(benches);

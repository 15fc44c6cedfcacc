//! Pages from layout blocks: a letter page at 150 dpi (1275 x 1650 px), text drawn with fonts embedded in the
//! binary (DejaVu Sans, Serif and Sans Mono; no system fonts), word wrap, ruled tables, field columns, checkboxes;
//! then optional scan artefacts (blur, speckle, JPEG). A style is drawn from the seed, so pages vary in font, size
//! and margins and are reproducible.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::{GrayImage, Luma};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::synth::Block;

const SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SERIF: &[u8] = include_bytes!("../assets/DejaVuSerif.ttf");
const MONO: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Page width and height in pixels (US letter at 150 dpi).
pub const PAGE: (u32, u32) = (1275, 1650);

/// A page as PNG bytes.
pub fn png(page: &GrayImage) -> image::ImageResult<Vec<u8>> {
    let mut bytes = Vec::new();
    page.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    Ok(bytes)
}

/// Writes a page as a PNG file, atomically ([`crate::write_atomic`]).
pub fn write_png(path: &std::path::Path, page: &GrayImage) -> crate::Result<()> {
    let bytes = png(page).map_err(|e| crate::DataError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    crate::write_atomic(path, &bytes)
}

/// Scan artefacts applied after drawing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Artefacts {
    /// Gaussian blur sigma in pixels (0: none).
    pub blur: f32,
    /// Fraction of pixels flipped to random grey (0: none).
    pub speckle: f32,
    /// JPEG quality to round-trip through (None: lossless).
    pub jpeg_quality: Option<u8>,
}

impl Artefacts {
    /// No artefacts: a clean digital page.
    pub const NONE: Self = Self {
        blur: 0.0,
        speckle: 0.0,
        jpeg_quality: None,
    };

    /// Mild scan artefacts drawn from `rng`: every page stays legible at the model's resolution.
    pub fn scanned(rng: &mut impl Rng) -> Self {
        Self {
            blur: rng.random_range(0.0..0.9),
            speckle: rng.random_range(0.0..0.004),
            jpeg_quality: Some(rng.random_range(60..92)),
        }
    }
}

/// How a page looks: font, sizes, margins.
struct Style {
    font: FontRef<'static>,
    body: f32,
    margin: u32,
}

impl Style {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let bytes = [SANS, SERIF, MONO][rng.random_range(0..3)];
        Self {
            font: FontRef::try_from_slice(bytes)
                .unwrap_or_else(|_| unreachable!("embedded fonts parse")),
            body: rng.random_range(19.0..25.0),
            margin: rng.random_range(70..130),
        }
    }
}

/// Draws `blocks` on pages (a new page when one is full); `seed` picks the style and artefacts.
pub fn render(blocks: &[Block], seed: u64, artefacts: Option<Artefacts>) -> Vec<GrayImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let style = Style::draw(&mut rng);
    let artefacts = artefacts.unwrap_or_else(|| Artefacts::scanned(&mut rng));
    let mut pen = Pen::new(&style);
    for block in blocks {
        pen.block(block);
    }
    pen.pages
        .into_iter()
        .map(|page| apply(page, artefacts, &mut rng))
        .collect()
}

/// Draws text onto a sequence of pages, top to bottom.
struct Pen<'a> {
    style: &'a Style,
    pages: Vec<GrayImage>,
    y: f32,
}

impl<'a> Pen<'a> {
    fn new(style: &'a Style) -> Self {
        Self {
            style,
            pages: vec![blank()],
            y: style.margin as f32,
        }
    }

    fn left(&self) -> f32 {
        self.style.margin as f32
    }

    fn right(&self) -> f32 {
        (PAGE.0 - self.style.margin) as f32
    }

    /// Room for `height` more pixels, or a new page.
    fn reserve(&mut self, height: f32) {
        if self.y + height > (PAGE.1 - self.style.margin) as f32 {
            self.pages.push(blank());
            self.y = self.style.margin as f32;
        }
    }

    fn width(&self, text: &str, size: f32) -> f32 {
        let font = self.style.font.as_scaled(PxScale::from(size));
        text.chars().map(|c| font.h_advance(font.glyph_id(c))).sum()
    }

    /// Draws one line of text with its top-left at (x, self.y).
    fn text(&mut self, x: f32, text: &str, size: f32) {
        let font = self.style.font.as_scaled(PxScale::from(size));
        let page = self
            .pages
            .last_mut()
            .unwrap_or_else(|| unreachable!("a page always exists"));
        let mut caret = x;
        let baseline = self.y + font.ascent();
        for c in text.chars() {
            let id = font.glyph_id(c);
            let glyph = id.with_scale_and_position(size, point(caret, baseline));
            caret += font.h_advance(id);
            if let Some(outline) = self.style.font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let (px, py) = (
                        bounds.min.x as i64 + gx as i64,
                        bounds.min.y as i64 + gy as i64,
                    );
                    if px >= 0 && py >= 0 && (px as u32) < PAGE.0 && (py as u32) < PAGE.1 {
                        let pixel = page.get_pixel_mut(px as u32, py as u32);
                        let ink = (255.0 * (1.0 - coverage.min(1.0))) as u8;
                        pixel.0[0] = pixel.0[0].min(ink);
                    }
                });
            }
        }
    }

    fn line_height(&self, size: f32) -> f32 {
        size * 1.35
    }

    /// Word-wrapped text from `x` to the right margin.
    fn wrapped(&mut self, x: f32, text: &str, size: f32) {
        let mut line = String::new();
        for word in text.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_string()
            } else {
                format!("{line} {word}")
            };
            if !line.is_empty() && x + self.width(&candidate, size) > self.right() {
                self.reserve(self.line_height(size));
                self.text(x, &line, size);
                self.y += self.line_height(size);
                line = word.to_string();
            } else {
                line = candidate;
            }
        }
        if !line.is_empty() {
            self.reserve(self.line_height(size));
            self.text(x, &line, size);
            self.y += self.line_height(size);
        }
    }

    fn rule(&mut self, x0: f32, x1: f32, y: f32) {
        let page = self
            .pages
            .last_mut()
            .unwrap_or_else(|| unreachable!("a page always exists"));
        for x in x0.max(0.0) as u32..(x1 as u32).min(PAGE.0) {
            page.put_pixel(x, (y as u32).min(PAGE.1 - 1), Luma([40]));
        }
    }

    fn block(&mut self, block: &Block) {
        let body = self.style.body;
        match block {
            Block::Title(t) => {
                let size = body * 1.45;
                self.reserve(self.line_height(size) * 2.0);
                let x = ((PAGE.0 as f32 - self.width(t, size)) / 2.0).max(self.left());
                self.text(x, t, size);
                self.y += self.line_height(size);
                let (l, r, y) = (self.left(), self.right(), self.y);
                self.rule(l, r, y);
                self.y += body;
            }
            Block::Heading(t) => {
                let size = body * 1.1;
                self.y += body * 0.5;
                self.reserve(self.line_height(size) * 2.0);
                let x = self.left();
                self.text(x, t, size);
                self.y += self.line_height(size);
            }
            Block::Paragraph(t) => {
                let x = self.left();
                self.wrapped(x, t, body);
                self.y += body * 0.3;
            }
            Block::Fields(fields) => {
                // Two columns when the fields are short, one otherwise.
                let column = (self.right() - self.left()) / 2.0;
                let two = fields
                    .iter()
                    .all(|(k, v)| self.width(&format!("{k}: {v}"), body) < column - 20.0);
                for (i, (k, v)) in fields.iter().enumerate() {
                    let text = format!("{k}: {v}");
                    if two {
                        let x = self.left() + column * (i % 2) as f32;
                        if i % 2 == 0 {
                            self.reserve(self.line_height(body));
                        }
                        self.text(x, &text, body);
                        if i % 2 == 1 || i + 1 == fields.len() {
                            self.y += self.line_height(body);
                        }
                    } else {
                        let x = self.left();
                        self.wrapped(x, &text, body);
                    }
                }
            }
            Block::Table { header, rows } => self.table(header, rows),
            Block::Checks(checks) => {
                for (label, on) in checks {
                    self.reserve(self.line_height(body));
                    let (x, y, side) = (self.left(), self.y + body * 0.15, body * 0.8);
                    self.rule(x, x + side, y);
                    self.rule(x, x + side, y + side);
                    let page = self
                        .pages
                        .last_mut()
                        .unwrap_or_else(|| unreachable!("a page"));
                    for dy in 0..side as u32 {
                        for dx in [0, side as u32] {
                            page.put_pixel(x as u32 + dx, y as u32 + dy, Luma([40]));
                        }
                        if *on {
                            let d = dy.min(side as u32 - 1);
                            page.put_pixel(x as u32 + d, y as u32 + dy, Luma([20]));
                            page.put_pixel(x as u32 + side as u32 - d, y as u32 + dy, Luma([20]));
                        }
                    }
                    self.text(x + side * 1.6, label, body);
                    self.y += self.line_height(body);
                }
            }
        }
    }

    fn table(&mut self, header: &[String], rows: &[Vec<String>]) {
        // Columns as wide as their widest cell, shrinking the font until the table fits the page width.
        let mut size = self.style.body;
        let widths = loop {
            let widths: Vec<f32> = (0..header.len())
                .map(|c| {
                    std::iter::once(&header[c])
                        .chain(rows.iter().filter_map(|r| r.get(c)))
                        .map(|s| self.width(s, size) + size)
                        .fold(0.0, f32::max)
                })
                .collect();
            if widths.iter().sum::<f32>() <= self.right() - self.left() || size < 12.0 {
                break widths;
            }
            size *= 0.92;
        };
        let height = self.line_height(size);
        for (i, row) in std::iter::once(header)
            .chain(rows.iter().map(Vec::as_slice))
            .enumerate()
        {
            self.reserve(height);
            let (l, y) = (self.left(), self.y);
            let r = l + widths.iter().sum::<f32>();
            if i == 0 {
                self.rule(l, r, y);
            }
            let mut x = l + size * 0.5;
            for (cell, w) in row.iter().zip(&widths) {
                self.text(x, cell, size);
                x += w;
            }
            self.y += height;
            let y = self.y - size * 0.15;
            self.rule(l, r, y);
        }
        self.y += size * 0.5;
    }
}

fn blank() -> GrayImage {
    GrayImage::from_pixel(PAGE.0, PAGE.1, Luma([255]))
}

fn apply(page: GrayImage, artefacts: Artefacts, rng: &mut ChaCha8Rng) -> GrayImage {
    let mut page = if artefacts.blur > 0.05 {
        image::imageops::blur(&page, artefacts.blur)
    } else {
        page
    };
    if artefacts.speckle > 0.0 {
        let n = (artefacts.speckle * (PAGE.0 * PAGE.1) as f32) as usize;
        for _ in 0..n {
            let (x, y) = (rng.random_range(0..PAGE.0), rng.random_range(0..PAGE.1));
            page.put_pixel(x, y, Luma([rng.random_range(0..200)]));
        }
    }
    if let Some(quality) = artefacts.jpeg_quality {
        let mut jpeg = Vec::new();
        let encoded = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality)
            .encode_image(&page)
            .is_ok();
        if encoded && let Ok(decoded) = image::load_from_memory(&jpeg) {
            page = decoded.to_luma8();
        }
    }
    page
}

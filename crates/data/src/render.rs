//! Pages from layout blocks: a letter page at 150 dpi (1275 x 1650 px), text drawn with fonts embedded in the
//! binary (DejaVu Sans, Serif and Sans Mono; no system fonts), word wrap, ruled tables, field columns, checkboxes;
//! on some pages the values of form fields are filled in "by hand" (slanted, each glyph jittered in size and
//! height) and the page is signed with a pen stroke; then optional scan artefacts (rotation, blur, speckle, JPEG).
//! A style is drawn from the seed, so pages vary in font, size, margins and hand, and are reproducible.

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
    /// Skew of the page in degrees, counter-clockwise, about its centre (0: none); corners fill white.
    pub rotation: f32,
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
        rotation: 0.0,
        blur: 0.0,
        speckle: 0.0,
        jpeg_quality: None,
    };

    /// Mild scan artefacts drawn from `rng`: every page stays legible at the model's resolution.
    pub fn scanned(rng: &mut impl Rng) -> Self {
        Self {
            rotation: rng.random_range(-1.5..1.5),
            blur: rng.random_range(0.0..0.9),
            speckle: rng.random_range(0.0..0.004),
            jpeg_quality: Some(rng.random_range(60..92)),
        }
    }
}

/// How a page looks: font, sizes, margins, whether field values are handwritten.
struct Style {
    font: FontRef<'static>,
    body: f32,
    margin: u32,
    /// Handwriting: the slant (x shift per pixel above the baseline); None: printed values.
    hand: Option<f32>,
}

impl Style {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let bytes = [SANS, SERIF, MONO][rng.random_range(0..3)];
        Self {
            font: FontRef::try_from_slice(bytes)
                .unwrap_or_else(|_| unreachable!("embedded fonts parse")),
            body: rng.random_range(19.0..25.0),
            margin: rng.random_range(70..130),
            hand: rng.random_bool(0.35).then(|| rng.random_range(0.12..0.3)),
        }
    }
}

/// Draws `blocks` on pages (a new page when one is full); `seed` picks the style and artefacts.
pub fn render(blocks: &[Block], seed: u64, artefacts: Option<Artefacts>) -> Vec<GrayImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let style = Style::draw(&mut rng);
    let artefacts = artefacts.unwrap_or_else(|| Artefacts::scanned(&mut rng));
    let mut pen = Pen::new(&style, seed);
    for block in blocks {
        pen.block(block);
    }
    if style.hand.is_some() {
        pen.signature();
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
    /// The hand's jitter (its own stream, so printed pages do not depend on it).
    hand: ChaCha8Rng,
}

impl<'a> Pen<'a> {
    fn new(style: &'a Style, seed: u64) -> Self {
        Self {
            style,
            pages: vec![blank()],
            y: style.margin as f32,
            hand: ChaCha8Rng::seed_from_u64(seed ^ 0x6861_6e64),
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
        self.glyphs(x, text, size, None);
    }

    /// Draws one line of text; with a `slant`, as handwriting: sheared, each glyph's size and height jittered.
    fn glyphs(&mut self, x: f32, text: &str, size: f32, slant: Option<f32>) {
        let page = self
            .pages
            .last_mut()
            .unwrap_or_else(|| unreachable!("a page always exists"));
        let mut caret = x;
        let baseline = self.y + self.style.font.as_scaled(PxScale::from(size)).ascent();
        for c in text.chars() {
            let (size, lift) = match slant {
                Some(_) => (
                    size * self.hand.random_range(0.92..1.08),
                    size * self.hand.random_range(-0.06..0.06),
                ),
                None => (size, 0.0),
            };
            let font = self.style.font.as_scaled(PxScale::from(size));
            let id = font.glyph_id(c);
            let glyph = id.with_scale_and_position(size, point(caret, baseline + lift));
            caret += font.h_advance(id);
            if let Some(outline) = self.style.font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let y = bounds.min.y + gy as f32;
                    let shear = slant.map_or(0.0, |k| (baseline - y) * k);
                    let (px, py) = ((bounds.min.x + gx as f32 + shear) as i64, y as i64);
                    if px >= 0 && py >= 0 && (px as u32) < PAGE.0 && (py as u32) < PAGE.1 {
                        let pixel = page.get_pixel_mut(px as u32, py as u32);
                        let ink = (255.0 * (1.0 - coverage.min(1.0))) as u8;
                        pixel.0[0] = pixel.0[0].min(ink);
                    }
                });
            }
        }
    }

    /// A field `key: value`, the value handwritten when the style has a hand.
    fn field(&mut self, x: f32, key: &str, value: &str, size: f32) {
        let label = format!("{key}: ");
        self.text(x, &label, size);
        let at = x + self.width(&label, size);
        self.glyphs(at, value, size, self.style.hand);
    }

    /// A pen stroke under the last block: a signature of loops drawn with a thick nib.
    fn signature(&mut self) {
        let height = self.style.body * 2.5;
        self.reserve(height);
        let x0 = self.left() + self.hand.random_range(0.0..200.0);
        let y0 = self.y + height * 0.6;
        let loops = self.hand.random_range(4..8) as f32;
        let (width, amplitude) = (self.hand.random_range(180.0..320.0), height * 0.3);
        let page = self
            .pages
            .last_mut()
            .unwrap_or_else(|| unreachable!("a page always exists"));
        for step in 0..2000 {
            let t = step as f32 / 2000.0;
            let phase = t * loops * std::f32::consts::TAU;
            let x = x0 + t * width + 14.0 * phase.cos();
            let y = y0 - amplitude * phase.sin() * (1.0 - 0.5 * t);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (px, py) = (x as u32 + dx, y as u32 + dy);
                if px < PAGE.0 && py < PAGE.1 {
                    page.put_pixel(px, py, Luma([30]));
                }
            }
        }
        self.y += height;
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
                        self.field(x, k, v, body);
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

/// The page turned `degrees` counter-clockwise about its centre, sampled bilinearly; what comes from outside
/// the page is white.
fn rotate(page: &GrayImage, degrees: f32) -> GrayImage {
    let (cos, sin) = (degrees.to_radians().cos(), degrees.to_radians().sin());
    let (cx, cy) = (PAGE.0 as f32 / 2.0, PAGE.1 as f32 / 2.0);
    let at = |x: i64, y: i64| -> f32 {
        if x < 0 || y < 0 || x >= i64::from(PAGE.0) || y >= i64::from(PAGE.1) {
            255.0
        } else {
            f32::from(page.get_pixel(x as u32, y as u32).0[0])
        }
    };
    GrayImage::from_fn(PAGE.0, PAGE.1, |x, y| {
        // The source of a destination pixel: the inverse rotation (image y points down).
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let (sx, sy) = (cos * dx - sin * dy + cx, sin * dx + cos * dy + cy);
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1, y0) * fx;
        let bottom = at(x0, y0 + 1) * (1.0 - fx) + at(x0 + 1, y0 + 1) * fx;
        Luma([(top * (1.0 - fy) + bottom * fy).round() as u8])
    })
}

fn apply(page: GrayImage, artefacts: Artefacts, rng: &mut ChaCha8Rng) -> GrayImage {
    let page = if artefacts.rotation.abs() > 0.01 {
        rotate(&page, artefacts.rotation)
    } else {
        page
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_turns_the_page_counter_clockwise_about_its_centre() {
        // A 5x5 dark square 200 px right of the centre ends up 200 px above it after a quarter turn.
        let mut page = blank();
        let (cx, cy) = (PAGE.0 / 2, PAGE.1 / 2);
        for y in cy - 2..=cy + 2 {
            for x in cx + 198..=cx + 202 {
                page.put_pixel(x, y, Luma([0]));
            }
        }
        let turned = rotate(&page, 90.0);
        let dark: Vec<(u32, u32)> = turned
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] < 128)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!((9..=30).contains(&dark.len()), "{} dark pixels", dark.len());
        for (x, y) in dark {
            assert!(
                x.abs_diff(cx) <= 3 && y.abs_diff(cy - 200) <= 3,
                "dark at ({x}, {y})"
            );
        }
        // Corners come from outside the page: white.
        let skewed = rotate(&blank(), 1.5);
        assert_eq!(skewed.get_pixel(0, 0).0[0], 255);
        assert_eq!(rotate(&page, 0.0), page);
    }

    #[test]
    fn handwriting_is_slanted_and_jittered_but_reproducible() {
        let fields = [Block::Fields(vec![("Dose".into(), "500 mg".into())])];
        let style = |hand| Style {
            font: FontRef::try_from_slice(SANS).unwrap_or_else(|_| unreachable!()),
            body: 22.0,
            margin: 100,
            hand,
        };
        let draw = |style: &Style, seed| {
            let mut pen = Pen::new(style, seed);
            for block in &fields {
                pen.block(block);
            }
            pen.pages.remove(0)
        };
        let (printed, hand) = (style(None), style(Some(0.25)));
        assert_eq!(draw(&printed, 1), draw(&printed, 2), "print has no jitter");
        assert_eq!(draw(&hand, 1), draw(&hand, 1));
        assert_ne!(draw(&hand, 1), draw(&hand, 2), "the hand jitters per seed");
        assert_ne!(draw(&hand, 1), draw(&printed, 1));
        // The label stays printed: the pixels left of the value are the same.
        let label = draw(&printed, 1);
        let value_x = 100 + label_width(&printed, "Dose: ") as u32;
        let written = draw(&hand, 1);
        for y in 0..PAGE.1 {
            for x in 0..value_x - 2 {
                assert_eq!(label.get_pixel(x, y), written.get_pixel(x, y), "({x}, {y})");
            }
        }
    }

    fn label_width(style: &Style, text: &str) -> f32 {
        Pen::new(style, 0).width(text, style.body)
    }
}

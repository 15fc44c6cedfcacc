//! Image preprocessing, exactly as the Qwen2-VL image processor's `pil` backend does it.
//!
//! bytes -> decode (PNG, JPEG, WebP, TIFF, BMP) -> EXIF orientation -> RGB (alpha composited on white, as
//! transformers' `convert_to_rgb`) -> [`smart_resize`] -> PIL bicubic resize ([`resize_bicubic`], the same fixed-point
//! arithmetic as Pillow's `Resample.c`) -> x/255 -> CLIP normalisation -> patch rows of 1176 values + `grid_thw`.
//!
//! Reference: transformers `models/qwen2_vl/image_processing_pil_qwen2_vl.py` (v5.17) and Pillow
//! `src/libImaging/Resample.c`, `AlphaComposite.c`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// What can go wrong turning bytes into pixel values.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not an image in a supported format, or are corrupt.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// The image has no pixels.
    #[error("image has zero size ({width}x{height})")]
    Empty {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// More pixels than allowed (a decompression bomb, or simply too large).
    #[error("image of {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels")]
    TooManyPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// width x height.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The aspect ratio exceeds what the model accepts (200, as transformers).
    #[error("image aspect ratio {ratio:.1} ({width}x{height}) exceeds the maximum of 200")]
    AspectRatio {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// long side / short side.
        ratio: f64,
    },
}

/// Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` (89,478,485) as decompression bombs; so do we.
pub const DEFAULT_PIXEL_LIMIT: u64 = 2 * 89_478_485;

/// Longest side / shortest side accepted by `smart_resize`.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// CLIP mean used by Qwen2.5-VL.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP standard deviation used by Qwen2.5-VL.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Settings of the image processor (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcessorConfig {
    /// Lower bound on the resized area.
    pub min_pixels: u64,
    /// Upper bound on the resized area.
    pub max_pixels: u64,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    pub image_std: [f32; 3],
    /// Patch side (14).
    pub patch_size: usize,
    /// Patches merged per side (2).
    pub merge_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Largest decoded image accepted, in pixels.
    pub pixel_limit: u64,
}

impl Default for ProcessorConfig {
    /// The hub's `preprocessor_config.json` of Qwen2.5-VL-7B-Instruct.
    fn default() -> Self {
        Self {
            min_pixels: 3136,
            max_pixels: 12_845_056,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            pixel_limit: DEFAULT_PIXEL_LIMIT,
        }
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct RawSize {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct RawProcessor {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    size: Option<RawSize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    patch_size: Option<usize>,
    merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    image_processor: Option<Box<RawProcessor>>,
}

impl ProcessorConfig {
    /// Reads the processor settings of a model directory: `preprocessor_config.json` (hub files: `min_pixels`,
    /// `max_pixels`) or transformers 5.x's `processor_config.json` (nested `image_processor` whose `size` is
    /// `{shortest_edge, longest_edge}`). Fields absent from both keep the hub defaults.
    pub fn from_model_dir(dir: &std::path::Path) -> Result<Self, crate::error::ModelError> {
        let mut config = Self::default();
        for file in ["processor_config.json", "preprocessor_config.json"] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|source| crate::error::ModelError::Io {
                    path: path.clone(),
                    source,
                })?;
            let raw: RawProcessor = serde_json::from_str(&text).map_err(|source| {
                crate::error::ModelError::ConfigJson {
                    path: Some(path.clone()),
                    source,
                }
            })?;
            let raw = match raw.image_processor {
                Some(nested) => *nested,
                None => raw,
            };
            config.apply(raw);
        }
        Ok(config)
    }

    fn apply(&mut self, raw: RawProcessor) {
        let size = raw.size.unwrap_or_default();
        if let Some(v) = raw.min_pixels.or(size.shortest_edge).or(size.min_pixels) {
            self.min_pixels = v;
        }
        if let Some(v) = raw.max_pixels.or(size.longest_edge).or(size.max_pixels) {
            self.max_pixels = v;
        }
        self.image_mean = raw.image_mean.unwrap_or(self.image_mean);
        self.image_std = raw.image_std.unwrap_or(self.image_std);
        self.patch_size = raw.patch_size.unwrap_or(self.patch_size);
        self.merge_size = raw.merge_size.unwrap_or(self.merge_size);
        self.temporal_patch_size = raw.temporal_patch_size.unwrap_or(self.temporal_patch_size);
    }

    /// Pixel side that resized images are multiples of (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// An image ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// Row-major `[patches, channels * temporal * patch * patch]`.
    pub data: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid_thw: [usize; 3],
    /// Length of one patch row (1176).
    pub patch_dim: usize,
}

impl PixelValues {
    /// Number of patch rows.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of LLM tokens this image becomes after the 2x2 merge.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// Decodes an image file's bytes into RGB, applying EXIF orientation, refusing decompression bombs.
pub fn decode_rgb(bytes: &[u8], pixel_limit: u64) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::Decode("unrecognised image format".into()));
    }
    let mut limits = Limits::default();
    // The allocation limit is our pixel limit at 16 bytes per pixel (RGBA f32), the largest decoded layout.
    limits.max_alloc = Some(pixel_limit.saturating_mul(16));
    let mut reader = reader;
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > pixel_limit {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            limit: pixel_limit,
        });
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(to_rgb(image))
}

/// Converts to 8-bit RGB the way transformers' `convert_to_rgb` does: anything with alpha is composited over white
/// with Pillow's `alpha_composite` arithmetic.
pub fn to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let [r, g, b, a] = src.0;
        dst.0 = [over_white(r, a), over_white(g, a), over_white(b, a)];
    }
    out
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white destination.
fn over_white(src: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let (src, alpha) = (u32::from(src), u32::from(alpha));
    let blend = 255 * (255 - alpha);
    let outa255 = alpha * 255 + blend;
    let coef1 = alpha * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = src * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    // SHIFTFORDIV255: ((a >> 8) + a) >> 8
    (((tmp >> 8) + tmp) >> 8 >> PRECISION_BITS) as u8
}

/// The target size `(height, width)` of Qwen2-VL's `smart_resize`: multiples of `factor`, area within
/// `[min_pixels, max_pixels]`, aspect ratio kept. Uses Python's round-half-to-even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize), ImageError> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 {
        return Err(ImageError::Empty {
            width: width as u32,
            height: height as u32,
        });
    }
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageError::AspectRatio {
            width: width as u32,
            height: height as u32,
            ratio,
        });
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Bits of the fixed-point filter coefficients in Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input index and the
/// fixed-point weights of the input pixels it reads.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero; the values are >= -0.5 + ... so this matches `(int)`.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic_filter((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass of Pillow's 8-bit resampler along x (`horizontal`) or y.
fn resample_pass(src: &RgbImage, out_w: u32, out_h: u32, horizontal: bool) -> RgbImage {
    let (in_len, out_len) = if horizontal {
        (src.width(), out_w)
    } else {
        (src.height(), out_h)
    };
    let coeffs = coefficients(in_len as usize, out_len as usize);
    let mut out = RgbImage::new(out_w, out_h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let (pos, other) = if horizontal { (x, y) } else { (y, x) };
        let (start, k) = &coeffs[pos as usize];
        let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
        for (i, &w) in k.iter().enumerate() {
            let at = (start + i) as u32;
            let p = if horizontal {
                src.get_pixel(at, other)
            } else {
                src.get_pixel(other, at)
            }
            .0;
            for c in 0..3 {
                acc[c] += i64::from(p[c]) * i64::from(w);
            }
        }
        px.0 = [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])];
    }
    out
}

/// Resizes like `PIL.Image.resize(size, Image.BICUBIC)` (Pillow 13): two separable passes with antialiasing
/// (filter support scaled by the reduction factor) and Pillow's 22-bit fixed-point rounding, each rounded to
/// 8 bits. The pass order matters for the result and follows Pillow: vertical first when the height shrinks by
/// more than twice as many pixels as the width does, horizontal first otherwise.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    let (need_h, need_v) = (in_w != width, in_h != height);
    let shrink_y = i64::from(in_h) - i64::from(height);
    let shrink_x = i64::from(in_w) - i64::from(width);
    let vertical_first = shrink_y > 0 && shrink_y > shrink_x * 2;
    match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => resample_pass(src, width, in_h, true),
        (false, true) => resample_pass(src, in_w, height, false),
        (true, true) if vertical_first => resample_pass(
            &resample_pass(src, in_w, height, false),
            width,
            height,
            true,
        ),
        (true, true) => resample_pass(&resample_pass(src, width, in_h, true), width, height, false),
    }
}

/// Resizes, normalises and patchifies one RGB image.
pub fn preprocess(image: &RgbImage, config: &ProcessorConfig) -> Result<PixelValues, ImageError> {
    let (w, h) = image.dimensions();
    let (rh, rw) = smart_resize(
        h as usize,
        w as usize,
        config.factor(),
        config.min_pixels,
        config.max_pixels,
    )?;
    let resized = resize_bicubic(image, rw as u32, rh as u32);
    Ok(patchify(&resized, config))
}

/// Decodes and preprocesses an image file's bytes.
pub fn preprocess_bytes(bytes: &[u8], config: &ProcessorConfig) -> Result<PixelValues, ImageError> {
    preprocess(&decode_rgb(bytes, config.pixel_limit)?, config)
}

/// x/255, normalise, then the processor's reshape
/// `(gt, tp, C, gh/m, m, p, gw/m, m, p) -> permute(0,3,6,4,7,2,1,5,8) -> (gt*gh*gw, C*tp*p*p)`,
/// with the single frame repeated `tp` times.
fn patchify(image: &RgbImage, config: &ProcessorConfig) -> PixelValues {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (p, m, tp) = (
        config.patch_size,
        config.merge_size,
        config.temporal_patch_size,
    );
    let (gh, gw) = (h / p, w / p);
    // Normalised planes, channel-major. transformers rescales in float64 then stores float32 before normalising.
    let mut planes = vec![0f32; 3 * h * w];
    for (x, y, px) in image.enumerate_pixels() {
        for c in 0..3 {
            let v = (f64::from(px.0[c]) * (1.0 / 255.0)) as f32;
            planes[(c * h + y as usize) * w + x as usize] =
                (v - config.image_mean[c]) / config.image_std[c];
        }
    }
    let patch_dim = 3 * tp * p * p;
    let mut data = Vec::with_capacity(gh * gw * patch_dim);
    // Row order: merged-block row, merged-block col, then the 2x2 patches inside the block.
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for ih in 0..m {
                for iw in 0..m {
                    let (py, px) = ((bh * m + ih) * p, (bw * m + iw) * p);
                    for c in 0..3 {
                        for _t in 0..tp {
                            for yy in 0..p {
                                let row = (c * h + py + yy) * w + px;
                                data.extend_from_slice(&planes[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    PixelValues {
        data,
        grid_thw: [1, gh, gw],
        patch_dim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_hand_worked() {
        // 1000x700: round(1000/28)=36 -> 1008, round(700/28)=25 -> 700 (25.0); area within bounds.
        assert_eq!(
            smart_resize(1000, 700, 28, 3136, 12_845_056).unwrap(),
            (1008, 700)
        );
        // Half-to-even: 42/28 = 1.5 -> 2; 70/28 = 2.5 -> 2.
        assert_eq!(smart_resize(42, 70, 28, 0, u64::MAX).unwrap(), (56, 56));
        // Letter page at 150 dpi (1275x1650) with max 1280*28*28: beta = sqrt(2103750/1003520) = 1.4479...
        // h = floor(1650/1.4479/28)*28 = 40*28 = 1120, w = floor(1275/1.4479/28)*28 = 31*28 = 868.
        assert_eq!(
            smart_resize(1650, 1275, 28, 3136, 1280 * 28 * 28).unwrap(),
            (1120, 868)
        );
        // Tiny image scaled up to min_pixels: beta = sqrt(3136/100) = 5.6 -> ceil(56/28)*28 = 56.
        assert_eq!(
            smart_resize(10, 10, 28, 3136, 12_845_056).unwrap(),
            (56, 56)
        );
    }

    #[test]
    fn smart_resize_rejects_extreme_aspect() {
        let err = smart_resize(10, 2010, 28, 3136, 12_845_056).unwrap_err();
        assert!(matches!(err, ImageError::AspectRatio { .. }), "{err}");
    }

    #[test]
    fn over_white_matches_pillow_endpoints() {
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        assert_eq!(over_white(0, 0), 255);
        // Half-transparent black on white: Pillow gives 127 (coef1 = 128*255*255*128/(128*255+127*255)...).
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(100, 37), (37, 100), (1000, 28), (28, 28)] {
            for (_, k) in coefficients(input, output) {
                let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{input}->{output}: {sum}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_through_resize() {
        let src = RgbImage::from_pixel(97, 61, image::Rgb([10, 128, 250]));
        let out = resize_bicubic(&src, 56, 84);
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }

    #[test]
    fn patchify_layout_and_grid() {
        let config = ProcessorConfig::default();
        // 56x28 image: grid (1, 2, 4) in patches, 8 rows of 1176.
        let mut img = RgbImage::new(56, 28);
        for (x, y, p) in img.enumerate_pixels_mut() {
            p.0 = [(x * 4) as u8, (y * 8) as u8, 0];
        }
        let pv = patchify(&img, &config);
        assert_eq!(pv.grid_thw, [1, 2, 4]);
        assert_eq!(pv.data.len(), 8 * 1176);
        let norm = |v: u8, c: usize| ((f64::from(v) / 255.0) as f32 - CLIP_MEAN[c]) / CLIP_STD[c];
        // Row 1 is the patch at block (0,0), inner (0,1): pixel x = 14.., y = 0..
        let row1 = &pv.data[1176..2 * 1176];
        assert_eq!(row1[0], norm(14 * 4, 0));
        // Row 4 is block (0,1) inner (0,0): x = 28.
        assert_eq!(pv.data[4 * 1176], norm(28 * 4, 0));
        // Second temporal frame repeats the first: channel 0 frame 1 starts at 196.
        assert_eq!(row1[196], row1[0]);
        // Channel 1 (green) starts at 2*196; pixel (14, 0) has y=0 -> 0.
        assert_eq!(row1[392], norm(0, 1));
        // Row 2 is block (0,0) inner (1,0): y = 14 -> green 112.
        assert_eq!(pv.data[2 * 1176 + 392], norm(14 * 8, 1));
    }

    #[test]
    fn processor_config_both_file_shapes() {
        let mut c = ProcessorConfig::default();
        c.apply(
            serde_json::from_str(r#"{"min_pixels": 100, "max_pixels": 200, "merge_size": 2}"#)
                .unwrap(),
        );
        assert_eq!((c.min_pixels, c.max_pixels), (100, 200));
        let mut c = ProcessorConfig::default();
        c.apply(
            serde_json::from_str::<RawProcessor>(
                r#"{"image_processor": {"size": {"shortest_edge": 300, "longest_edge": 400}}}"#,
            )
            .map(|r| *r.image_processor.unwrap())
            .unwrap(),
        );
        assert_eq!((c.min_pixels, c.max_pixels), (300, 400));
    }

    #[test]
    fn decode_errors_are_clear() {
        let err = decode_rgb(b"definitely not an image", DEFAULT_PIXEL_LIMIT).unwrap_err();
        assert!(matches!(err, ImageError::Decode(_)), "{err}");
        // A valid 300x300 PNG over a 10,000 pixel limit.
        let mut png = Vec::new();
        RgbImage::new(300, 300)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let err = decode_rgb(&png, 10_000).unwrap_err();
        assert!(
            matches!(err, ImageError::TooManyPixels { pixels: 90_000, .. }),
            "{err}"
        );
    }
}

//! Source images of img2img and inpainting jobs: PNG and JPEG decoding under a pixel limit
//! (checked from the header, before any pixel buffer is allocated; every failure its own
//! [`ImageError`]) and the resizes a job may ask for ([`ResizeMode`]).

use std::io::Cursor;

/// The most pixels a source image or mask may have (4096 × 4096).
pub const MAX_PIXELS: u64 = 4096 * 4096;

/// A decoded image: interleaved 8-bit RGB, row by row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width × height × 3` bytes.
    pub pixels: Vec<u8>,
}

/// Why bytes are not a usable image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Neither a PNG nor a JPEG signature.
    #[error("not a PNG or JPEG image")]
    NotAnImage,
    /// The header or data is cut short or corrupt.
    #[error("broken {format} image: {reason}")]
    Broken {
        /// `PNG` or `JPEG`.
        format: &'static str,
        /// What the decoder found.
        reason: String,
    },
    /// More pixels than [`MAX_PIXELS`].
    #[error("{width}×{height} is over the limit of {MAX_PIXELS} pixels")]
    TooLarge {
        /// Width from the header.
        width: u64,
        /// Height from the header.
        height: u64,
    },
    /// A zero-sized image.
    #[error("the image is empty (0 pixels)")]
    Empty,
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_SIGNATURE: &[u8] = &[0xff, 0xd8, 0xff];

/// The format the bytes claim by their signature: `"png"`, `"jpeg"` or `None`.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(PNG_SIGNATURE) {
        Some("png")
    } else if bytes.starts_with(JPEG_SIGNATURE) {
        Some("jpeg")
    } else {
        None
    }
}

/// A PNG's width and height from its header (`IHDR`, the first chunk), without decoding it;
/// `None` when the bytes do not start like a PNG.
pub fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let ihdr = bytes.strip_prefix(PNG_SIGNATURE)?;
    if ihdr.get(4..8)? != b"IHDR" {
        return None;
    }
    let word = |at: usize| Some(u32::from_be_bytes(ihdr.get(at..at + 4)?.try_into().ok()?));
    Some((word(8)?, word(12)?))
}

fn check_size(width: u64, height: u64) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty);
    }
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(ImageError::TooLarge { width, height });
    }
    Ok(())
}

/// Decodes a PNG or JPEG (any bit depth or colour type; alpha is dropped, grey is spread to
/// RGB) to 8-bit RGB, refusing images over [`MAX_PIXELS`] before decoding their pixels.
pub fn decode(bytes: &[u8]) -> Result<Rgb, ImageError> {
    match sniff(bytes) {
        Some("png") => decode_png(bytes),
        Some(_) => decode_jpeg(bytes),
        None => Err(ImageError::NotAnImage),
    }
}

fn broken_png(e: impl std::fmt::Display) -> ImageError {
    ImageError::Broken {
        format: "PNG",
        reason: e.to_string(),
    }
}

/// A PNG's first frame as 8-bit samples (palettes and low depths expanded), within the pixel
/// limit, and what it holds.
fn png_frame(bytes: &[u8]) -> Result<(Vec<u8>, png::OutputInfo), ImageError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(broken_png)?;
    let (width, height) = {
        let info = reader.info();
        (u64::from(info.width), u64::from(info.height))
    };
    check_size(width, height)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| broken_png("no output size"))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(broken_png)?;
    Ok((buf, frame))
}

fn decode_png(bytes: &[u8]) -> Result<Rgb, ImageError> {
    let (buf, frame) = png_frame(bytes)?;
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(broken_png("palette left unexpanded"));
        }
    };
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for row in buf.chunks(frame.line_size).take(h) {
        for px in row.chunks(channels).take(w) {
            if channels < 3 {
                pixels.extend([px[0]; 3]);
            } else {
                pixels.extend(&px[..3]);
            }
        }
    }
    if pixels.len() != w * h * 3 {
        return Err(broken_png("short frame"));
    }
    Ok(Rgb {
        width: w,
        height: h,
        pixels,
    })
}

/// OpenAI's mask convention turned into Drover's: for a PNG with an alpha channel, a
/// greyscale PNG of its size, white (repaint) where it is transparent (alpha below half) and
/// black elsewhere; `None` for an image without alpha (a JPEG, an opaque PNG).
pub fn mask_from_alpha(bytes: &[u8]) -> Result<Option<Vec<u8>>, ImageError> {
    if sniff(bytes) != Some("png") {
        return Ok(None);
    }
    let (buf, frame) = png_frame(bytes)?;
    let channels = match frame.color_type {
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgba => 4,
        _ => return Ok(None),
    };
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut mask = Vec::with_capacity(w * h);
    for row in buf.chunks(frame.line_size).take(h) {
        for px in row.chunks(channels).take(w) {
            mask.push(if px[channels - 1] < 128 { 255 } else { 0 });
        }
    }
    if mask.len() != w * h {
        return Err(broken_png("short frame"));
    }
    grey_png(frame.width, frame.height, &mask).map(Some)
}

/// A Gaussian blur of one 8-bit channel (`width × height`) with standard deviation `sigma`
/// pixels (PIL's `GaussianBlur(radius)`, which A1111's `mask_blur` uses), edges clamped.
pub fn blur_luma(luma: &[u8], width: usize, height: usize, sigma: f32) -> Vec<u8> {
    if sigma <= 0.0 || luma.len() != width * height {
        return luma.to_vec();
    }
    let reach = (3.0 * sigma).ceil() as isize;
    let taps: Vec<f32> = (-reach..=reach)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = taps.iter().sum();
    let pass = |src: &[f32], along_x: bool| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0.0;
                for (k, w) in taps.iter().enumerate() {
                    let d = k as isize - reach;
                    let (sx, sy) = if along_x {
                        ((x as isize + d).clamp(0, width as isize - 1) as usize, y)
                    } else {
                        (x, (y as isize + d).clamp(0, height as isize - 1) as usize)
                    };
                    acc += src[sy * width + sx] * w;
                }
                out[y * width + x] = acc / total;
            }
        }
        out
    };
    let values: Vec<f32> = luma.iter().map(|&v| f32::from(v)).collect();
    pass(&pass(&values, true), false)
        .into_iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// A mask with black and white swapped (AUTOMATIC1111's `inpainting_mask_invert`), as a
/// greyscale PNG of its luma.
pub fn inverted_mask(bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mask = decode(bytes)?;
    let inverted: Vec<u8> = mask.luma().into_iter().map(|l| 255 - l).collect();
    grey_png(mask.width as u32, mask.height as u32, &inverted)
}

/// An 8-bit greyscale PNG of `pixels`.
fn grey_png(width: u32, height: u32, pixels: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(broken_png)?;
        writer.write_image_data(pixels).map_err(broken_png)?;
        writer.finish().map_err(broken_png)?;
    }
    Ok(out)
}

fn decode_jpeg(bytes: &[u8]) -> Result<Rgb, ImageError> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let broken = |e: zune_jpeg::errors::DecodeErrors| ImageError::Broken {
        format: "JPEG",
        reason: e.to_string(),
    };
    let options = DecoderOptions::new_safe()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(broken)?;
    let info = decoder.info().ok_or_else(|| ImageError::Broken {
        format: "JPEG",
        reason: "no frame header".into(),
    })?;
    let (width, height) = (u64::from(info.width), u64::from(info.height));
    check_size(width, height)?;
    let pixels = decoder.decode().map_err(broken)?;
    let (w, h) = (width as usize, height as usize);
    if pixels.len() != w * h * 3 {
        return Err(ImageError::Broken {
            format: "JPEG",
            reason: format!("decoded {} bytes for {w}×{h} RGB", pixels.len()),
        });
    }
    Ok(Rgb {
        width: w,
        height: h,
        pixels,
    })
}

/// How a source image is fitted to the job's size (AUTOMATIC1111's `resize_mode` 0, 1, 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Stretched to the job's size (aspect ratio not kept). A1111 "Just resize".
    #[default]
    Resize,
    /// Scaled to cover the job's size, centred, the overflow cropped. A1111 "Crop and resize".
    Crop,
    /// Scaled to fit inside the job's size, centred, the borders filled by extending the
    /// image's edge pixels. A1111 "Resize and fill".
    Fill,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "resize" => Ok(Self::Resize),
            "crop" => Ok(Self::Crop),
            "fill" => Ok(Self::Fill),
            other => Err(format!(
                "unknown resize_mode `{other}`: expected resize, crop or fill"
            )),
        }
    }
}

impl ResizeMode {
    /// The mode's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resize => "resize",
            Self::Crop => "crop",
            Self::Fill => "fill",
        }
    }

    /// The mode of A1111's numeric `resize_mode` (0, 1, 2; 3 "latent upscale" is not served).
    pub fn from_a1111(mode: i64) -> Option<Self> {
        match mode {
            0 => Some(Self::Resize),
            1 => Some(Self::Crop),
            2 => Some(Self::Fill),
            _ => None,
        }
    }

    /// Where the source's pixels land in a `w × h` frame: `(left, top, width, height)` of the
    /// scaled source (it may overflow the frame when cropping).
    fn placement(self, src: (usize, usize), w: usize, h: usize) -> (f64, f64, f64, f64) {
        let (sw, sh) = (src.0 as f64, src.1 as f64);
        let (fw, fh) = (w as f64, h as f64);
        let scale = match self {
            Self::Resize => return (0.0, 0.0, fw, fh),
            Self::Crop => (fw / sw).max(fh / sh),
            Self::Fill => (fw / sw).min(fh / sh),
        };
        let (pw, ph) = (sw * scale, sh * scale);
        ((fw - pw) / 2.0, (fh - ph) / 2.0, pw, ph)
    }
}

/// One axis of a resample: for each output index, its source indices and weights (a triangle
/// filter widened by the downscale ratio, so shrinking averages instead of aliasing; source
/// indices outside the image clamp to its edge).
fn axis_weights(src: usize, out: usize, offset: f64, placed: f64) -> Vec<Vec<(usize, f32)>> {
    let ratio = src as f64 / placed;
    let support = ratio.max(1.0);
    (0..out)
        .map(|o| {
            let center = (o as f64 + 0.5 - offset) * ratio - 0.5;
            let lo = (center - support).floor() as i64;
            let hi = (center + support).ceil() as i64;
            let mut taps: Vec<(usize, f32)> = (lo..=hi)
                .filter_map(|i| {
                    let w = 1.0 - ((i as f64 - center) / support).abs();
                    (w > 0.0).then(|| (i.clamp(0, src as i64 - 1) as usize, w as f32))
                })
                .collect();
            if taps.is_empty() {
                taps.push((
                    (center.round() as i64).clamp(0, src as i64 - 1) as usize,
                    1.0,
                ));
            }
            let total: f32 = taps.iter().map(|t| t.1).sum();
            for t in &mut taps {
                t.1 /= total;
            }
            taps
        })
        .collect()
}

/// Fits `image` to `width × height` by `mode` (bilinear, antialiased when shrinking).
pub fn resize(image: &Rgb, width: usize, height: usize, mode: ResizeMode) -> Rgb {
    if image.width == width && image.height == height {
        return image.clone();
    }
    let (left, top, pw, ph) = mode.placement((image.width, image.height), width, height);
    let xs = axis_weights(image.width, width, left, pw);
    let ys = axis_weights(image.height, height, top, ph);
    // Horizontal pass into f32 rows, then vertical.
    let mut rows = vec![0f32; image.height * width * 3];
    for y in 0..image.height {
        let src = &image.pixels[y * image.width * 3..(y + 1) * image.width * 3];
        for (x, taps) in xs.iter().enumerate() {
            for c in 0..3 {
                rows[(y * width + x) * 3 + c] = taps
                    .iter()
                    .map(|&(i, w)| f32::from(src[i * 3 + c]) * w)
                    .sum();
            }
        }
    }
    let mut pixels = vec![0u8; width * height * 3];
    for (y, taps) in ys.iter().enumerate() {
        for x in 0..width {
            for c in 0..3 {
                let v: f32 = taps
                    .iter()
                    .map(|&(i, w)| rows[(i * width + x) * 3 + c] * w)
                    .sum();
                pixels[(y * width + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Rgb {
        width,
        height,
        pixels,
    }
}

impl Rgb {
    /// Luma per pixel (ITU-R 601-2, as PIL's `convert("L")`).
    pub fn luma(&self) -> Vec<u8> {
        self.pixels
            .chunks(3)
            .map(|p| {
                let v = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
                ((v + 0x8000) >> 16) as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_blurred_edge_ramps_and_a_zero_blur_changes_nothing() {
        // Left half black, right half white, 16 wide.
        let edge: Vec<u8> = (0..16 * 4)
            .map(|i| if i % 16 >= 8 { 255 } else { 0 })
            .collect();
        assert_eq!(blur_luma(&edge, 16, 4, 0.0), edge);
        let soft = blur_luma(&edge, 16, 4, 2.0);
        let row = &soft[..16];
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "a ramp: {row:?}");
        assert_eq!((row[0], row[15]), (0, 255), "far from the edge, unchanged");
        assert!(
            row[7] > 40 && row[8] < 215 && row[7] < 128 && row[8] > 128,
            "{row:?}"
        );
        assert_eq!(
            u16::from(row[7]) + u16::from(row[8]),
            255,
            "symmetric about the edge"
        );
    }

    #[test]
    fn masks_invert_and_alpha_becomes_white_where_transparent() {
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, 2, 1);
            e.set_color(png::ColorType::Rgba);
            let mut w = e.write_header().unwrap();
            w.write_image_data(&[9, 9, 9, 0, 9, 9, 9, 255]).unwrap();
        }
        let mask = decode(&mask_from_alpha(&out).unwrap().unwrap()).unwrap();
        assert_eq!(mask.luma(), vec![255, 0], "transparent repaints");
        let inverted =
            decode(&inverted_mask(&grey_png(2, 1, &[255, 0]).unwrap()).unwrap()).unwrap();
        assert_eq!(inverted.luma(), vec![0, 255]);
        let opaque = grey_png(1, 1, &[7]).unwrap();
        assert_eq!(mask_from_alpha(&opaque).unwrap(), None, "no alpha, no mask");
    }
    use super::*;

    pub(crate) fn png(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, width, height);
            enc.set_color(color);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(data).unwrap();
        }
        out
    }

    #[test]
    fn pngs_of_every_colour_type_decode_to_rgb() {
        let rgb = decode(&png(2, 1, png::ColorType::Rgb, &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!((rgb.width, rgb.height), (2, 1));
        assert_eq!(rgb.pixels, vec![1, 2, 3, 4, 5, 6]);
        let rgba = decode(&png(1, 1, png::ColorType::Rgba, &[9, 8, 7, 0])).unwrap();
        assert_eq!(rgba.pixels, vec![9, 8, 7]);
        let grey = decode(&png(2, 1, png::ColorType::Grayscale, &[0, 255])).unwrap();
        assert_eq!(grey.pixels, vec![0, 0, 0, 255, 255, 255]);
        assert_eq!(grey.luma(), vec![0, 255]);
    }

    #[test]
    fn jpegs_decode_to_rgb() {
        // Made by PIL (quality 95): green left half, pink right half.
        for (bytes, grey) in [
            (&include_bytes!("../testdata/tiny.jpg")[..], false),
            (&include_bytes!("../testdata/tiny-grey.jpg")[..], true),
        ] {
            let img = decode(bytes).unwrap();
            assert_eq!((img.width, img.height), (16, 8));
            let px = |x: usize| &img.pixels[(4 * 16 + x) * 3..(4 * 16 + x) * 3 + 3];
            if grey {
                assert!(px(2)[0] > px(13)[0], "{:?} {:?}", px(2), px(13));
            } else {
                assert!(
                    px(2)[1] > 180 && px(13)[0] > 160,
                    "{:?} {:?}",
                    px(2),
                    px(13)
                );
            }
        }
    }

    #[test]
    fn broken_and_foreign_bytes_are_named() {
        assert_eq!(decode(b"GIF89a....").unwrap_err(), ImageError::NotAnImage);
        assert_eq!(decode(b"").unwrap_err(), ImageError::NotAnImage);
        let good = png(4, 4, png::ColorType::Rgb, &[7; 48]);
        for cut in [8, 20, 33, good.len() - 13] {
            match decode(&good[..cut]) {
                Err(ImageError::Broken { format: "PNG", .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let jpeg_start = [0xff, 0xd8, 0xff, 0xe0, 0, 16, b'J', b'F'];
        assert!(matches!(
            decode(&jpeg_start),
            Err(ImageError::Broken { format: "JPEG", .. })
        ));
    }

    #[test]
    fn oversized_images_are_refused_from_their_header() {
        // An IHDR claiming 5000×5000 and nothing else: refused before any pixel is read.
        let mut bytes = PNG_SIGNATURE.to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(5000u32.to_be_bytes());
        ihdr.extend(5000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        bytes.extend(13u32.to_be_bytes());
        bytes.extend(&ihdr);
        bytes.extend(crc32(&ihdr).to_be_bytes());
        // The start of an IDAT chunk claiming a gigabyte: the decoder stops at the header.
        bytes.extend(0x4000_0000u32.to_be_bytes());
        bytes.extend(b"IDAT");
        bytes.extend([0x78, 0x9c]);
        assert_eq!(
            decode(&bytes).unwrap_err(),
            ImageError::TooLarge {
                width: 5000,
                height: 5000
            }
        );
    }

    proptest::proptest! {
        /// Random bytes behind either signature: an error or an image, never a panic, and
        /// never more pixels than the limit.
        #[test]
        fn random_bytes_behind_a_signature_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            jpeg in proptest::prelude::any::<bool>(),
        ) {
            let mut data = if jpeg { JPEG_SIGNATURE.to_vec() } else { PNG_SIGNATURE.to_vec() };
            data.extend(bytes);
            match decode(&data) {
                Ok(img) => proptest::prop_assert!((img.width * img.height) as u64 <= MAX_PIXELS),
                Err(ImageError::Broken { format, .. }) => {
                    proptest::prop_assert_eq!(format, if jpeg { "JPEG" } else { "PNG" })
                }
                Err(ImageError::TooLarge { .. } | ImageError::Empty) => {}
                Err(ImageError::NotAnImage) => proptest::prop_assert!(false, "signature ignored"),
            }
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn solid(w: usize, h: usize, v: u8) -> Rgb {
        Rgb {
            width: w,
            height: h,
            pixels: vec![v; w * h * 3],
        }
    }

    #[test]
    fn resizes_keep_flat_colours_and_place_the_image_by_mode() {
        let grey = solid(30, 10, 77);
        for mode in [ResizeMode::Resize, ResizeMode::Crop, ResizeMode::Fill] {
            let out = resize(&grey, 16, 16, mode);
            assert_eq!((out.width, out.height), (16, 16));
            assert!(out.pixels.iter().all(|&v| v == 77), "{mode:?}");
        }
        // Left half black, right half white, 40×10 → 10×10.
        let mut halves = solid(40, 10, 0);
        for y in 0..10 {
            for x in 20..40 {
                for c in 0..3 {
                    halves.pixels[(y * 40 + x) * 3 + c] = 255;
                }
            }
        }
        let px = |img: &Rgb, x: usize| img.pixels[(5 * img.width + x) * 3];
        // Stretch: both halves survive; crop: the centre 10×10 (the seam in the middle).
        let stretched = resize(&halves, 10, 10, ResizeMode::Resize);
        assert_eq!((px(&stretched, 0), px(&stretched, 9)), (0, 255));
        let cropped = resize(&halves, 10, 10, ResizeMode::Crop);
        assert_eq!((px(&cropped, 0), px(&cropped, 9)), (0, 255));
        // Fill: the whole image in a 10×2.5 band, rows above extend its edge.
        let filled = resize(&halves, 10, 10, ResizeMode::Fill);
        assert_eq!(filled.pixels[0], 0);
        assert_eq!(filled.pixels[9 * 3], 255);
        assert_eq!(ResizeMode::from_a1111(1), Some(ResizeMode::Crop));
        assert_eq!(ResizeMode::from_a1111(3), None);
    }
}

//! The source of an image-to-image or inpainting job: the image (and mask) as the client sent
//! them, checked once at submission ([`SourceSpec::from_request`]) and carried as bytes from
//! then on — base64 only in JSON (the request, the stored record), raw bytes on the wire to the
//! node.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::FieldError;
use crate::image::{self, ImageError, ResizeMode};

/// Default strength of an image-to-image job (AUTOMATIC1111's `denoising_strength`).
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// Default strength of an inpainting job: the masked part starts from pure noise (diffusers).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;
/// Largest source image or mask accepted, in bytes (before base64).
pub const MAX_SOURCE_BYTES: usize = 16 * 1024 * 1024;
/// How an image field names an upload instead of carrying base64: `upload:<id>`.
pub const UPLOAD_PREFIX: &str = "upload:";

/// Images clients uploaded before (`POST /v1/uploads`), which image fields may name as
/// `upload:<id>`.
pub trait Uploads {
    /// The bytes of upload `id`, when it exists and has not expired.
    fn get(&self, id: &str) -> Option<Arc<[u8]>>;
}

/// No uploads: every `upload:` reference is refused.
pub struct NoUploads;

impl Uploads for NoUploads {
    fn get(&self, _: &str) -> Option<Arc<[u8]>> {
        None
    }
}

/// A job's source image, checked: what the coordinator stores and sends to the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceSpec {
    /// The image as sent (PNG or JPEG). Kept in the job's record; left out of API answers.
    #[serde(default, with = "base64_bytes", skip_serializing_if = "is_stripped")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Byte))]
    pub image: Arc<[u8]>,
    /// The inpainting mask as sent (PNG or JPEG; white = repaint).
    #[serde(default, with = "base64_opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Byte))]
    pub mask: Option<Arc<[u8]>>,
    /// Denoising strength in (0, 1].
    pub strength: f64,
    /// How the image is fitted to the job's size.
    #[serde(default)]
    pub resize_mode: ResizeMode,
    /// The source image's width.
    pub width: u32,
    /// The source image's height.
    pub height: u32,
    /// Bytes of the image as sent.
    pub image_bytes: u64,
    /// Bytes of the mask as sent (0: no mask).
    #[serde(default)]
    pub mask_bytes: u64,
    /// Blur radius of the mask in pixels (0: a hard mask, binarised as diffusers does;
    /// above 0: a Gaussian of that radius, the masked part's edge blended softly, as
    /// AUTOMATIC1111's `mask_blur`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mask_blur: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Largest mask blur accepted, in pixels.
pub const MAX_MASK_BLUR: u32 = 64;

fn is_stripped(bytes: &Arc<[u8]>) -> bool {
    bytes.is_empty()
}

impl SourceSpec {
    /// Decodes and checks a request's `init_image`, `mask`, `strength` and `resize_mode`
    /// (base64, an optional `data:image/...;base64,` prefix): images that decode, within
    /// [`MAX_SOURCE_BYTES`] and [`crate::image::MAX_PIXELS`], a mask the image's size, a
    /// strength in (0, 1]. Each failure names its field.
    pub fn from_request(
        init_image: Option<&str>,
        mask: Option<&str>,
        strength: Option<f64>,
        resize_mode: Option<ResizeMode>,
        uploads: &dyn Uploads,
    ) -> Result<Option<Self>, FieldError> {
        let Some(init_image) = init_image else {
            if mask.is_some() {
                return Err(FieldError::new(
                    "mask",
                    "a mask needs an init_image to inpaint",
                ));
            }
            if strength.is_some() {
                return Err(FieldError::new(
                    "strength",
                    "strength applies to an init_image, and there is none",
                ));
            }
            return Ok(None);
        };
        let image_bytes = field_bytes("init_image", init_image, uploads)?;
        let decoded = check_image("init_image", &image_bytes)?;
        let mask_bytes = match mask {
            None => None,
            Some(m) => {
                let bytes = field_bytes("mask", m, uploads)?;
                let mask = check_image("mask", &bytes)?;
                if (mask.width, mask.height) != (decoded.width, decoded.height) {
                    return Err(FieldError::new(
                        "mask",
                        format!(
                            "the mask is {}×{} but the init_image is {}×{}",
                            mask.width, mask.height, decoded.width, decoded.height
                        ),
                    ));
                }
                Some(bytes)
            }
        };
        let default = if mask_bytes.is_some() {
            DEFAULT_INPAINT_STRENGTH
        } else {
            DEFAULT_STRENGTH
        };
        let strength = strength.unwrap_or(default);
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(FieldError::new(
                "strength",
                format!("{strength} is outside (0, 1]"),
            ));
        }
        Ok(Some(Self {
            image_bytes: image_bytes.len() as u64,
            mask_bytes: mask_bytes.as_ref().map_or(0, |m| m.len() as u64),
            image: image_bytes.into(),
            mask: mask_bytes.map(Into::into),
            strength,
            resize_mode: resize_mode.unwrap_or_default(),
            width: decoded.width as u32,
            height: decoded.height as u32,
            mask_blur: 0,
        }))
    }

    /// An image alone (a stand-alone upscale's), as base64 in field `field`: decoded and
    /// checked as `init_image` is.
    pub fn image_only(
        field: &str,
        base64: &str,
        uploads: &dyn Uploads,
    ) -> Result<Self, FieldError> {
        let image_bytes = field_bytes(field, base64, uploads)?;
        let decoded = check_image(field, &image_bytes)?;
        Ok(Self {
            image_bytes: image_bytes.len() as u64,
            mask_bytes: 0,
            image: image_bytes.into(),
            mask: None,
            strength: 1.0,
            resize_mode: ResizeMode::default(),
            width: decoded.width as u32,
            height: decoded.height as u32,
            mask_blur: 0,
        })
    }

    /// A node's render as the source of the upscale that follows it on another node; `None`
    /// when the bytes are not a PNG with a header.
    pub fn rendered(png: Arc<[u8]>) -> Option<Self> {
        let (width, height) = image::png_size(&png)?;
        Some(Self {
            image_bytes: png.len() as u64,
            mask_bytes: 0,
            image: png,
            mask: None,
            strength: 1.0,
            resize_mode: ResizeMode::default(),
            width,
            height,
            mask_blur: 0,
        })
    }

    /// Whether this is a [`SourceSpec::stripped`] copy: sizes without the bytes.
    pub fn is_stripped(&self) -> bool {
        self.image.is_empty() && self.image_bytes > 0
    }

    /// The same source without its bytes, for API answers (and records that keep them apart).
    pub fn stripped(&self) -> Self {
        Self {
            image: Arc::from(Vec::new()),
            mask: None,
            ..self.clone()
        }
    }

    /// The job size a source implies when the request names none: its own, each side rounded
    /// down to a multiple of 8 within 64..=2048.
    pub fn default_size(&self) -> super::Size {
        let side = |v: u32| {
            (v / super::SIDE_MULTIPLE * super::SIDE_MULTIPLE)
                .clamp(super::MIN_SIDE, super::MAX_SIDE)
        };
        super::Size {
            width: side(self.width),
            height: side(self.height),
        }
    }
}

/// Base64 (standard alphabet, padding optional) after an optional data-URL prefix.
/// A base64 mask (field `field`) with black and white swapped, as base64 PNG again; an upload
/// reference cannot be inverted here (it is refused, naming the field).
pub fn inverted_mask_base64(field: &str, text: &str) -> Result<String, FieldError> {
    if text.trim().starts_with(UPLOAD_PREFIX) {
        return Err(FieldError::new(
            field,
            "an uploaded mask cannot be inverted: send it inverted, or inline",
        ));
    }
    let bytes = decode_base64(field, text)?;
    let inverted =
        image::inverted_mask(&bytes).map_err(|e| FieldError::new(field, e.to_string()))?;
    Ok(STANDARD.encode(inverted))
}

/// An image field's bytes: an upload it names (`upload:<id>`), else its base64.
fn field_bytes(field: &str, text: &str, uploads: &dyn Uploads) -> Result<Vec<u8>, FieldError> {
    match text.trim().strip_prefix(UPLOAD_PREFIX) {
        Some(id) => uploads.get(id.trim()).map(|b| b.to_vec()).ok_or_else(|| {
            FieldError::new(
                field,
                format!(
                    "upload `{}` is unknown or expired (POST /v1/uploads answers an id; uploads \
                     are kept in memory for a while, not across restarts)",
                    id.chars().take(64).collect::<String>()
                ),
            )
        }),
        None => decode_base64(field, text),
    }
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, FieldError> {
    let body = match text.trim().split_once(";base64,") {
        Some((prefix, body)) if prefix.starts_with("data:") => body,
        _ => text.trim(),
    };
    if body.len() / 4 * 3 > MAX_SOURCE_BYTES + 3 {
        return Err(FieldError::new(
            field,
            format!("over the limit of {MAX_SOURCE_BYTES} bytes"),
        ));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(body.as_bytes())
        .map_err(|e| FieldError::new(field, format!("not valid base64: {e}")))
}

fn check_image(field: &str, bytes: &[u8]) -> Result<image::Rgb, FieldError> {
    if bytes.len() > MAX_SOURCE_BYTES {
        return Err(FieldError::new(
            field,
            format!("over the limit of {MAX_SOURCE_BYTES} bytes"),
        ));
    }
    image::decode(bytes).map_err(|e: ImageError| FieldError::new(field, e.to_string()))
}

mod base64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map(Into::into)
            .map_err(serde::de::Error::custom)
    }
}

mod base64_opt {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<Arc<[u8]>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<[u8]>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => STANDARD
                .decode(text)
                .map(|b| Some(b.into()))
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

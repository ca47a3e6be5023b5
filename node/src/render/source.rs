//! A job's source image (img2img, inpainting) as the client sent it, and its decoding and
//! fitting to the job's size on the worker's thread.

use std::sync::Arc;

use drover_shared::image::{self, ResizeMode};

use crate::error::{NodeError, Result};

/// An img2img or inpainting job's source as the client sent it. [`Source::fit`] decodes it on
/// the worker's thread (a large image takes a while: never on the session's).
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// The source image (PNG or JPEG bytes).
    pub image: Arc<[u8]>,
    /// Inpainting: the mask (PNG or JPEG bytes, the image's size; white repaints).
    pub mask: Option<Arc<[u8]>>,
    /// How far from the source the result may go, in (0, 1]: the fraction of the noise
    /// schedule run (1 with a mask: the masked part starts from pure noise).
    pub strength: f64,
    /// How the image is fitted to the job's size.
    pub resize_mode: ResizeMode,
    /// The mask's blur radius in pixels (0: a hard mask).
    pub mask_blur: u32,
}

/// A source decoded and fitted to a job's size.
#[derive(Clone, Debug, PartialEq)]
pub struct Fitted {
    /// Interleaved RGB bytes, `width × height × 3`.
    pub rgb: Vec<u8>,
    /// Inpainting: one luma byte per pixel, white (≥ 128) where the model repaints.
    pub mask: Option<Vec<u8>>,
    /// The mask is blurred: read it as a weight (luma / 255), not binarised.
    pub soft: bool,
}

impl Source {
    /// Decodes the image (and mask) and fits them to `width × height`; an unusable one is
    /// refused for good, naming what is wrong.
    pub fn fit(&self, width: usize, height: usize) -> Result<Fitted> {
        let refuse =
            |what: &str, e: image::ImageError| NodeError::InvalidJob(format!("{what}: {e}"));
        let decoded = image::decode(&self.image).map_err(|e| refuse("init_image", e))?;
        let mask = match &self.mask {
            None => None,
            Some(bytes) => {
                let mask = image::decode(bytes).map_err(|e| refuse("mask", e))?;
                if (mask.width, mask.height) != (decoded.width, decoded.height) {
                    return Err(NodeError::InvalidJob(format!(
                        "the mask is {}×{} but the init_image {}×{}",
                        mask.width, mask.height, decoded.width, decoded.height
                    )));
                }
                let luma = image::resize(&mask, width, height, self.resize_mode).luma();
                Some(image::blur_luma(
                    &luma,
                    width,
                    height,
                    self.mask_blur as f32,
                ))
            }
        };
        Ok(Fitted {
            rgb: image::resize(&decoded, width, height, self.resize_mode).pixels,
            soft: mask.is_some() && self.mask_blur > 0,
            mask,
        })
    }
}

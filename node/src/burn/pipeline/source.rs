//! What a job's source image gives the sampler: its latent, the mask at latent size and, for a
//! 9-channel inpainting UNet, the extra input channels (mask and masked-image latents).

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{Tensor, TensorData};

use super::Pipeline;
use crate::error::{NodeError, Result};
use crate::render::{Fitted, Params};

impl<B: Backend> Pipeline<B> {
    /// Whether the UNet is an inpainting one: it takes the mask and the masked image's
    /// latents besides the sample (9 input channels for a 4-channel VAE).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }

    /// What a job's source gives the sampler: the image's latent, the mask at latent size
    /// (`[1, 1, h, w]`, binarised at half, nearest-neighbour, as diffusers) and, for an
    /// inpainting UNet, its extra input channels — the mask and the latents of the image with
    /// the masked part blanked (all masked, from a blank image, without a source or mask).
    pub(super) fn source_latents(
        &self,
        source: Option<&Fitted>,
        params: &Params,
        h: usize,
        w: usize,
    ) -> Result<SourceLatents<B>> {
        let (width, height) = (params.width, params.height);
        let pixels = |rgb: &[u8]| {
            let chw = signed_planes(rgb, width, height);
            Tensor::<B, 4>::from_data(TensorData::new(chw, [1, 3, height, width]), &self.device)
        };
        if let Some(s) = source {
            if s.rgb.len() != width * height * 3 {
                return Err(NodeError::InvalidJob(format!(
                    "the source image has {} bytes, not {width}×{height} RGB",
                    s.rgb.len()
                )));
            }
            if s.mask.as_ref().is_some_and(|m| m.len() != width * height) {
                return Err(NodeError::InvalidJob(format!(
                    "the mask is not {width}×{height}"
                )));
            }
        }
        // A blurred mask is a weight (its cell's mean at latent size); a hard one is binarised
        // and sampled nearest, as diffusers does.
        let soft = source.is_some_and(|s| s.soft);
        let mask_px = source
            .and_then(|s| s.mask.as_deref())
            .map(|m| mask_weights(m, soft));
        let mask = mask_px.as_ref().map(|m| {
            let cells = latent_mask(m, width, height, w, h, soft);
            Tensor::<B, 4>::from_data(TensorData::new(cells, [1, 1, h, w]), &self.device)
        });
        let image_px = source.map(|s| pixels(&s.rgb));
        let image = image_px.clone().map(|p| self.encode(p)).transpose()?;
        let extra = if self.is_inpainting() {
            let keep = match &mask_px {
                // diffusers: the source times (mask < 0.5).
                Some(m) => Tensor::<B, 4>::from_data(
                    TensorData::new(m.iter().map(|v| 1.0 - v).collect(), [1, 1, height, width]),
                    &self.device,
                ),
                None => Tensor::zeros([1, 1, height, width], &self.device),
            };
            let blank = Tensor::zeros([1, 3, height, width], &self.device);
            let masked = self.encode(image_px.unwrap_or(blank) * keep)?;
            let mask = mask
                .clone()
                .unwrap_or_else(|| Tensor::ones([1, 1, h, w], &self.device));
            Some(Tensor::cat(vec![mask, masked], 1))
        } else {
            None
        };
        Ok(SourceLatents { image, mask, extra })
    }
}

/// Interleaved RGB bytes as planar values in [-1, 1], the VAE encoder's input.
pub fn signed_planes(rgb: &[u8], width: usize, height: usize) -> Vec<f32> {
    let plane = width * height;
    let mut chw = vec![0f32; rgb.len()];
    for (i, px) in rgb.chunks(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * plane + i] = (f32::from(v) / 255.0) * 2.0 - 1.0;
        }
    }
    chw
}

/// Mask luma as weights: luma / 255 for a blurred (`soft`) mask, else binarised at half.
pub fn mask_weights(luma: &[u8], soft: bool) -> Vec<f32> {
    luma.iter()
        .map(|&v| {
            let v = f32::from(v) / 255.0;
            match (soft, v >= 0.5) {
                (true, _) => v,
                (false, true) => 1.0,
                (false, false) => 0.0,
            }
        })
        .collect()
}

/// A pixel mask (`width × height` weights) at latent size (`w × h`): each cell's mean when
/// `soft`, else the value at its top-left pixel (nearest, as diffusers).
pub fn latent_mask(
    m: &[f32],
    width: usize,
    height: usize,
    w: usize,
    h: usize,
    soft: bool,
) -> Vec<f32> {
    let (sy, sx) = (height / h, width / w);
    (0..h * w)
        .map(|i| {
            let (y0, x0) = ((i / w) * sy, (i % w) * sx);
            if soft {
                let mut sum = 0.0;
                for y in y0..y0 + sy {
                    sum += m[y * width + x0..y * width + x0 + sx].iter().sum::<f32>();
                }
                sum / (sy * sx) as f32
            } else {
                m[y0 * width + x0]
            }
        })
        .collect()
}

/// What a job's source gives the sampler ([`Pipeline::source_latents`]).
pub(super) struct SourceLatents<B: Backend> {
    /// The source's latent, scaled for the UNet.
    pub(super) image: Option<Tensor<B, 4>>,
    /// The mask at latent size.
    pub(super) mask: Option<Tensor<B, 4>>,
    /// An inpainting UNet's extra input channels.
    pub(super) extra: Option<Tensor<B, 4>>,
}

#[cfg(test)]
mod tests {
    use super::latent_mask;

    #[test]
    fn latent_masks_average_soft_cells_and_sample_hard_ones() {
        // 4×2 pixels into 2×1 cells: a soft ramp in the left cell, white on the right.
        let m = [0.0, 0.5, 1.0, 1.0, 0.25, 0.25, 1.0, 1.0];
        assert_eq!(latent_mask(&m, 4, 2, 2, 1, true), vec![0.25, 1.0]);
        assert_eq!(latent_mask(&m, 4, 2, 2, 1, false), vec![0.0, 1.0]);
    }
}

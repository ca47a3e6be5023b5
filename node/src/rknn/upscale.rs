//! Super-resolution on the RK3588 NPU: an `.rknn` network with one fixed input `[1, 3, h, w]`
//! (RGB in `[0, 1]`, any layout and type the runtime takes) and one output `[1, 3, s·h, s·w]`.
//! Images are cut into tiles of the model's own size, each holding `pad` pixels of real image
//! around its core (tiles at the border are shifted inward to stay inside the image, where the
//! network's zero padding applies as it would untiled); only each core's output is kept.
//! Images smaller than a tile are extended by repeating their edges. Where `pad` covers the
//! network's receptive field the result equals an untiled run.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use super::api::{CoreMask, RknnApi};
use super::model::{HostTensor, RknnModel, logical_dims};
use crate::error::{NodeError, Result};

/// An `.rknn` super-resolution network on one NPU context (not `Send`: it stays on the thread
/// that loaded it).
pub struct RknnUpscaler {
    model: RknnModel,
    tile: (usize, usize),
    scale: usize,
}

impl RknnUpscaler {
    /// Loads `path` on `core`, refusing a network whose shapes are not an upscaler's.
    pub fn load(api: Arc<dyn RknnApi>, path: &Path, core: CoreMask) -> Result<Self> {
        let model = RknnModel::load(api, path, core)?;
        let bad = |why: String| NodeError::ModelConfig(format!("{}: {why}", path.display()));
        if model.inputs().len() != 1 || model.outputs().len() != 1 {
            return Err(bad(format!(
                "{} inputs and {} outputs; an upscaler has one of each",
                model.inputs().len(),
                model.outputs().len()
            )));
        }
        let input = logical_dims(&model.inputs()[0]);
        let output = logical_dims(&model.outputs()[0]);
        match (input.as_slice(), output.as_slice()) {
            (&[1, 3, h, w], &[1, 3, oh, ow])
                if h > 0 && w > 0 && oh >= h && oh % h == 0 && ow % w == 0 && oh / h == ow / w =>
            {
                Ok(Self {
                    model,
                    tile: (h, w),
                    scale: oh / h,
                })
            }
            _ => Err(bad(format!(
                "input {input:?} and output {output:?} are not [1, 3, h, w] → [1, 3, s·h, s·w]"
            ))),
        }
    }

    /// Output pixels per input pixel on each side.
    pub fn scale(&self) -> usize {
        self.scale
    }

    /// The model's input size (height, width): the tile.
    pub fn tile(&self) -> (usize, usize) {
        self.tile
    }

    /// Upscales RGB8 pixels (`width·height·3` bytes) tile by tile with `pad` pixels of context
    /// (at most what leaves a core of one pixel); `progress(done, all)` hears the tiles and its
    /// `Break` cancels.
    pub fn upscale_rgb8(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        pad: usize,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Vec<u8>> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return Err(NodeError::Render(format!(
                "upscale input holds {} bytes, not {width}×{height} RGB",
                rgb.len()
            )));
        }
        let (th, tw) = self.tile;
        let s = self.scale;
        // The image, planar, extended by its edges to at least one tile.
        let (ph, pw) = (height.max(th), width.max(tw));
        let mut planes = vec![0f32; 3 * ph * pw];
        for y in 0..ph {
            for x in 0..pw {
                let src = (y.min(height - 1) * width + x.min(width - 1)) * 3;
                for c in 0..3 {
                    planes[(c * ph + y) * pw + x] = f32::from(rgb[src + c]) / 255.0;
                }
            }
        }
        let (pad_h, pad_w) = (pad.min((th - 1) / 2), pad.min((tw - 1) / 2));
        let (core_h, core_w) = (th - 2 * pad_h, tw - 2 * pad_w);
        let (rows, cols) = (height.div_ceil(core_h), width.div_ceil(core_w));
        let all = rows * cols;
        let mut report = |done| match progress(done, all) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(NodeError::Cancelled),
        };
        report(0)?;
        let (ow, oh) = (width * s, height * s);
        let mut out = vec![0u8; oh * ow * 3];
        let mut tile = vec![0f32; 3 * th * tw];
        for ty in 0..rows {
            let y0 = ty * core_h;
            let len_y = core_h.min(height - y0);
            let cy0 = y0.saturating_sub(pad_h).min(ph - th);
            for tx in 0..cols {
                let x0 = tx * core_w;
                let len_x = core_w.min(width - x0);
                let cx0 = x0.saturating_sub(pad_w).min(pw - tw);
                for c in 0..3 {
                    for y in 0..th {
                        let from = (c * ph + cy0 + y) * pw + cx0;
                        tile[(c * th + y) * tw..(c * th + y + 1) * tw]
                            .copy_from_slice(&planes[from..from + tw]);
                    }
                }
                let result = self
                    .model
                    .run(&[HostTensor::f32(&[1, 3, th, tw], tile.clone())])?
                    .remove(0)
                    .into_f32("the upscaler's output")?;
                let (oy, ox) = ((y0 - cy0) * s, (x0 - cx0) * s);
                for c in 0..3 {
                    for y in 0..len_y * s {
                        for x in 0..len_x * s {
                            let v = result[(c * th * s + oy + y) * tw * s + ox + x];
                            let at = ((y0 * s + y) * ow + x0 * s + x) * 3 + c;
                            out[at] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                        }
                    }
                }
                report(ty * cols + tx + 1)?;
            }
        }
        Ok(out)
    }
}

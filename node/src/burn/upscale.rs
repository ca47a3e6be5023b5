//! Super-resolution on Burn: ESRGAN-family RRDBNets (Real-ESRGAN ×1/×2/×4, ESRGAN, BSRGAN) and
//! Real-ESRGAN's compact SRVGGNet, built from the shapes [`drover_shared::detect::upscaler`]
//! reads, and tiled inference for images larger than a tile.
//!
//! Images are `[1, 3, h, w]` RGB in `[0, 1]`, as the networks were trained.
//!
//! Tiling works as Real-ESRGAN's `tile_process`: every tile is run with `pad` pixels of real
//! image around it (fewer at the image border, where the network's own zero padding applies
//! as it would untiled) and only the tile's own output is kept. Where `pad` covers the
//! network's receptive field the tiled image equals the untiled one up to float rounding;
//! beyond it (23-block RRDBNets see further than any practical pad) the difference is the
//! tile border's missing far context, which Real-ESRGAN accepts at its default pad of 10.

use std::ops::ControlFlow;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::ops::PadMode;
use ::burn::tensor::{DType, Tensor, TensorData, activation};
use drover_shared::detect::upscaler::{UpscalerArch, UpscalerSpec};

use super::nn::Conv2d;
use super::tensor_file::TensorFile;
use super::weights::{Loader, TensorSource};
use crate::error::{NodeError, Result};

/// Default tile side in input pixels.
pub const DEFAULT_TILE: usize = 256;
/// Default context around each tile in input pixels.
pub const DEFAULT_TILE_PAD: usize = 32;

/// Tiles and pads are rounded up to this so pixel-unshuffle grids line up across tiles.
const GRID: usize = 4;

/// How an image is cut for the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Tile side in input pixels (0: the whole image in one call).
    pub tile: usize,
    /// Context around each tile in input pixels.
    pub pad: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Self {
            tile: DEFAULT_TILE,
            pad: DEFAULT_TILE_PAD,
        }
    }
}

impl Tiling {
    /// The whole image in one call.
    pub fn whole() -> Self {
        Self { tile: 0, pad: 0 }
    }

    /// The largest tile (a multiple of 4 input pixels, at least 32) whose working set stays
    /// within `budget` bytes: a planning estimate of three f32 feature maps of `features`
    /// channels at the output resolution of a padded tile, the largest live set of both
    /// networks (the RRDBNet's last upsample stages; the compact network's shuffle input).
    pub fn for_budget(budget: u64, features: usize, scale: usize, pad: usize) -> Self {
        let per_pixel = 3 * 4 * features.max(3 * scale * scale) as u64 * (scale * scale) as u64;
        let side = ((budget / per_pixel.max(1)) as f64).sqrt() as usize;
        let tile = side.saturating_sub(2 * pad) / GRID * GRID;
        Self {
            tile: tile.max(32),
            pad,
        }
    }
}

fn lrelu<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    activation::leaky_relu(x, 0.2)
}

/// Nearest-neighbour upsampling of `[n, c, h, w]` by `s`.
pub fn upsample_nearest<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, s, w, s])
        .reshape([n, c, s * h, s * w])
}

/// `[n, c·r², h, w]` → `[n, c, h·r, w·r]` (PyTorch's `pixel_shuffle`).
pub fn pixel_shuffle<B: Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let c = c / (r * r);
    x.reshape([n, c, r, r, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([n, c, h * r, w * r])
}

/// `[n, c, h·r, w·r]` → `[n, c·r², h, w]` (PyTorch's `pixel_unshuffle`).
pub fn pixel_unshuffle<B: Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let (h, w) = (h / r, w / r);
    x.reshape([n, c, h, r, w, r])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([n, c * r * r, h, w])
}

/// One residual dense block: five convolutions, each seeing every earlier output.
struct Dense<B: Backend> {
    convs: Vec<Conv2d<B>>,
}

impl<B: Backend> Dense<B> {
    fn load(l: &mut Loader<B>, p: &str, features: usize, growth: usize) -> Result<Self> {
        let convs = (1..=5)
            .map(|k| {
                let cin = features + (k - 1) * growth;
                let cout = if k == 5 { features } else { growth };
                l.conv2d(&format!("{p}.conv{k}"), cin, cout, 3, 1, 1)
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut seen = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(conv.forward(Tensor::cat(seen.clone(), 1)));
            seen.push(y);
        }
        self.convs[4].forward(Tensor::cat(seen, 1)).mul_scalar(0.2) + x
    }
}

struct Rrdb<B: Backend> {
    unshuffle: usize,
    first: Conv2d<B>,
    blocks: Vec<[Dense<B>; 3]>,
    body: Conv2d<B>,
    ups: Vec<Conv2d<B>>,
    hr: Conv2d<B>,
    last: Conv2d<B>,
}

impl<B: Backend> Rrdb<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.unshuffle > 1 {
            pixel_unshuffle(x, self.unshuffle)
        } else {
            x
        };
        let feat = self.first.forward(x);
        let mut trunk = feat.clone();
        for [a, b, c] in &self.blocks {
            trunk = c
                .forward(b.forward(a.forward(trunk.clone())))
                .mul_scalar(0.2)
                + trunk;
        }
        let mut feat = feat + self.body.forward(trunk);
        for up in &self.ups {
            feat = lrelu(up.forward(upsample_nearest(feat, 2)));
        }
        self.last.forward(lrelu(self.hr.forward(feat)))
    }
}

struct Compact<B: Backend> {
    scale: usize,
    convs: Vec<Conv2d<B>>,
    /// PReLU slopes after every convolution but the last.
    slopes: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Compact<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let base = upsample_nearest(x.clone(), self.scale);
        let mut h = x;
        for (conv, slope) in self.convs.iter().zip(&self.slopes) {
            h = activation::prelu(conv.forward(h), slope.clone());
        }
        let last = &self.convs[self.convs.len() - 1];
        pixel_shuffle(last.forward(h), self.scale) + base
    }
}

enum Net<B: Backend> {
    Rrdb(Rrdb<B>),
    Compact(Compact<B>),
}

/// A loaded super-resolution network.
pub struct Upscaler<B: Backend> {
    spec: UpscalerSpec,
    net: Net<B>,
    device: B::Device,
}

impl<B: Backend> Upscaler<B> {
    /// Loads the network `spec` describes from its file (f32).
    pub fn open(spec: &UpscalerSpec, device: &B::Device) -> Result<Self> {
        let file = TensorFile::open(&spec.path)?;
        Self::load(spec, &file, device)
    }

    /// Loads the network from `source`, asking for tensors by Real-ESRGAN names that
    /// [`UpscalerSpec::stored_name`] translates to the source's.
    pub fn load(
        spec: &UpscalerSpec,
        source: &dyn TensorSource,
        device: &B::Device,
    ) -> Result<Self> {
        let names = spec.clone();
        let mut l = Loader::new(source, Box::new(move |n| names.stored_name(n)), device);
        let net = match spec.network {
            UpscalerArch::Rrdb {
                features,
                blocks,
                growth,
                upsamples,
                unshuffle,
                ..
            } => {
                let f = features;
                let first = l.conv2d("conv_first", 3 * unshuffle * unshuffle, f, 3, 1, 1)?;
                let blocks = (0..blocks)
                    .map(|i| {
                        Ok([
                            Dense::load(&mut l, &format!("body.{i}.rdb1"), f, growth)?,
                            Dense::load(&mut l, &format!("body.{i}.rdb2"), f, growth)?,
                            Dense::load(&mut l, &format!("body.{i}.rdb3"), f, growth)?,
                        ])
                    })
                    .collect::<Result<_>>()?;
                let body = l.conv2d("conv_body", f, f, 3, 1, 1)?;
                let ups = (1..=upsamples)
                    .map(|k| l.conv2d(&format!("conv_up{k}"), f, f, 3, 1, 1))
                    .collect::<Result<_>>()?;
                Net::Rrdb(Rrdb {
                    unshuffle,
                    first,
                    blocks,
                    body,
                    ups,
                    hr: l.conv2d("conv_hr", f, f, 3, 1, 1)?,
                    last: l.conv2d("conv_last", f, 3, 3, 1, 1)?,
                })
            }
            UpscalerArch::Compact {
                features,
                convs,
                scale,
            } => {
                let mut layers = Vec::new();
                let mut slopes = Vec::new();
                for i in 0..=convs {
                    let cin = if i == 0 { 3 } else { features };
                    layers.push(l.conv2d(&format!("body.{}", 2 * i), cin, features, 3, 1, 1)?);
                    slopes.push(l.tensor(&format!("body.{}.weight", 2 * i + 1), [features])?);
                }
                let last = format!("body.{}", 2 * convs + 2);
                layers.push(l.conv2d(&last, features, 3 * scale * scale, 3, 1, 1)?);
                Net::Compact(Compact {
                    scale,
                    convs: layers,
                    slopes,
                })
            }
        };
        let unused = l.unused("");
        if !unused.is_empty() {
            return Err(NodeError::ModelConfig(format!(
                "{}: {} tensors the {} does not use (first: {}); refusing a file read as another network",
                spec.path.display(),
                unused.len(),
                spec.label(),
                unused[0]
            )));
        }
        Ok(Self {
            spec: spec.clone(),
            net,
            device: device.clone(),
        })
    }

    /// What was loaded.
    pub fn spec(&self) -> &UpscalerSpec {
        &self.spec
    }

    /// Output pixels per input pixel on each side.
    pub fn scale(&self) -> usize {
        self.spec.scale
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Runs the network on a whole `[1, 3, h, w]` image in `[0, 1]` (unclamped output).
    /// Pixel-unshuffle networks get their input reflect-padded to a multiple of the factor
    /// and their output cropped back, as spandrel does.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let s = self.scale();
        match &self.net {
            Net::Compact(c) => c.forward(x),
            Net::Rrdb(r) => {
                let f = r.unshuffle;
                let (ph, pw) = ((f - h % f) % f, (f - w % f) % f);
                if ph == 0 && pw == 0 {
                    return r.forward(x);
                }
                let padded = x.pad((0, pw, 0, ph), PadMode::Reflect);
                r.forward(padded).slice([0..1, 0..3, 0..h * s, 0..w * s])
            }
        }
    }

    /// Upscales a `[1, 3, h, w]` image in `[0, 1]` tile by tile (see the module docs), the
    /// output clamped to `[0, 1]`. `progress` hears (tiles done, tiles in all) before the first
    /// tile and after each; its `Break` stops the upscale with [`NodeError::Cancelled`].
    pub fn upscale(
        &self,
        image: Tensor<B, 4>,
        tiling: Tiling,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        let mut report = |done, all| match progress(done, all) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(NodeError::Cancelled),
        };
        let [_, _, h, w] = image.dims();
        let s = self.scale();
        let tile = tiling.tile.div_ceil(GRID) * GRID;
        if tile == 0 || (h <= tile && w <= tile) {
            report(0, 1)?;
            let out = self.forward(image).clamp(0.0, 1.0);
            report(1, 1)?;
            return Ok(out);
        }
        let pad = tiling.pad.div_ceil(GRID) * GRID;
        let (rows, cols) = (h.div_ceil(tile), w.div_ceil(tile));
        let mut done = 0;
        report(done, rows * cols)?;
        let mut bands = Vec::with_capacity(rows);
        for ty in 0..rows {
            let (y0, y1) = (ty * tile, ((ty + 1) * tile).min(h));
            let (cy0, cy1) = (y0.saturating_sub(pad), (y1 + pad).min(h));
            let mut band = Vec::with_capacity(cols);
            for tx in 0..cols {
                let (x0, x1) = (tx * tile, ((tx + 1) * tile).min(w));
                let (cx0, cx1) = (x0.saturating_sub(pad), (x1 + pad).min(w));
                let context = image.clone().slice([0..1, 0..3, cy0..cy1, cx0..cx1]);
                let out = self.forward(context);
                let (oy, ox) = ((y0 - cy0) * s, (x0 - cx0) * s);
                band.push(out.slice([0..1, 0..3, oy..oy + (y1 - y0) * s, ox..ox + (x1 - x0) * s]));
                done += 1;
                report(done, rows * cols)?;
            }
            bands.push(Tensor::cat(band, 3));
        }
        Ok(Tensor::cat(bands, 2).clamp(0.0, 1.0))
    }

    /// Upscales RGB8 pixels (`width·height·3` bytes) to RGB8 pixels of `scale`× the sides.
    pub fn upscale_rgb8(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        tiling: Tiling,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Vec<u8>> {
        if rgb.len() != width * height * 3 {
            return Err(NodeError::Render(format!(
                "upscale input holds {} bytes, not {width}×{height} RGB",
                rgb.len()
            )));
        }
        let image = rgb8_to_tensor::<B>(rgb, width, height, &self.device);
        tensor_to_rgb8(self.upscale(image, tiling, progress)?)
    }
}

/// RGB8 pixels → `[1, 3, h, w]` f32 in `[0, 1]`.
pub fn rgb8_to_tensor<B: Backend>(
    rgb: &[u8],
    width: usize,
    height: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let plane = width * height;
    let mut chw = vec![0.0f32; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = f32::from(px[c]) / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, height, width]), device)
}

/// `[1, 3, h, w]` in `[0, 1]` → RGB8 pixels (rounded, clamped).
pub fn tensor_to_rgb8<B: Backend>(t: Tensor<B, 4>) -> Result<Vec<u8>> {
    let [_, _, h, w] = t.dims();
    let values: Vec<f32> = t
        .cast(DType::F32)
        .into_data()
        .into_vec()
        .map_err(|e| NodeError::Render(format!("reading the upscaled image: {e:?}")))?;
    let plane = h * w;
    let mut rgb = vec![0u8; 3 * plane];
    for i in 0..plane {
        for c in 0..3 {
            rgb[3 * i + c] = (values[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Ok(rgb)
}

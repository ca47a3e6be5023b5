//! Super-resolution on the RK3588 NPU: an `.rknn` network with one fixed input `[1, 3, h, w]`
//! (RGB in `[0, 1]`, any layout and type the runtime takes) and one output `[1, 3, s·h, s·w]`.
//! Images are cut into tiles of the model's own size, each holding `pad` pixels of real image
//! around its core (tiles at the border are shifted inward to stay inside the image, where the
//! network's zero padding applies as it would untiled); only each core's output is kept.
//! Images smaller than a tile are extended by repeating their edges. Where `pad` covers the
//! network's receptive field the result equals an untiled run.
//!
//! [`NpuUpscalers`] is the node's post-processor for `.rknn` files named in `UPSCALER`: one
//! thread owns their contexts and serves every worker's requests in turn.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use drover_shared::job::UpscaleSpec;

use super::api::{CoreMask, RknnApi};
use super::model::{HostTensor, RknnModel, logical_dims};
use crate::error::{NodeError, Result};
use crate::render::Image;
use crate::upscaling::{PostProcess, Upscaled, run_plan};

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

/// A request to the NPU upscaling thread.
struct Request {
    image: Image,
    spec: UpscaleSpec,
    cancel: Arc<AtomicBool>,
    reply: mpsc::Sender<Reply>,
}

/// What the NPU upscaling thread answers: tiles as they finish, then the result.
enum Reply {
    Progress(usize, usize),
    Done(Result<(Image, Upscaled)>),
}

/// An upscaler's name, scale, tile and measured speed.
type Loaded = (String, usize, (usize, usize), f64);

/// The node's `.rknn` upscalers, each on its own NPU context, all on one thread of their own
/// (contexts never cross threads); workers hand it images through a channel and hear its
/// tiles back, so a cancel stops it between tiles.
pub struct NpuUpscalers {
    requests: mpsc::Sender<Request>,
    loaded: Vec<Loaded>,
}

impl NpuUpscalers {
    /// Loads every `(name, path)` on the thread it starts (the runtime picks the cores),
    /// measures each on a 64×64 image, and answers once all are ready (or the first failure).
    pub fn start(api: Arc<dyn RknnApi>, files: &[(String, PathBuf)], pad: usize) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<Loaded>>>();
        let (requests, inbox) = mpsc::channel::<Request>();
        let files = files.to_vec();
        std::thread::Builder::new()
            .name("npu-upscale".into())
            .spawn(move || {
                let mut nets = Vec::new();
                let loaded = files
                    .iter()
                    .map(|(name, path)| {
                        let mut net = RknnUpscaler::load(api.clone(), path, CoreMask::Auto)?;
                        let grey = vec![128u8; 64 * 64 * 3];
                        let started = std::time::Instant::now();
                        net.upscale_rgb8(&grey, 64, 64, pad, |_, _| ControlFlow::Continue(()))?;
                        let ms = started.elapsed().as_secs_f64() * 1000.0 / (64.0 * 64.0 / 1e6);
                        let info = (name.clone(), net.scale(), net.tile(), ms);
                        nets.push((name.clone(), net));
                        Ok(info)
                    })
                    .collect::<Result<Vec<Loaded>>>();
                let ok = loaded.is_ok();
                let _ = ready_tx.send(loaded);
                if !ok {
                    return;
                }
                for r in inbox {
                    let at = match r.spec.model.as_deref() {
                        Some(n) => nets.iter().position(|(have, _)| have == n),
                        None => (!nets.is_empty()).then_some(0),
                    };
                    let found = at.and_then(|i| nets.get_mut(i));
                    let result = match found {
                        None => Err(NodeError::InvalidJob(format!(
                            "upscaler `{}` is not on this node's NPU",
                            r.spec.model.as_deref().unwrap_or("any")
                        ))),
                        Some((name, net)) => {
                            let scale = net.scale();
                            let (reply, cancel) = (&r.reply, &r.cancel);
                            let mut tiles = |done: usize, all: usize| {
                                let _ = reply.send(Reply::Progress(done, all));
                                if cancel.load(Ordering::SeqCst) {
                                    ControlFlow::Break(())
                                } else {
                                    ControlFlow::Continue(())
                                }
                            };
                            run_plan(r.image, &r.spec, name, scale, &mut tiles, &mut |rgb, t| {
                                net.upscale_rgb8(&rgb.pixels, rgb.width, rgb.height, pad, t)
                            })
                        }
                    };
                    let _ = r.reply.send(Reply::Done(result));
                }
            })
            .map_err(|e| NodeError::Backend {
                backend: "rknn",
                message: format!("starting the npu upscaling thread: {e}"),
            })?;
        let loaded = ready_rx.recv().map_err(|_| NodeError::Backend {
            backend: "rknn",
            message: "the npu upscaling thread stopped while loading".into(),
        })??;
        for (name, scale, tile, ms) in &loaded {
            tracing::info!(upscaler = %name, scale, tile = ?tile, ms_per_megapixel = *ms as u64, "npu upscaler loaded and measured");
        }
        Ok(Self { requests, loaded })
    }

    /// Upscaler `name`'s scale and tile (height, width), when it is here.
    pub fn shape(&self, name: &str) -> Option<(usize, (usize, usize))> {
        self.loaded
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, s, t, _)| (*s, *t))
    }
}

impl PostProcess for NpuUpscalers {
    fn upscale(
        &self,
        image: Image,
        spec: &UpscaleSpec,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Image, Upscaled)> {
        let gone = || NodeError::Render("the npu upscaling thread stopped".into());
        let (reply, answers) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.requests
            .send(Request {
                image,
                spec: spec.clone(),
                cancel: cancel.clone(),
                reply,
            })
            .map_err(|_| gone())?;
        for answer in answers {
            match answer {
                Reply::Progress(done, all) => {
                    if progress(done, all).is_break() {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
                Reply::Done(result) => return result,
            }
        }
        Err(gone())
    }

    fn ms_per_megapixel(&self, name: &str) -> f64 {
        self.loaded
            .iter()
            .find(|(n, ..)| n == name)
            .map_or(0.0, |(.., ms)| *ms)
    }

    fn holds(&self, name: Option<&str>) -> bool {
        match name {
            Some(n) => self.loaded.iter().any(|(have, ..)| have == n),
            None => !self.loaded.is_empty(),
        }
    }
}

//! The node's upscalers: `UPSCALER` names super-resolution files (ESRGAN-family and compact
//! Real-ESRGAN networks, [`crate::burn::upscale`]); the factory loads them once, and every worker
//! runs a job's `upscale` on its rendered image through [`PostProcess`] before encoding it.
//!
//! Upscalers run on Burn whatever renders the images: on the GPU of a cuda node, on the CPU
//! otherwise (rknn and sim nodes included; an RKNN super-resolution model is not supported yet).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use drover_shared::detect::upscaler::{UpscalerArch, UpscalerSpec, inspect_upscaler};
use drover_shared::image::{ResizeMode, Rgb, resize};
use drover_shared::job::UpscaleSpec;
use drover_shared::job::upscale::MAX_UPSCALED_PIXELS;

use crate::burn::upscale::{DEFAULT_TILE_PAD, Tiling, Upscaler};
use crate::config::NodeConfig;
use crate::error::{NodeError, Result};
use crate::render::Image;

mod tools;

pub use tools::{UpscaleRun, make_upscaler, png_of, text_chunks, upscale_cli};

/// An upscaler the node was configured with.
#[derive(Clone, Debug, PartialEq)]
pub struct UpscalerEntry {
    /// Its name in the farm: the file's stem.
    pub name: String,
    /// The file and what runs it.
    pub file: UpscalerFile,
    /// Output pixels per input pixel on each side (an `.rknn` file's once loaded).
    pub scale: usize,
    /// The network, in a few words.
    pub network: String,
    /// Measured once loaded: milliseconds per input megapixel of one pass (0 before).
    pub ms_per_megapixel: f64,
}

/// What an upscaler file is.
#[derive(Clone, Debug, PartialEq)]
pub enum UpscalerFile {
    /// A safetensors network Burn runs (its header's reading).
    Burn(UpscalerSpec),
    /// An `.rknn` network the NPU runs (its shapes are read when it loads).
    Rknn(PathBuf),
}

/// What an upscale did, for the PNG's text chunks.
#[derive(Clone, Debug, PartialEq)]
pub struct Upscaled {
    /// Upscaler name.
    pub upscaler: String,
    /// Passes run.
    pub passes: u32,
    /// Final size relative to the generated image.
    pub factor: f64,
    /// The upscaled image's size.
    pub source_size: (u32, u32),
}

/// Runs a job's `upscale` on its rendered image. Shared by every worker of the node.
pub trait PostProcess: Send + Sync {
    /// Upscales `image` as `spec` asks. `progress(done, all)` is called before the first tile
    /// and after every tile of every pass; its `Break` cancels. Requests this node cannot serve
    /// (an unknown upscaler, too many passes, a result past the pixel limit) are refused with
    /// [`NodeError::InvalidJob`].
    fn upscale(
        &self,
        image: Image,
        spec: &UpscaleSpec,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Image, Upscaled)>;

    /// Milliseconds per input megapixel of one pass of upscaler `name`, measured at load.
    fn ms_per_megapixel(&self, name: &str) -> f64;

    /// Whether it holds upscaler `name` (`None`: any).
    fn holds(&self, name: Option<&str>) -> bool;
}

/// The upscalers `UPSCALER` names, in order: each a `.safetensors` (Burn) or `.rknn` (NPU) file
/// under `MODEL_ROOT` (`x4`, `x4.safetensors`, `x4.rknn`), or a path. Names must be unique; files that are not upscalers
/// are refused with the reason.
pub fn configured(config: &NodeConfig) -> Result<Vec<UpscalerEntry>> {
    let Some(list) = config.upscaler.as_deref() else {
        return Ok(Vec::new());
    };
    let mut entries: Vec<UpscalerEntry> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let path = locate(config.model_root.as_deref(), item)?;
        // Named by the file's stem, or by its folder when the item names the folder.
        let named = if path.file_stem().is_some_and(|s| s == item) {
            path.clone()
        } else {
            path.parent()
                .filter(|p| p.file_name().is_some_and(|f| f == item) || *p == Path::new(item))
                .map_or_else(|| path.clone(), Path::to_path_buf)
        };
        let name = named
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if entries.iter().any(|e| e.name == name) {
            return Err(NodeError::Config(format!(
                "UPSCALER names `{name}` twice; upscaler names (file stems) must be unique"
            )));
        }
        if path.extension().is_some_and(|e| e == "rknn") {
            tracing::info!(upscaler = %name, path = %path.display(), "npu upscaler found");
            entries.push(UpscalerEntry {
                name,
                file: UpscalerFile::Rknn(path),
                scale: 0,
                network: "RKNN network".into(),
                ms_per_megapixel: 0.0,
            });
            continue;
        }
        let spec = inspect_upscaler(&path)
            .map_err(|e| NodeError::Config(format!("UPSCALER `{item}`: {e}")))?;
        tracing::info!(upscaler = %name, network = %spec.label(), path = %path.display(), "upscaler found");
        entries.push(UpscalerEntry {
            name,
            scale: spec.scale,
            network: spec.label(),
            file: UpscalerFile::Burn(spec),
            ms_per_megapixel: 0.0,
        });
    }
    Ok(entries)
}

fn locate(root: Option<&Path>, item: &str) -> Result<PathBuf> {
    let given = PathBuf::from(item);
    let mut candidates = Vec::new();
    if given.is_absolute() || item.contains('/') {
        candidates.push(given.clone());
    }
    if let Some(root) = root {
        candidates.push(root.join(item));
        candidates.push(root.join(format!("{item}.safetensors")));
        candidates.push(root.join(format!("{item}.rknn")));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    // A folder holding one network (named by the folder).
    if let Some(dir) = candidates.iter().find(|p| p.is_dir()) {
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| NodeError::Config(format!("UPSCALER `{item}`: {}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| e == "safetensors" || e == "rknn")
            })
            .collect();
        return match files.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(NodeError::Config(format!(
                "UPSCALER `{item}`: the folder {} holds {} .safetensors/.rknn files; an upscaler \
                 folder holds one",
                dir.display(),
                files.len()
            ))),
        };
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        NodeError::Config(match root {
            Some(root) => format!(
                "UPSCALER `{item}`: no {item}, {item}.safetensors or {item}.rknn under MODEL_ROOT {}",
                root.display()
            ),
            None => format!(
                "UPSCALER `{item}`: not a file (set MODEL_ROOT, or give the upscaler's path)"
            ),
        })
    })
}

/// The tile size (`UPSCALE_TILE`, input pixels, 0: whole images) or, when unset, the largest
/// that keeps the working set within `UPSCALE_MEMORY` bytes for the widest of `entries`.
pub fn tiling(config: &NodeConfig, entries: &[UpscalerEntry]) -> Tiling {
    let pad = config.upscale_tile_pad.unwrap_or(DEFAULT_TILE_PAD);
    if let Some(tile) = config.upscale_tile {
        return Tiling { tile, pad };
    }
    entries
        .iter()
        .map(|e| tiling_for(e, config.upscale_memory, pad))
        .min_by_key(|t| t.tile)
        .unwrap_or_default()
}

/// Side of the image an upscaler's speed is measured on at load.
const MEASURE_SIDE: usize = 64;

/// Loaded upscalers on one Burn backend.
pub struct Upscalers<B: Backend> {
    nets: Vec<(String, Upscaler<B>, f64)>,
    tiling: Tiling,
}

impl<B: Backend> Upscalers<B> {
    /// Loads every entry on `device` (f32) and measures each: a 64×64 image twice (the first
    /// compiles kernels on GPUs), the second timed.
    pub fn load(entries: &[UpscalerEntry], device: &B::Device, tiling: Tiling) -> Result<Self> {
        let grey = vec![128u8; MEASURE_SIDE * MEASURE_SIDE * 3];
        let nets = entries
            .iter()
            .filter_map(|e| match &e.file {
                UpscalerFile::Burn(spec) => Some((e, spec)),
                UpscalerFile::Rknn(_) => None,
            })
            .map(|(e, spec)| {
                let net = Upscaler::open(spec, device)?;
                let go = |_: usize, _: usize| ControlFlow::Continue(());
                let whole = Tiling::whole();
                net.upscale_rgb8(&grey, MEASURE_SIDE, MEASURE_SIDE, whole, go)?;
                let started = std::time::Instant::now();
                net.upscale_rgb8(&grey, MEASURE_SIDE, MEASURE_SIDE, whole, go)?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let ms_per_megapixel = ms / ((MEASURE_SIDE * MEASURE_SIDE) as f64 / 1e6);
                tracing::info!(upscaler = %e.name, ms_per_megapixel = ms_per_megapixel as u64, "upscaler loaded and measured");
                Ok((e.name.clone(), net, ms_per_megapixel))
            })
            .collect::<Result<_>>()?;
        Ok(Self { nets, tiling })
    }

    fn find(&self, name: Option<&str>) -> Result<(&String, &Upscaler<B>)> {
        let found = match name {
            Some(n) => self.nets.iter().find(|(have, _, _)| have == n),
            None => self.nets.first(),
        };
        found.map(|(n, net, _)| (n, net)).ok_or_else(|| {
            let have: Vec<&str> = self.nets.iter().map(|(n, _, _)| n.as_str()).collect();
            NodeError::InvalidJob(format!(
                "upscaler `{}` is not on this node (it has: {})",
                name.unwrap_or("any"),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ))
        })
    }
}

impl<B: Backend> PostProcess for Upscalers<B>
where
    Upscaler<B>: Send + Sync,
{
    fn upscale(
        &self,
        image: Image,
        spec: &UpscaleSpec,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Image, Upscaled)> {
        let (name, net) = self.find(spec.model.as_deref())?;
        run_plan(
            image,
            spec,
            name,
            net.scale(),
            progress,
            &mut |rgb, tiles| {
                net.upscale_rgb8(&rgb.pixels, rgb.width, rgb.height, self.tiling, tiles)
            },
        )
    }

    fn holds(&self, name: Option<&str>) -> bool {
        self.find(name).is_ok()
    }

    fn ms_per_megapixel(&self, name: &str) -> f64 {
        self.nets
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0.0, |(_, _, ms)| *ms)
    }
}

/// One pass of an upscaler over an image; its tiles reported as (done, all).
pub type Pass<'a> =
    dyn FnMut(&Rgb, &mut dyn FnMut(usize, usize) -> ControlFlow<()>) -> Result<Vec<u8>> + 'a;

/// Runs `spec` on `image` with upscaler `name` of `scale`, whose one pass is `pass`: plans the
/// passes, refuses a result past [`MAX_UPSCALED_PIXELS`], reports every pass's tiles as one
/// count, resizes the last output down to a fractional scale. Shared by every backend.
pub fn run_plan(
    image: Image,
    spec: &UpscaleSpec,
    name: &str,
    scale: usize,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    pass: &mut Pass<'_>,
) -> Result<(Image, Upscaled)> {
    let plan = spec
        .plan(scale as u32)
        .map_err(|m| NodeError::InvalidJob(format!("upscale with `{name}`: {m}")))?;
    let size = drover_shared::job::Size {
        width: image.width as u32,
        height: image.height as u32,
    };
    let (w, h) = plan.output(size);
    if w * h > MAX_UPSCALED_PIXELS {
        return Err(NodeError::InvalidJob(format!(
            "upscaled image {w}x{h} is over the limit of {MAX_UPSCALED_PIXELS} pixels"
        )));
    }
    let passes = plan.passes as usize;
    let mut rgb = Rgb {
        width: image.width,
        height: image.height,
        pixels: image.rgb,
    };
    for k in 0..passes {
        let pixels = pass(&rgb, &mut |done, all| {
            progress(k * all + done, passes * all)
        })?;
        rgb = Rgb {
            width: rgb.width * scale,
            height: rgb.height * scale,
            pixels,
        };
    }
    let (w, h) = (w as usize, h as usize);
    if (rgb.width, rgb.height) != (w, h) {
        rgb = resize(&rgb, w, h, ResizeMode::Resize);
    }
    let upscaled = Upscaled {
        upscaler: name.to_string(),
        passes: plan.passes,
        factor: plan.factor,
        source_size: (size.width, size.height),
    };
    Ok((
        Image {
            width: rgb.width,
            height: rgb.height,
            rgb: rgb.pixels,
            truncated_tokens: image.truncated_tokens,
        },
        upscaled,
    ))
}

/// Several post-processors as one (Burn's and the NPU's): each request goes to the one that
/// holds the upscaler; `default` is the node's first upscaler, for requests naming none.
pub struct Combined {
    parts: Vec<Arc<dyn PostProcess>>,
    default: String,
}

impl PostProcess for Combined {
    fn upscale(
        &self,
        image: Image,
        spec: &UpscaleSpec,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Image, Upscaled)> {
        let name = spec.model.as_deref().unwrap_or(&self.default);
        let named = UpscaleSpec {
            model: Some(name.to_string()),
            ..spec.clone()
        };
        match self.parts.iter().find(|p| p.holds(Some(name))) {
            Some(part) => part.upscale(image, &named, progress),
            None => Err(NodeError::InvalidJob(format!(
                "upscaler `{name}` is not on this node"
            ))),
        }
    }

    fn ms_per_megapixel(&self, name: &str) -> f64 {
        self.parts
            .iter()
            .find(|p| p.holds(Some(name)))
            .map_or(0.0, |p| p.ms_per_megapixel(name))
    }

    fn holds(&self, name: Option<&str>) -> bool {
        self.parts.iter().any(|p| p.holds(name))
    }
}

/// Loads the configured upscalers for a node of `backend`: on the first CUDA device for cuda
/// nodes (with the `cuda` feature), on the CPU otherwise. `None` when `UPSCALER` names none.
pub fn load(
    config: &NodeConfig,
    entries: &mut [UpscalerEntry],
    cuda: bool,
) -> Result<Option<Arc<dyn PostProcess>>> {
    let Some(first) = entries.first() else {
        return Ok(None);
    };
    let default = first.name.clone();
    let mut parts = Vec::new();
    if let Some(burn) = load_burn(config, entries, cuda)? {
        parts.push(burn);
    }
    let npu: Vec<(String, PathBuf)> = entries
        .iter()
        .filter_map(|e| match &e.file {
            UpscalerFile::Rknn(path) => Some((e.name.clone(), path.clone())),
            UpscalerFile::Burn(_) => None,
        })
        .collect();
    if !npu.is_empty() {
        let pad = config.upscale_tile_pad.unwrap_or(DEFAULT_TILE_PAD);
        let npu = load_npu(config, &npu, pad)?;
        for e in entries.iter_mut() {
            if let Some((scale, tile)) = npu.shape(&e.name) {
                e.scale = scale;
                e.network = format!("RKNN network ×{scale} ({}×{} tiles)", tile.0, tile.1);
            }
        }
        parts.push(Arc::new(npu));
    }
    for e in entries.iter_mut() {
        e.ms_per_megapixel = parts
            .iter()
            .find(|p| p.holds(Some(&e.name)))
            .map_or(0.0, |p| p.ms_per_megapixel(&e.name));
    }
    Ok(Some(Arc::new(Combined { parts, default })))
}

#[cfg(feature = "rknn")]
fn load_npu(
    config: &NodeConfig,
    npu: &[(String, PathBuf)],
    pad: usize,
) -> Result<crate::rknn::upscale::NpuUpscalers> {
    let api = crate::rknn::ffi::RknnLibrary::open(config.rknn_library.as_deref())?;
    crate::rknn::upscale::NpuUpscalers::start(api, npu, pad)
}

#[cfg(not(feature = "rknn"))]
fn load_npu(_: &NodeConfig, npu: &[(String, PathBuf)], _: usize) -> Result<NoNpu> {
    Err(NodeError::Config(format!(
        "UPSCALER names the .rknn file {}, and this drover-node was built without the `rknn` feature",
        npu[0].1.display()
    )))
}

/// Stands in for the NPU's upscalers in builds without `rknn` (never made).
#[cfg(not(feature = "rknn"))]
enum NoNpu {}

#[cfg(not(feature = "rknn"))]
impl NoNpu {
    fn shape(&self, _: &str) -> Option<(usize, (usize, usize))> {
        match *self {}
    }
}

#[cfg(not(feature = "rknn"))]
impl PostProcess for NoNpu {
    fn upscale(
        &self,
        _: Image,
        _: &UpscaleSpec,
        _: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Image, Upscaled)> {
        match *self {}
    }

    fn ms_per_megapixel(&self, _: &str) -> f64 {
        match *self {}
    }

    fn holds(&self, _: Option<&str>) -> bool {
        match *self {}
    }
}

/// The Burn upscalers among `entries`, on the cuda node's GPU or the CPU.
fn load_burn(
    config: &NodeConfig,
    entries: &[UpscalerEntry],
    cuda: bool,
) -> Result<Option<Arc<dyn PostProcess>>> {
    let burn: Vec<UpscalerEntry> = entries
        .iter()
        .filter(|e| matches!(e.file, UpscalerFile::Burn(_)))
        .cloned()
        .collect();
    if burn.is_empty() {
        return Ok(None);
    }
    let entries = &burn[..];
    let tiling = tiling(config, entries);
    tracing::info!(
        upscalers = entries.len(),
        tile = tiling.tile,
        pad = tiling.pad,
        "upscalers loading"
    );
    #[cfg(feature = "cuda")]
    if cuda {
        let set = Upscalers::<crate::burn::Gpu>::load(entries, &Default::default(), tiling)?;
        return Ok(Some(Arc::new(set)));
    }
    let _ = cuda;
    let set = Upscalers::<crate::burn::Cpu>::load(entries, &Default::default(), tiling)?;
    Ok(Some(Arc::new(set)))
}

fn tiling_for(entry: &UpscalerEntry, budget: u64, pad: usize) -> Tiling {
    let features = match &entry.file {
        UpscalerFile::Burn(spec) => match spec.network {
            UpscalerArch::Rrdb { features, .. } | UpscalerArch::Compact { features, .. } => {
                features
            }
        },
        UpscalerFile::Rknn(_) => 64,
    };
    Tiling::for_budget(budget, features, entry.scale.max(1), pad)
}

#[cfg(test)]
mod tests;

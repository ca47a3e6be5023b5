//! The upscaler tools: `make-upscaler` (a random-weight network), `upscale` (one image, timed)
//! and the PNG text chunks an upscaled image carries.

use crate::burn::upscale::{Tiling, Upscaler};
use crate::config::NodeConfig;
use crate::error::{NodeError, Result};
use crate::render::Image;
use drover_shared::detect::upscaler::{UpscalerArch, UpscalerSpec, inspect_upscaler};
use drover_shared::job::UpscaleSpec;
use std::ops::ControlFlow;
use std::path::Path;

use super::*;

/// Writes a random-weight upscaler of `scale` (`x1`, `x2`, `x4`) to `out` (a `.safetensors`
/// file, or a folder that gets `model.safetensors`): a compact SRVGGNet
/// (`arch` `compact`, realesr-general-x4v3's shape by default) or an RRDBNet (`rrdb`,
/// RealESRGAN_x4plus's), Real-ESRGAN names, f16. The compact one's residual is scaled down so
/// its output is the nearest-upscaled input plus faint noise; neither restores anything. Returns
/// the network's label, read back from the written header.
pub fn make_upscaler(
    out: &Path,
    seed: u64,
    scale: &str,
    arch: &str,
    features: Option<usize>,
    depth: Option<usize>,
) -> Result<String> {
    let scale: usize = match scale {
        "x1" => 1,
        "x2" => 2,
        "x4" => 4,
        other => {
            return Err(NodeError::Config(format!(
                "upscaler scale {other}: x1, x2 or x4"
            )));
        }
    };
    let features = features.unwrap_or(64);
    let network = match arch {
        "compact" => UpscalerArch::Compact {
            features,
            convs: depth.unwrap_or(32),
            scale,
        },
        "rrdb" => UpscalerArch::Rrdb {
            features,
            blocks: depth.unwrap_or(23),
            growth: 32,
            upsamples: 2,
            unshuffle: 4 / scale,
            naming: drover_shared::detect::upscaler::RrdbNaming::RealEsrgan,
        },
        other => {
            return Err(NodeError::Config(format!(
                "upscaler network {other}: compact or rrdb"
            )));
        }
    };
    if features == 0 || features > 256 {
        return Err(NodeError::Config(format!("{features} features: 1..=256")));
    }
    // A path without `.safetensors` is a folder for the network (named by the folder).
    let file = if out.extension().is_some_and(|e| e == "safetensors") {
        out.to_path_buf()
    } else {
        out.join("model.safetensors")
    };
    let out = file.as_path();
    let spec = UpscalerSpec {
        path: out.to_path_buf(),
        network,
        scale,
        dtype: None,
        parameters: 0,
        weights_bytes: 0,
        model_id: String::new(),
    };
    let random = crate::burn::weights::RandomWeights::new(seed);
    Upscaler::<crate::burn::Cpu>::load(&spec, &random, &Default::default())?;
    let last = match spec.network {
        UpscalerArch::Compact { convs, .. } => format!("body.{}", 2 * convs + 2),
        UpscalerArch::Rrdb { .. } => "conv_last".to_string(),
    };
    let mut tensors = random.take();
    for (name, t) in &mut tensors {
        if t.shape.len() == 1 && name.ends_with(".weight") {
            // PReLU slopes: PyTorch's initial 0.25 (the generator's 1.0 would make the body
            // linear).
            t.data.iter_mut().for_each(|v| *v = 0.25);
        } else if name == &format!("{last}.weight") {
            t.data.iter_mut().for_each(|v| *v *= 0.1);
        } else if name == &format!("{last}.bias")
            && matches!(spec.network, UpscalerArch::Rrdb { .. })
        {
            t.data.iter_mut().for_each(|v| *v = 0.5);
        }
    }
    crate::tools::write_f16(out, &tensors)?;
    let written = inspect_upscaler(out)?;
    if written.network != spec.network {
        return Err(NodeError::Weights(format!(
            "{} reads back as {}, not the network written",
            out.display(),
            written.label()
        )));
    }
    Ok(written.label())
}

/// What `drover-node upscale` runs.
pub struct UpscaleRun<'a> {
    /// The upscaler file.
    pub model: &'a Path,
    /// The image to upscale.
    pub image: &'a Path,
    /// The PNG to write.
    pub out: &'a Path,
    /// Passes and scale.
    pub spec: UpscaleSpec,
    /// Tile side (`None`: the memory budget's).
    pub tile: Option<usize>,
    /// Context around each tile.
    pub pad: usize,
    /// Untimed runs first.
    pub warmup: usize,
}

/// Upscales one image on the CPU and reports the time per input megapixel (one JSON line).
pub fn upscale_cli(run: &UpscaleRun<'_>) -> Result<String> {
    let io = |p: &Path, e: std::io::Error| NodeError::Config(format!("{}: {e}", p.display()));
    let spec = inspect_upscaler(run.model)?;
    let entry = UpscalerEntry {
        ms_per_megapixel: 0.0,
        scale: spec.scale,
        network: spec.label(),
        name: run
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file: UpscalerFile::Burn(spec),
    };
    let bytes = std::fs::read(run.image).map_err(|e| io(run.image, e))?;
    let rgb = drover_shared::image::decode(&bytes)
        .map_err(|e| NodeError::InvalidJob(format!("{}: {e}", run.image.display())))?;
    let tiling = match run.tile {
        Some(tile) => Tiling { tile, pad: run.pad },
        None => tiling_for(&entry, NodeConfig::default_upscale_memory(), run.pad),
    };
    let started = std::time::Instant::now();
    let set = Upscalers::<crate::burn::Cpu>::load(
        std::slice::from_ref(&entry),
        &Default::default(),
        tiling,
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let image = || Image {
        width: rgb.width,
        height: rgb.height,
        rgb: rgb.pixels.clone(),
        truncated_tokens: 0,
    };
    let mut go = |_: usize, _: usize| ControlFlow::Continue(());
    for _ in 0..run.warmup {
        set.upscale(image(), &run.spec, &mut go)?;
    }
    let started = std::time::Instant::now();
    let (out, done) = set.upscale(image(), &run.spec, &mut go)?;
    let upscale_ms = started.elapsed().as_secs_f64() * 1000.0;
    let png = png_of(&out, &done, "cpu", &text_chunks(&bytes))?;
    std::fs::write(run.out, png).map_err(|e| io(run.out, e))?;
    let megapixels = (rgb.width * rgb.height) as f64 / 1e6;
    Ok(format!(
        "{}\n",
        serde_json::json!({
            "model": run.model.display().to_string(), "network": entry.network,
            "input": format!("{}x{}", rgb.width, rgb.height),
            "output": format!("{}x{}", out.width, out.height),
            "passes": done.passes, "tile": tiling.tile, "pad": tiling.pad,
            "load_ms": load_ms, "upscale_ms": upscale_ms,
            "ms_per_input_megapixel": upscale_ms / megapixels / f64::from(done.passes),
            "out": run.out.display().to_string(),
        })
    ))
}

/// The text chunks of a PNG (`tEXt`, `zTXt`, `iTXt` before its image data), in order; none
/// for other formats or unreadable ones.
pub fn text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let Ok(reader) = png::Decoder::new(std::io::Cursor::new(bytes)).read_info() else {
        return Vec::new();
    };
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    out.extend(
        info.compressed_latin1_text
            .iter()
            .filter_map(|t| Some((t.keyword.clone(), t.get_text().ok()?))),
    );
    out.extend(
        info.utf8_text
            .iter()
            .filter_map(|t| Some((t.keyword.clone(), t.get_text().ok()?))),
    );
    out
}

/// Text chunks a stand-alone upscale writes itself (a source's own are not carried over).
const UPSCALE_KEYS: [&str; 7] = [
    "Software",
    "mode",
    "upscaler",
    "upscale_passes",
    "upscale",
    "source_size",
    "size",
];

/// A PNG of a stand-alone upscale: the source's text chunks (`carried`: a render's prompt,
/// seed, ... when the upscale follows it), then chunks naming the software (and `backend`),
/// the upscaler, its passes, the final scale and the source's size.
pub fn png_of(
    image: &Image,
    done: &Upscaled,
    backend: &str,
    carried: &[(String, String)],
) -> Result<Vec<u8>> {
    let render = |e: png::EncodingError| NodeError::Render(e.to_string());
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in carried
        .iter()
        .filter(|(k, _)| !UPSCALE_KEYS.contains(&k.as_str()))
    {
        encoder
            .add_itxt_chunk(key.clone(), value.clone())
            .map_err(render)?;
    }
    for (key, value) in [
        (
            "Software",
            format!("drover {} ({backend} backend)", drover_shared::VERSION),
        ),
        ("mode", "upscale".to_string()),
        ("upscaler", done.upscaler.clone()),
        ("upscale_passes", done.passes.to_string()),
        ("upscale", done.factor.to_string()),
        (
            "source_size",
            format!("{}x{}", done.source_size.0, done.source_size.1),
        ),
        ("size", format!("{}x{}", image.width, image.height)),
    ] {
        encoder
            .add_itxt_chunk(key.to_string(), value)
            .map_err(render)?;
    }
    let mut writer = encoder.write_header().map_err(render)?;
    writer.write_image_data(&image.rgb).map_err(render)?;
    writer.finish().map_err(render)?;
    Ok(out)
}

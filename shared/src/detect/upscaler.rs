//! Super-resolution networks recognised from safetensors headers alone: ESRGAN-family RRDBNets
//! (Real-ESRGAN ×1/×2/×4 with pixel-unshuffle, ESRGAN's original `model.*` names, BSRGAN's
//! `RRDB_trunk` names) and Real-ESRGAN's compact SRVGGNet ("realesr-general", "animevideov3").
//! Every hyper-parameter the network needs comes from tensor shapes; what the header cannot
//! support is refused with the reason.
//!
//! Names: a loader asks for the Real-ESRGAN (`basicsr`) names — `conv_first`,
//! `body.{i}.rdb{j}.conv{k}`, `conv_body`, `conv_up{k}`, `conv_hr`, `conv_last`, or the compact
//! network's `body.{i}` — and [`UpscalerSpec::stored_name`] translates them to the file's.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{DetectError, header};
use crate::safetensors::{Dtype, Header};

/// How an RRDBNet file names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RrdbNaming {
    /// Real-ESRGAN / basicsr (`conv_first`, `body.N.rdbM.convK`, `conv_up1`, `conv_hr`).
    RealEsrgan,
    /// The original ESRGAN sequential names (`model.0`, `model.1.sub.N.RDBM.convK.0`).
    Esrgan,
    /// BSRGAN / RealSR (`RRDB_trunk.N.RDBM.convK`, `trunk_conv`, `upconv1`, `HRconv`).
    Bsrgan,
}

/// The network a super-resolution file holds, with the shapes that build it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "arch")]
pub enum UpscalerArch {
    /// ESRGAN's residual-in-residual dense network.
    Rrdb {
        /// Feature channels (`num_feat`, 64 in the released models).
        features: usize,
        /// RRDB blocks (`num_block`, 23 in the released ×4 models).
        blocks: usize,
        /// Growth channels of each dense block's convolutions (`num_grow_ch`, 32).
        growth: usize,
        /// Nearest ×2 upsample + convolution stages after the body.
        upsamples: usize,
        /// Pixel-unshuffle factor applied to the input (1, 2 or 4: Real-ESRGAN ×2 and ×1).
        unshuffle: usize,
        /// Tensor naming.
        naming: RrdbNaming,
    },
    /// Real-ESRGAN's SRVGGNetCompact: convolutions with PReLU, then a pixel shuffle, plus the
    /// nearest-upsampled input.
    Compact {
        /// Feature channels.
        features: usize,
        /// Body convolutions between the first and the last.
        convs: usize,
        /// The pixel shuffle's factor (the last convolution gives `3·scale²` channels).
        scale: usize,
    },
}

/// What a super-resolution model file is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpscalerSpec {
    /// The inspected file.
    pub path: PathBuf,
    /// The network and its shapes.
    pub network: UpscalerArch,
    /// Output pixels per input pixel on each side.
    pub scale: usize,
    /// The float dtype holding most parameters.
    pub dtype: Option<Dtype>,
    /// Parameters in the file.
    pub parameters: u64,
    /// Bytes of weights as stored.
    pub weights_bytes: u64,
    /// SHA-256 of the header: a stable id that needs no data read.
    pub model_id: String,
}

/// Inspects a safetensors file that should hold an upscaler.
pub fn inspect_upscaler(path: &Path) -> Result<UpscalerSpec, DetectError> {
    let meta = std::fs::metadata(path).map_err(|_| DetectError::Missing(path.to_path_buf()))?;
    if meta.is_dir() {
        return Err(DetectError::Unrecognised {
            path: path.to_path_buf(),
            reason: "an upscaler is one .safetensors file, not a folder".into(),
        });
    }
    let h = header(path)?;
    upscaler_from_header(path, &h)?.ok_or_else(|| DetectError::Unrecognised {
        path: path.to_path_buf(),
        reason: "no RRDBNet (conv_first/body.N.rdbM, model.1.sub.N.RDBM, RRDB_trunk) and no \
                 compact SRVGGNet (body.0 conv + body.1 PReLU) tensors: not an upscaler"
            .into(),
    })
}

/// The upscaler in `h`, `None` when the header looks like no super-resolution network, an error
/// when it looks like one this implementation cannot build.
pub fn upscaler_from_header(path: &Path, h: &Header) -> Result<Option<UpscalerSpec>, DetectError> {
    let network = if let Some(naming) = rrdb_naming(h) {
        rrdb(path, h, naming)?
    } else if h.tensors.contains_key("body.0.weight") && h.tensors.contains_key("body.1.weight") {
        compact(path, h)?
    } else {
        return Ok(None);
    };
    let scale = network.scale();
    Ok(Some(UpscalerSpec {
        path: path.to_path_buf(),
        network,
        scale,
        dtype: h.dominant_dtype(),
        parameters: h.parameters(),
        weights_bytes: h.data_bytes(),
        model_id: h.sha256.clone(),
    }))
}

fn rrdb_naming(h: &Header) -> Option<RrdbNaming> {
    let has = |k: &str| h.tensors.contains_key(k);
    if has("conv_first.weight") && has("body.0.rdb1.conv1.weight") {
        Some(RrdbNaming::RealEsrgan)
    } else if has("model.0.weight")
        && (has("model.1.sub.0.RDB1.conv1.0.weight") || has("model.1.sub.0.RDB1.conv1x1.weight"))
    {
        Some(RrdbNaming::Esrgan)
    } else if has("conv_first.weight") && has("RRDB_trunk.0.RDB1.conv1.weight") {
        Some(RrdbNaming::Bsrgan)
    } else {
        None
    }
}

fn bad(path: &Path, reason: String) -> DetectError {
    DetectError::Inconsistent {
        path: path.to_path_buf(),
        reason,
    }
}

/// The numbers `n` of keys `{prefix}{n}.…`.
fn indices(h: &Header, prefix: &str) -> BTreeSet<usize> {
    h.tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The `[out, in, k, k]` shape of the convolution weight `weight`.
fn conv(path: &Path, h: &Header, weight: &str) -> Result<[usize; 4], DetectError> {
    match h.shape(weight) {
        Some(&[o, i, k1, k2]) if k1 == k2 => Ok([o as usize, i as usize, k1 as usize, k2 as usize]),
        Some(s) => Err(bad(
            path,
            format!("{weight} has shape {s:?}, not a square 2-D convolution"),
        )),
        None => Err(bad(path, format!("{weight} is missing"))),
    }
}

fn rrdb(path: &Path, h: &Header, naming: RrdbNaming) -> Result<UpscalerArch, DetectError> {
    if h.tensors.keys().any(|k| k.contains(".conv1x1.")) {
        return Err(bad(
            path,
            "ESRGAN+ dense blocks (conv1x1) are not supported; Real-ESRGAN/ESRGAN RRDBNets are"
                .into(),
        ));
    }
    let block_prefix = match naming {
        RrdbNaming::RealEsrgan => "body.",
        RrdbNaming::Esrgan => "model.1.sub.",
        RrdbNaming::Bsrgan => "RRDB_trunk.",
    };
    let mut blocks = 0;
    while h.tensors.keys().any(|k| {
        k.strip_prefix(block_prefix)
            .and_then(|r| r.strip_prefix(&format!("{blocks}.")))
            .is_some_and(|r| r.starts_with("rdb") || r.starts_with("RDB"))
    }) {
        blocks += 1;
    }
    let upsamples = match naming {
        RrdbNaming::RealEsrgan => count_from_one(h, "conv_up"),
        RrdbNaming::Bsrgan => count_from_one(h, "upconv"),
        RrdbNaming::Esrgan => {
            // model.0 conv, model.1 body, then [upsample, conv, lrelu] per stage, then the hr
            // conv, its lrelu, and the last conv: the last conv is model.{3n+4}.
            let last = indices(h, "model.").into_iter().max().unwrap_or(0);
            if last < 4 || !(last - 4).is_multiple_of(3) {
                return Err(bad(
                    path,
                    format!("model.{last} cannot be the last convolution of an ESRGAN network"),
                ));
            }
            (last - 4) / 3
        }
    };
    let spec = UpscalerArch::Rrdb {
        features: 0,
        blocks,
        growth: 0,
        upsamples,
        unshuffle: 1,
        naming,
    };
    let name = |canonical: &str| stored(&spec, canonical);
    let first = conv(path, h, &name("conv_first.weight"))?;
    let features = first[0];
    let growth = conv(path, h, &name("body.0.rdb1.conv1.weight"))?[0];
    let unshuffle = match first[1] {
        3 => 1,
        12 => 2,
        48 => 4,
        c => {
            return Err(bad(
                path,
                format!(
                    "the first convolution takes {c} channels; RGB (3, or 12/48 after pixel-unshuffle) is supported"
                ),
            ));
        }
    };
    if upsamples == 0 || upsamples > 3 {
        return Err(bad(
            path,
            format!(
                "{upsamples} ×2 upsample stages; 1 to 3 are supported (×3 pixel-shuffle networks are not)"
            ),
        ));
    }
    if (1 << upsamples) < unshuffle {
        return Err(bad(
            path,
            format!(
                "pixel-unshuffle by {unshuffle} with only {upsamples} ×2 upsample stages shrinks the image"
            ),
        ));
    }
    let last = conv(path, h, &name("conv_last.weight"))?;
    if last[0] != 3 {
        return Err(bad(
            path,
            format!("the last convolution gives {} channels, not RGB", last[0]),
        ));
    }
    Ok(UpscalerArch::Rrdb {
        features,
        blocks,
        growth,
        upsamples,
        unshuffle,
        naming,
    })
}

/// How many of `{prefix}1.weight`, `{prefix}2.weight`, ... exist, counting from 1 without gaps.
fn count_from_one(h: &Header, prefix: &str) -> usize {
    (1..)
        .take_while(|k| h.tensors.contains_key(&format!("{prefix}{k}.weight")))
        .count()
}

fn compact(path: &Path, h: &Header) -> Result<UpscalerArch, DetectError> {
    let highest = indices(h, "body.").into_iter().max().unwrap_or(0);
    if highest < 2 || !highest.is_multiple_of(2) {
        return Err(bad(
            path,
            format!("body.{highest} cannot be the last convolution of a compact SRVGGNet"),
        ));
    }
    let first = conv(path, h, "body.0.weight")?;
    if first[1] != 3 {
        return Err(bad(
            path,
            format!("body.0 takes {} channels, not RGB", first[1]),
        ));
    }
    let features = first[0];
    for i in (1..highest).step_by(2) {
        match h.shape(&format!("body.{i}.weight")) {
            Some(&[n]) if n as usize == features => {}
            _ => {
                return Err(bad(
                    path,
                    format!(
                        "body.{i}.weight is not a PReLU over {features} channels (ReLU/LeakyReLU compact networks have no such tensor and are not supported)"
                    ),
                ));
            }
        }
    }
    let convs = (highest - 2) / 2;
    let out = conv(path, h, &format!("body.{highest}.weight"))?[0];
    let scale = (1..=8).find(|s| 3 * s * s == out).ok_or_else(|| {
        bad(
            path,
            format!(
                "the last convolution gives {out} channels, not 3·scale² for a scale of 1 to 8"
            ),
        )
    })?;
    Ok(UpscalerArch::Compact {
        features,
        convs,
        scale,
    })
}

impl UpscalerArch {
    /// Output pixels per input pixel on each side.
    pub fn scale(&self) -> usize {
        match self {
            Self::Rrdb {
                upsamples,
                unshuffle,
                ..
            } => (1 << upsamples) / unshuffle,
            Self::Compact { scale, .. } => *scale,
        }
    }
}

impl UpscalerSpec {
    /// The name the file gives the tensor a loader calls `canonical` (Real-ESRGAN names, e.g.
    /// `body.3.rdb2.conv5.weight`).
    pub fn stored_name(&self, canonical: &str) -> String {
        stored(&self.network, canonical)
    }

    /// A short label: `RRDBNet ×4 (64 features, 23 blocks)`.
    pub fn label(&self) -> String {
        match &self.network {
            UpscalerArch::Rrdb {
                features, blocks, ..
            } => format!(
                "RRDBNet ×{} ({features} features, {blocks} blocks)",
                self.scale
            ),
            UpscalerArch::Compact {
                features, convs, ..
            } => format!(
                "SRVGGNetCompact ×{} ({features} features, {convs} convolutions)",
                self.scale
            ),
        }
    }
}

fn stored(network: &UpscalerArch, canonical: &str) -> String {
    let UpscalerArch::Rrdb {
        blocks,
        upsamples,
        naming,
        ..
    } = network
    else {
        return canonical.to_string();
    };
    let (module, tensor) = canonical.rsplit_once('.').unwrap_or((canonical, "weight"));
    let module = match naming {
        RrdbNaming::RealEsrgan => return canonical.to_string(),
        RrdbNaming::Bsrgan => {
            if let Some(rest) = module.strip_prefix("body.") {
                format!("RRDB_trunk.{}", rest.replacen(".rdb", ".RDB", 1))
            } else if module == "conv_body" {
                "trunk_conv".into()
            } else if let Some(k) = module.strip_prefix("conv_up") {
                format!("upconv{k}")
            } else if module == "conv_hr" {
                "HRconv".into()
            } else {
                module.to_string()
            }
        }
        RrdbNaming::Esrgan => {
            let n = *upsamples;
            if let Some(rest) = module.strip_prefix("body.") {
                format!("model.1.sub.{}.0", rest.replacen(".rdb", ".RDB", 1))
            } else if module == "conv_first" {
                "model.0".into()
            } else if module == "conv_body" {
                format!("model.1.sub.{blocks}")
            } else if let Some(k) = module
                .strip_prefix("conv_up")
                .and_then(|k| k.parse::<usize>().ok())
            {
                format!("model.{}", 3 * k)
            } else if module == "conv_hr" {
                format!("model.{}", 3 * n + 2)
            } else if module == "conv_last" {
                format!("model.{}", 3 * n + 4)
            } else {
                module.to_string()
            }
        }
    };
    format!("{module}.{tensor}")
}

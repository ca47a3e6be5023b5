//! Weight loading: safetensors files read tensor by tensor (positional reads, only the tensors a
//! module asks for), converted to f32 on the host, LoRA deltas merged (in f32), then uploaded to
//! the device in the loader's dtype (f32 by default; f16/bf16 for GPU workers; norm parameters
//! stay f32).
//!
//! Modules ask for tensors by their diffusers names; a [`NameMap`] translates those to the names
//! in the file (single-file LDM checkpoints use other names). Every tensor must exist with the
//! expected shape, or loading fails naming it.

use std::collections::BTreeSet;
use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{DType, Tensor, TensorData};

use super::lora::LoraSet;
use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear, LoraSite, LoraSlot};
use super::tensor_file::{HostTensor, TensorFile};
use crate::error::{NodeError, Result};
use crate::render::gaussian;

/// Where a loader gets tensors: a file, or generated weights.
pub trait TensorSource {
    /// The tensor `name`; `expected` is the shape the module wants (generators use it, files
    /// return what they hold and the loader compares).
    fn fetch(&self, name: &str, expected: &[usize]) -> Result<HostTensor>;
    /// Whether the source holds `name`.
    fn holds(&self, name: &str) -> bool;
    /// Every tensor name the source holds (generators: those produced so far).
    fn tensor_names(&self) -> Vec<String>;
}

impl TensorSource for TensorFile {
    fn fetch(&self, name: &str, _expected: &[usize]) -> Result<HostTensor> {
        self.read(name)
    }

    fn holds(&self, name: &str) -> bool {
        self.contains(name)
    }

    fn tensor_names(&self) -> Vec<String> {
        self.names().map(str::to_string).collect()
    }
}

/// Random weights of whatever shape each module asks for (seeded, scaled by fan-in so
/// activations stay in range), recorded so they can be written out as a model file.
/// Used for benchmarks and the demo model; such models draw noise, not pictures.
#[derive(Debug, Default)]
pub struct RandomWeights {
    seed: u64,
    made: std::sync::Mutex<Vec<(String, HostTensor)>>,
}

impl RandomWeights {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The tensors produced so far, in order, emptying the record.
    pub fn take(&self) -> Vec<(String, HostTensor)> {
        std::mem::take(&mut *self.made.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TensorSource for RandomWeights {
    fn fetch(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let numel: usize = expected.iter().product();
        let name_seed = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let data = if expected.len() == 1 && name.ends_with(".weight") {
            vec![1.0; numel]
        } else if expected.len() == 1 {
            vec![0.0; numel]
        } else {
            let fan_in = (numel / expected[0].max(1)).max(1) as f32;
            let scale = 1.0 / fan_in.sqrt();
            gaussian(name_seed, numel)
                .into_iter()
                .map(|v| v * scale)
                .collect()
        };
        let t = HostTensor {
            data,
            shape: expected.to_vec(),
        };
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), t.clone()));
        Ok(t)
    }

    fn holds(&self, _name: &str) -> bool {
        true
    }

    fn tensor_names(&self) -> Vec<String> {
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Where a LoRA-capable weight sits, and its base when a LoRA changed it as it loaded.
type Sited = (Arc<LoraSite>, Option<HostTensor>);

/// Translates the diffusers name a module asks for into the name stored in the file.
pub type NameMap = Box<dyn Fn(&str) -> String + Send + Sync>;

/// Loads one component's tensors onto a device.
pub struct Loader<'a, B: Backend> {
    file: &'a dyn TensorSource,
    map: NameMap,
    device: B::Device,
    dtype: DType,
    lora: Option<(&'a mut LoraSet, &'static str, String)>,
    lora_alias: Option<NameMap>,
    used: BTreeSet<String>,
}

impl<'a, B: Backend> Loader<'a, B> {
    /// A loader reading `file` with names translated by `map`.
    pub fn new(file: &'a dyn TensorSource, map: NameMap, device: &B::Device) -> Self {
        Self {
            file,
            map,
            device: device.clone(),
            dtype: DType::F32,
            lora: None,
            lora_alias: None,
            used: BTreeSet::new(),
        }
    }

    /// A loader whose names are the file's own, with an optional prefix (`"text_model."`).
    pub fn prefixed(file: &'a dyn TensorSource, prefix: &str, device: &B::Device) -> Self {
        let prefix = prefix.to_string();
        Self::new(file, Box::new(move |n| format!("{prefix}{n}")), device)
    }

    /// Merges the LoRAs of `set` that target component `component` (`"unet"` or `"text_encoder"`)
    /// into the weights as they load; `path_prefix` turns a module path into the LoRA's
    /// (`"text_model."` for CLIP text encoders).
    pub fn with_lora(
        mut self,
        set: &'a mut LoraSet,
        component: &'static str,
        path_prefix: &str,
    ) -> Self {
        self.lora = Some((set, component, path_prefix.to_string()));
        self
    }

    /// Creates the tensors in `dtype` (f32 by default). LoRAs still merge in f32 on the host.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// A second name LoRA keys may use for a module (SDXL kohya files use LDM paths).
    pub fn with_lora_alias(mut self, alias: NameMap) -> Self {
        self.lora_alias = Some(alias);
        self
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Reads `name`, checking its shape is `shape` (a trailing `1, 1` may be absent or present
    /// on either side: 1×1 convolutions and linear layers are interchangeable).
    pub fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let stored = (self.map)(name);
        let t = self.file.fetch(&stored, shape).map_err(|e| match e {
            NodeError::MissingTensor { file, .. } => NodeError::MissingTensor {
                file,
                name: if stored == name {
                    stored.clone()
                } else {
                    format!("{stored} (module {name})")
                },
            },
            other => other,
        })?;
        if squeeze(&t.shape) != squeeze(shape) {
            return Err(NodeError::TensorShape {
                name: stored,
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
        self.used.insert(stored);
        Ok(HostTensor {
            data: t.data,
            shape: shape.to_vec(),
        })
    }

    /// Reads `name` as a device tensor of rank `D`.
    pub fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>> {
        let t = self.host(name, &shape)?;
        Ok(upload(t, &self.device, self.dtype))
    }

    /// Whether the file holds the tensor a module would call `name`.
    pub fn has(&self, name: &str) -> bool {
        self.file.holds(&(self.map)(name))
    }

    /// Reads weight `path` with the LoRAs aimed at it merged. Under a LoRA component, also
    /// where it sits and, when a LoRA changed it, its base (for switches in place).
    fn merged_weight(
        &mut self,
        path: &str,
        shape: &[usize],
    ) -> Result<(HostTensor, Option<Sited>)> {
        let mut w = self.host(&format!("{path}.weight"), shape)?;
        let Some((set, component, prefix)) = self.lora.as_mut() else {
            return Ok((w, None));
        };
        let site = Arc::new(LoraSite {
            component,
            path: format!("{prefix}{path}"),
            alias: self.lora_alias.as_ref().map(|a| a(path)),
        });
        let base = set.touches(&site).then(|| w.clone());
        set.merge_into(&site, &mut w)?;
        Ok((w, Some((site, base))))
    }

    /// A linear layer `path` (`{path}.weight` `[out, in]`, optional `{path}.bias`).
    pub fn linear(&mut self, path: &str, inp: usize, out: usize, bias: bool) -> Result<Linear<B>> {
        let (w, site) = self.merged_weight(path, &[out, inp])?;
        // Transposed on the host, so the device holds a contiguous `[in, out]` matrix and no
        // kernel sees a strided view on every call.
        let to_device =
            |w: &HostTensor| upload::<B, 2>(transpose(w, out, inp), &self.device, self.dtype);
        let weight = to_device(&w);
        let lora = site.map(|(site, base)| LoraSlot {
            site,
            base: base.as_ref().map(to_device),
        });
        let bias = if bias {
            Some(self.tensor(&format!("{path}.bias"), [out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias, lora })
    }

    /// A square convolution `path` with `k`×`k` kernels, stride and padding.
    pub fn conv2d(
        &mut self,
        path: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d<B>> {
        let (w, site) = self.merged_weight(path, &[out, inp, k, k])?;
        let weight = upload(w, &self.device, self.dtype);
        let lora = site.map(|(site, base)| LoraSlot {
            site,
            base: base.map(|b| upload(b, &self.device, self.dtype)),
        });
        let bias = Some(self.tensor(&format!("{path}.bias"), [out])?);
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
            lora,
        })
    }

    /// A group norm `path` over `channels` in `groups`.
    pub fn group_norm(
        &mut self,
        path: &str,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<GroupNorm<B>> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(NodeError::ModelConfig(format!(
                "{path}: {channels} channels do not split into {groups} groups"
            )));
        }
        Ok(GroupNorm {
            gamma: self.norm_param(&format!("{path}.weight"), channels)?,
            beta: self.norm_param(&format!("{path}.bias"), channels)?,
            groups,
            eps,
        })
    }

    /// A layer norm `path` over the last `dim` features.
    pub fn layer_norm(&mut self, path: &str, dim: usize, eps: f64) -> Result<LayerNorm<B>> {
        Ok(LayerNorm {
            gamma: self.norm_param(&format!("{path}.weight"), dim)?,
            beta: self.norm_param(&format!("{path}.bias"), dim)?,
            eps,
        })
    }

    /// A norm's scale or shift: f32 whatever the loader's dtype, since norms compute in f32.
    fn norm_param(&mut self, name: &str, len: usize) -> Result<Tensor<B, 1>> {
        let t = self.host(name, &[len])?;
        Ok(upload(t, &self.device, DType::F32))
    }

    /// File tensors no module asked for, among those whose stored name starts with `prefix`.
    pub fn unused(&self, prefix: &str) -> Vec<String> {
        self.file
            .tensor_names()
            .into_iter()
            .filter(|n| n.starts_with(prefix) && !self.used.contains(n))
            .collect()
    }
}

fn squeeze(shape: &[usize]) -> &[usize] {
    let mut s = shape;
    while s.len() > 2 && s.last() == Some(&1) {
        s = &s[..s.len() - 1];
    }
    s
}

/// Uploads a host tensor to `device` as rank `D`, stored and computed in `dtype`.
pub fn upload<B: Backend, const D: usize>(
    t: HostTensor,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data, t.shape), (device, dtype))
}

/// A row-major `[rows, cols]` host matrix transposed to `[cols, rows]`.
pub fn transpose(t: &HostTensor, rows: usize, cols: usize) -> HostTensor {
    let mut data = vec![0f32; rows * cols];
    for (r, row) in t.data.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            data[c * rows + r] = v;
        }
    }
    HostTensor {
        data,
        shape: vec![cols, rows],
    }
}

/// An OpenCLIP text tower (`transformer.resblocks.N.attn.in_proj_weight`, `ln_final`,
/// `text_projection`, ...) as SD2 and SDXL single-file checkpoints store it, read under the
/// Hugging Face CLIP names the text encoder asks for: fused q/k/v rows are split, the projection
/// is transposed to `[projection, hidden]`.
pub struct OpenClipSource<'a> {
    file: &'a TensorFile,
    prefix: String,
}

impl<'a> OpenClipSource<'a> {
    /// The tower stored under `prefix` (`conditioner.embedders.1.model.`, `cond_stage_model.model.`).
    pub fn new(file: &'a TensorFile, prefix: &str) -> Self {
        Self {
            file,
            prefix: prefix.to_string(),
        }
    }

    /// Number of residual blocks stored.
    pub fn layers(&self) -> usize {
        let start = format!("{}transformer.resblocks.", self.prefix);
        self.file
            .names()
            .filter_map(|n| n.strip_prefix(&start))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    }

    /// Width of the tower.
    pub fn width(&self) -> Option<usize> {
        self.file
            .shape(&format!("{}token_embedding.weight", self.prefix))
            .map(|s| s[1])
    }

    /// Where the HF-named tensor lives: the stored name, and for q/k/v which third of the rows.
    fn locate(&self, name: &str) -> Option<(String, Option<usize>, bool)> {
        let p = &self.prefix;
        let simple = |s: &str| Some((format!("{p}{s}"), None, false));
        match name {
            "embeddings.token_embedding.weight" => return simple("token_embedding.weight"),
            "embeddings.position_embedding.weight" => return simple("positional_embedding"),
            "final_layer_norm.weight" => return simple("ln_final.weight"),
            "final_layer_norm.bias" => return simple("ln_final.bias"),
            "text_projection.weight" => return Some((format!("{p}text_projection"), None, true)),
            _ => {}
        }
        let rest = name.strip_prefix("encoder.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let block = format!("{p}transformer.resblocks.{layer}.");
        let (module, param) = tail.rsplit_once('.')?;
        let stored = |m: &str| Some((format!("{block}{m}.{param}"), None, false));
        match module {
            "layer_norm1" => stored("ln_1"),
            "layer_norm2" => stored("ln_2"),
            "mlp.fc1" => stored("mlp.c_fc"),
            "mlp.fc2" => stored("mlp.c_proj"),
            "self_attn.out_proj" => stored("attn.out_proj"),
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => {
                let third = match module {
                    "self_attn.q_proj" => 0,
                    "self_attn.k_proj" => 1,
                    _ => 2,
                };
                Some((format!("{block}attn.in_proj_{param}"), Some(third), false))
            }
            _ => None,
        }
    }
}

impl TensorSource for OpenClipSource<'_> {
    fn fetch(&self, name: &str, _expected: &[usize]) -> Result<HostTensor> {
        let (stored, third, transpose) =
            self.locate(name).ok_or_else(|| NodeError::MissingTensor {
                file: self.file.path().display().to_string(),
                name: format!("{name} (no OpenCLIP counterpart)"),
            })?;
        let t = self.file.read(&stored)?;
        if let Some(k) = third {
            let rows = t.shape[0] / 3;
            let cols = t.data.len() / t.shape[0].max(1);
            let mut shape = t.shape.clone();
            shape[0] = rows;
            return Ok(HostTensor {
                data: t.data[k * rows * cols..(k + 1) * rows * cols].to_vec(),
                shape,
            });
        }
        if transpose && t.shape.len() == 2 {
            let (r, c) = (t.shape[0], t.shape[1]);
            let mut data = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    data[j * r + i] = t.data[i * c + j];
                }
            }
            return Ok(HostTensor {
                data,
                shape: vec![c, r],
            });
        }
        Ok(t)
    }

    fn holds(&self, name: &str) -> bool {
        self.locate(name)
            .is_some_and(|(stored, _, _)| self.file.contains(&stored))
    }

    fn tensor_names(&self) -> Vec<String> {
        self.file.names().map(str::to_string).collect()
    }
}

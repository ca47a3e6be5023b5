//! `drover-node` tools: `make-model` (a random-weight demo model), `make-lora` (a random LoRA
//! for one), `unet-eval` (one UNet forward
//! on given tensors, for checking against a reference) and `bench-unet` (UNet step timing).

use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use drover_shared::detect::inspect;
use drover_shared::family::ModelFamily;
use drover_shared::safetensors::Dtype;
use drover_shared::safetensors::build::header_json;
use serde_json::json;

use crate::burn::clip::{ClipConfig, ClipText};
use crate::burn::lora::LoraSet;
use crate::burn::tensor_file::{HostTensor, TensorFile};
use crate::burn::unet::{AddedCond, Unet, UnetConfig, guidance_embedding};
use crate::burn::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use crate::burn::weights::{Loader, NameMap, RandomWeights, upload};
use crate::error::{NodeError, Result};
use crate::render::gaussian;

fn io(path: &Path, e: std::io::Error) -> NodeError {
    NodeError::Weights(format!("{}: {e}", path.display()))
}

/// Writes `tensors` as an f16 safetensors file.
pub fn write_f16(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let specs: Vec<_> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Dtype::F16,
                t.shape.iter().map(|&d| d as u64).collect(),
            )
        })
        .collect();
    let (json, data_len) = header_json(&specs, &[("format", "pt")]);
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.reserve(data_len as usize);
    for (_, t) in tensors {
        for v in &t.data {
            out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    std::fs::write(path, out).map_err(|e| io(path, e))
}

/// Writes `tensors` as an f32 safetensors file.
pub fn write_f32(path: &Path, tensors: Vec<(String, HostTensor)>) -> Result<()> {
    let list: Vec<_> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.shape.iter().map(|&d| d as u64).collect(), t.data))
        .collect();
    std::fs::write(path, drover_shared::safetensors::build::f32_file(&list))
        .map_err(|e| io(path, e))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| io(path, e))
}

/// The demo model's UNet: the family's interface (SD1.5: 768-wide text; SDXL: 2048-wide text and
/// text_time conditioning; LCM guidance embedding for both) at a fraction of its width, so a CPU
/// renders the family's default size in seconds.
pub fn demo_unet_config(family: ModelFamily) -> serde_json::Value {
    demo_unet(family, true)
}

/// [`demo_unet_config`], with the LCM guidance embedding or (`lcm` false) without: a standard
/// model, sampled with classifier-free guidance.
fn demo_unet(family: ModelFamily, lcm: bool) -> serde_json::Value {
    let mut config = match family {
        ModelFamily::Sdxl => json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": 4, "out_channels": 4, "sample_size": 128,
            "block_out_channels": [32, 64, 128],
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1, "cross_attention_dim": 2048, "attention_head_dim": [1, 2, 4],
            "transformer_layers_per_block": [1, 1, 2], "norm_num_groups": 32,
            "use_linear_projection": true, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
            "time_cond_proj_dim": 256
        }),
        _ => json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": 4, "out_channels": 4, "sample_size": 64,
            "block_out_channels": [32, 64, 128, 128],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1, "cross_attention_dim": 768, "attention_head_dim": 8,
            "norm_num_groups": 32, "use_linear_projection": false, "time_cond_proj_dim": 256
        }),
    };
    if !lcm {
        config["time_cond_proj_dim"] = serde_json::Value::Null;
    }
    config
}

fn parse_config<T: serde::de::DeserializeOwned>(v: &serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| NodeError::ModelConfig(format!("demo {what} config: {e}")))
}

fn clip_config(width: usize, layers: usize, heads: usize, act: &str) -> serde_json::Value {
    json!({
        "_class_name": "CLIPTextModel", "vocab_size": 1000, "hidden_size": width,
        "intermediate_size": 4 * width, "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": width
    })
}

/// Writes a diffusers folder holding a `family`-shaped (sd15 or sdxl) model with random weights
/// (seeded): an LCM model (`variant` `lcm`), a standard one with Stable Diffusion's own scheduler
/// settings (`standard`), or a standard inpainting one (`inpaint`: a 9-channel UNet). It
/// exercises the whole pipeline; its images are noise, by design.
/// `RANDOM_WEIGHTS.txt` and the PNG metadata say so.
pub fn make_model(out: &Path, seed: u64, family: ModelFamily, variant: &str) -> Result<()> {
    let lcm = variant == "lcm";
    let device = Default::default();
    let sdxl = match family {
        ModelFamily::Sd15 => false,
        ModelFamily::Sdxl => true,
        other => {
            return Err(NodeError::Config(format!(
                "make-model writes sd15 or sdxl demo models, not {other}"
            )));
        }
    };
    let vae_cfg = json!({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 }
    });
    let mut unet_json = demo_unet(family, lcm);
    if variant == "inpaint" {
        // The latent, the mask and the masked image's latent in; the latent out.
        unet_json["in_channels"] = json!(9);
    }
    let unet: UnetConfig = parse_config(&unet_json, "unet")?;
    let vae: VaeConfig = parse_config(&vae_cfg, "vae")?;
    let source = RandomWeights::new(seed);

    let te_cfg = clip_config(768, 2, 12, "quick_gelu");
    let te: ClipConfig = parse_config(&te_cfg, "text encoder")?;
    ClipText::<crate::burn::Cpu>::load(
        &mut Loader::prefixed(&source, "text_model.", &device),
        &te,
    )?;
    write_f16(&out.join("text_encoder/model.safetensors"), &source.take())?;
    write_json(&out.join("text_encoder/config.json"), &te_cfg)?;
    let mut components = vec![
        ("text_encoder", json!(["transformers", "CLIPTextModel"])),
        ("tokenizer", json!(["transformers", "CLIPTokenizer"])),
    ];
    if sdxl {
        let te2_cfg = clip_config(1280, 2, 20, "gelu");
        let te2: ClipConfig = parse_config(&te2_cfg, "text encoder 2")?;
        ClipText::<crate::burn::Cpu>::load(
            &mut Loader::prefixed(&source, "text_model.", &device),
            &te2,
        )?
        .with_projection(&mut Loader::prefixed(&source, "", &device), 1280)?;
        write_f16(
            &out.join("text_encoder_2/model.safetensors"),
            &source.take(),
        )?;
        write_json(&out.join("text_encoder_2/config.json"), &te2_cfg)?;
        components.push((
            "text_encoder_2",
            json!(["transformers", "CLIPTextModelWithProjection"]),
        ));
        components.push(("tokenizer_2", json!(["transformers", "CLIPTokenizer"])));
    }
    Unet::<crate::burn::Cpu>::load(&mut Loader::prefixed(&source, "", &device), &unet)?;
    write_f16(
        &out.join("unet/diffusion_pytorch_model.safetensors"),
        &source.take(),
    )?;
    VaeDecoder::<crate::burn::Cpu>::load(&mut Loader::prefixed(&source, "", &device), &vae)?;
    VaeEncoder::<crate::burn::Cpu>::load(&mut Loader::prefixed(&source, "", &device), &vae)?;
    write_f16(
        &out.join("vae/diffusion_pytorch_model.safetensors"),
        &source.take(),
    )?;
    write_json(&out.join("unet/config.json"), &unet_json)?;
    write_json(&out.join("vae/config.json"), &vae_cfg)?;
    let scheduler = if lcm {
        json!({"_class_name": "LCMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
               "timestep_scaling": 10.0, "prediction_type": "epsilon"})
    } else {
        json!({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
               "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"})
    };
    write_json(&out.join("scheduler/scheduler_config.json"), &scheduler)?;
    let mut index = serde_json::Map::new();
    index.insert(
        "_class_name".into(),
        json!(match (sdxl, lcm) {
            (true, _) => "StableDiffusionXLPipeline",
            (false, true) => "LatentConsistencyModelPipeline",
            (false, false) => "StableDiffusionPipeline",
        }),
    );
    index.insert("unet".into(), json!(["diffusers", "UNet2DConditionModel"]));
    index.insert("vae".into(), json!(["diffusers", "AutoencoderKL"]));
    index.insert(
        "scheduler".into(),
        json!(["diffusers", scheduler["_class_name"]]),
    );
    for (name, value) in components {
        index.insert(name.into(), value);
    }
    write_json(
        &out.join("model_index.json"),
        &serde_json::Value::Object(index),
    )?;
    let tokenizers: &[&str] = if sdxl {
        &["tokenizer", "tokenizer_2"]
    } else {
        &["tokenizer"]
    };
    for folder in tokenizers {
        let tok = out.join(folder);
        std::fs::create_dir_all(&tok).map_err(|e| io(&tok, e))?;
        for (name, text) in [
            (
                "vocab.json",
                include_str!("../assets/demo-tokenizer/vocab.json"),
            ),
            (
                "merges.txt",
                include_str!("../assets/demo-tokenizer/merges.txt"),
            ),
        ] {
            std::fs::write(tok.join(name), text).map_err(|e| io(&tok, e))?;
        }
    }
    let note = out.join("RANDOM_WEIGHTS.txt");
    std::fs::write(
        &note,
        format!(
            "This model was generated by `drover-node make-model --family {family} --variant {variant} --seed {seed}`.\n\
             Its weights are random: it runs the real {family} {variant} pipeline end to end, but draws noise.\n\
             Point MODEL_ROOT/MODEL at a real {family} model (a diffusers folder) for pictures.\n",
            variant = variant
        ),
    )
    .map_err(|e| io(&note, e))?;
    Ok(())
}

/// The attention projections a LoRA made by [`make_lora`] adapts.
const LORA_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Writes a kohya LoRA of `rank` with random (seeded) weights for every attention projection
/// of the UNet in the diffusers folder `model`, shaped from its header; answers how many
/// modules it adapts. A demo and fixture tool: the weights mean nothing.
pub fn make_lora(model: &Path, out: &Path, rank: usize, seed: u64) -> Result<usize> {
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let header = drover_shared::safetensors::read_header(&unet)
        .map_err(|e| NodeError::Weights(format!("{}: {e}", unet.display())))?;
    if rank == 0 {
        return Err(NodeError::Config(
            "make-lora: --rank must be at least 1".into(),
        ));
    }
    let mut tensors = Vec::new();
    let mut draw = 0u64;
    let mut random = |shape: Vec<usize>, scale: f32| {
        draw += 1;
        let n = shape.iter().product();
        let data = gaussian(seed.wrapping_mul(1_000_003).wrapping_add(draw), n)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        HostTensor { data, shape }
    };
    for (name, info) in &header.tensors {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let targeted = module.contains(".attentions.")
            && LORA_TARGETS
                .iter()
                .any(|t| module.ends_with(&format!(".{t}")));
        let [out_features, in_features] = info.shape[..] else {
            continue;
        };
        if !targeted {
            continue;
        }
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        let (o, i) = (out_features as usize, in_features as usize);
        tensors.push((
            format!("{key}.lora_down.weight"),
            random(vec![rank, i], 1.0 / (i as f32).sqrt()),
        ));
        tensors.push((
            format!("{key}.lora_up.weight"),
            random(vec![o, rank], 0.5 / rank as f32),
        ));
        tensors.push((
            format!("{key}.alpha"),
            HostTensor {
                data: vec![rank as f32],
                shape: vec![],
            },
        ));
    }
    let modules = tensors.len() / 3;
    if modules == 0 {
        return Err(NodeError::Weights(format!(
            "{}: no attention projections to adapt",
            unet.display()
        )));
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    write_f16(out, &tensors)?;
    Ok(modules)
}

/// `drover-node ldm-names`: the single-file (LDM) name of every tensor of a diffusers UNet
/// and/or VAE folder, as Drover maps them, in one JSON line.
pub fn ldm_names(unet: Option<&Path>, vae: Option<&Path>) -> Result<String> {
    let names = |dir: &Path, files: &[&str]| -> Result<Vec<String>> {
        let path = files
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| NodeError::Weights(format!("{}: no weights file", dir.display())))?;
        let header = drover_shared::safetensors::read_header(&path)
            .map_err(|e| NodeError::Weights(format!("{}: {e}", path.display())))?;
        Ok(header.tensors.keys().cloned().collect())
    };
    const FILES: [&str; 2] = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ];
    let mut out = serde_json::Map::new();
    if let Some(dir) = unet {
        let config: UnetConfig = crate::burn::pipeline::read_config(&dir.join("config.json"))?;
        let arch = config.to_arch();
        let pairs: Vec<_> = names(dir, &FILES)?
            .into_iter()
            .map(|n| {
                json!([
                    n,
                    format!("model.diffusion_model.{}", arch.diffusers_to_ldm(&n))
                ])
            })
            .collect();
        out.insert("unet".into(), json!(pairs));
    }
    if let Some(dir) = vae {
        let config: VaeConfig = crate::burn::pipeline::read_config(&dir.join("config.json"))?;
        let levels = config.block_out_channels.len();
        let pairs: Vec<_> = names(dir, &FILES)?
            .into_iter()
            .map(|n| {
                json!([
                    n,
                    format!(
                        "first_stage_model.{}",
                        crate::burn::vae::vae_diffusers_to_ldm(&n, levels)
                    )
                ])
            })
            .collect();
        out.insert("vae".into(), json!(pairs));
    }
    Ok(format!("{}\n", serde_json::Value::Object(out)))
}

fn tensor_from<B: Backend, const D: usize>(
    file: &TensorFile,
    name: &str,
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    let t = file.read(name)?;
    if t.shape.len() != D {
        return Err(NodeError::TensorShape {
            name: name.to_string(),
            expected: vec![0; D],
            found: t.shape,
        });
    }
    Ok(upload(t, device, DType::F32))
}

/// Options of `unet-eval`.
#[derive(Debug)]
pub struct UnetEval<'a> {
    /// UNet weights (diffusers or LDM names).
    pub unet: &'a Path,
    /// Tensors `sample`, `timestep`, `encoder_hidden_states` (+ optional `timestep_cond`, or
    /// `guidance` to build it).
    pub inputs: &'a Path,
    /// Where tensor `out` is written.
    pub output: &'a Path,
    /// A diffusers UNet config.json for non-standard shapes.
    pub config: Option<&'a Path>,
    /// A LoRA to merge.
    pub lora: Option<&'a Path>,
    /// Its strength.
    pub lora_scale: f32,
    /// `cpu` or `cuda` (cuda builds), optionally with `-f16` or `-bf16` for the weights' dtype.
    pub device: &'a str,
}

/// A `--device` of the tools: a backend name and the weights' dtype (`cuda-f16`).
fn device_and_dtype(device: &str) -> Result<(&str, DType)> {
    let (backend, dtype) = match device.split_once('-') {
        Some((backend, "f16")) => (backend, DType::F16),
        Some((backend, "bf16")) => (backend, DType::BF16),
        None => (device, DType::F32),
        Some(_) => ("", DType::F32),
    };
    match backend {
        "cpu" => Ok((backend, dtype)),
        #[cfg(feature = "cuda")]
        "cuda" => {
            crate::burn::cuda::preflight()?;
            Ok((backend, dtype))
        }
        _ => Err(NodeError::Config(format!(
            "device {device} is not available in this build (cpu{}, each optionally -f16 or -bf16)",
            if cfg!(feature = "cuda") { ", cuda" } else { "" }
        ))),
    }
}

/// Runs one UNet forward on the inputs on `o.device` (inputs and output f32 whatever the
/// weights' dtype) and writes `out`.
pub fn unet_eval(o: &UnetEval) -> Result<()> {
    match device_and_dtype(o.device)? {
        #[cfg(feature = "cuda")]
        ("cuda", dtype) => unet_eval_on::<crate::burn::Gpu>(o, &Default::default(), dtype),
        (_, dtype) => unet_eval_on::<crate::burn::Cpu>(o, &Default::default(), dtype),
    }
}

fn unet_eval_on<B: Backend>(o: &UnetEval, device: &B::Device, dtype: DType) -> Result<()> {
    let file = TensorFile::open(o.unet)?;
    let ldm = file
        .names()
        .any(|n| n.starts_with("model.diffusion_model."));
    let config: UnetConfig = match o.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))?
        }
        None => {
            let found = inspect(o.unet)?;
            let cond = file
                .shape(if ldm {
                    "model.diffusion_model.time_embed.cond_proj.weight"
                } else {
                    "time_embedding.cond_proj.weight"
                })
                .map(|s| s[1]);
            match found.family {
                ModelFamily::Sd15 => UnetConfig::sd15(cond),
                ModelFamily::Sd2 => UnetConfig::sd2(cond),
                ModelFamily::Sdxl => UnetConfig::sdxl(cond),
                other => {
                    return Err(NodeError::ModelConfig(format!(
                        "{} is {other}; pass --config for UNets outside SD1.x/SD2.x",
                        o.unet.display()
                    )));
                }
            }
        }
    };
    let mut set = LoraSet::new();
    if let Some(lora) = o.lora {
        set.add("lora", lora, o.lora_scale)?;
    }
    let map: NameMap = if ldm {
        let arch = config.to_arch();
        Box::new(move |n| format!("model.diffusion_model.{}", arch.diffusers_to_ldm(n)))
    } else {
        Box::new(|n| n.to_string())
    };
    let unet = {
        let mut l = Loader::<B>::new(&file, map, device)
            .with_dtype(dtype)
            .with_lora(&mut set, "unet", "");
        Unet::load(&mut l, &config)?
    };
    set.check_claimed()?;
    let inputs = TensorFile::open(o.inputs)?;
    let sample: Tensor<B, 4> = tensor_from(&inputs, "sample", device)?;
    let timestep = inputs
        .read("timestep")?
        .data
        .first()
        .copied()
        .ok_or_else(|| NodeError::InvalidJob("timestep is empty".into()))?;
    let ctx: Tensor<B, 3> = tensor_from(&inputs, "encoder_hidden_states", device)?;
    let cond = if inputs.contains("timestep_cond") {
        Some(tensor_from::<B, 2>(&inputs, "timestep_cond", device)?)
    } else if let (true, Some(dim)) = (inputs.contains("guidance"), config.time_cond_proj_dim) {
        let g = inputs
            .read("guidance")?
            .data
            .first()
            .copied()
            .unwrap_or(1.0);
        Some(guidance_embedding(g - 1.0, dim, device))
    } else {
        None
    };
    let added = if config.text_time() {
        let text_embeds = tensor_from::<B, 2>(&inputs, "text_embeds", device)?;
        let ids = inputs.read("time_ids")?.data;
        let time_ids: [f32; 6] = ids.as_slice().try_into().map_err(|_| {
            NodeError::InvalidJob(format!("time_ids has {} values, SDXL takes 6", ids.len()))
        })?;
        Some(AddedCond {
            text_embeds,
            time_ids,
        })
    } else {
        None
    };
    let out = unet.forward(sample, timestep, &ctx, cond.as_ref(), added.as_ref())?;
    let shape = out.dims().to_vec();
    let data = crate::burn::nn::in_f32(out)
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| NodeError::Render(format!("{e:?}")))?;
    write_f32(
        o.output,
        vec![("out".to_string(), HostTensor { data, shape })],
    )
}

/// Timings of one UNet configuration.
#[derive(Clone, Debug)]
pub struct UnetTiming {
    /// Milliseconds per forward, each run.
    pub runs_ms: Vec<f64>,
    /// Milliseconds per step of the sampling maths alone (scheduler step, CFG combine and
    /// guidance rescale, with a model that answers at once), by sampler, same latent and device.
    pub sampler_step_ms: Vec<(&'static str, f64)>,
}

/// Per-step cost of each sampler's maths (and of CFG with rescale) at `latent`, without a UNet:
/// the model closure answers a ready tensor. 20 steps each, `runs` times, median per step.
fn bench_sampler_steps<B: Backend>(
    sample: &Tensor<B, 4>,
    runs: usize,
) -> Result<Vec<(&'static str, f64)>> {
    use crate::sampling::guidance::{guided, rescaled};
    use crate::sampling::{NoiseSchedule, Plan, Sampler, SchedulerConfig, SigmaSchedule};
    let schedule = NoiseSchedule::new(SchedulerConfig::default())?;
    let out = sample.clone().mul_scalar(0.5);
    let mut timings = Vec::new();
    for (name, sampler, sigmas) in [
        ("dpmpp_2m_karras", Sampler::Dpmpp2m, SigmaSchedule::Karras),
        ("euler_a", Sampler::EulerA, SigmaSchedule::Normal),
        ("ddim", Sampler::Ddim, SigmaSchedule::Normal),
    ] {
        let plan = Plan::new(&schedule, sampler, sigmas, 20)?;
        let mut per_step = Vec::new();
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            let latent = plan.run(
                sample.clone(),
                |_, _| {
                    let g = guided(out.clone(), out.clone().mul_scalar(1.1), 7.0);
                    Ok(rescaled(g, &out, 0.7))
                },
                |_| sample.clone(),
                |_, _| std::ops::ControlFlow::Continue(()),
            )?;
            let _ = latent.slice([0..1, 0..1, 0..1, 0..1]).into_data();
            per_step.push(started.elapsed().as_secs_f64() * 1000.0 / 20.0);
        }
        per_step.sort_by(f64::total_cmp);
        timings.push((name, per_step[per_step.len() / 2]));
    }
    Ok(timings)
}

/// Times `runs` UNet forwards of a random-weight UNet with `config` on `device`, weights in
/// `dtype`, at a `latent`×`latent` latent, after `warmup` untimed runs.
pub fn bench_unet<B: Backend>(
    config: &UnetConfig,
    device: &B::Device,
    dtype: DType,
    latent: usize,
    warmup: usize,
    runs: usize,
) -> Result<UnetTiming> {
    let source = RandomWeights::new(7);
    let unet = Unet::<B>::load(
        &mut Loader::prefixed(&source, "", device).with_dtype(dtype),
        config,
    )?;
    drop(source.take());
    let c = config.in_channels;
    let sample = Tensor::<B, 4>::from_data(
        TensorData::new(gaussian(1, c * latent * latent), [1, c, latent, latent]),
        device,
    );
    let ctx = Tensor::<B, 3>::from_data(
        TensorData::new(
            gaussian(2, 77 * config.cross_attention_dim),
            [1, 77, config.cross_attention_dim],
        ),
        device,
    );
    let cond = config
        .time_cond_proj_dim
        .map(|d| guidance_embedding::<B>(7.0, d, device));
    let added = match (
        config.projection_class_embeddings_input_dim,
        config.addition_time_embed_dim,
    ) {
        (Some(input), Some(dim)) if config.text_time() => {
            let width = input.saturating_sub(6 * dim);
            let side = (latent * 8) as f32;
            Some(AddedCond {
                text_embeds: Tensor::<B, 2>::from_data(
                    TensorData::new(gaussian(3, width), [1, width]),
                    device,
                ),
                time_ids: [side, side, 0.0, 0.0, side, side],
            })
        }
        _ => None,
    };
    let mut runs_ms = Vec::new();
    for i in 0..warmup + runs {
        let started = Instant::now();
        let out = unet.forward(sample.clone(), 759.0, &ctx, cond.as_ref(), added.as_ref())?;
        // Reading one value back waits for the device to finish.
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        if i >= warmup {
            runs_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let sampler_step_ms = bench_sampler_steps(&sample, runs)?;
    Ok(UnetTiming {
        runs_ms,
        sampler_step_ms,
    })
}

fn shape_config(shape: &str) -> Result<UnetConfig> {
    Ok(match shape {
        "sd15" => UnetConfig::sd15(None),
        "sd15-lcm" => UnetConfig::sd15(Some(256)),
        "sd2" => UnetConfig::sd2(None),
        "sdxl" => UnetConfig::sdxl(None),
        "sdxl-lcm" => UnetConfig::sdxl(Some(256)),
        "demo" => parse_config(&demo_unet_config(ModelFamily::Sd15), "unet")?,
        "demo-sdxl" => parse_config(&demo_unet_config(ModelFamily::Sdxl), "unet")?,
        path => {
            let p = Path::new(path);
            let text = std::fs::read_to_string(p).map_err(|e| io(p, e))?;
            serde_json::from_str(&text)
                .map_err(|e| NodeError::ModelConfig(format!("{path}: {e}")))?
        }
    })
}

fn summary(shape: &str, size: usize, device: &str, t: &UnetTiming) -> String {
    let mut sorted = t.runs_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    let samplers: serde_json::Map<String, serde_json::Value> = t
        .sampler_step_ms
        .iter()
        .map(|(name, ms)| {
            (
                (*name).to_string(),
                json!({"step_ms": ms, "of_unet_call": ms / median.max(f64::MIN_POSITIVE)}),
            )
        })
        .collect();
    format!(
        "{}\n",
        json!({"shape": shape, "size": size, "device": device, "runs": sorted.len(),
               "median_ms": median, "mean_ms": mean, "min_ms": sorted.first(), "runs_ms": t.runs_ms,
               "sampler_maths_per_step": samplers})
    )
}

/// `drover-node bench-unet`: times a random-weight UNet and prints one JSON line.
pub fn bench_cli(
    shape: &str,
    size: usize,
    runs: usize,
    warmup: usize,
    device: &str,
) -> Result<String> {
    let config = shape_config(shape)?;
    let latent = size / 8;
    if latent == 0 || !latent.is_multiple_of(config.downscale()) {
        return Err(NodeError::InvalidJob(format!(
            "size {size} does not give a latent divisible by {}",
            config.downscale()
        )));
    }
    let timing = match device_and_dtype(device)? {
        #[cfg(feature = "cuda")]
        ("cuda", dtype) => bench_unet::<crate::burn::Gpu>(
            &config,
            &Default::default(),
            dtype,
            latent,
            warmup,
            runs,
        )?,
        (_, dtype) => bench_unet::<crate::burn::Cpu>(
            &config,
            &Default::default(),
            dtype,
            latent,
            warmup,
            runs,
        )?,
    };
    Ok(summary(shape, size, device, &timing))
}

pub use crate::config::RenderArgs;

/// `drover-node render`: loads a diffusers folder on the CPU, renders one image (or `batch`
/// text-to-image jobs as one batch, seeds counting up) to `out` and answers one JSON line with
/// the load and render times and images per second.
pub fn render_cli(model: &Path, args: RenderArgs, batch: usize, out: &Path) -> Result<String> {
    use crate::burn::pipeline::{ModelSource, Pipeline, Precision};
    use drover_shared::sampler::SamplerName;
    let (sampler, schedule) = match args.sampler.as_deref() {
        None => (None, crate::sampling::SigmaSchedule::Automatic),
        Some(name) => {
            let n: SamplerName = name.parse().map_err(NodeError::InvalidJob)?;
            (Some(n.sampler), n.schedule)
        }
    };
    let started = Instant::now();
    let pipeline = Pipeline::<crate::burn::Cpu>::load(
        ModelSource::Diffusers(model.to_path_buf()),
        &Default::default(),
        Precision::F32,
        &[],
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let read = |path: &Path| std::fs::read(path).map_err(|e| io(path, e));
    let source = match &args.init_image {
        None => None,
        Some(path) => Some(crate::render::Source {
            image: read(path)?.into(),
            mask: args.mask.as_deref().map(read).transpose()?.map(Into::into),
            strength: args
                .strength
                .unwrap_or(if args.mask.is_some() { 1.0 } else { 0.75 }),
            resize_mode: Default::default(),
            mask_blur: 0,
        }),
    };
    let params = crate::render::Params {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: args.size,
        height: args.size,
        steps: args.steps,
        guidance: args.guidance,
        guidance_rescale: 0.0,
        sampler,
        schedule,
        seed: args.seed,
        loras: Vec::new(),
        source,
    };
    let mut plan = pipeline.plan(params.sampler, params.schedule, params.steps)?;
    if let Some(source) = &params.source {
        plan = plan.with_strength(source.strength)?;
    }
    let started = Instant::now();
    let go = |_: usize, _: usize| std::ops::ControlFlow::Continue(());
    let image = if batch > 1 {
        let jobs: Vec<crate::render::Params> = (0..batch as u64)
            .map(|i| crate::render::Params {
                seed: params.seed + i,
                ..params.clone()
            })
            .collect();
        pipeline
            .generate_batch(&jobs, go)?
            .into_iter()
            .next()
            .ok_or_else(|| NodeError::Render("a batch answered no image".into()))?
    } else {
        pipeline.generate(&params, go)?
    };
    let render_ms = started.elapsed().as_secs_f64() * 1000.0;
    let origin = crate::render::Origin {
        backend: "cpu",
        model_id: model.display().to_string(),
        simulated: false,
    };
    let png = crate::render::encode_png(&image, &params, &origin, None, 1)?;
    std::fs::write(out, png).map_err(|e| io(out, e))?;
    Ok(format!(
        "{}\n",
        json!({"model": model.display().to_string(), "sampler": plan.sampler().id(),
               "steps": params.steps, "unet_calls": plan.timesteps().len(), "size": args.size,
               "guidance": args.guidance, "load_ms": load_ms, "render_ms": render_ms,
               "batch": batch, "images_per_s": batch as f64 * 1000.0 / render_ms.max(1e-9),
               "mode": params.source.as_ref().map_or("txt2img", |s| if s.mask.is_some() { "inpaint" } else { "img2img" }),
               "strength": params.source.as_ref().map(|s| s.strength),
               "out": out.display().to_string()})
    ))
}

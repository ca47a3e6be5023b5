//! `drover-node` tools: `make-model` (a random-weight demo model), `make-lora` (a random LoRA
//! for one), `ldm-names`; in [`eval`], `unet-eval` (one UNet forward on given tensors, for
//! checking against a reference), `bench-unet` (UNet step timing) and `render`; in
//! [`components`], `component-eval` (a text encoder or VAE decoder forward, likewise).

use std::path::Path;

use drover_shared::family::ModelFamily;
use drover_shared::safetensors::Dtype;
use drover_shared::safetensors::build::header_json;
use serde_json::json;

use crate::burn::clip::{ClipConfig, ClipText};
use crate::burn::tensor_file::HostTensor;
use crate::burn::unet::{Unet, UnetConfig};
use crate::burn::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use crate::burn::weights::{Loader, RandomWeights};
use crate::error::{NodeError, Result};
use crate::render::gaussian;

mod components;
mod eval;

pub use components::{ComponentEval, component_eval};
pub use eval::{
    RenderRun, UnetEval, UnetTiming, bench_cli, bench_load_cli, bench_lora_cli, bench_unet,
    render_cli, unet_eval,
};

/// `t` on the host in f32, whatever its dtype.
fn host<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = crate::burn::nn::in_f32(t)
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| NodeError::Render(format!("{e:?}")))?;
    Ok(HostTensor { data, shape })
}

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
                include_str!("../../assets/demo-tokenizer/vocab.json"),
            ),
            (
                "merges.txt",
                include_str!("../../assets/demo-tokenizer/merges.txt"),
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

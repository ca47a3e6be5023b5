//! Numerical parity of the Burn SD pipeline against diffusers/transformers.
//!
//! The fixtures in `tests/fixtures/` come from `scripts/make_fixtures.py`: tiny random models
//! (weights stored as f16/bf16, so both sides compute with identical values), inputs, and the
//! outputs PyTorch produced. Every comparison must agree within 1e-4 (max absolute error, f32).

// Helpers outside #[test] fns panic on broken fixtures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use drover_node::error::NodeError;
use drover_node::sd::Cpu;
use drover_node::sd::clip::{ClipConfig, ClipText, clip_prefix};
use drover_node::sd::lora::LoraSet;
use drover_node::sd::pipeline::{
    LoraSpec, ModelSource, Params, Pipeline, Prompt, TextConditioning, vae_diffusers_to_ldm,
};
use drover_node::sd::tokenizer::ClipTokenizer;
use drover_node::sd::unet::{AddedCond, Unet, UnetConfig, guidance_embedding};
use drover_node::sd::vae::{VaeConfig, VaeDecoder};
use drover_node::sd::weights::{HostTensor, Loader, NameMap, OpenClipSource, TensorFile};
use drover_shared::safetensors::build::f32_file;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("tiny-sd15-lcm")
}

struct Expected(TensorFile);

impl Expected {
    fn load() -> Self {
        Self(TensorFile::open(&fixtures().join("parity.safetensors")).unwrap())
    }

    fn host(&self, name: &str) -> HostTensor {
        self.0.read(name).unwrap()
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<Cpu, D> {
        let t = self.host(name);
        Tensor::from_data(TensorData::new(t.data, t.shape), &Default::default())
    }
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Asserts the max absolute error is within tolerance and returns it.
fn check<const D: usize>(what: &str, got: Tensor<Cpu, D>, want: &HostTensor) -> f32 {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let got = values(got);
    let err = got
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "parity {what}: max abs error {err:.3e} over {} values",
        got.len()
    );
    assert!(
        err <= TOLERANCE,
        "{what}: max abs error {err} > {TOLERANCE}"
    );
    err
}

fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_unet(dir: &Path, lora: Option<&Path>) -> drover_node::error::Result<Unet<Cpu>> {
    let cfg: UnetConfig = read_config(&dir.join("config.json"));
    let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors"))?;
    let mut set = LoraSet::new();
    if let Some(path) = lora {
        set.add("test", path, 0.8)?;
    }
    let unet = {
        let mut l =
            Loader::<Cpu>::prefixed(&file, "", &Default::default()).with_lora(&mut set, "unet", "");
        Unet::load(&mut l, &cfg)?
    };
    set.check_claimed()?;
    Ok(unet)
}

fn load_vae(map: Option<NameMap>, file: &TensorFile) -> VaeDecoder<Cpu> {
    let cfg: VaeConfig = read_config(&model_dir().join("vae/config.json"));
    let mut l = match map {
        Some(m) => Loader::<Cpu>::new(file, m, &Default::default()),
        None => Loader::<Cpu>::prefixed(file, "", &Default::default()),
    };
    VaeDecoder::load(&mut l, &cfg).unwrap()
}

#[derive(serde::Deserialize)]
struct PromptCase {
    prompt: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Meta {
    prompts: Vec<PromptCase>,
}

#[test]
fn tokenizer_matches_transformers_from_every_layout() {
    let meta: Meta = read_config(&fixtures().join("parity.json"));
    // vocab.json + merges.txt only (no tokenizer.json): assembled into the CLIP pipeline here.
    let bare = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(model_dir().join("tokenizer").join(f), bare.path().join(f)).unwrap();
    }
    let layouts = [
        ClipTokenizer::from_dir(&model_dir().join("tokenizer")).unwrap(),
        ClipTokenizer::from_dir(&fixtures().join("tokenizer-json")).unwrap(),
        ClipTokenizer::from_dir(bare.path()).unwrap(),
    ];
    for tok in &layouts {
        for case in &meta.prompts {
            let got = tok.encode(&case.prompt).unwrap();
            assert_eq!(got.ids, case.ids, "prompt {:?}", case.prompt);
        }
    }
    let long = meta.prompts.iter().find(|c| c.prompt.len() > 300).unwrap();
    let got = layouts[2].encode(&long.prompt).unwrap();
    assert_eq!(got.truncated, 25, "100 words, 75 kept");

    let empty = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(empty.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("expected tokenizer.json or vocab.json + merges.txt"),
        "{err}"
    );
}

#[test]
fn text_encoder_matches_transformers() {
    let want = Expected::load();
    let dir = model_dir().join("text_encoder");
    let cfg: ClipConfig = read_config(&dir.join("config.json"));
    let file = TensorFile::open(&dir.join("model.safetensors")).unwrap();
    let mut l = Loader::<Cpu>::prefixed(&file, clip_prefix(&file), &Default::default());
    let clip = ClipText::load(&mut l, &cfg).unwrap();
    assert!(l.unused("").is_empty(), "{:?}", l.unused(""));
    let ids: Vec<u32> = want
        .host("text.input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    check(
        "text encoder",
        clip.forward(&[ids]).unwrap(),
        &want.host("text.hidden"),
    );
}

#[test]
fn unet_matches_diffusers_plain_and_with_lora_in_both_formats() {
    let want = Expected::load();
    let dir = fixtures().join("tiny-unet");
    let sample: Tensor<Cpu, 4> = want.tensor("unet.sample");
    let ctx: Tensor<Cpu, 3> = want.tensor("unet.encoder_hidden_states");
    let unet = load_unet(&dir, None).unwrap();
    check(
        "unet",
        unet.forward(sample.clone(), 759.0, &ctx, None, None)
            .unwrap(),
        &want.host("unet.out"),
    );
    for file in ["lora-kohya.safetensors", "lora-peft.safetensors"] {
        let unet = load_unet(&dir, Some(&fixtures().join(file))).unwrap();
        check(
            &format!("unet + {file}"),
            unet.forward(sample.clone(), 759.0, &ctx, None, None)
                .unwrap(),
            &want.host("unet.lora_out"),
        );
    }
}

#[test]
fn lcm_unet_with_guidance_embedding_matches_diffusers() {
    let want = Expected::load();
    // The embedding of 1000·w reaches 7000 rad: one ulp of difference between PyTorch's
    // vectorised f32 exp and a correctly rounded one moves a phase by ~5e-4. Allow that on at
    // most two of the 256 values; every other value must agree to 1e-6.
    let cond = guidance_embedding::<Cpu>(7.0, 256, &Default::default());
    let want_cond = want.host("lcm.timestep_cond");
    let errors: Vec<f32> = values(cond.clone())
        .iter()
        .zip(&want_cond.data)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let off = errors.iter().filter(|&&e| e > 1e-6).count();
    let max = errors.iter().copied().fold(0f32, f32::max);
    println!("parity guidance embedding: {off} of 256 values off by more than 1e-6, max {max:.3e}");
    assert!(off <= 2 && max < 1e-3, "{off} values off, max {max}");
    let unet = load_unet(&model_dir().join("unet"), None).unwrap();
    let out = unet
        .forward(
            want.tensor("unet.sample"),
            759.0,
            &want.tensor("unet.encoder_hidden_states"),
            Some(&cond),
            None,
        )
        .unwrap();
    check("unet (lcm, linear proj)", out, &want.host("unet_lcm.out"));
    let err = unet
        .forward(
            want.tensor("unet.sample"),
            759.0,
            &want.tensor("unet.encoder_hidden_states"),
            None,
            None,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("guidance embedding"), "{err}");
}

#[test]
fn vae_decoder_matches_diffusers_bf16_weights() {
    let want = Expected::load();
    let file =
        TensorFile::open(&model_dir().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let vae = load_vae(None, &file);
    check(
        "vae decoder",
        vae.forward(want.tensor("vae.latents")),
        &want.host("vae.out"),
    );
}

#[test]
fn full_lcm_loop_matches_diffusers() {
    let want = Expected::load();
    let pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        &[],
    )
    .unwrap();
    let timesteps: Vec<usize> = want
        .host("lcm.timesteps")
        .data
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(pipe.scheduler().timesteps(4).unwrap(), timesteps);
    let ids: Vec<u32> = want
        .host("text.input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    let ctx = pipe.encode_ids(&ids, None).unwrap().context;
    let mut seen = Vec::new();
    let denoised = pipe
        .denoise(
            &TextConditioning {
                prompt: Prompt {
                    context: ctx,
                    pooled: None,
                },
                negative: None,
                time_ids: [0.0; 6],
            },
            want.tensor("lcm.init"),
            4,
            8.0,
            |k| want.tensor(&format!("lcm.noise.{k}")),
            |k, total| {
                seen.push((k, total));
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    check(
        "lcm final latent",
        denoised.clone(),
        &want.host("lcm.denoised.3"),
    );
    check("lcm image", pipe.decode(denoised), &want.host("lcm.image"));
}

#[test]
fn single_file_ldm_names_load_the_same_weights() {
    let want = Expected::load();
    // The tiny UNet rewritten with LDM names must compute exactly what the diffusers one does.
    let dir = fixtures().join("tiny-unet");
    let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let ldm = drover_shared::arch::UnetConfig {
        block_out_channels: vec![32, 64],
        cross_attention: vec![true, false],
        transformer_layers: vec![1, 1],
        mid_transformer_layers: 1,
        layers_per_block: 1,
        cross_attention_dim: 32,
        linear_projection: false,
        addition_embed_in: None,
        time_cond_proj_dim: None,
        in_channels: 4,
    };
    let renamed: Vec<_> = file
        .names()
        .map(|n| {
            let t = file.read(n).unwrap();
            (
                format!("model.diffusion_model.{}", ldm.diffusers_to_ldm(n)),
                t.shape.iter().map(|&d| d as u64).collect(),
                t.data,
            )
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("unet-ldm.safetensors");
    std::fs::write(&path, f32_file(&renamed)).unwrap();
    let ldm_file = TensorFile::open(&path).unwrap();
    let cfg: UnetConfig = read_config(&dir.join("config.json"));
    let map: NameMap =
        Box::new(move |n| format!("model.diffusion_model.{}", ldm.diffusers_to_ldm(n)));
    let mut l = Loader::<Cpu>::new(&ldm_file, map, &Default::default());
    let unet = Unet::load(&mut l, &cfg).unwrap();
    assert!(l.unused("model.diffusion_model.").is_empty());
    check(
        "unet from LDM names",
        unet.forward(
            want.tensor("unet.sample"),
            759.0,
            &want.tensor("unet.encoder_hidden_states"),
            None,
            None,
        )
        .unwrap(),
        &want.host("unet.out"),
    );

    // The VAE decoder with LDM names, attention weights as 1×1 convolutions.
    let vae_file =
        TensorFile::open(&model_dir().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let renamed: Vec<_> = vae_file
        .names()
        .filter(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv"))
        .map(|n| {
            let t = vae_file.read(n).unwrap();
            let mut shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            if n.contains("attentions.0.to_") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            (
                format!("first_stage_model.{}", vae_diffusers_to_ldm(n, 2)),
                shape,
                t.data,
            )
        })
        .collect();
    let path = tmp.path().join("vae-ldm.safetensors");
    std::fs::write(&path, f32_file(&renamed)).unwrap();
    let ldm_vae = TensorFile::open(&path).unwrap();
    let vae = load_vae(
        Some(Box::new(|n| {
            format!("first_stage_model.{}", vae_diffusers_to_ldm(n, 2))
        })),
        &ldm_vae,
    );
    check(
        "vae from LDM names",
        vae.forward(want.tensor("vae.latents")),
        &want.host("vae.out"),
    );
}

#[test]
fn bad_weights_and_loras_fail_with_their_names() {
    let dir = fixtures().join("tiny-unet");
    let tmp = tempfile::tempdir().unwrap();
    let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let cfg: UnetConfig = read_config(&dir.join("config.json"));
    let rewrite = |skip: &str, reshape: &str| {
        let tensors: Vec<_> = file
            .names()
            .filter(|n| *n != skip)
            .map(|n| {
                let t = file.read(n).unwrap();
                let mut shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
                let mut data = t.data;
                if n == reshape {
                    shape[0] += 1;
                    data.extend(std::iter::repeat_n(
                        0.0,
                        data.len() / (shape[0] as usize - 1),
                    ));
                }
                (n.to_string(), shape, data)
            })
            .collect();
        let path = tmp.path().join("unet.safetensors");
        std::fs::write(&path, f32_file(&tensors)).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let mut l = Loader::<Cpu>::prefixed(&f, "", &Default::default());
        Unet::load(&mut l, &cfg).err().unwrap()
    };
    let missing = rewrite("mid_block.attentions.0.proj_out.weight", "");
    assert!(
        matches!(&missing, NodeError::MissingTensor { name, .. } if name == "mid_block.attentions.0.proj_out.weight"),
        "{missing}"
    );
    let shape = rewrite("", "conv_in.weight");
    assert!(
        matches!(&shape, NodeError::TensorShape { name, .. } if name == "conv_in.weight"),
        "{shape}"
    );
    assert!(shape.to_string().contains("[33, 4, 3, 3]"), "{shape}");

    // A LoRA made for SDXL names modules this SD1-style UNet does not have.
    let sdxl_lora = tmp.path().join("sdxl-lora.safetensors");
    drover_shared::safetensors::build::write_model(
        &sdxl_lora,
        &drover_shared::arch::lora(
            drover_shared::family::ModelFamily::Sdxl,
            drover_shared::arch::LoraStyle::Kohya,
            4,
            false,
        ),
        drover_shared::safetensors::Dtype::F16,
    )
    .unwrap();
    let err = load_unet(&dir, Some(&sdxl_lora)).err().unwrap().to_string();
    assert!(err.contains("match nothing in this model"), "{err}");

    // An integer tensor where weights belong.
    let ints = drover_shared::safetensors::build::to_bytes(
        &[(
            "conv_in.weight".to_string(),
            drover_shared::safetensors::Dtype::I32,
            vec![32, 4, 3, 3],
        )],
        &[],
    );
    let path = tmp.path().join("ints.safetensors");
    std::fs::write(&path, ints).unwrap();
    let f = TensorFile::open(&path).unwrap();
    let err = f.read("conv_in.weight").err().unwrap().to_string();
    assert!(err.contains("is I32"), "{err}");
}

#[test]
fn generate_renders_deterministic_images_and_stops_on_cancel() {
    let pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        &[],
    )
    .unwrap();
    let params = Params {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        width: 32,
        height: 16,
        steps: 3,
        guidance: 8.0,
        seed: 42,
    };
    let a = pipe
        .generate(&params, |_, _| ControlFlow::Continue(()))
        .unwrap();
    let b = pipe
        .generate(&params, |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!((a.width, a.height, a.rgb.len()), (32, 16, 32 * 16 * 3));
    assert_eq!(a, b, "same seed, same image");
    let c = pipe
        .generate(
            &Params {
                seed: 43,
                ..params.clone()
            },
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_ne!(a.rgb, c.rgb, "another seed, another image");
    let mut calls = 0;
    let err = pipe
        .generate(&params, |_, _| {
            calls += 1;
            ControlFlow::Break(())
        })
        .err()
        .unwrap();
    assert!(matches!(err, NodeError::Cancelled));
    assert_eq!(calls, 1, "stops after the first step");
    let err = pipe
        .generate(
            &Params {
                width: 18,
                ..params
            },
            |_, _| ControlFlow::Continue(()),
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a multiple of 4"), "{err}");
}

fn sdxl_dir() -> PathBuf {
    fixtures().join("tiny-sdxl-lcm")
}

fn sdxl_pipeline(loras: &[LoraSpec]) -> Pipeline<Cpu> {
    Pipeline::<Cpu>::load(
        ModelSource::Diffusers(sdxl_dir()),
        &Default::default(),
        loras,
    )
    .unwrap()
}

fn prompt_ids(want: &Expected) -> Vec<u32> {
    want.host("text.input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect()
}

fn sdxl_added(want: &Expected, pooled: Tensor<Cpu, 2>) -> AddedCond<Cpu> {
    let ids = want.host("sdxl.time_ids").data;
    AddedCond {
        text_embeds: pooled,
        time_ids: ids.as_slice().try_into().unwrap(),
    }
}

#[test]
fn sdxl_text_encoders_match_transformers() {
    let want = Expected::load();
    let pipe = sdxl_pipeline(&[]);
    let prompt = pipe.encode_ids(&prompt_ids(&want), None).unwrap();
    check(
        "sdxl context (both penultimate layers)",
        prompt.context,
        &want.host("sdxl.context"),
    );
    check(
        "sdxl pooled (projected)",
        prompt.pooled.unwrap(),
        &want.host("sdxl.pooled"),
    );
}

#[test]
fn sdxl_unet_with_text_time_matches_diffusers() {
    let want = Expected::load();
    let pipe = sdxl_pipeline(&[]);
    let added = sdxl_added(&want, want.tensor("sdxl.pooled"));
    let out = pipe
        .unet(
            want.tensor("sdxl.sample"),
            759.0,
            &want.tensor("sdxl.context"),
            Some(&want.tensor("lcm.timestep_cond")),
            Some(&added),
        )
        .unwrap();
    check(
        "sdxl unet (text_time, 2 transformer blocks)",
        out,
        &want.host("sdxl.unet_out"),
    );
    let err = pipe
        .unet(
            want.tensor("sdxl.sample"),
            759.0,
            &want.tensor("sdxl.context"),
            Some(&want.tensor("lcm.timestep_cond")),
            None,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("text_time"), "{err}");
}

#[test]
fn sdxl_full_lcm_loop_matches_diffusers() {
    let want = Expected::load();
    let pipe = sdxl_pipeline(&[]);
    let prompt = pipe.encode_ids(&prompt_ids(&want), None).unwrap();
    let ids = want.host("sdxl.time_ids").data;
    let text = TextConditioning {
        prompt,
        negative: None,
        time_ids: ids.as_slice().try_into().unwrap(),
    };
    let denoised = pipe
        .denoise(
            &text,
            want.tensor("sdxl.lcm.init"),
            4,
            8.0,
            |k| want.tensor(&format!("sdxl.lcm.noise.{k}")),
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    check(
        "sdxl lcm final latent",
        denoised.clone(),
        &want.host("sdxl.lcm.denoised"),
    );
    check(
        "sdxl lcm image (vae 0.13025)",
        pipe.decode(denoised),
        &want.host("sdxl.lcm.image"),
    );
}

#[test]
fn sdxl_lora_merges_into_unet_and_both_encoders_in_diffusers_and_ldm_names() {
    let want = Expected::load();
    let lora = |path: PathBuf| LoraSpec {
        name: "xl".into(),
        path,
        strength: 0.7,
    };
    // The same LoRA with its UNet keys in the LDM names SDXL kohya files use.
    let tmp = tempfile::tempdir().unwrap();
    let ldm_path = tmp.path().join("lora-sdxl-ldm.safetensors");
    {
        let cfg: UnetConfig = read_config(&sdxl_dir().join("unet/config.json"));
        let arch = cfg.to_arch();
        let unet =
            TensorFile::open(&sdxl_dir().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        let by_flat: std::collections::HashMap<String, String> = unet
            .names()
            .filter_map(|n| n.strip_suffix(".weight"))
            .map(|p| (p.replace('.', "_"), p.to_string()))
            .collect();
        let file = TensorFile::open(&fixtures().join("lora-sdxl-kohya.safetensors")).unwrap();
        let renamed: Vec<_> = file
            .names()
            .map(|n| {
                let t = file.read(n).unwrap();
                let name = match n.strip_prefix("lora_unet_") {
                    Some(rest) => {
                        let (module, suffix) = rest.split_once('.').unwrap();
                        let ldm = arch.diffusers_to_ldm(&by_flat[module]);
                        format!("lora_unet_{}.{suffix}", ldm.replace('.', "_"))
                    }
                    None => n.to_string(),
                };
                (name, t.shape.iter().map(|&d| d as u64).collect(), t.data)
            })
            .collect();
        std::fs::write(&ldm_path, f32_file(&renamed)).unwrap();
    }
    for path in [fixtures().join("lora-sdxl-kohya.safetensors"), ldm_path] {
        let label = path.file_name().unwrap().to_string_lossy().into_owned();
        let pipe = sdxl_pipeline(&[lora(path)]);
        let prompt = pipe.encode_ids(&prompt_ids(&want), None).unwrap();
        check(
            &format!("sdxl context + {label}"),
            prompt.context.clone(),
            &want.host("sdxl.lora.context"),
        );
        let pooled = prompt.pooled.unwrap();
        check(
            &format!("sdxl pooled + {label}"),
            pooled.clone(),
            &want.host("sdxl.lora.pooled"),
        );
        let added = sdxl_added(&want, pooled);
        let out = pipe
            .unet(
                want.tensor("sdxl.sample"),
                759.0,
                &prompt.context,
                Some(&want.tensor("lcm.timestep_cond")),
                Some(&added),
            )
            .unwrap();
        check(
            &format!("sdxl unet + {label}"),
            out,
            &want.host("sdxl.lora.unet_out"),
        );
    }
    // An SD1.5 LoRA does not fit this SDXL model.
    let err = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(sdxl_dir()),
        &Default::default(),
        &[lora(fixtures().join("lora-kohya.safetensors"))],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lora xl"), "{err}");
}

#[test]
fn openclip_single_file_layout_reads_as_the_same_text_encoder() {
    // SDXL's second encoder rewritten the way single-file checkpoints store OpenCLIP: fused q/k/v,
    // `transformer.resblocks.N`, `ln_final`, a transposed `text_projection`.
    let want = Expected::load();
    let dir = sdxl_dir().join("text_encoder_2");
    let cfg: ClipConfig = read_config(&dir.join("config.json"));
    let hf = TensorFile::open(&dir.join("model.safetensors")).unwrap();
    let prefix = "conditioner.embedders.1.model.";
    let get = |n: &str| hf.read(n).unwrap();
    let shape = |t: &HostTensor| t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>();
    let mut out = Vec::new();
    let mut put = |name: String, t: HostTensor| out.push((name, shape(&t), t.data));
    let tower = clip_prefix(&hf);
    put(
        format!("{prefix}token_embedding.weight"),
        get(&format!("{tower}embeddings.token_embedding.weight")),
    );
    put(
        format!("{prefix}positional_embedding"),
        get(&format!("{tower}embeddings.position_embedding.weight")),
    );
    for p in ["weight", "bias"] {
        put(
            format!("{prefix}ln_final.{p}"),
            get(&format!("{tower}final_layer_norm.{p}")),
        );
    }
    for i in 0..cfg.num_hidden_layers {
        let hf_layer = format!("{tower}encoder.layers.{i}");
        let oc = format!("{prefix}transformer.resblocks.{i}");
        for (from, to) in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("self_attn.out_proj", "attn.out_proj"),
        ] {
            for p in ["weight", "bias"] {
                put(
                    format!("{oc}.{to}.{p}"),
                    get(&format!("{hf_layer}.{from}.{p}")),
                );
            }
        }
        for p in ["weight", "bias"] {
            let parts: Vec<HostTensor> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|m| get(&format!("{hf_layer}.self_attn.{m}.{p}")))
                .collect();
            let mut fused_shape = parts[0].shape.clone();
            fused_shape[0] *= 3;
            let data = parts.iter().flat_map(|t| t.data.clone()).collect();
            put(
                format!("{oc}.attn.in_proj_{p}"),
                HostTensor {
                    data,
                    shape: fused_shape,
                },
            );
        }
    }
    let proj = get("text_projection.weight");
    let (r, c) = (proj.shape[0], proj.shape[1]);
    let mut transposed = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            transposed[j * r + i] = proj.data[i * c + j];
        }
    }
    put(
        format!("{prefix}text_projection"),
        HostTensor {
            data: transposed,
            shape: vec![c, r],
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("openclip.safetensors");
    std::fs::write(&path, f32_file(&out)).unwrap();
    let file = TensorFile::open(&path).unwrap();
    let src = OpenClipSource::new(&file, prefix);
    assert_eq!(
        (src.layers(), src.width()),
        (cfg.num_hidden_layers, Some(cfg.hidden_size))
    );
    let encoder = ClipText::load(
        &mut Loader::<Cpu>::prefixed(&src, "", &Default::default()),
        &cfg,
    )
    .unwrap()
    .with_projection(
        &mut Loader::<Cpu>::prefixed(&src, "", &Default::default()),
        r,
    )
    .unwrap();
    let got = encoder.encode(&[prompt_ids(&want)]).unwrap();
    // The second encoder's half of the SDXL context, and its pooled output.
    let context = want.host("sdxl.context");
    let (tokens, width) = (context.shape[1], context.shape[2]);
    let half: Vec<f32> = (0..tokens)
        .flat_map(|t| context.data[t * width + (width - cfg.hidden_size)..(t + 1) * width].to_vec())
        .collect();
    check(
        "openclip layout: penultimate",
        got.penultimate,
        &HostTensor {
            data: half,
            shape: vec![1, tokens, cfg.hidden_size],
        },
    );
    check(
        "openclip layout: pooled",
        got.pooled,
        &want.host("sdxl.pooled"),
    );
}

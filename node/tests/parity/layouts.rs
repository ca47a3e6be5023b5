//! Other names for the same weights (single-file LDM checkpoints, OpenCLIP towers) load the
//! same model; broken weights and LoRAs fail naming what is wrong.

use drover_node::burn::Cpu;
use drover_node::burn::clip::{ClipConfig, ClipText, clip_prefix};
use drover_node::burn::pipeline::vae_diffusers_to_ldm;
use drover_node::burn::tensor_file::{HostTensor, TensorFile};
use drover_node::burn::unet::{Unet, UnetConfig};
use drover_node::burn::weights::{Loader, NameMap, OpenClipSource};
use drover_node::error::NodeError;
use drover_shared::safetensors::build::f32_file;

use crate::{
    Expected, check, fixtures, load_unet, load_vae, model_dir, prompt_ids, read_config, sdxl_dir,
};

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

/// Diffusers' verdict on Drover's single-file names (`scripts/make_ldm_reference.py`: each
/// LDM name Drover uses, run through diffusers' own `convert_ldm_unet_checkpoint` /
/// `convert_ldm_vae_checkpoint`, lands on the diffusers name recorded here).
#[derive(serde::Deserialize)]
struct LdmVerdict {
    pairs: Vec<(String, String)>,
    unplaced: Vec<String>,
}

#[test]
fn single_file_names_are_the_ones_diffusers_converts() {
    let verdicts: std::collections::BTreeMap<String, LdmVerdict> =
        read_config(&fixtures().join("ldm-names.json"));
    let models = [
        ("sd1_unet", "tiny-unet"),
        ("sd15_lcm_unet", "tiny-sd15-lcm/unet"),
        ("sdxl_unet", "tiny-sdxl-lcm/unet"),
        ("sd15_vae", "tiny-sd15-lcm/vae"),
        ("sdxl_vae", "tiny-sdxl-lcm/vae"),
    ];
    for (model, folder) in models {
        let verdict = &verdicts[model];
        let dir = fixtures().join(folder);
        let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        // Every tensor is judged: placed by diffusers, or listed as not placed.
        assert_eq!(
            verdict.pairs.len() + verdict.unplaced.len(),
            file.names().count(),
            "{model}"
        );
        // The LCM guidance projection has no LDM name in diffusers (its converter drops it);
        // nothing else may be left out.
        assert!(
            verdict
                .unplaced
                .iter()
                .all(|n| n == "model.diffusion_model.time_embed.cond_proj.weight"),
            "{model}: {:?}",
            verdict.unplaced
        );
        let ours: Box<dyn Fn(&str) -> String> = if model.ends_with("unet") {
            let arch = read_config::<UnetConfig>(&dir.join("config.json")).to_arch();
            Box::new(move |n| format!("model.diffusion_model.{}", arch.diffusers_to_ldm(n)))
        } else {
            let cfg: serde_json::Value = read_config(&dir.join("config.json"));
            let levels = cfg["block_out_channels"].as_array().map_or(0, Vec::len);
            Box::new(move |n| format!("first_stage_model.{}", vae_diffusers_to_ldm(n, levels)))
        };
        for (diffusers, ldm) in &verdict.pairs {
            assert_eq!(&ours(diffusers), ldm, "{model}: {diffusers}");
        }
        println!(
            "ldm names {model}: {} of {} as diffusers converts them",
            verdict.pairs.len(),
            file.names().count()
        );
    }
}

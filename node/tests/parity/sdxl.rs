//! SDXL: both text encoders, the UNet with text_time conditioning, the LCM loop, and a LoRA
//! merged into the UNet and both encoders under diffusers and LDM names.

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::Tensor;
use drover_node::burn::Cpu;
use drover_node::burn::denoise::TextConditioning;
use drover_node::burn::pipeline::{LoraSpec, ModelSource, Pipeline, Precision};
use drover_node::burn::tensor_file::TensorFile;
use drover_node::burn::unet::{AddedCond, UnetConfig};
use drover_node::sampling::SigmaSchedule;
use drover_shared::safetensors::build::f32_file;

use crate::{Expected, check, fixtures, prompt_ids, read_config, sdxl_dir};

fn sdxl_pipeline(loras: &[LoraSpec]) -> Pipeline<Cpu> {
    Pipeline::<Cpu>::load(
        ModelSource::Diffusers(sdxl_dir()),
        &Default::default(),
        Precision::F32,
        loras,
    )
    .unwrap()
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
            &pipe.plan(None, SigmaSchedule::Automatic, 4).unwrap(),
            8.0,
            0.0,
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
        lcm: false,
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
    // Each file merged as the model loads, and switched on in place on a loaded model (the
    // switch after another LoRA, so bases are restored first): both against diffusers.
    let mut switched = sdxl_pipeline(&[]);
    let ways = [
        (fixtures().join("lora-sdxl-kohya.safetensors"), false),
        (ldm_path.clone(), false),
        (fixtures().join("lora-sdxl-kohya.safetensors"), true),
        (ldm_path, true),
    ];
    for (path, in_place) in ways {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let label = format!("{name}{}", if in_place { " in place" } else { "" });
        let loaded;
        let pipe = if in_place {
            // Another strength first, so this switch starts from a merged model.
            let mut other = lora(path.clone());
            other.strength = -0.3;
            switched.set_loras(&[other]).unwrap();
            assert!(switched.set_loras(&[lora(path)]).unwrap() > 0);
            &switched
        } else {
            loaded = sdxl_pipeline(&[lora(path)]);
            &loaded
        };
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
        Precision::F32,
        &[lora(fixtures().join("lora-kohya.safetensors"))],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lora xl"), "{err}");
}

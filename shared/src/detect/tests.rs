use super::*;
use crate::arch::{self, LoraStyle, UnetConfig};
use crate::safetensors::build::write_model;

fn write(path: &Path, tensors: Vec<arch::Tensor>, dtype: Dtype) {
    write_model(path, &tensors, dtype).unwrap();
}

fn check(path: &Path, family: ModelFamily, kind: ModelKind, layout: Layout) -> Inspection {
    let found = inspect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        (found.family, found.kind, found.layout),
        (family, kind, layout),
        "{}",
        path.display()
    );
    assert_eq!(found.cross_attention_dim, family.cross_attention_dim());
    assert_eq!(found.model_id.len(), 64);
    found
}

#[test]
fn single_file_checkpoints_of_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for (family, params) in [
        (ModelFamily::Sd15, 1_066_235_307u64),
        (ModelFamily::Sd2, 1_303_201_989),
        (ModelFamily::Sdxl, 3_467_734_000),
        (ModelFamily::SdxlRefiner, 0),
    ] {
        let path = dir.path().join(format!("{family}.safetensors"));
        write(&path, arch::ldm_checkpoint(family), Dtype::F16);
        let found = check(&path, family, ModelKind::Checkpoint, Layout::LdmSingleFile);
        assert_eq!(found.dtype, Some(Dtype::F16));
        assert_eq!(found.weights_bytes, 2 * found.parameters);
        assert!(found.components.contains(&"vae".to_string()));
        if params > 0 {
            // Within 0.5% of the published totals (position_ids and similar buffers differ).
            let ratio = found.parameters as f64 / params as f64;
            assert!(
                (0.995..1.005).contains(&ratio),
                "{family}: {} vs {params}",
                found.parameters
            );
        }
    }
}

#[test]
fn unet_only_files_and_diffusers_unets() {
    let dir = tempfile::tempdir().unwrap();
    for family in ModelFamily::ALL {
        let unet = UnetConfig::for_family(family);
        let ldm: Vec<arch::Tensor> = unet
            .ldm_tensors()
            .into_iter()
            .map(|(n, s)| (format!("model.diffusion_model.{n}"), s))
            .collect();
        let path = dir.path().join(format!("{family}-ldm-unet.safetensors"));
        write(&path, ldm, Dtype::BF16);
        check(&path, family, ModelKind::Unet, Layout::LdmSingleFile);
        let path = dir
            .path()
            .join(format!("{family}-unet/diffusion_pytorch_model.safetensors"));
        write(&path, unet.diffusers_tensors(), Dtype::F32);
        std::fs::write(dir.path().join(format!("{family}-unet/config.json")), "{}").unwrap();
        check(&path, family, ModelKind::Unet, Layout::Diffusers);
        check(
            path.parent().unwrap(),
            family,
            ModelKind::Unet,
            Layout::Diffusers,
        );
    }
}

#[test]
fn diffusers_pipeline_folders() {
    let dir = tempfile::tempdir().unwrap();
    for family in ModelFamily::ALL {
        let root = dir.path().join(format!("{family}-pipeline"));
        write(
            &root.join("unet/diffusion_pytorch_model.fp16.safetensors"),
            UnetConfig::for_family(family).diffusers_tensors(),
            Dtype::F16,
        );
        for (folder, tensors) in arch::diffusers_text_encoders(family) {
            write(
                &root.join(folder).join("model.fp16.safetensors"),
                tensors,
                Dtype::F16,
            );
        }
        std::fs::write(
            root.join("model_index.json"),
            r#"{"_class_name":"StableDiffusionPipeline"}"#,
        )
        .unwrap();
        let found = check(&root, family, ModelKind::Checkpoint, Layout::Diffusers);
        assert!(found.components.len() >= 2, "{:?}", found.components);
    }
}

#[test]
fn loras_know_their_base() {
    let dir = tempfile::tempdir().unwrap();
    for family in ModelFamily::ALL {
        for (style, layout) in [
            (LoraStyle::Kohya, Layout::Kohya),
            (LoraStyle::Peft, Layout::Peft),
        ] {
            for text in [false, true] {
                let path = dir
                    .path()
                    .join(format!("{family}-{layout:?}-{text}.safetensors"));
                write(&path, arch::lora(family, style, 16, text), Dtype::F16);
                let found = check(&path, family, ModelKind::Lora, layout);
                assert_eq!(found.lora_rank, Some(16));
            }
        }
    }
    // A text-encoder-only SDXL LoRA: the base comes from the te1/te2 prefixes.
    let te_only: Vec<arch::Tensor> = arch::lora(ModelFamily::Sdxl, LoraStyle::Kohya, 4, true)
        .into_iter()
        .filter(|(n, _)| n.starts_with("lora_te"))
        .collect();
    let path = dir.path().join("te-only.safetensors");
    write(&path, te_only, Dtype::F32);
    check(&path, ModelFamily::Sdxl, ModelKind::Lora, Layout::Kohya);
}

#[test]
fn contradictions_and_non_models_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // An SD1.5 UNet carrying SDXL's added conditioning.
    let mut tensors = UnetConfig::for_family(ModelFamily::Sd15).diffusers_tensors();
    tensors.push(("add_embedding.linear_1.weight".into(), vec![1280, 2816]));
    let path = dir.path().join("franken.safetensors");
    write(&path, tensors, Dtype::F16);
    let err = inspect(&path).unwrap_err().to_string();
    assert!(
        err.contains("says sd15") && err.contains("added conditioning"),
        "{err}"
    );
    // An SDXL UNet with SD1.5's text encoder.
    let mut tensors = arch::ldm_checkpoint(ModelFamily::Sdxl);
    tensors.retain(|(n, _)| !n.starts_with("conditioner."));
    tensors.extend(
        arch::hf_clip_text(768, 12, false)
            .into_iter()
            .map(|(n, s)| (format!("cond_stage_model.transformer.{n}"), s)),
    );
    let path = dir.path().join("mixed.safetensors");
    write(&path, tensors, Dtype::F16);
    let err = inspect(&path).unwrap_err().to_string();
    assert!(err.contains("text encoders"), "{err}");
    // A VAE and a text encoder alone are not models we serve.
    let path = dir.path().join("vae.safetensors");
    write(&path, arch::ldm_vae(), Dtype::F32);
    assert!(inspect(&path).unwrap_err().to_string().contains("VAE"));
    let path = dir.path().join("te.safetensors");
    write(&path, arch::hf_clip_text(768, 2, false), Dtype::F32);
    assert!(
        inspect(&path)
            .unwrap_err()
            .to_string()
            .contains("text encoder")
    );
    // Missing paths and empty folders.
    assert!(matches!(
        inspect(&dir.path().join("nope")),
        Err(DetectError::Missing(_))
    ));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        inspect(&empty),
        Err(DetectError::NoModelInDir { .. })
    ));
    let not_st = dir.path().join("junk.safetensors");
    std::fs::write(&not_st, b"PK\x03\x04 this is a zip").unwrap();
    assert!(matches!(inspect(&not_st), Err(DetectError::Header { .. })));
}

fn found_header_len(path: &Path) -> u64 {
    crate::safetensors::read_header(path).unwrap().header_len
}

#[test]
fn a_big_checkpoint_is_inspected_without_reading_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl.safetensors");
    write(&path, arch::ldm_checkpoint(ModelFamily::Sdxl), Dtype::F16);
    assert!(std::fs::metadata(&path).unwrap().len() > 6_000_000_000);
    // The data section is sparse: inspecting it reads only the header.
    let found = check(
        &path,
        ModelFamily::Sdxl,
        ModelKind::Checkpoint,
        Layout::LdmSingleFile,
    );
    assert_eq!(
        found.weights_bytes + 8 + found_header_len(&path),
        std::fs::metadata(&path).unwrap().len()
    );
}

fn rknn_folder(root: &Path, unet_dim: u32, text_width: Option<u32>) {
    for c in RKNN_COMPONENTS {
        std::fs::create_dir_all(root.join(c)).unwrap();
        std::fs::write(root.join(c).join(RKNN_MODEL_FILE), format!("RKNN {c}")).unwrap();
    }
    std::fs::write(
        root.join("unet/config.json"),
        format!(r#"{{"cross_attention_dim": {unet_dim}, "sample_size": 64}}"#),
    )
    .unwrap();
    if let Some(w) = text_width {
        std::fs::write(
            root.join("text_encoder/config.json"),
            format!(r#"{{"hidden_size": {w}}}"#),
        )
        .unwrap();
    }
}

#[test]
fn rknn_folders_are_read_from_their_configs() {
    let dir = tempfile::tempdir().unwrap();
    let sd15 = dir.path().join("sd15");
    rknn_folder(&sd15, 768, Some(768));
    let found = check(
        &sd15,
        ModelFamily::Sd15,
        ModelKind::Checkpoint,
        Layout::Rknn,
    );
    assert_eq!(found.files.len(), 3);
    assert_eq!(found.model_id.len(), 64);
    assert_eq!(found.cross_attention_dim, 768);

    // Same configs, other model bytes: another id.
    let other = dir.path().join("other");
    rknn_folder(&other, 768, Some(768));
    std::fs::write(other.join("unet/model.rknn"), "RKNN other unet").unwrap();
    assert_ne!(inspect(&other).unwrap().model_id, found.model_id);

    let sd2 = dir.path().join("sd2");
    rknn_folder(&sd2, 1024, None);
    check(&sd2, ModelFamily::Sd2, ModelKind::Checkpoint, Layout::Rknn);

    let mixed = dir.path().join("mixed");
    rknn_folder(&mixed, 1024, Some(768));
    let err = inspect(&mixed).unwrap_err().to_string();
    assert!(
        err.contains("1024-wide") && err.contains("768 wide"),
        "{err}"
    );

    let partial = dir.path().join("partial");
    rknn_folder(&partial, 768, None);
    std::fs::remove_file(partial.join("vae_decoder/model.rknn")).unwrap();
    let err = inspect(&partial).unwrap_err().to_string();
    assert!(err.contains("vae_decoder/model.rknn"), "{err}");

    let no_config = dir.path().join("no-config");
    rknn_folder(&no_config, 768, None);
    std::fs::remove_file(no_config.join("unet/config.json")).unwrap();
    let err = inspect(&no_config).unwrap_err().to_string();
    assert!(err.contains("unet/config.json"), "{err}");

    let odd = dir.path().join("odd");
    rknn_folder(&odd, 512, None);
    let err = inspect(&odd).unwrap_err().to_string();
    assert!(err.contains("cross_attention_dim 512"), "{err}");
}

#[test]
fn inpainting_unets_are_told_by_their_nine_input_channels() {
    let dir = tempfile::tempdir().unwrap();
    let unet = UnetConfig::for_family(ModelFamily::Sd15);
    for (ldm, prefix, conv_in) in [
        (false, "", "conv_in.weight"),
        (true, "model.diffusion_model.", "input_blocks.0.0.weight"),
    ] {
        let tensors = if ldm {
            unet.ldm_tensors()
        } else {
            unet.diffusers_tensors()
        };
        for channels in [4u64, 9] {
            let list: Vec<arch::Tensor> = tensors
                .iter()
                .map(|(n, s)| {
                    let mut shape = s.clone();
                    if n == conv_in {
                        shape[1] = channels;
                    }
                    (format!("{prefix}{n}"), shape)
                })
                .collect();
            let path = dir.path().join(format!("{ldm}-{channels}.safetensors"));
            write(&path, list, Dtype::F16);
            let layout = if ldm {
                Layout::LdmSingleFile
            } else {
                Layout::Diffusers
            };
            let found = check(&path, ModelFamily::Sd15, ModelKind::Unet, layout);
            assert_eq!(found.inpainting, channels == 9, "{}", path.display());
        }
    }
}

#[test]
fn lcm_loras_are_told_by_their_names() {
    use std::collections::BTreeMap;
    let none = BTreeMap::new();
    for stem in [
        "lcm-lora-sdv1-5",
        "LCM_LoRA_Weights_SD15",
        "lcmlora_sdxl",
        "sdxl.lcm",
    ] {
        assert!(
            super::names_lcm(Path::new(&format!("/l/{stem}.safetensors")), &none),
            "{stem}"
        );
    }
    for stem in ["ink-sd15", "pytorch_lora_weights", "flcm", "calcium"] {
        assert!(
            !super::names_lcm(Path::new(&format!("/l/{stem}.safetensors")), &none),
            "{stem}"
        );
    }
    let plain = Path::new("/l/pytorch_lora_weights.safetensors");
    let meta = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    assert!(super::names_lcm(plain, &meta("ss_output_name", "lcm_sd15")));
    assert!(super::names_lcm(
        plain,
        &meta("modelspec.description", "Latent Consistency distilled LoRA")
    ));
    // Dataset tags say nothing about what the LoRA is.
    assert!(!super::names_lcm(plain, &meta("ss_tag_frequency", "lcm")));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lcm-lora-sdv1-5.safetensors");
    write(
        &path,
        arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 4, false),
        Dtype::F16,
    );
    let found = check(&path, ModelFamily::Sd15, ModelKind::Lora, Layout::Kohya);
    assert!(found.lcm_lora);
    let path = dir.path().join("ink-sd15.safetensors");
    write(
        &path,
        arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 4, false),
        Dtype::F16,
    );
    assert!(!check(&path, ModelFamily::Sd15, ModelKind::Lora, Layout::Kohya).lcm_lora);
}

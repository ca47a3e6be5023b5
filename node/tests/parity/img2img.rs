//! Image-to-image and inpainting against diffusers' own pipelines
//! (`scripts/make_img2img_fixtures.py`): the VAE encoder alone, then whole runs of
//! StableDiffusionImg2ImgPipeline (DPM++ 2M Karras, Euler a, Heun, DDIM, UniPC),
//! LatentConsistencyModelImg2ImgPipeline, StableDiffusionInpaintPipeline (a UNet without mask
//! inputs: Euler at strength 1, DPM++ 2M, Heun, LCM; a 9-channel inpainting UNet: Euler at
//! strength 1, DPM++ 2M) and StableDiffusionXLImg2ImgPipeline (LCM)
//! on the tiny models, from the same source image, mask and noise. Final latents and decoded
//! images agree within the sampler tests' tolerance.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use drover_node::burn::Cpu;
use drover_node::burn::pipeline::{ModelSource, Pipeline, Precision, vae_diffusers_to_ldm};
use drover_node::burn::tensor_file::TensorFile;
use drover_node::burn::vae::{VaeConfig, VaeEncoder};
use drover_node::burn::weights::Loader;
use drover_node::render::{Params, Source};
use drover_node::sampling::{Sampler, SigmaSchedule};
use serde::Deserialize;

use super::samplers::sampler;
use drover_shared::safetensors::build::f32_file;

use super::{TOLERANCE, check, fixtures, model_dir, read_config, sdxl_dir, values};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    pipeline: String,
    model: String,
    sampler: String,
    steps: usize,
    strength: f64,
    guidance: f32,
    prompt: String,
    negative_prompt: String,
    mask: bool,
    noise_draws: usize,
}

struct Fixture(TensorFile);

impl Fixture {
    fn load() -> Self {
        Self(TensorFile::open(&fixtures().join("img2img.safetensors")).unwrap())
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<Cpu, D> {
        let t = self.0.read(name).unwrap();
        Tensor::from_data(TensorData::new(t.data, t.shape), &Default::default())
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        self.0
            .read(name)
            .unwrap()
            .data
            .iter()
            .map(|&v| v as u8)
            .collect()
    }

    /// The source image as the pipelines saw it: `[1, 3, 16, 16]` in `[-1, 1]`.
    fn pixels(&self) -> Tensor<Cpu, 4> {
        let rgb = self.bytes("source.rgb");
        let mut chw = vec![0f32; rgb.len()];
        for (i, px) in rgb.chunks(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                chw[c * 256 + i] = (f32::from(v) / 255.0) * 2.0 - 1.0;
            }
        }
        Tensor::from_data(TensorData::new(chw, [1, 3, 16, 16]), &Default::default())
    }
}

fn encoder(dir: &Path, map: Option<drover_node::burn::weights::NameMap>) -> VaeEncoder<Cpu> {
    let cfg: VaeConfig = read_config(&dir.join("vae/config.json"));
    let file = TensorFile::open(&dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let mut l = match map {
        Some(m) => Loader::<Cpu>::new(&file, m, &Default::default()),
        None => Loader::<Cpu>::prefixed(&file, "", &Default::default()),
    };
    VaeEncoder::load(&mut l, &cfg).unwrap()
}

#[test]
fn the_vae_encoder_matches_diffusers_latent_mean() {
    let want = Fixture::load();
    for (dir, name) in [(model_dir(), "encode.sd15"), (sdxl_dir(), "encode.sdxl")] {
        let got = encoder(&dir, None).forward(want.pixels());
        check(name, got, &want.0.read(name).unwrap());
    }
}

#[test]
fn the_vae_encoder_loads_from_ldm_names() {
    let want = Fixture::load();
    let vae_file =
        TensorFile::open(&model_dir().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    // LDM single files store the mid-block attention projections as 1×1 convolutions.
    let renamed: Vec<_> = vae_file
        .names()
        .filter(|n| n.starts_with("encoder.") || n.starts_with("quant_conv"))
        .map(|n| {
            let t = vae_file.read(n).unwrap();
            let mut shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            if n.contains("attentions.0.to_") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            (vae_diffusers_to_ldm(n, 2), shape, t.data)
        })
        .collect();
    assert!(
        renamed
            .iter()
            .any(|(n, ..)| n.starts_with("encoder.down.1.block.0")),
        "encoder levels keep their order in LDM names"
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vae-ldm.safetensors");
    std::fs::write(&path, f32_file(&renamed)).unwrap();
    let cfg: VaeConfig = read_config(&model_dir().join("vae/config.json"));
    let file = TensorFile::open(&path).unwrap();
    let mut l = Loader::<Cpu>::new(
        &file,
        Box::new(|n| vae_diffusers_to_ldm(n, 2)),
        &Default::default(),
    );
    let got = VaeEncoder::load(&mut l, &cfg)
        .unwrap()
        .forward(want.pixels());
    check(
        "vae encoder from LDM names",
        got,
        &want.0.read("encode.sd15").unwrap(),
    );
}

/// A 16×16 PNG of `data`.
fn png(color: png::ColorType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, 16, 16);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(data).unwrap();
    writer.finish().unwrap();
    out
}

/// A diffusers folder for the standard SD1.5 cases: tiny-sd15-lcm's tokenizer, text encoder and
/// VAE with the standard tiny UNet and Stable Diffusion's scheduler settings.
fn standard_sd15(tmp: &Path, unet: &str) -> PathBuf {
    let dir = tmp.join(unet);
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    for part in ["tokenizer", "text_encoder", "vae"] {
        std::os::unix::fs::symlink(model_dir().join(part), dir.join(part)).unwrap();
    }
    std::os::unix::fs::symlink(fixtures().join(unet), dir.join("unet")).unwrap();
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        r#"{"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
            "prediction_type": "epsilon", "set_alpha_to_one": false, "clip_sample": false}"#,
    )
    .unwrap();
    dir
}

#[test]
fn img2img_and_inpainting_match_diffusers_pipelines() {
    let cases: Cases = read_config(&fixtures().join("img2img.json"));
    let want = Fixture::load();
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: PathBuf| {
        Pipeline::<Cpu>::load(
            ModelSource::Diffusers(dir),
            &Default::default(),
            Precision::F32,
            &[],
        )
        .unwrap()
    };
    let sd15 = load(standard_sd15(tmp.path(), "tiny-unet"));
    let sd15_inpaint = load(standard_sd15(tmp.path(), "tiny-unet-inpaint"));
    assert!(sd15_inpaint.is_inpainting() && !sd15.is_inpainting());
    let sd15_lcm = load(model_dir());
    let sdxl_lcm = load(sdxl_dir());
    assert!(cases.cases.len() >= 10, "the fixture lost cases");
    let mut failed = Vec::new();
    let mut covered = (false, false, false, false);
    for case in &cases.cases {
        let pipe = match case.model.as_str() {
            "sd15" => &sd15,
            "sd15_lcm" => &sd15_lcm,
            "sd15_inpaint" => &sd15_inpaint,
            "sdxl_lcm" => &sdxl_lcm,
            other => panic!("fixture model {other}"),
        };
        let (kind, schedule) = match case.sampler.as_str() {
            "lcm" => (Sampler::Lcm, SigmaSchedule::Automatic),
            id => sampler(id),
        };
        covered.0 |= case.mask;
        covered.1 |= !case.mask && case.strength < 1.0;
        covered.2 |= case.model == "sdxl_lcm";
        covered.3 |= case.model == "sd15_inpaint";
        let params = Params {
            model: String::new(),
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            width: 16,
            height: 16,
            steps: case.steps,
            guidance: case.guidance,
            guidance_rescale: 0.0,
            sampler: Some(kind),
            schedule,
            seed: 0,
            loras: Vec::new(),
            // As a client sends them: PNGs (16×16, the job's size: nothing is resampled).
            source: Some(Source {
                image: png(png::ColorType::Rgb, &want.bytes("source.rgb")).into(),
                mask: case
                    .mask
                    .then(|| png(png::ColorType::Grayscale, &want.bytes("source.mask")).into()),
                strength: case.strength,
                resize_mode: Default::default(),
                mask_blur: 0,
            }),
        };
        let mut drawn = 0;
        let mut steps_seen = (0, 0);
        let (latent, _) = pipe
            .sample(
                &params,
                want.tensor(&format!("{}.init_noise", case.name)),
                |k| {
                    drawn += 1;
                    want.tensor(&format!("{}.noise.{k}", case.name))
                },
                |k, total| {
                    steps_seen = (k, total);
                    ControlFlow::Continue(())
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(drawn, case.noise_draws, "{}: noise draws", case.name);
        assert_eq!(steps_seen.0, steps_seen.1, "{}: progress", case.name);
        let image = pipe.decode(latent.clone());
        for (what, got, name) in [
            ("latent", latent, format!("{}.latent", case.name)),
            ("image", image, format!("{}.image", case.name)),
        ] {
            let expected = want.0.read(&name).unwrap();
            assert_eq!(got.dims().to_vec(), expected.shape, "{name}: shape");
            let got = values(got);
            let err = got
                .iter()
                .zip(&expected.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = expected.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let allowed = TOLERANCE.max(32.0 * f32::EPSILON * scale);
            println!(
                "parity {} ({}) {what}: max abs error {err:.3e} (values up to {scale:.2})",
                case.name, case.pipeline
            );
            if err > allowed {
                failed.push(format!("{name}: max abs error {err} > {allowed}"));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(
        covered,
        (true, true, true, true),
        "inpainting, img2img, SDXL, 9-channel inpainting"
    );
}

//! The RKNN wrapper, pipeline and workers against the fake runtime ([`super::fake`]).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use super::api::{CoreMask, RknnStatus, TensorFormat, TensorType};
use super::fake::{Call, FakeRknn, make_standard, write_model_folder};
use super::model::{nchw_to_nhwc, nhwc_to_nchw};
use super::pipeline::RknnPipeline;
use super::start_workers;
use crate::burn::Cpu;
use crate::burn::tokenizer::ClipTokenizer;
use crate::burn::unet::guidance_embedding;
use crate::error::NodeError;
use crate::render::{CancelFlag, Image, Lora, Params, Progress, RunJob, gaussian, step_noise_seed};
use crate::sampling::SchedulerConfig;
use crate::sampling::lcm::Lcm;

fn params(size: usize) -> Params {
    Params {
        prompt: "a red fox in the snow".into(),
        model: String::new(),
        negative_prompt: String::new(),
        width: size,
        height: size,
        steps: 4,
        guidance: 8.0,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: crate::sampling::SigmaSchedule::Automatic,
        seed: 42,
        loras: Vec::new(),
        source: None,
    }
}

fn net(call: &Call) -> (&'static str, &str) {
    match call {
        Call::Init(k) => ("init", k),
        Call::SetCoreMask(k, _) => ("core", k),
        Call::SetInputShapes(k, _) => ("shapes", k),
        Call::InputsSet(k) => ("set", k),
        Call::Run(k) => ("run", k),
        Call::OutputsGet(k) => ("get", k),
        Call::Destroy(k) => ("destroy", k),
    }
}

fn calls(api: &FakeRknn) -> Vec<(&'static str, String)> {
    api.calls()
        .iter()
        .map(|c| {
            let (a, k) = net(c);
            (a, k.to_string())
        })
        .collect()
}

fn seq(items: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    items.iter().map(|(a, k)| (*a, k.to_string())).collect()
}

fn as_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The same render computed independently, in plain scalar code, from the fake's definitions:
/// the latent the VAE decoder must receive (NCHW, already divided by the scaling factor).
fn reference_latent(p: &Params, context_mean: f64, cond_mean: f64) -> Vec<f64> {
    let lcm = Lcm::new(SchedulerConfig::default());
    let (c, h, w) = (4, p.height / 8, p.width / 8);
    let n = c * h * w;
    let mut x: Vec<f64> = gaussian(p.seed, n).iter().map(|&v| f64::from(v)).collect();
    let ts = lcm.timesteps(p.steps).unwrap();
    let mut denoised = x.clone();
    for (k, &t) in ts.iter().enumerate() {
        let base = 1e-3 * context_mean + 1e-6 * t as f64 + 1e-3 * cond_mean;
        let a = f64::from(lcm.alpha_cumprod(t));
        let (c_skip, c_out) = lcm.scalings(t);
        for i in 0..n {
            let eps = 0.5 * x[i] + 0.01 * ((i / (h * w)) % c) as f64 + base;
            let x0 = (x[i] - (1.0 - a).sqrt() * eps) / a.sqrt();
            denoised[i] = f64::from(c_out) * x0 + f64::from(c_skip) * x[i];
        }
        x = match ts.get(k + 1) {
            Some(&tp) => {
                let ap = f64::from(lcm.alpha_cumprod(tp));
                let noise = gaussian(step_noise_seed(p.seed, k), n);
                denoised
                    .iter()
                    .zip(noise)
                    .map(|(d, z)| ap.sqrt() * d + (1.0 - ap).sqrt() * f64::from(z))
                    .collect()
            }
            None => denoised.clone(),
        };
    }
    denoised.iter().map(|d| d / 0.18215).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "max abs difference {worst} > {tol}");
    worst
}

#[test]
fn the_pipeline_runs_on_the_npu_in_order_with_layouts_converted() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core1).unwrap();
    assert_eq!(pipeline.sizes(), &[(64, 64)]);
    assert_eq!(
        calls(&api),
        seq(&[
            ("init", "text"),
            ("core", "text"),
            ("init", "unet"),
            ("core", "unet"),
            ("init", "vae"),
            ("core", "vae")
        ])
    );
    assert!(
        api.calls()
            .iter()
            .filter_map(|c| match c {
                Call::SetCoreMask(_, m) => Some(*m),
                _ => None,
            })
            .all(|m| m == CoreMask::Core1)
    );

    let p = params(64);
    let mut steps = Vec::new();
    let image = pipeline
        .generate(&p, |s, t| {
            steps.push((s, t));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(steps, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(
        (image.width, image.height, image.rgb.len()),
        (64, 64, 64 * 64 * 3)
    );

    // Call order: text encoder once, the UNet once per step, the VAE decoder once.
    let mut want = vec![("set", "text"), ("run", "text"), ("get", "text")];
    for _ in 0..4 {
        want.extend([("set", "unet"), ("run", "unet"), ("get", "unet")]);
    }
    want.extend([("set", "vae"), ("run", "vae"), ("get", "vae")]);
    assert_eq!(calls(&api)[6..], seq(&want)[..]);

    let fed = api.fed();
    let input = |kind: &str, name: &str| {
        fed.iter()
            .filter(|f| f.kind == kind && f.name == name)
            .collect::<Vec<_>>()
    };
    // Token ids go in as the model's int32, exactly the tokenizer's.
    let ids = input("text", "input_ids");
    let tokens = ClipTokenizer::from_dir(&dir.path().join("tokenizer"))
        .unwrap()
        .encode(&p.prompt)
        .unwrap();
    assert_eq!(ids[0].dtype, TensorType::I32);
    assert_eq!(
        ids[0].values,
        tokens.ids.iter().map(|&i| f64::from(i)).collect::<Vec<_>>()
    );
    // Timesteps as the model's int64, in the LCM schedule's order.
    let ts = input("unet", "timestep");
    assert!(ts.iter().all(|f| f.dtype == TensorType::I64));
    assert_eq!(
        ts.iter().map(|f| f.values[0]).collect::<Vec<_>>(),
        vec![999.0, 759.0, 499.0, 259.0]
    );
    // The first sample is the seeded noise, transposed to the NHWC layout the model asks for.
    let sample = input("unet", "sample");
    assert!(
        sample
            .iter()
            .all(|f| f.format == TensorFormat::Nhwc && f.dtype == TensorType::F32)
    );
    let noise = gaussian(42, 4 * 8 * 8);
    assert_eq!(
        as_f32(&sample[0].values),
        nchw_to_nhwc(&noise, [1, 4, 8, 8])
    );
    // The guidance embedding of w = guidance − 1, and the text encoder's last hidden state.
    let cond = input("unet", "timestep_cond");
    let expected_cond = guidance_embedding::<Cpu>(7.0, 256, &Default::default())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(as_f32(&cond[0].values), expected_cond);
    let context = input("unet", "encoder_hidden_states");
    let expected_context: Vec<f32> = tokens
        .ids
        .iter()
        .flat_map(|&id| (0..768).map(move |k| (f64::from(id) * 1e-3 + k as f64 * 1e-4) as f32))
        .collect();
    assert_eq!(as_f32(&context[0].values), expected_context);

    // The latent the VAE decoder got, against the same render computed independently.
    let vae = input("vae", "latent_sample");
    assert_eq!(vae.len(), 1);
    assert_eq!(vae[0].format, TensorFormat::Nhwc);
    let got = nhwc_to_nchw(&vae[0].values, [1, 8, 8, 4]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let want = reference_latent(&p, mean(&context[0].values), mean(&cond[0].values));
    close(
        &got,
        &want,
        1e-4 * want.iter().fold(1.0, |m, v| v.abs().max(m)),
    );
    // And the image is that latent through the fake decoder, in RGB.
    for (i, px) in image.rgb.chunks(3).enumerate() {
        let (y, x) = (i / 64, i % 64);
        for (k, &byte) in px.iter().enumerate() {
            let v = want[(k * 8 + y / 8) * 8 + x / 8].tanh();
            let expected = ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round();
            assert!(
                (f64::from(byte) - expected).abs() <= 1.0,
                "pixel {i} channel {k}"
            );
        }
    }

    drop(pipeline);
    let destroyed = calls(&api).iter().filter(|(a, _)| *a == "destroy").count();
    assert_eq!(destroyed, 3);
}

#[test]
fn runtime_errors_are_typed_with_their_meaning_and_leak_no_context() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    *api.fail.lock().unwrap() = Some(("init", "unet".into(), -13));
    let err = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0).unwrap_err();
    match &err {
        NodeError::Rknn {
            call,
            status,
            model,
        } => {
            assert_eq!(*call, "rknn_init");
            assert_eq!(*status, RknnStatus::TargetPlatformUnmatch);
            assert!(model.ends_with("unet/model.rknn"), "{model}");
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string().contains("target_platform='rk3588'"),
        "{err}"
    );
    // The text encoder loaded before the failure was destroyed, once.
    assert_eq!(
        calls(&api).iter().filter(|(a, _)| *a == "destroy").count(),
        1
    );

    *api.fail.lock().unwrap() = Some(("run", "unet".into(), -3));
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0).unwrap();
    let err = pipeline
        .generate(&params(64), |_, _| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rknn_run") && err.contains("NPU is unavailable"),
        "{err}"
    );

    // A file that is no model: the runtime's own answer, with the file named.
    std::fs::write(dir.path().join("vae_decoder/model.rknn"), b"not a model").unwrap();
    let err = RknnPipeline::load(api, dir.path(), CoreMask::Core0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vae_decoder/model.rknn") && err.contains("invalid model"),
        "{err}"
    );
}

#[test]
fn networks_that_do_not_fit_together_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    std::fs::write(
        dir.path().join("unet/config.json"),
        r#"{"in_channels": 4, "cross_attention_dim": 1024, "time_cond_proj_dim": 256}"#,
    )
    .unwrap();
    let err = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder_hidden_states") && err.contains("1024"),
        "{err}"
    );

    write_model_folder(dir.path(), &[64]);
    std::fs::remove_dir_all(dir.path().join("tokenizer")).unwrap();
    let err = RknnPipeline::load(api, dir.path(), CoreMask::Core0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer/") && err.contains("never downloads"),
        "{err}"
    );
}

#[test]
fn dynamic_shape_models_switch_to_the_size_of_each_job() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64, 96]);
    let api = Arc::new(FakeRknn::default());
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core2).unwrap();
    assert_eq!(pipeline.sizes(), &[(64, 64), (96, 96)]);
    let image = pipeline
        .generate(&params(96), |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!((image.width, image.height), (96, 96));
    let shapes: Vec<Call> = api
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::SetInputShapes(..)))
        .collect();
    assert_eq!(
        shapes,
        vec![
            Call::SetInputShapes(
                "unet".into(),
                vec![vec![1, 12, 12, 4], vec![1], vec![1, 77, 768], vec![1, 256]]
            ),
            Call::SetInputShapes("vae".into(), vec![vec![1, 12, 12, 4]]),
        ]
    );
    // The same size again switches nothing.
    pipeline
        .generate(&params(96), |_, _| ControlFlow::Continue(()))
        .unwrap();
    let switches = api
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::SetInputShapes(..)))
        .count();
    assert_eq!(switches, 2);
    let err = pipeline
        .generate(&params(80), |_, _| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.is_permanent());
    assert!(err.to_string().contains("64x64, 96x96"), "{err}");
}

#[test]
fn a_cancelled_render_stops_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0).unwrap();
    let err = pipeline
        .generate(&params(64), |step, _| {
            if step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, NodeError::Cancelled));
    let unet_runs = api
        .calls()
        .iter()
        .filter(|c| **c == Call::Run("unet".into()))
        .count();
    assert_eq!(unet_runs, 2);
    assert!(!api.calls().contains(&Call::Run("vae".into())));
}

fn job(loras: Vec<Lora>) -> (RunJob, tokio::sync::mpsc::UnboundedReceiver<Progress>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let params = Params {
        prompt: "a lighthouse".into(),
        model: String::new(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 2,
        guidance: 8.0,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: crate::sampling::SigmaSchedule::Automatic,
        seed: 7,
        loras,
        source: None,
    };
    (
        RunJob {
            params,
            progress: tx.into(),
            cancel: CancelFlag::default(),
            span: tracing::Span::none(),
            upscale: None,
        },
        rx,
    )
}

fn start(api: Arc<FakeRknn>, dir: &Path, workers: u32) -> crate::error::Result<super::Started> {
    start_workers(api, dir.to_path_buf(), "fake-model", workers)
}

fn png_bytes(size: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Arc<[u8]> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, size, size);
        e.set_color(png::ColorType::Rgb);
        let mut writer = e.write_header().unwrap();
        let mut data = Vec::new();
        for y in 0..size {
            for x in 0..size {
                data.extend(pixel(x, y));
            }
        }
        writer.write_image_data(&data).unwrap();
    }
    Arc::from(out)
}

#[test]
fn with_a_vae_encoder_the_npu_pipeline_starts_from_images_and_inpaints() {
    use crate::render::Source;
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    // Without an encoder: a job from an image is refused, saying why.
    let mut plain = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0).unwrap();
    assert!(!plain.can_encode());
    let sunset = png_bytes(64, |x, y| [(x * 4) as u8, (y * 4) as u8, 90]);
    let night = png_bytes(64, |x, _| [10, 10, (x * 4) as u8]);
    let from = |image: &Arc<[u8]>, mask: Option<Arc<[u8]>>, strength: f64, seed: u64| Params {
        source: Some(Source {
            image: image.clone(),
            mask,
            strength,
            resize_mode: Default::default(),
            mask_blur: 0,
        }),
        seed,
        ..params(64)
    };
    let go = |_: usize, _: usize| ControlFlow::Continue(());
    let err = plain
        .generate(&from(&sunset, None, 0.5, 1), go)
        .unwrap_err();
    assert!(err.to_string().contains("no vae_encoder"), "{err}");

    super::fake::write_vae_encoder(dir.path(), 64);
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core1).unwrap();
    assert!(pipeline.can_encode());
    let before = api.calls().len();
    let a = pipeline.generate(&from(&sunset, None, 0.5, 1), go).unwrap();
    let encoder_runs = api.calls()[before..]
        .iter()
        .filter(|c| **c == Call::Run("vae_encoder".into()))
        .count();
    assert_eq!(encoder_runs, 1, "the source is encoded once");
    assert_eq!(
        a.rgb,
        pipeline
            .generate(&from(&sunset, None, 0.5, 1), go)
            .unwrap()
            .rgb
    );
    let b = pipeline.generate(&from(&night, None, 0.5, 1), go).unwrap();
    assert_ne!(a.rgb, b.rgb, "the source shapes the image");
    let text = pipeline
        .generate(
            &Params {
                seed: 1,
                ..params(64)
            },
            go,
        )
        .unwrap();
    assert_ne!(a.rgb, text.rgb, "not text-to-image");

    // Inpainting the right half: the left half is the source's whatever the seed.
    let mask = png_bytes(64, |x, _| if x >= 32 { [255; 3] } else { [0; 3] });
    let one = pipeline
        .generate(&from(&sunset, Some(mask.clone()), 1.0, 3), go)
        .unwrap();
    let two = pipeline
        .generate(&from(&sunset, Some(mask), 1.0, 4), go)
        .unwrap();
    let half = |img: &Image, right: bool| -> Vec<u8> {
        img.rgb
            .chunks(64 * 3)
            .flat_map(|row| {
                let (l, r) = row.split_at(32 * 3);
                if right { r.to_vec() } else { l.to_vec() }
            })
            .collect()
    };
    assert_eq!(half(&one, false), half(&two, false), "the kept half");
    assert_ne!(half(&one, true), half(&two, true), "the repainted half");

    // A worker pool over this folder advertises image-to-image.
    let img2img = actix_rt::System::new()
        .block_on(async { start(api, dir.path(), 1).map(|s| s.img2img) })
        .unwrap();
    assert!(img2img);
}

/// Euler with classifier-free guidance on the fake UNet, computed independently in scalar
/// code from the diffusers definitions (Stable Diffusion's betas, `leading` spacing with
/// offset 1, x in σ-space): the latent the VAE decoder must receive.
fn reference_euler_cfg(p: &Params, context_mean: f64, negative_mean: f64) -> Vec<f64> {
    let (lo, hi) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut alpha_bar = Vec::with_capacity(1000);
    let mut product = 1.0;
    for i in 0..1000 {
        let beta = (lo + (hi - lo) * i as f64 / 999.0).powi(2);
        product *= 1.0 - beta;
        alpha_bar.push(product);
    }
    let sigma = |t: usize| ((1.0 - alpha_bar[t]) / alpha_bar[t]).sqrt();
    let n_steps = p.steps;
    let ts: Vec<usize> = (0..n_steps)
        .rev()
        .map(|k| k * (1000 / n_steps) + 1)
        .collect();
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma(t)).collect();
    sigmas.push(0.0);
    let (c, h, w) = (4, p.height / 8, p.width / 8);
    let init = (sigmas[0] * sigmas[0] + 1.0).sqrt();
    let mut x: Vec<f64> = gaussian(p.seed, c * h * w)
        .iter()
        .map(|&v| f64::from(v) * init)
        .collect();
    for (k, &t) in ts.iter().enumerate() {
        let scale = (sigmas[k] * sigmas[k] + 1.0).sqrt();
        for (i, xi) in x.iter_mut().enumerate() {
            let input = *xi / scale;
            let eps = |mean: f64| {
                0.5 * input + 0.01 * ((i / (h * w)) % c) as f64 + 1e-3 * mean + 1e-6 * t as f64
            };
            let (cond, uncond) = (eps(context_mean), eps(negative_mean));
            let guided = uncond + f64::from(p.guidance) * (cond - uncond);
            *xi += guided * (sigmas[k + 1] - sigmas[k]);
        }
    }
    x.iter().map(|v| v / 0.18215).collect()
}

#[test]
fn a_standard_model_runs_the_standard_samplers_with_two_unet_calls_per_step() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    make_standard(dir.path(), 64);
    let api = Arc::new(FakeRknn::default());
    let mut pipeline = RknnPipeline::load(api.clone(), dir.path(), CoreMask::Core0).unwrap();
    let samplers = pipeline.samplers();
    assert_eq!(samplers[0], crate::sampling::Sampler::Dpmpp2m);
    assert!(!samplers.contains(&crate::sampling::Sampler::Lcm));

    let p = Params {
        sampler: Some(crate::sampling::Sampler::Euler),
        steps: 5,
        guidance: 7.0,
        negative_prompt: "blurry, low quality".into(),
        ..params(64)
    };
    let mut steps = Vec::new();
    pipeline
        .generate(&p, |s, t| {
            steps.push((s, t));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(steps.len(), 5);
    let fed = api.fed();
    let input = |kind: &str, name: &str| {
        fed.iter()
            .filter(|f| f.kind == kind && f.name == name)
            .collect::<Vec<_>>()
    };
    // Classifier-free guidance: the prompt and the negative prompt, one batch-1 call each.
    let contexts = input("unet", "encoder_hidden_states");
    assert_eq!(contexts.len(), 10);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (cond, uncond) = (mean(&contexts[0].values), mean(&contexts[1].values));
    assert_ne!(cond, uncond);
    let ts: Vec<f64> = input("unet", "timestep")
        .iter()
        .map(|f| f.values[0])
        .collect();
    assert_eq!(
        ts,
        vec![
            801.0, 801.0, 601.0, 601.0, 401.0, 401.0, 201.0, 201.0, 1.0, 1.0
        ]
    );
    let vae = input("vae", "latent_sample");
    let got = nhwc_to_nchw(&vae[0].values, [1, 8, 8, 4]);
    let want = reference_euler_cfg(&p, cond, uncond);
    close(
        &got,
        &want,
        1e-4 * want.iter().fold(1.0, |m, v| v.abs().max(m)),
    );

    // Karras sigmas fall between training steps: an int64 timestep input gets them rounded.
    let karras = Params {
        sampler: Some(crate::sampling::Sampler::DpmppSde),
        schedule: crate::sampling::SigmaSchedule::Karras,
        steps: 4,
        ..p.clone()
    };
    let before = api.fed().len();
    pipeline
        .generate(&karras, |_, _| ControlFlow::Continue(()))
        .unwrap();
    let fed = api.fed();
    let ts: Vec<f64> = fed[before..]
        .iter()
        .filter(|f| f.kind == "unet" && f.name == "timestep")
        .map(|f| f.values[0])
        .collect();
    // DPM++ SDE: two calls per step but the last, each guided (two UNet runs).
    assert_eq!(ts.len(), 2 * 7);
    assert!(ts.iter().all(|t| t.fract() == 0.0), "{ts:?}");

    // What the model kind cannot run is refused with the reason, before any NPU call.
    let before = api.calls().len();
    let err = pipeline
        .generate(
            &Params {
                sampler: Some(crate::sampling::Sampler::Lcm),
                steps: 4,
                ..p.clone()
            },
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("standard one"),
        "{err}"
    );
    let err = pipeline
        .generate(
            &Params {
                steps: 151,
                ..p.clone()
            },
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("1..=150"), "{err}");
    assert_eq!(api.calls().len(), before);

    // The LCM model refuses the standard samplers the same way.
    let lcm_dir = tempfile::tempdir().unwrap();
    write_model_folder(lcm_dir.path(), &[64]);
    let mut lcm = RknnPipeline::load(api.clone(), lcm_dir.path(), CoreMask::Core0).unwrap();
    assert_eq!(lcm.samplers(), vec![crate::sampling::Sampler::Lcm]);
    let err = lcm
        .generate(&p, |_, _| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.to_string().contains("LCM model"), "{err}");
}

mod workers;

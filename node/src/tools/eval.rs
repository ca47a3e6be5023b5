//! The tools that run a model: `unet-eval` (one UNet forward on given tensors), `bench-unet`
//! (UNet step timing) and `render` (whole jobs, one or a batch, to PNG files).

use crate::burn::lora::LoraSet;
use crate::burn::tensor_file::TensorFile;
use crate::burn::unet::{AddedCond, Unet, UnetConfig, guidance_embedding};
use crate::burn::weights::{Loader, NameMap, RandomWeights, upload};
use crate::error::{NodeError, Result};
use crate::render::gaussian;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use drover_shared::detect::inspect;
use drover_shared::family::ModelFamily;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

use super::{demo_unet_config, io, parse_config, write_f32};

pub(super) fn tensor_from<B: Backend, const D: usize>(
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
pub(super) fn device_and_dtype(device: &str) -> Result<(&str, DType)> {
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
    write_f32(o.output, vec![("out".to_string(), super::host(out)?)])
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
        timings.push((name, median(&mut per_step)));
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
    let median = median(&mut sorted);
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

/// What `drover-node render` renders with: the model folder, device, untimed renders, batch and
/// the PNG to write.
pub struct RenderRun<'a> {
    /// A diffusers folder.
    pub model: &'a Path,
    /// `cpu` or `cuda` (cuda builds), optionally `-f16` / `-bf16`.
    pub device: &'a str,
    /// Untimed renders before the timed one.
    pub warmup: usize,
    /// Text-to-image jobs rendered as one batch.
    pub batch: usize,
    /// The PNG written.
    pub out: &'a Path,
}

/// `drover-node render`: loads a diffusers folder on the device, renders one image (or `batch`
/// text-to-image jobs as one batch, seeds counting up) to `out` and answers one JSON line with
/// the load and render times and images per second.
pub fn render_cli(run: &RenderRun, args: RenderArgs) -> Result<String> {
    use crate::burn::pipeline::Precision;
    let (backend, dtype) = device_and_dtype(run.device)?;
    let precision = if dtype == DType::F32 {
        Precision::F32
    } else {
        Precision::half(dtype)
    };
    match backend {
        #[cfg(feature = "cuda")]
        "cuda" => render_on::<crate::burn::Gpu>(run, args, precision),
        _ => render_on::<crate::burn::Cpu>(run, args, precision),
    }
}

fn render_on<B: Backend>(
    run: &RenderRun,
    args: RenderArgs,
    precision: crate::burn::pipeline::Precision,
) -> Result<String> {
    use crate::burn::pipeline::{ModelSource, Pipeline};
    use drover_shared::sampler::SamplerName;
    let (model, batch, out) = (run.model, run.batch, run.out);
    let (sampler, schedule) = match args.sampler.as_deref() {
        None => (None, crate::sampling::SigmaSchedule::Automatic),
        Some(name) => {
            let n: SamplerName = name.parse().map_err(NodeError::InvalidJob)?;
            (Some(n.sampler), n.schedule)
        }
    };
    let started = Instant::now();
    let pipeline = Pipeline::<B>::load(
        ModelSource::Diffusers(model.to_path_buf()),
        &Default::default(),
        precision,
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
        model: String::new(),
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
    let go = |_: usize, _: usize| std::ops::ControlFlow::Continue(());
    for _ in 0..run.warmup {
        pipeline.generate(&params, go)?;
    }
    let started = Instant::now();
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
        backend: if run.device.starts_with("cuda") {
            "cuda"
        } else {
            "cpu"
        },
        model_id: model.display().to_string(),
        simulated: false,
    };
    let png = crate::render::encode_png(&image, &params, &origin, None, 1)?;
    let with_png_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::fs::write(out, png).map_err(|e| io(out, e))?;
    Ok(format!(
        "{}\n",
        json!({"model": model.display().to_string(), "sampler": plan.sampler().id(),
               "steps": params.steps, "unet_calls": plan.timesteps().len(), "size": args.size,
               "guidance": args.guidance, "load_ms": load_ms, "render_ms": render_ms,
               "render_and_png_ms": with_png_ms, "device": run.device, "warmup": run.warmup,
               "batch": batch, "images_per_s": batch as f64 * 1000.0 / render_ms.max(1e-9),
               "mode": params.source.as_ref().map_or("txt2img", |s| if s.mask.is_some() { "inpaint" } else { "img2img" }),
               "strength": params.source.as_ref().map(|s| s.strength),
               "out": out.display().to_string()})
    ))
}

/// `drover-node bench-lora`: LoRA switches in place against reloads, alternated in one run.
pub fn bench_lora_cli(model: &Path, loras: &[std::path::PathBuf], runs: usize) -> Result<String> {
    use crate::burn::Cpu;
    use crate::burn::pipeline::{LoraSpec, ModelSource, Pipeline, Precision};
    let specs: Vec<LoraSpec> = loras
        .iter()
        .map(|p| LoraSpec {
            name: p
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            path: p.clone(),
            strength: 0.8,
            lcm: false,
        })
        .collect();
    let source = ModelSource::Diffusers(model.to_path_buf());
    let device = Default::default();
    let mut in_place = Pipeline::<Cpu>::load(source.clone(), &device, Precision::F32, &[])?;
    let mut reloaded = Pipeline::<Cpu>::load(source, &device, Precision::F32, &[])?;
    // One untimed switch each (file cache, allocator), and the two must agree.
    let layers = in_place.set_loras(&specs)?;
    reloaded.reload_loras(&specs)?;
    let params = crate::render::Params {
        model: String::new(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 2,
        guidance: 7.5,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: crate::sampling::SigmaSchedule::Automatic,
        seed: 7,
        loras: Vec::new(),
        source: None,
    };
    let probe = |p: &Pipeline<Cpu>| -> Result<Vec<u8>> {
        Ok(
            p.generate(&params, |_, _| std::ops::ControlFlow::Continue(()))?
                .rgb,
        )
    };
    if probe(&in_place)? != probe(&reloaded)? {
        return Err(NodeError::Lora(
            "the switch in place and the reload disagree".into(),
        ));
    }
    in_place.set_loras(&[])?;
    reloaded.reload_loras(&[])?;
    let (mut place_ms, mut reload_ms) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        reloaded.reload_loras(&specs)?;
        reloaded.reload_loras(&[])?;
        reload_ms.push(t.elapsed().as_secs_f64() * 500.0);
        let t = Instant::now();
        in_place.set_loras(&specs)?;
        in_place.set_loras(&[])?;
        place_ms.push(t.elapsed().as_secs_f64() * 500.0);
    }
    let (place, reload) = (median(&mut place_ms), median(&mut reload_ms));
    let figures = json!({
        "model": model.display().to_string(),
        "loras": specs.len(),
        "layers_changed": layers,
        "switch_in_place_ms": place,
        "switch_by_reload_ms": reload,
        "in_place_over_reload": place / reload,
    });
    Ok(format!("{figures}\n"))
}

/// `drover-node bench-load`: `runs` loads of the model at `path` on the CPU in f32, each timed
/// from the detected files to a pipeline ready to render (what a node does for a job whose model
/// is not loaded); JSON with every load's milliseconds, the first's (cold when the caller dropped
/// the files from the page cache) and the median of the others (warm).
pub fn bench_load_cli(path: &Path, runs: usize) -> Result<String> {
    use crate::burn::Cpu;
    use crate::burn::pipeline::{Pipeline, Precision};
    let model = crate::factory::detect_model(path)?;
    let source = crate::burn::renderer::model_source(&model);
    let mut ms = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let pipeline =
            Pipeline::<Cpu>::load(source.clone(), &Default::default(), Precision::F32, &[])?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(pipeline);
    }
    let first = ms[0];
    let mut rest = ms[1..].to_vec();
    let figures = json!({
        "model": path.display().to_string(),
        "family": model.family.to_string(),
        "parameters": model.parameters,
        "bytes_f32": crate::catalog::copy_bytes(&model, Precision::F32),
        "load_ms": ms,
        "first_ms": first,
        "warm_median_ms": (!rest.is_empty()).then(|| median(&mut rest)),
    });
    Ok(format!("{figures}\n"))
}

/// The median of `v` (the upper one of an even count; 0 when empty), sorting it.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

//! The backend-neutral render interface: one job in, one image out, whatever renders it.
//!
//! A job's parameters are [`Params`] (the node's own types; the session converts the wire's
//! `JobSpec` into them). A backend implements [`Renderer`]: one job → one [`Image`], calling a
//! step callback after each denoising step that reports progress and says whether to go on.
//! [`Worker`] is the one actor every backend runs in: an actix actor on a `SyncArbiter` thread
//! (the factory closure runs on that thread, so backend handles — CUDA contexts, RKNN contexts —
//! never cross threads) that handles [`RunJob`] once for all of them: it enters the job's span,
//! refuses a job cancelled before it started, times the render, logs the image, runs the job's
//! upscale ([`PostJob`]) and encodes the PNG with its text chunks ([`encode_png`]).
//!
//! Also here, because every backend starts from the same numbers: the seeded noise
//! ([`gaussian`], [`step_noise_seed`]) and the conversion of a decoded image to RGB bytes
//! ([`rgb_from_chw`]). Submodules: `source` ([`Source`], a job's source image decoded and
//! fitted to its size on the worker's thread) and `encode` ([`encode_png`]).

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use tokio::sync::mpsc;

use drover_shared::image;
use drover_shared::job::UpscaleSpec;

use crate::error::{NodeError, Result};
use crate::sampling::{Sampler, SigmaSchedule};
use crate::upscaling::PostProcess;

mod batch;
mod encode;
mod source;

pub use batch::{BatchKey, Batcher, Group, RunBatch, batch_key};
pub use encode::encode_png;
pub use source::{Fitted, Source};

/// A LoRA a job asks for: its catalog name and strength.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    /// Catalog name (the file's stem under `LORA_ROOT`).
    pub name: String,
    /// Strength it is merged with.
    pub strength: f32,
}

/// What one image needs: a job's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (used by classifier-free guidance on UNets without a guidance embedding).
    pub negative_prompt: String,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Denoising steps (LCM: 1..=8; standard samplers: 1..=150).
    pub steps: usize,
    /// Guidance scale (LCM: `w = guidance − 1` feeds the guidance embedding).
    pub guidance: f32,
    /// Guidance rescale φ (0: off), for classifier-free guidance.
    pub guidance_rescale: f32,
    /// The sampler; `None`: the model's default (LCM on LCM models, DPM++ 2M on standard ones).
    pub sampler: Option<Sampler>,
    /// The sigma schedule (`Automatic`: the sampler's default).
    pub schedule: SigmaSchedule,
    /// Seed of the initial and per-step noise.
    pub seed: u64,
    /// LoRAs to merge, in order.
    pub loras: Vec<Lora>,
    /// img2img and inpainting: the source image (and mask) the job starts from.
    pub source: Option<Source>,
    /// The id of the catalogued model to render with; empty: the node's default model.
    pub model: String,
}

/// A rendered image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// Interleaved RGB bytes.
    pub rgb: Vec<u8>,
    /// Prompt tokens dropped because the prompt was longer than 75 tokens.
    pub truncated_tokens: usize,
}

/// Deterministic standard-normal noise from a seed (SplitMix64 + Box–Muller, computed on the
/// host so every backend starts from the same numbers).
pub fn gaussian(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in (0, 1].
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// The seed of the noise that re-noises the sample after LCM step `k` of a run seeded `seed`.
pub fn step_noise_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_add(1 + k as u64)
        .wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Interleaved RGB bytes from a decoded `[channels, height, width]` image in `[-1, 1]` (a
/// single-channel image is repeated on all three).
pub fn rgb_from_chw(values: &[f32], channels: usize, height: usize, width: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; height * width * 3];
    for y in 0..height {
        for x in 0..width {
            for k in 0..3 {
                let v = values[(k.min(channels - 1) * height + y) * width + x];
                rgb[(y * width + x) * 3 + k] =
                    ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    rgb
}

/// One finished denoising step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Steps done.
    pub step: u32,
    /// Steps in total.
    pub total: u32,
}

/// Cooperative cancellation flag shared by the session and a running job.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// Asks the job to stop at its next step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a worker reports finished steps: a function called on the worker's thread between
/// steps (the session's puts the report straight into its outbox, with no task or thread in
/// between), so it must not block.
#[derive(Clone)]
pub struct ProgressSink(Arc<dyn Fn(Progress) + Send + Sync>);

impl ProgressSink {
    /// A sink that hands every finished step to `report`.
    pub fn new(report: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        Self(Arc::new(report))
    }

    /// Reports a finished step.
    pub fn send(&self, p: Progress) {
        (self.0)(p);
    }
}

impl fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// Into a channel of [`Progress`] values (tools and tests); nothing happens once nobody listens.
impl From<mpsc::UnboundedSender<Progress>> for ProgressSink {
    fn from(tx: mpsc::UnboundedSender<Progress>) -> Self {
        Self::new(move |p| {
            let _ = tx.send(p);
        })
    }
}

/// A rendered, encoded image.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// PNG bytes.
    pub png: Vec<u8>,
    /// Time spent rendering (not upscaling: the coordinator derives the node's diffusion speed
    /// from it).
    pub elapsed: Duration,
    /// Whether the job's upscale ran (false without one, or when this node lacks the
    /// upscaler: the coordinator then has another node upscale the image).
    pub upscaled: bool,
    /// Jobs in the batch it was rendered in (1: alone).
    pub batch_size: u32,
}

/// A backend: renders one job into one image on the thread it was created on.
pub trait Renderer: Unpin + 'static {
    /// The backend's name as `BACKEND` spells it (`cpu`, `cuda`, `rknn`, `sim`): in the logs and
    /// in the PNG's `Software` chunk.
    fn backend(&self) -> &'static str;

    /// Where on the machine it renders, when the backend has more than one place (an NPU core);
    /// logged with each image.
    fn device(&self) -> Option<&'static str> {
        None
    }

    /// Whether its images are simulated (no model runs): their PNG says so and is compressed for
    /// speed.
    fn simulated(&self) -> bool {
        false
    }

    /// Renders one job. `step(done, total)` is called after each step; its `Break` stops the
    /// render with [`NodeError::Cancelled`]. Parameters this backend cannot serve are refused with
    /// [`NodeError::InvalidJob`] (permanent).
    fn render(
        &mut self,
        params: &Params,
        step: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Image>;

    /// Renders jobs of one [`BatchKey`] together, their images in order; `step` is the batch's
    /// (its `Break` stops them all). A job `live(i)` no longer wants leaves the batch at the next
    /// step and gets `None`, the others going on undisturbed. By default one after the other (a
    /// backend that batches overrides it).
    fn render_batch(
        &mut self,
        jobs: &[Params],
        mut step: impl FnMut(usize, usize) -> ControlFlow<()>,
        live: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Image>>> {
        let mut images = Vec::with_capacity(jobs.len());
        for (i, params) in jobs.iter().enumerate() {
            if !live(i) {
                images.push(None);
                continue;
            }
            let image = self.render(params, |k, n| {
                if live(i) {
                    step(k, n)
                } else {
                    ControlFlow::Break(())
                }
            });
            images.push(match image {
                Err(NodeError::Cancelled) if !live(i) => None,
                image => Some(image?),
            });
        }
        Ok(images)
    }
}

/// Render one job.
#[derive(Message)]
#[rtype(result = "Result<Rendered>")]
pub struct RunJob {
    /// What to render.
    pub params: Params,
    /// Where to report finished steps.
    pub progress: ProgressSink,
    /// Checked between steps.
    pub cancel: CancelFlag,
    /// The job's span (job id, lease, trace id): the worker thread logs inside it.
    pub span: tracing::Span,
    /// Super-resolution after rendering, and the upscalers that run it.
    pub upscale: Option<PostJob>,
}

/// A job's upscale and the node's upscalers.
#[derive(Clone)]
pub struct PostJob {
    /// What the job asks for.
    pub spec: UpscaleSpec,
    /// The node's upscalers.
    pub with: Arc<dyn PostProcess>,
    /// The job is the upscale alone: its source image, no rendering.
    pub only: bool,
}

impl RunJob {
    /// Reports a finished step and says whether to go on (`Break` once cancelled): the step
    /// callback every renderer gets.
    fn step_done(&self, step: usize, total: usize) -> ControlFlow<()> {
        self.progress.send(Progress {
            step: step as u32,
            total: total as u32,
        });
        if self.cancel.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Where a worker's images come from, as their PNG text chunks say.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// The backend's name.
    pub backend: &'static str,
    /// Stable id of the model.
    pub model_id: String,
    /// No model ran (the sim backend).
    pub simulated: bool,
}

/// The worker actor of every backend: one [`Renderer`], on its own `SyncArbiter` thread.
pub struct Worker<R> {
    renderer: R,
    origin: Origin,
}

impl<R: Renderer> Worker<R> {
    /// A worker around `renderer`, serving the model `model_id`.
    pub fn new(renderer: R, model_id: impl Into<String>) -> Self {
        let origin = Origin {
            backend: renderer.backend(),
            model_id: model_id.into(),
            simulated: renderer.simulated(),
        };
        Self { renderer, origin }
    }

    /// Starts `workers` workers in a `SyncArbiter`. `make(i)` creates worker i's renderer on
    /// worker i's own thread (i counts from 0), so what it holds never crosses threads.
    pub fn start(
        workers: usize,
        model_id: &str,
        make: impl Fn(usize) -> R + Send + Sync + 'static,
    ) -> Addr<Self> {
        let next = AtomicUsize::new(0);
        let model_id = model_id.to_string();
        SyncArbiter::start(workers, move || {
            Self::new(make(next.fetch_add(1, Ordering::SeqCst)), model_id.clone())
        })
    }
}

impl<R: Renderer> Actor for Worker<R> {
    type Context = SyncContext<Self>;
}

impl<R: Renderer> Handler<RunJob> for Worker<R> {
    type Result = Result<Rendered>;

    fn handle(&mut self, job: RunJob, _: &mut SyncContext<Self>) -> Self::Result {
        let _span = job.span.clone().entered();
        if job.cancel.is_cancelled() {
            return Err(NodeError::Cancelled);
        }
        let only = job.upscale.as_ref().is_some_and(|p| p.only);
        let (image, elapsed) = if only {
            (source_image(&job.params)?, Duration::ZERO)
        } else {
            self.render(&job)?
        };
        self.deliver(&job, image, elapsed, 1)
    }
}

impl<R: Renderer> Worker<R> {
    /// A rendered job's upscale (when it has one and this node holds the upscaler) and PNG.
    fn deliver(
        &mut self,
        job: &RunJob,
        image: Image,
        elapsed: Duration,
        batch_size: u32,
    ) -> Result<Rendered> {
        let only = job.upscale.as_ref().is_some_and(|p| p.only);
        let (image, upscaled) = match &job.upscale {
            None => (image, None),
            Some(post) if !only && !post.with.holds(post.spec.model.as_deref()) => {
                tracing::info!(
                    upscaler = post.spec.model.as_deref().unwrap_or("any"),
                    "upscaler not on this node: the image goes back for another node to upscale"
                );
                (image, None)
            }
            Some(post) => {
                let started = Instant::now();
                // A stand-alone upscale reports its tiles as its steps; after a render the
                // steps are the render's, and the tiles only check for a cancel.
                let mut go_on = |done: usize, all: usize| {
                    if only {
                        job.step_done(done, all)
                    } else if job.cancel.is_cancelled() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                };
                let (image, upscaled) = post.with.upscale(image, &post.spec, &mut go_on)?;
                tracing::info!(
                    upscaler = %upscaled.upscaler,
                    passes = upscaled.passes,
                    width = image.width,
                    height = image.height,
                    ms = started.elapsed().as_millis() as u64,
                    "image upscaled"
                );
                (image, Some(upscaled))
            }
        };
        let png = match &upscaled {
            Some(done) if only => {
                let carried = job
                    .params
                    .source
                    .as_ref()
                    .map(|s| crate::upscaling::text_chunks(&s.image))
                    .unwrap_or_default();
                crate::upscaling::png_of(&image, done, self.origin.backend, &carried)?
            }
            _ => encode_png(
                &image,
                &job.params,
                &self.origin,
                upscaled.as_ref(),
                batch_size,
            )?,
        };
        Ok(Rendered {
            png,
            elapsed,
            upscaled: upscaled.is_some(),
            batch_size,
        })
    }

    /// Renders the job's image, logging it; the time it took.
    fn render(&mut self, job: &RunJob) -> Result<(Image, Duration)> {
        let started = Instant::now();
        let image = self
            .renderer
            .render(&job.params, |step, total| job.step_done(step, total))?;
        let elapsed = started.elapsed();
        if image.truncated_tokens > 0 {
            tracing::warn!(
                dropped = image.truncated_tokens,
                "prompt longer than 75 tokens truncated, as diffusers does"
            );
        }
        tracing::info!(
            backend = self.origin.backend,
            device = self.renderer.device(),
            width = image.width,
            height = image.height,
            steps = job.params.steps,
            ms = elapsed.as_millis() as u64,
            "image rendered"
        );
        Ok((image, elapsed))
    }
}

/// The source image of a stand-alone upscale, decoded at its own size.
fn source_image(params: &Params) -> Result<Image> {
    let source = params
        .source
        .as_ref()
        .ok_or_else(|| NodeError::InvalidJob("an upscale job without an image".into()))?;
    let rgb =
        image::decode(&source.image).map_err(|e| NodeError::InvalidJob(format!("image: {e}")))?;
    Ok(Image {
        width: rgb.width,
        height: rgb.height,
        rgb: rgb.pixels,
        truncated_tokens: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A renderer of flat grey images that records what it was asked and can cancel the job
    /// it renders after a given step.
    struct Flat {
        calls: Arc<Mutex<Vec<Params>>>,
        cancel_after: Option<(usize, CancelFlag)>,
    }

    impl Renderer for Flat {
        fn backend(&self) -> &'static str {
            "flat"
        }

        fn render(
            &mut self,
            params: &Params,
            mut step: impl FnMut(usize, usize) -> ControlFlow<()>,
        ) -> Result<Image> {
            self.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(params.clone());
            for k in 1..=params.steps {
                if let Some((at, flag)) = &self.cancel_after
                    && *at == k
                {
                    flag.cancel();
                }
                if step(k, params.steps).is_break() {
                    return Err(NodeError::Cancelled);
                }
            }
            Ok(Image {
                width: params.width,
                height: params.height,
                rgb: vec![128; params.width * params.height * 3],
                truncated_tokens: 3,
            })
        }
    }

    fn params() -> Params {
        Params {
            prompt: "a red fox".into(),
            model: String::new(),
            negative_prompt: "blur".into(),
            width: 16,
            height: 8,
            steps: 3,
            guidance: 1.5,
            guidance_rescale: 0.0,
            sampler: None,
            schedule: crate::sampling::SigmaSchedule::Automatic,
            seed: 7,
            loras: vec![Lora {
                name: "ink".into(),
                strength: 0.5,
            }],
            source: None,
        }
    }

    /// Runs `params` on one worker whose renderer cancels after step `cancel_after` (if any),
    /// with `cancel` set beforehand when asked: the outcome, the steps reported and the jobs the
    /// renderer saw.
    fn run(
        cancel_before: bool,
        cancel_after: Option<usize>,
    ) -> (Result<Rendered>, Vec<Progress>, Vec<Params>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancelFlag::default();
        if cancel_before {
            cancel.cancel();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let outcome = actix_rt::System::new().block_on({
            let (calls, cancel) = (calls.clone(), cancel.clone());
            async move {
                let flag = cancel.clone();
                let addr = Worker::start(1, "model-1", move |_| Flat {
                    calls: calls.clone(),
                    cancel_after: cancel_after.map(|k| (k, flag.clone())),
                });
                addr.send(RunJob {
                    params: params(),
                    progress: tx.into(),
                    cancel,
                    span: tracing::Span::none(),
                    upscale: None,
                })
                .await
                .unwrap_or_else(|e| Err(NodeError::Render(e.to_string())))
            }
        });
        let mut steps = Vec::new();
        while let Ok(p) = rx.try_recv() {
            steps.push(p);
        }
        let seen = calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (outcome, steps, seen)
    }

    fn text_chunks(png: &[u8]) -> Vec<(String, String)> {
        let reader = png::Decoder::new(std::io::Cursor::new(png.to_vec()))
            .read_info()
            .unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (16, 8));
        info.utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap()))
            .collect()
    }

    #[test]
    fn the_worker_reports_each_step_and_encodes_the_png_with_its_text() {
        let (outcome, steps, seen) = run(false, None);
        let rendered = outcome.unwrap();
        assert_eq!(seen, vec![params()]);
        let want: Vec<Progress> = (1..=3).map(|step| Progress { step, total: 3 }).collect();
        assert_eq!(steps, want);
        let text = text_chunks(&rendered.png);
        let get = |k: &str| {
            text.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("Software"),
            Some(format!("drover {} (flat backend)", drover_shared::VERSION).as_str())
        );
        assert_eq!(get("prompt"), Some("a red fox"));
        assert_eq!(get("negative_prompt"), Some("blur"));
        assert_eq!(
            (get("seed"), get("steps"), get("guidance")),
            (Some("7"), Some("3"), Some("1.5"))
        );
        assert_eq!(
            (get("model"), get("size"), get("loras")),
            (Some("model-1"), Some("16x8"), Some("ink:0.5"))
        );
        assert_eq!(get("prompt_truncated_tokens"), Some("3"));
    }

    #[test]
    fn a_job_cancelled_before_it_starts_never_reaches_the_renderer() {
        let (outcome, steps, seen) = run(true, None);
        assert!(matches!(outcome, Err(NodeError::Cancelled)));
        assert!(steps.is_empty() && seen.is_empty());
    }

    #[test]
    fn a_cancel_stops_the_render_at_the_next_step() {
        let (outcome, steps, seen) = run(false, Some(2));
        assert!(matches!(outcome, Err(NodeError::Cancelled)));
        assert_eq!(seen.len(), 1);
        assert_eq!(
            steps.last(),
            Some(&Progress { step: 2, total: 3 }),
            "the step that saw the cancel is still reported, none after it"
        );
    }

    #[test]
    fn seeded_noise_is_the_same_for_a_seed_and_standard_normal() {
        let a = gaussian(42, 10_001);
        assert_eq!(a, gaussian(42, 10_001));
        assert_ne!(a, gaussian(43, 10_001));
        assert_eq!(a.len(), 10_001);
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        assert_ne!(step_noise_seed(42, 0), step_noise_seed(42, 1));
    }
}

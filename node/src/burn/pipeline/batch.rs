//! Rendering compatible jobs together ([`Pipeline::generate_batch`]): dynamic batching's model
//! side.

use std::ops::ControlFlow;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{Tensor, TensorData};

use super::Pipeline;
use crate::burn::denoise::{Prompt, TextConditioning, rows_index, sample_unet_rows};
use crate::error::{NodeError, Result};
use crate::render::{Image, Params, gaussian, rgb_from_chw, step_noise_seed};

impl<B: Backend> Pipeline<B> {
    /// Renders compatible text-to-image jobs together ([`crate::render::batch_key`]: same size, steps,
    /// sampler, schedule and guidance; prompts, negative prompts and seeds may differ): one
    /// batched text-encoder call per prompt kind, one batched UNet call per step (CFG: twice the
    /// batch), one batched VAE decode. Each job keeps its own seed's noise, so its image is the
    /// one it renders alone (to rounding: see the node's batch tests). `progress(step, total)`
    /// is the batch's; its `Break` stops every job.
    pub fn generate_batch(
        &self,
        jobs: &[Params],
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Vec<Image>> {
        self.generate_batch_live(jobs, progress, |_| true)?
            .into_iter()
            .map(|image| image.ok_or(NodeError::Cancelled))
            .collect()
    }

    /// [`Pipeline::generate_batch`] where jobs may leave: a job `live(i)` no longer wants leaves
    /// at the next UNet call (the calls after run on the jobs left, [`sample_unet_rows`]) and
    /// gets no image (`None`), nor is it decoded; the others render as they would have.
    pub fn generate_batch_live(
        &self,
        jobs: &[Params],
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
        live: impl Fn(usize) -> bool,
    ) -> Result<Vec<Option<Image>>> {
        let Some(first) = jobs.first() else {
            return Ok(Vec::new());
        };
        if jobs.len() == 1 {
            let image = self.generate(first, |k, n| {
                if live(0) {
                    progress(k, n)
                } else {
                    ControlFlow::Break(())
                }
            });
            return match image {
                Err(NodeError::Cancelled) if !live(0) => Ok(vec![None]),
                image => Ok(vec![Some(image?)]),
            };
        }
        let key = crate::render::batch_key(first);
        if let Some(other) = jobs
            .iter()
            .find(|p| key.is_none() || crate::render::batch_key(p) != key)
        {
            return Err(NodeError::InvalidJob(format!(
                "jobs rendered together must share size, steps, sampler, schedule and guidance \
                 and start from no image ({}x{} {} steps vs {}x{} {} steps)",
                first.width, first.height, first.steps, other.width, other.height, other.steps
            )));
        }
        let shape = self.latent_shape(first)?;
        let noise_of = |seeds: &mut dyn Iterator<Item = u64>| {
            let parts: Vec<Tensor<B, 4>> = seeds
                .map(|seed| {
                    Tensor::<B, 4>::from_data(
                        TensorData::new(gaussian(seed, shape.iter().product()), shape),
                        &self.device,
                    )
                })
                .collect();
            Tensor::cat(parts, 0)
        };
        let plan = self.plan(first.sampler, first.schedule, first.steps)?;
        let mut prompts = Vec::with_capacity(jobs.len());
        let mut negatives = Vec::new();
        let mut truncated = Vec::with_capacity(jobs.len());
        let cfg = self.unet.config().time_cond_proj_dim.is_none() && first.guidance > 1.0;
        for job in jobs {
            let (prompt, tokens) = self.encode_prompt(&job.prompt)?;
            prompts.push(prompt);
            truncated.push(tokens.truncated);
            if cfg {
                negatives.push(self.encode_prompt(&job.negative_prompt)?.0);
            }
        }
        let joined = |ps: Vec<Prompt<B>>| {
            let pooled: Option<Vec<Tensor<B, 2>>> = ps.iter().map(|p| p.pooled.clone()).collect();
            Prompt {
                context: Tensor::cat(ps.into_iter().map(|p| p.context).collect(), 0),
                pooled: pooled.map(|p| Tensor::cat(p, 0)),
            }
        };
        let (hh, ww) = (first.height as f32, first.width as f32);
        let text = TextConditioning {
            prompt: joined(prompts),
            negative: cfg.then(|| joined(negatives)),
            time_ids: [hh, ww, 0.0, 0.0, hh, ww],
        };
        let init = noise_of(&mut jobs.iter().map(|j| j.seed));
        let x = plan.initial(init, None);
        let rows = || (0..jobs.len()).filter(|&i| live(i)).collect::<Vec<usize>>();
        let denoised = sample_unet_rows(
            &self.unet,
            &text,
            x,
            &plan,
            first.guidance,
            first.guidance_rescale,
            |k| noise_of(&mut jobs.iter().map(|j| step_noise_seed(j.seed, k))),
            &mut progress,
            rows,
        )?;
        // Only the jobs still wanted are decoded.
        let kept = rows();
        let mut out: Vec<Option<Image>> = jobs.iter().map(|_| None).collect();
        if kept.is_empty() {
            return Ok(out);
        }
        let denoised = if kept.len() < jobs.len() {
            denoised.select(0, rows_index::<B>(&kept, &self.device))
        } else {
            denoised
        };
        let images = self.decode(denoised);
        let [_, ch, ih, iw] = images.dims();
        let values = crate::burn::nn::in_f32(images)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| NodeError::Render(format!("reading the images back: {e:?}")))?;
        let per = ch * ih * iw;
        for (k, &i) in kept.iter().enumerate() {
            out[i] = Some(Image {
                width: iw,
                height: ih,
                rgb: rgb_from_chw(&values[k * per..(k + 1) * per], ch, ih, iw),
                truncated_tokens: truncated[i],
            });
        }
        Ok(out)
    }
}

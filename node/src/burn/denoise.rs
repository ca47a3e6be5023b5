//! Sampling the UNet under its conditioning: the encoded prompts ([`Prompt`],
//! [`TextConditioning`]) and [`sample_unet`], which hands a [`Plan`] the guided model — the LCM
//! guidance embedding, or classifier-free guidance as one batched UNet call plus guidance
//! rescale.

use std::ops::ControlFlow;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{Int, Tensor, TensorData};

use super::unet::{AddedCond, Unet, guidance_embedding};
use crate::error::{NodeError, Result};
use crate::sampling::guidance::{guided, rescaled};
use crate::sampling::{Keep, Plan, Sampler};

/// One encoded prompt.
pub struct Prompt<B: Backend> {
    /// Cross-attention context `[1, 77, cross_attention_dim]` (SDXL: both encoders' penultimate
    /// layers side by side).
    pub context: Tensor<B, 3>,
    /// SDXL: the second encoder's pooled, projected embedding `[1, width]`.
    pub pooled: Option<Tensor<B, 2>>,
}

/// What the UNet is conditioned on: the prompt, the negative prompt when classifier-free guidance
/// runs, and SDXL's size/crop ids.
pub struct TextConditioning<B: Backend> {
    /// The prompt.
    pub prompt: Prompt<B>,
    /// The negative prompt (UNets without a guidance embedding, guidance > 1).
    pub negative: Option<Prompt<B>>,
    /// SDXL time ids: original height/width, crop top/left, target height/width.
    pub time_ids: [f32; 6],
}

/// Runs `plan` from unit noise `init` on `unet` and answers the final latent. Guidance: LCM models
/// take it as an embedding (one UNet call per step); standard models with a negative prompt
/// and `guidance > 1` run classifier-free guidance, unconditional and conditional in one
/// batched UNet call, then `rescale` ([`rescaled`]). `noise(k)` is step `k`'s fresh noise;
/// `progress(k, total)` after each step may stop the run with `Break`.
#[allow(clippy::too_many_arguments)]
pub fn sample_unet<B: Backend>(
    unet: &Unet<B>,
    text: &TextConditioning<B>,
    init: Tensor<B, 4>,
    plan: &Plan,
    guidance: f32,
    rescale: f32,
    noise: impl FnMut(usize) -> Tensor<B, 4>,
    progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Tensor<B, 4>> {
    let x = plan.initial(init, None);
    sample_unet_from(
        unet, text, x, None, None, plan, guidance, rescale, noise, progress,
    )
}

/// [`sample_unet`] from a sample `x` already at the plan's first level ([`Plan::initial`]:
/// image-to-image starts from the noised image), keeping `keep`'s unmasked part (inpainting
/// with a 4-channel UNet), and with `extra` channels after the scaled sample in every UNet
/// input (a 9-channel inpainting UNet's mask and masked-image latents).
#[allow(clippy::too_many_arguments)]
pub fn sample_unet_from<B: Backend>(
    unet: &Unet<B>,
    text: &TextConditioning<B>,
    x: Tensor<B, 4>,
    keep: Option<&Keep<B>>,
    extra: Option<&Tensor<B, 4>>,
    plan: &Plan,
    guidance: f32,
    rescale: f32,
    noise: impl FnMut(usize) -> Tensor<B, 4>,
    progress: impl FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Tensor<B, 4>> {
    let model = Guided::new(unet, text, extra, plan, guidance, rescale, x.dims()[0]);
    plan.run_from(x, |x, t| model.call(x, t), noise, progress, keep)
}

/// [`sample_unet`] for a batch whose jobs may leave while it runs: before each UNet call
/// `rows()` says which rows (batch items, ascending) are still wanted, and the UNet runs on
/// those only; a row that left gets a zero model output from then on (its sample stays finite
/// and is not used). Every sampler treats rows independently, so the rows that stay are
/// sampled exactly as if the others were there.
#[allow(clippy::too_many_arguments)]
pub fn sample_unet_rows<B: Backend>(
    unet: &Unet<B>,
    text: &TextConditioning<B>,
    x: Tensor<B, 4>,
    plan: &Plan,
    guidance: f32,
    rescale: f32,
    noise: impl FnMut(usize) -> Tensor<B, 4>,
    progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    rows: impl Fn() -> Vec<usize>,
) -> Result<Tensor<B, 4>> {
    let n = x.dims()[0];
    let device = x.device();
    let model = Guided::new(unet, text, None, plan, guidance, rescale, n);
    let call = |x: Tensor<B, 4>, t: f32| {
        let live = rows();
        if live.len() >= n {
            return model.call(x, t);
        }
        if live.is_empty() {
            return Ok(x.zeros_like());
        }
        let index = rows_index::<B>(&live, &device);
        let sub = TextConditioning {
            prompt: text.prompt.select(&index),
            negative: text.negative.as_ref().map(|p| p.select(&index)),
            time_ids: text.time_ids,
        };
        let part = Guided::new(unet, &sub, None, plan, guidance, rescale, live.len())
            .call(x.clone().select(0, index), t)?;
        // Back to the batch's rows: the live rows' outputs in place, zeros elsewhere.
        let [_, c, h, w] = x.dims();
        let mut pieces = Vec::with_capacity(n);
        let mut next = 0;
        for row in 0..n {
            if live.get(next) == Some(&row) {
                pieces.push(part.clone().slice([next..next + 1, 0..c, 0..h, 0..w]));
                next += 1;
            } else {
                pieces.push(Tensor::zeros([1, c, h, w], &device));
            }
        }
        Ok(Tensor::cat(pieces, 0))
    };
    plan.run_from(x, call, noise, progress, None)
}

/// The rows `live` as an index tensor for `select`.
pub fn rows_index<B: Backend>(live: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let rows: Vec<i64> = live.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(rows, [live.len()]), device)
}

impl<B: Backend> Prompt<B> {
    /// The rows `index` of a batch's encoded prompts.
    fn select(&self, index: &Tensor<B, 1, Int>) -> Self {
        Self {
            context: self.context.clone().select(0, index.clone()),
            pooled: self.pooled.clone().map(|p| p.select(0, index.clone())),
        }
    }
}

/// The guided model a plan samples: the UNet under `text` for a batch of `batch` samples, with
/// the LCM guidance embedding or classifier-free guidance (plus rescale).
struct Guided<'a, B: Backend> {
    unet: &'a Unet<B>,
    text: &'a TextConditioning<B>,
    extra: Option<&'a Tensor<B, 4>>,
    guidance: f32,
    rescale: f32,
    /// The guidance embedding, one per batch item (guidance-distilled UNets under LCM).
    cond: Option<Tensor<B, 2>>,
    single: Option<AddedCond<B>>,
    /// Classifier-free guidance: [unconditional, conditional] contexts (and SDXL's added
    /// conditions) as one batch of two.
    pair: Option<(Tensor<B, 3>, Option<AddedCond<B>>)>,
}

impl<'a, B: Backend> Guided<'a, B> {
    fn new(
        unet: &'a Unet<B>,
        text: &'a TextConditioning<B>,
        extra: Option<&'a Tensor<B, 4>>,
        plan: &Plan,
        guidance: f32,
        rescale: f32,
        batch: usize,
    ) -> Self {
        let device = text.prompt.context.device();
        // The guidance embedding of guidance-distilled UNets feeds LCM sampling only; any other
        // sampler guides by CFG (as diffusers, which skips the projection without one). One per
        // batch item: a batch's jobs share their guidance.
        let cond = unet
            .config()
            .time_cond_proj_dim
            .filter(|_| plan.sampler() == Sampler::Lcm)
            .map(|d| guidance_embedding::<B>(guidance - 1.0, d, &device).repeat_dim(0, batch));
        let added = |p: &Prompt<B>| {
            p.pooled.clone().map(|text_embeds| AddedCond {
                text_embeds,
                time_ids: text.time_ids,
            })
        };
        let single = added(&text.prompt);
        let pair = match (&text.negative, &cond) {
            (Some(neg), None) if guidance > 1.0 => {
                let context =
                    Tensor::cat(vec![neg.context.clone(), text.prompt.context.clone()], 0);
                let added = match (&neg.pooled, &text.prompt.pooled) {
                    (Some(u), Some(c)) => Some(AddedCond {
                        text_embeds: Tensor::cat(vec![u.clone(), c.clone()], 0),
                        time_ids: text.time_ids,
                    }),
                    _ => None,
                };
                Some((context, added))
            }
            _ => None,
        };
        Self {
            unet,
            text,
            extra,
            guidance,
            rescale,
            cond,
            single,
            pair,
        }
    }

    /// The extra input channels, once per batch item.
    fn with_extra(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self.extra {
            Some(e) => {
                let n = x.dims()[0];
                Tensor::cat(vec![x, Tensor::cat(vec![e.clone(); n], 0)], 1)
            }
            None => x,
        }
    }

    /// The guided model output for sample `x` at timestep `t`.
    fn call(&self, x: Tensor<B, 4>, t: f32) -> Result<Tensor<B, 4>> {
        match &self.pair {
            Some((context, added)) => {
                let out = self.unet.forward(
                    self.with_extra(Tensor::cat(vec![x.clone(), x], 0)),
                    t,
                    context,
                    None,
                    added.as_ref(),
                )?;
                let [un, c] = out.chunk(2, 0).try_into().map_err(|_| {
                    NodeError::Render("the UNet answered the wrong batch size".into())
                })?;
                Ok(rescaled(
                    guided(un, c.clone(), self.guidance),
                    &c,
                    self.rescale,
                ))
            }
            None => self.unet.forward(
                self.with_extra(x),
                t,
                &self.text.prompt.context,
                self.cond.as_ref(),
                self.single.as_ref(),
            ),
        }
    }
}

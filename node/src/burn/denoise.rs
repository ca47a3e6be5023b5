//! Sampling the UNet under its conditioning: the encoded prompts ([`Prompt`],
//! [`TextConditioning`]) and [`sample_unet`], which hands a [`Plan`] the guided model — the LCM
//! guidance embedding, or classifier-free guidance as one batched UNet call plus guidance
//! rescale.

use std::ops::ControlFlow;

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

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
    let device = x.device();
    let batch = x.dims()[0];
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
    // Classifier-free guidance: [unconditional, conditional] as one batch of two.
    let pair = match (&text.negative, &cond) {
        (Some(neg), None) if guidance > 1.0 => {
            let context = Tensor::cat(vec![neg.context.clone(), text.prompt.context.clone()], 0);
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
    // The extra input channels, once per batch item.
    let with_extra = |x: Tensor<B, 4>| match extra {
        Some(e) => {
            let n = x.dims()[0];
            Tensor::cat(vec![x, Tensor::cat(vec![e.clone(); n], 0)], 1)
        }
        None => x,
    };
    let model = |x: Tensor<B, 4>, t: f32| match &pair {
        Some((context, added)) => {
            let out = unet.forward(
                with_extra(Tensor::cat(vec![x.clone(), x], 0)),
                t,
                context,
                None,
                added.as_ref(),
            )?;
            let [un, c] = out
                .chunk(2, 0)
                .try_into()
                .map_err(|_| NodeError::Render("the UNet answered the wrong batch size".into()))?;
            Ok(rescaled(guided(un, c.clone(), guidance), &c, rescale))
        }
        None => unet.forward(
            with_extra(x),
            t,
            &text.prompt.context,
            cond.as_ref(),
            single.as_ref(),
        ),
    };
    plan.run_from(x, model, noise, progress, keep)
}

//! The PNG a worker answers with: the image and text chunks saying what made it.

use drover_shared::sampler::SigmaSchedule;

use super::{Image, Origin, Params};
use crate::error::{NodeError, Result};
use crate::upscaling::Upscaled;

/// PNG-encodes an image with text chunks naming the software and backend, prompt, seed, steps,
/// guidance, model and size (and the negative prompt, LoRAs and truncated prompt tokens when
/// there are any; the upscaler, its passes and the final scale for upscaled images). A
/// simulated image says so in `Software` and is compressed fast (its mosaic compresses well
/// either way; load tests encode thousands a second).
pub fn encode_png(
    image: &Image,
    params: &Params,
    origin: &Origin,
    upscaled: Option<&Upscaled>,
    batch_size: u32,
) -> Result<Vec<u8>> {
    let render = |e: png::EncodingError| NodeError::Render(e.to_string());
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut software = format!(
        "drover {} ({} backend)",
        drover_shared::VERSION,
        origin.backend
    );
    if origin.simulated {
        encoder.set_compression(png::Compression::Fast);
        software.push_str(": simulated image, no diffusion model was run");
    }
    let mut text = vec![
        ("Software", software),
        ("prompt", params.prompt.clone()),
        ("seed", params.seed.to_string()),
        ("steps", params.steps.to_string()),
        ("guidance", params.guidance.to_string()),
        (
            "model",
            if params.model.is_empty() {
                origin.model_id.clone()
            } else {
                params.model.clone()
            },
        ),
        ("size", format!("{}x{}", image.width, image.height)),
    ];
    if let Some(sampler) = params.sampler {
        text.push(("sampler", sampler.id().to_string()));
    }
    if params.schedule != SigmaSchedule::Automatic {
        text.push(("scheduler", params.schedule.id().to_string()));
    }
    if params.guidance_rescale > 0.0 {
        text.push(("guidance_rescale", params.guidance_rescale.to_string()));
    }
    if !params.negative_prompt.is_empty() {
        text.push(("negative_prompt", params.negative_prompt.clone()));
    }
    if let Some(source) = &params.source {
        let mode = if source.mask.is_some() {
            "inpaint"
        } else {
            "img2img"
        };
        text.push(("mode", mode.to_string()));
        text.push(("strength", source.strength.to_string()));
    }
    if !params.loras.is_empty() {
        let list: Vec<String> = params
            .loras
            .iter()
            .map(|l| format!("{}:{}", l.name, l.strength))
            .collect();
        text.push(("loras", list.join(",")));
    }
    if batch_size > 1 {
        text.push(("batch_size", batch_size.to_string()));
    }
    if let Some(u) = upscaled {
        text.push(("upscaler", u.upscaler.clone()));
        text.push(("upscale_passes", u.passes.to_string()));
        text.push(("upscale", u.factor.to_string()));
        text.push((
            "generated_size",
            format!("{}x{}", params.width, params.height),
        ));
    }
    if image.truncated_tokens > 0 {
        text.push((
            "prompt_truncated_tokens",
            image.truncated_tokens.to_string(),
        ));
    }
    for (key, value) in text {
        encoder
            .add_itxt_chunk(key.to_string(), value)
            .map_err(render)?;
    }
    let mut writer = encoder.write_header().map_err(render)?;
    writer.write_image_data(&image.rgb).map_err(render)?;
    writer.finish().map_err(render)?;
    Ok(out)
}

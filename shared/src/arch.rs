//! The tensor layouts of the Stable Diffusion architectures, written from their published configs:
//! every UNet, text-encoder and VAE tensor with its shape, in diffusers names and in the original
//! (LDM single-file) names, plus the LoRA key sets that kohya and PEFT tools write for them.
//!
//! Detection tests build real-format headers from these; the weight loader maps names with them.

use crate::family::ModelFamily;

/// A tensor name and shape.
pub type Tensor = (String, Vec<u64>);

/// The shape-relevant part of a diffusers `UNet2DConditionModel` config.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetConfig {
    /// Output channels of each resolution level.
    pub block_out_channels: Vec<u64>,
    /// Whether each down level has cross-attention transformers (mirrored for the up levels).
    pub cross_attention: Vec<bool>,
    /// Transformer blocks per attention at each level.
    pub transformer_layers: Vec<u64>,
    /// Transformer blocks in the middle attention.
    pub mid_transformer_layers: u64,
    /// Resnets per down level (the up levels have one more).
    pub layers_per_block: u64,
    /// Width of the text conditioning.
    pub cross_attention_dim: u64,
    /// Linear (SD2/SDXL) rather than 1×1 conv (SD1) `proj_in`/`proj_out`.
    pub linear_projection: bool,
    /// Input width of `add_embedding` (SDXL text_time conditioning).
    pub addition_embed_in: Option<u64>,
    /// `time_cond_proj_dim` of LCM-distilled UNets.
    pub time_cond_proj_dim: Option<u64>,
    /// Latent channels.
    pub in_channels: u64,
}

impl UnetConfig {
    /// The published config of a family's UNet.
    pub fn for_family(family: ModelFamily) -> Self {
        let sd1 = Self {
            block_out_channels: vec![320, 640, 1280, 1280],
            cross_attention: vec![true, true, true, false],
            transformer_layers: vec![1, 1, 1, 1],
            mid_transformer_layers: 1,
            layers_per_block: 2,
            cross_attention_dim: 768,
            linear_projection: false,
            addition_embed_in: None,
            time_cond_proj_dim: None,
            in_channels: 4,
        };
        match family {
            ModelFamily::Sd15 => sd1,
            ModelFamily::Sd2 => Self {
                cross_attention_dim: 1024,
                linear_projection: true,
                ..sd1
            },
            ModelFamily::Sdxl => Self {
                block_out_channels: vec![320, 640, 1280],
                cross_attention: vec![false, true, true],
                transformer_layers: vec![1, 2, 10],
                mid_transformer_layers: 10,
                cross_attention_dim: 2048,
                linear_projection: true,
                addition_embed_in: Some(2816),
                ..sd1
            },
            ModelFamily::SdxlRefiner => Self {
                block_out_channels: vec![384, 768, 1536, 1536],
                cross_attention: vec![false, true, true, false],
                transformer_layers: vec![4, 4, 4, 4],
                mid_transformer_layers: 4,
                cross_attention_dim: 1280,
                linear_projection: true,
                addition_embed_in: Some(2560),
                ..sd1
            },
        }
    }

    fn time_embed_dim(&self) -> u64 {
        4 * self.block_out_channels[0]
    }

    /// Every UNet tensor in diffusers names.
    pub fn diffusers_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        let c = &self.block_out_channels;
        let n = c.len();
        let ted = self.time_embed_dim();
        conv(&mut out, "conv_in", c[0], self.in_channels, 3);
        linear(&mut out, "time_embedding.linear_1", ted, c[0], true);
        linear(&mut out, "time_embedding.linear_2", ted, ted, true);
        if let Some(dim) = self.time_cond_proj_dim {
            linear(&mut out, "time_embedding.cond_proj", c[0], dim, false);
        }
        if let Some(dim) = self.addition_embed_in {
            linear(&mut out, "add_embedding.linear_1", ted, dim, true);
            linear(&mut out, "add_embedding.linear_2", ted, ted, true);
        }
        let mut ch = c[0];
        for (i, &width) in c.iter().enumerate() {
            for j in 0..self.layers_per_block {
                resnet(
                    &mut out,
                    &format!("down_blocks.{i}.resnets.{j}"),
                    ch,
                    width,
                    ted,
                );
                ch = width;
                if self.cross_attention[i] {
                    self.transformer(
                        &mut out,
                        &format!("down_blocks.{i}.attentions.{j}"),
                        width,
                        self.transformer_layers[i],
                    );
                }
            }
            if i + 1 < n {
                conv(
                    &mut out,
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    width,
                    width,
                    3,
                );
            }
        }
        let last = c[n - 1];
        resnet(&mut out, "mid_block.resnets.0", last, last, ted);
        self.transformer(
            &mut out,
            "mid_block.attentions.0",
            last,
            self.mid_transformer_layers,
        );
        resnet(&mut out, "mid_block.resnets.1", last, last, ted);
        let mut output = last;
        for i in 0..n {
            let level = n - 1 - i;
            let prev_output = output;
            output = c[level];
            let input = c[level.saturating_sub(1)];
            let layers = self.layers_per_block + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { input } else { output };
                let res_in = if j == 0 { prev_output } else { output };
                resnet(
                    &mut out,
                    &format!("up_blocks.{i}.resnets.{j}"),
                    res_in + skip,
                    output,
                    ted,
                );
                if self.cross_attention[level] {
                    self.transformer(
                        &mut out,
                        &format!("up_blocks.{i}.attentions.{j}"),
                        output,
                        self.transformer_layers[level],
                    );
                }
            }
            if i + 1 < n {
                conv(
                    &mut out,
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                    output,
                    output,
                    3,
                );
            }
        }
        norm(&mut out, "conv_norm_out", c[0]);
        conv(&mut out, "conv_out", self.in_channels, c[0], 3);
        out
    }

    fn transformer(&self, out: &mut Vec<Tensor>, prefix: &str, ch: u64, depth: u64) {
        norm(out, &format!("{prefix}.norm"), ch);
        self.projection(out, &format!("{prefix}.proj_in"), ch);
        for k in 0..depth {
            let b = format!("{prefix}.transformer_blocks.{k}");
            for (attn, kv_in) in [("attn1", ch), ("attn2", self.cross_attention_dim)] {
                linear(out, &format!("{b}.{attn}.to_q"), ch, ch, false);
                linear(out, &format!("{b}.{attn}.to_k"), ch, kv_in, false);
                linear(out, &format!("{b}.{attn}.to_v"), ch, kv_in, false);
                linear(out, &format!("{b}.{attn}.to_out.0"), ch, ch, true);
            }
            for name in ["norm1", "norm2", "norm3"] {
                norm(out, &format!("{b}.{name}"), ch);
            }
            linear(out, &format!("{b}.ff.net.0.proj"), 8 * ch, ch, true);
            linear(out, &format!("{b}.ff.net.2"), ch, 4 * ch, true);
        }
        self.projection(out, &format!("{prefix}.proj_out"), ch);
    }

    fn projection(&self, out: &mut Vec<Tensor>, name: &str, ch: u64) {
        if self.linear_projection {
            linear(out, name, ch, ch, true);
        } else {
            conv(out, name, ch, ch, 1);
        }
    }

    /// Every UNet tensor in LDM (single-file) names, without the `model.diffusion_model.` prefix.
    pub fn ldm_tensors(&self) -> Vec<Tensor> {
        self.diffusers_tensors()
            .into_iter()
            .map(|(name, shape)| (self.diffusers_to_ldm(&name), shape))
            .collect()
    }

    /// Maps one diffusers UNet tensor name to its LDM name.
    pub fn diffusers_to_ldm(&self, name: &str) -> String {
        let per = self.layers_per_block;
        let parts: Vec<&str> = name.split('.').collect();
        let num = |i: usize| {
            parts
                .get(i)
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let rest = |from: usize| parts.get(from..).map(|p| p.join(".")).unwrap_or_default();
        let resnet_rest = |from: usize| {
            let r = rest(from);
            for (d, l) in [
                ("norm1.", "in_layers.0."),
                ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."),
                ("conv_shortcut.", "skip_connection."),
            ] {
                if let Some(tail) = r.strip_prefix(d) {
                    return format!("{l}{tail}");
                }
            }
            r
        };
        match parts[0] {
            "conv_in" => format!("input_blocks.0.0.{}", rest(1)),
            "time_embedding" => match parts[1] {
                "linear_1" => format!("time_embed.0.{}", rest(2)),
                "linear_2" => format!("time_embed.2.{}", rest(2)),
                _ => format!("time_embed.cond_proj.{}", rest(2)),
            },
            "add_embedding" => match parts[1] {
                "linear_1" => format!("label_emb.0.0.{}", rest(2)),
                _ => format!("label_emb.0.2.{}", rest(2)),
            },
            "down_blocks" => {
                let i = num(1);
                match parts[2] {
                    "resnets" => format!(
                        "input_blocks.{}.0.{}",
                        1 + i * (per + 1) + num(3),
                        resnet_rest(4)
                    ),
                    "attentions" => {
                        format!("input_blocks.{}.1.{}", 1 + i * (per + 1) + num(3), rest(4))
                    }
                    _ => format!("input_blocks.{}.0.op.{}", (i + 1) * (per + 1), rest(5)),
                }
            }
            "mid_block" => match parts[1] {
                "resnets" => format!("middle_block.{}.{}", 2 * num(2), resnet_rest(3)),
                _ => format!("middle_block.1.{}", rest(3)),
            },
            "up_blocks" => {
                let i = num(1);
                let level = self.block_out_channels.len() as u64 - 1 - i;
                let has_attention = self.cross_attention[level as usize];
                match parts[2] {
                    "resnets" => format!(
                        "output_blocks.{}.0.{}",
                        i * (per + 1) + num(3),
                        resnet_rest(4)
                    ),
                    "attentions" => {
                        format!("output_blocks.{}.1.{}", i * (per + 1) + num(3), rest(4))
                    }
                    _ => format!(
                        "output_blocks.{}.{}.conv.{}",
                        i * (per + 1) + per,
                        if has_attention { 2 } else { 1 },
                        rest(5)
                    ),
                }
            }
            "conv_norm_out" => format!("out.0.{}", rest(1)),
            "conv_out" => format!("out.2.{}", rest(1)),
            _ => name.to_string(),
        }
    }
}

fn linear(out: &mut Vec<Tensor>, name: &str, out_f: u64, in_f: u64, bias: bool) {
    out.push((format!("{name}.weight"), vec![out_f, in_f]));
    if bias {
        out.push((format!("{name}.bias"), vec![out_f]));
    }
}

fn conv(out: &mut Vec<Tensor>, name: &str, out_c: u64, in_c: u64, k: u64) {
    out.push((format!("{name}.weight"), vec![out_c, in_c, k, k]));
    out.push((format!("{name}.bias"), vec![out_c]));
}

fn norm(out: &mut Vec<Tensor>, name: &str, ch: u64) {
    out.push((format!("{name}.weight"), vec![ch]));
    out.push((format!("{name}.bias"), vec![ch]));
}

fn resnet(out: &mut Vec<Tensor>, prefix: &str, cin: u64, cout: u64, ted: u64) {
    norm(out, &format!("{prefix}.norm1"), cin);
    conv(out, &format!("{prefix}.conv1"), cout, cin, 3);
    linear(out, &format!("{prefix}.time_emb_proj"), cout, ted, true);
    norm(out, &format!("{prefix}.norm2"), cout);
    conv(out, &format!("{prefix}.conv2"), cout, cout, 3);
    if cin != cout {
        conv(out, &format!("{prefix}.conv_shortcut"), cout, cin, 1);
    }
}

/// A CLIP text transformer in Hugging Face `transformers` names (`text_model.*`).
pub fn hf_clip_text(width: u64, layers: u64, projection: bool) -> Vec<Tensor> {
    let mut out = vec![
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![49408, width],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_string(),
            vec![77, width],
        ),
    ];
    for i in 0..layers {
        let p = format!("text_model.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(
                &mut out,
                &format!("{p}.self_attn.{proj}"),
                width,
                width,
                true,
            );
        }
        norm(&mut out, &format!("{p}.layer_norm1"), width);
        linear(&mut out, &format!("{p}.mlp.fc1"), 4 * width, width, true);
        linear(&mut out, &format!("{p}.mlp.fc2"), width, 4 * width, true);
        norm(&mut out, &format!("{p}.layer_norm2"), width);
    }
    norm(&mut out, "text_model.final_layer_norm", width);
    if projection {
        out.push(("text_projection.weight".to_string(), vec![width, width]));
    }
    out
}

/// An OpenCLIP text transformer in its original names (`transformer.resblocks.*`).
pub fn open_clip_text(width: u64, layers: u64) -> Vec<Tensor> {
    let mut out = vec![
        ("token_embedding.weight".to_string(), vec![49408, width]),
        ("positional_embedding".to_string(), vec![77, width]),
        ("text_projection".to_string(), vec![width, width]),
        ("logit_scale".to_string(), vec![]),
    ];
    for i in 0..layers {
        let p = format!("transformer.resblocks.{i}");
        out.push((format!("{p}.attn.in_proj_weight"), vec![3 * width, width]));
        out.push((format!("{p}.attn.in_proj_bias"), vec![3 * width]));
        linear(&mut out, &format!("{p}.attn.out_proj"), width, width, true);
        norm(&mut out, &format!("{p}.ln_1"), width);
        linear(&mut out, &format!("{p}.mlp.c_fc"), 4 * width, width, true);
        linear(&mut out, &format!("{p}.mlp.c_proj"), width, 4 * width, true);
        norm(&mut out, &format!("{p}.ln_2"), width);
    }
    norm(&mut out, "ln_final", width);
    out
}

/// The SD VAE (KL-f8) in LDM names (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`).
pub fn ldm_vae() -> Vec<Tensor> {
    let mut out = Vec::new();
    let ch = [128u64, 256, 512, 512];
    let resnet = |out: &mut Vec<Tensor>, p: &str, cin: u64, cout: u64| {
        norm(out, &format!("{p}.norm1"), cin);
        conv(out, &format!("{p}.conv1"), cout, cin, 3);
        norm(out, &format!("{p}.norm2"), cout);
        conv(out, &format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(out, &format!("{p}.nin_shortcut"), cout, cin, 1);
        }
    };
    let mid = |out: &mut Vec<Tensor>, p: &str| {
        resnet(out, &format!("{p}.mid.block_1"), 512, 512);
        norm(out, &format!("{p}.mid.attn_1.norm"), 512);
        for name in ["q", "k", "v", "proj_out"] {
            conv(out, &format!("{p}.mid.attn_1.{name}"), 512, 512, 1);
        }
        resnet(out, &format!("{p}.mid.block_2"), 512, 512);
    };
    conv(&mut out, "encoder.conv_in", 128, 3, 3);
    let mut cin = 128;
    for (i, c) in ch.iter().enumerate() {
        for j in 0..2 {
            resnet(&mut out, &format!("encoder.down.{i}.block.{j}"), cin, *c);
            cin = *c;
        }
        if i < 3 {
            conv(
                &mut out,
                &format!("encoder.down.{i}.downsample.conv"),
                *c,
                *c,
                3,
            );
        }
    }
    mid(&mut out, "encoder");
    norm(&mut out, "encoder.norm_out", 512);
    conv(&mut out, "encoder.conv_out", 8, 512, 3);
    conv(&mut out, "quant_conv", 8, 8, 1);
    conv(&mut out, "post_quant_conv", 4, 4, 1);
    conv(&mut out, "decoder.conv_in", 512, 4, 3);
    mid(&mut out, "decoder");
    let mut cin = 512;
    for i in (0..4).rev() {
        for j in 0..3 {
            resnet(&mut out, &format!("decoder.up.{i}.block.{j}"), cin, ch[i]);
            cin = ch[i];
        }
        if i > 0 {
            conv(
                &mut out,
                &format!("decoder.up.{i}.upsample.conv"),
                ch[i],
                ch[i],
                3,
            );
        }
    }
    norm(&mut out, "decoder.norm_out", 128);
    conv(&mut out, "decoder.conv_out", 3, 128, 3);
    out
}

fn prefixed(prefix: &str, tensors: Vec<Tensor>) -> Vec<Tensor> {
    tensors
        .into_iter()
        .map(|(n, s)| (format!("{prefix}{n}"), s))
        .collect()
}

/// Every tensor of a single-file (LDM) checkpoint of `family`.
pub fn ldm_checkpoint(family: ModelFamily) -> Vec<Tensor> {
    let mut out = prefixed(
        "model.diffusion_model.",
        UnetConfig::for_family(family).ldm_tensors(),
    );
    out.extend(prefixed("first_stage_model.", ldm_vae()));
    match family {
        ModelFamily::Sd15 => out.extend(prefixed(
            "cond_stage_model.transformer.",
            hf_clip_text(768, 12, false),
        )),
        ModelFamily::Sd2 => out.extend(prefixed(
            "cond_stage_model.model.",
            open_clip_text(1024, 24),
        )),
        ModelFamily::Sdxl => {
            out.extend(prefixed(
                "conditioner.embedders.0.transformer.",
                hf_clip_text(768, 12, false),
            ));
            out.extend(prefixed(
                "conditioner.embedders.1.model.",
                open_clip_text(1280, 32),
            ));
        }
        ModelFamily::SdxlRefiner => out.extend(prefixed(
            "conditioner.embedders.0.model.",
            open_clip_text(1280, 32),
        )),
    }
    out
}

/// The text encoders of a diffusers pipeline folder of `family`: (folder, tensors).
pub fn diffusers_text_encoders(family: ModelFamily) -> Vec<(&'static str, Vec<Tensor>)> {
    match family {
        ModelFamily::Sd15 => vec![("text_encoder", hf_clip_text(768, 12, false))],
        ModelFamily::Sd2 => vec![("text_encoder", hf_clip_text(1024, 23, false))],
        ModelFamily::Sdxl => vec![
            ("text_encoder", hf_clip_text(768, 12, false)),
            ("text_encoder_2", hf_clip_text(1280, 32, true)),
        ],
        ModelFamily::SdxlRefiner => vec![("text_encoder_2", hf_clip_text(1280, 32, true))],
    }
}

/// How a LoRA file names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraStyle {
    /// kohya-ss: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// PEFT / diffusers: `unet.<path>.lora_A.weight`, `.lora_B.weight`.
    Peft,
}

/// The tensors of a LoRA of `rank` for `family`, adapting the UNet attention projections and
/// (when `text` is set) the text encoders' attention and MLP layers.
pub fn lora(family: ModelFamily, style: LoraStyle, rank: u64, text: bool) -> Vec<Tensor> {
    let unet = UnetConfig::for_family(family);
    let mut targets: Vec<(String, String, u64, u64)> = Vec::new(); // (kohya name, peft name, out, in)
    let sdxl_like = matches!(family, ModelFamily::Sdxl | ModelFamily::SdxlRefiner);
    for (name, shape) in unet.diffusers_tensors() {
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        let adapted = path.contains(".transformer_blocks.")
            && ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .any(|t| path.ends_with(t));
        if !adapted || shape.len() != 2 {
            continue;
        }
        // kohya files for SDXL use the LDM block names; for SD1/2 the diffusers ones.
        let kohya_path = if sdxl_like {
            unet.diffusers_to_ldm(&name)
                .trim_end_matches(".weight")
                .to_string()
        } else {
            path.to_string()
        };
        targets.push((
            format!("lora_unet_{}", kohya_path.replace('.', "_")),
            format!("unet.{path}"),
            shape[0],
            shape[1],
        ));
    }
    if text {
        let encoders: Vec<(&str, &str, u64, u64)> = match family {
            ModelFamily::Sd15 => vec![("lora_te", "text_encoder", 768, 12)],
            ModelFamily::Sd2 => vec![("lora_te", "text_encoder", 1024, 23)],
            ModelFamily::Sdxl => vec![
                ("lora_te1", "text_encoder", 768, 12),
                ("lora_te2", "text_encoder_2", 1280, 32),
            ],
            ModelFamily::SdxlRefiner => vec![("lora_te2", "text_encoder_2", 1280, 32)],
        };
        for (kohya, peft, width, layers) in encoders {
            for i in 0..layers {
                let p = format!("text_model.encoder.layers.{i}");
                for (proj, out_f, in_f) in [
                    ("self_attn.q_proj", width, width),
                    ("self_attn.k_proj", width, width),
                    ("self_attn.v_proj", width, width),
                    ("self_attn.out_proj", width, width),
                    ("mlp.fc1", 4 * width, width),
                    ("mlp.fc2", width, 4 * width),
                ] {
                    let path = format!("{p}.{proj}");
                    targets.push((
                        format!("{kohya}_{}", path.replace('.', "_")),
                        format!("{peft}.{path}"),
                        out_f,
                        in_f,
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (kohya, peft, out_f, in_f) in targets {
        match style {
            LoraStyle::Kohya => {
                out.push((format!("{kohya}.lora_down.weight"), vec![rank, in_f]));
                out.push((format!("{kohya}.lora_up.weight"), vec![out_f, rank]));
                out.push((format!("{kohya}.alpha"), vec![]));
            }
            LoraStyle::Peft => {
                out.push((format!("{peft}.lora_A.weight"), vec![rank, in_f]));
                out.push((format!("{peft}.lora_B.weight"), vec![out_f, rank]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(tensors: &[Tensor]) -> u64 {
        tensors.iter().map(|(_, s)| s.iter().product::<u64>()).sum()
    }

    /// Parameter counts of the published models pin the layouts down.
    #[test]
    fn parameter_counts_match_the_published_models() {
        assert_eq!(
            params(&UnetConfig::for_family(ModelFamily::Sd15).diffusers_tensors()),
            859_520_964
        );
        assert_eq!(
            params(&UnetConfig::for_family(ModelFamily::Sd2).diffusers_tensors()),
            865_910_724
        );
        assert_eq!(
            params(&UnetConfig::for_family(ModelFamily::Sdxl).diffusers_tensors()),
            2_567_463_684
        );
        assert_eq!(params(&hf_clip_text(768, 12, false)), 123_060_480);
        assert_eq!(params(&ldm_vae()), 83_653_863);
    }

    #[test]
    fn ldm_names_follow_the_original_layout() {
        let sd15 = UnetConfig::for_family(ModelFamily::Sd15);
        let names: std::collections::HashSet<String> =
            sd15.ldm_tensors().into_iter().map(|(n, _)| n).collect();
        for expected in [
            "input_blocks.0.0.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "input_blocks.3.0.op.weight",
            "input_blocks.4.0.skip_connection.weight",
            "input_blocks.11.0.out_layers.3.weight",
            "middle_block.1.proj_in.weight",
            "middle_block.2.emb_layers.1.weight",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.weight",
            "output_blocks.11.1.proj_out.weight",
            "time_embed.0.weight",
            "out.2.bias",
        ] {
            assert!(names.contains(expected), "missing {expected}");
        }
        let sdxl = UnetConfig::for_family(ModelFamily::Sdxl);
        let names: std::collections::HashSet<String> =
            sdxl.ldm_tensors().into_iter().map(|(n, _)| n).collect();
        for expected in [
            "label_emb.0.0.weight",
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
            "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
            "output_blocks.2.2.conv.weight",
            "output_blocks.8.0.in_layers.0.weight",
        ] {
            assert!(names.contains(expected), "missing {expected}");
        }
    }
}

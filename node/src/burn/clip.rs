//! The CLIP text transformer (Hugging Face `CLIPTextModel` names): SD1.x's CLIP ViT-L/14 text
//! tower (`quick_gelu`) and SD2.x's OpenCLIP ViT-H text tower converted to the same layout (`gelu`).

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use super::nn::{LayerMut, LayerNorm, Layers, Linear, attention, gelu, quick_gelu};
use super::weights::Loader;
use crate::error::{NodeError, Result};

/// The fields of a `CLIPTextConfig` this implementation reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Sequence length (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP-L) or `gelu` (OpenCLIP).
    #[serde(default = "quick")]
    pub hidden_act: String,
    /// Layer norm epsilon.
    #[serde(default = "eps5")]
    pub layer_norm_eps: f64,
    /// End-of-text id; 2 (the value of old configs) means "the highest id", as transformers reads it.
    #[serde(default = "legacy_eos")]
    pub eos_token_id: u32,
}

fn legacy_eos() -> u32 {
    2
}

/// What one pass of the text tower gives.
pub struct ClipOutput<B: Backend> {
    /// The last layer's output after the final layer norm: `[n, tokens, hidden]`.
    pub last: Tensor<B, 3>,
    /// The second-to-last layer's output, not normed (SDXL's conditioning): `[n, tokens, hidden]`.
    pub penultimate: Tensor<B, 3>,
    /// The normed end-of-text token, through the text projection when the model has one:
    /// `[n, projection or hidden]`.
    pub pooled: Tensor<B, 2>,
}

fn quick() -> String {
    "quick_gelu".into()
}
fn eps5() -> f64 {
    1e-5
}

impl ClipConfig {
    /// SD1.5's CLIP ViT-L/14 text encoder.
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// SD2.x's OpenCLIP ViT-H text encoder as diffusers ships it (23 of its 24 layers).
    pub fn open_clip_h() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            ..Self::clip_l()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(NodeError::ModelConfig(format!(
                "text encoder: {} wide does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(NodeError::ModelConfig(format!(
                "text encoder: activation {} is not supported",
                self.hidden_act
            )));
        }
        Ok(())
    }
}

/// The prefix of the text tower's names in `file`: `text_model.` as transformers 4 writes them,
/// or none (transformers 5), or `cond_stage_model.transformer.text_model.` in LDM checkpoints.
pub fn clip_prefix(file: &super::tensor_file::TensorFile) -> &'static str {
    [
        "text_model.",
        "cond_stage_model.transformer.text_model.",
        "",
    ]
    .into_iter()
    .find(|p| file.contains(&format!("{p}embeddings.token_embedding.weight")))
    .unwrap_or("text_model.")
}

struct Layer<B: Backend> {
    ln1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    ln2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// A loaded CLIP text transformer.
pub struct ClipText<B: Backend> {
    config: ClipConfig,
    token_embedding: Tensor<B, 2>,
    position_embedding: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    final_ln: LayerNorm<B>,
    projection: Option<super::nn::Linear<B>>,
}

impl<B: Backend> ClipText<B> {
    /// Loads the text tower; `l` resolves names below `text_model.`.
    pub fn load(l: &mut Loader<B>, config: &ClipConfig) -> Result<Self> {
        config.validate()?;
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let token_embedding =
            l.tensor("embeddings.token_embedding.weight", [config.vocab_size, d])?;
        let position_embedding = l.tensor(
            "embeddings.position_embedding.weight",
            [config.max_position_embeddings, d],
        )?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            layers.push(Layer {
                ln1: l.layer_norm(&format!("{p}.layer_norm1"), d, eps)?,
                q: l.linear(&format!("{p}.self_attn.q_proj"), d, d, true)?,
                k: l.linear(&format!("{p}.self_attn.k_proj"), d, d, true)?,
                v: l.linear(&format!("{p}.self_attn.v_proj"), d, d, true)?,
                out: l.linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
                ln2: l.layer_norm(&format!("{p}.layer_norm2"), d, eps)?,
                fc1: l.linear(&format!("{p}.mlp.fc1"), d, config.intermediate_size, true)?,
                fc2: l.linear(&format!("{p}.mlp.fc2"), config.intermediate_size, d, true)?,
            });
        }
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_ln: l.layer_norm("final_layer_norm", d, eps)?,
            projection: None,
        })
    }

    /// Adds the text projection (`CLIPTextModelWithProjection`, SDXL's second encoder) read
    /// through `l` as `text_projection` (`[projection, hidden]`, no bias).
    pub fn with_projection(mut self, l: &mut Loader<B>, projection_dim: usize) -> Result<Self> {
        self.projection = Some(l.linear(
            "text_projection",
            self.config.hidden_size,
            projection_dim,
            false,
        )?);
        Ok(self)
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Encodes token ids (one row per prompt, each `max_position_embeddings` long) into the
    /// final-layer-normed hidden states `[n, tokens, hidden]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>> {
        Ok(self.encode(ids)?.last)
    }

    /// Encodes token ids and returns the last and penultimate hidden states and the pooled output.
    pub fn encode(&self, ids: &[Vec<u32>]) -> Result<ClipOutput<B>> {
        let n = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        let max = self.config.max_position_embeddings;
        if n == 0 || len == 0 || len > max || ids.iter().any(|r| r.len() != len) {
            return Err(NodeError::InvalidJob(format!(
                "text encoder takes 1..={max} tokens per prompt, rows of equal length"
            )));
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(NodeError::InvalidJob(format!(
                "token id {bad} is outside the text encoder's vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let device = self.token_embedding.device();
        let d = self.config.hidden_size;
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| i64::from(t)).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [n * len]), &device);
        let tokens = self
            .token_embedding
            .clone()
            .select(0, index)
            .reshape([n, len, d]);
        let positions = self
            .position_embedding
            .clone()
            .slice([0..len, 0..d])
            .reshape([1, len, d]);
        let mut x = tokens + positions;
        let heads = self.config.num_attention_heads;
        let quick = self.config.hidden_act == "quick_gelu";
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            let h = layer.ln1.forward(x.clone());
            let a = attention(
                layer.q.forward(h.clone()),
                layer.k.forward(h.clone()),
                layer.v.forward(h),
                heads,
                true,
            );
            x = x + layer.out.forward(a);
            let h = layer.fc1.forward(layer.ln2.forward(x.clone()));
            let h = if quick { quick_gelu(h) } else { gelu(h) };
            x = x + layer.fc2.forward(h);
        }
        let last = self.final_ln.forward(x);
        // The pooled token: transformers takes the highest id when eos_token_id is the legacy 2,
        // else the first end-of-text token.
        let positions: Vec<usize> = ids
            .iter()
            .map(|row| {
                if self.config.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&t| t == self.config.eos_token_id)
                        .unwrap_or(row.len() - 1)
                }
            })
            .collect();
        let pooled = Tensor::cat(
            positions
                .iter()
                .enumerate()
                .map(|(b, &p)| {
                    last.clone()
                        .slice([b..b + 1, p..p + 1, 0..d])
                        .reshape([1, d])
                })
                .collect(),
            0,
        );
        let pooled = match &self.projection {
            Some(p) => p.forward(pooled),
            None => pooled,
        };
        Ok(ClipOutput {
            last,
            penultimate,
            pooled,
        })
    }
}

impl<B: Backend> Layers<B> for Layer<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        for l in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.out,
            &mut self.fc1,
            &mut self.fc2,
        ] {
            l.visit_layers(f);
        }
    }
}

impl<B: Backend> Layers<B> for ClipText<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.layers.visit_layers(f);
        self.projection.visit_layers(f);
    }
}

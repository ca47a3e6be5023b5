//! LoRA files (kohya and PEFT/diffusers layouts) merged into weights as they load:
//! `W += strength · alpha/rank · up·down`, convolutions flattened to 2-D and back.
//!
//! Keys are never parsed back into module paths (underscores are ambiguous). Instead each module
//! the loader builds looks itself up in flattened form (`down_blocks.0.attentions.0.proj_in` →
//! `down_blocks_0_attentions_0_proj_in`), and every LoRA module must be claimed by the end of loading.

use std::collections::BTreeMap;
use std::path::Path;

use super::tensor_file::{HostTensor, TensorFile, read_all};
use crate::error::{NodeError, Result};

/// One module's low-rank pair.
#[derive(Clone, Debug)]
struct Pair {
    down: Option<HostTensor>,
    up: Option<HostTensor>,
    alpha: Option<f32>,
    claimed: bool,
}

/// One LoRA file with its strength.
#[derive(Debug)]
struct Lora {
    name: String,
    strength: f32,
    /// `(component, flattened module path)` → pair.
    pairs: BTreeMap<(String, String), Pair>,
}

/// The LoRAs applied to one model load.
#[derive(Debug, Default)]
pub struct LoraSet {
    loras: Vec<Lora>,
}

/// Splits a LoRA key into `(component, flattened module path, tensor role)`.
fn classify(key: &str) -> Option<(&'static str, String, &'static str)> {
    let (stem, role) = if let Some(s) = key.strip_suffix(".lora_down.weight") {
        (s, "down")
    } else if let Some(s) = key.strip_suffix(".lora_up.weight") {
        (s, "up")
    } else if let Some(s) = key.strip_suffix(".lora_A.weight") {
        (s, "down")
    } else if let Some(s) = key.strip_suffix(".lora_B.weight") {
        (s, "up")
    } else if let Some(s) = key.strip_suffix(".alpha") {
        (s, "alpha")
    } else {
        return None;
    };
    for (prefix, component) in [
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return Some((component, rest.to_string(), role));
        }
    }
    for (prefix, component) in [
        ("unet.", "unet"),
        ("text_encoder.", "text_encoder"),
        ("text_encoder_2.", "text_encoder_2"),
        ("base_model.model.", "unet"),
    ] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return Some((component, flatten(rest), role));
        }
    }
    None
}

/// A module path in kohya's flattened form.
pub fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

impl LoraSet {
    /// An empty set (no LoRA).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the set holds no LoRA.
    pub fn is_empty(&self) -> bool {
        self.loras.is_empty()
    }

    /// Adds the LoRA file at `path` with `strength`.
    pub fn add(&mut self, name: &str, path: &Path, strength: f32) -> Result<()> {
        let file = TensorFile::open(path)?;
        let mut pairs: BTreeMap<(String, String), Pair> = BTreeMap::new();
        for (key, tensor) in read_all(&file)? {
            let Some((component, module, role)) = classify(&key) else {
                return Err(NodeError::Lora(format!(
                    "{name}: tensor {key} is neither a kohya nor a PEFT LoRA tensor"
                )));
            };
            let pair = pairs
                .entry((component.to_string(), module))
                .or_insert(Pair {
                    down: None,
                    up: None,
                    alpha: None,
                    claimed: false,
                });
            match role {
                "down" => pair.down = Some(tensor),
                "up" => pair.up = Some(tensor),
                _ => pair.alpha = tensor.data.first().copied(),
            }
        }
        for ((component, module), pair) in &pairs {
            if pair.down.is_none() || pair.up.is_none() {
                return Err(NodeError::Lora(format!(
                    "{name}: {component} module {module} lacks its {} matrix",
                    if pair.down.is_none() { "down" } else { "up" }
                )));
            }
        }
        self.loras.push(Lora {
            name: name.to_string(),
            strength,
            pairs,
        });
        Ok(())
    }

    /// Adds every delta aimed at `component`'s module `path` (or its `alias`, another name the
    /// module goes by) to its weight `w` (`[out, …]`).
    pub fn merge_into(
        &mut self,
        component: &str,
        path: &str,
        alias: Option<&str>,
        w: &mut HostTensor,
    ) -> Result<()> {
        let key = (component.to_string(), flatten(path));
        let alias_key = alias.map(|a| (component.to_string(), flatten(a)));
        for lora in &mut self.loras {
            let found = if lora.pairs.contains_key(&key) {
                Some(key.clone())
            } else {
                alias_key.clone().filter(|k| lora.pairs.contains_key(k))
            };
            let Some(pair) = found.and_then(|k| lora.pairs.get_mut(&k)) else {
                continue;
            };
            let (Some(down), Some(up)) = (&pair.down, &pair.up) else {
                continue;
            };
            let out = w.shape[0];
            let cols = w.data.len() / out.max(1);
            let rank = down.shape[0];
            let down_cols = down.data.len() / rank.max(1);
            if rank == 0 || up.shape[0] != out || up.data.len() != out * rank || down_cols != cols {
                return Err(NodeError::Lora(format!(
                    "{}: {component} module {path} has down {:?} and up {:?}, which do not fit its weight {:?}",
                    lora.name, down.shape, up.shape, w.shape
                )));
            }
            let scale = lora.strength * pair.alpha.unwrap_or(rank as f32) / rank as f32;
            for o in 0..out {
                let up_row = &up.data[o * rank..(o + 1) * rank];
                let w_row = &mut w.data[o * cols..(o + 1) * cols];
                for (r, &u) in up_row.iter().enumerate() {
                    let f = scale * u;
                    if f == 0.0 {
                        continue;
                    }
                    let d_row = &down.data[r * cols..(r + 1) * cols];
                    for (wv, &dv) in w_row.iter_mut().zip(d_row) {
                        *wv += f * dv;
                    }
                }
            }
            pair.claimed = true;
        }
        Ok(())
    }

    /// Fails when a LoRA module matched no module of the loaded model (a LoRA made for another
    /// architecture, or for a component this pipeline does not load).
    pub fn check_claimed(&self) -> Result<()> {
        for lora in &self.loras {
            let unclaimed: Vec<_> = lora.pairs.iter().filter(|(_, p)| !p.claimed).collect();
            if let Some(((component, module), _)) = unclaimed.first() {
                return Err(NodeError::Lora(format!(
                    "{}: {} of its {} modules match nothing in this model (first: {component} {module})",
                    lora.name,
                    unclaimed.len(),
                    lora.pairs.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_classify_in_both_layouts() {
        assert_eq!(
            classify("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
            Some((
                "unet",
                "down_blocks_0_attentions_0_proj_in".to_string(),
                "down"
            ))
        );
        assert_eq!(
            classify("unet.mid_block.attentions.0.proj_out.lora_B.weight"),
            Some(("unet", "mid_block_attentions_0_proj_out".to_string(), "up"))
        );
        assert_eq!(
            classify("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            Some((
                "text_encoder_2",
                "text_model_encoder_layers_0_mlp_fc1".to_string(),
                "alpha"
            ))
        );
        assert_eq!(classify("model.diffusion_model.out.0.weight"), None);
    }

    #[test]
    fn merge_adds_scaled_product() {
        let mut set = LoraSet::new();
        let mut pairs = BTreeMap::new();
        pairs.insert(
            ("unet".to_string(), "a_b".to_string()),
            Pair {
                down: Some(HostTensor {
                    data: vec![1.0, 2.0],
                    shape: vec![1, 2],
                }),
                up: Some(HostTensor {
                    data: vec![3.0, 4.0],
                    shape: vec![2, 1],
                }),
                alpha: Some(0.5),
                claimed: false,
            },
        );
        set.loras.push(Lora {
            name: "t".into(),
            strength: 2.0,
            pairs,
        });
        let mut w = HostTensor {
            data: vec![0.0; 4],
            shape: vec![2, 2],
        };
        set.merge_into("unet", "a.b", None, &mut w).unwrap();
        // scale = 2 · 0.5 / 1 = 1; up·down = [[3, 6], [4, 8]].
        assert_eq!(w.data, vec![3.0, 6.0, 4.0, 8.0]);
        set.check_claimed().unwrap();
    }
}

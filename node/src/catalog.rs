//! The node's model catalogue: the models `MODEL` (a list) and `MODELS` (`*`: everything under
//! `MODEL_ROOT`) name, each identified from its headers, and — for the Burn backends — loaded
//! once at start to check its weights and learn what it runs, keeping the copies that fit the
//! memory budget (pinned models first, then the default, then in order).

use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use drover_shared::detect::{Inspection, Layout};
use drover_shared::family::ModelFamily;
pub use drover_shared::models::ModelAction;

use crate::burn::pipeline::Precision;
use crate::burn::renderer::{ModelPool, PoolModel, model_pool, model_source};
use crate::config::{ModelPath, NodeConfig};
use crate::error::{NodeError, Result};
use crate::factory::detect_model;
use crate::residency::{Ledger, ModelCost, ModelStats, Models};
use crate::sampling::Sampler;

/// A model of the catalogue, identified.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its name in the farm.
    pub name: String,
    /// What its headers say.
    pub model: Inspection,
    /// Named by the operator (a failure stops the start) rather than found by `MODELS=*`.
    pub explicit: bool,
    /// `PIN_MODELS` names it.
    pub pinned: bool,
}

/// What one catalogued model serves, as the node advertises it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCaps {
    /// Stable id (the UNet header's sha256).
    pub id: String,
    /// Name in the farm.
    pub name: String,
    /// Family.
    pub family: ModelFamily,
    /// Cross-attention width.
    pub cross_attention_dim: u32,
    /// Largest width*height it renders.
    pub max_pixels: u64,
    /// The only sizes it renders (fixed-shape models); empty: any.
    pub sizes: Vec<(u32, u32)>,
    /// Samplers it runs, its default first.
    pub samplers: Vec<Sampler>,
    /// Starts jobs from a source image.
    pub img2img: bool,
    /// Inpaints.
    pub inpaint: bool,
    /// Bytes one loaded copy takes (a planning figure: parameters × the weights' dtype size).
    pub bytes: u64,
    /// Never evicted.
    pub pinned: bool,
}

/// The catalogue's residency, as heartbeats report it (summed over a node's devices).
pub trait ResidencyProbe: Send + Sync {
    /// Each loadable model's id and residency.
    fn models(&self) -> Vec<(String, ModelStats)>;
}

/// Carries out orders about the catalogue's models (blocking: a load takes seconds).
pub trait ModelControl: Send + Sync {
    /// Does `action` to model `model_id` on every device; answers what was done.
    fn command(&self, model_id: &str, action: ModelAction) -> Result<String>;
}

impl<P: Send + 'static> ModelControl for Vec<Arc<Models<P>>> {
    fn command(&self, model_id: &str, action: ModelAction) -> Result<String> {
        let mut dropped = 0;
        for pool in self {
            let index = pool.index_of(model_id)?;
            match action {
                ModelAction::Load => pool.preload(index)?,
                ModelAction::Unload => dropped += pool.unload(index)?,
                ModelAction::Pin => pool.set_pinned(index, true)?,
                ModelAction::Unpin => pool.set_pinned(index, false)?,
            }
        }
        Ok(match action {
            ModelAction::Unload => format!("{dropped} idle copies dropped"),
            _ => "done".into(),
        })
    }
}

/// Identifies every model the configuration names, the default first. A named model that is
/// not a text-to-image base model stops the start; one `MODELS=*` found is skipped with the
/// reason. `PIN_MODELS` must name catalogued models.
pub fn discover(config: &NodeConfig) -> Result<Vec<Entry>> {
    let paths = config.model_paths().map_err(NodeError::Config)?;
    let mut entries = Vec::new();
    for ModelPath {
        name,
        path,
        explicit,
    } in paths
    {
        match detect_model(&path) {
            Ok(model) => entries.push(Entry {
                pinned: config.pin_models.iter().any(|p| p == &name),
                name,
                model,
                explicit,
            }),
            Err(e) if explicit => return Err(e),
            Err(e) => {
                tracing::info!(model = %name, reason = %e, "catalogue entry skipped: not a model")
            }
        }
    }
    if entries.is_empty() {
        return Err(NodeError::Config(format!(
            "MODELS=* found no model under MODEL_ROOT {}",
            config
                .model_root
                .as_ref()
                .map_or_else(String::new, |r| r.display().to_string())
        )));
    }
    check_pins(&config.pin_models, entries.iter().map(|e| e.name.as_str()))?;
    if entries.len() > 1
        && let Some(rknn) = entries.iter().find(|e| e.model.layout == Layout::Rknn)
    {
        return Err(NodeError::Config(format!(
            "{} is an RKNN model folder: an rknn node serves one model (MODEL), not a catalogue",
            rknn.name
        )));
    }
    Ok(entries)
}

/// Refuses a `PIN_MODELS` list that names a model outside `names` (the node's catalogue).
pub fn check_pins<'a>(pins: &[String], names: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
    match pins
        .iter()
        .find(|p| !p.is_empty() && !names.clone().any(|n| n == p.as_str()))
    {
        Some(p) => Err(NodeError::Config(format!(
            "PIN_MODELS names `{p}`, which is not among the node's models ({})",
            names.collect::<Vec<_>>().join(", ")
        ))),
        None => Ok(()),
    }
}

/// Bytes one copy of `model` takes in `precision`: its parameters at the weights' dtype size.
pub fn copy_bytes(model: &Inspection, precision: Precision) -> u64 {
    model.parameters * precision.weights.size() as u64
}

/// The Burn pool of one device for `entries` under `budget`, and what each model serves: every
/// model is loaded once (its weights checked, its samplers and VAE encoder learnt) and kept
/// resident while it fits without evicting (pinned first, then the default, then in order). A
/// model that fails to load stops the start when it was named, else it is dropped from the
/// catalogue (and `entries`) with the reason.
pub fn load_pool<B: Backend>(
    entries: &mut Vec<Entry>,
    device: &B::Device,
    precision: Precision,
    config: &NodeConfig,
    budget: u64,
    max_pixels: impl Fn(ModelFamily) -> u64,
) -> Result<(Arc<ModelPool<B>>, Vec<ModelCaps>)> {
    let pinned: u64 = entries
        .iter()
        .filter(|e| e.pinned)
        .map(|e| copy_bytes(&e.model, precision))
        .sum();
    entries.retain(|e| {
        let bytes = copy_bytes(&e.model, precision);
        // A named model that does not fit is refused by the ledger below, with the reason.
        let keep = e.pinned || e.explicit || bytes + pinned <= budget;
        if !keep {
            tracing::warn!(model = %e.name, bytes, budget, "catalogue entry skipped: larger than the memory budget");
        }
        keep
    });
    let costs: Vec<ModelCost> = entries
        .iter()
        .map(|e| ModelCost {
            name: e.name.clone(),
            bytes: copy_bytes(&e.model, precision),
            pinned: e.pinned,
        })
        .collect();
    let ledger = Ledger::new(budget, costs)?;
    let models = entries
        .iter()
        .map(|e| PoolModel {
            id: e.model.model_id.clone(),
            name: e.name.clone(),
            source: model_source(&e.model),
        })
        .collect();
    let pool = model_pool::<B>(
        models,
        device.clone(),
        precision,
        config.prediction.clone(),
        ledger,
    );
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| (!entries[i].pinned, i != 0, i));
    let mut caps: Vec<Option<ModelCaps>> = vec![None; entries.len()];
    for i in order {
        let entry = &entries[i];
        let started = std::time::Instant::now();
        let pipeline = match pool.load(i) {
            Ok(p) => p,
            Err(e) if entry.explicit || entry.pinned => {
                return Err(NodeError::Config(format!("model {}: {e}", entry.name)));
            }
            Err(e) => {
                tracing::warn!(model = %entry.name, reason = %e, "catalogue entry skipped: it does not load");
                continue;
            }
        };
        let encodes = pipeline.can_encode();
        caps[i] = Some(ModelCaps {
            id: entry.model.model_id.clone(),
            name: entry.name.clone(),
            family: entry.model.family,
            cross_attention_dim: entry.model.cross_attention_dim,
            max_pixels: max_pixels(entry.model.family),
            sizes: Vec::new(),
            samplers: pipeline.samplers(),
            img2img: encodes,
            inpaint: encodes,
            bytes: copy_bytes(&entry.model, precision),
            pinned: entry.pinned,
        });
        let ms = started.elapsed().as_millis() as u64;
        let kept = pool.admit(i, pipeline, ms);
        tracing::info!(model = %entry.name, family = %entry.model.family, ms, resident = kept, "model checked");
    }
    // Models that failed leave the advertised catalogue (their pool entries are never asked for).
    let mut kept_entries = Vec::new();
    let mut advertised = Vec::new();
    for (entry, caps) in entries.drain(..).zip(caps) {
        if let Some(c) = caps {
            kept_entries.push(entry);
            advertised.push(c);
        }
    }
    *entries = kept_entries;
    if advertised.is_empty() {
        return Err(NodeError::Config(
            "no model of the catalogue loads (each one's reason is logged above)".into(),
        ));
    }
    Ok((Arc::new(pool), advertised))
}

impl<P: Send + 'static> ResidencyProbe for Vec<Arc<Models<P>>> {
    fn models(&self) -> Vec<(String, ModelStats)> {
        let mut total: Vec<(String, ModelStats)> = Vec::new();
        for pool in self {
            for (i, (id, s)) in pool.stats().into_iter().enumerate() {
                if total.len() <= i {
                    total.push((id, ModelStats::default()));
                }
                let t = &mut total[i].1;
                t.copies += s.copies;
                t.loads += s.loads;
                t.evictions += s.evictions;
                t.load_ms_total += s.load_ms_total;
                t.last_load_ms = t.last_load_ms.max(s.last_load_ms);
            }
        }
        total
    }
}

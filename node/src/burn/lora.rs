//! LoRA files (kohya and PEFT/diffusers layouts) merged into weights: `W += strength ·
//! alpha/rank · up·down`, convolutions flattened to 2-D and back — as weights load, and in place
//! on a loaded model ([`switch`]).
//!
//! Keys are never parsed back into module paths (underscores are ambiguous). Instead each module
//! the loader builds looks itself up in flattened form (`down_blocks.0.attentions.0.proj_in` →
//! `down_blocks_0_attentions_0_proj_in`), and every LoRA module must be claimed by a merge.
//!
//! A switch in place touches only the layers the old or the new set changes: each such layer
//! keeps its base weight while it carries a delta, and its new weight is computed from that
//! base exactly as a fresh load merges it (host f32, the same order), so a switched model equals
//! one loaded with the new set. Decoded LoRA files are cached (by path, size and modification
//! time) and shared by the workers of a node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{DType, Tensor};

use super::nn::{LayerMut, Layers, LoraSite, LoraSlot};
use super::tensor_file::{HostTensor, TensorFile, read_all};
use super::weights::{transpose, upload};
use crate::error::{NodeError, Result};

/// One module's low-rank pair.
#[derive(Clone, Debug)]
struct Pair {
    down: HostTensor,
    up: HostTensor,
    alpha: Option<f32>,
}

/// A decoded LoRA file: `(component, flattened module path)` → pair.
#[derive(Debug)]
pub struct LoraFile {
    pairs: BTreeMap<(String, String), Pair>,
    /// Bytes its tensors take on the host.
    bytes: usize,
}

impl LoraFile {
    /// Reads and checks the LoRA file at `path` (`name` for errors).
    pub fn read(name: &str, path: &Path) -> Result<Self> {
        let file = TensorFile::open(path)?;
        type Parts = (Option<HostTensor>, Option<HostTensor>, Option<f32>);
        let mut parts: BTreeMap<(String, String), Parts> = BTreeMap::new();
        for (key, tensor) in read_all(&file)? {
            let Some((component, module, role)) = classify(&key) else {
                return Err(NodeError::Lora(format!(
                    "{name}: tensor {key} is neither a kohya nor a PEFT LoRA tensor"
                )));
            };
            let part = parts.entry((component.to_string(), module)).or_default();
            match role {
                "down" => part.0 = Some(tensor),
                "up" => part.1 = Some(tensor),
                _ => part.2 = tensor.data.first().copied(),
            }
        }
        let mut pairs = BTreeMap::new();
        for ((component, module), (down, up, alpha)) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(NodeError::Lora(format!(
                    "{name}: {component} module {module} lacks its down or up matrix"
                )));
            };
            pairs.insert((component, module), Pair { down, up, alpha });
        }
        Ok(Self::of(pairs))
    }

    fn of(pairs: BTreeMap<(String, String), Pair>) -> Self {
        let bytes = pairs
            .values()
            .map(|p| 4 * (p.down.data.len() + p.up.data.len()))
            .sum();
        Self { pairs, bytes }
    }
}

/// Most bytes of decoded LoRA files the cache keeps (least recently used dropped first).
const CACHE_BYTES: usize = 2 << 30;

/// What identifies a file's contents without reading it: size and modification time.
type Stamp = (u64, Option<SystemTime>);

/// Decoded LoRA files, most recently used last.
static CACHE: Mutex<Vec<(PathBuf, Stamp, Arc<LoraFile>)>> = Mutex::new(Vec::new());

/// The decoded LoRA file at `path`, from the cache when the file is unchanged since it was read.
pub fn cached(name: &str, path: &Path) -> Result<Arc<LoraFile>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| NodeError::Lora(format!("{name}: {}: {e}", path.display())))?;
    let stamp = (meta.len(), meta.modified().ok());
    {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|(p, s, _)| p == path && *s == stamp) {
            let entry = cache.remove(i);
            let file = entry.2.clone();
            cache.push(entry);
            return Ok(file);
        }
    }
    let file = Arc::new(LoraFile::read(name, path)?);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|(p, _, _)| p != path);
    cache.push((path.to_path_buf(), stamp, file.clone()));
    let mut total: usize = cache.iter().map(|(_, _, f)| f.bytes).sum();
    while total > CACHE_BYTES && cache.len() > 1 {
        total -= cache.remove(0).2.bytes;
    }
    Ok(file)
}

/// One LoRA of a set, with its strength and the modules merges have claimed.
#[derive(Debug)]
struct Lora {
    name: String,
    strength: f32,
    file: Arc<LoraFile>,
    claimed: BTreeSet<(String, String)>,
}

/// The LoRAs applied to one model load or switch.
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

    /// Adds the LoRA file at `path` with `strength` (decoded once, then from the cache).
    pub fn add(&mut self, name: &str, path: &Path, strength: f32) -> Result<()> {
        self.push(name, cached(name, path)?, strength);
        Ok(())
    }

    fn push(&mut self, name: &str, file: Arc<LoraFile>, strength: f32) {
        self.loras.push(Lora {
            name: name.to_string(),
            strength,
            file,
            claimed: BTreeSet::new(),
        });
    }

    /// The key of `lora`'s pair aimed at `site` (by its path or its alias), if any.
    fn key_for(lora: &Lora, site: &LoraSite) -> Option<(String, String)> {
        let key = (site.component.to_string(), flatten(&site.path));
        if lora.file.pairs.contains_key(&key) {
            return Some(key);
        }
        let alias = (site.component.to_string(), flatten(site.alias.as_deref()?));
        lora.file.pairs.contains_key(&alias).then_some(alias)
    }

    /// Whether a LoRA of the set changes the weight at `site`.
    pub fn touches(&self, site: &LoraSite) -> bool {
        self.loras.iter().any(|l| Self::key_for(l, site).is_some())
    }

    /// Adds every delta aimed at `site` to its weight `w` (`[out, …]`).
    pub fn merge_into(&mut self, site: &LoraSite, w: &mut HostTensor) -> Result<()> {
        for lora in &mut self.loras {
            let Some(key) = Self::key_for(lora, site) else {
                continue;
            };
            let pair = &lora.file.pairs[&key];
            let (down, up) = (&pair.down, &pair.up);
            let out = w.shape[0];
            let cols = w.data.len() / out.max(1);
            let rank = down.shape[0];
            let down_cols = down.data.len() / rank.max(1);
            if rank == 0 || up.shape[0] != out || up.data.len() != out * rank || down_cols != cols {
                return Err(NodeError::Lora(format!(
                    "{}: {} module {} has down {:?} and up {:?}, which do not fit its weight {:?}",
                    lora.name, site.component, site.path, down.shape, up.shape, w.shape
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
            lora.claimed.insert(key);
        }
        Ok(())
    }

    /// Fails when a LoRA module matched no module of the loaded model (a LoRA made for another
    /// architecture, or for a component this pipeline does not load).
    pub fn check_claimed(&self) -> Result<()> {
        for lora in &self.loras {
            let unclaimed: Vec<_> = lora
                .file
                .pairs
                .keys()
                .filter(|k| !lora.claimed.contains(*k))
                .collect();
            if let Some((component, module)) = unclaimed.first() {
                return Err(NodeError::Lora(format!(
                    "{}: {} of its {} modules match nothing in this model (first: {component} {module})",
                    lora.name,
                    unclaimed.len(),
                    lora.file.pairs.len()
                )));
            }
        }
        Ok(())
    }
}

/// What a switch does to one layer.
enum Change<B: Backend, const D: usize> {
    /// Nothing: no LoRA of the old or new set changes it.
    Keep,
    /// The new weight, and the base it keeps (`None`: the new weight is the base).
    Set(Tensor<B, D>, Option<Tensor<B, D>>),
}

/// How one layer kind lays its weight out on the device against the host's `[out, …]`.
trait Layout<B: Backend, const D: usize> {
    fn to_host(&self, t: Tensor<B, D>) -> Result<HostTensor>;
    fn to_device(&self, t: HostTensor, like: &Tensor<B, D>, dtype: DType) -> Tensor<B, D>;
}

/// Linear layers: `[in, out]` on the device.
struct Transposed;
/// Convolutions: `[out, in, k, k]` on both sides.
struct Same;

fn download<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| NodeError::Lora(format!("reading a base weight back: {e:?}")))?;
    Ok(HostTensor { data, shape })
}

impl<B: Backend> Layout<B, 2> for Transposed {
    fn to_host(&self, t: Tensor<B, 2>) -> Result<HostTensor> {
        let [inp, out] = t.dims();
        Ok(transpose(&download(t)?, inp, out))
    }
    fn to_device(&self, t: HostTensor, like: &Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
        let [inp, out] = like.dims();
        upload(transpose(&t, out, inp), &like.device(), dtype)
    }
}

impl<B: Backend> Layout<B, 4> for Same {
    fn to_host(&self, t: Tensor<B, 4>) -> Result<HostTensor> {
        download(t)
    }
    fn to_device(&self, t: HostTensor, like: &Tensor<B, 4>, dtype: DType) -> Tensor<B, 4> {
        upload(t, &like.device(), dtype)
    }
}

/// Plans one layer's switch to `set`: its new weight from its base, as a fresh load merges it.
fn plan<B: Backend, const D: usize>(
    set: &mut LoraSet,
    weight: &Tensor<B, D>,
    slot: &LoraSlot<B, D>,
    layout: &dyn Layout<B, D>,
) -> Result<Change<B, D>> {
    if !set.touches(&slot.site) {
        return Ok(match &slot.base {
            Some(base) => Change::Set(base.clone(), None),
            None => Change::Keep,
        });
    }
    let base = slot.base.clone().unwrap_or_else(|| weight.clone());
    let mut w = layout.to_host(base.clone())?;
    set.merge_into(&slot.site, &mut w)?;
    let merged = layout.to_device(w, &base, base.dtype());
    Ok(Change::Set(merged, Some(base)))
}

/// The planned change of one layer, either kind.
enum Planned<B: Backend> {
    Linear(Change<B, 2>),
    Conv(Change<B, 4>),
}

/// Switches the LoRAs merged into `nets` (a model's text encoders and UNet) to `set`, in place:
/// only layers the old or the new set changes are recomputed, each from its kept base. All or
/// nothing: a LoRA that does not fit (or matches no layer) leaves the weights as they were.
pub fn switch<B: Backend>(nets: &mut [&mut dyn Layers<B>], mut set: LoraSet) -> Result<usize> {
    let mut planned = Vec::new();
    let mut failed = None;
    for net in nets.iter_mut() {
        net.visit_layers(&mut |layer| {
            if failed.is_some() {
                return;
            }
            let change = match layer {
                LayerMut::Linear(l) => match &l.lora {
                    Some(slot) => plan(&mut set, &l.weight, slot, &Transposed).map(Planned::Linear),
                    None => Ok(Planned::Linear(Change::Keep)),
                },
                LayerMut::Conv(c) => match &c.lora {
                    Some(slot) => plan(&mut set, &c.weight, slot, &Same).map(Planned::Conv),
                    None => Ok(Planned::Conv(Change::Keep)),
                },
            };
            match change {
                Ok(c) => planned.push(c),
                Err(e) => failed = Some(e),
            }
        });
    }
    if let Some(e) = failed {
        return Err(e);
    }
    set.check_claimed()?;
    let mut changed = 0;
    let mut planned = planned.into_iter();
    for net in nets.iter_mut() {
        net.visit_layers(&mut |layer| match (layer, planned.next()) {
            (LayerMut::Linear(l), Some(Planned::Linear(Change::Set(w, base)))) => {
                l.weight = w;
                if let Some(slot) = &mut l.lora {
                    slot.base = base;
                }
                changed += 1;
            }
            (LayerMut::Conv(c), Some(Planned::Conv(Change::Set(w, base)))) => {
                c.weight = w;
                if let Some(slot) = &mut c.lora {
                    slot.base = base;
                }
                changed += 1;
            }
            _ => {}
        });
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::burn::Cpu;
    use crate::burn::nn::{Conv2d, Linear};

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

    fn host(data: Vec<f32>, shape: Vec<usize>) -> HostTensor {
        HostTensor { data, shape }
    }

    /// A one-pair LoRA file aimed at the UNet module `module` (flattened).
    fn file(module: &str, down: HostTensor, up: HostTensor, alpha: Option<f32>) -> Arc<LoraFile> {
        let mut pairs = BTreeMap::new();
        pairs.insert(
            ("unet".to_string(), module.to_string()),
            Pair { down, up, alpha },
        );
        Arc::new(LoraFile::of(pairs))
    }

    fn site(path: &str) -> LoraSite {
        LoraSite {
            component: "unet",
            path: path.into(),
            alias: None,
        }
    }

    #[test]
    fn merge_adds_scaled_product() {
        let mut set = LoraSet::new();
        let f = file(
            "a_b",
            host(vec![1.0, 2.0], vec![1, 2]),
            host(vec![3.0, 4.0], vec![2, 1]),
            Some(0.5),
        );
        set.push("t", f, 2.0);
        let mut w = host(vec![0.0; 4], vec![2, 2]);
        assert!(set.touches(&site("a.b")));
        assert!(!set.touches(&site("a.c")));
        set.merge_into(&site("a.b"), &mut w).unwrap();
        // scale = 2 · 0.5 / 1 = 1; up·down = [[3, 6], [4, 8]].
        assert_eq!(w.data, vec![3.0, 6.0, 4.0, 8.0]);
        set.check_claimed().unwrap();
    }

    /// Two linear layers and a convolution, as a loader under a LoRA component builds them.
    struct Net {
        a: Linear<Cpu>,
        b: Linear<Cpu>,
        c: Conv2d<Cpu>,
    }

    impl Layers<Cpu> for Net {
        fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, Cpu>)) {
            self.a.visit_layers(f);
            self.b.visit_layers(f);
            self.c.visit_layers(f);
        }
    }

    /// Layer weights as the host sees them (`[out, …]`).
    fn weights(net: &Net) -> Vec<Vec<f32>> {
        let lin = |l: &Linear<Cpu>| {
            let [i, o] = l.weight.dims();
            transpose(&download(l.weight.clone()).unwrap(), i, o).data
        };
        vec![
            lin(&net.a),
            lin(&net.b),
            download(net.c.weight.clone()).unwrap().data,
        ]
    }

    fn fresh(set: &mut LoraSet, base: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let shapes = [vec![3, 2], vec![2, 3], vec![2, 1, 1, 1]];
        let names = ["a", "b", "c"];
        (0..3)
            .map(|i| {
                let mut w = host(base[i].clone(), shapes[i].clone());
                set.merge_into(&site(names[i]), &mut w).unwrap();
                w.data
            })
            .collect()
    }

    fn slot<const D: usize>(p: &str) -> Option<LoraSlot<Cpu, D>> {
        Some(LoraSlot {
            site: Arc::new(site(p)),
            base: None,
        })
    }

    #[test]
    fn a_switch_in_place_equals_a_fresh_merge_and_restores_the_base() {
        let device = Default::default();
        let base = vec![
            vec![0.5, -1.0, 2.0, 0.25, -0.75, 1.5],
            vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0],
            vec![0.125, -0.5],
        ];
        let linear = |w: &[f32], out: usize, inp: usize, p: &str| Linear {
            weight: upload::<Cpu, 2>(
                transpose(&host(w.to_vec(), vec![out, inp]), out, inp),
                &device,
                DType::F32,
            ),
            bias: None,
            lora: slot(p),
        };
        let mut net = Net {
            a: linear(&base[0], 3, 2, "a"),
            b: linear(&base[1], 2, 3, "b"),
            c: Conv2d {
                weight: upload::<Cpu, 4>(
                    host(base[2].clone(), vec![2, 1, 1, 1]),
                    &device,
                    DType::F32,
                ),
                bias: None,
                stride: 1,
                padding: 0,
                lora: slot("c"),
            },
        };
        let on_a = file(
            "a",
            host(vec![1.0, -2.0], vec![1, 2]),
            host(vec![0.5, 1.0, -1.0], vec![3, 1]),
            None,
        );
        let on_c = file(
            "c",
            host(vec![3.0], vec![1, 1, 1, 1]),
            host(vec![1.0, 2.0], vec![2, 1, 1, 1]),
            Some(2.0),
        );
        let set = |loras: &[(&Arc<LoraFile>, f32)]| {
            let mut s = LoraSet::new();
            for (f, strength) in loras {
                s.push("t", (*f).clone(), *strength);
            }
            s
        };

        // A and C on: only those layers change, and equal a fresh merge of the base.
        let changed = switch::<Cpu>(&mut [&mut net], set(&[(&on_a, 0.8), (&on_c, 1.0)])).unwrap();
        assert_eq!(changed, 2);
        assert_eq!(
            weights(&net),
            fresh(&mut set(&[(&on_a, 0.8), (&on_c, 1.0)]), &base)
        );
        assert_ne!(weights(&net)[0], base[0]);
        assert_eq!(weights(&net)[1], base[1]);

        // Only C at another strength: A back to its base exactly, C from its base, not stacked.
        switch::<Cpu>(&mut [&mut net], set(&[(&on_c, -0.5)])).unwrap();
        assert_eq!(weights(&net), fresh(&mut set(&[(&on_c, -0.5)]), &base));
        assert_eq!(weights(&net)[0], base[0]);

        // A LoRA that does not fit its layer: refused, and nothing changes.
        let misfit = file(
            "b",
            host(vec![1.0, 1.0], vec![1, 2]),
            host(vec![1.0, 1.0], vec![2, 1]),
            None,
        );
        let before = weights(&net);
        let err = switch::<Cpu>(&mut [&mut net], set(&[(&on_a, 1.0), (&misfit, 1.0)])).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        assert_eq!(weights(&net), before);

        // A LoRA for a module the net lacks: refused, nothing changes.
        let stray = file(
            "zz",
            host(vec![1.0], vec![1, 1]),
            host(vec![1.0], vec![1, 1]),
            None,
        );
        let err = switch::<Cpu>(&mut [&mut net], set(&[(&on_a, 1.0), (&stray, 1.0)])).unwrap_err();
        assert!(err.to_string().contains("match nothing"), "{err}");
        assert_eq!(weights(&net), before);

        // Off: every layer is its base again, and no base is kept.
        switch::<Cpu>(&mut [&mut net], LoraSet::new()).unwrap();
        assert_eq!(weights(&net), base);
        assert!(net.a.lora.as_ref().unwrap().base.is_none());
        assert!(net.c.lora.as_ref().unwrap().base.is_none());
    }

    #[test]
    fn decoded_files_are_cached_until_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.safetensors");
        let write = |rank: usize| {
            crate::tools::write_f32(
                &path,
                vec![
                    (
                        "lora_unet_a.lora_down.weight".into(),
                        host(vec![1.0; 2 * rank], vec![rank, 2]),
                    ),
                    (
                        "lora_unet_a.lora_up.weight".into(),
                        host(vec![1.0; 3 * rank], vec![3, rank]),
                    ),
                ],
            )
            .unwrap();
        };
        write(1);
        let first = cached("l", &path).unwrap();
        assert!(
            Arc::ptr_eq(&first, &cached("l", &path).unwrap()),
            "read once"
        );
        write(2); // another size: read again
        let second = cached("l", &path).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.pairs.values().next().unwrap().down.shape, vec![2, 2]);
    }
}

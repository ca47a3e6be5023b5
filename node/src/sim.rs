//! `BACKEND=sim`: a simulated [`Renderer`] for scheduler tests, demos and load benchmarks.
//!
//! It runs no model. Each step sleeps `SIM_STEP_MS`; the image is a deterministic pattern derived
//! from the prompt and seed (same prompt + seed + size → same bytes; a source image is blended
//! in at the job's strength, where its mask is white), and its PNG metadata says it is
//! simulated. The factory never picks it on its own: it runs only when `BACKEND=sim` is set.
//! A batch ([`Renderer::render_batch`]) spends the steps of one job, as a GPU's batched call
//! roughly does, and draws each job's own image.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{NodeError, Result};
use crate::render::{Image, Params, Renderer};
use crate::residency::{Lease, Models};

/// The simulated backend.
pub struct SimRenderer {
    step: Duration,
    models: Option<Arc<Models<()>>>,
}

impl SimRenderer {
    /// A renderer spending `step` per denoising step.
    pub fn new(step: Duration) -> Self {
        Self { step, models: None }
    }

    /// The same, with a simulated catalogue (`SIM_MODELS`): each job holds a copy of its model,
    /// loaded (a sleep of `SIM_LOAD_MS`) under the memory budget as a real node's are.
    pub fn with_models(mut self, models: Arc<Models<()>>) -> Self {
        self.models = Some(models);
        self
    }

    /// The job's model checked out for the render, when the node has a catalogue.
    fn hold(&self, params: &Params) -> Result<Option<Lease<'_, ()>>> {
        self.models
            .as_ref()
            .map(|m| m.check_out(m.index_of(&params.model)?, |_| true))
            .transpose()
    }
}

impl Renderer for SimRenderer {
    fn backend(&self) -> &'static str {
        "sim"
    }

    fn simulated(&self) -> bool {
        true
    }

    fn render(
        &mut self,
        params: &Params,
        mut step: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Image> {
        let _model = self.hold(params)?;
        let mut rgb = pattern(params)?;
        if let Some(source) = &params.source {
            blend_source(
                &mut rgb,
                &source.fit(params.width, params.height)?,
                source.strength,
            );
        }
        for k in 1..=params.steps {
            std::thread::sleep(self.step);
            if step(k, params.steps).is_break() {
                return Err(NodeError::Cancelled);
            }
        }
        Ok(Image {
            width: params.width,
            height: params.height,
            rgb,
            truncated_tokens: 0,
        })
    }

    fn render_batch(
        &mut self,
        jobs: &[Params],
        mut step: impl FnMut(usize, usize) -> ControlFlow<()>,
        live: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Image>>> {
        // One key: the first job's model is every job's.
        let _model = match jobs.first() {
            Some(first) => self.hold(first)?,
            None => None,
        };
        let images = jobs
            .iter()
            .map(|p| {
                Ok(Image {
                    width: p.width,
                    height: p.height,
                    rgb: pattern(p)?,
                    truncated_tokens: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let steps = jobs.first().map_or(0, |p| p.steps);
        for k in 1..=steps {
            std::thread::sleep(self.step);
            if step(k, steps).is_break() {
                return Err(NodeError::Cancelled);
            }
        }
        Ok(images
            .into_iter()
            .enumerate()
            .map(|(i, image)| live(i).then_some(image))
            .collect())
    }
}

/// What a simulated img2img job draws: the pattern over the source image at `strength`
/// (0 keeps the source), only where the mask is white when there is one.
fn blend_source(rgb: &mut [u8], source: &crate::render::Fitted, strength: f64) {
    let s = strength.clamp(0.0, 1.0) as f32;
    for (i, (out, src)) in rgb.chunks_mut(3).zip(source.rgb.chunks(3)).enumerate() {
        let weight = match &source.mask {
            None => 1.0,
            Some(m) if source.soft => m.get(i).map_or(0.0, |&v| f32::from(v) / 255.0),
            Some(m) => {
                if m.get(i).is_some_and(|&v| v >= 128) {
                    1.0
                } else {
                    0.0
                }
            }
        };
        let k = s * weight;
        for (o, &v) in out.iter_mut().zip(src) {
            *o = (f32::from(*o) * k + f32::from(v) * (1.0 - k)).round() as u8;
        }
    }
}

/// FNV-1a, then splitmix64: a stable hash that does not depend on the Rust version.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The simulated image for `params`: RGB bytes, row by row.
fn pattern(params: &Params) -> Result<Vec<u8>> {
    let (w, h) = (params.width, params.height);
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return Err(NodeError::InvalidJob(format!(
            "size {w}x{h} is outside 1..=4096"
        )));
    }
    let (w, h) = (w as u32, h as u32);
    let mut rng = SplitMix(stable_hash(&[
        params.prompt.as_bytes(),
        &params.seed.to_le_bytes(),
    ]));
    let base = [rng.unit(), rng.unit(), rng.unit()];
    let blobs: Vec<([f32; 2], f32, [f32; 3])> = (0..6)
        .map(|_| {
            let centre = [rng.unit(), rng.unit()];
            let radius = 0.08 + 0.25 * rng.unit();
            (centre, radius, [rng.unit(), rng.unit(), rng.unit()])
        })
        .collect();
    // The colour is computed per cell of 1/8 of the shorter side and each cell filled
    // with it: a mosaic of soft blobs, as cheap to compute and to compress at 64² as at 1024²
    // (load tests run thousands of these a second on the same cores as the coordinator).
    let cell = (w.min(h) / 8).max(1);
    let (cols_n, rows_n) = (w.div_ceil(cell), h.div_ceil(cell));
    // Each blob's weight exp(-(du² + dv²)/r²) factors into a row term and a column term, so the
    // exponentials are computed once per cell row and cell column (for every blob), not per cell.
    let weights = |cells: u32, len: u32, axis: usize| -> Vec<Vec<f32>> {
        (0..cells)
            .map(|i| {
                let at = ((i * cell) as f32 + cell as f32 / 2.0) / len as f32;
                blobs
                    .iter()
                    .map(|(centre, radius, _)| {
                        let d = at - centre[axis];
                        (-d * d / (radius * radius)).exp()
                    })
                    .collect()
            })
            .collect()
    };
    let rows = weights(rows_n, h, 1);
    let cols = weights(cols_n, w, 0);
    let (wu, hu, cell_u) = (w as usize, h as usize, cell as usize);
    let mut pixels = Vec::with_capacity(wu * hu * 3);
    let mut line = Vec::with_capacity(wu * 3);
    for (cy, row_w) in rows.iter().enumerate() {
        let v = ((cy * cell_u) as f32 + cell as f32 / 2.0) / h as f32;
        line.clear();
        for (cx, col_w) in cols.iter().enumerate() {
            let u = ((cx * cell_u) as f32 + cell as f32 / 2.0) / w as f32;
            let mut c = [
                base[0] * (1.0 - v),
                base[1] * (0.5 + 0.5 * u),
                base[2] * (0.3 + 0.7 * v),
            ];
            for ((ry, cx_w), (_, _, colour)) in row_w.iter().zip(col_w).zip(&blobs) {
                let k = ry * cx_w;
                for (ch, col) in c.iter_mut().zip(colour) {
                    *ch = *ch * (1.0 - k) + col * k;
                }
            }
            let rgb = c.map(|ch| (ch.clamp(0.0, 1.0) * 255.0) as u8);
            let width = cell_u.min(wu - cx * cell_u);
            for _ in 0..width {
                line.extend_from_slice(&rgb);
            }
        }
        let height = cell_u.min(hu - cy * cell_u);
        for _ in 0..height {
            pixels.extend_from_slice(&line);
        }
    }
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{CancelFlag, Progress, RunJob, Worker};

    fn params(prompt: &str, seed: u64) -> Params {
        Params {
            prompt: prompt.into(),
            model: String::new(),
            negative_prompt: String::new(),
            width: 64,
            height: 48,
            steps: 2,
            guidance: 1.0,
            guidance_rescale: 0.0,
            sampler: None,
            schedule: crate::sampling::SigmaSchedule::Automatic,
            seed,
            loras: Vec::new(),
            source: None,
        }
    }

    /// The PNG a sim worker answers for `params`, and the steps it reported.
    fn render_png(params: Params) -> Result<(Vec<u8>, Vec<Progress>)> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let rendered = actix_rt::System::new().block_on(async move {
            let addr = Worker::start(1, "sim-sd15", |_| SimRenderer::new(Duration::ZERO));
            let job = RunJob {
                params,
                progress: tx.into(),
                cancel: CancelFlag::default(),
                span: tracing::Span::none(),
                upscale: None,
            };
            addr.send(job)
                .await
                .unwrap_or_else(|e| Err(NodeError::Render(e.to_string())))
        })?;
        let mut steps = Vec::new();
        while let Ok(p) = rx.try_recv() {
            steps.push(p);
        }
        Ok((rendered.png, steps))
    }

    #[test]
    fn images_are_deterministic_per_prompt_and_seed() {
        let (a, steps) = render_png(params("a red fox", 7)).unwrap();
        assert_eq!(
            steps,
            vec![
                Progress { step: 1, total: 2 },
                Progress { step: 2, total: 2 }
            ]
        );
        assert_eq!(a, render_png(params("a red fox", 7)).unwrap().0);
        assert_ne!(a, render_png(params("a red fox", 8)).unwrap().0);
        assert_ne!(a, render_png(params("a blue fox", 7)).unwrap().0);
        let decoder = png::Decoder::new(std::io::Cursor::new(a));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (64, 48));
        let texts: Vec<_> = info
            .utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap()))
            .collect();
        assert!(
            texts.contains(&("seed".to_string(), "7".to_string())),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|(k, v)| k == "Software" && v.contains("simulated")),
            "{texts:?}"
        );
    }

    #[test]
    fn absurd_sizes_are_refused_not_panicked() {
        let mut p = params("x", 1);
        p.width = 0;
        assert!(matches!(render_png(p), Err(NodeError::InvalidJob(_))));
    }
}

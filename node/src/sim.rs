//! `BACKEND=sim`: a simulated worker for scheduler tests, demos and load benchmarks.
//!
//! It runs no model. Each step sleeps `SIM_STEP_MS`; the image is a deterministic pattern derived
//! from the prompt and seed (same prompt + seed + size → same bytes), and its PNG metadata says it is
//! simulated. The factory never picks it on its own: it runs only when `BACKEND=sim` is set.

use std::time::{Duration, Instant};

use actix::{Actor, Handler, SyncContext};
use drover_shared::proto;

use crate::error::{NodeError, Result};
use crate::worker::{Progress, Rendered, RunJob};

/// A simulated worker actor.
pub struct SimWorker {
    step: Duration,
}

impl SimWorker {
    /// A worker spending `step` per denoising step.
    pub fn new(step: Duration) -> Self {
        Self { step }
    }
}

impl Actor for SimWorker {
    type Context = SyncContext<Self>;
}

impl Handler<RunJob> for SimWorker {
    type Result = Result<Rendered>;

    fn handle(&mut self, job: RunJob, _: &mut SyncContext<Self>) -> Self::Result {
        let _span = job.span.clone().entered();
        let started = Instant::now();
        let total = job.spec.steps;
        for step in 1..=total {
            if job.cancel.is_cancelled() {
                return Err(NodeError::Cancelled);
            }
            std::thread::sleep(self.step);
            job.progress.send(Progress { step, total });
        }
        let png = render_png(&job.spec)?;
        Ok(Rendered {
            png,
            elapsed: started.elapsed(),
        })
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

/// The simulated image for `spec`: RGB bytes, row by row.
fn pattern(spec: &proto::JobSpec) -> Result<Vec<u8>> {
    let (w, h) = (spec.width, spec.height);
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return Err(NodeError::InvalidJob(format!(
            "size {w}x{h} is outside 1..=4096"
        )));
    }
    let mut rng = SplitMix(stable_hash(&[
        spec.prompt.as_bytes(),
        &spec.seed.to_le_bytes(),
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

/// Renders the simulated image for `spec` as PNG bytes.
pub fn render_png(spec: &proto::JobSpec) -> Result<Vec<u8>> {
    let pixels = pattern(spec)?;
    let (w, h) = (spec.width, spec.height);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let text = [
        (
            "Software",
            "drover sim backend: simulated image, no diffusion model was run".to_string(),
        ),
        ("prompt", spec.prompt.clone()),
        ("seed", spec.seed.to_string()),
        ("steps", spec.steps.to_string()),
        ("size", format!("{w}x{h}")),
    ];
    for (key, value) in text {
        encoder
            .add_itxt_chunk(key.to_string(), value)
            .map_err(|e| NodeError::Render(e.to_string()))?;
    }
    let mut writer = encoder
        .write_header()
        .map_err(|e| NodeError::Render(e.to_string()))?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| NodeError::Render(e.to_string()))?;
    writer
        .finish()
        .map_err(|e| NodeError::Render(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prompt: &str, seed: u64) -> proto::JobSpec {
        proto::JobSpec {
            prompt: prompt.into(),
            width: 64,
            height: 48,
            steps: 2,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn images_are_deterministic_per_prompt_and_seed() {
        let a = render_png(&spec("a red fox", 7)).unwrap();
        assert_eq!(a, render_png(&spec("a red fox", 7)).unwrap());
        assert_ne!(a, render_png(&spec("a red fox", 8)).unwrap());
        assert_ne!(a, render_png(&spec("a blue fox", 7)).unwrap());
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
                .any(|(k, v)| k == "Software" && v.contains("simulated"))
        );
    }

    #[test]
    fn absurd_sizes_are_refused_not_panicked() {
        let mut s = spec("x", 1);
        s.width = 0;
        assert!(matches!(render_png(&s), Err(NodeError::InvalidJob(_))));
    }
}

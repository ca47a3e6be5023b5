//! A fake RKNN runtime for tests: implements [`RknnApi`] the way the NPU runtime behaves at the
//! C boundary. A fake `.rknn` file is JSON describing the network (`kind`, its input and output
//! attributes, dynamic shapes); the fake interprets every input buffer in the layout and type
//! the call declares, refuses buffers that do not fit the model (as the runtime does, with
//! `RKNN_ERR_INPUT_INVALID`), computes simple deterministic outputs, and records every call
//! with its thread so tests can check order, shapes, layouts, core masks and thread ownership.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::thread::ThreadId;

use serde::Deserialize;
use serde_json::json;

use super::api::{
    ContextHandle, CoreMask, InputBuffer, RknnApi, SdkVersion, TensorAttr, TensorFormat, TensorType,
};
use super::model::{nchw_to_nhwc, nhwc_to_nchw};

/// One recorded runtime call.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// `rknn_init` of a network.
    Init(String),
    /// `rknn_set_core_mask`.
    SetCoreMask(String, CoreMask),
    /// `rknn_set_input_shapes` with these dims per input.
    SetInputShapes(String, Vec<Vec<u32>>),
    /// `rknn_inputs_set`.
    InputsSet(String),
    /// `rknn_run`.
    Run(String),
    /// `rknn_outputs_get`.
    OutputsGet(String),
    /// `rknn_destroy`.
    Destroy(String),
}

/// An input buffer as the fake received it, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Fed {
    /// Network kind.
    pub kind: String,
    /// Input name.
    pub name: String,
    /// Type declared by the caller.
    pub dtype: TensorType,
    /// Layout declared by the caller.
    pub format: TensorFormat,
    /// Values in the declared layout.
    pub values: Vec<f64>,
}

#[derive(Clone, Debug, Deserialize)]
struct AttrSpec {
    name: String,
    dims: Vec<u32>,
    format: String,
    dtype: String,
}

#[derive(Clone, Debug, Deserialize)]
struct NetSpec {
    kind: String,
    inputs: Vec<AttrSpec>,
    outputs: Vec<AttrSpec>,
    /// Per input, the dynamic shapes (empty: static).
    #[serde(default)]
    shapes: Vec<Vec<Vec<u32>>>,
}

fn format(s: &str) -> TensorFormat {
    match s {
        "nchw" => TensorFormat::Nchw,
        "nhwc" => TensorFormat::Nhwc,
        _ => TensorFormat::Undefined,
    }
}

fn dtype(s: &str) -> TensorType {
    match s {
        "f32" => TensorType::F32,
        "f16" => TensorType::F16,
        "i32" => TensorType::I32,
        "i64" => TensorType::I64,
        "i8" => TensorType::I8,
        other => panic!("fake dtype {other}"),
    }
}

fn attr(i: usize, a: &AttrSpec) -> TensorAttr {
    TensorAttr {
        index: i as u32,
        name: a.name.clone(),
        dims: a.dims.clone(),
        format: format(&a.format),
        dtype: dtype(&a.dtype),
        n_elems: a.dims.iter().product(),
    }
}

struct Context {
    spec: NetSpec,
    inputs: Vec<TensorAttr>,
    /// The outputs as the model was converted (what `RKNN_QUERY_OUTPUT_ATTR` answers).
    converted: Vec<TensorAttr>,
    /// The outputs at the current input shapes (`RKNN_QUERY_CURRENT_OUTPUT_ATTR`).
    outputs: Vec<TensorAttr>,
    fed: Vec<Option<Vec<f64>>>,
    result: Option<Vec<Vec<f32>>>,
    thread: ThreadId,
}

/// The fake runtime.
#[derive(Default)]
pub struct FakeRknn {
    contexts: Mutex<HashMap<ContextHandle, Context>>,
    calls: Mutex<Vec<(ThreadId, Call)>>,
    fed: Mutex<Vec<Fed>>,
    next: Mutex<ContextHandle>,
    /// `(call, kind, code)`: that call on that network returns `code`.
    pub fail: Mutex<Option<(&'static str, String, i32)>>,
}

impl FakeRknn {
    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Every call so far with the thread that made it.
    pub fn calls_with_threads(&self) -> Vec<(ThreadId, Call)> {
        self.calls.lock().unwrap().clone()
    }

    /// Every input buffer received so far.
    pub fn fed(&self) -> Vec<Fed> {
        self.fed.lock().unwrap().clone()
    }

    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap()
            .push((std::thread::current().id(), call));
    }

    fn failing(&self, call: &str, kind: &str) -> Option<i32> {
        match &*self.fail.lock().unwrap() {
            Some((c, k, code)) if *c == call && k == kind => Some(*code),
            _ => None,
        }
    }

    fn with<T>(&self, ctx: ContextHandle, f: impl FnOnce(&mut Context) -> T) -> Result<T, i32> {
        let mut all = self.contexts.lock().unwrap();
        let c = all.get_mut(&ctx).ok_or(-7)?;
        assert_eq!(
            c.thread,
            std::thread::current().id(),
            "a context was used from a thread other than the one that created it"
        );
        Ok(f(c))
    }

    fn kind(&self, ctx: ContextHandle) -> String {
        self.with(ctx, |c| c.spec.kind.clone()).unwrap_or_default()
    }
}

fn decode(input: &InputBuffer<'_>) -> Option<Vec<f64>> {
    let b = input.data;
    Some(match input.dtype {
        TensorType::F32 => b
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        TensorType::I32 => b
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        TensorType::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        _ => return None,
    })
}

fn width(t: TensorType) -> usize {
    match t {
        TensorType::I64 => 8,
        _ => 4,
    }
}

/// The values of a 4-D attr's tensor in NCHW, given them in the attr's layout.
fn to_nchw(values: &[f64], attr: &TensorAttr) -> Vec<f64> {
    let d: Vec<usize> = attr.dims.iter().map(|&x| x as usize).collect();
    if attr.format == TensorFormat::Nhwc {
        nhwc_to_nchw(values, [d[0], d[1], d[2], d[3]])
    } else {
        values.to_vec()
    }
}

/// NCHW values `[n, c, h, w]` written in `attr`'s layout.
fn from_nchw(values: Vec<f32>, attr: &TensorAttr, nchw: [usize; 4]) -> Vec<f32> {
    if attr.format == TensorFormat::Nhwc {
        nchw_to_nhwc(&values, nchw)
    } else {
        values
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl Context {
    fn input(&self, name: &str) -> (&TensorAttr, &[f64]) {
        let i = self
            .inputs
            .iter()
            .position(|a| a.name == name)
            .unwrap_or_else(|| panic!("fake {} has no input {name}", self.spec.kind));
        (&self.inputs[i], self.fed[i].as_deref().unwrap_or(&[]))
    }

    fn compute(&self) -> Vec<Vec<f32>> {
        let out = &self.outputs[0];
        match self.spec.kind.as_str() {
            "text" => {
                let (_, ids) = self.input("input_ids");
                let d = out.dims[2] as usize;
                let mut v = Vec::with_capacity(77 * d);
                for id in ids {
                    for k in 0..d {
                        v.push((id * 1e-3 + k as f64 * 1e-4) as f32);
                    }
                }
                // Every further output (the pooled embedding) is the first token's row.
                let mut outs = vec![v.clone()];
                for o in &self.outputs[1..] {
                    outs.push(v[..o.n_elems as usize].to_vec());
                }
                outs
            }
            "unet" => {
                let (sa, sample) = self.input("sample");
                let x = to_nchw(sample, sa);
                let (_, t) = self.input("timestep");
                let (_, ctx) = self.input("encoder_hidden_states");
                let cond = if self.inputs.iter().any(|a| a.name == "timestep_cond") {
                    mean(self.input("timestep_cond").1)
                } else {
                    0.0
                };
                let nchw = expected_nchw(sa);
                let hw = nchw[2] * nchw[3];
                let base = 1e-3 * mean(ctx) + 1e-6 * t[0] + 1e-3 * cond;
                let eps: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (0.5 * v + 0.01 * ((i / hw) % nchw[1]) as f64 + base) as f32)
                    .collect();
                vec![from_nchw(eps, out, nchw)]
            }
            "vae" => {
                let (la, latent) = self.input("latent_sample");
                let z = to_nchw(latent, la);
                let [_, c, h, w] = expected_nchw(la);
                let on = expected_nchw(out);
                let (oh, ow) = (on[2], on[3]);
                let f = oh / h;
                let mut img = Vec::with_capacity(3 * oh * ow);
                for k in 0..3 {
                    for y in 0..oh {
                        for x in 0..ow {
                            img.push(z[((k % c) * h + y / f) * w + x / f].tanh() as f32);
                        }
                    }
                }
                vec![from_nchw(img, out, on)]
            }
            "vae_encoder" => {
                // Moments: each latent channel the mean of an image channel over its f×f cell,
                // then log-variances of -20.
                let name = self.inputs[0].name.clone();
                let (ia, values) = self.input(&name);
                let x = to_nchw(values, ia);
                let [_, _, h, w] = expected_nchw(ia);
                let on = expected_nchw(out);
                let (c, lh, lw) = (on[1], on[2], on[3]);
                let f = h / lh;
                let mut z = Vec::with_capacity(c * lh * lw);
                for k in 0..c {
                    for y in 0..lh {
                        for xx in 0..lw {
                            if k >= c / 2 {
                                z.push(-20.0);
                                continue;
                            }
                            let mut sum = 0.0;
                            for dy in 0..f {
                                for dx in 0..f {
                                    sum += x[((k % 3) * h + y * f + dy) * w + xx * f + dx];
                                }
                            }
                            z.push((sum / (f * f) as f64) as f32);
                        }
                    }
                }
                vec![from_nchw(z, out, on)]
            }
            "sr" => {
                // Nearest upscaling blended with each input pixel's 3×3 mean (zeros outside the
                // tile, as a convolution pads): context matters, as in a real network.
                let name = self.inputs[0].name.clone();
                let (ia, values) = self.input(&name);
                let x = to_nchw(values, ia);
                let [_, c, h, w] = expected_nchw(ia);
                let on = expected_nchw(out);
                let f = on[2] / h;
                let at = |k: usize, y: isize, xx: isize| {
                    if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                        0.0
                    } else {
                        x[(k * h + y as usize) * w + xx as usize]
                    }
                };
                let mut img = Vec::with_capacity(c * on[2] * on[3]);
                for k in 0..c {
                    for oy in 0..on[2] {
                        for ox in 0..on[3] {
                            let (y, xx) = ((oy / f) as isize, (ox / f) as isize);
                            let mut sum = 0.0;
                            for dy in -1..=1 {
                                for dx in -1..=1 {
                                    sum += at(k, y + dy, xx + dx);
                                }
                            }
                            img.push((0.5 * at(k, y, xx) + 0.5 * sum / 9.0) as f32);
                        }
                    }
                }
                vec![from_nchw(img, out, on)]
            }
            other => panic!("fake kind {other}"),
        }
    }
}

/// The NCHW dims of a 4-D attr.
fn expected_nchw(a: &TensorAttr) -> [usize; 4] {
    let d: Vec<usize> = a.dims.iter().map(|&x| x as usize).collect();
    if a.format == TensorFormat::Nhwc {
        [d[0], d[3], d[1], d[2]]
    } else {
        [d[0], d[1], d[2], d[3]]
    }
}

impl RknnApi for FakeRknn {
    fn init(&self, model: &mut [u8]) -> Result<ContextHandle, i32> {
        let Ok(spec) = serde_json::from_slice::<NetSpec>(model) else {
            self.record(Call::Init("?".into()));
            return Err(-6);
        };
        self.record(Call::Init(spec.kind.clone()));
        if let Some(code) = self.failing("init", &spec.kind) {
            return Err(code);
        }
        let mut next = self.next.lock().unwrap();
        *next += 1;
        let inputs: Vec<TensorAttr> = spec
            .inputs
            .iter()
            .enumerate()
            .map(|(i, a)| attr(i, a))
            .collect();
        let outputs: Vec<TensorAttr> = spec
            .outputs
            .iter()
            .enumerate()
            .map(|(i, a)| attr(i, a))
            .collect();
        self.contexts.lock().unwrap().insert(
            *next,
            Context {
                fed: vec![None; inputs.len()],
                inputs,
                converted: outputs.clone(),
                outputs,
                spec,
                result: None,
                thread: std::thread::current().id(),
            },
        );
        Ok(*next)
    }

    fn destroy(&self, ctx: ContextHandle) -> i32 {
        let kind = self.kind(ctx);
        self.record(Call::Destroy(kind));
        match self.contexts.lock().unwrap().remove(&ctx) {
            Some(_) => 0,
            None => -7,
        }
    }

    fn sdk_version(&self, ctx: ContextHandle) -> Result<SdkVersion, i32> {
        self.with(ctx, |_| SdkVersion {
            api: "2.3.0 (fake)".into(),
            driver: "0.9.8 (fake)".into(),
        })
    }

    fn io_num(&self, ctx: ContextHandle) -> Result<(u32, u32), i32> {
        self.with(ctx, |c| (c.inputs.len() as u32, c.outputs.len() as u32))
    }

    fn input_attr(&self, ctx: ContextHandle, index: u32) -> Result<TensorAttr, i32> {
        self.with(ctx, |c| c.inputs.get(index as usize).cloned())?
            .ok_or(-5)
    }

    fn output_attr(
        &self,
        ctx: ContextHandle,
        index: u32,
        current: bool,
    ) -> Result<TensorAttr, i32> {
        // As the runtime: the plain query answers the shapes the model was converted with,
        // only the `CURRENT` one those of the shapes set last.
        self.with(ctx, |c| {
            let outputs = if current { &c.outputs } else { &c.converted };
            outputs.get(index as usize).cloned()
        })?
        .ok_or(-5)
    }

    fn input_shapes(&self, ctx: ContextHandle, index: u32) -> Result<Vec<Vec<u32>>, i32> {
        // Like the runtime, a static model answers the dynamic-range query with an error.
        self.with(ctx, |c| c.spec.shapes.get(index as usize).cloned())?
            .filter(|s| !s.is_empty())
            .ok_or(-5)
    }

    fn set_core_mask(&self, ctx: ContextHandle, mask: CoreMask) -> i32 {
        let kind = self.kind(ctx);
        self.record(Call::SetCoreMask(kind.clone(), mask));
        self.failing("set_core_mask", &kind).unwrap_or(0)
    }

    fn set_input_shapes(&self, ctx: ContextHandle, attrs: &[TensorAttr]) -> i32 {
        let kind = self.kind(ctx);
        self.record(Call::SetInputShapes(
            kind,
            attrs.iter().map(|a| a.dims.clone()).collect(),
        ));
        self.with(ctx, |c| {
            // A model converted with static shapes takes no shapes at all.
            if c.spec.shapes.iter().all(Vec::is_empty) {
                return -5;
            }
            for (i, a) in attrs.iter().enumerate() {
                let accepted = c.spec.shapes.get(i).is_some_and(|s| s.contains(&a.dims));
                if !accepted || a.index as usize != i {
                    return -5;
                }
            }
            for (i, a) in attrs.iter().enumerate() {
                c.inputs[i].dims = a.dims.clone();
                c.inputs[i].n_elems = a.n_elems;
            }
            // Outputs follow the inputs' spatial size (the networks here are size-preserving
            // up to a fixed factor).
            if let (Some(first_in), Some(spec_in)) = (c.inputs.first(), c.spec.inputs.first()) {
                let (new, old) = (expected_nchw(first_in), {
                    let a = attr(0, spec_in);
                    expected_nchw(&a)
                });
                for (o, spec_out) in c.outputs.iter_mut().zip(&c.spec.outputs) {
                    let base = attr(0, spec_out);
                    let mut d = expected_nchw(&base);
                    d[2] = d[2] * new[2] / old[2];
                    d[3] = d[3] * new[3] / old[3];
                    o.dims = if base.format == TensorFormat::Nhwc {
                        vec![d[0] as u32, d[2] as u32, d[3] as u32, d[1] as u32]
                    } else {
                        d.iter().map(|&x| x as u32).collect()
                    };
                    o.n_elems = o.dims.iter().product();
                }
            }
            0
        })
        .unwrap_or(-7)
    }

    fn inputs_set(&self, ctx: ContextHandle, inputs: &[InputBuffer<'_>]) -> i32 {
        let kind = self.kind(ctx);
        self.record(Call::InputsSet(kind.clone()));
        let mut fed = Vec::new();
        let code = self
            .with(ctx, |c| {
                if inputs.len() != c.inputs.len() {
                    return -8;
                }
                for input in inputs {
                    let Some(a) = c.inputs.get(input.index as usize) else {
                        return -8;
                    };
                    let four_d = a.dims.len() == 4;
                    let layout_ok = if four_d {
                        input.format == a.format
                    } else {
                        input.format == TensorFormat::Undefined
                    };
                    let type_ok = if a.dtype.is_integer_input() {
                        input.dtype == a.dtype
                    } else {
                        input.dtype == TensorType::F32
                    };
                    if !layout_ok
                        || !type_ok
                        || input.data.len() != a.n_elems as usize * width(input.dtype)
                    {
                        return -8;
                    }
                    let Some(values) = decode(input) else {
                        return -8;
                    };
                    fed.push(Fed {
                        kind: kind.clone(),
                        name: a.name.clone(),
                        dtype: input.dtype,
                        format: input.format,
                        values: values.clone(),
                    });
                    c.fed[input.index as usize] = Some(values);
                }
                0
            })
            .unwrap_or(-7);
        self.fed.lock().unwrap().extend(fed);
        code
    }

    fn run(&self, ctx: ContextHandle) -> i32 {
        let kind = self.kind(ctx);
        self.record(Call::Run(kind.clone()));
        if let Some(code) = self.failing("run", &kind) {
            return code;
        }
        self.with(ctx, |c| {
            if c.fed.iter().any(Option::is_none) {
                return -8;
            }
            c.result = Some(c.compute());
            0
        })
        .unwrap_or(-7)
    }

    fn outputs_get_f32(&self, ctx: ContextHandle, count: u32) -> Result<Vec<Vec<f32>>, i32> {
        let kind = self.kind(ctx);
        self.record(Call::OutputsGet(kind));
        let out = self.with(ctx, |c| c.result.take())?.ok_or(-9)?;
        Ok(out.into_iter().take(count as usize).collect())
    }
}

/// Writes a fake `.rknn` file describing a network.
pub fn write_net(path: &Path, spec: serde_json::Value) {
    std::fs::create_dir_all(path.parent().expect("a folder")).unwrap();
    std::fs::write(path, serde_json::to_vec(&spec).unwrap()).unwrap();
}

/// Adds a fake VAE encoder (`vae_encoder/model.rknn`, NCHW f16 image in, 8 moment channels
/// out) for square images of `size` to a model folder.
pub fn write_vae_encoder(dir: &Path, size: usize) {
    let l = size / 8;
    write_net(
        &dir.join("vae_encoder/model.rknn"),
        json!({"kind": "vae_encoder",
            "inputs": [{"name": "sample", "dims": [1, 3, size, size], "format": "nchw", "dtype": "f16"}],
            "outputs": [{"name": "latent", "dims": [1, 8, l, l], "format": "nchw", "dtype": "f16"}]}),
    );
}

/// A fake RK3588 SD1.5-LCM model folder as published: NHWC UNet and VAE inputs, an int64
/// timestep, an int32 text encoder, f16 weights; `sizes` lists the square image sizes (more
/// than one makes the UNet and VAE dynamic-shape models).
pub fn write_model_folder(dir: &Path, sizes: &[usize]) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15-lcm");
    for sub in ["tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for entry in std::fs::read_dir(fixtures.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let d = 768;
    write_net(
        &dir.join("text_encoder/model.rknn"),
        json!({"kind": "text",
            "inputs": [{"name": "input_ids", "dims": [1, 77], "format": "undefined", "dtype": "i32"}],
            "outputs": [
                {"name": "last_hidden_state", "dims": [1, 77, d], "format": "undefined", "dtype": "f16"},
                {"name": "pooler_output", "dims": [1, d], "format": "undefined", "dtype": "f16"}]}),
    );
    let l = sizes[0] / 8;
    let dynamic = sizes.len() > 1;
    let unet_shapes: Vec<Vec<Vec<u32>>> = if dynamic {
        let per = |f: &dyn Fn(u32) -> Vec<u32>| sizes.iter().map(|s| f((s / 8) as u32)).collect();
        vec![
            per(&|l| vec![1, l, l, 4]),
            per(&|_| vec![1]),
            per(&|_| vec![1, 77, d]),
            per(&|_| vec![1, 256]),
        ]
    } else {
        Vec::new()
    };
    write_net(
        &dir.join("unet/model.rknn"),
        json!({"kind": "unet",
            "inputs": [
                {"name": "sample", "dims": [1, l, l, 4], "format": "nhwc", "dtype": "f16"},
                {"name": "timestep", "dims": [1], "format": "undefined", "dtype": "i64"},
                {"name": "encoder_hidden_states", "dims": [1, 77, d], "format": "undefined", "dtype": "f16"},
                {"name": "timestep_cond", "dims": [1, 256], "format": "undefined", "dtype": "f16"}],
            "outputs": [{"name": "out_sample", "dims": [1, 4, l, l], "format": "nchw", "dtype": "f16"}],
            "shapes": unet_shapes}),
    );
    let vae_shapes: Vec<Vec<Vec<u32>>> = if dynamic {
        vec![
            sizes
                .iter()
                .map(|s| vec![1, (s / 8) as u32, (s / 8) as u32, 4])
                .collect(),
        ]
    } else {
        Vec::new()
    };
    write_net(
        &dir.join("vae_decoder/model.rknn"),
        json!({"kind": "vae",
            "inputs": [{"name": "latent_sample", "dims": [1, l, l, 4], "format": "nhwc", "dtype": "f16"}],
            "outputs": [{"name": "sample", "dims": [1, 3, sizes[0], sizes[0]], "format": "nchw", "dtype": "f16"}],
            "shapes": vae_shapes}),
    );
    std::fs::write(
        dir.join("unet/config.json"),
        r#"{"in_channels": 4, "cross_attention_dim": 768, "time_cond_proj_dim": 256, "sample_size": 64}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("text_encoder/config.json"),
        r#"{"hidden_size": 768}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("vae_decoder/config.json"),
        r#"{"scaling_factor": 0.18215}"#,
    )
    .unwrap();
}

/// Turns a folder [`write_model_folder`] wrote for one `size` into a standard (non-LCM) model:
/// a UNet without `timestep_cond` and Stable Diffusion's own Euler scheduler config.
pub fn make_standard(dir: &Path, size: usize) {
    let (l, d) = (size / 8, 768);
    write_net(
        &dir.join("unet/model.rknn"),
        json!({"kind": "unet",
            "inputs": [
                {"name": "sample", "dims": [1, l, l, 4], "format": "nhwc", "dtype": "f16"},
                {"name": "timestep", "dims": [1], "format": "undefined", "dtype": "i64"},
                {"name": "encoder_hidden_states", "dims": [1, 77, d], "format": "undefined", "dtype": "f16"}],
            "outputs": [{"name": "out_sample", "dims": [1, 4, l, l], "format": "nchw", "dtype": "f16"}]}),
    );
    std::fs::write(
        dir.join("unet/config.json"),
        r#"{"in_channels": 4, "cross_attention_dim": 768, "sample_size": 64}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}"#,
    )
    .unwrap();
}

//! The safe wrapper over one RKNN context: load a `.rknn` file, learn its inputs and outputs,
//! pin it to an NPU core, and run it on host tensors in PyTorch's layout (NCHW), converting to
//! and from whatever layout the model's attributes say. Every runtime status becomes a
//! [`NodeError::Rknn`] naming the call and what the code means.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::api::{
    ContextHandle, CoreMask, InputBuffer, RknnApi, RknnStatus, SdkVersion, TensorAttr,
    TensorFormat, TensorType,
};
use crate::error::{NodeError, Result};

/// The error of runtime call `call` on the model at `path` returning `code`.
fn status_error(path: &Path, call: &'static str, code: i32) -> NodeError {
    NodeError::Rknn {
        call,
        model: path.display().to_string(),
        status: RknnStatus::from_code(code),
    }
}

/// Elements of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// Floats (latents, embeddings).
    F32(Vec<f32>),
    /// 64-bit integers (timesteps).
    I64(Vec<i64>),
    /// 32-bit integers (token ids).
    I32(Vec<i32>),
}

impl HostData {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::I32(v) => v.len(),
        }
    }
}

/// A tensor on the host, its dims in PyTorch's order (NCHW for 4-D).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Elements, row-major over `dims`.
    pub data: HostData,
}

impl HostTensor {
    /// A float tensor.
    pub fn f32(dims: &[usize], data: Vec<f32>) -> Self {
        Self {
            dims: dims.to_vec(),
            data: HostData::F32(data),
        }
    }

    /// The floats, or an error naming `what` when the tensor holds integers.
    pub fn into_f32(self, what: &str) -> Result<Vec<f32>> {
        match self.data {
            HostData::F32(v) => Ok(v),
            _ => Err(NodeError::Render(format!("{what}: expected floats"))),
        }
    }
}

/// `[n, c, h, w]` → `[n, h, w, c]`.
pub fn nchw_to_nhwc<T: Copy>(data: &[T], [n, c, h, w]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for b in 0..n {
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    out.push(data[((b * c + k) * h + y) * w + x]);
                }
            }
        }
    }
    out
}

/// `[n, h, w, c]` → `[n, c, h, w]`.
pub fn nhwc_to_nchw<T: Copy>(data: &[T], [n, h, w, c]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for b in 0..n {
        for k in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out.push(data[((b * h + y) * w + x) * c + k]);
                }
            }
        }
    }
    out
}

/// The dims of `attr` in PyTorch's order (NHWC attrs of 4-D tensors are permuted to NCHW).
pub fn logical_dims(attr: &TensorAttr) -> Vec<usize> {
    let d: Vec<usize> = attr.dims.iter().map(|&x| x as usize).collect();
    if attr.format == TensorFormat::Nhwc && d.len() == 4 {
        vec![d[0], d[3], d[1], d[2]]
    } else {
        d
    }
}

fn four(d: &[usize]) -> [usize; 4] {
    [d[0], d[1], d[2], d[3]]
}

fn describe(attr: &TensorAttr) -> String {
    format!(
        "{} {:?} {:?} {:?}",
        attr.name, attr.dims, attr.format, attr.dtype
    )
}

/// One loaded `.rknn` model: a runtime context owned by the thread that created it.
pub struct RknnModel {
    api: Arc<dyn RknnApi>,
    ctx: ContextHandle,
    path: PathBuf,
    inputs: Vec<TensorAttr>,
    outputs: Vec<TensorAttr>,
    /// Per input, every shape a dynamic-shape model accepts (empty when static).
    shapes: Vec<Vec<Vec<u32>>>,
    version: SdkVersion,
    core: CoreMask,
    /// Contexts are never shared or moved across threads.
    _one_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for RknnModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RknnModel")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("core", &self.core)
            .finish()
    }
}

impl RknnModel {
    /// Loads `path` into a new context pinned to `core` and queries its inputs and outputs.
    pub fn load(api: Arc<dyn RknnApi>, path: &Path, core: CoreMask) -> Result<Self> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))?;
        let ctx = api
            .init(&mut bytes)
            .map_err(|code| status_error(path, "rknn_init", code))?;
        drop(bytes);
        // From here the context is ours: dropping `model` on an error destroys it.
        let mut model = Self {
            api,
            ctx,
            path: path.to_path_buf(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            shapes: Vec::new(),
            version: SdkVersion {
                api: String::new(),
                driver: String::new(),
            },
            core,
            _one_thread: PhantomData,
        };
        model.version = model.checked("rknn_query(SDK_VERSION)", model.api.sdk_version(ctx))?;
        let (n_in, n_out) = model.checked("rknn_query(IN_OUT_NUM)", model.api.io_num(ctx))?;
        for i in 0..n_in {
            let attr = model.checked("rknn_query(INPUT_ATTR)", model.api.input_attr(ctx, i))?;
            // A model without dynamic shapes answers this query with an error: it is static.
            let shapes = model.api.input_shapes(ctx, i).unwrap_or_default();
            model.inputs.push(attr);
            model.shapes.push(shapes);
        }
        for i in 0..n_out {
            let attr = model.checked(
                "rknn_query(OUTPUT_ATTR)",
                model.api.output_attr(ctx, i, false),
            )?;
            model.outputs.push(attr);
        }
        if core != CoreMask::Auto {
            model.check("rknn_set_core_mask", model.api.set_core_mask(ctx, core))?;
        }
        tracing::info!(
            model = %path.display(),
            core = core.name(),
            inputs = ?model.inputs.iter().map(describe).collect::<Vec<_>>(),
            outputs = ?model.outputs.iter().map(describe).collect::<Vec<_>>(),
            api = %model.version.api,
            driver = %model.version.driver,
            "rknn model loaded"
        );
        Ok(model)
    }

    fn check(&self, call: &'static str, code: i32) -> Result<()> {
        match code {
            0 => Ok(()),
            code => Err(status_error(&self.path, call, code)),
        }
    }

    fn checked<T>(&self, call: &'static str, r: std::result::Result<T, i32>) -> Result<T> {
        r.map_err(|code| status_error(&self.path, call, code))
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The core this context runs on.
    pub fn core(&self) -> CoreMask {
        self.core
    }

    /// Runtime and driver versions.
    pub fn version(&self) -> &SdkVersion {
        &self.version
    }

    /// The input attributes, in input order.
    pub fn inputs(&self) -> &[TensorAttr] {
        &self.inputs
    }

    /// The output attributes, in output order.
    pub fn outputs(&self) -> &[TensorAttr] {
        &self.outputs
    }

    /// The position of the input called `name`, else `fallback` when the model has unnamed
    /// inputs; an error naming the model's inputs otherwise.
    pub fn input_index(&self, name: &str, fallback: usize) -> Result<usize> {
        if let Some(i) = self.inputs.iter().position(|a| a.name == name) {
            return Ok(i);
        }
        let named = self.inputs.iter().any(|a| !a.name.is_empty());
        if !named && fallback < self.inputs.len() {
            return Ok(fallback);
        }
        Err(NodeError::ModelConfig(format!(
            "{}: no input {name} (inputs: {})",
            self.path.display(),
            self.inputs
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }

    /// Every shape (PyTorch order) input `index` accepts: its dynamic shapes, or its one static
    /// shape.
    pub fn accepted_shapes(&self, index: usize) -> Vec<Vec<usize>> {
        let attr = &self.inputs[index];
        if self.shapes[index].is_empty() {
            return vec![logical_dims(attr)];
        }
        self.shapes[index]
            .iter()
            .map(|dims| {
                logical_dims(&TensorAttr {
                    dims: dims.clone(),
                    ..attr.clone()
                })
            })
            .collect()
    }

    /// Switches a dynamic-shape model to the shape set in which input `index` has `dims`
    /// (PyTorch order). A no-op when that is already the current shape; an error naming the
    /// accepted shapes when no set has it.
    pub fn select_shape(&mut self, index: usize, dims: &[usize]) -> Result<()> {
        if logical_dims(&self.inputs[index]) == dims {
            return Ok(());
        }
        let accepted = self.accepted_shapes(index);
        let Some(set) = accepted.iter().position(|s| s == dims) else {
            return Err(NodeError::InvalidJob(format!(
                "{} takes {} shaped {:?}, not {dims:?}",
                self.path.display(),
                self.inputs[index].name,
                accepted
            )));
        };
        let mut attrs = self.inputs.clone();
        for (i, attr) in attrs.iter_mut().enumerate() {
            if let Some(shape) = self.shapes[i].get(set) {
                attr.dims = shape.clone();
                attr.n_elems = shape.iter().product();
            }
        }
        self.check(
            "rknn_set_input_shapes",
            self.api.set_input_shapes(self.ctx, &attrs),
        )?;
        self.inputs = attrs;
        for i in 0..self.outputs.len() {
            self.outputs[i] = self.checked(
                "rknn_query(CURRENT_OUTPUT_ATTR)",
                self.api.output_attr(self.ctx, i as u32, true),
            )?;
        }
        Ok(())
    }

    /// Runs the model on one tensor per input (in input order, PyTorch layout) and returns every
    /// output as f32 in PyTorch layout.
    pub fn run(&mut self, feeds: &[HostTensor]) -> Result<Vec<HostTensor>> {
        if feeds.len() != self.inputs.len() {
            return Err(NodeError::Render(format!(
                "{}: {} inputs given, the model has {}",
                self.path.display(),
                feeds.len(),
                self.inputs.len()
            )));
        }
        let mut buffers: Vec<(u32, Vec<u8>, TensorType, TensorFormat)> =
            Vec::with_capacity(feeds.len());
        for (attr, feed) in self.inputs.iter().zip(feeds) {
            let want = logical_dims(attr);
            if feed.dims != want || feed.data.len() != want.iter().product::<usize>() {
                return Err(NodeError::Render(format!(
                    "{}: input {} is {:?} ({:?} as the model stores it), given {:?}",
                    self.path.display(),
                    attr.name,
                    want,
                    attr.dims,
                    feed.dims
                )));
            }
            let nhwc = attr.format == TensorFormat::Nhwc && want.len() == 4;
            let format = if want.len() == 4 {
                attr.format
            } else {
                TensorFormat::Undefined
            };
            let lay = |v: &[f32]| {
                if nhwc {
                    nchw_to_nhwc(v, four(&want))
                } else {
                    v.to_vec()
                }
            };
            let (bytes, dtype) = match (&feed.data, attr.dtype) {
                (HostData::F32(v), _) => (f32_bytes(&lay(v)), TensorType::F32),
                (HostData::I64(v), TensorType::I64) => (
                    v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
                    TensorType::I64,
                ),
                (HostData::I32(v), TensorType::I32) => (
                    v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
                    TensorType::I32,
                ),
                (HostData::I64(v), TensorType::I32) => (
                    v.iter().flat_map(|&x| (x as i32).to_ne_bytes()).collect(),
                    TensorType::I32,
                ),
                (HostData::I32(v), TensorType::I64) => (
                    v.iter().flat_map(|&x| i64::from(x).to_ne_bytes()).collect(),
                    TensorType::I64,
                ),
                (HostData::I64(v), t) if !t.is_integer_input() => {
                    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    (f32_bytes(&lay(&f)), TensorType::F32)
                }
                (HostData::I32(v), t) if !t.is_integer_input() => {
                    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    (f32_bytes(&lay(&f)), TensorType::F32)
                }
                (_, t) => {
                    return Err(NodeError::ModelConfig(format!(
                        "{}: input {} is {t:?}, which Drover cannot feed",
                        self.path.display(),
                        attr.name
                    )));
                }
            };
            buffers.push((attr.index, bytes, dtype, format));
        }
        let inputs: Vec<InputBuffer<'_>> = buffers
            .iter()
            .map(|(index, data, dtype, format)| InputBuffer {
                index: *index,
                data,
                dtype: *dtype,
                format: *format,
            })
            .collect();
        self.check("rknn_inputs_set", self.api.inputs_set(self.ctx, &inputs))?;
        self.check("rknn_run", self.api.run(self.ctx))?;
        let raw = self.checked(
            "rknn_outputs_get",
            self.api
                .outputs_get_f32(self.ctx, self.outputs.len() as u32),
        )?;
        if raw.len() != self.outputs.len() {
            return Err(NodeError::Render(format!(
                "{}: the runtime gave {} outputs, the model has {}",
                self.path.display(),
                raw.len(),
                self.outputs.len()
            )));
        }
        self.outputs
            .iter()
            .zip(raw)
            .map(|(attr, values)| {
                let stored: Vec<usize> = attr.dims.iter().map(|&d| d as usize).collect();
                if values.len() != stored.iter().product::<usize>() {
                    return Err(NodeError::Render(format!(
                        "{}: output {} has {} values, its shape {:?} needs {}",
                        self.path.display(),
                        attr.name,
                        values.len(),
                        attr.dims,
                        stored.iter().product::<usize>()
                    )));
                }
                let data = if attr.format == TensorFormat::Nhwc && stored.len() == 4 {
                    nhwc_to_nchw(&values, four(&stored))
                } else {
                    values
                };
                Ok(HostTensor::f32(&logical_dims(attr), data))
            })
            .collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

impl Drop for RknnModel {
    fn drop(&mut self) {
        let code = self.api.destroy(self.ctx);
        if code != 0 {
            tracing::warn!(model = %self.path.display(), status = %RknnStatus::from_code(code), "rknn_destroy failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let dims = [2, 3, 4, 5];
        let data: Vec<u32> = (0..120).collect();
        let nhwc = nchw_to_nhwc(&data, dims);
        // Element (b=1, c=2, y=3, x=4) sits at ((1*4+3)*5+4)*3+2 in NHWC.
        assert_eq!(
            nhwc[((4 + 3) * 5 + 4) * 3 + 2],
            data[((3 + 2) * 4 + 3) * 5 + 4]
        );
        assert_eq!(nhwc_to_nchw(&nhwc, [2, 4, 5, 3]), data);
    }
}

//! [`RknnApi`] over Rockchip's `librknnrt.so`, loaded at run time through `rknpu2-sys`
//! (`libloading`), so the binary builds anywhere and a machine without the runtime gets a clear
//! start-up error instead of a link failure.
//!
//! This is the only module of Drover with `unsafe` code: each call hands Rust-owned buffers of
//! the sizes the C API documents to the runtime and copies results out before releasing them.
#![allow(unsafe_code)]

use std::ffi::{CStr, OsString, c_char, c_void};
use std::path::Path;
use std::sync::Arc;

use rknpu2_sys as sys;

use super::api::{
    ContextHandle, CoreMask, InputBuffer, RknnApi, SdkVersion, TensorAttr, TensorFormat, TensorType,
};
use crate::error::{NodeError, Result};

/// The library name looked up through the dynamic loader when `RKNN_LIBRARY` is not set.
pub const DEFAULT_LIBRARY: &str = "librknnrt.so";

/// How to get the runtime, for error messages.
pub const INSTALL_HINT: &str = "install Rockchip's RKNN runtime: copy librknnrt.so from \
    rknn-toolkit2 (rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so, version 2.x) to \
    /usr/lib and run ldconfig, or point RKNN_LIBRARY at it; the NPU also needs the rknpu kernel \
    driver (/dev/dri/renderD129 or /dev/rknpu)";

// The C struct the runtime fills; its size is fixed by rknn_api.h.
const _: () = assert!(std::mem::size_of::<sys::rknn_tensor_attr>() == 376);

/// `RKNN_ERR_PARAM_INVALID`, for arguments the C API cannot take.
const PARAM_INVALID: i32 = -5;

/// The loaded runtime library.
pub struct RknnLibrary {
    lib: sys::rknn,
    name: String,
}

fn c_string(chars: &[c_char]) -> String {
    // SAFETY: c_char and u8 have the same size and alignment; the slice stays borrowed.
    let bytes = unsafe { std::slice::from_raw_parts(chars.as_ptr().cast::<u8>(), chars.len()) };
    CStr::from_bytes_until_nul(bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

fn to_attr(raw: &sys::rknn_tensor_attr) -> TensorAttr {
    let n = (raw.n_dims as usize).min(raw.dims.len());
    TensorAttr {
        index: raw.index,
        name: c_string(&raw.name),
        dims: raw.dims[..n].to_vec(),
        format: TensorFormat::from_raw(raw.fmt),
        dtype: TensorType::from_raw(raw.type_),
        n_elems: raw.n_elems,
    }
}

impl RknnLibrary {
    /// Loads the runtime from `path` (default: `librknnrt.so` through the dynamic loader) and
    /// checks it has every function Drover calls. Fails with a message naming the library and
    /// how to install it.
    pub fn open(path: Option<&Path>) -> Result<Arc<dyn RknnApi>> {
        let name: OsString = path.map_or_else(|| DEFAULT_LIBRARY.into(), |p| p.as_os_str().into());
        let shown = name.to_string_lossy().into_owned();
        // SAFETY: loading runs the library's initialisers; librknnrt.so is Rockchip's runtime,
        // which has none that depend on our state.
        let lib = unsafe { sys::rknn::new(&name) }.map_err(|e| NodeError::Backend {
            backend: "rknn",
            message: format!("cannot load the RKNN runtime {shown} ({e}); {INSTALL_HINT}"),
        })?;
        let required = [
            ("rknn_init", lib.rknn_init.is_ok()),
            ("rknn_destroy", lib.rknn_destroy.is_ok()),
            ("rknn_query", lib.rknn_query.is_ok()),
            ("rknn_set_core_mask", lib.rknn_set_core_mask.is_ok()),
            ("rknn_inputs_set", lib.rknn_inputs_set.is_ok()),
            ("rknn_run", lib.rknn_run.is_ok()),
            ("rknn_outputs_get", lib.rknn_outputs_get.is_ok()),
            ("rknn_outputs_release", lib.rknn_outputs_release.is_ok()),
        ];
        let missing: Vec<&str> = required
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(NodeError::Backend {
                backend: "rknn",
                message: format!(
                    "{shown} lacks {} (an RK3588 runtime of version 1.5 or later is needed); {INSTALL_HINT}",
                    missing.join(", ")
                ),
            });
        }
        tracing::info!(library = %shown, "rknn runtime loaded");
        Ok(Arc::new(Self { lib, name: shown }))
    }

    fn query<T>(&self, ctx: ContextHandle, cmd: sys::rknn_query_cmd, info: &mut T) -> i32 {
        // SAFETY: `info` is a live, writable value of the struct type `cmd` fills, and the size
        // passed is its size.
        unsafe {
            self.lib.rknn_query(
                ctx,
                cmd,
                (info as *mut T).cast::<c_void>(),
                std::mem::size_of::<T>() as u32,
            )
        }
    }

    fn raw_input_attr(
        &self,
        ctx: ContextHandle,
        index: u32,
    ) -> std::result::Result<sys::rknn_tensor_attr, i32> {
        // SAFETY: rknn_tensor_attr is plain C data; all-zero is a valid value.
        let mut attr: sys::rknn_tensor_attr = unsafe { std::mem::zeroed() };
        attr.index = index;
        match self.query(ctx, sys::_rknn_query_cmd::RKNN_QUERY_INPUT_ATTR, &mut attr) {
            0 => Ok(attr),
            code => Err(code),
        }
    }
}

impl RknnApi for RknnLibrary {
    fn init(&self, model: &mut [u8]) -> std::result::Result<ContextHandle, i32> {
        let size = u32::try_from(model.len()).map_err(|_| PARAM_INVALID)?;
        let mut ctx: sys::rknn_context = 0;
        // SAFETY: `model` is a live buffer of `size` bytes the runtime reads (and copies) during
        // the call; `ctx` is written once.
        let code = unsafe {
            self.lib.rknn_init(
                &mut ctx,
                model.as_mut_ptr().cast::<c_void>(),
                size,
                0,
                std::ptr::null_mut(),
            )
        };
        if code == 0 { Ok(ctx) } else { Err(code) }
    }

    fn destroy(&self, ctx: ContextHandle) -> i32 {
        // SAFETY: `ctx` came from rknn_init and is destroyed once, by its owner's Drop.
        unsafe { self.lib.rknn_destroy(ctx) }
    }

    fn sdk_version(&self, ctx: ContextHandle) -> std::result::Result<SdkVersion, i32> {
        // SAFETY: plain C data; all-zero is valid.
        let mut v: sys::rknn_sdk_version = unsafe { std::mem::zeroed() };
        match self.query(ctx, sys::_rknn_query_cmd::RKNN_QUERY_SDK_VERSION, &mut v) {
            0 => Ok(SdkVersion {
                api: c_string(&v.api_version),
                driver: c_string(&v.drv_version),
            }),
            code => Err(code),
        }
    }

    fn io_num(&self, ctx: ContextHandle) -> std::result::Result<(u32, u32), i32> {
        let mut n = sys::rknn_input_output_num {
            n_input: 0,
            n_output: 0,
        };
        match self.query(ctx, sys::_rknn_query_cmd::RKNN_QUERY_IN_OUT_NUM, &mut n) {
            0 => Ok((n.n_input, n.n_output)),
            code => Err(code),
        }
    }

    fn input_attr(&self, ctx: ContextHandle, index: u32) -> std::result::Result<TensorAttr, i32> {
        self.raw_input_attr(ctx, index).map(|a| to_attr(&a))
    }

    fn output_attr(
        &self,
        ctx: ContextHandle,
        index: u32,
        current: bool,
    ) -> std::result::Result<TensorAttr, i32> {
        // SAFETY: plain C data; all-zero is valid.
        let mut attr: sys::rknn_tensor_attr = unsafe { std::mem::zeroed() };
        attr.index = index;
        let cmd = if current {
            sys::_rknn_query_cmd::RKNN_QUERY_CURRENT_OUTPUT_ATTR
        } else {
            sys::_rknn_query_cmd::RKNN_QUERY_OUTPUT_ATTR
        };
        match self.query(ctx, cmd, &mut attr) {
            0 => Ok(to_attr(&attr)),
            code => Err(code),
        }
    }

    fn input_shapes(
        &self,
        ctx: ContextHandle,
        index: u32,
    ) -> std::result::Result<Vec<Vec<u32>>, i32> {
        // SAFETY: plain C data (32 KiB, so boxed); all-zero is valid.
        let mut range: Box<sys::rknn_input_range> = Box::new(unsafe { std::mem::zeroed() });
        range.index = index;
        match self.query(
            ctx,
            sys::_rknn_query_cmd::RKNN_QUERY_INPUT_DYNAMIC_RANGE,
            range.as_mut(),
        ) {
            0 => {
                let n_dims = (range.n_dims as usize).min(16);
                let count = (range.shape_number as usize).min(range.dyn_range.len());
                Ok(range.dyn_range[..count]
                    .iter()
                    .map(|dims| dims[..n_dims].to_vec())
                    .collect())
            }
            code => Err(code),
        }
    }

    fn set_core_mask(&self, ctx: ContextHandle, mask: CoreMask) -> i32 {
        // SAFETY: a live context and a mask value from rknn_api.h.
        unsafe { self.lib.rknn_set_core_mask(ctx, mask.raw()) }
    }

    fn set_input_shapes(&self, ctx: ContextHandle, attrs: &[TensorAttr]) -> i32 {
        if self.lib.rknn_set_input_shapes.is_err() {
            tracing::error!(library = %self.name, "the runtime lacks rknn_set_input_shapes: dynamic-shape models need librknnrt 1.5 or later");
            return PARAM_INVALID;
        }
        let mut raw = Vec::with_capacity(attrs.len());
        for attr in attrs {
            let mut r = match self.raw_input_attr(ctx, attr.index) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if attr.dims.len() > r.dims.len() {
                return PARAM_INVALID;
            }
            r.n_dims = attr.dims.len() as u32;
            r.dims = [0; 16];
            r.dims[..attr.dims.len()].copy_from_slice(&attr.dims);
            r.n_elems = attr.dims.iter().product();
            r.fmt = attr.format.raw();
            raw.push(r);
        }
        // SAFETY: `raw` holds one initialised attr per input, as the call requires.
        unsafe {
            self.lib
                .rknn_set_input_shapes(ctx, raw.len() as u32, raw.as_mut_ptr())
        }
    }

    fn inputs_set(&self, ctx: ContextHandle, inputs: &[InputBuffer<'_>]) -> i32 {
        let mut raw = Vec::with_capacity(inputs.len());
        for input in inputs {
            let Ok(size) = u32::try_from(input.data.len()) else {
                return PARAM_INVALID;
            };
            raw.push(sys::rknn_input {
                index: input.index,
                // The runtime only reads input buffers.
                buf: input.data.as_ptr().cast_mut().cast::<c_void>(),
                size,
                pass_through: 0,
                type_: input.dtype.raw(),
                fmt: input.format.raw(),
            });
        }
        // SAFETY: every buffer outlives the call (the runtime copies them into NPU memory).
        unsafe {
            self.lib
                .rknn_inputs_set(ctx, raw.len() as u32, raw.as_mut_ptr())
        }
    }

    fn run(&self, ctx: ContextHandle) -> i32 {
        // SAFETY: a live context with its inputs set; a null extend asks for a blocking run.
        unsafe { self.lib.rknn_run(ctx, std::ptr::null_mut()) }
    }

    fn outputs_get_f32(
        &self,
        ctx: ContextHandle,
        count: u32,
    ) -> std::result::Result<Vec<Vec<f32>>, i32> {
        let mut raw: Vec<sys::rknn_output> = (0..count)
            .map(|index| sys::rknn_output {
                want_float: 1,
                is_prealloc: 0,
                index,
                buf: std::ptr::null_mut(),
                size: 0,
            })
            .collect();
        // SAFETY: `raw` holds `count` outputs for the runtime to fill with buffers it owns.
        let code = unsafe {
            self.lib
                .rknn_outputs_get(ctx, count, raw.as_mut_ptr(), std::ptr::null_mut())
        };
        if code != 0 {
            return Err(code);
        }
        let values = raw
            .iter()
            .map(|o| {
                if o.buf.is_null() {
                    return Vec::new();
                }
                // SAFETY: with want_float the runtime filled `buf` with `size` bytes of f32s,
                // valid until rknn_outputs_release below; they are copied out first.
                unsafe {
                    std::slice::from_raw_parts(o.buf.cast::<f32>(), o.size as usize / 4).to_vec()
                }
            })
            .collect();
        // SAFETY: releases exactly the buffers rknn_outputs_get gave.
        let code = unsafe { self.lib.rknn_outputs_release(ctx, count, raw.as_mut_ptr()) };
        if code != 0 {
            return Err(code);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rknn::api::{CoreMask, RknnStatus, TensorFormat, TensorType};

    /// The status, type, format and core-mask tables of `api` are Rockchip's header as
    /// `rknpu2-sys` binds it, not only round trips of themselves.
    #[test]
    fn the_api_tables_are_the_headers_constants() {
        let statuses = [
            (sys::RKNN_ERR_FAIL, RknnStatus::Fail),
            (sys::RKNN_ERR_TIMEOUT, RknnStatus::Timeout),
            (
                sys::RKNN_ERR_DEVICE_UNAVAILABLE,
                RknnStatus::DeviceUnavailable,
            ),
            (sys::RKNN_ERR_MALLOC_FAIL, RknnStatus::MallocFail),
            (sys::RKNN_ERR_PARAM_INVALID, RknnStatus::ParamInvalid),
            (sys::RKNN_ERR_MODEL_INVALID, RknnStatus::ModelInvalid),
            (sys::RKNN_ERR_CTX_INVALID, RknnStatus::CtxInvalid),
            (sys::RKNN_ERR_INPUT_INVALID, RknnStatus::InputInvalid),
            (sys::RKNN_ERR_OUTPUT_INVALID, RknnStatus::OutputInvalid),
            (sys::RKNN_ERR_DEVICE_UNMATCH, RknnStatus::DeviceUnmatch),
            (
                sys::RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL,
                RknnStatus::IncompatiblePrecompiledModel,
            ),
            (
                sys::RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION,
                RknnStatus::IncompatibleOptimizationLevel,
            ),
            (
                sys::RKNN_ERR_TARGET_PLATFORM_UNMATCH,
                RknnStatus::TargetPlatformUnmatch,
            ),
        ];
        for (code, status) in statuses {
            assert_eq!(RknnStatus::from_code(code), status, "{code}");
            assert_eq!(status.code(), code);
        }
        use sys::_rknn_tensor_type as t;
        let types = [
            (t::RKNN_TENSOR_FLOAT32, TensorType::F32),
            (t::RKNN_TENSOR_FLOAT16, TensorType::F16),
            (t::RKNN_TENSOR_INT8, TensorType::I8),
            (t::RKNN_TENSOR_UINT8, TensorType::U8),
            (t::RKNN_TENSOR_INT16, TensorType::I16),
            (t::RKNN_TENSOR_UINT16, TensorType::U16),
            (t::RKNN_TENSOR_INT32, TensorType::I32),
            (t::RKNN_TENSOR_UINT32, TensorType::U32),
            (t::RKNN_TENSOR_INT64, TensorType::I64),
            (t::RKNN_TENSOR_BOOL, TensorType::Bool),
            (t::RKNN_TENSOR_INT4, TensorType::I4),
            (t::RKNN_TENSOR_BFLOAT16, TensorType::Bf16),
        ];
        for (raw, ty) in types {
            assert_eq!((TensorType::from_raw(raw), ty.raw()), (ty, raw));
        }
        use sys::_rknn_tensor_format as f;
        for (raw, format) in [
            (f::RKNN_TENSOR_NCHW, TensorFormat::Nchw),
            (f::RKNN_TENSOR_NHWC, TensorFormat::Nhwc),
            (f::RKNN_TENSOR_NC1HWC2, TensorFormat::Nc1hwc2),
            (f::RKNN_TENSOR_UNDEFINED, TensorFormat::Undefined),
        ] {
            assert_eq!((TensorFormat::from_raw(raw), format.raw()), (format, raw));
        }
        use sys::_rknn_core_mask as m;
        for (raw, mask) in [
            (m::RKNN_NPU_CORE_AUTO, CoreMask::Auto),
            (m::RKNN_NPU_CORE_0, CoreMask::Core0),
            (m::RKNN_NPU_CORE_1, CoreMask::Core1),
            (m::RKNN_NPU_CORE_2, CoreMask::Core2),
            (m::RKNN_NPU_CORE_0_1, CoreMask::Core01),
            (m::RKNN_NPU_CORE_0_1_2, CoreMask::Core012),
        ] {
            assert_eq!(mask.raw(), raw, "{}", mask.name());
        }
    }

    #[test]
    fn a_missing_runtime_is_a_clear_error() {
        let missing = Path::new("/nonexistent/librknnrt.so");
        let err = RknnLibrary::open(Some(missing))
            .err()
            .map(|e| e.to_string());
        let err = err.expect("no library there");
        assert!(err.contains("/nonexistent/librknnrt.so"), "{err}");
        assert!(err.contains("install Rockchip's RKNN runtime"), "{err}");
        // On a board the default library loads; everywhere else it fails the same way.
        if let Err(e) = RknnLibrary::open(None) {
            let e = e.to_string();
            assert!(
                e.contains("librknnrt.so") && e.contains("RKNN_LIBRARY"),
                "{e}"
            );
        }
    }
}

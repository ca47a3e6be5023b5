//! The FFI boundary: the RKNN runtime's C API as a Rust trait, one method per C function Drover
//! calls, with Rust types in and out and the runtime's status codes passed through untouched.
//!
//! [`super::ffi::RknnLibrary`] implements it over `librknnrt.so` (loaded at run time); the tests
//! implement it with a fake runtime that checks call order, shapes, layouts and core masks. What
//! the codes mean, and everything above this line (validation, layout conversion, the pipeline),
//! is the same code for both.

/// A context handle as `rknn_init` returns it.
pub type ContextHandle = u64;

/// How a tensor's elements are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorFormat {
    /// Channels before rows and columns (PyTorch's order).
    Nchw,
    /// Channels last (the NPU's usual input layout for 4-D tensors).
    Nhwc,
    /// The NPU's native blocked layout (channels split in groups of C2).
    Nc1hwc2,
    /// Not a 4-D image tensor.
    Undefined,
}

impl TensorFormat {
    /// From `rknn_tensor_format`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::Nchw,
            1 => Self::Nhwc,
            2 => Self::Nc1hwc2,
            _ => Self::Undefined,
        }
    }

    /// As `rknn_tensor_format`.
    pub fn raw(self) -> u32 {
        match self {
            Self::Nchw => 0,
            Self::Nhwc => 1,
            Self::Nc1hwc2 => 2,
            Self::Undefined => 3,
        }
    }
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// Signed 8-bit (usually quantized).
    I8,
    /// Unsigned 8-bit (usually quantized).
    U8,
    /// Signed 16-bit.
    I16,
    /// Unsigned 16-bit.
    U16,
    /// Signed 32-bit.
    I32,
    /// Unsigned 32-bit.
    U32,
    /// Signed 64-bit.
    I64,
    /// Boolean.
    Bool,
    /// Signed 4-bit.
    I4,
    /// bfloat16.
    Bf16,
    /// A code this build does not know.
    Unknown(u32),
}

impl TensorType {
    /// From `rknn_tensor_type`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::I8,
            3 => Self::U8,
            4 => Self::I16,
            5 => Self::U16,
            6 => Self::I32,
            7 => Self::U32,
            8 => Self::I64,
            9 => Self::Bool,
            10 => Self::I4,
            11 => Self::Bf16,
            other => Self::Unknown(other),
        }
    }

    /// As `rknn_tensor_type`.
    pub fn raw(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::I8 => 2,
            Self::U8 => 3,
            Self::I16 => 4,
            Self::U16 => 5,
            Self::I32 => 6,
            Self::U32 => 7,
            Self::I64 => 8,
            Self::Bool => 9,
            Self::I4 => 10,
            Self::Bf16 => 11,
            Self::Unknown(raw) => raw,
        }
    }

    /// Whether values of this type are integers that must be fed as integers (ids, timesteps);
    /// float and quantized inputs are fed as f32 and converted by the runtime.
    pub fn is_integer_input(self) -> bool {
        matches!(
            self,
            Self::I16 | Self::U16 | Self::I32 | Self::U32 | Self::I64
        )
    }
}

/// What the runtime reports about one input or output tensor (`rknn_tensor_attr`).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorAttr {
    /// Position among the model's inputs or outputs.
    pub index: u32,
    /// Name given at conversion (the ONNX name, e.g. `sample`).
    pub name: String,
    /// Dimensions in the order `format` says.
    pub dims: Vec<u32>,
    /// Layout of `dims`.
    pub format: TensorFormat,
    /// Element type inside the model.
    pub dtype: TensorType,
    /// Number of elements.
    pub n_elems: u32,
}

/// Which NPU cores a context may run on (`rknn_core_mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreMask {
    /// The runtime chooses.
    Auto,
    /// Core 0 (`RKNN_NPU_CORE_0`).
    Core0,
    /// Core 1 (`RKNN_NPU_CORE_1`).
    Core1,
    /// Core 2 (`RKNN_NPU_CORE_2`).
    Core2,
    /// Cores 0 and 1.
    Core01,
    /// All three cores of an RK3588.
    Core012,
}

impl CoreMask {
    /// The core of worker `i`: RK3588 has three NPU cores, worker i runs on core `i % 3`.
    pub fn for_worker(i: usize) -> Self {
        [Self::Core0, Self::Core1, Self::Core2][i % 3]
    }

    /// As `rknn_core_mask`.
    pub fn raw(self) -> u32 {
        match self {
            Self::Auto => 0,
            Self::Core0 => 1,
            Self::Core1 => 2,
            Self::Core2 => 4,
            Self::Core01 => 3,
            Self::Core012 => 7,
        }
    }

    /// The name in Rockchip's documentation.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "NPU_CORE_AUTO",
            Self::Core0 => "NPU_CORE_0",
            Self::Core1 => "NPU_CORE_1",
            Self::Core2 => "NPU_CORE_2",
            Self::Core01 => "NPU_CORE_0_1",
            Self::Core012 => "NPU_CORE_0_1_2",
        }
    }
}

/// One input buffer for `rknn_inputs_set` (`pass_through` off: the runtime converts `dtype` to
/// the model's type and quantizes when the model is quantized).
#[derive(Clone, Copy, Debug)]
pub struct InputBuffer<'a> {
    /// Input position.
    pub index: u32,
    /// The elements, native-endian, in `format`.
    pub data: &'a [u8],
    /// Type of the elements in `data`.
    pub dtype: TensorType,
    /// Layout of `data`.
    pub format: TensorFormat,
}

/// Runtime and driver versions (`RKNN_QUERY_SDK_VERSION`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdkVersion {
    /// librknnrt's API version.
    pub api: String,
    /// The NPU kernel driver's version.
    pub driver: String,
}

/// The RKNN runtime C API, as Drover uses it. `Err(code)` and `i32` returns are the runtime's
/// status codes (`RKNN_SUCC` is 0); [`RknnStatus`] says what they mean.
///
/// Implementations may be shared across threads (the library is); a context handle is used by
/// one thread only, which [`super::model::RknnModel`] enforces.
pub trait RknnApi: Send + Sync {
    /// `rknn_init` on the bytes of a `.rknn` file (the runtime copies what it needs).
    fn init(&self, model: &mut [u8]) -> Result<ContextHandle, i32>;
    /// `rknn_destroy`.
    fn destroy(&self, ctx: ContextHandle) -> i32;
    /// `rknn_query(RKNN_QUERY_SDK_VERSION)`.
    fn sdk_version(&self, ctx: ContextHandle) -> Result<SdkVersion, i32>;
    /// `rknn_query(RKNN_QUERY_IN_OUT_NUM)`: `(inputs, outputs)`.
    fn io_num(&self, ctx: ContextHandle) -> Result<(u32, u32), i32>;
    /// `rknn_query(RKNN_QUERY_INPUT_ATTR)` for input `index`.
    fn input_attr(&self, ctx: ContextHandle, index: u32) -> Result<TensorAttr, i32>;
    /// `rknn_query(RKNN_QUERY_OUTPUT_ATTR)`, or `RKNN_QUERY_CURRENT_OUTPUT_ATTR` when `current`
    /// (after `set_input_shapes` on a dynamic-shape model).
    fn output_attr(&self, ctx: ContextHandle, index: u32, current: bool)
    -> Result<TensorAttr, i32>;
    /// `rknn_query(RKNN_QUERY_INPUT_DYNAMIC_RANGE)` for input `index`: every shape the input
    /// accepts, in the input's format; empty for a static model.
    fn input_shapes(&self, ctx: ContextHandle, index: u32) -> Result<Vec<Vec<u32>>, i32>;
    /// `rknn_set_core_mask`.
    fn set_core_mask(&self, ctx: ContextHandle, mask: CoreMask) -> i32;
    /// `rknn_set_input_shapes`: one attr per input, `dims` set to the shape to run.
    fn set_input_shapes(&self, ctx: ContextHandle, attrs: &[TensorAttr]) -> i32;
    /// `rknn_inputs_set`.
    fn inputs_set(&self, ctx: ContextHandle, inputs: &[InputBuffer<'_>]) -> i32;
    /// `rknn_run` (blocking).
    fn run(&self, ctx: ContextHandle) -> i32;
    /// `rknn_outputs_get` with `want_float` for the first `count` outputs, copied out, then
    /// `rknn_outputs_release`.
    fn outputs_get_f32(&self, ctx: ContextHandle, count: u32) -> Result<Vec<Vec<f32>>, i32>;
}

/// What an RKNN status code means (`rknn_api.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RknnStatus {
    /// `RKNN_ERR_FAIL` (-1).
    Fail,
    /// `RKNN_ERR_TIMEOUT` (-2).
    Timeout,
    /// `RKNN_ERR_DEVICE_UNAVAILABLE` (-3).
    DeviceUnavailable,
    /// `RKNN_ERR_MALLOC_FAIL` (-4).
    MallocFail,
    /// `RKNN_ERR_PARAM_INVALID` (-5).
    ParamInvalid,
    /// `RKNN_ERR_MODEL_INVALID` (-6).
    ModelInvalid,
    /// `RKNN_ERR_CTX_INVALID` (-7).
    CtxInvalid,
    /// `RKNN_ERR_INPUT_INVALID` (-8).
    InputInvalid,
    /// `RKNN_ERR_OUTPUT_INVALID` (-9).
    OutputInvalid,
    /// `RKNN_ERR_DEVICE_UNMATCH` (-10).
    DeviceUnmatch,
    /// `RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL` (-11).
    IncompatiblePrecompiledModel,
    /// `RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION` (-12).
    IncompatibleOptimizationLevel,
    /// `RKNN_ERR_TARGET_PLATFORM_UNMATCH` (-13).
    TargetPlatformUnmatch,
    /// A code `rknn_api.h` does not define.
    Unknown(i32),
}

impl RknnStatus {
    /// The status of a non-zero return code.
    pub fn from_code(code: i32) -> Self {
        match code {
            -1 => Self::Fail,
            -2 => Self::Timeout,
            -3 => Self::DeviceUnavailable,
            -4 => Self::MallocFail,
            -5 => Self::ParamInvalid,
            -6 => Self::ModelInvalid,
            -7 => Self::CtxInvalid,
            -8 => Self::InputInvalid,
            -9 => Self::OutputInvalid,
            -10 => Self::DeviceUnmatch,
            -11 => Self::IncompatiblePrecompiledModel,
            -12 => Self::IncompatibleOptimizationLevel,
            -13 => Self::TargetPlatformUnmatch,
            other => Self::Unknown(other),
        }
    }

    /// The code.
    pub fn code(self) -> i32 {
        match self {
            Self::Fail => -1,
            Self::Timeout => -2,
            Self::DeviceUnavailable => -3,
            Self::MallocFail => -4,
            Self::ParamInvalid => -5,
            Self::ModelInvalid => -6,
            Self::CtxInvalid => -7,
            Self::InputInvalid => -8,
            Self::OutputInvalid => -9,
            Self::DeviceUnmatch => -10,
            Self::IncompatiblePrecompiledModel => -11,
            Self::IncompatibleOptimizationLevel => -12,
            Self::TargetPlatformUnmatch => -13,
            Self::Unknown(code) => code,
        }
    }

    /// What the runtime means by it, and what usually fixes it.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Fail => "execution failed",
            Self::Timeout => "execution timed out",
            Self::DeviceUnavailable => {
                "the NPU is unavailable (is the rknpu driver loaded and /dev/dri or /dev/rknpu accessible?)"
            }
            Self::MallocFail => "out of memory",
            Self::ParamInvalid => "invalid parameter",
            Self::ModelInvalid => {
                "invalid model (not an .rknn file, or converted for another platform)"
            }
            Self::CtxInvalid => "invalid context",
            Self::InputInvalid => "invalid input (shape, type or size)",
            Self::OutputInvalid => "invalid output",
            Self::DeviceUnmatch => {
                "the runtime does not match the NPU driver (update librknnrt.so or the kernel driver)"
            }
            Self::IncompatiblePrecompiledModel => {
                "the pre-compiled model does not fit this NPU (convert it again without pre-compilation)"
            }
            Self::IncompatibleOptimizationLevel => {
                "the model's optimization level does not match this runtime (convert it with a matching rknn-toolkit2)"
            }
            Self::TargetPlatformUnmatch => {
                "the model was converted for another target platform (convert it with target_platform='rk3588')"
            }
            Self::Unknown(_) => "unknown status code",
        }
    }
}

impl std::fmt::Display for RknnStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.meaning())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_with_a_meaning() {
        for code in -14..=-1 {
            let status = RknnStatus::from_code(code);
            assert_eq!(status.code(), code);
            assert!(!status.meaning().is_empty());
        }
        assert_eq!(RknnStatus::from_code(-6), RknnStatus::ModelInvalid);
        assert!(
            RknnStatus::TargetPlatformUnmatch
                .to_string()
                .contains("rk3588")
        );
        assert_eq!(RknnStatus::from_code(-99), RknnStatus::Unknown(-99));
    }

    #[test]
    fn core_masks_follow_the_runtime_and_workers_take_turns() {
        let masks: Vec<u32> = (0..6).map(|i| CoreMask::for_worker(i).raw()).collect();
        assert_eq!(masks, vec![1, 2, 4, 1, 2, 4]);
        assert_eq!(CoreMask::Core012.raw(), 7);
        assert_eq!(CoreMask::Auto.raw(), 0);
        for raw in 0..12 {
            assert_eq!(TensorType::from_raw(raw).raw(), raw);
        }
        for raw in 0..4 {
            assert_eq!(TensorFormat::from_raw(raw).raw(), raw);
        }
    }
}

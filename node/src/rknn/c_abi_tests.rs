//! The FFI marshalling against a C library with the runtime's ABI, built by the test with the
//! system C compiler (no hardware): a one-input, one-output "model" whose output is twice its
//! input, read back in the other layout. What crosses the boundary — attribute structs, names,
//! dims, input buffers with their type, format and size, float outputs and their release — is
//! checked on both sides: the stub refuses what does not match what the header says.

use rknpu2_sys as sys;

use super::api::{CoreMask, TensorFormat, TensorType};
use super::ffi::RknnLibrary;
use super::model::{HostData, HostTensor, RknnModel};

/// The stub's C source; the query numbers and struct sizes are the header's (as
/// `rknpu2-sys` binds it), and C checks its own struct layouts against those sizes.
fn stub_source() -> String {
    use sys::_rknn_query_cmd as q;
    format!(
        r#"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef uint64_t rknn_context;
typedef struct {{ uint32_t n_input; uint32_t n_output; }} io_num;
typedef struct {{
uint32_t index; uint32_t n_dims; uint32_t dims[16]; char name[256];
uint32_t n_elems; uint32_t size; int fmt; int type; int qnt_type;
int8_t fl; int32_t zp; float scale; uint32_t w_stride; uint32_t size_with_stride;
uint8_t pass_through; uint32_t h_stride;
}} tensor_attr;
typedef struct {{ char api[256]; char drv[256]; }} sdk_version;
typedef struct {{ uint32_t index; void* buf; uint32_t size; uint8_t pass_through; int type; int fmt; }} input;
typedef struct {{ uint8_t want_float; uint8_t is_prealloc; uint32_t index; void* buf; uint32_t size; }} output;
_Static_assert(sizeof(tensor_attr) == {attr}, "rknn_tensor_attr layout");
_Static_assert(sizeof(input) == {input}, "rknn_input layout");
_Static_assert(sizeof(output) == {output}, "rknn_output layout");
_Static_assert(sizeof(sdk_version) == {sdk}, "rknn_sdk_version layout");

/* NHWC [1, 2, 3, 4] in (f32), NCHW [1, 4, 2, 3] out. */
static float fed[24];
static int has_input = 0, runs = 0, outstanding = 0, live = 0;

int rknn_init(rknn_context* ctx, void* model, uint32_t size, uint32_t flag, void* ext) {{
if (size != 4 || memcmp(model, "RKNN", 4) != 0) return -6;
*ctx = 42; live = 1; return 0;
}}
int rknn_destroy(rknn_context ctx) {{ if (ctx != 42 || !live) return -7; live = 0; return 0; }}
static void attr(tensor_attr* a, uint32_t index, const char* name, uint32_t d0, uint32_t d1,
             uint32_t d2, uint32_t d3, int fmt, int type) {{
memset(a, 0, sizeof *a);
a->index = index; a->n_dims = 4;
a->dims[0] = d0; a->dims[1] = d1; a->dims[2] = d2; a->dims[3] = d3;
a->dims[4] = 999; /* past n_dims: must be ignored */
strcpy(a->name, name);
a->n_elems = d0 * d1 * d2 * d3; a->size = a->n_elems * 2; a->fmt = fmt; a->type = type;
}}
int rknn_query(rknn_context ctx, int cmd, void* info, uint32_t size) {{
if (ctx != 42) return -7;
switch (cmd) {{
case {sdk_cmd}:
    if (size != sizeof(sdk_version)) return -5;
    strcpy(((sdk_version*)info)->api, "2.3.0 (stub)");
    strcpy(((sdk_version*)info)->drv, "0.9.8 (stub)");
    return 0;
case {io_cmd}:
    if (size != sizeof(io_num)) return -5;
    ((io_num*)info)->n_input = 1; ((io_num*)info)->n_output = 1; return 0;
case {in_cmd}:
    if (size != sizeof(tensor_attr) || ((tensor_attr*)info)->index != 0) return -5;
    attr(info, 0, "sample", 1, 2, 3, 4, 1 /* NHWC */, 1 /* f16 */); return 0;
case {out_cmd}: case {cur_out_cmd}:
    if (size != sizeof(tensor_attr) || ((tensor_attr*)info)->index != 0) return -5;
    attr(info, 0, "out_sample", 1, 4, 2, 3, 0 /* NCHW */, 1); return 0;
case {range_cmd}:
    return -5; /* a static model */
default:
    return -5;
}}
}}
int rknn_set_core_mask(rknn_context ctx, int mask) {{ return ctx == 42 && mask == 2 ? 0 : -5; }}
int rknn_inputs_set(rknn_context ctx, uint32_t n, input* inputs) {{
if (ctx != 42 || n != 1) return -5;
if (inputs[0].index != 0 || inputs[0].type != 0 /* f32 */ || inputs[0].fmt != 1 /* NHWC */
    || inputs[0].pass_through != 0 || inputs[0].size != sizeof fed) return -8;
memcpy(fed, inputs[0].buf, sizeof fed); has_input = 1; return 0;
}}
int rknn_run(rknn_context ctx, void* ext) {{ if (ctx != 42 || !has_input) return -8; runs++; return 0; }}
int rknn_outputs_get(rknn_context ctx, uint32_t n, output* outs, void* ext) {{
/* The previous outputs must have been released. */
if (ctx != 42 || n != 1 || !runs || outstanding || outs[0].want_float != 1 || outs[0].index != 0)
    return -9;
float* out = malloc(sizeof fed);
outstanding = 1;
/* NHWC in → NCHW out, doubled: out[c][y][x] = 2 * in[y][x][c]. */
for (int c = 0; c < 4; c++) for (int y = 0; y < 2; y++) for (int x = 0; x < 3; x++)
    out[(c * 2 + y) * 3 + x] = 2.0f * fed[(y * 3 + x) * 4 + c];
outs[0].buf = out; outs[0].size = sizeof fed; return 0;
}}
int rknn_outputs_release(rknn_context ctx, uint32_t n, output* outs) {{
if (ctx != 42 || n != 1 || !outs[0].buf) return -5;
free(outs[0].buf); outstanding = 0; return 0;
}}
"#,
        attr = std::mem::size_of::<sys::rknn_tensor_attr>(),
        input = std::mem::size_of::<sys::rknn_input>(),
        output = std::mem::size_of::<sys::rknn_output>(),
        sdk = std::mem::size_of::<sys::rknn_sdk_version>(),
        sdk_cmd = q::RKNN_QUERY_SDK_VERSION,
        io_cmd = q::RKNN_QUERY_IN_OUT_NUM,
        in_cmd = q::RKNN_QUERY_INPUT_ATTR,
        out_cmd = q::RKNN_QUERY_OUTPUT_ATTR,
        cur_out_cmd = q::RKNN_QUERY_CURRENT_OUTPUT_ATTR,
        range_cmd = q::RKNN_QUERY_INPUT_DYNAMIC_RANGE,
    )
}

#[test]
fn attributes_buffers_and_outputs_cross_the_c_abi_intact() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("stub.c");
    std::fs::write(&source, stub_source()).unwrap();
    let library = dir.path().join("librknnstub.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .expect("a C compiler (cc) to build the stub runtime");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let api = RknnLibrary::open(Some(&library)).unwrap();
    let model_path = dir.path().join("model.rknn");
    std::fs::write(&model_path, b"RKNN").unwrap();
    let mut model = RknnModel::load(api.clone(), &model_path, CoreMask::Core1).unwrap();
    // Attributes: names, dims up to n_dims only, formats and types as the header numbers them.
    assert_eq!(model.version().api, "2.3.0 (stub)");
    let input = &model.inputs()[0];
    assert_eq!(
        (
            input.name.as_str(),
            input.dims.clone(),
            input.format,
            input.dtype,
            input.n_elems
        ),
        (
            "sample",
            vec![1, 2, 3, 4],
            TensorFormat::Nhwc,
            TensorType::F16,
            24
        )
    );
    let output = &model.outputs()[0];
    assert_eq!(
        (output.name.as_str(), output.dims.clone(), output.format),
        ("out_sample", vec![1, 4, 2, 3], TensorFormat::Nchw)
    );
    // A run: NCHW host values go in as the NHWC f32 buffer the stub checks, and come back
    // doubled, as f32, in NCHW, the runtime's buffer released.
    let values: Vec<f32> = (0..24).map(|i| i as f32 - 7.5).collect();
    let out = model
        .run(&[HostTensor::f32(&[1, 4, 2, 3], values.clone())])
        .unwrap();
    let got = match &out[0].data {
        HostData::F32(v) => v.clone(),
        other => panic!("outputs come back as f32, not {other:?}"),
    };
    assert_eq!(out[0].dims, vec![1, 4, 2, 3]);
    assert_eq!(got, values.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    // A wrong input size is refused by the stub with the header's code, named.
    let err = model
        .run(&[HostTensor::f32(&[1, 4, 2, 3], vec![0.0; 12])])
        .unwrap_err();
    assert!(err.to_string().contains("rknn"), "{err}");
    // Another run gets its outputs: the first run's were released.
    let again = model
        .run(&[HostTensor::f32(&[1, 4, 2, 3], values.clone())])
        .unwrap();
    assert_eq!(again[0].dims, vec![1, 4, 2, 3]);
    drop(model);
    // The context was destroyed exactly once (a second destroy is refused).
    assert_eq!(api.destroy(42), -7);
}

//! A strict reader of safetensors **headers**: the 8-byte little-endian length, then that many bytes
//! of JSON describing each tensor (dtype, shape, byte offsets). Tensor data is never read, so a
//! 7 GB checkpoint is inspected in milliseconds, and nothing is allocated beyond the header.
//!
//! Every way a file can be wrong is its own [`HeaderError`] variant with a readable message.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest header accepted (100 MiB); real checkpoints have headers of a few hundred KiB.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float, e4m3.
    F8E4M3,
    /// 8-bit float, e5m2.
    F8E5M2,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 64-bit unsigned integer.
    U64,
    /// 32-bit unsigned integer.
    U32,
    /// 16-bit unsigned integer.
    U16,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl Dtype {
    /// Parses the safetensors dtype name (`F16`, `BF16`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U64" => Self::U64,
            "U32" => Self::U32,
            "U16" => Self::U16,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    /// The safetensors name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U64 => "U64",
            Self::U32 => "U32",
            Self::U16 => "U16",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::F8E4M3 | Self::F8E5M2 | Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Whether this is a floating-point type (weights).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Self::F64 | Self::F32 | Self::F16 | Self::BF16 | Self::F8E4M3 | Self::F8E5M2
        )
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte range in the data section, `[begin, end)`.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The free-form `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Length of the JSON header in bytes.
    pub header_len: u64,
    /// SHA-256 of the JSON header bytes, lowercase hex: a stable model id that costs no data read.
    pub sha256: String,
}

impl Header {
    /// Total number of elements over all tensors.
    pub fn parameters(&self) -> u64 {
        self.tensors.values().map(TensorInfo::numel).sum()
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.data_offsets.1 - t.data_offsets.0)
            .sum()
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[u64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// The float dtype holding most parameters (the "checkpoint dtype").
    pub fn dominant_dtype(&self) -> Option<Dtype> {
        let mut counts: BTreeMap<Dtype, u64> = BTreeMap::new();
        for t in self.tensors.values().filter(|t| t.dtype.is_float()) {
            *counts.entry(t.dtype).or_default() += t.numel();
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// Why a file is not a usable safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte length prefix.
    #[error("not a safetensors file: only {len} bytes, the 8-byte header length is missing")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The file starts like another format.
    #[error("not a safetensors file: it looks like {0}")]
    OtherFormat(&'static str),
    /// The declared header length exceeds the limit.
    #[error("header length {declared} bytes is over the {MAX_HEADER_BYTES}-byte limit")]
    HeaderTooLarge {
        /// Declared length.
        declared: u64,
    },
    /// The declared header runs past the end of the file.
    #[error("header length {declared} bytes runs past the end of the {file_len}-byte file")]
    HeaderBeyondFile {
        /// Declared length.
        declared: u64,
        /// File length.
        file_len: u64,
    },
    /// The header does not start with `{`.
    #[error("not a safetensors file: the header does not start with a JSON object")]
    NotAnObject,
    /// The header is not UTF-8.
    #[error("header is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    /// The header is not valid JSON.
    #[error("header is not valid JSON: {0}")]
    NotJson(String),
    /// A tensor entry is malformed.
    #[error("tensor `{name}`: {message}")]
    BadEntry {
        /// Tensor name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor has a dtype this reader does not know.
    #[error("tensor `{name}` has unknown dtype `{dtype}`")]
    UnknownDtype {
        /// Tensor name.
        name: String,
        /// The dtype string.
        dtype: String,
    },
    /// A tensor's end offset is before its begin offset.
    #[error("tensor `{name}` has offsets out of order: begin {begin} > end {end}")]
    OffsetsOutOfOrder {
        /// Tensor name.
        name: String,
        /// Begin offset.
        begin: u64,
        /// End offset.
        end: u64,
    },
    /// Two tensors share bytes.
    #[error("tensors `{first}` and `{second}` overlap at byte {at}")]
    Overlap {
        /// The earlier tensor.
        first: String,
        /// The later tensor.
        second: String,
        /// Where the second begins.
        at: u64,
    },
    /// Bytes between tensors (or before the first) belong to none.
    #[error(
        "gap in the data section before tensor `{name}` (bytes {from}..{to} belong to no tensor)"
    )]
    Gap {
        /// The tensor after the gap.
        name: String,
        /// Gap start.
        from: u64,
        /// Gap end.
        to: u64,
    },
    /// A tensor's byte length does not match its shape and dtype.
    #[error(
        "tensor `{name}`: shape {shape:?} of {dtype} needs {expected} bytes, offsets give {actual}"
    )]
    SizeMismatch {
        /// Tensor name.
        name: String,
        /// Its shape.
        shape: Vec<u64>,
        /// Its dtype.
        dtype: Dtype,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
    },
    /// Tensor data runs past the end of the file (a truncated download).
    #[error(
        "tensor data ends at byte {end} but the file holds only {available} data bytes (truncated file?)"
    )]
    Truncated {
        /// Where the last tensor ends.
        end: u64,
        /// Data bytes in the file.
        available: u64,
    },
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let io = |source| HeaderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    if file_len < 8 {
        return Err(HeaderError::TooShort { len: file_len });
    }
    file.read_exact(&mut prefix).map_err(io)?;
    let declared = check_prefix(&prefix, file_len)?;
    let mut json = Vec::with_capacity(declared as usize);
    file.take(declared).read_to_end(&mut json).map_err(io)?;
    parse_json(&json, file_len - 8 - declared)
}

/// Validates a whole safetensors file held in memory (header and data).
pub fn parse_bytes(bytes: &[u8]) -> Result<Header, HeaderError> {
    let file_len = bytes.len() as u64;
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or(HeaderError::TooShort { len: file_len })?;
    let declared = check_prefix(&prefix, file_len)?;
    let json = &bytes[8..8 + declared as usize];
    parse_json(json, file_len - 8 - declared)
}

fn check_prefix(prefix: &[u8; 8], file_len: u64) -> Result<u64, HeaderError> {
    if prefix.starts_with(b"PK\x03\x04") {
        return Err(HeaderError::OtherFormat(
            "a zip archive (a PyTorch .ckpt/.pt checkpoint?)",
        ));
    }
    if prefix[0] == 0x80 && prefix[1] <= 5 {
        return Err(HeaderError::OtherFormat(
            "a Python pickle (a legacy .ckpt checkpoint?)",
        ));
    }
    if prefix.starts_with(b"\x89PNG") {
        return Err(HeaderError::OtherFormat("a PNG image"));
    }
    if prefix.starts_with(b"RKNN") {
        return Err(HeaderError::OtherFormat("an RKNN model"));
    }
    let declared = u64::from_le_bytes(*prefix);
    if declared > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge { declared });
    }
    if declared > file_len - 8 {
        return Err(HeaderError::HeaderBeyondFile { declared, file_len });
    }
    Ok(declared)
}

fn parse_json(json: &[u8], data_len: u64) -> Result<Header, HeaderError> {
    if json.first() != Some(&b'{') {
        return Err(HeaderError::NotAnObject);
    }
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8(e.valid_up_to()))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| HeaderError::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(HeaderError::NotAnObject);
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            let Value::Object(meta) = entry else {
                return Err(bad(&name, "__metadata__ must be an object of strings"));
            };
            for (k, v) in meta {
                let Value::String(v) = v else {
                    return Err(bad(
                        &name,
                        &format!("__metadata__ value `{k}` is not a string"),
                    ));
                };
                metadata.insert(k, v);
            }
            continue;
        }
        let info = parse_entry(&name, &entry)?;
        tensors.insert(name, info);
    }
    check_offsets(&tensors, data_len)?;
    Ok(Header {
        tensors,
        metadata,
        header_len: json.len() as u64,
        sha256: hex(&Sha256::digest(json)),
    })
}

fn bad(name: &str, message: &str) -> HeaderError {
    HeaderError::BadEntry {
        name: name.to_string(),
        message: message.to_string(),
    }
}

fn parse_entry(name: &str, entry: &Value) -> Result<TensorInfo, HeaderError> {
    let Value::Object(fields) = entry else {
        return Err(bad(name, "entry is not an object"));
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(name, "missing string `dtype`"))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| HeaderError::UnknownDtype {
        name: name.to_string(),
        dtype: dtype_name.chars().take(32).collect(),
    })?;
    let shape = fields
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(name, "missing array `shape`"))?
        .iter()
        .map(|d| {
            d.as_u64().ok_or_else(|| {
                bad(
                    name,
                    "shape holds a value that is not a non-negative integer",
                )
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    if shape.len() > 8 {
        return Err(bad(
            name,
            &format!("{} dimensions, at most 8 are supported", shape.len()),
        ));
    }
    let offsets = fields
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad(name, "missing `data_offsets` [begin, end]"))?;
    let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
        return Err(bad(name, "data_offsets must be non-negative integers"));
    };
    if begin > end {
        return Err(HeaderError::OffsetsOutOfOrder {
            name: name.to_string(),
            begin,
            end,
        });
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| bad(name, "shape is too large"))?;
    if expected != end - begin {
        return Err(HeaderError::SizeMismatch {
            name: name.to_string(),
            shape,
            dtype,
            expected,
            actual: end - begin,
        });
    }
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

fn check_offsets(tensors: &BTreeMap<String, TensorInfo>, data_len: u64) -> Result<(), HeaderError> {
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(n, t)| (t.data_offsets.0, t.data_offsets.1, n.as_str()))
        .collect();
    spans.sort_unstable();
    let mut cursor = 0u64;
    let mut previous = "";
    for (begin, end, name) in spans {
        if begin < cursor {
            return Err(HeaderError::Overlap {
                first: previous.to_string(),
                second: name.to_string(),
                at: begin,
            });
        }
        if begin > cursor {
            return Err(HeaderError::Gap {
                name: name.to_string(),
                from: cursor,
                to: begin,
            });
        }
        cursor = end;
        previous = name;
    }
    if cursor > data_len {
        return Err(HeaderError::Truncated {
            end: cursor,
            available: data_len,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds safetensors files for tests: header JSON with the right offsets and (optionally) the data.
pub mod build {
    use super::Dtype;

    /// One tensor to write: name, dtype, shape.
    pub type Spec = (String, Dtype, Vec<u64>);

    /// The header JSON and the data length for `tensors` laid out back to back in order.
    pub fn header_json(tensors: &[Spec], metadata: &[(&str, &str)]) -> (Vec<u8>, u64) {
        let mut map = serde_json::Map::new();
        if !metadata.is_empty() {
            let meta = metadata
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect();
            map.insert("__metadata__".into(), serde_json::Value::Object(meta));
        }
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<u64>() * dtype.size();
            map.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        (
            serde_json::to_vec(&serde_json::Value::Object(map)).unwrap_or_default(),
            offset,
        )
    }

    /// Writes a file whose header is real and whose data section is sparse (all zeros, no disk
    /// blocks), so multi-gigabyte checkpoints cost nothing in tests.
    pub fn write_sparse(
        path: &std::path::Path,
        tensors: &[Spec],
        metadata: &[(&str, &str)],
    ) -> std::io::Result<()> {
        use std::io::Write;
        let (json, data_len) = header_json(tensors, metadata);
        let mut file = std::fs::File::create(path)?;
        file.write_all(&(json.len() as u64).to_le_bytes())?;
        file.write_all(&json)?;
        file.set_len(8 + json.len() as u64 + data_len)?;
        Ok(())
    }

    /// Writes named shapes (e.g. from [`crate::arch`]) as a sparse file of one `dtype`, creating
    /// parent folders.
    pub fn write_model(
        path: &std::path::Path,
        tensors: &[crate::arch::Tensor],
        dtype: Dtype,
    ) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let specs: Vec<Spec> = tensors
            .iter()
            .map(|(n, s)| (n.clone(), dtype, s.clone()))
            .collect();
        write_sparse(path, &specs, &[])
    }

    /// A complete in-memory file with zeroed data.
    pub fn to_bytes(tensors: &[Spec], metadata: &[(&str, &str)]) -> Vec<u8> {
        let (json, data_len) = header_json(tensors, metadata);
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.resize(out.len() + data_len as usize, 0);
        out
    }

    /// A complete f32 safetensors file holding `tensors` (name, shape, row-major values).
    pub fn f32_file(tensors: &[(String, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
        let specs: Vec<Spec> = tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), Dtype::F32, s.clone()))
            .collect();
        let (json, data_len) = header_json(&specs, &[]);
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.reserve(data_len as usize);
        for (_, _, values) in tensors {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;

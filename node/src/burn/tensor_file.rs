//! Safetensors files read tensor by tensor: the header parsed and checked once, each tensor
//! read with one positional read when asked for and converted to f32 on the host (from f32,
//! f16, bf16 or f64). A leaf module: the weight loader and the LoRA reader both build on it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use drover_shared::safetensors::{Dtype, Header, read_header};

use crate::error::{NodeError, Result};

/// One safetensors file, header parsed, data read on demand.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    header: Header,
    data_start: u64,
}

/// A tensor read from a file, as f32 on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorFile {
    /// Opens `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let header = read_header(path).map_err(|e| NodeError::Weights(format!("{e}")))?;
        let file = File::open(path).map_err(|e| io_error(path, &e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: 8 + header.header_len,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor names in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.header.tensors.keys().map(String::as_str)
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.header.tensors.contains_key(name)
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.header
            .shape(name)
            .map(|s| s.iter().map(|&d| d as usize).collect())
    }

    /// Reads `name` and converts it to f32 (from f32, f16, bf16 or f64).
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| NodeError::MissingTensor {
                file: self.path.display().to_string(),
                name: name.to_string(),
            })?;
        let (begin, end) = info.data_offsets;
        let mut bytes = vec![0u8; (end - begin) as usize];
        self.file
            .read_exact_at(&mut bytes, self.data_start + begin)
            .map_err(|e| io_error(&self.path, &e))?;
        let data = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
            other => {
                return Err(NodeError::TensorDtype {
                    name: name.to_string(),
                    dtype: other.name(),
                });
            }
        };
        Ok(HostTensor {
            data,
            shape: info.shape.iter().map(|&d| d as usize).collect(),
        })
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> NodeError {
    NodeError::Weights(format!("{}: {e}", path.display()))
}

/// Every tensor of `file` as host tensors (small files: fixtures, LoRAs).
pub fn read_all(file: &TensorFile) -> Result<BTreeMap<String, HostTensor>> {
    file.names()
        .map(|n| Ok((n.to_string(), file.read(n)?)))
        .collect()
}

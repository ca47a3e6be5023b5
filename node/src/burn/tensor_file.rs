//! Safetensors files read tensor by tensor: the header parsed and checked once, each tensor
//! read with one positional read when asked for and converted to f32 on the host (from f32,
//! f16, bf16 or f64). A leaf module: the weight loader and the LoRA reader both build on it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use drover_shared::safetensors::{Dtype, Header, read_header};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

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
        let len = (end - begin) as usize;
        let read = |into: &mut [u8]| {
            self.file
                .read_exact_at(into, self.data_start + begin)
                .map_err(|e| io_error(&self.path, &e))
        };
        // Read straight into typed buffers and convert with `half`'s slice conversions: no
        // per-element iterator in this crate (dependencies are optimised even in dev builds, so
        // a node loads as fast there as in release). Files are little-endian, as are the hosts
        // this runs on; a big-endian host swaps first.
        let halves = |kind: Dtype| -> Result<Vec<f32>> {
            let mut raw = vec![0u16; len / 2];
            read(bytemuck::cast_slice_mut(&mut raw))?;
            if cfg!(target_endian = "big") {
                raw.iter_mut().for_each(|x| *x = x.swap_bytes());
            }
            let mut out = vec![0f32; raw.len()];
            if kind == Dtype::F16 {
                raw.reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(&mut out);
            } else {
                raw.reinterpret_cast::<half::bf16>()
                    .convert_to_f32_slice(&mut out);
            }
            Ok(out)
        };
        let data = match info.dtype {
            Dtype::F32 => {
                let mut out = vec![0f32; len / 4];
                read(bytemuck::cast_slice_mut(&mut out))?;
                if cfg!(target_endian = "big") {
                    out.iter_mut()
                        .for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes()));
                }
                out
            }
            Dtype::F16 | Dtype::BF16 => halves(info.dtype)?,
            Dtype::F64 => {
                let mut bytes = vec![0u8; len];
                read(&mut bytes)?;
                bytes
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        f64::from_le_bytes(b) as f32
                    })
                    .collect()
            }
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

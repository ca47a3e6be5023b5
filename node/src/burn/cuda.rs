//! Start-up checks for the CUDA backend. burn-cuda loads the driver and NVRTC at run time and
//! panics inside its device thread when one is missing, so the node looks for them first and
//! fails with a message naming what is absent.

use std::path::{Path, PathBuf};

use crate::error::{NodeError, Result};

fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    if let Ok(cuda) = std::env::var("CUDA_PATH") {
        dirs.push(Path::new(&cuda).join("lib64"));
    }
    dirs.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/lib/wsl/lib",
            "/usr/local/nvidia/lib64",
            "/lib64",
            "/lib",
        ]
        .map(PathBuf::from),
    );
    dirs
}

fn find(prefix: &str) -> bool {
    let in_ld_cache = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim_start().starts_with(prefix))
        })
        .unwrap_or(false);
    in_ld_cache
        || library_dirs().iter().any(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with(prefix))
                })
        })
}

/// Checks the CUDA driver, NVRTC and the CUDA headers burn-cuda compiles kernels against.
pub fn preflight() -> Result<()> {
    let missing = |what: &str| NodeError::Backend {
        backend: "cuda",
        message: what.to_string(),
    };
    if !find("libcuda.so") {
        return Err(missing(
            "libcuda.so.1 (the NVIDIA driver) was not found in LD_LIBRARY_PATH or the system library folders",
        ));
    }
    if !find("libnvrtc.so") {
        return Err(missing(
            "libnvrtc.so (NVRTC, part of the CUDA toolkit) was not found; install the toolkit or add its lib64 to LD_LIBRARY_PATH",
        ));
    }
    let include = std::env::var("CUDA_PATH")
        .map(|p| Path::new(&p).join("include"))
        .unwrap_or_else(|_| PathBuf::from("/usr/local/cuda/include"));
    if !include.join("cuda_fp16.h").is_file() {
        return Err(missing(&format!(
            "the CUDA headers (cuda_fp16.h) are not in {}; set CUDA_PATH to the toolkit",
            include.display()
        )));
    }
    Ok(())
}

//! Start-up of the CUDA backend: checks for the driver, NVRTC and headers (burn-cuda loads them at
//! run time and panics inside its device thread when one is missing, so the node looks for them
//! first and fails with a message naming what is absent), the persistent kernel cache, the device
//! count, and panics of the CUDA runtime turned into errors naming the device.

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

/// The folder compiled kernels are cached in when `DROVER_NODE_CACHE_DIR` is unset:
/// `drover-node` under `XDG_CACHE_HOME` or `~/.cache`, else under the temp folder.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("drover-node")
}

/// Points cubecl's PTX cache (and its autotune cache, for builds that tune) at `dir`, so a
/// restarted node reuses the kernels compiled by the last one. Settings from a `cubecl.toml`
/// and `CUBECL_*` variables are kept; only the cache folders are set. Must run before the first
/// CUDA call.
pub fn configure_kernel_cache(dir: &Path) -> Result<()> {
    use ::burn::cubecl::config::cache::CacheConfig;
    use ::burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    std::fs::create_dir_all(dir).map_err(|e| {
        NodeError::Config(format!(
            "DROVER_NODE_CACHE_DIR {}: cannot create it: {e}",
            dir.display()
        ))
    })?;
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.compilation.cache = Some(CacheConfig::File(dir.join("kernels")));
    config.autotune.cache = CacheConfig::File(dir.join("autotune"));
    std::panic::catch_unwind(move || CubeClRuntimeConfig::set(config)).map_err(|_| {
        NodeError::Backend {
            backend: "cuda",
            message: "the kernel cache must be configured before the CUDA runtime starts".into(),
        }
    })
}

/// The number of CUDA devices the driver shows this process (after `CUDA_VISIBLE_DEVICES`).
pub fn device_count() -> Result<usize> {
    use ::burn::tensor::backend::Backend;
    std::panic::catch_unwind(|| super::Gpu::device_count(0)).map_err(|panic| NodeError::Backend {
        backend: "cuda",
        message: format!(
            "the CUDA driver could not list devices: {}",
            panic_message(panic.as_ref())
        ),
    })
}

/// Runs `f` for device `index`, turning a panic of the CUDA runtime into an error that names the
/// device and the reason.
pub fn on_device<T>(index: usize, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| NodeError::Backend {
            backend: "cuda",
            message: format!("device {index}: {what}: {e}"),
        }),
        Err(panic) => Err(NodeError::Backend {
            backend: "cuda",
            message: format!("device {index}: {what}: {}", panic_message(panic.as_ref())),
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "the CUDA runtime panicked".into())
}

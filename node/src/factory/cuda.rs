//! The cuda workers of the factory (feature `cuda`): a model pool per device, warmed up before
//! the node registers.

use super::*;

/// The cuda workers: every device of the plan (all visible ones, or `GPUS`) gets its own pool
/// of the catalogue's models (each checked by loading it, the default kept and warmed up at the
/// family's default size) on all devices at once, before the node registers, and `NUM_WORKERS`
/// workers. A device that fails stops the start, naming its index and the reason.
#[cfg(feature = "cuda")]
pub(super) fn build_cuda(
    config: &NodeConfig,
    entries: Vec<crate::catalog::Entry>,
    loras: Vec<LoraEntry>,
) -> Result<WorkerPool> {
    use crate::burn::{cuda, gpus, renderer};
    cuda::preflight()?;
    let cache = config
        .cache_dir
        .clone()
        .unwrap_or_else(cuda::default_cache_dir);
    cuda::configure_kernel_cache(&cache)?;
    let chosen = config
        .gpus
        .as_deref()
        .map(gpus::parse_gpu_list)
        .transpose()?;
    let visible = cuda::device_count()?;
    let per_device = config.num_workers.unwrap_or(1);
    let plan = gpus::plan_workers(visible, chosen.as_deref(), per_device)?;
    let mut devices: Vec<usize> = Vec::new();
    for d in &plan {
        if !devices.contains(d) {
            devices.push(*d);
        }
    }
    let precision = precision(config, PrecisionKind::F16);
    let budget = config.memory_budget.unwrap_or(u64::MAX);
    let (w, h) = entries[0].model.family.default_size();
    let started = std::time::Instant::now();
    type Loaded = Result<(Arc<renderer::ModelPool<crate::burn::Gpu>>, Vec<ModelCaps>)>;
    let loaded: Vec<Loaded> = std::thread::scope(|scope| {
        let loads: Vec<_> = devices
            .iter()
            .map(|&index| {
                let mut entries = entries.clone();
                scope.spawn(move || {
                    cuda::on_device(index, "loading the models", || {
                        let device = ::burn::backend::cuda::CudaDevice::new(index);
                        let off = crate::burn::cuda_kernels::self_check::<crate::burn::Gpu>(
                            &device,
                        );
                        if !off.is_empty() {
                            tracing::warn!(device = index, kernels = ?off, "burn's ops run these instead");
                        }
                        let (pool, models) = crate::catalog::load_pool::<crate::burn::Gpu>(
                            &mut entries,
                            &device,
                            precision,
                            config,
                            budget,
                            |f| max_pixels(config, f),
                        )?;
                        let default = pool.check_out(0, |_| true)?;
                        let took = renderer::warm_up(&default, (w as usize, h as usize))?;
                        drop(default);
                        tracing::info!(
                            device = index,
                            size = %format!("{w}x{h}"),
                            ms = took.as_millis() as u64,
                            "cuda device warmed up"
                        );
                        Ok((pool, models))
                    })
                })
            })
            .collect();
        loads
            .into_iter()
            .zip(&devices)
            .map(|(handle, &index)| {
                handle.join().unwrap_or_else(|_| {
                    Err(NodeError::Backend {
                        backend: "cuda",
                        message: format!("device {index}: its loading thread panicked"),
                    })
                })
            })
            .collect()
    });
    let mut pools = Vec::new();
    let mut models = Vec::new();
    for result in loaded {
        let (pool, device_models) = result?;
        pools.push(pool);
        models = device_models;
    }
    tracing::info!(
        devices = ?devices,
        workers = plan.len(),
        models = models.len(),
        precision = ?precision.weights,
        cache = %cache.display(),
        ms = started.elapsed().as_millis() as u64,
        "cuda models loaded and warmed up"
    );
    // Worker i runs on plan[i]'s device: its pool is that device's.
    let worker_pools: Vec<_> = plan
        .iter()
        .map(|d| pools[devices.iter().position(|x| x == d).unwrap_or(0)].clone())
        .collect();
    let addr = renderer::start_pool(
        worker_pools,
        plan.len(),
        "cuda",
        &models[0].id,
        config.lora_root.clone(),
        lcm_names(&loras),
    );
    let mut pool = pool(
        config,
        BackendKind::Cuda,
        plan.len() as u32,
        loras,
        models,
        addr.recipient(),
    );
    pool.capabilities.memory_budget = if budget == u64::MAX { 0 } else { budget };
    let pools = Arc::new(pools);
    pool.residency = Some(pools.clone());
    pool.control = Some(pools);
    Ok(pool)
}

#[cfg(not(feature = "cuda"))]
pub(super) fn build_cuda(
    _config: &NodeConfig,
    _entries: Vec<crate::catalog::Entry>,
    _loras: Vec<LoraEntry>,
) -> Result<WorkerPool> {
    Err(NodeError::Backend {
        backend: "cuda",
        message: "this drover-node was built without the `cuda` feature; rebuild with \
                  `cargo build --release -p drover-node --features cuda`, or set BACKEND=cpu"
            .into(),
    })
}

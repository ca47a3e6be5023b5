//! The simulated workers of the factory (`BACKEND=sim`), with a simulated catalogue under
//! `SIM_MODELS`.

use super::*;

/// What a simulated node advertises: every sampler, a standard one first.
const SIM_SAMPLERS: [Sampler; 9] = Sampler::ALL;

pub(super) fn build_sim(config: &NodeConfig) -> Result<WorkerPool> {
    let family = config.sim_family;
    if !family.is_text_to_image() {
        return Err(NodeError::Config(format!(
            "SIM_FAMILY={family} is not a text-to-image family"
        )));
    }
    if config.model.is_some() || config.model_root.is_some() {
        return Err(NodeError::Config(
            "BACKEND=sim runs no model, but MODEL/MODEL_ROOT are set; unset them or choose a real backend".into(),
        ));
    }
    let workers = config.num_workers.unwrap_or(2);
    if !(1..=64).contains(&workers) {
        return Err(NodeError::Config(format!(
            "NUM_WORKERS={workers} is outside 1..=64"
        )));
    }
    let loras = match &config.lora_root {
        Some(root) => scan_loras(root, &[family], &config.lcm_loras)?,
        None => Vec::new(),
    };
    let step = Duration::from_millis(config.sim_step_ms);
    let (w, h) = family.default_size();
    let pixel_steps_per_second = if config.sim_step_ms == 0 {
        0.0
    } else {
        f64::from(w * h) * 1000.0 / config.sim_step_ms as f64
    };
    let model_caps = |id: String, name: String, family: ModelFamily, bytes: u64| ModelCaps {
        id,
        family,
        cross_attention_dim: family.cross_attention_dim(),
        max_pixels: max_pixels(config, family),
        sizes: Vec::new(),
        // A simulation renders any sampler alike; standard first, so jobs that name none may
        // ask for up to 150 steps as on a standard model.
        samplers: SIM_SAMPLERS.to_vec(),
        // The simulation blends a job's source image into what it draws.
        img2img: true,
        inpaint: true,
        bytes,
        pinned: config.pin_models.contains(&name),
        name,
    };
    let Some(list) = config.sim_models.as_deref() else {
        let model_id = format!("sim-{family}");
        let addr = Worker::start(workers as usize, &model_id, move |_| SimRenderer::new(step));
        tracing::info!(family = %family, workers, step_ms = config.sim_step_ms, loras = loras.len(), "sim workers started (simulated backend, no model)");
        let caps = model_caps(model_id.clone(), model_id, family, 0);
        let mut pool = pool(
            config,
            BackendKind::Sim,
            workers,
            loras,
            vec![caps],
            addr.recipient(),
        );
        pool.capabilities.pixel_steps_per_second = pixel_steps_per_second;
        return Ok(pool);
    };
    let mut models = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, fam) = match entry.split_once(':') {
            Some((name, f)) => (
                name,
                f.parse::<ModelFamily>()
                    .map_err(|e| NodeError::Config(format!("SIM_MODELS entry `{entry}`: {e}")))?,
            ),
            None => (entry, family),
        };
        let bytes = if fam == ModelFamily::Sdxl {
            7 << 30
        } else {
            2 << 30
        };
        models.push(model_caps(
            format!("sim-{name}"),
            name.to_string(),
            fam,
            bytes,
        ));
    }
    if models.is_empty() {
        return Err(NodeError::Config("SIM_MODELS names no model".into()));
    }
    crate::catalog::check_pins(&config.pin_models, models.iter().map(|m| m.name.as_str()))?;
    let budget = config.memory_budget.unwrap_or(u64::MAX);
    let ledger = crate::residency::Ledger::new(
        budget,
        models
            .iter()
            .map(|m| crate::residency::ModelCost {
                name: m.name.clone(),
                bytes: m.bytes,
                pinned: m.pinned,
            })
            .collect(),
    )?;
    let load = Duration::from_millis(config.sim_load_ms);
    let catalogue = Arc::new(crate::residency::Models::new(
        models.iter().map(|m| m.id.clone()).collect(),
        ledger,
        move |_| {
            std::thread::sleep(load);
            Ok(())
        },
    ));
    // The default and the pinned models are loaded before the node registers.
    for (i, m) in models.iter().enumerate() {
        if i == 0 || m.pinned {
            catalogue.preload(i)?;
        }
    }
    let shared = catalogue.clone();
    let addr = Worker::start(workers as usize, &models[0].id, move |_| {
        SimRenderer::new(step).with_models(shared.clone())
    });
    tracing::info!(
        models = models.len(),
        workers,
        step_ms = config.sim_step_ms,
        load_ms = config.sim_load_ms,
        budget,
        "sim workers started (simulated backend and catalogue, no model)"
    );
    let mut pool = pool(
        config,
        BackendKind::Sim,
        workers,
        loras,
        models,
        addr.recipient(),
    );
    pool.capabilities.pixel_steps_per_second = pixel_steps_per_second;
    pool.capabilities.memory_budget = if budget == u64::MAX { 0 } else { budget };
    let pools = Arc::new(vec![catalogue]);
    pool.residency = Some(pools.clone());
    pool.control = Some(pools);
    Ok(pool)
}

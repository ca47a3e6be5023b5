//! Protobuf to domain types and back: the only place the control plane's vocabulary meets the
//! wire. Everything a node sends is checked here (names, families, sizes, ids); a malformed id is
//! dropped with a log line, never passed inward.

use drover_shared::family::{ModelFamily, UnknownFamily};
use drover_shared::ids::{JobId, LeaseId};
use drover_shared::job::Size;
use drover_shared::proto::{self, coordinator_message, node_message};
use drover_shared::sampler::SamplerName;

use crate::control::{ModelResidency, NodeRegistration, NodeReport, ToNode};
use crate::error::{CoordinatorError, Result};
use crate::records::{LoraAdvert, ModelAdvert, UpscalerAdvert};

/// A node's registration, checked: a name of 1 to 128 characters, a known family, at least one
/// worker, sizes with pixels, LoRAs of known families.
pub fn registration(req: proto::RegisterRequest) -> Result<NodeRegistration> {
    let name = req.name.trim().to_string();
    if name.is_empty() || name.len() > 128 {
        return Err(CoordinatorError::InvalidRequest(
            "node name must be 1 to 128 characters".into(),
        ));
    }
    let family: ModelFamily = req
        .family
        .parse()
        .map_err(|e: UnknownFamily| CoordinatorError::InvalidRequest(e.to_string()))?;
    if req.workers == 0 {
        return Err(CoordinatorError::InvalidRequest(
            "a node needs at least one worker".into(),
        ));
    }
    if let Some(bad) = req.sizes.iter().find(|s| s.width == 0 || s.height == 0) {
        return Err(CoordinatorError::InvalidRequest(format!(
            "size {}x{} has no pixels",
            bad.width, bad.height
        )));
    }
    let sizes = req
        .sizes
        .iter()
        .map(|s| Size {
            width: s.width,
            height: s.height,
        })
        .collect();
    let loras = req
        .loras
        .into_iter()
        .map(|l| {
            let family = l.family.parse().map_err(|e: UnknownFamily| {
                CoordinatorError::InvalidRequest(format!("lora `{}`: {e}", l.name))
            })?;
            Ok(LoraAdvert {
                name: l.name,
                family,
                lcm: l.lcm,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let samplers = known_samplers(&name, &req.samplers);
    let mut models: Vec<ModelAdvert> = Vec::with_capacity(req.models.len().max(1));
    for m in req.models {
        let family: ModelFamily = m.family.parse().map_err(|e: UnknownFamily| {
            CoordinatorError::InvalidRequest(format!("model `{}`: {e}", m.name))
        })?;
        if m.model_id.is_empty() || m.model_id.len() > 128 || m.name.len() > 256 {
            return Err(CoordinatorError::InvalidRequest(format!(
                "model `{}`: ids are 1 to 128 characters, names at most 256",
                m.name.chars().take(64).collect::<String>()
            )));
        }
        if models.iter().any(|have| have.model_id == m.model_id) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "model {} advertised twice",
                m.model_id
            )));
        }
        if let Some(bad) = m.sizes.iter().find(|s| s.width == 0 || s.height == 0) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "model `{}`: size {}x{} has no pixels",
                m.name, bad.width, bad.height
            )));
        }
        models.push(ModelAdvert {
            samplers: known_samplers(&name, &m.samplers),
            model_id: m.model_id,
            name: m.name,
            family,
            max_pixels: m.max_pixels,
            sizes: m
                .sizes
                .iter()
                .map(|s| Size {
                    width: s.width,
                    height: s.height,
                })
                .collect(),
            img2img: m.img2img,
            inpaint: m.inpaint,
            bytes: m.bytes,
            pinned: m.pinned,
        });
    }
    let residency = self::residency(&req.residency);
    let mut upscalers: Vec<UpscalerAdvert> = Vec::new();
    for u in req.upscalers {
        if u.name.is_empty() || u.name.len() > 128 || u.scale == 0 || u.scale > 16 {
            return Err(CoordinatorError::InvalidRequest(format!(
                "upscaler `{}` (scale {}): names are 1 to 128 characters, scales 1 to 16",
                u.name.chars().take(64).collect::<String>(),
                u.scale
            )));
        }
        if upscalers.iter().any(|have| have.name == u.name) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "upscaler `{}` advertised twice",
                u.name
            )));
        }
        upscalers.push(UpscalerAdvert {
            name: u.name,
            scale: u.scale,
            network: u.network.chars().take(256).collect(),
            ms_per_megapixel: if u.ms_per_megapixel.is_finite() {
                u.ms_per_megapixel.max(0.0)
            } else {
                0.0
            },
        });
    }
    Ok(NodeRegistration {
        samplers,
        upscalers,
        img2img: req.img2img,
        inpaint: req.inpaint,
        model_name: req.model_name.chars().take(256).collect(),
        name,
        backend: req.backend,
        family,
        cross_attention_dim: req.cross_attention_dim,
        model_id: req.model_id,
        workers: req.workers,
        max_pixels: req.max_pixels,
        sizes,
        loras,
        version: req.version,
        pixel_steps_per_second: req.pixel_steps_per_second,
        max_batch: req.max_batch.clamp(1, 64),
        models,
        memory_budget: req.memory_budget,
        residency,
    })
}

/// The samplers of `ids` this coordinator knows, in order, once each.
fn known_samplers(node: &str, ids: &[String]) -> Vec<drover_shared::sampler::Sampler> {
    let mut samplers = Vec::new();
    for id in ids {
        match id.parse::<SamplerName>() {
            Ok(n) if !samplers.contains(&n.sampler) => samplers.push(n.sampler),
            Ok(_) => {}
            // A newer node's sampler this coordinator does not know: jobs cannot ask for it.
            Err(_) => {
                tracing::warn!(node = %node, sampler = %id, "unknown sampler advertised, ignored")
            }
        }
    }
    samplers
}

/// A residency report; `None` when empty (the node keeps every model loaded).
pub fn residency(models: &[proto::ModelState]) -> Option<Vec<ModelResidency>> {
    (!models.is_empty()).then(|| {
        models
            .iter()
            .map(|m| ModelResidency {
                model_id: m.model_id.clone(),
                copies: m.copies,
                loads: m.loads,
                evictions: m.evictions,
                load_ms_total: m.load_ms_total,
                last_load_ms: m.last_load_ms,
            })
            .collect()
    })
}

/// The residency a heartbeat reports; `None` for every other message.
pub fn heartbeat_residency(message: &node_message::Kind) -> Option<Vec<ModelResidency>> {
    match message {
        node_message::Kind::Heartbeat(beat) => residency(&beat.models),
        _ => None,
    }
}

/// The (job, lease) of a running-job entry; `None` (logged) when either id is malformed.
fn lease_of(job_id: &str, lease_id: &str) -> Option<(JobId, LeaseId)> {
    match (job_id.parse(), lease_id.parse()) {
        (Ok(job), Ok(lease)) => Some((job, lease)),
        _ => {
            tracing::warn!(
                job_id,
                lease_id,
                "a node named a malformed job or lease id; dropped"
            );
            None
        }
    }
}

/// The jobs a `hello` says the node still runs.
pub fn running(list: &[proto::RunningJob]) -> Vec<(JobId, LeaseId)> {
    list.iter()
        .filter_map(|r| lease_of(&r.job_id, &r.lease_id))
        .collect()
}

/// A session message as a report about a job; `None` for heartbeats, a repeated `hello` and
/// reports with malformed ids.
pub fn report(message: node_message::Kind) -> Option<NodeReport> {
    match message {
        node_message::Kind::Hello(_) | node_message::Kind::Heartbeat(_) => None,
        node_message::Kind::Progress(p) => {
            let (job_id, lease_id) = lease_of(&p.job_id, &p.lease_id)?;
            Some(NodeReport::Progress {
                job_id,
                lease_id,
                step: p.step,
                total: p.total_steps,
            })
        }
        node_message::Kind::Result(r) => {
            let (job_id, lease_id) = lease_of(&r.job_id, &r.lease_id)?;
            Some(NodeReport::Succeeded {
                job_id,
                lease_id,
                png: r.png.into(),
                elapsed_ms: r.elapsed_ms,
                upscaled: r.upscaled,
                batch_size: r.batch_size.max(1),
            })
        }
        node_message::Kind::Failed(f) => {
            let (job_id, lease_id) = lease_of(&f.job_id, &f.lease_id)?;
            Some(NodeReport::Failed {
                job_id,
                lease_id,
                reason: f.reason,
                permanent: f.permanent,
            })
        }
    }
}

/// What the control plane sends a node, as protobuf.
pub fn to_node(message: ToNode) -> proto::CoordinatorMessage {
    let kind = match message {
        ToNode::Assign(a) => {
            let a = *a;
            let source = a.spec.source.as_deref();
            coordinator_message::Kind::Assignment(proto::Assignment {
                job_id: a.job_id.to_string(),
                lease_id: a.lease_id.to_string(),
                attempt: a.attempt,
                spec: Some(proto::JobSpec {
                    prompt: a.spec.prompt,
                    negative_prompt: a.spec.negative_prompt,
                    width: a.size.width,
                    height: a.size.height,
                    steps: a.spec.steps,
                    guidance_scale: a.spec.guidance_scale,
                    sampler: a
                        .spec
                        .sampler
                        .map(|s| s.id().to_string())
                        .unwrap_or_default(),
                    scheduler: a.spec.scheduler.id().to_string(),
                    guidance_rescale: a.spec.guidance_rescale,
                    init_image: source.map(|s| s.image.to_vec()).unwrap_or_default(),
                    mask: source
                        .and_then(|s| s.mask.as_ref())
                        .map(|m| m.to_vec())
                        .unwrap_or_default(),
                    strength: source.map_or(0.0, |s| s.strength),
                    resize_mode: source
                        .map(|s| s.resize_mode.as_str().to_string())
                        .unwrap_or_default(),
                    mask_blur: source.map_or(0, |s| s.mask_blur),
                    seed: a.spec.seed,
                    task: a.spec.task.as_str().to_string(),
                    upscale: a.spec.upscale.as_ref().map(|u| proto::UpscaleSpec {
                        model: u.model.clone().unwrap_or_default(),
                        passes: u.passes.unwrap_or(0),
                        scale: u.scale.unwrap_or(0.0),
                    }),
                    loras: a
                        .spec
                        .loras
                        .into_iter()
                        .map(|l| proto::LoraRequest {
                            name: l.name,
                            strength: l.strength,
                        })
                        .collect(),
                }),
                deadline_unix_ms: a.deadline_ms,
                trace_id: a.trace_id.unwrap_or_default(),
                batch_group: a.group.id,
                batch_group_size: a.group.size,
                model_id: a.model_id,
            })
        }
        ToNode::Cancel { job_id, lease_id } => coordinator_message::Kind::Cancel(proto::Cancel {
            job_id: job_id.to_string(),
            lease_id: lease_id.to_string(),
        }),
        ToNode::Model { model_id, action } => {
            coordinator_message::Kind::Model(proto::ModelCommand {
                model_id,
                action: action.as_str().to_string(),
            })
        }
    };
    proto::CoordinatorMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_ids_never_pass_inward() {
        let bad = node_message::Kind::Result(proto::JobResult {
            job_id: "not-a-uuid".into(),
            lease_id: LeaseId::random().to_string(),
            png: vec![1],
            elapsed_ms: 1,
            upscaled: false,
            batch_size: 1,
        });
        assert_eq!(report(bad), None);
        let (job, lease) = (JobId::random(), LeaseId::random());
        let good = node_message::Kind::Failed(proto::JobFailed {
            job_id: job.to_string(),
            lease_id: lease.to_string(),
            reason: "oom".into(),
            permanent: true,
        });
        assert_eq!(
            report(good),
            Some(NodeReport::Failed {
                job_id: job,
                lease_id: lease,
                reason: "oom".into(),
                permanent: true
            })
        );
        let listed = running(&[
            proto::RunningJob {
                job_id: job.to_string(),
                lease_id: lease.to_string(),
            },
            proto::RunningJob {
                job_id: "x".into(),
                lease_id: "y".into(),
            },
        ]);
        assert_eq!(listed, vec![(job, lease)]);
    }

    #[test]
    fn registrations_are_checked() {
        let ok = proto::RegisterRequest {
            name: " gpu-1 ".into(),
            backend: "sim".into(),
            family: "sdxl".into(),
            workers: 2,
            ..Default::default()
        };
        let reg = registration(ok.clone()).expect("valid");
        assert_eq!(
            (reg.name.as_str(), reg.family),
            ("gpu-1", ModelFamily::Sdxl)
        );
        for (bad, says) in [
            (
                proto::RegisterRequest {
                    name: " ".into(),
                    ..ok.clone()
                },
                "node name",
            ),
            (
                proto::RegisterRequest {
                    family: "sd9".into(),
                    ..ok.clone()
                },
                "sd9",
            ),
            (
                proto::RegisterRequest {
                    workers: 0,
                    ..ok.clone()
                },
                "at least one worker",
            ),
        ] {
            let e = registration(bad).expect_err("refused").to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}

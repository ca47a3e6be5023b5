//! The session's edge: what the coordinator sends, in the node's own types.
//!
//! Assignments and cancels arrive as protocol messages with ids as strings; here, and only here,
//! they become [`JobId`]s, [`LeaseId`]s and render [`Params`]. A message that does not convert
//! is refused with its reason, never a panic: nothing behind the session sees a protocol type or
//! an unparsed id.

use drover_shared::error::InvalidId;
use drover_shared::ids::{JobId, LeaseId};
use drover_shared::job::{JobTask, UpscaleRequest, UpscaleSpec};
use drover_shared::proto;
use drover_shared::sampler::{SamplerName, SigmaSchedule};

use crate::render::{Group, Lora, Params, Source};

/// A job leased to this node, as the session runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The job.
    pub job_id: JobId,
    /// The lease it runs under: its reports carry it.
    pub lease_id: LeaseId,
    /// Which attempt of the job this is (from 1).
    pub attempt: u32,
    /// The REST request that submitted the job, so logs on both sides join up.
    pub trace_id: String,
    /// What to render.
    pub params: Params,
    /// Super-resolution after rendering, or of the source alone.
    pub upscale: Option<UpscaleSpec>,
    /// What the job does.
    pub task: JobTask,
    /// The lease group it came in (see [`crate::render::Group`]); `None` for a job on its own.
    pub group: Option<Group>,
}

/// An assignment refused at the edge: its ids as sent, to report the failure under, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    /// The job id as sent.
    pub job_id: String,
    /// The lease id as sent.
    pub lease_id: String,
    /// Why it cannot run.
    pub reason: String,
}

impl TryFrom<proto::Assignment> for Assignment {
    type Error = Refused;

    fn try_from(a: proto::Assignment) -> Result<Self, Refused> {
        let refuse = |reason: String| Refused {
            job_id: a.job_id.clone(),
            lease_id: a.lease_id.clone(),
            reason,
        };
        let (job_id, lease_id) = ids(&a.job_id, &a.lease_id).map_err(|e| refuse(e.to_string()))?;
        let Some(spec) = a.spec else {
            return Err(refuse("assignment without a spec".into()));
        };
        let sampler = match spec.sampler.as_str() {
            "" => None,
            name => Some(name.parse::<SamplerName>().map_err(&refuse)?.sampler),
        };
        let schedule = spec.scheduler.parse::<SigmaSchedule>().map_err(&refuse)?;
        let source = source(&spec).map_err(&refuse)?;
        let upscale = upscale(spec.upscale.as_ref()).map_err(&refuse)?;
        let task = match spec.task.as_str() {
            "" | "generate" => JobTask::Generate,
            "upscale" if source.is_none() => {
                return Err(refuse("an upscale job without an image".into()));
            }
            "upscale" if upscale.is_none() => {
                return Err(refuse("an upscale job without its upscale".into()));
            }
            "upscale" => JobTask::Upscale,
            other => return Err(refuse(format!("unknown task `{other}`"))),
        };
        let group = (a.batch_group_size > 1).then_some(Group {
            id: a.batch_group,
            size: a.batch_group_size,
        });
        Ok(Self {
            job_id,
            lease_id,
            attempt: a.attempt,
            group,
            trace_id: a.trace_id,
            params: Params {
                sampler,
                schedule,
                source,
                model: a.model_id,
                ..spec.into()
            },
            upscale,
            task,
        })
    }
}

/// A job's upscale as sent (zeros and empty strings meaning absent), checked by the rules the
/// coordinator applied to the request.
fn upscale(spec: Option<&proto::UpscaleSpec>) -> Result<Option<UpscaleSpec>, String> {
    spec.map(|u| {
        UpscaleRequest {
            model: (!u.model.is_empty()).then(|| u.model.clone()),
            passes: (u.passes > 0).then_some(u.passes),
            scale: (u.scale > 0.0).then_some(u.scale),
        }
        .validate()
        .map_err(|e| format!("{}: {}", e.field, e.message))
    })
    .transpose()
}

/// A job's source image (and mask) as sent; `None` for text-to-image. A mask without an image,
/// a strength outside (0, 1] or an unknown resize mode is refused with what is wrong.
fn source(spec: &proto::JobSpec) -> Result<Option<Source>, String> {
    if spec.init_image.is_empty() {
        if !spec.mask.is_empty() {
            return Err("a mask needs an init_image to inpaint".into());
        }
        return Ok(None);
    }
    if !(spec.strength > 0.0 && spec.strength <= 1.0) {
        return Err(format!("strength must be in (0, 1], not {}", spec.strength));
    }
    // Decoding waits for the worker ([`Source::fit`]): a large image would hold up the session.
    Ok(Some(Source {
        image: spec.init_image.as_slice().into(),
        mask: (!spec.mask.is_empty()).then(|| spec.mask.as_slice().into()),
        strength: spec.strength,
        resize_mode: spec.resize_mode.parse()?,
        mask_blur: spec.mask_blur,
    }))
}

/// The job's parameters; sizes and step counts are checked by the backend that renders them.
/// The sampler is read by [`Assignment`]'s conversion, which can refuse an unknown one.
impl From<proto::JobSpec> for Params {
    fn from(spec: proto::JobSpec) -> Self {
        Self {
            prompt: spec.prompt,
            negative_prompt: spec.negative_prompt,
            width: spec.width as usize,
            height: spec.height as usize,
            steps: spec.steps as usize,
            guidance: spec.guidance_scale,
            guidance_rescale: spec.guidance_rescale,
            sampler: None,
            schedule: SigmaSchedule::Automatic,
            seed: spec.seed,
            source: None,
            model: String::new(),
            loras: spec
                .loras
                .into_iter()
                .map(|l| Lora {
                    name: l.name,
                    strength: l.strength,
                })
                .collect(),
        }
    }
}

/// The job and lease a message names.
pub fn ids(job_id: &str, lease_id: &str) -> Result<(JobId, LeaseId), InvalidId> {
    Ok((job_id.parse()?, lease_id.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(job_id: &str, lease_id: &str, spec: Option<proto::JobSpec>) -> proto::Assignment {
        proto::Assignment {
            job_id: job_id.into(),
            lease_id: lease_id.into(),
            attempt: 2,
            spec,
            deadline_unix_ms: 0,
            trace_id: "req-1".into(),
            ..Default::default()
        }
    }

    fn spec() -> proto::JobSpec {
        proto::JobSpec {
            prompt: "a red fox".into(),
            negative_prompt: "blur".into(),
            width: 640,
            height: 512,
            steps: 4,
            guidance_scale: 1.5,
            sampler: "DPM++ 2M".into(),
            scheduler: "karras".into(),
            guidance_rescale: 0.5,
            seed: 99,
            loras: vec![proto::LoraRequest {
                name: "ink".into(),
                strength: 0.75,
            }],
            ..Default::default()
        }
    }

    use drover_shared::sampler::Sampler;

    fn png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(rgb).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn a_source_image_travels_as_sent_and_is_fitted_by_the_worker() {
        let (job, lease) = (JobId::time_ordered(), LeaseId::random());
        let with = |image: Vec<u8>, mask: Vec<u8>, strength: f64, resize_mode: &str| {
            Assignment::try_from(assignment(
                &job.to_string(),
                &lease.to_string(),
                Some(proto::JobSpec {
                    width: 16,
                    height: 8,
                    init_image: image,
                    mask,
                    strength,
                    resize_mode: resize_mode.into(),
                    ..spec()
                }),
            ))
        };
        let a = with(png(4, 4, &[200; 48]), png(4, 4, &[255; 48]), 0.5, "crop").unwrap();
        let source = a.params.source.unwrap();
        assert_eq!(source.strength, 0.5);
        let fitted = source.fit(16, 8).unwrap();
        assert_eq!(
            fitted.rgb,
            vec![200; 16 * 8 * 3],
            "4×4 cropped to cover 16×8"
        );
        assert_eq!(fitted.mask, Some(vec![255; 16 * 8]));
        for (image, mask, strength, mode, reason) in [
            (
                png(4, 4, &[1; 48]),
                Vec::new(),
                0.0,
                "crop",
                "strength must be in (0, 1]",
            ),
            (
                png(4, 4, &[1; 48]),
                Vec::new(),
                0.5,
                "zoom",
                "unknown resize_mode `zoom`",
            ),
            (
                Vec::new(),
                png(2, 2, &[1; 12]),
                0.5,
                "",
                "a mask needs an init_image",
            ),
        ] {
            let refused = with(image, mask, strength, mode).unwrap_err();
            assert!(refused.reason.contains(reason), "{}", refused.reason);
        }
        // What only decoding finds is refused by the worker, for good, with the reason.
        for (image, mask, reason) in [
            (png(4, 4, &[1; 48]), png(2, 2, &[1; 12]), "the mask is 2×2"),
            (b"GIF8".to_vec(), Vec::new(), "init_image: not a PNG"),
        ] {
            let source = with(image, mask, 0.5, "").unwrap().params.source.unwrap();
            let err = source.fit(16, 8).unwrap_err();
            assert!(
                err.is_permanent() && err.to_string().contains(reason),
                "{err}"
            );
        }
    }

    #[test]
    fn an_assignment_becomes_typed_ids_and_params() {
        let (job, lease) = (JobId::time_ordered(), LeaseId::random());
        let a = Assignment::try_from(assignment(
            &job.to_string(),
            &lease.to_string(),
            Some(spec()),
        ))
        .unwrap();
        // A lease group of more than one job comes through; a group of one is a job alone.
        let mut grouped = assignment(&job.to_string(), &lease.to_string(), Some(spec()));
        grouped.batch_group = 5;
        grouped.batch_group_size = 3;
        assert_eq!(
            Assignment::try_from(grouped.clone()).unwrap().group,
            Some(Group { id: 5, size: 3 })
        );
        grouped.batch_group_size = 1;
        assert_eq!(Assignment::try_from(grouped).unwrap().group, None);
        let want = Assignment {
            job_id: job,
            lease_id: lease,
            attempt: 2,
            group: None,
            trace_id: "req-1".into(),
            params: Params {
                prompt: "a red fox".into(),
                model: String::new(),
                negative_prompt: "blur".into(),
                width: 640,
                height: 512,
                steps: 4,
                guidance: 1.5,
                guidance_rescale: 0.5,
                sampler: Some(Sampler::Dpmpp2m),
                schedule: SigmaSchedule::Karras,
                seed: 99,
                loras: vec![Lora {
                    name: "ink".into(),
                    strength: 0.75,
                }],
                source: None,
            },
            upscale: None,
            task: JobTask::Generate,
        };
        assert_eq!(a, want);
        let upscaled = Assignment::try_from(assignment(
            &job.to_string(),
            &lease.to_string(),
            Some(proto::JobSpec {
                upscale: Some(proto::UpscaleSpec {
                    model: "x4".into(),
                    passes: 0,
                    scale: 2.0,
                }),
                ..spec()
            }),
        ))
        .unwrap();
        assert_eq!(
            upscaled.upscale,
            Some(UpscaleSpec {
                model: Some("x4".into()),
                passes: None,
                scale: Some(2.0),
                elsewhere: false,
            })
        );
    }

    #[test]
    fn malformed_assignments_are_refused_with_the_ids_as_sent() {
        let (job, lease) = (JobId::random().to_string(), LeaseId::random().to_string());
        for (job_id, lease_id, spec, reason) in [
            (
                "job-7",
                lease.as_str(),
                Some(spec()),
                "invalid job id `job-7`",
            ),
            (job.as_str(), "", Some(spec()), "invalid lease id ``"),
            (
                job.as_str(),
                lease.as_str(),
                Some(proto::JobSpec {
                    sampler: "DPM adaptive".into(),
                    ..spec()
                }),
                "unknown sampler",
            ),
            (
                job.as_str(),
                lease.as_str(),
                Some(proto::JobSpec {
                    scheduler: "exponential".into(),
                    ..spec()
                }),
                "unknown scheduler",
            ),
            (
                job.as_str(),
                lease.as_str(),
                Some(proto::JobSpec {
                    upscale: Some(proto::UpscaleSpec {
                        model: String::new(),
                        passes: 5,
                        scale: 0.0,
                    }),
                    ..spec()
                }),
                "upscale.passes: 5 is outside 1..=3",
            ),
            (
                job.as_str(),
                lease.as_str(),
                None,
                "assignment without a spec",
            ),
        ] {
            let refused = Assignment::try_from(assignment(job_id, lease_id, spec)).unwrap_err();
            assert_eq!(
                (refused.job_id.as_str(), refused.lease_id.as_str()),
                (job_id, lease_id)
            );
            assert!(refused.reason.starts_with(reason), "{}", refused.reason);
        }
    }

    #[test]
    fn ids_parse_or_say_which_is_wrong() {
        let (job, lease) = (JobId::random(), LeaseId::random());
        assert_eq!(ids(&job.to_string(), &lease.to_string()), Ok((job, lease)));
        let err = ids(&job.to_string(), "l-1").unwrap_err();
        assert_eq!(err.kind, "lease id");
        let err = ids("j-1", &lease.to_string()).unwrap_err();
        assert_eq!(err.kind, "job id");
    }
}

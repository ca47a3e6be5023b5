//! Upscaling after generation: what a job asks for ([`UpscaleRequest`]), its validated form
//! ([`UpscaleSpec`]) and how it runs on an upscaler of a given scale ([`UpscaleSpec::plan`], the
//! one rule the coordinator's router and the node both apply).

use serde::{Deserialize, Serialize};

use super::{JobSpec, JobTask, ModelDefaults, PRIORITY_RANGE, Size, SourceSpec, check_name};
use crate::error::FieldError;
use crate::sampler::SigmaSchedule;

/// Most upscaler passes one job may ask for.
pub const MAX_UPSCALE_PASSES: u32 = 3;
/// Largest final scale a job may ask for.
pub const MAX_UPSCALE_FACTOR: f64 = 16.0;
/// Largest upscaled image, in pixels (4096×4096).
pub const MAX_UPSCALED_PIXELS: u64 = 4096 * 4096;

/// Super-resolution after generation, as a client asks for it (`upscale` on a job).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpscaleRequest {
    /// Upscaler name (its file's stem under the node's `MODEL_ROOT`, as `GET /v1/upscalers`
    /// lists it); when absent, the first upscaler of the serving node.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
    )]
    pub model: Option<String>,
    /// Passes of the upscaler, 1..=3; when absent, the fewest that reach `scale` (1 without
    /// `scale`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub passes: Option<u32>,
    /// Final size relative to the generated image, in 1..=16: the last pass's output is
    /// resized down to it (a ×4 upscaler and `scale` 2 give twice the sides). When absent,
    /// the upscaler's own scale to the power of `passes`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16))]
    pub scale: Option<f64>,
}

/// Validated upscaling of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpscaleSpec {
    /// Upscaler name; `None`: the serving node's first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Passes asked for; `None`: derived from `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<u32>,
    /// Final scale asked for; `None`: the upscaler's scale to the power of the passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Set at submission when no node both renders the job and holds the upscaler: the render
    /// goes to any node that can make it, and the upscale follows on one that holds it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub elsewhere: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How an upscale runs on an upscaler of a given scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpscalePlan {
    /// Passes of the network.
    pub passes: u32,
    /// Final size relative to the generated image.
    pub factor: f64,
}

impl UpscalePlan {
    /// The final image size for a generated image of `size` (sides rounded to the nearest
    /// pixel).
    pub fn output(&self, size: Size) -> (u64, u64) {
        let side = |s: u32| (f64::from(s) * self.factor).round() as u64;
        (side(size.width), side(size.height))
    }
}

impl UpscaleRequest {
    /// Checks every value, naming the field (under `upscale.`) on error.
    pub fn validate(self) -> Result<UpscaleSpec, FieldError> {
        let model = match self.model.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(name) => {
                check_name("upscale.model", name)?;
                Some(name.to_string())
            }
        };
        if let Some(p) = self.passes
            && !(1..=MAX_UPSCALE_PASSES).contains(&p)
        {
            return Err(FieldError::new(
                "upscale.passes",
                format!("{p} is outside 1..={MAX_UPSCALE_PASSES}"),
            ));
        }
        if let Some(s) = self.scale
            && !(1.0..=MAX_UPSCALE_FACTOR).contains(&s)
        {
            return Err(FieldError::new(
                "upscale.scale",
                format!("{s} is outside 1..={MAX_UPSCALE_FACTOR}"),
            ));
        }
        Ok(UpscaleSpec {
            model,
            passes: self.passes,
            scale: self.scale,
            elsewhere: false,
        })
    }
}

/// A stand-alone upscale as a client submits it (`POST /v1/upscale`): an image and how to
/// upscale it, no model, no prompt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpscaleJobRequest {
    /// The image, base64 PNG or JPEG (a `data:image/…;base64,` prefix is accepted), at most
    /// 16 MiB and 4096×4096 pixels; or `upload:<id>`, an image `POST /v1/uploads` took.
    #[cfg_attr(feature = "openapi", schema(format = Byte))]
    pub image: String,
    /// Upscaler name (`GET /v1/upscalers`); when absent, the first upscaler of the node that
    /// takes the job.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
    )]
    pub model: Option<String>,
    /// Passes, 1..=3; when absent, the fewest that reach `scale` (1 without `scale`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub passes: Option<u32>,
    /// Final scale, 1..=16 (the last pass's output resized down to it); when absent, the
    /// upscaler's scale to the power of `passes`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16))]
    pub scale: Option<f64>,
    /// Scheduling priority, -10..=10 (higher first); 0 when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = -10, maximum = 10))]
    pub priority: Option<i32>,
}

impl UpscaleJobRequest {
    /// Decodes and checks the image and the upscale, naming the field on error: the job to
    /// store (its size the image's own).
    pub fn validate(self) -> Result<JobSpec, FieldError> {
        self.validate_with(&super::source::NoUploads)
    }

    /// [`UpscaleJobRequest::validate`], `image` naming `upload:<id>` looked up in `uploads`.
    pub fn validate_with(
        self,
        uploads: &dyn super::source::Uploads,
    ) -> Result<JobSpec, FieldError> {
        let upscale = UpscaleRequest {
            model: self.model,
            passes: self.passes,
            scale: self.scale,
        }
        .validate()
        .map_err(|e| FieldError {
            field: e.field.trim_start_matches("upscale.").to_string(),
            message: e.message,
        })?;
        let priority = self.priority.unwrap_or(0);
        if !PRIORITY_RANGE.contains(&priority) {
            return Err(FieldError::new(
                "priority",
                format!(
                    "{priority} is outside {}..={}",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ),
            ));
        }
        let source = SourceSpec::image_only("image", &self.image, uploads)?;
        Ok(upscale_job(source, upscale, priority))
    }
}

/// The job that upscales `source` alone.
pub fn upscale_job(source: SourceSpec, upscale: UpscaleSpec, priority: i32) -> JobSpec {
    JobSpec {
        prompt: String::new(),
        negative_prompt: String::new(),
        model: None,
        size: Some(Size {
            width: source.width,
            height: source.height,
        }),
        steps: 0,
        guidance_scale: 0.0,
        sampler: None,
        scheduler: SigmaSchedule::Automatic,
        guidance_rescale: 0.0,
        model_defaults: ModelDefaults::default(),
        seed: 0,
        loras: Vec::new(),
        style: None,
        priority,
        source: Some(Box::new(source)),
        upscale: Some(upscale),
        task: JobTask::Upscale,
    }
}

impl UpscaleSpec {
    /// The passes and final scale on an upscaler of scale `net` (its output sides per input
    /// side), or why it cannot reach what was asked: more than [`MAX_UPSCALE_PASSES`] passes,
    /// or fewer passes than `scale` needs.
    pub fn plan(&self, net: u32) -> Result<UpscalePlan, String> {
        let net = f64::from(net.max(1));
        let reach = |p: u32| net.powi(p as i32);
        let passes = match (self.passes, self.scale) {
            (Some(p), _) => p,
            (None, None) => 1,
            (None, Some(s)) => (1..=MAX_UPSCALE_PASSES)
                .find(|&p| reach(p) >= s - 1e-9)
                .ok_or_else(|| {
                    format!(
                        "scale {s} needs more than {MAX_UPSCALE_PASSES} passes of a ×{net} upscaler"
                    )
                })?,
        };
        if !(1..=MAX_UPSCALE_PASSES).contains(&passes) {
            return Err(format!("{passes} passes: 1..={MAX_UPSCALE_PASSES} run"));
        }
        let factor = match self.scale {
            Some(s) if reach(passes) < s - 1e-9 => {
                return Err(format!(
                    "{passes} pass(es) of a ×{net} upscaler reach ×{}, less than scale {s}",
                    reach(passes)
                ));
            }
            Some(s) => s,
            None => reach(passes),
        };
        Ok(UpscalePlan { passes, factor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(passes: Option<u32>, scale: Option<f64>) -> UpscaleSpec {
        UpscaleSpec {
            model: None,
            passes,
            scale,
            elsewhere: false,
        }
    }

    #[test]
    fn plans_take_the_fewest_passes_that_reach_the_scale() {
        let p = spec(None, None).plan(4).unwrap();
        assert_eq!((p.passes, p.factor), (1, 4.0));
        let p = spec(Some(2), None).plan(2).unwrap();
        assert_eq!((p.passes, p.factor), (2, 4.0));
        let p = spec(None, Some(2.0)).plan(4).unwrap();
        assert_eq!((p.passes, p.factor), (1, 2.0));
        let p = spec(None, Some(6.0)).plan(2).unwrap();
        assert_eq!((p.passes, p.factor), (3, 6.0));
        assert_eq!(
            p.output(Size {
                width: 64,
                height: 72
            }),
            (384, 432)
        );
        let err = spec(None, Some(9.0)).plan(2).unwrap_err();
        assert!(err.contains("more than 3 passes"), "{err}");
        let err = spec(Some(1), Some(8.0)).plan(4).unwrap_err();
        assert!(err.contains("less than scale 8"), "{err}");
    }

    proptest::proptest! {
        /// The plan's rule, stated without its code: passes in 1..=3; the final scale is the
        /// one asked for, else the network's to the power of the passes; never more than the
        /// passes reach; without `passes`, the fewest that reach `scale`; refused exactly when
        /// the passes asked for (or 3) fall short.
        #[test]
        fn plans_follow_the_rule(
            net in 1u32..=8,
            passes in proptest::option::of(1u32..=3),
            scale in proptest::option::of(1.0f64..=16.0),
        ) {
            let reach = |p: u32| f64::from(net).powi(p as i32);
            match spec(passes, scale).plan(net) {
                Ok(plan) => {
                    proptest::prop_assert!((1..=3).contains(&plan.passes));
                    proptest::prop_assert!(plan.factor <= reach(plan.passes) + 1e-9);
                    proptest::prop_assert_eq!(plan.factor, scale.unwrap_or(reach(plan.passes)));
                    if let Some(p) = passes {
                        proptest::prop_assert_eq!(plan.passes, p);
                    } else if let Some(s) = scale {
                        proptest::prop_assert!(plan.passes == 1 || reach(plan.passes - 1) < s - 1e-9);
                    } else {
                        proptest::prop_assert_eq!(plan.passes, 1);
                    }
                }
                Err(_) => {
                    let s = scale.expect("only a scale can be out of reach");
                    proptest::prop_assert!(reach(passes.unwrap_or(3)) < s - 1e-9);
                }
            }
        }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let bad = |r: UpscaleRequest| r.validate().unwrap_err().field;
        assert_eq!(
            bad(UpscaleRequest {
                passes: Some(4),
                ..Default::default()
            }),
            "upscale.passes"
        );
        assert_eq!(
            bad(UpscaleRequest {
                scale: Some(0.5),
                ..Default::default()
            }),
            "upscale.scale"
        );
        assert_eq!(
            bad(UpscaleRequest {
                model: Some("../x".into()),
                ..Default::default()
            }),
            "upscale.model"
        );
        let ok = UpscaleRequest {
            model: Some(" x4 ".into()),
            passes: Some(3),
            scale: Some(16.0),
        }
        .validate()
        .unwrap();
        assert_eq!(ok.model.as_deref(), Some("x4"));
    }

    #[test]
    fn scales_exactly_reached_take_no_extra_pass() {
        // ×4 reaches 4 in one pass (not two), and one pass of ×4 asked for 4 is no shortfall.
        let p = spec(None, Some(4.0)).plan(4).unwrap();
        assert_eq!((p.passes, p.factor), (1, 4.0));
        let p = spec(Some(1), Some(4.0)).plan(4).unwrap();
        assert_eq!((p.passes, p.factor), (1, 4.0));
        let p = spec(None, Some(16.0)).plan(4).unwrap();
        assert_eq!((p.passes, p.factor), (2, 16.0));
        // The farm's limit, stated on its own.
        assert_eq!(MAX_UPSCALED_PIXELS, 16_777_216);
    }

    #[test]
    fn a_split_upscale_says_so_only_when_it_is_one() {
        let mut s = spec(Some(1), None);
        let plain = serde_json::to_value(&s).unwrap();
        assert!(plain.get("elsewhere").is_none(), "{plain}");
        s.elsewhere = true;
        assert_eq!(serde_json::to_value(&s).unwrap()["elsewhere"], true);
    }

    #[test]
    fn an_upscale_job_checks_its_priority() {
        use base64::Engine;
        let mut png = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png, 8, 8);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[7u8; 8 * 8 * 3]).unwrap();
        }
        let job = |priority: Option<i32>| UpscaleJobRequest {
            image: base64::engine::general_purpose::STANDARD.encode(&png),
            model: None,
            passes: None,
            scale: Some(2.0),
            priority,
        };
        assert_eq!(job(Some(11)).validate().unwrap_err().field, "priority");
        assert_eq!(job(Some(-11)).validate().unwrap_err().field, "priority");
        let spec = job(Some(10)).validate().unwrap();
        assert_eq!((spec.priority, spec.task), (10, JobTask::Upscale));
        assert_eq!(job(None).validate().unwrap().priority, 0);
    }
}

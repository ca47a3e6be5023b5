//! The router's rules one by one: what a node can serve (family, size, sampler, LoRAs, source
//! images, upscalers) and the reason named when it cannot.

use super::*;
use crate::records::UpscalerAdvert;
use drover_shared::job::{JobRequest, LoraRef};

fn job(json: &str) -> JobSpec {
    JobRequest::from_json(json.as_bytes())
        .unwrap()
        .validate(|| 1)
        .unwrap()
}

fn node(i: u8, family: ModelFamily) -> NodeView<'static> {
    NodeView {
        id: NodeId::from_bytes([i; 16]),
        name: "n",
        family,
        model_id: "abcd",
        max_pixels: 1024 * 1024,
        sizes: &[],
        samplers: &[],
        img2img: false,
        inpaint: false,
        loras: &[],
        upscalers: &[],
        online: true,
        suspect: false,
        draining: false,
        free_slots: 1,
        max_batch: 1,
        workers: 2,
        loaded: &[0],
        pixel_steps_per_second: 0.0,
        models: &[],
        resident: None,
        residency: &[],
    }
}

const fn square(side: u32) -> Size {
    Size {
        width: side,
        height: side,
    }
}

/// What a node may render: any size, or only the sizes a fixed-shape model was compiled for.
static FIXED_SIZES: [&[Size]; 3] = [&[], &[square(512)], &[square(384), square(1024)]];

#[test]
fn samplers_and_their_step_ranges_are_named() {
    const LCM: &[Sampler] = &[Sampler::Lcm];
    const STANDARD: &[Sampler] = &[Sampler::Dpmpp2m, Sampler::Euler, Sampler::EulerA];
    let lcm = NodeView {
        samplers: LCM,
        ..node(1, ModelFamily::Sd15)
    };
    let standard = NodeView {
        samplers: STANDARD,
        ..node(2, ModelFamily::Sd15)
    };
    let unstated = node(3, ModelFamily::Sd15);
    let check = |json: &str, n: &NodeView<'_>| capability(&job(json), n).err();
    // An A1111 client's ordinary request: refused by the LCM node, with the reason.
    let a1111 = r#"{"prompt":"x","sampler":"Euler a","steps":20,"guidance_scale":7}"#;
    assert_eq!(
        check(a1111, &lcm),
        Some(SkipReason::SamplerNotServed {
            sampler: Sampler::EulerA,
            samplers: LCM.to_vec()
        })
    );
    assert_eq!(check(a1111, &standard), None);
    assert_eq!(check(a1111, &unstated), None);
    // No sampler named: the node's default decides the step range.
    assert_eq!(
        check(r#"{"prompt":"x","steps":20}"#, &lcm),
        Some(SkipReason::TooManySteps {
            sampler: Sampler::Lcm,
            steps: 20,
            max_steps: 8
        })
    );
    assert_eq!(check(r#"{"prompt":"x","steps":8}"#, &lcm), None);
    assert_eq!(check(r#"{"prompt":"x","steps":150}"#, &standard), None);
    assert_eq!(
        check(r#"{"prompt":"x","sampler":"lcm"}"#, &standard),
        Some(SkipReason::SamplerNotServed {
            sampler: Sampler::Lcm,
            samplers: STANDARD.to_vec()
        })
    );
    assert_eq!(
        check(
            r#"{"prompt":"x","sampler":"DPM++ 2M Karras","steps":30}"#,
            &standard
        ),
        None
    );
}

#[test]
fn lcm_on_a_standard_model_needs_one_of_its_lcm_loras() {
    const STANDARD: &[Sampler] = &[Sampler::Dpmpp2m, Sampler::Euler];
    let loras = [
        LoraAdvert {
            name: "ink".into(),
            family: ModelFamily::Sd15,
            lcm: false,
        },
        LoraAdvert {
            name: "lcm-lora-sdv1-5".into(),
            family: ModelFamily::Sd15,
            lcm: true,
        },
    ];
    let with_lcm_lora = NodeView {
        samplers: STANDARD,
        loras: &loras,
        ..node(1, ModelFamily::Sd15)
    };
    let lcm_model = NodeView {
        samplers: &[Sampler::Lcm],
        ..node(2, ModelFamily::Sd15)
    };
    let check = |json: &str, n: &NodeView<'_>| capability(&job(json), n).err();
    let lcm_with = r#"{"prompt":"x","sampler":"lcm","steps":4,
        "loras":[{"name":"lcm-lora-sdv1-5","strength":1.0}]}"#;
    assert_eq!(check(lcm_with, &with_lcm_lora), None);
    // The LCM step range holds with the LoRA too.
    let too_many = r#"{"prompt":"x","sampler":"lcm","steps":20,
        "loras":[{"name":"lcm-lora-sdv1-5","strength":1.0}]}"#;
    assert_eq!(
        check(too_many, &with_lcm_lora),
        Some(SkipReason::TooManySteps {
            sampler: Sampler::Lcm,
            steps: 20,
            max_steps: 8
        })
    );
    // Without it (or with another LoRA only) the node names the LoRA that would do.
    for json in [
        r#"{"prompt":"x","sampler":"lcm"}"#,
        r#"{"prompt":"x","sampler":"lcm","loras":[{"name":"ink","strength":1.0}]}"#,
    ] {
        assert_eq!(
            check(json, &with_lcm_lora),
            Some(SkipReason::LcmLoraNeeded {
                lcm_loras: vec!["lcm-lora-sdv1-5".into()]
            }),
            "{json}"
        );
    }
    // An LCM-LoRA job with a standard sampler is the client's choice; an LCM model needs none.
    let euler_with = r#"{"prompt":"x","sampler":"euler",
        "loras":[{"name":"lcm-lora-sdv1-5","strength":1.0}]}"#;
    assert_eq!(check(euler_with, &with_lcm_lora), None);
    assert_eq!(check(r#"{"prompt":"x","sampler":"lcm"}"#, &lcm_model), None);
}

#[test]
fn family_and_size_and_liveness_are_named() {
    let sd15 = node(1, ModelFamily::Sd15);
    let check = |json: &str, n: &NodeView<'_>| eligibility(&job(json), n).err();
    assert_eq!(check(r#"{"prompt":"x"}"#, &sd15), None);
    assert_eq!(
        check(r#"{"prompt":"x","model":"sdxl"}"#, &sd15),
        Some(SkipReason::WrongFamily {
            wanted: ModelFamily::Sdxl,
            has: ModelFamily::Sd15
        })
    );
    assert_eq!(
        check(r#"{"prompt":"x","size":"2048x1024"}"#, &sd15),
        Some(SkipReason::TooLarge {
            pixels: 2048 * 1024,
            max_pixels: 1024 * 1024
        })
    );
    // A model named by its id (any case) is served by the node that has it.
    assert_eq!(check(r#"{"prompt":"x","model":"ABCD"}"#, &sd15), None);
    assert_eq!(
        check(r#"{"prompt":"x","model":"ffff"}"#, &sd15),
        Some(SkipReason::WrongModel {
            wanted: "ffff".into(),
            has: "abcd".into()
        })
    );
    let offline = NodeView {
        online: false,
        ..sd15.clone()
    };
    assert_eq!(
        check(r#"{"prompt":"x"}"#, &offline),
        Some(SkipReason::Offline)
    );
    let busy = NodeView {
        free_slots: 0,
        ..sd15.clone()
    };
    assert_eq!(check(r#"{"prompt":"x"}"#, &busy), Some(SkipReason::Busy));
    let refiner = node(2, ModelFamily::SdxlRefiner);
    assert_eq!(
        check(r#"{"prompt":"x"}"#, &refiner),
        Some(SkipReason::NotTextToImage {
            has: ModelFamily::SdxlRefiner
        })
    );
    // A fixed-shape (RKNN) node renders its sizes only; a job without a size gets one.
    let npu = NodeView {
        sizes: FIXED_SIZES[2],
        samplers: &[],
        ..sd15.clone()
    };
    assert_eq!(check(r#"{"prompt":"x"}"#, &npu), None);
    assert_eq!(check(r#"{"prompt":"x","size":"1024x1024"}"#, &npu), None);
    assert_eq!(
        check(r#"{"prompt":"x","size":"512x512"}"#, &npu),
        Some(SkipReason::SizeNotServed {
            size: square(512),
            sizes: vec![square(384), square(1024)]
        })
    );
}

#[test]
fn loras_must_exist_and_match_the_node_family() {
    let loras = [
        LoraAdvert {
            name: "ink".into(),
            family: ModelFamily::Sd15,
            lcm: false,
        },
        LoraAdvert {
            name: "xl-ink".into(),
            family: ModelFamily::Sdxl,
            lcm: false,
        },
    ];
    let sd15 = NodeView {
        loras: &loras,
        ..node(1, ModelFamily::Sd15)
    };
    let mut spec = job(r#"{"prompt":"x"}"#);
    spec.loras = vec![LoraRef {
        name: "ink".into(),
        strength: 1.0,
    }];
    assert_eq!(eligibility(&spec, &sd15), Ok(()));
    spec.loras = vec![LoraRef {
        name: "xl-ink".into(),
        strength: 1.0,
    }];
    assert_eq!(
        eligibility(&spec, &sd15),
        Err(SkipReason::LoraBaseMismatch {
            lora: "xl-ink".into(),
            lora_family: ModelFamily::Sdxl,
            node_family: ModelFamily::Sd15
        })
    );
    spec.loras = vec![LoraRef {
        name: "nope".into(),
        strength: 1.0,
    }];
    assert_eq!(
        eligibility(&spec, &sd15),
        Err(SkipReason::MissingLora {
            lora: "nope".into()
        })
    );
}

#[test]
fn feasibility_ignores_load_but_not_capability() {
    let busy_offline = NodeView {
        online: false,
        free_slots: 0,
        ..node(1, ModelFamily::Sdxl)
    };
    assert_eq!(
        feasibility(
            &job(r#"{"prompt":"x","model":"sdxl"}"#),
            std::slice::from_ref(&busy_offline)
        ),
        Ok(())
    );
    let reasons =
        feasibility(&job(r#"{"prompt":"x","model":"sd15"}"#), &[busy_offline]).unwrap_err();
    assert_eq!(reasons.len(), 1);
    assert!(matches!(reasons[0].reason, SkipReason::WrongFamily { .. }));
    assert!(
        feasibility(&job(r#"{"prompt":"x"}"#), &[])
            .unwrap_err()
            .is_empty()
    );
}

#[test]
fn source_images_go_only_to_nodes_that_can_encode_them() {
    let source = drover_shared::job::SourceSpec {
        image: std::sync::Arc::from(vec![1u8]),
        mask: None,
        strength: 0.5,
        resize_mode: Default::default(),
        width: 64,
        height: 64,
        image_bytes: 1,
        mask_bytes: 0,
        mask_blur: 0,
    };
    let img2img = JobSpec {
        source: Some(Box::new(source.clone())),
        ..job(r#"{"prompt":"x"}"#)
    };
    let inpaint = JobSpec {
        source: Some(Box::new(drover_shared::job::SourceSpec {
            mask: Some(std::sync::Arc::from(vec![2u8])),
            ..source
        })),
        ..job(r#"{"prompt":"x"}"#)
    };
    let text_only = node(1, ModelFamily::Sd15);
    let encodes = NodeView {
        img2img: true,
        ..node(2, ModelFamily::Sd15)
    };
    let both = NodeView {
        img2img: true,
        inpaint: true,
        ..node(3, ModelFamily::Sd15)
    };
    assert_eq!(
        capability(&img2img, &text_only),
        Err(SkipReason::Img2ImgNotServed)
    );
    assert_eq!(capability(&img2img, &encodes), Ok(()));
    assert_eq!(
        capability(&inpaint, &encodes),
        Err(SkipReason::InpaintingNotServed)
    );
    assert_eq!(capability(&inpaint, &both), Ok(()));
    assert_eq!(capability(&job(r#"{"prompt":"x"}"#), &text_only), Ok(()));
    let reason = serde_json::to_value(SkipReason::Img2ImgNotServed).unwrap();
    assert_eq!(reason["reason"], "img2img_not_served");
}

#[test]
fn upscale_jobs_go_only_to_nodes_holding_an_upscaler_that_reaches_the_scale() {
    let upscalers: &'static [UpscalerAdvert] = Box::leak(Box::new([
        UpscalerAdvert {
            name: "x4".into(),
            scale: 4,
            network: "SRVGGNetCompact ×4".into(),
            ms_per_megapixel: 0.0,
        },
        UpscalerAdvert {
            name: "x2".into(),
            scale: 2,
            network: "RRDBNet ×2".into(),
            ms_per_megapixel: 0.0,
        },
    ]));
    let plain = node(1, ModelFamily::Sd15);
    let holder = NodeView {
        upscalers,
        max_pixels: 2 << 20,
        ..node(2, ModelFamily::Sd15)
    };
    let any = job(r#"{"prompt":"x","size":"512x512","upscale":{}}"#);
    assert_eq!(
        capability(&any, &plain),
        Err(SkipReason::UpscalerNotServed {
            upscaler: None,
            upscalers: Vec::new()
        })
    );
    assert_eq!(capability(&any, &holder), Ok(()));
    let named = job(r#"{"prompt":"x","upscale":{"model":"x8"}}"#);
    assert_eq!(
        capability(&named, &holder),
        Err(SkipReason::UpscalerNotServed {
            upscaler: Some("x8".into()),
            upscalers: vec!["x4".into(), "x2".into()]
        })
    );
    // The default (first) upscaler is ×4: 1024² reaches exactly 4096², one row more does not.
    let edge = job(r#"{"prompt":"x","size":"1024x1024","upscale":{}}"#);
    assert_eq!(capability(&edge, &holder), Ok(()));
    let over = job(r#"{"prompt":"x","size":"1024x1032","upscale":{}}"#);
    assert_eq!(
        capability(&over, &holder),
        Err(SkipReason::UpscaleTooLarge {
            pixels: 4096 * 4128,
            max_pixels: 4096 * 4096
        })
    );
    // Two passes of the ×2 reach ×3 (then resized down); one pass does not.
    let three = job(r#"{"prompt":"x","size":"512x512","upscale":{"model":"x2","scale":3}}"#);
    assert_eq!(capability(&three, &holder), Ok(()));
    let short = job(r#"{"prompt":"x","upscale":{"model":"x2","passes":1,"scale":3}}"#);
    assert!(matches!(
        capability(&short, &holder),
        Err(SkipReason::UpscaleNotReached { .. })
    ));
    let reason = serde_json::to_value(capability(&any, &plain).unwrap_err()).unwrap();
    assert_eq!(reason["reason"], "upscaler_not_served");
}

#[test]
fn an_upscale_no_renderer_holds_follows_on_another_node() {
    let upscalers: &'static [UpscalerAdvert] = Box::leak(Box::new([UpscalerAdvert {
        name: "x4".into(),
        scale: 4,
        network: "SRVGGNetCompact ×4".into(),
        ms_per_megapixel: 0.0,
    }]));
    let renderer = NodeView {
        max_pixels: 8 << 20,
        ..node(1, ModelFamily::Sdxl)
    };
    // An SD1.5 node holding the upscaler cannot render an SDXL job.
    let upscaler = NodeView {
        upscalers,
        ..node(2, ModelFamily::Sd15)
    };
    let nodes = [renderer.clone(), upscaler.clone()];
    let mut sdxl = job(r#"{"prompt":"x","model":"sdxl","size":"512x512","upscale":{}}"#);
    assert!(feasibility(&sdxl, &nodes).is_err(), "no node does both");
    assert!(follow_up_feasible(&sdxl, &nodes));
    sdxl.upscale.as_mut().expect("an upscale").elsewhere = true;
    assert_eq!(capability(&sdxl, &renderer), Ok(()), "renders without it");
    // Once rendered, the upscale goes to the node that holds it, whatever its family.
    let mut then = sdxl.clone();
    then.task = drover_shared::job::JobTask::Upscale;
    assert_eq!(capability(&then, &upscaler), Ok(()));
    assert!(capability(&then, &renderer).is_err());
    // The index looks past the SDXL job's family for it, as the scan does.
    assert_eq!(RoutingIndex::new(&nodes).pick(&then, &nodes, 0), Some(1));
    assert_eq!(pick(&then, &nodes, 0), Ok(upscaler.id));
    // Not split when the upscale could not run on the render anywhere (past the limit), or
    // when nobody holds the upscaler.
    let huge = job(r#"{"prompt":"x","model":"sdxl","size":"2048x2048","upscale":{}}"#);
    assert!(!follow_up_feasible(&huge, &nodes));
    let unknown = job(r#"{"prompt":"x","model":"sdxl","upscale":{"model":"x8"}}"#);
    assert!(!follow_up_feasible(&unknown, &nodes));
    assert!(!follow_up_feasible(&job(r#"{"prompt":"x"}"#), &nodes));
}

mod dispatch;
mod models;

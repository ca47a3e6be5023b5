use super::*;
use proptest::prelude::*;

fn parse(json: &str) -> Result<JobSpec, FieldError> {
    JobRequest::from_json(json.as_bytes())?.validate(|| 42)
}

fn field_of(json: &str) -> String {
    match parse(json) {
        Ok(spec) => panic!("expected an error for {json}, got {spec:?}"),
        Err(e) => e.field,
    }
}

#[test]
fn minimal_request_gets_defaults() {
    let spec = parse(r#"{"prompt":"a cat"}"#).unwrap();
    assert_eq!(spec.steps, DEFAULT_STEPS);
    assert_eq!(spec.seed, 42);
    assert_eq!(spec.size, None);
    assert_eq!(
        spec.size_on(ModelFamily::Sdxl, &[]),
        Size {
            width: 1024,
            height: 1024
        }
    );
    assert_eq!(
        spec.size_on(ModelFamily::Sd15, &[]),
        Size {
            width: 512,
            height: 512
        }
    );
    // A node compiled for fixed sizes renders the default when it can, else its first size.
    let fixed = |w, h| Size {
        width: w,
        height: h,
    };
    let both = [fixed(384, 384), fixed(512, 512)];
    assert_eq!(spec.size_on(ModelFamily::Sd15, &both), fixed(512, 512));
    assert_eq!(spec.size_on(ModelFamily::Sd15, &both[..1]), fixed(384, 384));
    let sized = parse(r#"{"prompt":"a cat","size":"640x480"}"#).unwrap();
    assert_eq!(sized.size_on(ModelFamily::Sd15, &both), fixed(640, 480));
    assert_eq!(spec.model, None);
}

#[test]
fn whole_numbers_may_be_written_as_floats() {
    let spec = parse(
        r#"{"prompt":"a cat","steps":5.0,"seed":7.0,"priority":-2.0,
            "style_lora":{"style":"ink","level":2.0}}"#,
    )
    .unwrap();
    assert_eq!((spec.steps, spec.seed, spec.priority), (5, 7, -2));
    assert_eq!(spec.style.map(|s| s.level), Some(2));
    for (json, field) in [
        (r#"{"prompt":"a","steps":5.5}"#, "steps"),
        (r#"{"prompt":"a","steps":-1}"#, "steps"),
        (r#"{"prompt":"a","steps":"5"}"#, "steps"),
        (r#"{"prompt":"a","priority":1e10}"#, "priority"),
        (r#"{"prompt":"a","seed":1e300}"#, "seed"),
        (
            r#"{"prompt":"a","style_lora":{"style":"ink","level":0.5}}"#,
            "style_lora.level",
        ),
    ] {
        assert_eq!(field_of(json), field, "{json}");
    }
    let spec = parse(r#"{"prompt":"a cat","steps":null,"seed":null}"#).unwrap();
    assert_eq!((spec.steps, spec.seed), (DEFAULT_STEPS, 42));
}

#[test]
fn full_request_is_kept() {
    let spec = parse(
        r#"{"prompt":"a cat","negative_prompt":"dog","model":"sdxl","size":"768x1024",
            "steps":8,"guidance_scale":2.5,"seed":7,"loras":[{"name":"pixel-art","strength":0.8}],
            "style_lora":{"style":"ink","level":2},"priority":3}"#,
    )
    .unwrap();
    assert_eq!(spec.model, Some(ModelSelector::Family(ModelFamily::Sdxl)));
    assert_eq!(
        spec.size,
        Some(Size {
            width: 768,
            height: 1024
        })
    );
    assert_eq!((spec.steps, spec.seed, spec.priority), (8, 7, 3));
    assert_eq!(
        spec.loras,
        vec![LoraRef {
            name: "pixel-art".into(),
            strength: 0.8
        }]
    );
    assert_eq!(
        spec.style,
        Some(StyleRef {
            style: "ink".into(),
            level: 2
        })
    );
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        (r#"{"prompt":"x","bogus":1}"#, "bogus"),
        (r#"{"prompt":"x","steps":"many"}"#, "steps"),
        (r#"{"prompt":"x","steps":0}"#, "steps"),
        (r#"{"prompt":"x","steps":151}"#, "steps"),
        (r#"{"prompt":"x","sampler":"DPM adaptive"}"#, "sampler"),
        (r#"{"prompt":"x","sampler":7}"#, "sampler"),
        (r#"{"prompt":"x","scheduler":"exponential"}"#, "scheduler"),
        (
            r#"{"prompt":"x","sampler":"LCM","scheduler":"karras"}"#,
            "scheduler",
        ),
        (r#"{"prompt":"x","sampler":"DDIM Karras"}"#, "scheduler"),
        (
            r#"{"prompt":"x","guidance_rescale":1.5}"#,
            "guidance_rescale",
        ),
        (r#"{"prompt":"x","size":"512"}"#, "size"),
        (r#"{"prompt":"x","size":"513x512"}"#, "size"),
        (r#"{"prompt":"x","size":"4096x512"}"#, "size"),
        (r#"{"prompt":"x","size":"56x512"}"#, "size"),
        (r#"{"prompt":"x","guidance_scale":20.5}"#, "guidance_scale"),
        (r#"{"prompt":"x","guidance_scale":-1}"#, "guidance_scale"),
        (r#"{"prompt":"x","seed":-1}"#, "seed"),
        (r#"{"prompt":"x","seed":2147483648}"#, "seed"),
        (r#"{"prompt":"x","model":"sd 3"}"#, "model"),
        (r#"{"prompt":"x","model":"sdxl_refiner"}"#, "model"),
        (
            r#"{"prompt":"x","loras":[{"name":"../etc"}]}"#,
            "loras[0].name",
        ),
        (
            r#"{"prompt":"x","loras":[{"name":"a","strength":9}]}"#,
            "loras[0].strength",
        ),
        (
            r#"{"prompt":"x","loras":[{"name":"a"},{"name":"a"}]}"#,
            "loras[1].name",
        ),
        (
            r#"{"prompt":"x","loras":[{"name":"a","extra":1}]}"#,
            "extra",
        ),
        (r#"{"prompt":"x","priority":11}"#, "priority"),
        (r#"{"prompt":"  "}"#, "prompt"),
        (r#"{"steps":4}"#, "body"),
        (r#"{"prompt":"x""#, "body"),
        (r#"[1,2]"#, "body"),
    ];
    for (json, field) in cases {
        assert_eq!(field_of(json), field, "for {json}");
    }
    let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(MAX_PROMPT_CHARS + 1));
    assert_eq!(field_of(&long), "prompt");
}

#[test]
fn edges_of_ranges_are_accepted() {
    for json in [
        r#"{"prompt":"x","size":"64x2048","steps":1,"guidance_scale":0,"seed":0}"#,
        r#"{"prompt":"x","size":"2048x64","steps":150,"guidance_scale":20,"seed":2147483647}"#,
        r#"{"prompt":"x","model":"0123abcd"}"#,
        r#"{"prompt":"x","style_lora":{"style":"ink","level":0}}"#,
    ] {
        assert!(parse(json).is_ok(), "{json}");
    }
}

/// The size rule stated independently of the constants: sides 64..=2048, multiples of 8.
fn side_ok(v: u32) -> bool {
    (64..=2048).contains(&v) && v.is_multiple_of(8)
}

/// The seed rule stated independently: 0..=2^31 − 1.
fn seed_ok(seed: i64) -> bool {
    (0..=2_147_483_647).contains(&seed)
}

/// Sides near the edges of the rule, on and off the grid, and multiples of 8 across the range.
fn side() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0, 1, 7, 8, 56, 63, 64, 65, 72, 2040, 2047, 2048, 2049, 2056, 4096
        ]),
        (0u32..=270).prop_map(|k| k * 8),
        0u32..3000,
    ]
}

/// Seeds at and around the ends of the range, inside it, and anywhere.
fn seed() -> impl Strategy<Value = i64> {
    prop_oneof![
        prop::sample::select(vec![
            i64::MIN,
            -2_147_483_648,
            -1,
            0,
            1,
            2_147_483_646,
            2_147_483_647,
            2_147_483_648,
            4_294_967_295,
            i64::MAX,
        ]),
        0i64..=2_147_483_647,
        any::<i64>(),
    ]
}

#[test]
fn every_width_up_to_2100_is_judged_against_each_edge_height() {
    let mut accepted = 0;
    for w in 0..=2100u32 {
        for h in [0, 63, 64, 512, 2048, 2049] {
            let parsed = format!("{w}x{h}").parse::<Size>();
            assert_eq!(parsed.is_ok(), side_ok(w) && side_ok(h), "{w}x{h}");
            accepted += usize::from(parsed.is_ok());
        }
    }
    // 249 good widths (64, 72, ..., 2048) × 3 good heights.
    assert_eq!(accepted, 249 * 3);
}

#[test]
fn seeds_at_the_edges_of_the_range() {
    for (seed, ok) in [
        (-1, false),
        (0, true),
        (2_147_483_647, true),
        (2_147_483_648, false),
    ] {
        let req = JobRequest {
            prompt: "x".into(),
            seed: Some(seed),
            ..Default::default()
        };
        assert_eq!(req.validate(|| 0).is_ok(), ok, "{seed}");
    }
}

proptest! {
    #[test]
    fn sizes_are_accepted_exactly_when_in_range(w in side(), h in side()) {
        let parsed = format!("{w}x{h}").parse::<Size>();
        prop_assert_eq!(parsed.is_ok(), side_ok(w) && side_ok(h));
        if let Ok(size) = parsed {
            prop_assert_eq!((size.width, size.height), (w, h));
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        // Random bytes are almost never a JSON object: refused as a whole body, never a field.
        match JobRequest::from_json(&body).and_then(|r| r.validate(|| 1)) {
            Ok(spec) => prop_assert!(!spec.prompt.trim().is_empty()),
            Err(e) => prop_assert!(!e.field.is_empty() && !e.message.is_empty()),
        }
    }

}

proptest! {
    // Cheap cases (microseconds each): enough of them that every field's edge meets a body
    // that is otherwise valid.
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// JSON objects of the request's own fields with values at the edges of each field's limits
    /// (and of the wrong type): accepted ones obey the limits; a refusal names a field the body has (or `body`), never a panic.
    #[test]
    fn json_bodies_are_accepted_within_limits_or_refused_by_a_field_they_have(
        fields in proptest::collection::btree_map(
            prop::sample::select(vec![
                "negative_prompt", "model", "size", "steps", "sampler", "scheduler",
                "guidance_rescale", "guidance_scale", "seed", "loras", "priority", "strength",
                "resize_mode", "colour",
            ]),
            // Each draw picks a kind; the body's key decides below which values make sense.
            0usize..1000,
            0..4,
        ),
        prompt in prop_oneof![
            8 => Just(serde_json::json!("a cat")),
            1 => Just(serde_json::json!(" ")),
            1 => Just(serde_json::json!(null)),
        ],
    ) {
        let mut body = serde_json::Map::new();
        if !prompt.is_null() {
            body.insert("prompt".into(), prompt);
        }
        // Values at the edges of each field's limits, on both sides, and of the wrong type.
        let edges = |key: &str| -> Vec<serde_json::Value> {
            use serde_json::json;
            match key {
                "steps" => vec![json!(0), json!(1), json!(150), json!(151), json!(-1), json!(2.5)],
                "guidance_scale" => vec![json!(-0.01), json!(0.0), json!(20.0), json!(20.01)],
                "guidance_rescale" => vec![json!(-0.01), json!(0.0), json!(1.0), json!(1.01)],
                "seed" => vec![json!(-1), json!(0), json!(2_147_483_647u64), json!(2_147_483_648u64)],
                "priority" => vec![json!(-11), json!(-10), json!(10), json!(11)],
                "strength" => vec![json!(0.0), json!(0.5), json!(1.0), json!(1.01)],
                "size" => vec![json!("64x64"), json!("56x64"), json!("2048x2048"), json!("2056x64"), json!("65x64")],
                "model" => vec![json!("sd15"), json!("sdxl_refiner"), json!("abc123"), json!("z z")],
                "sampler" => vec![json!("Euler a"), json!("DPM adaptive"), json!("lcm")],
                "scheduler" => vec![json!("karras"), json!("exponential"), json!(null)],
                "loras" => vec![json!([{"name": "ink", "strength": 4.0}]), json!([{"name": "ink", "strength": 4.5}]), json!([{"name": ".x"}])],
                "resize_mode" => vec![json!("crop"), json!("zoom")],
                _ => vec![json!("x"), json!(1), json!(null), json!({"a": 1})],
            }
        };
        for (key, pick) in &fields {
            let values = edges(key);
            body.insert((*key).to_string(), values[*pick % values.len()].clone());
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        match JobRequest::from_json(&bytes).and_then(|r| r.validate(|| 1)) {
            Ok(spec) => {
                prop_assert!(!spec.prompt.trim().is_empty());
                prop_assert!((1..=150).contains(&spec.steps));
                prop_assert!((0.0..=20.0).contains(&spec.guidance_scale));
                prop_assert!((-10..=10).contains(&spec.priority));
                prop_assert!(spec.seed <= 2_147_483_647);
                prop_assert!(spec.size.is_none_or(|s| side_ok(s.width) && side_ok(s.height)));
            }
            Err(e) => {
                let root = e.field.split(['[', '.']).next().unwrap_or_default();
                prop_assert!(
                    root == "body" || root == "prompt" || fields.contains_key(root),
                    "refused naming `{}`, not in {:?}: {}", e.field, fields.keys(), e.message
                );
            }
        }
    }

    #[test]
    fn validated_seeds_are_in_range(seed in seed()) {
        let req = JobRequest { prompt: "x".into(), seed: Some(seed), ..Default::default() };
        match req.validate(|| 0) {
            Ok(spec) => {
                prop_assert!(seed_ok(seed), "{} accepted", seed);
                prop_assert_eq!(spec.seed as i64, seed);
            }
            Err(e) => {
                prop_assert!(!seed_ok(seed), "{} refused", seed);
                prop_assert_eq!(e.field, "seed");
            }
        }
    }
}

#[test]
fn left_out_steps_and_guidance_take_the_serving_samplers_defaults() {
    use crate::sampler::Sampler;
    let spec = |json: &str| {
        JobRequest::from_json(json.as_bytes())
            .unwrap()
            .validate(|| 1)
            .unwrap()
    };
    let bare = spec(r#"{"prompt":"x"}"#);
    assert_eq!(
        (
            bare.steps_with(Some(Sampler::Lcm)),
            bare.guidance_with(Some(Sampler::Lcm))
        ),
        (4, 1.5)
    );
    assert_eq!(
        (
            bare.steps_with(Some(Sampler::Dpmpp2m)),
            bare.guidance_with(Some(Sampler::Dpmpp2m))
        ),
        (20, 7.0)
    );
    // A node that states no samplers gets the request defaults.
    assert_eq!(
        (bare.steps_with(None), bare.guidance_with(None)),
        (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    );
    // A named sampler decides, whatever the node's default.
    let euler = spec(r#"{"prompt":"x","sampler":"Euler a"}"#);
    assert_eq!(euler.steps_with(Some(Sampler::Lcm)), 20);
    // Values given are kept.
    let given = spec(r#"{"prompt":"x","steps":6,"guidance_scale":2}"#);
    assert_eq!(
        (
            given.steps_with(Some(Sampler::Euler)),
            given.guidance_with(Some(Sampler::Euler))
        ),
        (6, 2.0)
    );
}

fn png_b64(width: u32, height: u32, value: u8) -> String {
    use base64::Engine;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&vec![value; (width * height * 3) as usize])
            .unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(out)
}

#[test]
fn a_source_image_makes_an_img2img_job_and_a_mask_an_inpainting_one() {
    let image = png_b64(100, 70, 9);
    let spec = parse(&format!(r#"{{"prompt":"x","init_image":"{image}"}}"#)).unwrap();
    let source = spec.source.unwrap();
    assert_eq!((source.width, source.height), (100, 70));
    assert_eq!(source.strength, source::DEFAULT_STRENGTH);
    assert_eq!(source.mask, None);
    // No size given: the source's, rounded down to multiples of 8.
    assert_eq!(
        spec.size,
        Some(Size {
            width: 96,
            height: 64
        })
    );
    let mask = png_b64(100, 70, 255);
    let spec = parse(&format!(
        r#"{{"prompt":"x","init_image":"data:image/png;base64,{image}","mask":"{mask}","size":"512x512","resize_mode":"crop"}}"#
    ))
    .unwrap();
    let source = spec.source.unwrap();
    assert_eq!(source.strength, source::DEFAULT_INPAINT_STRENGTH);
    assert_eq!(source.resize_mode, ResizeMode::Crop);
    assert!(source.mask.is_some());
    assert_eq!(spec.size.map(|s| s.width), Some(512));
    // The stored record keeps the bytes; the API view does not.
    let stored = serde_json::to_value(&source).unwrap();
    assert!(stored["image"].as_str().is_some_and(|s| s.len() > 10));
    let public = serde_json::to_value(source.stripped()).unwrap();
    assert!(public.get("image").is_none() && public.get("mask").is_none());
    assert_eq!(public["image_bytes"], stored["image_bytes"]);
    let back: SourceSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(back, *source);
    // A mask blur rides with the mask; without a mask, or past 64, it is refused by name.
    let blurred = parse(&format!(
        r#"{{"prompt":"x","init_image":"{image}","mask":"{mask}","mask_blur":8}}"#
    ))
    .unwrap();
    assert_eq!(blurred.source.map(|s| s.mask_blur), Some(8));
    for body in [
        format!(r#"{{"prompt":"x","init_image":"{image}","mask_blur":8}}"#),
        format!(r#"{{"prompt":"x","init_image":"{image}","mask":"{mask}","mask_blur":65}}"#),
    ] {
        assert_eq!(field_of(&body), "mask_blur", "{body}");
    }
}

#[test]
fn bad_sources_name_their_field() {
    let image = png_b64(16, 16, 1);
    let small = png_b64(8, 8, 1);
    for (body, field, words) in [
        (
            r#""init_image":"@@@""#.to_string(),
            "init_image",
            "not valid base64",
        ),
        (
            r#""init_image":"R0lGODlh""#.to_string(),
            "init_image",
            "not a PNG or JPEG",
        ),
        (
            format!(r#""init_image":"{image}","mask":"{small}""#),
            "mask",
            "the mask is 8×8",
        ),
        (
            format!(r#""mask":"{image}""#),
            "mask",
            "needs an init_image",
        ),
        (r#""strength":0.5"#.to_string(), "strength", "there is none"),
        (
            format!(r#""init_image":"{image}","strength":0"#),
            "strength",
            "outside (0, 1]",
        ),
        (
            format!(r#""init_image":"{image}","strength":1.5"#),
            "strength",
            "outside (0, 1]",
        ),
        (
            format!(r#""init_image":"{image}","resize_mode":"zoom""#),
            "resize_mode",
            "unknown variant",
        ),
    ] {
        let err = parse(&format!(r#"{{"prompt":"x",{body}}}"#)).unwrap_err();
        assert_eq!(err.field, field, "{body}: {err:?}");
        assert!(err.message.contains(words), "{body}: {}", err.message);
    }
    let truncated = {
        use base64::Engine;
        let e = base64::engine::general_purpose::STANDARD;
        let bytes = e.decode(&image).unwrap();
        e.encode(&bytes[..bytes.len() - 20])
    };
    let err = parse(&format!(r#"{{"prompt":"x","init_image":"{truncated}"}}"#)).unwrap_err();
    assert!(err.message.contains("broken PNG"), "{}", err.message);
}

proptest! {
    /// Any bytes as a source image: refused naming `init_image` (or decoded), never a panic;
    /// a valid PNG cut anywhere is always "broken", never taken for something else.
    #[test]
    fn source_images_from_random_or_cut_bytes_are_refused_by_field(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        cut in 0usize..1000,
    ) {
        use base64::Engine;
        let e = base64::engine::general_purpose::STANDARD;
        let mut png_like = b"\x89PNG\r\n\x1a\n".to_vec();
        png_like.extend(&bytes);
        for raw in [bytes.clone(), png_like] {
            let body = format!(r#"{{"prompt":"x","init_image":"{}"}}"#, e.encode(&raw));
            if let Err(err) = parse(&body) {
                prop_assert_eq!(err.field, "init_image");
            }
        }
        let valid = e.decode(png_b64(5, 3, 7)).unwrap();
        let cut = cut % valid.len();
        let body = format!(r#"{{"prompt":"x","init_image":"{}"}}"#, e.encode(&valid[..cut]));
        // Cut inside the trailing IEND chunk (12 bytes), every pixel is there: it may decode.
        match parse(&body) {
            Ok(spec) => {
                prop_assert!(cut >= valid.len() - 12, "cut {} decoded", cut);
                prop_assert_eq!(spec.source.map(|s| (s.width, s.height)), Some((5, 3)));
            }
            Err(err) => {
                prop_assert_eq!(err.field, "init_image");
                let kind = if cut < 8 { "not a PNG or JPEG" } else { "broken PNG" };
                prop_assert!(err.message.contains(kind), "cut {}: {}", cut, err.message);
            }
        }
    }
}

#[test]
fn sources_are_limited_to_16_mib_as_sent() {
    use base64::Engine;
    use source::{NoUploads, SourceSpec};
    let b64 = |len: usize| base64::engine::general_purpose::STANDARD.encode(vec![0u8; len]);
    let over = SourceSpec::image_only("init_image", &b64((16 << 20) + 1), &NoUploads).unwrap_err();
    assert!(
        over.message.contains("over the limit of 16777216 bytes"),
        "{}",
        over.message
    );
    // Well under the limit, the bytes are judged as an image, not by their size.
    let under = SourceSpec::image_only("init_image", &b64(2 << 20), &NoUploads).unwrap_err();
    assert!(!under.message.contains("limit"), "{}", under.message);
}

#[test]
fn a_hard_mask_leaves_mask_blur_out_of_the_record() {
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png_b64(8, 8, 128))
        .unwrap();
    let mut source = source::SourceSpec::rendered(png.into()).unwrap();
    let record = serde_json::to_value(&source).unwrap();
    assert!(record.get("mask_blur").is_none(), "{record}");
    source.mask_blur = 3;
    let record = serde_json::to_value(&source).unwrap();
    assert_eq!(record["mask_blur"], 3);
    // Read back either way.
    let back: source::SourceSpec = serde_json::from_value(record).unwrap();
    assert_eq!(back.mask_blur, 3);
}

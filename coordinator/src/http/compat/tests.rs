//! The compatibility bodies: fields read as documented, batch and seed rules.

use super::*;

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), want);
    }
}

/// Every field the document lists for a compatibility body is read and checked: a value of
/// the wrong type is refused, naming it.
#[test]
fn every_documented_field_is_read() {
    let doc: Value = serde_json::from_str(crate::http::openapi::json()).expect("json");
    for schema in ["LcmRequest", "Txt2ImgRequest", "Img2ImgRequest"] {
        let parse = |body: &[u8]| match schema {
            "LcmRequest" => lcm_request(body).map(drop),
            "Img2ImgRequest" => {
                // img2img reads txt2img's fields after its own required `init_images`.
                let mut with: Value = serde_json::from_slice(body).expect("json");
                if with.get("init_images").is_none() {
                    with["init_images"] = serde_json::json!(["iVBORw0KGgo="]);
                }
                img2img_request(&serde_json::to_vec(&with).expect("json")).map(drop)
            }
            _ => txt2img_request(body).map(drop),
        };
        let schema_of = &doc["components"]["schemas"][schema];
        let properties = schema_of["properties"]
            .as_object()
            .or_else(|| schema_of["allOf"][0]["properties"].as_object())
            .expect("properties");
        assert!(properties.len() >= 8, "{schema}");
        for field in properties.keys() {
            let mut body = serde_json::json!({"prompt": "a cat"});
            body[field] = serde_json::json!({"wrong": "type"});
            let body = serde_json::to_vec(&body).expect("json");
            match parse(&body) {
                Err(crate::error::CoordinatorError::InvalidField(e)) => {
                    assert_eq!(&e.field, field, "{schema}: {e}");
                }
                other => panic!("{schema}.{field}: {:?}", other.err()),
            }
        }
        assert!(
            parse(br#"{"prompt": "a cat", "unused": {}}"#).is_ok(),
            "{schema}"
        );
    }
}

/// The document's rule on `batch_size × n_iter` is the one [`txt2img_request`] enforces.
#[test]
fn the_documented_batch_rule_is_enforced() {
    let doc: Value = serde_json::from_str(crate::http::openapi::json()).expect("json");
    let branches = doc["components"]["schemas"]["Txt2ImgRequest"]["allOf"][1]["anyOf"]
        .as_array()
        .expect("the batch rule")
        .clone();
    // Whether some branch admits the pair, as a JSON Schema validator reads the branches.
    let admitted = |batch: Option<u64>, n_iter: Option<u64>| {
        branches.iter().any(|b| {
            let n_ok = match n_iter {
                None => b["required"].as_array().is_none(),
                Some(n) => b["properties"]["n_iter"]["enum"]
                    .as_array()
                    .is_some_and(|e| e.contains(&Value::from(n))),
            };
            let max = b["properties"]["batch_size"]["maximum"]
                .as_u64()
                .expect("max");
            n_ok && batch.is_none_or(|b| b <= max)
        })
    };
    for batch in [None, Some(1), Some(2), Some(3), Some(4), Some(8), Some(9)] {
        for n_iter in [None, Some(1), Some(2), Some(3), Some(5), Some(8), Some(9)] {
            let mut body = serde_json::json!({"prompt": "a cat"});
            if let Some(b) = batch {
                body["batch_size"] = b.into();
            }
            if let Some(n) = n_iter {
                body["n_iter"] = n.into();
            }
            let accepted = txt2img_request(&serde_json::to_vec(&body).expect("json")).is_ok();
            assert_eq!(accepted, admitted(batch, n_iter), "{body}");
        }
    }
}

#[test]
fn image_seeds_count_on_from_the_first_and_wrap_past_the_last() {
    let seeds = |body: &str| -> Vec<Option<i64>> {
        let call = txt2img_request(body.as_bytes()).expect("a body");
        call.requests.iter().map(|r| r.seed).collect()
    };
    let max = MAX_SEED as i64;
    assert_eq!(
        seeds(r#"{"prompt": "a", "seed": 7, "batch_size": 3}"#),
        [Some(7), Some(8), Some(9)]
    );
    assert_eq!(
        seeds(&format!(
            r#"{{"prompt": "a", "seed": {}, "n_iter": 3}}"#,
            max - 1
        )),
        [Some(max - 1), Some(max), Some(0)]
    );
    // A first seed out of range is left for validation to refuse.
    assert_eq!(
        seeds(&format!(r#"{{"prompt": "a", "seed": {}}}"#, max + 1)),
        [Some(max + 1)]
    );
}

#[test]
fn seeds_of_minus_one_are_random_and_types_are_checked() {
    let map = object(br#"{"seed": -1, "steps": "many", "cfg_scale": 7}"#).unwrap();
    assert_eq!(seed(&map, "seed").unwrap(), None);
    assert!(steps(&map, "steps").is_err());
    assert_eq!(number(&map, "cfg_scale").unwrap(), Some(7.0));
    assert!(object(b"[1]").is_err());
}

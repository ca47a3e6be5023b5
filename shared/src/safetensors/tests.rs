use super::*;
use proptest::prelude::*;

fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> build::Spec {
    (name.to_string(), dtype, shape.to_vec())
}

fn with_header(json: &str, data_len: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

#[test]
fn reads_a_valid_file_without_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let tensors = [
        spec("a.weight", Dtype::F16, &[320, 768]),
        spec("b", Dtype::F32, &[4]),
        spec("c", Dtype::BF16, &[1 << 30]),
    ];
    build::write_sparse(&path, &tensors, &[("format", "pt")]).unwrap();
    let header = read_header(&path).unwrap();
    assert_eq!(header.tensors.len(), 3);
    assert_eq!(header.shape("a.weight"), Some(&[320, 768][..]));
    assert_eq!(header.parameters(), 320 * 768 + 4 + (1 << 30));
    assert_eq!(header.data_bytes(), 320 * 768 * 2 + 16 + (2 << 30));
    assert_eq!(header.dominant_dtype(), Some(Dtype::BF16));
    assert_eq!(
        header.metadata.get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(header.sha256.len(), 64);
    assert_eq!(
        header,
        parse_bytes(&build::to_bytes(&tensors[..2], &[("format", "pt")]))
            .map(|mut h| {
                h.tensors.insert("c".into(), header.tensors["c"].clone());
                h.header_len = header.header_len;
                h.sha256 = header.sha256.clone();
                h
            })
            .unwrap()
    );
}

#[test]
fn every_bad_file_gets_its_own_error() {
    let ok_entry = r#""t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "TooShort"),
        (b"PK\x03\x04rest-of-zip".to_vec(), "OtherFormat"),
        (b"\x80\x02pickle-data".to_vec(), "OtherFormat"),
        (
            (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec(),
            "HeaderTooLarge",
        ),
        (
            {
                let mut v = 500u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            "HeaderBeyondFile",
        ),
        (with_header("[1]", 0), "NotAnObject"),
        (
            {
                let mut v = with_header("{\"a\":1}", 0);
                v[10] = 0xff;
                v
            },
            "NotUtf8",
        ),
        (with_header("{\"t\":", 0), "NotJson"),
        (
            with_header(
                r#"{"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#,
                8,
            ),
            "UnknownDtype",
        ),
        (
            with_header(
                r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                8,
            ),
            "OffsetsOutOfOrder",
        ),
        (
            with_header(
                r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
            ),
            "SizeMismatch",
        ),
        (
            with_header(
                r#"{"t":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}"#,
                8,
            ),
            "BadEntry",
        ),
        (
            with_header(r#"{"t":{"dtype":"F32","shape":[2]}}"#, 8),
            "BadEntry",
        ),
        (
            with_header(
                &format!(
                    r#"{{{ok_entry},"u":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#
                ),
                12,
            ),
            "Overlap",
        ),
        (
            with_header(
                &format!(
                    r#"{{{ok_entry},"u":{{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}}}"#
                ),
                20,
            ),
            "Gap",
        ),
        (with_header(&format!("{{{ok_entry}}}"), 4), "Truncated"),
        (with_header(r#"{"__metadata__":{"a":1}}"#, 0), "BadEntry"),
    ];
    for (bytes, expected) in cases {
        let err = parse_bytes(&bytes).expect_err(expected);
        let variant = format!("{err:?}");
        assert!(
            variant.starts_with(expected),
            "expected {expected}, got {variant}"
        );
        assert!(!err.to_string().is_empty());
    }
    let missing = read_header(Path::new("/definitely/not/here.safetensors")).unwrap_err();
    assert!(matches!(missing, HeaderError::Io { .. }), "{missing}");
}

proptest! {
    /// Random bytes never panic; what parses never claims data past the file, and what does
    /// not is refused with a reason (the short ones as too short).
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match parse_bytes(&bytes) {
            Ok(header) => prop_assert!(header.data_bytes() <= bytes.len() as u64),
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                if bytes.len() < 8 {
                    prop_assert!(matches!(e, HeaderError::TooShort { .. }), "{e}");
                }
            }
        }
    }

    /// A valid file cut anywhere is refused, and for the reason the cut makes: inside the
    /// 8-byte length, too short; inside the header, the header runs past the file; inside the
    /// data, truncated. Never accepted, never another kind of error.
    #[test]
    fn a_cut_file_is_refused_for_where_it_was_cut(cut in any::<prop::sample::Index>(), dims in proptest::collection::vec(1u64..5, 1..4)) {
        let tensors = vec![spec("x.attn2.to_k.weight", Dtype::F16, &dims), spec("y", Dtype::F32, &[3])];
        let bytes = build::to_bytes(&tensors, &[("k", "v")]);
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let at = cut.index(bytes.len());
        let err = parse_bytes(&bytes[..at]).expect_err("a cut file is refused");
        if at < 8 {
            prop_assert!(matches!(err, HeaderError::TooShort { .. }), "{err}");
        } else if at < header_end {
            prop_assert!(matches!(err, HeaderError::HeaderBeyondFile { .. }), "{err}");
        } else {
            prop_assert!(matches!(err, HeaderError::Truncated { .. }), "{err}");
        }
    }

    /// Valid files with one byte changed are either still valid or refused with an error.
    #[test]
    fn mutated_headers_never_panic(index in any::<prop::sample::Index>(), byte in any::<u8>(), dims in proptest::collection::vec(1u64..5, 1..4)) {
        let tensors = vec![spec("x.attn2.to_k.weight", Dtype::F16, &dims), spec("y", Dtype::F32, &[3])];
        let mut bytes = build::to_bytes(&tensors, &[("k", "v")]);
        let i = index.index(bytes.len());
        bytes[i] = byte;
        if let Ok(header) = parse_bytes(&bytes) {
            prop_assert!(header.data_bytes() <= bytes.len() as u64);
        }
    }

    /// Built files always parse back to their specs.
    #[test]
    fn built_files_round_trip(dims in proptest::collection::vec(proptest::collection::vec(0u64..6, 0..4), 1..6)) {
        let tensors: Vec<build::Spec> = dims.iter().enumerate().map(|(i, d)| (format!("t{i}"), Dtype::F16, d.clone())).collect();
        let header = parse_bytes(&build::to_bytes(&tensors, &[])).unwrap();
        for (name, dtype, shape) in &tensors {
            prop_assert_eq!(&header.tensors[name].shape, shape);
            prop_assert_eq!(header.tensors[name].dtype, *dtype);
        }
    }
}

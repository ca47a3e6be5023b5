//! Super-resolution networks against spandrel (`scripts/make_upscaler_fixtures.py`): detection
//! of every naming from the header, the network's output within 1e-4, and tiled against untiled
//! images within one step per channel byte.

use std::ops::ControlFlow;

use burn::tensor::{Tensor, TensorData};
use drover_node::burn::Cpu;
use drover_node::burn::tensor_file::TensorFile;
use drover_node::burn::upscale::{
    Tiling, Upscaler, pixel_shuffle, pixel_unshuffle, tensor_to_rgb8,
};
use drover_shared::detect::upscaler::{RrdbNaming, UpscalerArch, inspect_upscaler};

use crate::{check, fixtures, read_config, values};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    file: String,
    scale: usize,
    features: usize,
    #[serde(default)]
    blocks: usize,
    #[serde(default)]
    growth: usize,
    #[serde(default)]
    upsamples: usize,
    #[serde(default)]
    unshuffle: usize,
    #[serde(default)]
    naming: Option<String>,
    #[serde(default)]
    convs: usize,
}

#[derive(serde::Deserialize)]
struct Meta {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    let meta: Meta = read_config(&fixtures().join("upscale.json"));
    assert_eq!(meta.cases.len(), 6, "every architecture and naming");
    meta.cases
}

fn load(case: &Case) -> Upscaler<Cpu> {
    let spec = inspect_upscaler(&fixtures().join(&case.file)).unwrap();
    Upscaler::open(&spec, &Default::default()).unwrap()
}

#[test]
fn headers_say_what_spandrel_read() {
    for case in cases() {
        let spec = inspect_upscaler(&fixtures().join(&case.file)).unwrap();
        assert_eq!(spec.scale, case.scale, "{}", case.name);
        let want = match case.naming.as_deref() {
            Some(naming) => UpscalerArch::Rrdb {
                features: case.features,
                blocks: case.blocks,
                growth: case.growth,
                upsamples: case.upsamples,
                unshuffle: case.unshuffle,
                naming: match naming {
                    "esrgan" => RrdbNaming::Esrgan,
                    "real_esrgan" => RrdbNaming::RealEsrgan,
                    "bsrgan" => RrdbNaming::Bsrgan,
                    other => panic!("naming {other}"),
                },
            },
            None => UpscalerArch::Compact {
                features: case.features,
                convs: case.convs,
                scale: case.scale,
            },
        };
        assert_eq!(spec.network, want, "{}", case.name);
    }
}

#[test]
fn networks_match_spandrel() {
    let io = TensorFile::open(&fixtures().join("upscale.safetensors")).unwrap();
    for case in cases() {
        let net = load(&case);
        let input = io.read(&format!("{}.input", case.name)).unwrap();
        let want = io.read(&format!("{}.output", case.name)).unwrap();
        let x = Tensor::<Cpu, 4>::from_data(
            TensorData::new(input.data, input.shape),
            &Default::default(),
        );
        check(&format!("upscaler {}", case.name), net.forward(x), &want);
    }
}

#[test]
fn pixel_shuffle_inverts_unshuffle_and_orders_like_pytorch() {
    // PyTorch: pixel_shuffle([1, 4, 1, 1] = [a, b, c, d], 2) = [[a, b], [c, d]].
    let x = Tensor::<Cpu, 4>::from_data(
        TensorData::new(vec![1f32, 2., 3., 4.], [1, 4, 1, 1]),
        &Default::default(),
    );
    let y = pixel_shuffle(x.clone(), 2);
    assert_eq!(y.dims(), [1, 1, 2, 2]);
    assert_eq!(values(y.clone()), vec![1., 2., 3., 4.]);
    assert_eq!(values(pixel_unshuffle(y, 2)), values(x));
}

/// A 70×45 test card: smooth gradients, a hard edge and a checkerboard, so seams would show.
fn card(w: usize, h: usize) -> Tensor<Cpu, 4> {
    let mut chw = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            chw[i] = x as f32 / w as f32;
            chw[w * h + i] = if x > w / 2 { 0.9 } else { 0.1 };
            chw[2 * w * h + i] = if (x / 3 + y / 3) % 2 == 0 { 0.8 } else { 0.2 };
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), &Default::default())
}

fn go(_: usize, _: usize) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn tiled_images_match_untiled_ones() {
    let (w, h) = (70, 45);
    for case in cases() {
        let net = load(&case);
        let whole = tensor_to_rgb8(net.upscale(card(w, h), Tiling::whole(), go).unwrap()).unwrap();
        assert_eq!(whole.len(), 3 * w * h * case.scale * case.scale);
        let mut seen = Vec::new();
        let tiled = net
            .upscale(card(w, h), Tiling { tile: 24, pad: 40 }, |done, all| {
                seen.push((done, all));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(tiled.dims(), [1, 3, h * case.scale, w * case.scale]);
        let tiled = tensor_to_rgb8(tiled).unwrap();
        // 70×45 in 24-pixel tiles: 3 columns, 2 rows; progress from 0 of 6 to 6 of 6.
        assert_eq!(seen.first(), Some(&(0, 6)), "{}", case.name);
        assert_eq!(seen.last(), Some(&(6, 6)), "{}", case.name);
        let worst = whole
            .iter()
            .zip(&tiled)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        println!("tiling {}: worst byte difference {worst}", case.name);
        assert!(worst <= 1, "{}: tiled image differs by {worst}", case.name);
        // The image is not flat: a constant output would pass any seam check.
        let distinct: std::collections::BTreeSet<u8> = whole.iter().copied().collect();
        assert!(
            distinct.len() > 50,
            "{}: {} levels",
            case.name,
            distinct.len()
        );
    }
}

#[test]
fn a_small_pad_leaves_seams_that_the_comparison_sees() {
    // With no context the tile borders see zeros instead of the image: the comparison above
    // must be able to tell.
    let case = cases().into_iter().find(|c| c.name == "esrgan-x4").unwrap();
    let net = load(&case);
    let (w, h) = (70, 45);
    let whole = tensor_to_rgb8(net.upscale(card(w, h), Tiling::whole(), go).unwrap()).unwrap();
    let tiled = tensor_to_rgb8(
        net.upscale(card(w, h), Tiling { tile: 24, pad: 0 }, go)
            .unwrap(),
    )
    .unwrap();
    let worst = whole
        .iter()
        .zip(&tiled)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst > 1, "seams without context: worst {worst}");
}

#[test]
fn files_that_are_not_upscalers_are_refused_with_the_reason() {
    let err = inspect_upscaler(&fixtures().join("tiny-unet/diffusion_pytorch_model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an upscaler"), "{err}");
    let err = drover_shared::detect::inspect(&fixtures().join("upscalers/compact-x4.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("UPSCALER"), "{err}");
}

#[test]
fn a_cancelled_upscale_stops_between_tiles() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "compact-x2")
        .unwrap();
    let net = load(&case);
    let mut calls = 0;
    let err = net
        .upscale(card(70, 45), Tiling { tile: 24, pad: 8 }, |done, _| {
            calls += 1;
            if done == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(
        matches!(err, drover_node::error::NodeError::Cancelled),
        "{err}"
    );
    assert_eq!(calls, 3, "stopped after the second of six tiles");
}

//! The RKNN workers and NPU upscalers as the node runs them: one NPU core and context per
//! worker, start failures with their reason, tiled upscaling on the upscaler's own thread.

use super::*;

#[test]
fn workers_take_one_npu_core_each_and_keep_their_contexts_on_their_thread() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    actix_rt::System::new().block_on(async {
        let started = start(api.clone(), dir.path(), 4).unwrap();
        assert_eq!(started.sizes, vec![(64, 64)]);
        assert!(started.pixel_steps_per_second > 0.0);
        // Worker i runs on NPU_CORE_{i % 3}: four workers use cores 0, 1, 2, 0, three contexts each.
        let masks: Vec<CoreMask> = api
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::SetCoreMask(_, m) => Some(*m),
                _ => None,
            })
            .collect();
        let count = |m| masks.iter().filter(|x| **x == m).count();
        assert_eq!(
            (
                count(CoreMask::Core0),
                count(CoreMask::Core1),
                count(CoreMask::Core2)
            ),
            (6, 3, 3)
        );
        // Each worker loaded its own three contexts on its own thread.
        let threads: std::collections::HashSet<_> = api
            .calls_with_threads()
            .iter()
            .filter(|(_, c)| matches!(c, Call::Init(_)))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(threads.len(), 4);
        assert!(!threads.contains(&std::thread::current().id()));

        let (run, mut progress) = job(Vec::new());
        let rendered = started.addr.send(run).await.unwrap().unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(rendered.png));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 64));
        let software = reader
            .info()
            .utf8_text
            .iter()
            .find(|t| t.keyword == "Software")
            .and_then(|t| t.get_text().ok())
            .unwrap_or_default();
        assert!(software.contains("rknn"), "{software}");
        assert_eq!(progress.recv().await.map(|p| p.step), Some(1));

        let (run, _) = job(vec![Lora {
            name: "ink".into(),
            strength: 1.0,
        }]);
        let err = started.addr.send(run).await.unwrap().unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("cannot merge LoRAs"),
            "{err}"
        );
    });
}

#[test]
fn a_worker_that_cannot_load_fails_the_start_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    write_model_folder(dir.path(), &[64]);
    let api = Arc::new(FakeRknn::default());
    *api.fail.lock().unwrap() = Some(("set_core_mask", "vae".into(), -5));
    actix_rt::System::new().block_on(async {
        let err = start(api.clone(), dir.path(), 2).err().unwrap().to_string();
        assert!(
            err.contains("rknn_set_core_mask") && err.contains("invalid parameter"),
            "{err}"
        );
        assert!(err.contains("NPU_CORE_"), "{err}");
        let err = start(api, dir.path(), 12).err().unwrap().to_string();
        assert!(err.contains("NUM_WORKERS=12"), "{err}");
    });
}

/// The fake `sr` network's rule applied to a whole image at once (zeros outside it): what a
/// tiled run must give where its context covers the 3×3 window.
fn sr_reference(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let at = |c: usize, y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            f64::from(rgb[(y as usize * w + x as usize) * 3 + c]) / 255.0
        }
    };
    let mut out = vec![0u8; w * s * h * s * 3];
    for oy in 0..h * s {
        for ox in 0..w * s {
            for c in 0..3 {
                let (y, x) = ((oy / s) as isize, (ox / s) as isize);
                let sum: f64 = (-1..=1)
                    .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                    .map(|(dy, dx)| at(c, y + dy, x + dx))
                    .sum();
                let v = (0.5 * at(c, y, x) + 0.5 * sum / 9.0) as f32;
                out[(oy * w * s + ox) * 3 + c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    out
}

fn write_sr(path: &Path, tile: usize, out: (usize, usize)) {
    crate::rknn::fake::write_net(
        path,
        serde_json::json!({"kind": "sr",
            "inputs": [{"name": "input", "dims": [1, tile, tile, 3], "format": "nhwc", "dtype": "f16"}],
            "outputs": [{"name": "output", "dims": [1, 3, out.0, out.1], "format": "nchw", "dtype": "f16"}]}),
    );
}

#[test]
fn the_npu_upscaler_tiles_images_through_its_fixed_input() {
    use crate::rknn::upscale::RknnUpscaler;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x2.rknn");
    write_sr(&path, 16, (32, 32));
    let api = Arc::new(FakeRknn::default());
    let mut up = RknnUpscaler::load(api.clone(), &path, CoreMask::Core1).unwrap();
    assert_eq!((up.scale(), up.tile()), (2, (16, 16)));
    let (w, h) = (50, 37);
    let rgb: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i * 37 + (i / 150) * 11) % 256) as u8)
        .collect();
    let mut seen = Vec::new();
    let out = up
        .upscale_rgb8(&rgb, w, h, 2, |done, all| {
            seen.push((done, all));
            ControlFlow::Continue(())
        })
        .unwrap();
    // Cores of 12 pixels: 5 columns, 4 rows.
    assert_eq!(seen.first(), Some(&(0, 20)));
    assert_eq!(seen.last(), Some(&(20, 20)));
    let want = sr_reference(&rgb, w, h, 2);
    let worst = out
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "tiled differs from whole by {worst}");
    assert!(
        api.calls()
            .contains(&Call::SetCoreMask("sr".into(), CoreMask::Core1)),
        "{:?}",
        api.calls()
    );
    // Without context the tile borders see zeros: the comparison sees the seams.
    let seams = up
        .upscale_rgb8(&rgb, w, h, 0, |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert!(seams.iter().zip(&want).any(|(a, b)| a.abs_diff(*b) > 1));
    // An image smaller than a tile is extended to one; a cancel stops between tiles.
    let small = up
        .upscale_rgb8(&rgb[..10 * 7 * 3], 10, 7, 2, |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(small.len(), 20 * 14 * 3);
    let err = up
        .upscale_rgb8(&rgb, w, h, 2, |done, _| {
            if done == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, NodeError::Cancelled), "{err}");
    // A network whose output is no whole multiple of its input is refused, naming the shapes.
    let odd = dir.path().join("odd.rknn");
    write_sr(&odd, 16, (33, 32));
    let err = RknnUpscaler::load(api, &odd, CoreMask::Auto)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("[1, 3, 33, 32]"), "{err}");
}

#[test]
fn npu_upscalers_serve_workers_from_their_own_thread() {
    use crate::render::Image;
    use crate::rknn::upscale::NpuUpscalers;
    use crate::upscaling::PostProcess;
    use drover_shared::job::UpscaleSpec;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("npu-x2.rknn");
    write_sr(&path, 16, (32, 32));
    let api = Arc::new(FakeRknn::default());
    let npu = NpuUpscalers::start(api.clone(), &[("npu-x2".into(), path)], 2).unwrap();
    assert_eq!(npu.shape("npu-x2"), Some((2, (16, 16))));
    assert!(npu.holds(None) && npu.holds(Some("npu-x2")) && !npu.holds(Some("x4")));
    assert!(npu.ms_per_megapixel("npu-x2") > 0.0, "measured at start");
    let (w, h) = (50, 37);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 53) % 256) as u8).collect();
    let image = || Image {
        width: w,
        height: h,
        rgb: rgb.clone(),
        truncated_tokens: 0,
    };
    let spec = |passes, scale| UpscaleSpec {
        model: Some("npu-x2".into()),
        passes,
        scale,
        elsewhere: false,
    };
    let mut tiles = Vec::new();
    let (out, done) = npu
        .upscale(image(), &spec(Some(1), None), &mut |d, a| {
            tiles.push((d, a));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((out.width, out.height, done.passes), (100, 74, 1));
    assert_eq!(
        tiles.last(),
        Some(&(20, 20)),
        "its tiles came back as progress"
    );
    let want = sr_reference(&rgb, w, h, 2);
    assert!(out.rgb.iter().zip(&want).all(|(a, b)| a.abs_diff(*b) <= 1));
    // ×3 from a ×2 network: two passes, resized down.
    let (three, done) = npu
        .upscale(image(), &spec(None, Some(3.0)), &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((three.width, three.height, done.passes), (150, 111, 2));
    // Every context call ran on the NPU thread, never this one.
    let here = std::thread::current().id();
    let calls = api.calls_with_threads();
    assert!(!calls.is_empty() && calls.iter().all(|(t, _)| *t != here));
    // A cancel from the worker stops the NPU between tiles.
    let err = npu
        .upscale(image(), &spec(Some(1), None), &mut |d, _| {
            if d >= 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, NodeError::Cancelled), "{err}");
    // A missing file stops the start, naming it.
    let missing = NpuUpscalers::start(api, &[("gone".into(), dir.path().join("gone.rknn"))], 2);
    assert!(
        missing
            .err()
            .expect("refused")
            .to_string()
            .contains("gone.rknn")
    );
}

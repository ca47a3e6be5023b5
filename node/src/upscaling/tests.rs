//! Upscaler configuration: files and folders, names, refusals.

use super::*;

fn config(root: &Path, upscaler: &str) -> NodeConfig {
    use clap::Parser;
    let root = root.to_string_lossy().into_owned();
    crate::config::Cli::try_parse_from([
        "drover-node",
        "--model-root",
        &root,
        "--upscaler",
        upscaler,
    ])
    .unwrap()
    .node
}

#[test]
fn upscalers_are_found_as_files_or_folders_and_named_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("realesr")).unwrap();
    let small = |path: &Path, scale: &str| {
        make_upscaler(path, 1, scale, "compact", Some(4), Some(1)).unwrap();
    };
    small(&root.join("realesr/model.safetensors"), "x4");
    small(&root.join("x2.safetensors"), "x2");
    let found = configured(&config(root, "realesr, x2")).unwrap();
    let named: Vec<(&str, usize)> = found.iter().map(|e| (e.name.as_str(), e.scale)).collect();
    assert_eq!(named, [("realesr", 4), ("x2", 2)]);
    assert!(found[1].network.starts_with("SRVGGNetCompact ×2"));
    // A folder with two networks, a name given twice, a missing one: refused, saying why.
    std::fs::create_dir_all(root.join("two")).unwrap();
    small(&root.join("two/a.safetensors"), "x2");
    small(&root.join("two/b.safetensors"), "x2");
    for (list, reason) in [
        ("two", "holds 2"),
        ("x2,x2.safetensors", "twice"),
        ("x8", "under MODEL_ROOT"),
    ] {
        let err = configured(&config(root, list)).unwrap_err().to_string();
        assert!(err.contains(reason), "{list}: {err}");
    }
}

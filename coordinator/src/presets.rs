//! The preset catalog in force (`DROVER_PRESETS`), reloaded when its file changes or on
//! `POST /v1/presets/reload`. A catalog that does not load is refused with the reason and the
//! previous one stays in force; requests always see one whole catalog.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use drover_shared::error::FieldError;
use drover_shared::job::JobRequest;
use drover_shared::presets::{PresetCatalog, PresetError};

/// What identifies the file's contents without reading it: size and modification time.
type Stamp = Option<(u64, Option<SystemTime>)>;

/// The catalog in force and where it comes from.
#[derive(Debug, Default)]
pub struct Presets {
    /// The catalog file; `None`: no presets.
    path: Option<PathBuf>,
    /// LoRA files to check presets' families against, when at hand.
    lora_root: Option<PathBuf>,
    current: RwLock<Arc<PresetCatalog>>,
    /// The file as last read (loaded or refused), so a refused file is not read again until it
    /// changes.
    seen: Mutex<Stamp>,
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

impl Presets {
    /// Loads the catalog at `path` (none when `None`); fails when it does not load.
    pub fn load(path: Option<&Path>, lora_root: Option<&Path>) -> Result<Self, PresetError> {
        let presets = Self {
            path: path.map(Path::to_path_buf),
            lora_root: lora_root.map(Path::to_path_buf),
            ..Self::default()
        };
        if path.is_some() {
            presets.reload()?;
        }
        Ok(presets)
    }

    /// The catalog in force.
    pub fn catalog(&self) -> Arc<PresetCatalog> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again: the new catalog goes into force, or, when it does not load, the
    /// reason comes back and the catalog in force stays. Answers the number of presets.
    pub fn reload(&self) -> Result<usize, PresetError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(path);
        let catalog = PresetCatalog::load(path, self.lora_root.as_deref())?;
        let count = catalog.presets().count();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
        Ok(count)
    }

    /// [`Self::reload`] when the file changed since it was last read; `None` when it did not.
    pub fn reload_if_changed(&self) -> Option<Result<usize, PresetError>> {
        let path = self.path.as_ref()?;
        let now = stamp(path);
        if *self.seen.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return None;
        }
        Some(self.reload())
    }

    /// The request with its preset's defaults under its own fields.
    pub fn apply(&self, request: JobRequest) -> Result<JobRequest, FieldError> {
        if request.preset.is_none() {
            return Ok(request);
        }
        self.catalog().apply(request)
    }

    /// Checks the file for changes every `every` until the process ends, logging each reload.
    pub fn watch(self: Arc<Self>, every: std::time::Duration) {
        if self.path.is_none() {
            return;
        }
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let presets = self.clone();
                let outcome = tokio::task::spawn_blocking(move || presets.reload_if_changed())
                    .await
                    .ok()
                    .flatten();
                match outcome {
                    Some(Ok(count)) => {
                        tracing::info!(presets = count, "preset catalog changed, reloaded");
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "preset catalog changed but was refused; the previous one stays");
                    }
                    None => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_refused_catalog_leaves_the_previous_one_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("presets.toml");
        write(&path, "[[preset]]\nid = \"fast\"\nsteps = 4\n");
        let presets = Presets::load(Some(&path), None).unwrap();
        assert_eq!(presets.catalog().presets().count(), 1);
        assert!(presets.reload_if_changed().is_none(), "unchanged: not read");

        write(&path, "[[preset]]\nid = \"fast\"\nsteps = 400\n");
        let err = presets
            .reload_if_changed()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("preset `fast`: steps"), "{err}");
        let request = JobRequest::from_json(br#"{"prompt":"x","preset":"fast"}"#).unwrap();
        assert_eq!(presets.apply(request.clone()).unwrap().steps, Some(4));
        assert!(
            presets.reload_if_changed().is_none(),
            "a refused file is not read again"
        );

        write(
            &path,
            "[[preset]]\nid = \"fast\"\nsteps = 6\n\n[[preset]]\nid = \"slow\"\n",
        );
        assert_eq!(presets.reload_if_changed().unwrap().unwrap(), 2);
        assert_eq!(presets.apply(request).unwrap().steps, Some(6));
    }

    #[test]
    fn without_a_catalog_requests_naming_a_preset_are_refused() {
        let presets = Presets::load(None, None).unwrap();
        assert_eq!(presets.reload().unwrap(), 0);
        let request = JobRequest::from_json(br#"{"prompt":"x","preset":"fast"}"#).unwrap();
        let err = presets.apply(request).unwrap_err();
        assert_eq!(err.field, "preset");
        let plain = JobRequest::from_json(br#"{"prompt":"x"}"#).unwrap();
        assert_eq!(presets.apply(plain.clone()).unwrap(), plain);
    }
}

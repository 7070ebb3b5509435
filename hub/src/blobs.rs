//! Content-addressed blob store for WASM modules: `DATA_DIR/blobs/sha256/<hex>`.
//!
//! Blobs are written to a temporary file, fsynced and renamed into place, so a crash never
//! leaves a partial blob under its digest. Whether a blob is a valid WASM module or component
//! is checked (and remembered) when a manifest refers to it.
//!
//! For runtime-only agents (built without a compiler) the store also precompiles a module for
//! an agent's engine and target ([`BlobStore::precompiled`]), once, and keeps the artifact
//! under `DATA_DIR/blobs/precompiled/{engine}/{target}/<hex>.cwasm`.
//!
//! Hub replicas (see [`crate::ha`]) share blobs through [`SharedBlobs`] (etcd): an upload is
//! acknowledged once it is there too, and a replica fetches a blob it lacks from there the
//! first time it needs it (checking its digest), then keeps it.

use shoal_api::model::ids::Digest;
use shoal_api::model::workload::{ModuleRef, Workload};
use shoal_api::wire::manifest::ManifestError;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why a blob named as a module is not one.
#[derive(Debug, thiserror::Error)]
pub enum NotAModule {
    #[error(transparent)]
    Invalid(#[from] shoal_api::model::wasm::InvalidWasm),
    #[error(transparent)]
    Unreadable(#[from] BlobError),
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store i/o error at {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("blob is empty")]
    Empty,
    #[error("cannot share blob {digest:?} with the other hub replicas: {source}")]
    Shared {
        digest: String,
        source: SharedBlobError,
    },
}

/// Blobs every hub replica can read (blocking calls).
pub trait SharedBlobs: Send + Sync {
    fn put(&self, d: &Digest, bytes: &[u8]) -> Result<(), SharedBlobError>;
    /// `Ok(None)`: not there.
    fn get(&self, d: &Digest) -> Result<Option<Vec<u8>>, SharedBlobError>;
}

/// Why the shared blob store failed: its adapter's error (the port names no adapter).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SharedBlobError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// Why [`BlobStore::precompiled`] gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum PrecompileError {
    #[error("the device's engine {device:?} is not the hub's {hub:?}: run the same Shoal release (the same wasmtime) on both")]
    Engine { device: String, hub: String },
    #[error("target {0:?} is not one this hub compiles for (see shoal_engine::KNOWN_TARGETS)")]
    BadTarget(String),
    #[error("blob {0:?} not found")]
    NotFound(String),
    #[error("cannot precompile blob {digest:?}: {source}")]
    Compile {
        digest: String,
        source: shoal_engine::PrecompileError,
    },
    #[error(transparent)]
    Io(#[from] BlobError),
}

pub struct BlobStore {
    dir: PathBuf,
    /// `DATA_DIR/blobs/precompiled/{ENGINE_ID}`.
    precompiled_dir: PathBuf,
    /// Held while compiling: devices asking at once for one module wait for the first compile
    /// instead of each starting one (and the hub's CPUs stay for its other work).
    compiling: Mutex<()>,
    /// Validation verdicts per digest (blobs are immutable, so a verdict never changes).
    verdicts: Mutex<HashMap<Digest, Result<(), shoal_api::model::wasm::InvalidWasm>>>,
    shared: Option<Box<dyn SharedBlobs>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it into place.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{:08x}", rand::random::<u32>()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

impl BlobStore {
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let dir = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let precompiled_dir = data_dir
            .join("blobs")
            .join("precompiled")
            .join(shoal_engine::ENGINE_ID);
        Ok(Self {
            dir,
            precompiled_dir,
            compiling: Mutex::new(()),
            verdicts: Mutex::new(HashMap::new()),
            shared: None,
        })
    }

    /// Shares blobs with other hub replicas through `shared`.
    pub fn with_shared(mut self, shared: Box<dyn SharedBlobs>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Whether blob `d` is here, fetched from the shared blobs if need be.
    fn fetch(&self, d: &Digest) -> bool {
        if self.path(d).is_file() {
            return true;
        }
        let Some(shared) = &self.shared else {
            return false;
        };
        match shared.get(d) {
            Ok(Some(bytes)) if Digest::of(&bytes) == *d => {
                match write_durably(&self.path(d), &bytes) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(digest = %d, error = %e, "cannot keep a shared blob");
                        false
                    }
                }
            }
            Ok(Some(_)) => {
                tracing::warn!(digest = %d, "shared blob does not match its digest; ignored");
                false
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "cannot read shared blobs");
                false
            }
        }
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.fetch(d)
    }

    /// Stores `bytes` durably and returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        if bytes.is_empty() {
            return Err(BlobError::Empty);
        }
        let d = Digest::of(bytes);
        let path = self.path(&d);
        if !path.is_file() {
            write_durably(&path, bytes)?;
        }
        if let Some(shared) = &self.shared {
            shared.put(&d, bytes).map_err(|source| BlobError::Shared {
                digest: d.to_string(),
                source,
            })?;
        }
        Ok(d)
    }

    /// Blocking: blob `d` compiled for an agent whose engine is `engine` (its
    /// [`shoal_engine::ENGINE_ID`]) and whose target is `target`, compiled on the first request
    /// and kept. Artifacts are deterministic, so a kept one is as good as a fresh one.
    pub fn precompiled(
        &self,
        d: &Digest,
        engine: &str,
        target: &str,
    ) -> Result<Vec<u8>, PrecompileError> {
        if engine != shoal_engine::ENGINE_ID {
            return Err(PrecompileError::Engine {
                device: engine.to_string(),
                hub: shoal_engine::ENGINE_ID.to_string(),
            });
        }
        // The target names a directory: only a known one (which also bounds the cache to
        // the known targets times the stored modules).
        let Some(target) = shoal_engine::known_target(target) else {
            return Err(PrecompileError::BadTarget(target.to_string()));
        };
        let dir = self.precompiled_dir.join(target);
        let path = dir.join(format!("{}.cwasm", d.hex()));
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(bytes);
        }
        let _compiling = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have compiled it while this one waited.
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(bytes);
        }
        if !self.has(d) {
            return Err(PrecompileError::NotFound(d.to_string()));
        }
        let wasm = self.read(d)?;
        let started = std::time::Instant::now();
        let compiled =
            shoal_engine::precompile(&wasm, target).map_err(|source| PrecompileError::Compile {
                digest: d.to_string(),
                source,
            })?;
        tracing::info!(
            digest = %d,
            target,
            elapsed_ms = started.elapsed().as_millis() as u64,
            bytes = compiled.len(),
            "precompiled module for runtime-only devices"
        );
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_durably(&path, &compiled)?;
        Ok(compiled)
    }

    /// Blob `d` opened for reading, and its size (a download streams it from disk rather
    /// than holding it in memory).
    pub fn open_blob(&self, d: &Digest) -> Result<(std::fs::File, u64), BlobError> {
        self.fetch(d);
        let p = self.path(d);
        let f = std::fs::File::open(&p).map_err(io(&p))?;
        let len = f.metadata().map_err(io(&p))?.len();
        Ok((f, len))
    }

    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, BlobError> {
        self.fetch(d);
        let p = self.path(d);
        std::fs::read(&p).map_err(io(&p))
    }

    /// `Ok` if the blob is a valid WASM core module or component (the verdict is kept: a
    /// blob never changes).
    pub fn validate_wasm(&self, d: &Digest) -> Result<(), NotAModule> {
        if let Some(v) = self.lock().get(d) {
            return v.clone().map_err(NotAModule::Invalid);
        }
        let verdict = shoal_api::model::wasm::validate(&self.read(d)?);
        self.lock().insert(d.clone(), verdict.clone());
        Ok(verdict?)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Digest, Result<(), shoal_api::model::wasm::InvalidWasm>>>
    {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that every workload's module is a blob the hub has and that it validates.
    /// Returns one error per problem, located like manifest errors.
    pub fn check_modules(&self, workloads: &[(usize, &Workload)]) -> Vec<ManifestError> {
        let mut errs = Vec::new();
        for (doc, w) in workloads {
            let err = |message: String| ManifestError {
                document: *doc,
                kind: None,
                workload: Some(w.name.to_string()),
                message,
            };
            if let Some(c) = &w.container {
                if !c.image.is_pinned() {
                    errs.push(err(format!(
                        "spec.container.image {:?} is not pinned: the hub sends devices digests, not tags; give {}@sha256:<digest>, or apply with `shoal apply`, which pins tags itself",
                        c.image.to_string(),
                        c.image
                    )));
                }
            }
            let Some(module) = &w.module else { continue };
            match module {
                ModuleRef::Path(p) => errs.push(err(format!(
                    "spec.wasm.module {p:?} is a local file path, which the hub cannot read: apply it with `shoal apply` (which uploads it) or upload it with `shoal push` and use the printed sha256 digest"
                ))),
                ModuleRef::Oci(r) if !r.is_pinned() => errs.push(err(format!(
                    "spec.wasm.module {:?} is not pinned: the hub sends devices digests, not tags; give {r}@sha256:<manifest digest>, or apply with `shoal apply`, which pins tags itself",
                    r.to_string()
                ))),
                // Devices pull and validate it; the hub does not reach into registries.
                ModuleRef::Oci(_) => {}
                ModuleRef::Digest(d) if !self.has(d) => errs.push(err(format!(
                    "spec.wasm.module {:?} is missing: the hub has no blob with that digest (upload it with `shoal push FILE`)",
                    d.as_str()
                ))),
                ModuleRef::Digest(d) => {
                    if let Err(reason) = self.validate_wasm(d) {
                        errs.push(err(format!(
                            "spec.wasm.module {:?} is not a valid wasm module or component: {reason}",
                            d.as_str()
                        )));
                    }
                }
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_validate() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        // The smallest valid core module: magic + version.
        let d = s.put(b"\0asm\x01\0\0\0").unwrap();
        assert!(s.has(&d));
        assert!(s.validate_wasm(&d).is_ok());
        let bad = s.put(b"not wasm at all").unwrap();
        assert!(matches!(s.validate_wasm(&bad), Err(NotAModule::Invalid(_))));
        assert!(matches!(s.put(b""), Err(BlobError::Empty)));
    }

    #[test]
    fn precompiles_once_per_target_and_refuses_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let d = s.put(b"\0asm\x01\0\0\0").unwrap();
        let id = shoal_engine::ENGINE_ID;
        let first = s.precompiled(&d, id, "pulley32").unwrap();
        assert!(
            first.starts_with(b"\x7fELF"),
            "an artifact is an ELF object"
        );
        let kept = dir
            .path()
            .join("blobs/precompiled")
            .join(id)
            .join("pulley32")
            .join(format!("{}.cwasm", d.hex()));
        assert_eq!(std::fs::read(&kept).unwrap(), first);
        // The second request reads what the first compiled (a planted file proves it).
        std::fs::write(&kept, b"kept").unwrap();
        assert_eq!(s.precompiled(&d, id, "pulley32").unwrap(), b"kept");
        // Refusals name the bad value.
        let e = s
            .precompiled(&d, "wasmtime-47+shoal.1", "pulley32")
            .unwrap_err();
        assert!(matches!(e, PrecompileError::Engine { .. }), "{e}");
        assert!(e.to_string().contains("\"wasmtime-47+shoal.1\""), "{e}");
        for bad in ["../../etc", "", ".hidden", "a/b"] {
            let e = s.precompiled(&d, id, bad).unwrap_err();
            assert!(matches!(e, PrecompileError::BadTarget(_)), "{bad}: {e}");
        }
        let e = s.precompiled(&d, id, "vax-dec-ultrix").unwrap_err();
        assert!(matches!(e, PrecompileError::BadTarget(_)), "{e}");
        assert!(e.to_string().contains("\"vax-dec-ultrix\""), "{e}");
        let missing = Digest::of(b"absent");
        let e = s.precompiled(&missing, id, "pulley32").unwrap_err();
        assert!(matches!(e, PrecompileError::NotFound(_)), "{e}");
        let junk = s.put(b"not wasm at all").unwrap();
        let e = s.precompiled(&junk, id, "pulley32").unwrap_err();
        assert!(matches!(e, PrecompileError::Compile { .. }), "{e}");
        assert!(!dir
            .path()
            .join("blobs/precompiled")
            .join(id)
            .join("vax-dec-ultrix")
            .exists());
    }

    #[test]
    fn oci_modules_must_be_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let text = |m: &str| {
            format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: w }}\nspec:\n  wasm: {{ module: \"{m}\" }}\n")
        };
        let tag = shoal_api::model::workload::parse_workloads(&text("oci://localhost:5000/a:v1"))
            .unwrap();
        let errs = s.check_modules(&[(1, &tag[0])]);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .message
                .contains("\"oci://localhost:5000/a:v1\" is not pinned"),
            "{}",
            errs[0].message
        );
        let pinned = shoal_api::model::workload::parse_workloads(&text(&format!(
            "oci://localhost:5000/a:v1@{}",
            shoal_api::model::ids::Digest::of(b"m")
        )))
        .unwrap();
        assert!(s.check_modules(&[(1, &pinned[0])]).is_empty());
    }
}

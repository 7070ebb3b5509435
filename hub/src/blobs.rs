//! Content-addressed blob store for WASM modules: `DATA_DIR/blobs/sha256/<hex>`.
//!
//! Blobs are written to a temporary file, fsynced and renamed into place, so a crash never
//! leaves a partial blob under its digest. Whether a blob is a valid WASM module or component
//! is checked (and remembered) when a manifest refers to it.

use shoal_api::ids::Digest;
use shoal_api::manifest::ManifestError;
use shoal_api::workload::{ModuleRef, Workload};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store i/o error at {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("blob is empty")]
    Empty,
}

pub struct BlobStore {
    dir: PathBuf,
    /// Validation verdicts per digest (blobs are immutable, so a verdict never changes).
    verdicts: Mutex<HashMap<Digest, Result<(), String>>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl BlobStore {
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let dir = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self {
            dir,
            verdicts: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Stores `bytes` durably and returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        if bytes.is_empty() {
            return Err(BlobError::Empty);
        }
        let d = Digest::of(bytes);
        let path = self.path(&d);
        if path.is_file() {
            return Ok(d);
        }
        let tmp = self
            .dir
            .join(format!(".{}.tmp-{}", d.hex(), std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(d)
    }

    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, BlobError> {
        let p = self.path(d);
        std::fs::read(&p).map_err(io(&p))
    }

    /// `Ok` if the blob is a valid WASM core module or component.
    pub fn validate_wasm(&self, d: &Digest) -> Result<(), String> {
        if let Some(v) = self.lock().get(d) {
            return v.clone();
        }
        let verdict = match self.read(d) {
            Err(e) => return Err(e.to_string()),
            Ok(bytes) => shoal_api::wasm::validate(&bytes),
        };
        self.lock().insert(d.clone(), verdict.clone());
        verdict
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Result<(), String>>> {
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
        assert_eq!(s.validate_wasm(&d), Ok(()));
        let bad = s.put(b"not wasm at all").unwrap();
        assert!(s.validate_wasm(&bad).is_err());
        assert!(matches!(s.put(b""), Err(BlobError::Empty)));
    }

    #[test]
    fn oci_modules_must_be_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let text = |m: &str| {
            format!("apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: w }}\nspec:\n  wasm: {{ module: \"{m}\" }}\n")
        };
        let tag = shoal_api::workload::parse_workloads(&text("oci://localhost:5000/a:v1")).unwrap();
        let errs = s.check_modules(&[(1, &tag[0])]);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .message
                .contains("\"oci://localhost:5000/a:v1\" is not pinned"),
            "{}",
            errs[0].message
        );
        let pinned = shoal_api::workload::parse_workloads(&text(&format!(
            "oci://localhost:5000/a:v1@{}",
            shoal_api::ids::Digest::of(b"m")
        )))
        .unwrap();
        assert!(s.check_modules(&[(1, &pinned[0])]).is_empty());
    }
}

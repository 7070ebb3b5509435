//! Prepared modules: compiled artifacts cached on disk under
//! `cache_dir/{engine_key}/{digest}.cwasm` and in memory per digest (concurrent prepares of
//! one digest share one compilation), compiling on a miss (or, runtime-only, loading the
//! artifact the hub precompiled), and linking the result against WASI.

use super::{Inner, ModuleKind, WasmModule, WasmRuntime};
use crate::runtime::RuntimeError;
use shoal_api::model::ids::Digest;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
#[cfg(feature = "compiler")]
use std::time::Instant;
use tokio::sync::OnceCell;
use tracing::Instrument as _;
use wasmtime::Engine;
use wasmtime_wasi::p2::bindings::CommandPre;

impl WasmRuntime {
    /// The directory holding this engine's compiled artifacts (`cache_dir/{engine_key}`).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// Where the compiled artifact of `digest` is cached.
    pub fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.inner.artifact_path(digest)
    }

    /// How many times this runtime compiled wasm from source (cache misses).
    pub fn compile_count(&self) -> u64 {
        self.inner.compiles.load(Ordering::Relaxed)
    }

    /// Prepares the module at `path` (see [`WasmRuntime::prepare`]). Concurrent prepares
    /// of one digest share a single compilation.
    pub async fn prepare_module(
        &self,
        digest: &Digest,
        path: PathBuf,
    ) -> Result<Arc<WasmModule>, RuntimeError> {
        let cell = {
            let mut map = self.inner.lock_prepared();
            map.entry(digest.clone()).or_default().clone()
        };
        let span = tracing::debug_span!("prepare", digest = %digest);
        cell.get_or_try_init(|| {
            let inner = self.inner.clone();
            let digest = digest.clone();
            async move {
                let task_digest = digest.clone();
                tokio::task::spawn_blocking(move || inner.load_or_compile(&task_digest, &path))
                    .await
                    .map_err(|e| RuntimeError::Prepare {
                        digest: digest.as_str().to_string(),
                        reason: format!("compile task failed: {e}"),
                    })?
                    .map(Arc::new)
            }
            .instrument(span)
        })
        .await
        .cloned()
    }
}

impl Inner {
    fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.cache_dir.join(format!("{}.cwasm", digest.hex()))
    }

    fn lock_prepared(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<OnceCell<Arc<WasmModule>>>>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runtime-only: `path` loaded as it is when it is a precompiled artifact (from the hub).
    #[cfg(not(feature = "compiler"))]
    fn load_precompiled(
        &self,
        digest: &Digest,
        path: &Path,
    ) -> Result<Option<WasmModule>, RuntimeError> {
        let prepare_error = |reason: String| RuntimeError::Prepare {
            digest: digest.as_str().to_string(),
            reason,
        };
        // wasmtime's detection fails on anything that is not ELF, so look at the magic first.
        let mut magic = [0u8; 4];
        let elf = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF";
        let detected = if elf {
            Engine::detect_precompiled_file(path)
        } else {
            Ok(None)
        };
        match detected {
            Ok(Some(kind)) => {
                let artifact = deserialize_artifact(&self.engine, path, kind).map_err(|e| {
                    prepare_error(format!("cannot load the precompiled module: {e:#}"))
                })?;
                tracing::debug!(path = %path.display(), "loaded precompiled module");
                self.link(digest, artifact).map(Some)
            }
            Ok(None) => Ok(None),
            Err(e) => Err(prepare_error(format!("cannot read {path:?}: {e:#}"))),
        }
    }

    /// Blocking: loads the cached artifact or compiles `path` (and caches it), then links. On a
    /// runtime-only agent, a `path` that is itself a precompiled artifact (from the hub) is
    /// loaded as it is.
    fn load_or_compile(&self, digest: &Digest, path: &Path) -> Result<WasmModule, RuntimeError> {
        // Only a runtime-only agent is handed precompiled artifacts; one that compiles is
        // always handed wasm and need not look.
        #[cfg(not(feature = "compiler"))]
        if let Some(module) = self.load_precompiled(digest, path)? {
            return Ok(module);
        }
        let artifact_path = self.artifact_path(digest);
        let artifact = match self.load_artifact(&artifact_path) {
            Ok(Some(artifact)) => {
                tracing::debug!(path = %artifact_path.display(), "loaded compiled artifact");
                artifact
            }
            Ok(None) => self.compile(digest, path, &artifact_path)?,
            Err(e) => {
                tracing::warn!(
                    path = %artifact_path.display(),
                    error = %format!("{e:#}"),
                    "ignoring unusable compiled artifact"
                );
                let _ = std::fs::remove_file(&artifact_path);
                self.compile(digest, path, &artifact_path)?
            }
        };
        self.link(digest, artifact)
    }

    fn load_artifact(&self, artifact_path: &Path) -> wasmtime::Result<Option<Artifact>> {
        if !artifact_path.exists() {
            return Ok(None);
        }
        let Some(kind) = Engine::detect_precompiled_file(artifact_path)? else {
            wasmtime::bail!("not a precompiled artifact");
        };
        deserialize_artifact(&self.engine, artifact_path, kind).map(Some)
    }

    #[cfg(not(feature = "compiler"))]
    fn compile(
        &self,
        digest: &Digest,
        path: &Path,
        _artifact_path: &Path,
    ) -> Result<Artifact, RuntimeError> {
        Err(RuntimeError::InvalidModule {
            digest: digest.as_str().to_string(),
            reason: format!(
                "{path:?} is wasm, not a precompiled module, and this runtime-only agent cannot compile it"
            ),
        })
    }

    #[cfg(feature = "compiler")]
    fn compile(
        &self,
        digest: &Digest,
        path: &Path,
        artifact_path: &Path,
    ) -> Result<Artifact, RuntimeError> {
        let invalid = |reason: String| RuntimeError::InvalidModule {
            digest: digest.as_str().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Prepare {
            digest: digest.as_str().to_string(),
            reason: format!("cannot read {:?}: {e}", path),
        })?;
        let kind = detect_kind(&bytes).map_err(|e| invalid(e.to_string()))?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (artifact, serialized) = match kind {
            WasmKind::Core => {
                let module = wasmtime::Module::new(&self.engine, &bytes)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                let serialized = module.serialize();
                (Artifact::Core(module), serialized)
            }
            WasmKind::Component => {
                let component = wasmtime::component::Component::new(&self.engine, &bytes)
                    .map_err(|e| invalid(format!("{e:#}")))?;
                let serialized = component.serialize();
                (Artifact::Component(component), serialized)
            }
        };
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled wasm {}",
            kind.name()
        );
        match serialized {
            Ok(bytes) => {
                if let Err(e) = write_atomically(artifact_path, &bytes) {
                    tracing::warn!(
                        path = %artifact_path.display(),
                        error = %e,
                        "cannot cache compiled artifact"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot serialize artifact"),
        }
        Ok(artifact)
    }

    fn link(&self, digest: &Digest, artifact: Artifact) -> Result<WasmModule, RuntimeError> {
        let link_error = |e: wasmtime::Error| RuntimeError::Prepare {
            digest: digest.as_str().to_string(),
            reason: format!("cannot link it against wasi: {e:#}"),
        };
        let kind = match artifact {
            Artifact::Core(module) => {
                match module.get_export("_start") {
                    Some(wasmtime::ExternType::Func(f))
                        if f.params().len() == 0 && f.results().len() == 0 => {}
                    _ => {
                        return Err(RuntimeError::InvalidModule {
                            digest: digest.as_str().to_string(),
                            reason: "core module has no `_start` function: not a wasi command"
                                .to_string(),
                        })
                    }
                }
                ModuleKind::Core(
                    self.core_linker
                        .instantiate_pre(&module)
                        .map_err(link_error)?,
                )
            }
            Artifact::Component(component) => {
                let pre = self
                    .component_linker
                    .instantiate_pre(&component)
                    .map_err(link_error)?;
                ModuleKind::Component(CommandPre::new(pre).map_err(|e| {
                    RuntimeError::InvalidModule {
                        digest: digest.as_str().to_string(),
                        reason: format!("component is not a wasi:cli command: {e:#}"),
                    }
                })?)
            }
        };
        Ok(WasmModule {
            digest: digest.clone(),
            kind,
        })
    }
}

pub(super) enum Artifact {
    Core(wasmtime::Module),
    Component(wasmtime::component::Component),
}

#[allow(unsafe_code)]
pub(super) fn deserialize_artifact(
    engine: &Engine,
    path: &Path,
    kind: wasmtime::Precompiled,
) -> wasmtime::Result<Artifact> {
    // SAFETY: `path` lies in the agent's private data directory and is only ever written
    // (atomically, by rename) with either the output of `Module::serialize`/
    // `Component::serialize` of this same engine configuration (its cache, keyed by the
    // engine's compatibility hash) or an artifact the hub precompiled with the shared
    // `shoal_engine::config`, fetched over TLS from the authenticated hub (the fetcher refuses
    // precompiled modules without TLS). wasmtime also checks the artifact's header, version,
    // target and configuration before using it. The file is trusted as much as the agent's own
    // binary and the hub that signs its desired state.
    unsafe {
        Ok(match kind {
            wasmtime::Precompiled::Module => {
                Artifact::Core(wasmtime::Module::deserialize_file(engine, path)?)
            }
            wasmtime::Precompiled::Component => Artifact::Component(
                wasmtime::component::Component::deserialize_file(engine, path)?,
            ),
        })
    }
}

#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(super) enum WasmKind {
    Core,
    Component,
}

#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
impl WasmKind {
    fn name(self) -> &'static str {
        match self {
            WasmKind::Core => "core module",
            WasmKind::Component => "component",
        }
    }
}

/// Why bytes are not a wasm binary this engine reads.
#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum KindError {
    #[error("unsupported wasm binary version {0:02x?}")]
    Version(Vec<u8>),
    #[error("not a wasm binary: it starts with {0:02x?}, not \"\\0asm\"")]
    NotWasm(Vec<u8>),
}

/// Tells a core module from a component by the 8-byte preamble.
#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
pub(super) fn detect_kind(bytes: &[u8]) -> Result<WasmKind, KindError> {
    const CORE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    const COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    match bytes.get(..8) {
        Some(h) if h == CORE => Ok(WasmKind::Core),
        Some(h) if h == COMPONENT => Ok(WasmKind::Component),
        Some(h) if h[..4] == CORE[..4] => Err(KindError::Version(h[4..].to_vec())),
        _ => Err(KindError::NotWasm(bytes[..bytes.len().min(8)].to_vec())),
    }
}

#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

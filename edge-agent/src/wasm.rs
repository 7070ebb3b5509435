//! [`WasmRuntime`]: runs workloads in wasmtime, with WASI and per-instance limits.
//!
//! - One [`wasmtime::Engine`] per runtime, with epoch interruption; a ticker thread bumps the
//!   epoch every [`EPOCH_TICK`] so every running guest reaches a deadline at least that often.
//!   At each deadline the guest yields to the executor (a spinning guest never monopolises a
//!   thread) and, with a CPU share, sleeps off the rest of its [`CPU_PERIOD`] once it has used
//!   its budget.
//! - Both WASI command flavours: core modules (`wasm32-wasip1`, entry `_start`) and components
//!   (`wasm32-wasip2`, `wasi:cli/run`). Deny by default: only the spec's arguments and
//!   environment, no preopened directories, no network, empty stdin; stdout and stderr go to
//!   the instance's [`LogSink`]. The only grants are the spec's [`crate::runtime::Network`]:
//!   listening on its declared TCP ports, connecting to the current endpoints of the services
//!   it uses, and reading their endpoint files at `/shoal/services`.
//! - Compiled artifacts are cached on disk under `cache_dir/{engine_key}/{digest}.cwasm`,
//!   keyed by a hash of the engine's compatibility settings, and in memory per digest.
//! - A runtime-only build (without the `compiler` feature, so without Cranelift) cannot
//!   compile: its fetcher hands over artifacts the hub precompiled for this engine
//!   ([`shoal_engine`]), which are loaded as they are.
//! - Each linear memory is capped at the spec's memory limit by a [`ResourceLimiter`]; going
//!   over it fails the run with a reason that says "memory limit exceeded".

use crate::logs::{LogSink, Stream};
use crate::runtime::{Exit, Prepared, RunSpec, RuntimeError, WorkloadRuntime};
use shoal_api::ids::Digest;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, InstancePre, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the engine's epoch advances: the longest a guest runs without yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The accounting period of CPU shares: with `cpu_millis = m`, a guest runs at most
/// `CPU_PERIOD * m / 1000` of every period.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Size counted per table element when capping tables against the memory limit.
const TABLE_ELEMENT_BYTES: u64 = 8;
/// Absolute cap on the elements of one table, whatever the memory limit.
const MAX_TABLE_ELEMENTS: u64 = 1 << 20;
/// Permit size handed to the guest's output streams (bytes per write).
const OUTPUT_PERMIT: usize = 64 * 1024;
/// Bumped when the layout of the on-disk cache changes.
const CACHE_FORMAT: &str = "shoal-cwasm-v1";

/// Why a [`WasmRuntime`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WasmInitError {
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
    #[error("cannot create the module cache directory {path:?}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot link wasi into the engine: {0}")]
    Linker(String),
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
    #[error("the wasm runtime must be created inside a tokio runtime")]
    NoTokio,
}

/// Runs WASI workloads in wasmtime. Cheap to clone (all clones share one engine and cache).
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("cache_dir", &self.inner.cache_dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    engine: Engine,
    /// `cache_dir/{engine_key}`.
    cache_dir: PathBuf,
    core_linker: wasmtime::Linker<CoreState>,
    component_linker: wasmtime::component::Linker<ComponentState>,
    prepared: Mutex<HashMap<Digest, Arc<OnceCell<Arc<WasmModule>>>>>,
    compiles: AtomicU64,
}

/// A compiled, linked module or component, ready to instantiate.
pub struct WasmModule {
    digest: Digest,
    kind: ModuleKind,
}

enum ModuleKind {
    Core(InstancePre<CoreState>),
    Component(CommandPre<ComponentState>),
}

impl WasmModule {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Whether this is a (wasip2) component rather than a (wasip1) core module.
    pub fn is_component(&self) -> bool {
        matches!(self.kind, ModuleKind::Component(_))
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            ModuleKind::Core(_) => "core module",
            ModuleKind::Component(_) => "component",
        }
    }
}

impl std::fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmModule")
            .field("digest", &self.digest.as_str())
            .field("kind", &self.kind_name())
            .finish()
    }
}

impl Prepared for WasmModule {}

/// Measurements of one run, from [`WasmRuntime::run_measured`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Wall time from start to exit (or cancellation).
    pub wall: Duration,
    /// Time the guest spent running (instantiating or executing), not counting time it was
    /// blocked in host calls (sleeps) or throttled by its CPU share.
    pub busy: Duration,
}

impl WasmRuntime {
    /// Builds the engine and starts its epoch ticker (an OS thread, so that ticks never wait
    /// for a busy executor), which runs until `shutdown` is cancelled; the returned task ends
    /// once the thread has stopped. Must be called inside a tokio runtime.
    ///
    /// Cancel every run before `shutdown`: without epoch ticks a spinning guest no longer
    /// yields, so its cancellation could not be noticed.
    pub fn new(
        cache_dir: PathBuf,
        shutdown: CancellationToken,
    ) -> Result<(WasmRuntime, tokio::task::JoinHandle<()>), WasmInitError> {
        let tokio = tokio::runtime::Handle::try_current().map_err(|_| WasmInitError::NoTokio)?;
        let config = shoal_engine::config().map_err(|e| WasmInitError::Engine(e.to_string()))?;
        let engine = Engine::new(&config).map_err(|e| WasmInitError::Engine(format!("{e:#}")))?;

        let cache_dir = cache_dir.join(engine_key(&engine));
        std::fs::create_dir_all(&cache_dir).map_err(|source| WasmInitError::CacheDir {
            path: cache_dir.clone(),
            source,
        })?;

        let mut core_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut core_linker, |s: &mut CoreState| &mut s.wasi)
            .map_err(|e| WasmInitError::Linker(format!("{e:#}")))?;
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| WasmInitError::Linker(format!("{e:#}")))?;

        // The epoch advances on a thread of its own, not on a tokio timer: a guest only yields
        // at epoch deadlines, so a timer that needs a worker thread to be driven could wait
        // forever behind the very guests it is meant to interrupt.
        let (stop_ticker, ticks) = std::sync::mpsc::channel::<()>();
        let ticker_engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-wasm-epoch".to_string())
            .spawn(move || {
                // Ends when the sender is dropped.
                while let Err(RecvTimeoutError::Timeout) = ticks.recv_timeout(EPOCH_TICK) {
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(WasmInitError::Ticker)?;
        let ticker = tokio.spawn(async move {
            shutdown.cancelled().await;
            drop(stop_ticker);
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
            {
                tracing::warn!("wasm epoch ticker thread panicked");
            }
            tracing::debug!("wasm epoch ticker stopped");
        });

        let runtime = WasmRuntime {
            inner: Arc::new(Inner {
                engine,
                cache_dir,
                core_linker,
                component_linker,
                prepared: Mutex::new(HashMap::new()),
                compiles: AtomicU64::new(0),
            }),
        };
        Ok((runtime, ticker))
    }

    /// The directory holding this engine's compiled artifacts (`cache_dir/{engine_key}`).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// Where the compiled artifact of `digest` is cached.
    pub fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.inner.artifact_path(digest)
    }

    /// The target this engine runs code for, which a runtime-only agent asks the hub to
    /// precompile for (see [`shoal_engine::native_target`]).
    pub fn target(&self) -> String {
        shoal_engine::native_target(&self.inner.engine)
    }

    /// Whether this build can compile wasm itself (else it is runtime-only).
    pub const fn compiles() -> bool {
        cfg!(feature = "compiler")
    }

    /// How many times this runtime compiled wasm from source (cache misses).
    pub fn compile_count(&self) -> u64 {
        self.inner.compiles.load(Ordering::Relaxed)
    }

    /// Prepares the module at `path` (see [`WorkloadRuntime::prepare`]). Concurrent prepares
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

    /// Runs `module` like [`WorkloadRuntime::run`] and also reports how long it ran and how
    /// much of that it was busy.
    pub async fn run_measured(
        &self,
        module: Arc<WasmModule>,
        spec: RunSpec,
        log: LogSink,
        cancel: CancellationToken,
    ) -> (Exit, RunStats) {
        let span = tracing::info_span!(
            "run",
            instance = %spec.instance,
            digest = %module.digest,
        );
        self.run_inner(module, spec, log, cancel)
            .instrument(span)
            .await
    }

    async fn run_inner(
        &self,
        module: Arc<WasmModule>,
        spec: RunSpec,
        log: LogSink,
        cancel: CancellationToken,
    ) -> (Exit, RunStats) {
        let instance = spec.instance.clone();
        log.system(&format!(
            "started {} {} (memory limit {}, cpu {})",
            module.kind_name(),
            module.digest,
            fmt_bytes(spec.memory_limit),
            spec.cpu_millis
                .map_or_else(|| "unlimited".to_string(), |m| format!("{m}m")),
        ));
        tracing::info!(instance = %instance, "instance started");

        let started = Instant::now();
        let meter = Arc::new(Meter::new());
        let usage = spec.usage.clone();
        usage.memory_freed();
        let guest: Pin<Box<dyn Future<Output = Exit> + Send>> = match &module.kind {
            ModuleKind::Core(pre) => Box::pin(run_core(
                self.inner.engine.clone(),
                pre.clone(),
                spec,
                log.clone(),
                meter.clone(),
            )),
            ModuleKind::Component(pre) => Box::pin(run_component(
                self.inner.engine.clone(),
                pre.clone(),
                spec,
                log.clone(),
                meter.clone(),
            )),
        };
        let metered = Metered {
            inner: guest,
            meter: meter.clone(),
            usage: usage.clone(),
        };
        let exit = tokio::select! {
            biased;
            () = cancel.cancelled() => Exit::Cancelled,
            exit = metered => exit,
        };
        // The guest's future (and its store) is dropped by now.
        usage.memory_freed();
        let stats = RunStats {
            wall: started.elapsed(),
            busy: meter.busy(),
        };
        log.flush_partial();
        let what = match &exit {
            Exit::Success => "success".to_string(),
            Exit::Failure { reason, .. } => reason.clone(),
            Exit::Cancelled => "cancelled".to_string(),
        };
        log.system(&format!(
            "exited: {what} (ran {:.2} s, busy {} ms)",
            stats.wall.as_secs_f64(),
            stats.busy.as_millis()
        ));
        match &exit {
            Exit::Failure { .. } => {
                tracing::warn!(instance = %instance, reason = %what, "instance failed");
            }
            _ => tracing::info!(instance = %instance, exit = %what, "instance exited"),
        }
        (exit, stats)
    }
}

impl WorkloadRuntime for WasmRuntime {
    type Module = WasmModule;

    fn prepare(
        &self,
        digest: &Digest,
        path: PathBuf,
    ) -> impl Future<Output = Result<Arc<WasmModule>, RuntimeError>> + Send {
        self.prepare_module(digest, path)
    }

    fn run(
        &self,
        module: Arc<WasmModule>,
        spec: RunSpec,
        log: LogSink,
        cancel: CancellationToken,
    ) -> impl Future<Output = Exit> + Send {
        let this = self.clone();
        async move { this.run_measured(module, spec, log, cancel).await.0 }
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
        let kind = detect_kind(&bytes).map_err(invalid)?;
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

enum Artifact {
    Core(wasmtime::Module),
    Component(wasmtime::component::Component),
}

#[allow(unsafe_code)]
fn deserialize_artifact(
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
enum WasmKind {
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

/// Tells a core module from a component by the 8-byte preamble.
#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
fn detect_kind(bytes: &[u8]) -> Result<WasmKind, String> {
    const CORE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    const COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    match bytes.get(..8) {
        Some(h) if h == CORE => Ok(WasmKind::Core),
        Some(h) if h == COMPONENT => Ok(WasmKind::Component),
        Some(h) if h[..4] == CORE[..4] => {
            Err(format!("unsupported wasm binary version {:02x?}", &h[4..]))
        }
        _ => Err(format!(
            "not a wasm binary: it starts with {:02x?}, not \"\\0asm\"",
            &bytes[..bytes.len().min(8)]
        )),
    }
}

#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// A short hex key of everything that makes compiled artifacts (in)compatible: wasmtime's
/// own compatibility hash where it compiles, else (runtime-only) the stamp and target of the
/// artifacts the hub compiles for it.
fn engine_key(engine: &Engine) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = Sha256Hasher(sha2::Sha256::default());
    CACHE_FORMAT.hash(&mut hasher);
    #[cfg(feature = "compiler")]
    engine.precompile_compatibility_hash().hash(&mut hasher);
    #[cfg(not(feature = "compiler"))]
    (shoal_engine::ENGINE_ID, shoal_engine::native_target(engine)).hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A deterministic [`std::hash::Hasher`] (unlike `DefaultHasher`, stable across builds).
struct Sha256Hasher(sha2::Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        use sha2::Digest as _;
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }
    fn write(&mut self, bytes: &[u8]) {
        use sha2::Digest as _;
        self.0.update(bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Store data: WASI context, limits and CPU accounting.

struct Host<W> {
    wasi: W,
    limits: Limits,
    meter: Arc<Meter>,
    quota: Option<Quota>,
    /// `spec.limits.cpuTime`: busy time after which the run is stopped.
    cpu_time: Option<Duration>,
    /// `spec.limits.logRate`, counted by the guest's output streams.
    output: Option<Arc<OutputBudget>>,
}

/// Output accounting for `spec.limits.logRate`: bytes written in the current window. A
/// window over its allowance marks the run, which the next epoch deadline stops.
#[derive(Debug)]
pub struct OutputBudget {
    per_window: u64,
    per_sec: u64,
    origin: Instant,
    window_start_ms: AtomicU64,
    bytes: AtomicU64,
    exceeded: std::sync::atomic::AtomicBool,
}

impl OutputBudget {
    fn for_spec(spec: &RunSpec) -> Option<Arc<Self>> {
        let per_sec = spec.limits.log_bytes_per_sec?;
        let window = shoal_api::workload::RunLimits::LOG_WINDOW_SECS;
        Some(Arc::new(OutputBudget {
            per_window: per_sec.saturating_mul(window),
            per_sec,
            origin: Instant::now(),
            window_start_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            exceeded: Default::default(),
        }))
    }

    fn add(&self, n: usize) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let window_ms = shoal_api::workload::RunLimits::LOG_WINDOW_SECS * 1000;
        if now.saturating_sub(self.window_start_ms.load(Ordering::Acquire)) >= window_ms {
            self.window_start_ms.store(now, Ordering::Release);
            self.bytes.store(0, Ordering::Release);
        }
        let total = self.bytes.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        if total > self.per_window {
            self.exceeded.store(true, Ordering::Release);
        }
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }

    fn error(&self) -> LimitExceeded {
        LimitExceeded::LogRate {
            per_sec: self.per_sec,
            window: shoal_api::workload::RunLimits::LOG_WINDOW_SECS,
        }
    }
}

type CoreState = Host<WasiP1Ctx>;
type ComponentState = Host<P2Wasi>;

struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// Why a run hit one of its limits; becomes the run's failure reason.
#[derive(Debug, thiserror::Error)]
enum LimitExceeded {
    #[error(
        "memory limit exceeded: the module tried to grow its memory to {}, above its limit of {}",
        fmt_bytes(*.desired),
        fmt_bytes(*.limit)
    )]
    Memory { desired: u64, limit: u64 },
    #[error(
        "table limit exceeded: the module tried to grow a table to {desired} elements, above \
         its limit of {limit}"
    )]
    Table { desired: u64, limit: u64 },
    #[error("CPU time limit exceeded: the run used its limit of {} of CPU time (spec.limits.cpuTime)", shoal_api::quantity::format_duration_ms(*.limit_ms))]
    CpuTime { limit_ms: u64 },
    #[error("log rate limit exceeded: the run wrote more than {}/s over {window} s (spec.limits.logRate)", fmt_bytes(*.per_sec))]
    LogRate { per_sec: u64, window: u64 },
}

struct Limits {
    memory: u64,
    table_elements: u64,
    /// Where the memory the guest holds is reported.
    usage: Arc<crate::runtime::Usage>,
}

impl Limits {
    fn new(memory_limit: u64, usage: Arc<crate::runtime::Usage>) -> Self {
        Limits {
            memory: memory_limit,
            table_elements: (memory_limit / TABLE_ELEMENT_BYTES).min(MAX_TABLE_ELEMENTS),
            usage,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Also called with `current = 0` when an instance creates its memories, so a module
        // whose initial memory is over the limit fails the same way.
        let desired = desired as u64;
        if desired > self.memory {
            return Err(LimitExceeded::Memory {
                desired,
                limit: self.memory,
            }
            .into());
        }
        self.usage.memory_grew(current as u64, desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.table_elements {
            return Err(LimitExceeded::Table {
                desired,
                limit: self.table_elements,
            }
            .into());
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        1_000
    }

    fn tables(&self) -> usize {
        1_000
    }

    fn memories(&self) -> usize {
        100
    }
}

/// Running time of one guest: wall time spent inside `poll` of its future.
struct Meter {
    origin: Instant,
    /// Nanoseconds of finished polls.
    busy_nanos: AtomicU64,
    /// When the current poll started, in nanoseconds since `origin` plus one; 0: not polling.
    poll_start: AtomicU64,
}

impl Meter {
    fn new() -> Self {
        Meter {
            origin: Instant::now(),
            busy_nanos: AtomicU64::new(0),
            poll_start: AtomicU64::new(0),
        }
    }

    fn nanos_since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Busy time so far, including the poll in progress.
    fn busy_at(&self, now: Instant) -> Duration {
        let mut nanos = self.busy_nanos.load(Ordering::Acquire);
        let start = self.poll_start.load(Ordering::Acquire);
        if start != 0 {
            nanos = nanos.saturating_add(self.nanos_since_origin(now).saturating_sub(start - 1));
        }
        Duration::from_nanos(nanos)
    }

    fn busy(&self) -> Duration {
        self.busy_at(Instant::now())
    }
}

/// Wraps the guest's future, accounting the time spent in its `poll` to a [`Meter`].
struct Metered<F: ?Sized> {
    inner: Pin<Box<F>>,
    meter: Arc<Meter>,
    /// The replica's running total, for `ps` and metrics.
    usage: Arc<crate::runtime::Usage>,
}

impl<F: Future + ?Sized> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let start = Instant::now();
        let start_nanos = this.meter.nanos_since_origin(start);
        this.meter
            .poll_start
            .store(start_nanos.saturating_add(1), Ordering::Release);
        let result = this.inner.as_mut().poll(cx);
        let elapsed = this
            .meter
            .nanos_since_origin(Instant::now())
            .saturating_sub(start_nanos);
        this.meter.busy_nanos.fetch_add(elapsed, Ordering::AcqRel);
        this.meter.poll_start.store(0, Ordering::Release);
        this.usage.add_cpu(elapsed);
        result
    }
}

/// CPU share state, read and updated at each epoch deadline.
struct Quota {
    /// Running time allowed per [`CPU_PERIOD`].
    budget: Duration,
    period_start: Instant,
    /// Busy time at the start of the period (less any overrun carried over).
    busy_at_start: Duration,
}

impl Quota {
    fn new(cpu_millis: u32, now: Instant) -> Self {
        let millis = cpu_millis.clamp(1, 1000);
        Quota {
            budget: CPU_PERIOD * millis / 1000,
            period_start: now,
            busy_at_start: Duration::ZERO,
        }
    }

    /// `Some(wake)`: the budget of this period is used up; sleep until `wake`.
    fn check(&mut self, busy: Duration, now: Instant) -> Option<Instant> {
        if now >= self.period_start + CPU_PERIOD {
            // New period; an overrun of the last one (the guest runs a whole tick between
            // checks) is charged to this one, at most one budget's worth.
            let used = busy.saturating_sub(self.busy_at_start);
            let overrun = used.saturating_sub(self.budget).min(self.budget);
            self.period_start = now;
            self.busy_at_start = busy.saturating_sub(overrun);
        }
        let used = busy.saturating_sub(self.busy_at_start);
        (used >= self.budget).then_some(self.period_start + CPU_PERIOD)
    }
}

fn new_store<W: Send + 'static>(engine: &Engine, host: Host<W>) -> Store<Host<W>> {
    let mut store = Store::new(engine, host);
    store.limiter(|host| &mut host.limits);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let host = ctx.data_mut();
        let now = Instant::now();
        // Limits that stop the run, checked at every deadline (at least every tick of running).
        if let Some(limit) = host.cpu_time {
            if host.meter.busy_at(now) > limit {
                let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
                return Err(LimitExceeded::CpuTime { limit_ms }.into());
            }
        }
        if let Some(out) = host.output.as_ref().filter(|o| o.exceeded()) {
            return Err(out.error().into());
        }
        let Some(quota) = host.quota.as_mut() else {
            return Ok(yield_to_tokio());
        };
        match quota.check(host.meter.busy_at(now), now) {
            Some(wake) => Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::time::sleep_until(wake.into())),
            )),
            None => Ok(yield_to_tokio()),
        }
    });
    store
}

/// Yields to the executor and continues for another tick. `tokio::task::yield_now` (rather
/// than a plain self-wake) lets the worker poll its timers and I/O before resuming the guest,
/// so a spinning guest does not delay the timers of others on its worker.
fn yield_to_tokio() -> UpdateDeadline {
    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
}

fn host<W>(
    wasi: W,
    spec: &RunSpec,
    meter: Arc<Meter>,
    output: Option<Arc<OutputBudget>>,
) -> Host<W> {
    Host {
        wasi,
        limits: Limits::new(spec.memory_limit, spec.usage.clone()),
        meter,
        quota: spec.cpu_millis.map(|m| Quota::new(m, Instant::now())),
        cpu_time: spec.limits.cpu_time_ms.map(Duration::from_millis),
        output,
    }
}

fn wasi_builder(
    spec: &RunSpec,
    log: &LogSink,
    budget: Option<Arc<OutputBudget>>,
) -> Result<WasiCtxBuilder, String> {
    let mut builder = WasiCtxBuilder::new();
    builder
        .arg(&spec.instance)
        .args(&spec.args)
        .stdout(GuestOutput {
            sink: log.clone(),
            stream: Stream::Stdout,
            budget: budget.clone(),
        })
        .stderr(GuestOutput {
            sink: log.clone(),
            stream: Stream::Stderr,
            budget,
        })
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (key, value) in &spec.env {
        builder.env(key, value);
    }
    let net = &spec.network;
    if let Some(dir) = &net.services_dir {
        builder
            .preopened_dir(
                dir,
                crate::services::GUEST_DIR,
                wasmtime_wasi::FsPerms::ReadOnly,
            )
            .map_err(|e| format!("cannot open services directory {}: {e}", dir.display()))?;
    }
    for m in &spec.mounts {
        let perms = if m.read_only {
            wasmtime_wasi::FsPerms::ReadOnly
        } else {
            wasmtime_wasi::FsPerms::ReadWrite
        };
        builder
            .preopened_dir(&m.host, &m.guest, perms)
            .map_err(|e| format!("cannot open {}: {e}", m.host.display()))?;
    }
    // TCP only for what the manifest declares: listening on its own ports, connecting to the
    // current endpoints of the services it uses and to `spec.network.allow`. Everything else
    // is denied, and a denied connect is said in the replica's log (the guest only sees
    // "access denied").
    let outbound = net.connect.is_some() || !net.allow.is_empty();
    builder.allow_tcp(!net.listen.is_empty() || outbound);
    let listen = net.listen.clone();
    let connect = net.connect.clone();
    let allow = net.allow.clone();
    let denied_log = log.clone();
    // Each denied destination is said once per run (a guest retrying in a loop must not fill
    // its log with the same line), for at most 32 destinations.
    let said = std::sync::Mutex::new(std::collections::BTreeSet::<std::net::SocketAddr>::new());
    builder.socket_addr_check(move |addr, use_| {
        use wasmtime_wasi::sockets::SocketAddrUse as U;
        let ok = match use_ {
            U::TcpBind => listen.contains(&addr.port()) || (addr.port() == 0 && outbound),
            U::TcpListen => listen.contains(&addr.port()),
            U::TcpAccept => !listen.is_empty(),
            U::TcpConnect => {
                let ok = allow.iter().any(|r| r.allows(addr))
                    || connect
                        .as_ref()
                        .and_then(|c| c.read().ok().map(|set| set.contains(&addr)))
                        .unwrap_or(false);
                let first = !ok
                    && said
                        .lock()
                        .map(|mut set| set.len() < 32 && set.insert(addr))
                        .unwrap_or(false);
                if first {
                    denied_log.system(&format!(
                        "connect to {addr} denied: not in spec.network.allow nor an endpoint of spec.uses"
                    ));
                }
                ok
            }
            _ => false,
        };
        Box::pin(async move { ok })
    });
    // Defaults kept: empty (closed) stdin, no inherited env, no other preopens.
    Ok(builder)
}

async fn run_core(
    engine: Engine,
    pre: InstancePre<CoreState>,
    spec: RunSpec,
    log: LogSink,
    meter: Arc<Meter>,
) -> Exit {
    let budget = OutputBudget::for_spec(&spec);
    let wasi = match wasi_builder(&spec, &log, budget.clone()) {
        Ok(mut b) => b.build_p1(),
        Err(reason) => return Exit::Failure { code: None, reason },
    };
    let mut store = new_store(&engine, host(wasi, &spec, meter, budget));
    let result = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    }
    .await;
    match result {
        Ok(()) => Exit::Success,
        Err(e) => exit_from_error(&e),
    }
}

async fn run_component(
    engine: Engine,
    pre: CommandPre<ComponentState>,
    spec: RunSpec,
    log: LogSink,
    meter: Arc<Meter>,
) -> Exit {
    let budget = OutputBudget::for_spec(&spec);
    let ctx = match wasi_builder(&spec, &log, budget.clone()) {
        Ok(mut b) => b.build(),
        Err(reason) => return Exit::Failure { code: None, reason },
    };
    let wasi = P2Wasi {
        ctx,
        table: ResourceTable::new(),
    };
    let mut store = new_store(&engine, host(wasi, &spec, meter, budget));
    let result = async {
        let command = pre.instantiate_async(&mut store).await?;
        command.wasi_cli_run().call_run(&mut store).await
    }
    .await;
    match result {
        Ok(Ok(())) => Exit::Success,
        Ok(Err(())) => Exit::Failure {
            code: Some(1),
            reason: "exited with status 1".to_string(),
        },
        Err(e) => exit_from_error(&e),
    }
}

fn exit_from_error(e: &wasmtime::Error) -> Exit {
    if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
        return match *code {
            0 => Exit::Success,
            code => Exit::Failure {
                code: Some(code),
                reason: format!("exited with status {code}"),
            },
        };
    }
    if let Some(limit) = e.downcast_ref::<LimitExceeded>() {
        return Exit::Failure {
            code: None,
            reason: limit.to_string(),
        };
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return Exit::Failure {
            code: None,
            reason: format!("trap: {trap}"),
        };
    }
    Exit::Failure {
        code: None,
        reason: format!("error: {}", e.root_cause()),
    }
}

/// `17.1 MiB`, `16 MiB`, `64 KiB`.
fn fmt_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let (unit, name) = if bytes >= MIB {
        (MIB, "MiB")
    } else if bytes >= KIB {
        (KIB, "KiB")
    } else {
        return format!("{bytes} B");
    };
    if bytes.is_multiple_of(unit) {
        format!("{} {name}", bytes / unit)
    } else {
        format!("{:.1} {name}", bytes as f64 / unit as f64)
    }
}

// ---------------------------------------------------------------------------------------------
// Guest stdout/stderr into the log.

/// Guest stdout or stderr, written synchronously into a [`LogSink`].
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub sink: LogSink,
    pub stream: Stream,
    /// `spec.limits.logRate` accounting, if limited.
    pub budget: Option<Arc<OutputBudget>>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(b) = &self.budget {
            b.add(buf.len());
            if b.exceeded() {
                return Poll::Ready(Err(std::io::Error::other(b.error().to_string())));
            }
        }
        self.sink.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        if let Some(b) = &self.budget {
            b.add(bytes.len());
            if b.exceeded() {
                // Stop the guest at once, not at the next deadline: a flood writes megabytes
                // in one tick.
                return Err(wasmtime_wasi::p2::StreamError::Trap(b.error().into()));
            }
        }
        self.sink.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const MIB: u64 = 1024 * 1024;

    /// Path of an example guest; fails the test (with how to build it) when it is missing.
    fn example(name: &str) -> PathBuf {
        let file = format!("{name}.wasm");
        let target = if name == "hello" || name == "netprobe" {
            "wasm32-wasip2"
        } else {
            "wasm32-wasip1"
        };
        let path = match std::env::var_os("SHOAL_MODULES_DIR") {
            Some(dir) => PathBuf::from(dir).join(&file),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/shoal/modules-target")
                .join(target)
                .join("release")
                .join(&file),
        };
        assert!(
            path.is_file(),
            "example guest {path:?} is missing: build the examples with scripts/build-modules.sh \
             (or set SHOAL_MODULES_DIR to a directory holding them)"
        );
        path
    }

    struct Fixture {
        runtime: WasmRuntime,
        shutdown: CancellationToken,
        ticker: tokio::task::JoinHandle<()>,
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            Fixture::with_cache(dir, "cache")
        }

        fn with_cache(dir: tempfile::TempDir, cache: &str) -> Fixture {
            let shutdown = CancellationToken::new();
            let (runtime, ticker) =
                WasmRuntime::new(dir.path().join(cache), shutdown.clone()).unwrap();
            Fixture {
                runtime,
                shutdown,
                ticker,
                dir,
            }
        }

        async fn prepare(&self, name: &str) -> Arc<WasmModule> {
            let path = example(name);
            let digest = Digest::of(&std::fs::read(&path).unwrap());
            self.runtime.prepare(&digest, path).await.unwrap()
        }

        fn log(&self, instance: &str) -> LogSink {
            LogSink::open(&self.dir.path().join("logs"), instance, MIB).unwrap()
        }

        async fn stop(self) -> tempfile::TempDir {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(1), self.ticker)
                .await
                .unwrap()
                .unwrap();
            self.dir
        }
    }

    fn spec(instance: &str, args: &[&str]) -> RunSpec {
        RunSpec {
            instance: instance.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            memory_limit: 64 * MIB,
            cpu_millis: None,
            network: Default::default(),
            mounts: vec![],
            limits: Default::default(),
            usage: Default::default(),
        }
    }

    fn log_text(log: &LogSink) -> String {
        std::fs::read_to_string(log.path()).unwrap()
    }

    async fn run_to_end(fx: &Fixture, module: Arc<WasmModule>, spec: RunSpec) -> (Exit, LogSink) {
        let log = fx.log(&spec.instance);
        let run = fx
            .runtime
            .run(module, spec, log.clone(), CancellationToken::new());
        let exit = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap();
        (exit, log)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_time_and_log_rate_limits_stop_the_run_with_a_reason() {
        let fx = Fixture::new();
        let module = fx.prepare("probe").await;
        // An endless loop with a CPU time limit: stopped once it used 300 ms.
        let mut spinner = spec("spin-0", &["spin"]);
        spinner.limits.cpu_time_ms = Some(300);
        let t0 = Instant::now();
        let (exit, _) = run_to_end(&fx, module.clone(), spinner).await;
        let Exit::Failure { reason, .. } = exit else {
            panic!("{exit:?}")
        };
        assert!(
            reason.contains("CPU time limit exceeded") && reason.contains("300ms"),
            "{reason}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
        // A heartbeat under the same limit is not stopped for sleeping.
        let mut beat = spec("beat-0", &["heartbeat", "100"]);
        beat.limits.cpu_time_ms = Some(300);
        let log = fx.log("beat-0");
        let cancel = CancellationToken::new();
        let run = fx
            .runtime
            .run(module.clone(), beat, log.clone(), cancel.clone());
        let stop = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            cancel.cancel();
        };
        let (exit, ()) = tokio::join!(run, stop);
        assert_eq!(exit, Exit::Cancelled);

        // A flood of output with a log rate limit: stopped, and the log stays small.
        let mut flood = spec("flood-0", &["flood"]);
        flood.limits.log_bytes_per_sec = Some(10 * 1024);
        let (exit, log) = run_to_end(&fx, module, flood).await;
        let Exit::Failure { reason, .. } = exit else {
            panic!("{exit:?}")
        };
        assert!(
            reason.contains("log rate limit exceeded") && reason.contains("10 KiB/s"),
            "{reason}"
        );
        let written = std::fs::metadata(log.path()).unwrap().len();
        assert!(
            written < 2 << 20,
            "the flood wrote {written} bytes before it was stopped"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn component_hello_succeeds_after_its_beats() {
        let fx = Fixture::new();
        let module = fx.prepare("hello").await;
        assert!(module.is_component());
        let mut spec = spec("hello-0", &["world"]);
        spec.env.insert("BEATS".into(), "3".into());
        spec.env.insert("INTERVAL_MS".into(), "20".into());
        let (exit, log) = run_to_end(&fx, module, spec).await;
        let text = log_text(&log);
        assert_eq!(exit, Exit::Success, "log:\n{text}");
        assert!(
            text.contains("hello from a wasip2 component; args=[\"world\"]\n"),
            "log:\n{text}"
        );
        assert!(text.contains("\nheartbeat 3\n"), "log:\n{text}");
        assert!(!text.contains("heartbeat 4"), "log:\n{text}");
        assert!(text.contains("[shoal] exited: success"), "log:\n{text}");
        fx.stop().await;
    }

    /// Polls `log` until it contains `needle` (10 s at most).
    async fn wait_for(log: &LogSink, needle: &str) -> String {
        for _ in 0..200 {
            let text = log_text(log);
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{needle:?} never appeared in:\n{}", log_text(log));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_only_where_the_manifest_grants_them() {
        let fx = Fixture::new();
        let module = fx.prepare("netprobe").await;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let port_s = port.to_string();

        // No `ports`: listening is refused.
        let (exit, log) =
            run_to_end(&fx, module.clone(), spec("deny-0", &["serve", &port_s])).await;
        assert!(
            matches!(exit, Exit::Failure { code: Some(1), .. }),
            "{exit:?}"
        );
        assert!(log_text(&log).contains(&format!("cannot listen on port {port}")));

        // The declared port: it serves.
        let mut serve = spec("serve-0", &["serve", &port_s]);
        serve.network.listen = vec![port];
        let log = fx.log("serve-0");
        let stop = CancellationToken::new();
        let client = async {
            wait_for(&log, "serving on port").await;
            let reply = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).unwrap();
                text
            })
            .await
            .unwrap();
            stop.cancel();
            reply
        };
        let (exit, reply) = tokio::join!(
            fx.runtime
                .run(module.clone(), serve, log.clone(), stop.clone()),
            client
        );
        assert_eq!(reply, "hello from serve-0\n");
        assert_eq!(exit, Exit::Cancelled);

        // A consumer: connects only to what its allow-list holds right now.
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = host.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in host.incoming() {
                use std::io::Write;
                let _ = writeln!(conn.unwrap(), "hi from the host");
            }
        });
        let services = fx.dir.path().join("services");
        std::fs::create_dir_all(services.join("svc")).unwrap();
        std::fs::write(services.join("svc/tcp"), format!("{target}\n")).unwrap();
        let allow: crate::runtime::AllowList = Default::default();
        let mut call = spec("call-0", &["call", "svc", "tcp", "50"]);
        call.network.connect = Some(allow.clone());
        call.network.services_dir = Some(services);
        let log = fx.log("call-0");
        let stop = CancellationToken::new();
        let check = async {
            let text = wait_for(&log, &format!("cannot connect to {target}")).await;
            assert!(
                text.contains(&format!("endpoints of svc/tcp: [{target}]")),
                "{text}"
            );
            assert!(!text.contains("reply from"), "{text}");
            allow.write().unwrap().insert(target);
            wait_for(&log, &format!("reply from {target}: hi from the host")).await;
            stop.cancel();
        };
        let (exit, ()) = tokio::join!(
            fx.runtime.run(module, call, log.clone(), stop.clone()),
            check
        );
        assert_eq!(exit, Exit::Cancelled);
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn core_probe_crash_exits_with_status_3() {
        let fx = Fixture::new();
        let module = fx.prepare("probe").await;
        assert!(!module.is_component());
        let (exit, log) = run_to_end(&fx, module, spec("probe-0", &["crash"])).await;
        assert_eq!(
            exit,
            Exit::Failure {
                code: Some(3),
                reason: "exited with status 3".into()
            }
        );
        let text = log_text(&log);
        assert!(text.contains("probe: about to crash\n"), "log:\n{text}");
        assert!(text.contains("[shoal] exited: exited with status 3"));
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volume_keeps_its_files_across_runs_and_nothing_else_is_visible() {
        let fx = Fixture::new();
        let module = fx.prepare("probe").await;
        let vol = fx.dir.path().join("volumes/probe/data");
        std::fs::create_dir_all(&vol).unwrap();
        let mut s = spec("probe-0", &["count", "/data/n"]);
        s.mounts = vec![crate::runtime::Mount {
            host: vol.clone(),
            guest: "/data".into(),
            read_only: false,
        }];
        for want in ["count 1", "count 2"] {
            let (exit, log) = run_to_end(&fx, module.clone(), s.clone()).await;
            assert_eq!(exit, Exit::Success, "{}", log_text(&log));
            assert!(log_text(&log).contains(want), "{}", log_text(&log));
        }
        assert_eq!(std::fs::read_to_string(vol.join("n")).unwrap(), "2");
        // Without the volume the same path does not exist: no file system by default.
        let (exit, log) =
            run_to_end(&fx, module.clone(), spec("probe-1", &["count", "/data/n"])).await;
        assert!(
            matches!(exit, Exit::Failure { code: Some(1), .. }),
            "{exit:?}"
        );
        assert!(log_text(&log).contains("cannot write /data/n"));
        // Nothing leads out of a volume: not `..`, not a symlink planted in it (cap-std
        // resolves every path beneath the preopened directory).
        std::fs::write(fx.dir.path().join("secret"), "host secret").unwrap();
        std::os::unix::fs::symlink(fx.dir.path().join("secret"), vol.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../secret", vol.join("rel")).unwrap();
        for path in ["/data/../secret", "/data/abs", "/data/rel", "/secret"] {
            let mut s = s.clone();
            s.instance = "probe-2".into();
            s.args = vec!["cat".into(), path.into()];
            let (exit, log) = run_to_end(&fx, module.clone(), s).await;
            let text = log_text(&log);
            assert!(
                matches!(exit, Exit::Failure { code: Some(1), .. }),
                "{path}: {exit:?} {text}"
            );
            assert!(!text.contains("host secret"), "{path} escaped: {text}");
        }
        // A file inside the volume is readable, so the failures above are the sandbox's.
        std::fs::write(vol.join("inside"), "mine").unwrap();
        let mut inside = s.clone();
        inside.args = vec!["cat".into(), "/data/inside".into()];
        let (exit, log) = run_to_end(&fx, module, inside).await;
        assert_eq!(exit, Exit::Success, "{}", log_text(&log));
        assert!(log_text(&log).contains("mine"));
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_hog_hits_the_memory_limit() {
        let fx = Fixture::new();
        let module = fx.prepare("probe").await;
        let mut hog = spec("hog-0", &["hog"]);
        hog.memory_limit = 16 * MIB;
        let (exit, log) = run_to_end(&fx, module.clone(), hog).await;
        let text = log_text(&log);
        match &exit {
            Exit::Failure { code: None, reason } => {
                assert!(
                    reason.contains("memory limit exceeded") && reason.contains("16 MiB"),
                    "{reason}"
                );
            }
            other => panic!("expected a memory limit failure, got {other:?}; log:\n{text}"),
        }
        assert!(text.contains("hog: holding 1 MiB\n"), "log:\n{text}");
        assert!(!text.contains("hog: holding 16 MiB"), "log:\n{text}");

        // A limit below the module's initial memory fails at instantiation, the same way.
        let mut tiny = spec("hog-1", &["hog", "1"]);
        tiny.memory_limit = 64 * 1024;
        let (exit, log) = run_to_end(&fx, module, tiny).await;
        match &exit {
            Exit::Failure { code: None, reason } => {
                assert!(reason.contains("memory limit exceeded"), "{reason}");
            }
            other => panic!("expected a memory limit failure, got {other:?}"),
        }
        assert!(!log_text(&log).contains("hog: holding"));
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_share_throttles_a_spinner_without_starving_others() {
        let fx = Fixture::new();
        let probe = fx.prepare("probe").await;

        let start_run = |spec: RunSpec, cancel: CancellationToken| {
            let log = fx.log(&spec.instance);
            let runtime = fx.runtime.clone();
            let module = probe.clone();
            let sink = log.clone();
            let task = tokio::spawn(async move {
                let (exit, stats) = runtime.run_measured(module, spec, sink, cancel).await;
                (exit, stats, Instant::now())
            });
            (task, log)
        };
        let cancel = CancellationToken::new();
        let mut spinner = spec("spin-0", &["spin"]);
        spinner.cpu_millis = Some(100);
        let (spin_task, spin_log) = start_run(spinner, cancel.clone());
        let (beat_task, beat_log) = start_run(spec("beat-0", &["heartbeat", "50"]), cancel.clone());

        let window = Duration::from_millis(1500);
        tokio::time::sleep(window).await;
        let beats = beat_log
            .tail(usize::MAX)
            .iter()
            .filter(|l| l.starts_with("beat "))
            .count();
        let cancelled_at = Instant::now();
        cancel.cancel();
        let (spin_exit, spin_stats, spin_end) =
            tokio::time::timeout(Duration::from_secs(5), spin_task)
                .await
                .unwrap()
                .unwrap();
        let (beat_exit, _, beat_end) = tokio::time::timeout(Duration::from_secs(5), beat_task)
            .await
            .unwrap()
            .unwrap();

        let expected = window.as_millis() as usize / 50;
        assert!(
            beats * 10 >= expected * 7,
            "heartbeat kept {beats} of {expected} beats next to the spinner"
        );
        let share = spin_stats.busy.as_secs_f64() / spin_stats.wall.as_secs_f64();
        assert!(
            share < 0.5,
            "spinner with a 100m share was busy {:?} of {:?} ({:.0}%)",
            spin_stats.busy,
            spin_stats.wall,
            share * 100.0
        );
        assert!(
            spin_stats.busy >= Duration::from_millis(50),
            "the spinner barely ran: {spin_stats:?}"
        );
        assert_eq!(spin_exit, Exit::Cancelled);
        assert_eq!(beat_exit, Exit::Cancelled);
        for (what, end) in [("spinner", spin_end), ("heartbeat", beat_end)] {
            let took = end.saturating_duration_since(cancelled_at);
            assert!(
                took < Duration::from_millis(500),
                "{what} took {took:?} to stop"
            );
        }
        assert!(log_text(&spin_log).contains("[shoal] exited: cancelled"));
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compiled_artifacts_are_cached_in_memory_and_on_disk() {
        let fx = Fixture::new();
        let path = example("probe");
        let digest = Digest::of(&std::fs::read(&path).unwrap());
        let artifact = fx.runtime.artifact_path(&digest);
        assert!(!artifact.exists());

        let first = fx.runtime.prepare(&digest, path.clone()).await.unwrap();
        assert_eq!(fx.runtime.compile_count(), 1);
        assert!(artifact.is_file(), "{artifact:?} was not written");
        assert!(artifact.starts_with(fx.dir.path().join("cache")));
        let again = fx.runtime.prepare(&digest, path.clone()).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "second prepare did not hit memory"
        );
        assert_eq!(fx.runtime.compile_count(), 1);
        let dir = fx.stop().await;

        // A fresh runtime on the same cache directory loads the artifact instead of compiling
        // (the source path no longer even exists), and the loaded module runs.
        let fx = Fixture::with_cache(dir, "cache");
        assert_eq!(fx.runtime.artifact_path(&digest), artifact);
        let loaded = fx
            .runtime
            .prepare(&digest, fx.dir.path().join("no-such-file.wasm"))
            .await
            .unwrap();
        assert_eq!(fx.runtime.compile_count(), 0);
        let (exit, _) = run_to_end(&fx, loaded, spec("probe-0", &["crash"])).await;
        assert!(
            matches!(exit, Exit::Failure { code: Some(3), .. }),
            "{exit:?}"
        );

        // A corrupt artifact is ignored and replaced. (Replace the file, never overwrite it in
        // place: a loaded artifact is mapped from it.)
        std::fs::remove_file(&artifact).unwrap();
        std::fs::write(&artifact, b"garbage").unwrap();
        let dir = fx.stop().await;
        let fx = Fixture::with_cache(dir, "cache");
        fx.runtime.prepare(&digest, path).await.unwrap();
        assert_eq!(fx.runtime.compile_count(), 1);
        assert!(std::fs::metadata(&artifact).unwrap().len() > 1000);
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_an_invalid_module() {
        let fx = Fixture::new();
        for (name, bytes) in [
            ("garbage", b"this is not wasm at all".to_vec()),
            ("broken", b"\0asm\x01\0\0\0\x01\xff\xff".to_vec()),
        ] {
            let path = fx.dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let digest = Digest::of(&bytes);
            match fx.runtime.prepare(&digest, path).await {
                Err(RuntimeError::InvalidModule { digest: d, reason }) => {
                    assert_eq!(d, digest.as_str());
                    assert!(!reason.is_empty());
                }
                other => panic!("{name}: expected InvalidModule, got {other:?}"),
            }
        }
        assert!(!fx
            .runtime
            .artifact_dir()
            .read_dir()
            .unwrap()
            .any(|e| e.is_ok()));
        fx.stop().await;
    }

    #[test]
    fn quota_sleeps_once_the_budget_is_used() {
        let t0 = Instant::now();
        let mut q = Quota::new(100, t0);
        assert_eq!(q.budget, Duration::from_millis(10));
        let ms = Duration::from_millis;
        assert_eq!(q.check(ms(5), t0 + ms(5)), None);
        assert_eq!(q.check(ms(10), t0 + ms(12)), Some(t0 + CPU_PERIOD));
        // Next period: the 5 ms overrun is charged to it.
        let t1 = t0 + ms(101);
        assert_eq!(q.check(ms(15), t1), None);
        assert_eq!(q.check(ms(20), t1 + ms(5)), Some(t1 + CPU_PERIOD));
    }

    #[test]
    fn sizes_are_formatted_for_people() {
        assert_eq!(fmt_bytes(16 * MIB), "16 MiB");
        assert_eq!(fmt_bytes(17 * MIB + MIB / 10), "17.1 MiB");
        assert_eq!(fmt_bytes(64 * 1024), "64 KiB");
        let err = LimitExceeded::Memory {
            desired: 17 * MIB + MIB / 10,
            limit: 16 * MIB,
        };
        assert_eq!(
            err.to_string(),
            "memory limit exceeded: the module tried to grow its memory to 17.1 MiB, above its \
             limit of 16 MiB"
        );
    }
}

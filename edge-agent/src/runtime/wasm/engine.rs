//! The wasmtime engine of a [`WasmRuntime`]: built from the shared [`shoal_engine::config`],
//! with WASI linked in (p1 for core modules, p2 for components), and its epoch ticker, an OS
//! thread that advances the epoch every [`EPOCH_TICK`] so every running guest reaches a
//! deadline at least that often. Also the key under which this engine's compiled artifacts
//! are cached ([`engine_key`]).

use super::wasi::CoreState;
use super::{Inner, WasmRuntime};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wasmtime::Engine;

/// How often the engine's epoch advances: the longest a guest runs without yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Bumped when the layout of the on-disk cache changes.
pub(super) const CACHE_FORMAT: &str = "shoal-cwasm-v1";

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
        super::devices::add_to_core_linker(&mut core_linker)
            .map_err(|e| WasmInitError::Linker(format!("{e:#}")))?;
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| WasmInitError::Linker(format!("{e:#}")))?;
        super::devices::add_to_component_linker(&mut component_linker)
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
}

/// A short hex key of everything that makes compiled artifacts (in)compatible: wasmtime's
/// own compatibility hash where it compiles, else (runtime-only) the stamp and target of the
/// artifacts the hub compiles for it.
pub(super) fn engine_key(engine: &Engine) -> String {
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
pub(super) struct Sha256Hasher(sha2::Sha256);

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

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
//!
//! The parts, one concern each: [`engine`] (the engine, its epoch ticker and the key of its
//! artifacts), [`cache`] (compiled artifacts in memory and on disk, compiling, linking),
//! [`wasi`] (the sandbox: arguments, environment, preopened directories, socket grants),
//! [`limits`] (memory and table caps and the limit errors), [`cpu`] (busy-time metering and
//! CPU shares), [`output`] (guest output into the log, under `spec.limits.logRate`) and
//! [`run`] (a store per run, its epoch deadlines, and how a run's end becomes an [`crate::runtime::Exit`]).

mod cache;
mod cpu;
mod devices;
mod engine;
mod host;
mod limits;
mod output;
mod run;
mod wasi;
mod workloads;

pub use cpu::CPU_PERIOD;
pub use engine::{WasmInitError, EPOCH_TICK};
pub use output::{GuestOutput, OutputBudget};
pub use workloads::WasmWorkloads;

use crate::runtime::{Mount, Network, Usage};
use shoal_api::model::ids::Digest;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use wasi::{ComponentState, CoreState};
use wasmtime::{Engine, InstancePre};
use wasmtime_wasi::p2::bindings::CommandPre;

/// Everything needed to start one run of a module (the wasm part of a replica's
/// [`crate::runtime::RunSpec`]). Its `Debug` shows environment names
/// only: values may be secrets.
#[derive(Clone)]
pub struct WasmRun {
    /// Instance name on this device, e.g. `hello-0` (used in logs and spans).
    pub instance: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Hard cap on the guest's linear memories and tables, in bytes.
    pub memory_limit: u64,
    /// CPU share in millicores (1000 = one core); `None`: no cap.
    pub cpu_millis: Option<u32>,
    pub network: Network,
    /// `spec.volumes`: directories preopened read-write at their guest paths.
    pub mounts: Vec<Mount>,
    /// `spec.limits`: breaching one stops the run with the limit as its reason.
    pub limits: shoal_api::model::workload::RunLimits,
    /// Hardware nodes the guest may open through the `shoal:device` interface.
    pub devices: Vec<PathBuf>,
    /// Where the runtime reports what the run uses (shared with the agent).
    pub usage: Arc<Usage>,
}

impl std::fmt::Debug for WasmRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRun")
            .field("instance", &self.instance)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("memory_limit", &self.memory_limit)
            .field("cpu_millis", &self.cpu_millis)
            .field("network", &self.network)
            .field("mounts", &self.mounts)
            .field("limits", &self.limits)
            .field("devices", &self.devices)
            .field("usage", &self.usage)
            .finish()
    }
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
    /// The target this engine runs code for, which a runtime-only agent asks the hub to
    /// precompile for (see [`shoal_engine::native_target`]).
    pub fn target(&self) -> String {
        shoal_engine::native_target(&self.inner.engine)
    }

    /// Whether this build can compile wasm itself (else it is runtime-only).
    pub const fn compiles() -> bool {
        cfg!(feature = "compiler")
    }
}

#[cfg(test)]
mod tests;

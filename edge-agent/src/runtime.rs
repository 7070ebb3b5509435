//! The `WorkloadRuntime` seam: how the agent runs one replica, whatever executes it.
//!
//! The supervisor ([`crate::supervisor`]) drives a runtime through `prepare` (turn verified
//! module bytes into something runnable; cached) and `run` (execute until exit or cancel).
//! [`crate::wasm::WasmRuntime`] is the real implementation; tests use in-memory fakes.

use crate::logs::LogSink;
use shoal_api::ids::Digest;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Everything needed to start one run of a replica.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Instance name on this device, e.g. `hello-0` (used in logs and spans).
    pub instance: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Hard cap on the guest's linear memories and tables, in bytes.
    pub memory_limit: u64,
    /// CPU share in millicores (1000 = one core); `None`: no cap.
    pub cpu_millis: Option<u32>,
    pub network: Network,
}

/// Addresses a replica may connect to, kept current by the agent while the replica runs.
pub type AllowList = Arc<std::sync::RwLock<std::collections::BTreeSet<std::net::SocketAddr>>>;

/// A replica's network grants. Default: none at all.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// TCP ports it may listen on (its `spec.ports`).
    pub listen: Vec<u16>,
    /// Endpoints of the services it `uses`; `None` when it uses none.
    pub connect: Option<AllowList>,
    /// Host directory shown read-only at `/shoal/services` (endpoint files).
    pub services_dir: Option<PathBuf>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0 (or returned normally from its entry point).
    Success,
    /// Non-zero exit, trap or host error. `reason` is for people: "exited with status 3",
    /// "memory limit exceeded: …", "trap: …".
    Failure { code: Option<i32>, reason: String },
    /// Stopped because the run was cancelled.
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("module {digest} is not a valid wasm module or component: {reason}")]
    InvalidModule { digest: String, reason: String },
    #[error("failed to prepare module {digest}: {reason}")]
    Prepare { digest: String, reason: String },
}

/// A module ready to instantiate (compiled, or whatever the runtime needs).
pub trait Prepared: Send + Sync + std::fmt::Debug {}

/// Runs workloads. Implementations must never block the async executor for long: a guest that
/// spins must yield at its CPU deadlines.
pub trait WorkloadRuntime: Send + Sync + 'static {
    type Module: Prepared + 'static;

    /// Prepares the module whose verified bytes are at `path` (content digest `digest`).
    /// May be slow (compilation); implementations cache per digest.
    fn prepare(
        &self,
        digest: &Digest,
        path: PathBuf,
    ) -> impl Future<Output = Result<Arc<Self::Module>, RuntimeError>> + Send;

    /// Runs the module to completion, writing its stdout/stderr to `log`, or until `cancel`
    /// fires (then returns [`Exit::Cancelled`] promptly).
    fn run(
        &self,
        module: Arc<Self::Module>,
        spec: RunSpec,
        log: LogSink,
        cancel: CancellationToken,
    ) -> impl Future<Output = Exit> + Send;
}

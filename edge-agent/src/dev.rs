//! `shoal-agent run MODULE [-- ARGS]`: runs one WASM module here, once, without a hub, in
//! the sandbox and under the limits a workload gets (the same [`WasmRuntime`] and
//! [`WasmRun`]): no preopened directories, no network, arguments and environment only as
//! given, memory capped, CPU share and run limits as asked. For developing a module; its
//! output goes to the terminal (and to `DATA_DIR/logs/{name}-dev.log`), Ctrl-C stops it.

use crate::logs::LogSink;
use crate::runtime::wasm::{WasmInitError, WasmRun, WasmRuntime};
use crate::runtime::Exit;
use shoal_api::model::ids::Digest;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// What to run, and how.
#[derive(Debug, Clone)]
pub struct DevRun {
    pub module: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bytes of linear memory the module may use.
    pub memory_limit: u64,
    /// CPU share in millicores; `None`: no cap.
    pub cpu_millis: Option<u32>,
    pub limits: shoal_api::model::workload::RunLimits,
    /// Compiled-module cache and the run's log.
    pub data_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot read module {path:?}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path:?} is not a valid wasm module or component: {reason}")]
    Invalid {
        path: String,
        reason: shoal_api::model::wasm::InvalidWasm,
    },
    #[error("this agent is runtime-only (built without a compiler): it runs only modules the hub precompiled; use a full agent for `run MODULE`")]
    RuntimeOnly,
    #[error(transparent)]
    Engine(#[from] WasmInitError),
    #[error(transparent)]
    Prepare(#[from] crate::runtime::RuntimeError),
    #[error("cannot open the log in {path:?}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
}

/// Log bytes kept for a development run.
const LOG_BYTES: u64 = 8 << 20;

/// Runs the module until it exits or `shutdown` is cancelled (then [`Exit::Cancelled`]).
pub async fn run_module(dev: DevRun, shutdown: CancellationToken) -> Result<Exit, DevError> {
    let shown = dev.module.display().to_string();
    let bytes = std::fs::read(&dev.module).map_err(|source| DevError::Read {
        path: shown.clone(),
        source,
    })?;
    shoal_api::model::wasm::validate(&bytes).map_err(|reason| DevError::Invalid {
        path: shown.clone(),
        reason,
    })?;
    if !WasmRuntime::compiles() {
        return Err(DevError::RuntimeOnly);
    }
    let digest = Digest::of(&bytes);
    // The engine's epoch ticker outlives every run (see `WasmRuntime::new`).
    let engine_stop = CancellationToken::new();
    let (runtime, ticker) =
        WasmRuntime::new(dev.data_dir.join("cache/compiled"), engine_stop.clone())?;
    let result = async {
        let module = runtime.prepare_module(&digest, dev.module.clone()).await?;
        let name = dev
            .module
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".into());
        let instance = format!("{name}-dev");
        let logs = dev.data_dir.join("logs");
        let log = LogSink::open(&logs, &instance, LOG_BYTES).map_err(|source| DevError::Log {
            path: logs.display().to_string(),
            source,
        })?;
        log.echo_to_stdout();
        let spec = WasmRun {
            instance,
            args: dev.args,
            env: dev.env,
            memory_limit: dev.memory_limit,
            cpu_millis: dev.cpu_millis,
            network: Default::default(),
            mounts: Vec::new(),
            limits: dev.limits,
            devices: Vec::new(),
            usage: Default::default(),
        };
        let exit = runtime.run(module, spec, log.clone(), shutdown).await;
        log.flush_partial();
        Ok(exit)
    }
    .await;
    engine_stop.cancel();
    let _ = ticker.await;
    result
}

#[cfg(all(test, feature = "compiler"))]
mod tests {
    use super::*;

    fn probe() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../modules/dist/probe.wasm")
    }

    fn dev(dir: &std::path::Path, args: &[&str], memory: u64) -> DevRun {
        DevRun {
            module: probe(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            memory_limit: memory,
            cpu_millis: None,
            limits: Default::default(),
            data_dir: dir.to_path_buf(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_module_runs_once_under_its_limits_and_stops_on_cancel() {
        if !probe().exists() {
            panic!(
                "{} missing: run scripts/build-modules.sh",
                probe().display()
            );
        }
        let dir = tempfile::tempdir().unwrap();
        // Exits with its own status.
        let exit = run_module(
            dev(dir.path(), &["crash"], 64 << 20),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(
            matches!(exit, Exit::Failure { code: Some(3), .. }),
            "{exit:?}"
        );
        // A memory hog meets the limit.
        let exit = run_module(
            dev(dir.path(), &["hog", "64"], 8 << 20),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let Exit::Failure { reason, .. } = exit else {
            panic!("{exit:?}")
        };
        assert!(reason.contains("memory limit"), "{reason}");
        // Forever, until cancelled.
        let stop = CancellationToken::new();
        let later = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            later.cancel();
        });
        let exit = run_module(dev(dir.path(), &["heartbeat", "50"], 64 << 20), stop)
            .await
            .unwrap();
        assert!(matches!(exit, Exit::Cancelled), "{exit:?}");
        let log = std::fs::read_to_string(dir.path().join("logs/probe-dev.log")).unwrap();
        assert!(log.contains("beat 1"), "{log}");
        // Bad input names the file.
        let mut bad = dev(dir.path(), &[], 1 << 20);
        bad.module = dir.path().join("nope.wasm");
        let e = run_module(bad, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("nope.wasm"), "{e}");
    }
}

//! WASM replicas behind the one [`Runtime`] seam: `pull` fetches the module by digest
//! (from the hub, or the registry of a pinned `oci://` module; verified, cached), `prepare`
//! compiles it ([`WasmRuntime::prepare_module`], cached), `start` hands back a run that
//! executes when waited on.

use super::{WasmModule, WasmRun, WasmRuntime};
use crate::fetch::ModuleSource;
use crate::logs::LogSink;
use crate::runtime::{
    Artifact, BoxFuture, Exit, RunSpec, Running, Runtime, RuntimeError, VariantSpec, WasmSpec,
};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NAME: &str = "wasm";

/// The WASM runtime with where its modules come from.
pub struct WasmWorkloads<F> {
    runtime: WasmRuntime,
    source: F,
    /// The hub's HTTP API as found over mDNS; used when a spec's artifact base is empty.
    hub_http: watch::Receiver<Option<String>>,
}

impl<F> WasmWorkloads<F> {
    pub fn new(runtime: WasmRuntime, source: F, hub_http: watch::Receiver<Option<String>>) -> Self {
        WasmWorkloads {
            runtime,
            source,
            hub_http,
        }
    }
}

fn wasm_spec(spec: &RunSpec) -> Result<&WasmSpec, RuntimeError> {
    match &spec.variant {
        VariantSpec::Wasm(w) => Ok(w),
        VariantSpec::Container(_) => Err(RuntimeError::Foreign { runtime: NAME }),
    }
}

impl<F: ModuleSource> Runtime for WasmWorkloads<F> {
    fn pull<'a>(&'a self, spec: &'a RunSpec) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        Box::pin(async move {
            let w = wasm_spec(spec)?;
            let base = if w.artifact_base.is_empty() {
                self.hub_http.borrow().clone().unwrap_or_default()
            } else {
                w.artifact_base.clone()
            };
            let path = self.source.fetch(&base, &w.module, w.oci.as_ref()).await?;
            Ok(Artifact::new(path))
        })
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a RunSpec,
        pulled: Artifact,
    ) -> BoxFuture<'a, Result<Artifact, RuntimeError>> {
        Box::pin(async move {
            let w = wasm_spec(spec)?;
            let path = pulled.get::<PathBuf>(NAME)?;
            let module = self
                .runtime
                .prepare_module(&w.module, path.as_ref().clone())
                .await?;
            Ok(Artifact::new(module))
        })
    }

    fn start<'a>(
        &'a self,
        prepared: &'a Artifact,
        spec: &'a RunSpec,
        log: &'a LogSink,
    ) -> BoxFuture<'a, Result<Box<dyn Running>, RuntimeError>> {
        let started = (|| {
            let w = wasm_spec(spec)?;
            let module = prepared.get::<Arc<WasmModule>>(NAME)?;
            let run = WasmRun {
                instance: spec.instance.clone(),
                args: spec.args.clone(),
                env: spec.env.clone(),
                memory_limit: spec.memory_limit,
                cpu_millis: spec.cpu_millis,
                network: w.network.clone(),
                mounts: spec.mounts.clone(),
                limits: w.limits,
                devices: spec.devices.clone(),
                usage: spec.usage.clone(),
            };
            Ok(Box::new(WasmRunning {
                runtime: self.runtime.clone(),
                module: module.as_ref().clone(),
                run,
                log: log.clone(),
            }) as Box<dyn Running>)
        })();
        Box::pin(std::future::ready(started))
    }
}

/// A module run, executed when waited on.
struct WasmRunning {
    runtime: WasmRuntime,
    module: Arc<WasmModule>,
    run: WasmRun,
    log: LogSink,
}

impl Running for WasmRunning {
    fn wait(self: Box<Self>, stop: CancellationToken) -> BoxFuture<'static, Exit> {
        let WasmRunning {
            runtime,
            module,
            run,
            log,
        } = *self;
        Box::pin(runtime.run(module, run, log, stop))
    }
}

//! One run of a prepared module: a store per run holding the WASI context, the limits and the
//! CPU accounting ([`Host`]); the epoch deadline callback that enforces `spec.limits` and
//! the CPU share and otherwise yields to tokio; instantiating and calling the entry point
//! (`_start` or `wasi:cli/run`); and how the run's end becomes an [`Exit`].

use super::cpu::{Meter, Metered, Quota};
use super::host::Host;
use super::limits::{fmt_bytes, LimitExceeded, Limits};
use super::output::OutputBudget;
use super::wasi::{wasi_builder, ComponentState, CoreState, P2Wasi};
use super::WasmRun;
use super::{ModuleKind, RunStats, WasmModule, WasmRuntime};
use crate::logs::LogSink;
use crate::runtime::{Exit, RuntimeError};
use shoal_api::model::ids::Digest;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, InstancePre, Store, UpdateDeadline};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::I32Exit;

impl WasmRuntime {
    /// Runs `module` like [`WasmRuntime::run`] and also reports how long it ran and how
    /// much of that it was busy.
    pub async fn run_measured(
        &self,
        module: Arc<WasmModule>,
        spec: WasmRun,
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
        spec: WasmRun,
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

impl WasmRuntime {
    /// Prepares the module whose verified bytes are at `path` (content digest `digest`):
    /// [`WasmRuntime::prepare_module`].
    pub async fn prepare(
        &self,
        digest: &Digest,
        path: PathBuf,
    ) -> Result<Arc<WasmModule>, RuntimeError> {
        self.prepare_module(digest, path).await
    }

    /// Runs the module to completion, writing its stdout/stderr to `log`, or until `cancel`
    /// fires (then returns [`Exit::Cancelled`] promptly).
    pub fn run(
        &self,
        module: Arc<WasmModule>,
        spec: WasmRun,
        log: LogSink,
        cancel: CancellationToken,
    ) -> impl Future<Output = Exit> + Send {
        let this = self.clone();
        async move { this.run_measured(module, spec, log, cancel).await.0 }
    }
}

pub(super) fn new_store<W: Send + 'static>(engine: &Engine, host: Host<W>) -> Store<Host<W>> {
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
pub(super) fn yield_to_tokio() -> UpdateDeadline {
    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
}

pub(super) fn host<W>(
    wasi: W,
    spec: &WasmRun,
    meter: Arc<Meter>,
    output: Option<Arc<OutputBudget>>,
    log: &LogSink,
) -> Host<W> {
    Host {
        wasi,
        limits: Limits::new(spec.memory_limit, spec.usage.clone()),
        meter,
        quota: spec.cpu_millis.map(|m| Quota::new(m, Instant::now())),
        cpu_time: spec.limits.cpu_time_ms.map(Duration::from_millis),
        output,
        devices: super::devices::Devices::new(&spec.devices, Some(log.clone())),
    }
}

pub(super) async fn run_core(
    engine: Engine,
    pre: InstancePre<CoreState>,
    spec: WasmRun,
    log: LogSink,
    meter: Arc<Meter>,
) -> Exit {
    let budget = OutputBudget::for_spec(&spec);
    let wasi = match wasi_builder(&spec, &log, budget.clone()) {
        Ok(mut b) => b.build_p1(),
        Err(e) => {
            return Exit::Failure {
                code: None,
                reason: e.to_string(),
            }
        }
    };
    let mut store = new_store(&engine, host(wasi, &spec, meter, budget, &log));
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

pub(super) async fn run_component(
    engine: Engine,
    pre: CommandPre<ComponentState>,
    spec: WasmRun,
    log: LogSink,
    meter: Arc<Meter>,
) -> Exit {
    let budget = OutputBudget::for_spec(&spec);
    let ctx = match wasi_builder(&spec, &log, budget.clone()) {
        Ok(mut b) => b.build(),
        Err(e) => {
            return Exit::Failure {
                code: None,
                reason: e.to_string(),
            }
        }
    };
    let wasi = P2Wasi {
        ctx,
        table: ResourceTable::new(),
    };
    let mut store = new_store(&engine, host(wasi, &spec, meter, budget, &log));
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

pub(super) fn exit_from_error(e: &wasmtime::Error) -> Exit {
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

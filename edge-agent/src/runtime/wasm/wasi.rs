//! The sandbox of a run: deny by default. Only the spec's arguments and environment, empty
//! stdin, stdout and stderr into the replica's log, no preopened directories but the spec's
//! volumes and secrets and the read-only services directory, no UDP and no name lookup; TCP
//! only to listen on `spec.ports` and connect to `spec.network.allow` and the current
//! endpoints of `spec.uses` (a denied connect is said once in the replica's log).

use super::host::Host;
use super::output::{GuestOutput, OutputBudget};
use super::WasmRun;
use crate::logs::{LogSink, Stream};
use std::sync::Arc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub(super) type CoreState = Host<WasiP1Ctx>;
pub(super) type ComponentState = Host<P2Wasi>;

pub(super) struct P2Wasi {
    pub(super) ctx: WasiCtx,
    pub(super) table: ResourceTable,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// Why a run's sandbox cannot be built: a directory it was granted cannot be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum SandboxError {
    #[error("cannot open services directory {}: {error}", .path.display())]
    ServicesDir {
        path: std::path::PathBuf,
        error: wasmtime::Error,
    },
    #[error("cannot open {}: {error}", .path.display())]
    Mount {
        path: std::path::PathBuf,
        error: wasmtime::Error,
    },
}

pub(super) fn wasi_builder(
    spec: &WasmRun,
    log: &LogSink,
    budget: Option<Arc<OutputBudget>>,
) -> Result<WasiCtxBuilder, SandboxError> {
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
                crate::runtime::SERVICES_GUEST_DIR,
                wasmtime_wasi::FsPerms::ReadOnly,
            )
            .map_err(|error| SandboxError::ServicesDir {
                path: dir.clone(),
                error,
            })?;
    }
    for m in &spec.mounts {
        let perms = if m.read_only {
            wasmtime_wasi::FsPerms::ReadOnly
        } else {
            wasmtime_wasi::FsPerms::ReadWrite
        };
        builder
            .preopened_dir(&m.host, &m.guest, perms)
            .map_err(|error| SandboxError::Mount {
                path: m.host.clone(),
                error,
            })?;
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

//! Process glue shared by the two daemons (`shoal-hub`, `shoal-agent`): logging set-up, a
//! shutdown token cancelled by SIGINT/SIGTERM, reading the optional TOML config file, and the
//! mDNS adapter ([`mdns`]) both daemons advertise and browse with.

pub mod mdns;

use anyhow::Context;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `SHOAL_LOG` (default `default_filter`).
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A token cancelled on the first SIGINT or SIGTERM. Call inside the tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        stop.cancel();
    });
    token
}

/// Reads the config file at `path` (default value when `None`). Unknown keys are errors when
/// `T` says `deny_unknown_fields`; errors name the file.
pub fn read_config<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> anyhow::Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let name = p.display().to_string();
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read config file {name:?}"))?;
    toml::from_str(&text).with_context(|| format!("config file {name:?} is invalid"))
}

/// This machine's host name (`/proc/sys/kernel/hostname`), or `"localhost"`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

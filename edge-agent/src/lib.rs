//! Shoal edge agent: receives desired state over MQTT and runs WASM workloads in wasmtime.

pub mod app;
pub mod bus;
pub mod config;
pub mod configs;
pub mod core;
pub mod dev;
pub mod enroll;
pub mod fetch;
pub mod hardware;
pub mod host;
pub mod local;
pub mod logs;
pub mod metrics;
pub mod remote_logs;
pub mod replica;
pub mod runtime;
pub mod secrets;
pub mod services;
pub mod status;
pub mod store;
pub mod volumes;

// The runtimes live under `runtime/`; these keep their older paths working.
#[cfg(feature = "containerd")]
pub use runtime::containerd;
pub use runtime::wasm;

/// An HTTP client for probes and downloads (after installing the TLS crypto provider, which
/// reqwest requires in this build; see [`shoal_registry::install_crypto`]).
pub fn http_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, reqwest::Error> {
    shoal_registry::install_crypto();
    builder.build()
}

/// `e` and the errors under it: reqwest's own message ("error sending request") hides why,
/// e.g. a hub certificate that is not valid for `shoal-hub`.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

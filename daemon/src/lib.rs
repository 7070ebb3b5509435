//! Process glue shared by the two daemons (`shoal-hub`, `shoal-agent`): logging set-up
//! (`RUST_LOG` filters, text or JSON lines), a
//! shutdown token cancelled by SIGINT/SIGTERM, the settings both daemons read the same way
//! ([`config`]), the wall clock ([`clock`]), and the mDNS adapter ([`mdns`]) both daemons
//! advertise and browse with.

pub mod clock;
pub mod config;
pub mod mdns;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// How the daemons write their own log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans), for log shippers.
    Json,
}

/// Logging flags shared by the daemons (`global`: accepted before or after the subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The log filter in force: `RUST_LOG`, else `SHOAL_LOG`, else `default_filter`; each in the
/// `tracing_subscriber::EnvFilter` syntax (`info,shoal_hub=debug,rumqttd=warn`). A value
/// that does not parse is an error naming it, not a silent fall back to the default.
pub fn log_filter(
    default_filter: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    for var in ["RUST_LOG", "SHOAL_LOG"] {
        if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
            return tracing_subscriber::EnvFilter::builder()
                .parse(&v)
                .with_context(|| {
                    format!("{var}={v:?} is not a valid log filter (e.g. info,shoal_hub=debug)")
                });
        }
    }
    Ok(tracing_subscriber::EnvFilter::new(default_filter))
}

/// Logs to stderr in `args.log_format`, filtered as [`log_filter`] says.
pub fn init_tracing(default_filter: &str, args: &LogArgs) -> anyhow::Result<()> {
    let filter = log_filter(default_filter, |k| std::env::var(k).ok())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let set = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    set.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
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

/// This machine's host name (`/proc/sys/kernel/hostname`), or `"localhost"`.
/// Creates `dir` (and its parents) if need be and makes it the owner's alone (0700): a
/// daemon's data directory holds desired states with environment values, keys and logs.
/// Workloads that run as other users reach what they need through bind mounts, which do not
/// look at the directories above the mounted one.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Raises this process's open-file limit to its hard limit (a busy hub holds a descriptor
/// per connection, and Debian's default soft limit is 1024) and returns the soft limit now
/// in force; `None` if it cannot be read.
pub fn raise_open_files() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    // An unlimited hard limit is taken as a large finite one (the kernel caps it anyway).
    let hard = now.maximum.unwrap_or(1 << 20);
    let wanted = Rlimit {
        current: Some(hard),
        maximum: now.maximum,
    };
    if now.current.is_some_and(|c| c < hard) && setrlimit(Resource::Nofile, wanted).is_ok() {
        return Some(hard);
    }
    now.current.or(Some(hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filter_precedence_and_bad_values() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let f = log_filter("info", env(&[])).unwrap();
        assert_eq!(f.to_string(), "info");
        let f = log_filter("info", env(&[("SHOAL_LOG", "warn")])).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = log_filter(
            "info",
            env(&[("SHOAL_LOG", "warn"), ("RUST_LOG", "shoal_hub=debug")]),
        )
        .unwrap();
        assert_eq!(f.to_string(), "shoal_hub=debug");
        let e = log_filter("info", env(&[("RUST_LOG", "shoal_hub=loud")])).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("RUST_LOG=\"shoal_hub=loud\""), "{e}");
    }
}

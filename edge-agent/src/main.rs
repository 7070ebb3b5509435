//! `shoal-agent`: the edge agent binary.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use shoal_agent::config::Settings;
use shoal_agent::local::{self, AgentStatusView, InspectView, PeersView, ReplicaView, RestartView};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "shoal-agent",
    version,
    about = "Shoal edge agent: runs the WASM workloads the hub assigns to this device"
)]
struct Cli {
    #[command(flatten)]
    log: shoal_daemon::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent; or, given MODULE, run that WASM module here once, without a hub.
    #[command(after_help = "Examples:
  shoal-agent run --config /etc/shoal/agent.toml          the agent (a device of the fleet)
  shoal-agent run ./ticker.wasm -- greenhouse             a module, for development
  shoal-agent run ./m.wasm --limit-memory 16Mi --limit-cpu 250m --env LEVEL=debug")]
    Run(Box<RunArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(
        after_help = "Example:\n  shoal-agent completion bash > /etc/bash_completion.d/shoal-agent"
    )]
    Completion { shell: clap_complete::Shell },
    /// List the replicas on this device: workload, variant, phase, restarts, uptime, memory.
    ///
    /// Asks the running agent over its local socket; works while the hub is unreachable.
    #[command(
        after_help = "Examples:\n  shoal-agent ps\n  shoal-agent ps -o json | jq '.[].phase'"
    )]
    Ps(LocalArgs),
    /// The agent's state: hub connection, desired-state generation, last sync, disk, memory.
    Status(LocalArgs),
    /// One workload on this device: what the hub asked for and what runs.
    #[command(after_help = "Example:\n  shoal-agent inspect web -o json")]
    Inspect {
        /// The workload's name.
        workload: String,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Print the logs of a workload's replicas on this device (kept in DATA_DIR/logs).
    #[command(
        after_help = "Examples:\n  shoal-agent logs web --tail 50\n  shoal-agent logs web --since 10m -f"
    )]
    Logs {
        /// The workload's name.
        workload: String,
        /// Keep printing lines as they are written, until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each replica.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines written this recently (e.g. 30s, 10m, 2h).
        #[arg(long, value_parser = shoal_api::model::quantity::duration_arg, value_name = "DURATION")]
        since: Option<Duration>,
        /// The running agent's local API socket.
        #[arg(long, env = "SHOAL_AGENT_SOCKET", default_value = local::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Restart a workload's replicas on this device now (counted as restarts).
    Restart {
        /// The workload's name.
        workload: String,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// List the hubs and devices this device's agent sees on the LAN (over mDNS).
    Peers(LocalArgs),
}

/// Flags of the commands that ask the running agent.
#[derive(clap::Args)]
struct LocalArgs {
    /// The running agent's local API socket.
    #[arg(long, env = "SHOAL_AGENT_SOCKET", default_value = local::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl LocalArgs {
    /// Prints what the agent answers to `GET uri`, as JSON or as `table` says.
    async fn show<T: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        uri: &str,
        table: impl FnOnce(&T, u64) -> String,
    ) -> anyhow::Result<()> {
        let v: T = local::get_json(&self.socket, uri).await?;
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
            Output::Table => print!("{}", table(&v, shoal_daemon::clock::now_ms())),
        }
        Ok(())
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Settings come from built-in defaults, then `--config FILE` (TOML, see
/// examples/agent.toml), then environment variables, then flags: each later source wins.
#[derive(clap::Args)]
struct RunArgs {
    /// Run this WASM module (a .wasm file) here, once, without a hub, in a workload's
    /// sandbox and limits, for development: arguments after `--` go to it, its output to
    /// the terminal; Ctrl-C stops it. The exit status is the module's.
    #[arg(value_name = "MODULE")]
    module: Option<PathBuf>,
    #[arg(last = true, value_name = "ARGS", requires = "module")]
    module_args: Vec<String>,
    /// With MODULE: its memory limit [default: 64Mi, a workload's default].
    #[arg(long, value_parser = shoal_api::model::quantity::parse_memory, requires = "module")]
    limit_memory: Option<u64>,
    /// With MODULE: its CPU share, e.g. 250m [default: none].
    #[arg(long, value_parser = shoal_api::model::quantity::parse_cpu, requires = "module")]
    limit_cpu: Option<u32>,
    /// With MODULE: stop it once it used this much CPU time (spec.limits.cpuTime), e.g. 30s.
    #[arg(long, value_parser = shoal_api::model::quantity::duration_arg, requires = "module")]
    limit_cpu_time: Option<Duration>,
    /// With MODULE: an environment variable for it, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env, requires = "module")]
    module_env: Vec<(String, String)>,
    #[command(flatten)]
    settings: Settings,
}

/// A `--env` that is not `KEY=VALUE`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not KEY=VALUE")]
struct NotKeyValue(String);

fn parse_env(s: &str) -> Result<(String, String), NotKeyValue> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(NotKeyValue(s.to_string())),
    }
}

/// `shoal-agent run MODULE`: the module's exit status (128 + SIGINT's number when stopped).
async fn dev_run(a: RunArgs) -> anyhow::Result<i32> {
    let Some(module) = a.module else {
        anyhow::bail!("no module given");
    };
    let data_dir = match a.settings.data_dir {
        Some(d) => d,
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("shoal-agent-dev"),
    };
    let dev = shoal_agent::dev::DevRun {
        module,
        args: a.module_args,
        env: a.module_env.into_iter().collect(),
        memory_limit: a.limit_memory.unwrap_or(64 << 20),
        cpu_millis: a.limit_cpu,
        limits: shoal_api::model::workload::RunLimits {
            cpu_time_ms: a
                .limit_cpu_time
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            ..Default::default()
        },
        data_dir,
    };
    let shutdown = shoal_daemon::shutdown_on_signal();
    match shoal_agent::dev::run_module(dev, shutdown).await? {
        shoal_agent::runtime::Exit::Success => Ok(0),
        shoal_agent::runtime::Exit::Failure { code, reason } => {
            eprintln!("shoal-agent: the module failed: {reason}");
            Ok(code.filter(|c| *c > 0).unwrap_or(1))
        }
        shoal_agent::runtime::Exit::Cancelled => Ok(130),
    }
}

fn main() {
    match real_main() {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The exit status: 0, or a module's (`run MODULE`).
fn real_main() -> anyhow::Result<i32> {
    // Parsed by hand, not `Cli::parse()`: the settings' merge asks where each value came
    // from (flag, environment or default), to put the config file in between.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Running one module, the terminal is for its output: only warnings from the agent.
    let quiet = matches!(&cli.command, Command::Run(a) if a.module.is_some());
    shoal_daemon::init_tracing(
        if quiet {
            "warn"
        } else {
            "info,wasmtime=warn,cranelift=warn"
        },
        &cli.log,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let done = match cli.command {
        Command::Run(a) if a.module.is_some() => return rt.block_on(dev_run(*a)),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "shoal-agent", &mut std::io::stdout());
            Ok(())
        }
        Command::Run(_) => rt.block_on(async {
            let shutdown = shoal_daemon::shutdown_on_signal();
            let run = matches
                .subcommand_matches("run")
                .context("no settings for run")?;
            let config = shoal_agent::config::resolve(run)?;
            shoal_agent::app::run(config, shutdown)
                .await
                .context("agent failed")
        }),
        Command::Peers(a) => rt.block_on(a.show::<PeersView>("/v1/peers", peers_table)),
        Command::Ps(a) => rt.block_on(a.show::<Vec<ReplicaView>>("/v1/workloads", ps_table)),
        Command::Status(a) => rt.block_on(a.show::<AgentStatusView>("/v1/status", status_text)),
        Command::Inspect { workload, local } => rt.block_on(local.show::<InspectView>(
            &format!("/v1/workloads/{}", path_segment(&workload)?),
            inspect_text,
        )),
        Command::Restart { workload, local } => rt.block_on(async {
            let uri = format!("/v1/workloads/{}/restart", path_segment(&workload)?);
            let v: RestartView = local::call_json(&local.socket, hyper::Method::POST, &uri).await?;
            match local.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => {
                    for i in &v.restarted {
                        println!("{i} restarted");
                    }
                }
            }
            Ok(())
        }),
        Command::Logs {
            workload,
            follow,
            tail,
            since,
            socket,
        } => rt.block_on(async {
            let mut uri = format!(
                "/v1/workloads/{}/logs?follow={follow}",
                path_segment(&workload)?
            );
            if let Some(n) = tail {
                uri.push_str(&format!("&tail={n}"));
            }
            if let Some(d) = since {
                uri.push_str(&format!("&since={}", d.as_secs().max(1)));
            }
            let shutdown = shoal_daemon::shutdown_on_signal();
            let mut out = std::io::stdout();
            tokio::select! {
                r = local::stream_to(&socket, &uri, &mut out) => r?,
                () = shutdown.cancelled() => {}
            }
            Ok(())
        }),
    };
    done.map(|()| 0)
}

/// A workload name checked before it goes into a URL path.
fn path_segment(name: &str) -> anyhow::Result<&str> {
    shoal_api::model::ids::WorkloadName::try_from(name)?;
    Ok(name)
}

/// `shoal-agent ps` as a table.
fn ps_table(v: &Vec<ReplicaView>, now_ms: u64) -> String {
    use shoal_api::model::quantity::{format_age, format_memory_rounded};
    use shoal_api::present::table::Table;
    if v.is_empty() {
        return "no replicas on this device\n".into();
    }
    let mut t = Table::new(&[
        "INSTANCE", "WORKLOAD", "VARIANT", "PHASE", "RESTARTS", "UPTIME", "MEMORY", "CPU", "REASON",
    ]);
    for r in v {
        let uptime = match (r.phase.as_str(), r.started_at_ms) {
            ("Running", Some(t)) => format_age(now_ms.saturating_sub(t)),
            _ => "-".into(),
        };
        let memory = match r.memory_bytes {
            Some(m) => format!(
                "{}/{}",
                format_memory_rounded(m),
                format_memory_rounded(r.memory_limit)
            ),
            None => format!("-/{}", format_memory_rounded(r.memory_limit)),
        };
        let cpu = r
            .cpu_nanos
            .map_or("-".into(), |n| format!("{:.2}s", n as f64 / 1e9));
        let mut phase = r.phase.clone();
        if r.healthy == Some(false) {
            phase.push_str(" (unhealthy)");
        }
        t.row(vec![
            r.instance.clone(),
            r.workload.clone(),
            r.variant.clone(),
            phase,
            r.restarts.to_string(),
            uptime,
            memory,
            cpu,
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    t.to_string()
}

/// `shoal-agent status` as text.
fn status_text(v: &AgentStatusView, now_ms: u64) -> String {
    use shoal_api::model::quantity::{format_age, format_memory_rounded};
    let ago = |t: u64| format!("{} ago", format_age(now_ms.saturating_sub(t)));
    let hub = match (&v.hub.broker, v.hub.connected) {
        (None, _) => "not found yet (looking over mDNS)".to_string(),
        (Some(b), true) => format!(
            "connected to {b}{}",
            v.hub
                .since_ms
                .map(|t| format!(" since {}", ago(t)))
                .unwrap_or_default()
        ),
        (Some(b), false) => format!(
            "DISCONNECTED from {b}{}{}",
            v.hub
                .since_ms
                .map(|t| format!(" since {}", ago(t)))
                .unwrap_or_default(),
            v.hub
                .last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    };
    let m = &v.memory;
    let disk = v.disk.as_ref().map_or("unknown".into(), |d| {
        format!(
            "{} free of {} ({})",
            format_memory_rounded(d.available_bytes),
            format_memory_rounded(d.total_bytes),
            d.path
        )
    });
    format!(
        "device:      {}\nfleet:       {}\nagent:       {} (up {}), runtimes {}\nhub:         {hub}\ngeneration:  {}\nlast sync:   {}\nreplicas:    {} ({} running)\nmemory:      {} of {} offered allocated; machine {} free of {}; agent RSS {}\ndisk:        {disk}\n",
        v.device,
        v.fleet,
        v.agent_version,
        format_age(now_ms.saturating_sub(v.started_at_ms)),
        v.runtimes.join(","),
        v.generation,
        v.last_sync_ms.map_or("never (since the agent started)".into(), ago),
        v.replicas,
        v.running,
        format_memory_rounded(m.allocated_bytes),
        format_memory_rounded(m.offered_bytes),
        format_memory_rounded(m.machine_available_bytes),
        format_memory_rounded(m.machine_total_bytes),
        format_memory_rounded(m.agent_rss_bytes),
    )
}

/// `shoal-agent inspect` as text: the desired replicas, what runs, where the logs are.
fn inspect_text(v: &InspectView, now_ms: u64) -> String {
    let mut out = format!("workload {}\n\ndesired here:\n", v.workload);
    if v.desired.is_empty() {
        out.push_str("  (none: the workload left this device)\n");
    }
    for d in &v.desired {
        let what = match (&d.module, &d.container) {
            (Some(m), _) => format!("module {m}"),
            (None, Some(c)) => format!("image {}", c.image),
            (None, None) => "nothing".into(),
        };
        out.push_str(&format!(
            "  {} revision {} {what} memory {}{}\n",
            d.instance(),
            d.revision,
            shoal_api::model::quantity::format_memory_rounded(d.resources.memory),
            d.resources
                .cpu
                .map(|c| format!(" cpu {c}m"))
                .unwrap_or_default(),
        ));
    }
    out.push_str("\nobserved:\n");
    if v.observed.is_empty() {
        out.push_str("  (no replica runs here)\n");
    } else {
        for line in ps_table(&v.observed, now_ms).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    if !v.logs.is_empty() {
        out.push_str("\nlogs:\n");
        for l in &v.logs {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out
}

/// `shoal-agent peers` as text: the hubs, then the devices, with how long ago each was
/// first seen.
fn peers_table(v: &PeersView, now_ms: u64) -> String {
    use shoal_api::present::table::Table;
    let age = |since: u64| shoal_api::model::quantity::format_age(now_ms.saturating_sub(since));
    if !v.mdns {
        return "mDNS is off on this agent (--no-mdns): no peers are discovered\n".into();
    }
    let mut hubs = Table::new(&["HUB", "FLEET", "ADDRESSES", "AGE", "STATE"]);
    for h in &v.hubs {
        let name = h
            .instance
            .strip_suffix(shoal_api::wire::discovery::HUB_SERVICE)
            .unwrap_or(&h.instance)
            .trim_end_matches('.');
        hubs.row(vec![
            name.to_string(),
            h.fleet.clone(),
            h.addresses.join(","),
            age(h.first_seen_ms),
            h.state.clone(),
        ]);
    }
    let mut devices = Table::new(&["DEVICE", "ARCH", "RUNTIMES", "ADDRESSES", "AGE", "LABELS"]);
    for d in &v.devices {
        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        devices.row(vec![
            d.device.clone(),
            d.arch.clone(),
            d.runtimes.join(","),
            d.addresses.join(","),
            age(d.first_seen_ms),
            labels.join(","),
        ]);
    }
    format!("fleet {:?}\n\n{hubs}\n{devices}", v.fleet)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}

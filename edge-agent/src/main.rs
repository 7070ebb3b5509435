//! `shoal-agent`: the edge agent binary.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use shoal_agent::config::{AgentConfig, LocalSocket};
use shoal_agent::local::{self, AgentStatusView, InspectView, PeersView, ReplicaView, RestartView};
use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::DeviceId;
use shoal_daemon::mdns::{MdnsArgs, MdnsFile};
use std::collections::BTreeMap;
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
        #[arg(long, value_parser = shoal_api::quantity::duration_arg, value_name = "DURATION")]
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
            Output::Table => print!("{}", table(&v, shoal_api::messages::now_ms())),
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
    #[arg(long, value_parser = parse_memory, requires = "module")]
    limit_memory: Option<u64>,
    /// With MODULE: its CPU share, e.g. 250m [default: none].
    #[arg(long, value_parser = parse_cpu, requires = "module")]
    limit_cpu: Option<u32>,
    /// With MODULE: stop it once it used this much CPU time (spec.limits.cpuTime), e.g. 30s.
    #[arg(long, value_parser = shoal_api::quantity::duration_arg, requires = "module")]
    limit_cpu_time: Option<Duration>,
    /// With MODULE: an environment variable for it, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env, requires = "module")]
    module_env: Vec<(String, String)>,
    /// TOML config file (keys as in examples/agent.toml).
    #[arg(long, env = "SHOAL_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the agent database, module cache and workload logs.
    #[arg(long, env = "SHOAL_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This device's id (lowercase letters, digits and '-').
    #[arg(long, env = "SHOAL_AGENT_DEVICE_ID")]
    device_id: Option<DeviceId>,
    /// Labels this device asks for, k=v,k2=v2: shown to operators, but placement selects
    /// only on the labels they grant (join token `--labels`, `shoal label device`).
    #[arg(long, env = "SHOAL_AGENT_LABELS", value_parser = parse_labels)]
    labels: Option<BTreeMap<String, String>>,
    /// MQTT broker, mqtt://HOST:PORT [default: find the fleet's hub over mDNS].
    #[arg(long, env = "SHOAL_BROKER")]
    broker: Option<BrokerUrl>,
    /// The fleet this device joins; hubs of other fleets are ignored [default: default].
    #[arg(long, env = "SHOAL_FLEET")]
    fleet: Option<String>,
    /// Unix socket of the local API (`shoal-agent ps`, …) [default: /run/shoal/agent.sock].
    #[arg(long, env = "SHOAL_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// Serve Prometheus `/metrics` over plain HTTP at this address (e.g. 127.0.0.1:9465)
    /// [default: only on the local socket].
    #[arg(long, env = "SHOAL_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    mdns: MdnsArgs,
    /// Memory offered to workloads (e.g. 512Mi) [default: all of the machine's memory].
    #[arg(long, env = "SHOAL_AGENT_MEMORY", value_parser = parse_memory)]
    memory: Option<u64>,
    /// Most replicas this device takes [default: no limit].
    #[arg(long, env = "SHOAL_AGENT_MAX_REPLICAS")]
    max_replicas: Option<u32>,
    /// A registry (`HOST:PORT`) that may be reached over plain HTTP; loopback ones always
    /// may. Repeat for several; adds to `[registries]` in the config file.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// containerd's socket; the device offers the `container` runtime only if it answers
    /// [default: /run/containerd/containerd.sock].
    #[arg(long, env = "SHOAL_AGENT_CONTAINERD_SOCKET")]
    containerd_socket: Option<PathBuf>,
    /// containerd namespace for this agent's containers [default: shoal].
    #[arg(long, env = "SHOAL_AGENT_CONTAINERD_NAMESPACE")]
    containerd_namespace: Option<String>,
    /// Do not look for containerd: run WASM workloads only.
    #[arg(long, env = "SHOAL_AGENT_NO_CONTAINERD")]
    no_containerd: bool,
    /// Do not offer the WASM runtime (workloads with a container variant run that here).
    #[arg(long, env = "SHOAL_AGENT_NO_WASM")]
    no_wasm: bool,
    /// How long a workload's volumes are kept after it left this device, in case it comes
    /// back (e.g. 0s, 30m, 24h) [default: 24h].
    #[arg(long, env = "SHOAL_AGENT_VOLUME_RETENTION", value_parser = shoal_api::quantity::duration_arg)]
    volume_retention: Option<Duration>,
    /// A one-time join token from `shoal-hub token create`, to enroll this device (only
    /// needed until it holds a certificate, in DATA_DIR/pki). Prefer the environment
    /// variable or --join-token-file: a command line is visible to every local user.
    #[arg(long, env = "SHOAL_AGENT_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token (e.g. written by provisioning, then removed).
    #[arg(
        long,
        env = "SHOAL_AGENT_JOIN_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "join_token"
    )]
    join_token_file: Option<PathBuf>,
    /// The hub's HTTP API, https://HOST:PORT (for enrollment and module downloads)
    /// [default: found over mDNS].
    #[arg(long, env = "SHOAL_HUB")]
    hub: Option<String>,
    /// Plain MQTT and HTTP, no device certificate, desired state not verified: only with a
    /// hub run --insecure, for local development.
    #[arg(long, env = "SHOAL_AGENT_INSECURE")]
    insecure: bool,
}

fn parse_cpu(s: &str) -> Result<u32, String> {
    shoal_api::quantity::parse_cpu(s).map_err(|e| e.to_string())
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `shoal-agent run MODULE`: the module's exit status (128 + SIGINT's number when stopped).
async fn dev_run(a: RunArgs) -> anyhow::Result<i32> {
    let Some(module) = a.module else {
        anyhow::bail!("no module given");
    };
    let data_dir = match a.data_dir {
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
        limits: shoal_api::workload::RunLimits {
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

/// `--volume-retention` when not given: a device offline overnight keeps its data.
const DEFAULT_VOLUME_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The `[containerd]` table of the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ContainerdFile {
    enabled: Option<bool>,
    socket: Option<PathBuf>,
    namespace: Option<String>,
}

/// One `[registries."HOST:PORT"]` table of the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RegistryFile {
    /// Plain HTTP allowed (loopback registries always are).
    #[serde(default)]
    insecure: bool,
    username: Option<String>,
    password: Option<String>,
}

/// The config file. Unknown keys are errors (a typo must not be silently ignored).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    data_dir: Option<PathBuf>,
    device_id: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    broker: Option<String>,
    memory: Option<String>,
    max_replicas: Option<u32>,
    fleet: Option<String>,
    socket: Option<PathBuf>,
    metrics_listen: Option<String>,
    #[serde(default)]
    mdns: MdnsFile,
    #[serde(default)]
    registries: BTreeMap<String, RegistryFile>,
    #[serde(default)]
    containerd: ContainerdFile,
    volume_retention: Option<String>,
    hub: Option<String>,
    #[serde(default)]
    insecure: bool,
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    shoal_api::ids::parse_label_list(s).map_err(|e| e.to_string())
}

fn parse_memory(s: &str) -> Result<u64, String> {
    shoal_api::quantity::parse_memory(s).map_err(|e| e.to_string())
}

fn agent_config(a: RunArgs) -> anyhow::Result<AgentConfig> {
    let file: FileConfig = shoal_daemon::read_config(a.config.as_deref())?;
    let name = a
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let bad = |key: &str, e: String| anyhow::anyhow!("config file {name:?}: {key}: {e}");
    let device_id = match (a.device_id, file.device_id) {
        (Some(d), _) => d,
        (None, Some(d)) => d
            .parse()
            .map_err(|e: shoal_api::ids::IdError| bad("device-id", e.to_string()))?,
        (None, None) => bail!(
            "no device id: give --device-id, SHOAL_AGENT_DEVICE_ID or device-id in a config file"
        ),
    };
    let labels = match (a.labels, file.labels) {
        (Some(l), _) => l,
        (None, Some(l)) => {
            for (k, v) in &l {
                shoal_api::ids::check_label_key(k).map_err(|e| bad("labels", e.to_string()))?;
                shoal_api::ids::check_label_value(v).map_err(|e| bad("labels", e.to_string()))?;
            }
            l
        }
        (None, None) => BTreeMap::new(),
    };
    let broker = match (a.broker, file.broker) {
        (Some(b), _) => Some(b),
        (None, Some(b)) => Some(
            b.parse()
                .map_err(|e: shoal_api::endpoint::EndpointError| bad("broker", e.to_string()))?,
        ),
        (None, None) => None,
    };
    let insecure = a.insecure || file.insecure;
    if let Some(b) = broker.as_ref().filter(|b| !b.tls && !insecure) {
        bail!("broker {b} is plain MQTT: use mqtts://{}:{} (the hub's TLS port), or --insecure with a hub run --insecure", b.host, b.port);
    }
    let hub_url = a.hub.or(file.hub);
    if let Some(h) = &hub_url {
        let plain = h.starts_with("http://");
        if !(h.starts_with("https://") || plain) || (plain && !insecure) {
            bail!("hub URL {h:?} is invalid: expected https://HOST:PORT");
        }
    }
    let fleet = shoal_api::discovery::fleet_or_default(a.fleet.or(file.fleet))
        .map_err(anyhow::Error::msg)?;
    let mdns = a.mdns.options(&file.mdns);
    if broker.is_none() && mdns.is_none() {
        bail!("no broker and mDNS is off: give --broker (or SHOAL_BROKER, or broker in a config file), or drop --no-mdns to find the hub");
    }
    let memory = match (a.memory, file.memory) {
        (Some(m), _) => Some(m),
        (None, Some(m)) => Some(parse_memory(&m).map_err(|e| bad("memory", e))?),
        (None, None) => None,
    };
    let data_dir = a.data_dir.or(file.data_dir).context(
        "no data directory: give --data-dir, SHOAL_AGENT_DATA_DIR or data-dir in a config file",
    )?;
    let mut registries = shoal_registry::RegistryConfig {
        insecure: a.insecure_registries,
        ..Default::default()
    };
    for (host, r) in file.registries {
        if r.insecure {
            registries.insecure.push(host.clone());
        }
        match (r.username, r.password) {
            (Some(username), Some(password)) => {
                registries
                    .credentials
                    .insert(host, shoal_registry::Credentials { username, password });
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    &format!("registries.{host:?}"),
                    "give both username and password, or neither".into(),
                ))
            }
        }
    }
    let containerd_on = !a.no_containerd && file.containerd.enabled.unwrap_or(true);
    let containerd = containerd_on.then(|| shoal_agent::config::ContainerdOptions {
        socket: a
            .containerd_socket
            .or(file.containerd.socket)
            .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock")),
        namespace: a
            .containerd_namespace
            .or(file.containerd.namespace)
            .unwrap_or_else(|| "shoal".to_string()),
    });
    let volume_retention = match (a.volume_retention, file.volume_retention) {
        (Some(d), _) => d,
        (None, Some(d)) => {
            shoal_api::quantity::duration_arg(&d).map_err(|e| bad("volume-retention", e))?
        }
        (None, None) => DEFAULT_VOLUME_RETENTION,
    };
    let metrics_listen =
        match (a.metrics_listen, file.metrics_listen) {
            (Some(m), _) => Some(m),
            (None, Some(m)) => Some(m.parse().map_err(|e: std::net::AddrParseError| {
                bad("metrics-listen", format!("{m:?}: {e}"))
            })?),
            (None, None) => None,
        };
    Ok(AgentConfig {
        metrics_listen,
        insecure,
        // Parsed here, not by clap, whose error would echo the secret.
        join_token: match (a.join_token, a.join_token_file) {
            (Some(t), _) => Some(t.parse::<shoal_pki::token::JoinToken>()?),
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read the join token file {}", f.display()))?
                    .parse::<shoal_pki::token::JoinToken>()?,
            ),
            (None, None) => None,
        },
        hub_url,
        registries,
        containerd,
        wasm: !a.no_wasm,
        volume_retention,
        data_dir,
        device_id,
        labels,
        broker,
        memory,
        max_replicas: a.max_replicas.or(file.max_replicas),
        fleet,
        mdns,
        socket: Some(match a.socket.or(file.socket) {
            Some(path) => LocalSocket {
                path,
                explicit: true,
            },
            None => LocalSocket {
                path: PathBuf::from(local::DEFAULT_SOCKET),
                explicit: false,
            },
        }),
    })
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
    let cli = Cli::parse();
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
        Command::Run(a) => rt.block_on(async {
            let shutdown = shoal_daemon::shutdown_on_signal();
            let config = agent_config(*a)?;
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
    shoal_api::ids::WorkloadName::try_from(name)?;
    Ok(name)
}

/// `shoal-agent ps` as a table.
fn ps_table(v: &Vec<ReplicaView>, now_ms: u64) -> String {
    use shoal_api::quantity::{format_age, format_memory_rounded};
    use shoal_api::table::Table;
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
    use shoal_api::quantity::{format_age, format_memory_rounded};
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
            shoal_api::quantity::format_memory_rounded(d.resources.memory),
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
    use shoal_api::table::Table;
    let age = |since: u64| shoal_api::quantity::format_age(now_ms.saturating_sub(since));
    if !v.mdns {
        return "mDNS is off on this agent (--no-mdns): no peers are discovered\n".into();
    }
    let mut hubs = Table::new(&["HUB", "FLEET", "ADDRESSES", "AGE", "STATE"]);
    for h in &v.hubs {
        let name = h
            .instance
            .strip_suffix(shoal_api::discovery::HUB_SERVICE)
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
    use super::*;

    fn args(config: Option<PathBuf>) -> RunArgs {
        RunArgs {
            module: None,
            module_args: Vec::new(),
            limit_memory: None,
            limit_cpu: None,
            limit_cpu_time: None,
            module_env: Vec::new(),
            config,
            data_dir: None,
            device_id: None,
            labels: None,
            broker: None,
            memory: None,
            max_replicas: None,
            fleet: None,
            socket: None,
            metrics_listen: None,
            mdns: MdnsArgs::default(),
            insecure_registries: Vec::new(),
            containerd_socket: None,
            containerd_namespace: None,
            no_containerd: false,
            no_wasm: false,
            volume_retention: None,
            join_token: None,
            join_token_file: None,
            hub: None,
            insecure: false,
        }
    }

    #[test]
    fn example_config_parses() {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let c = agent_config(args(Some(example))).unwrap();
        assert_eq!((c.fleet.as_str(), c.broker), ("greenhouse", None));
        assert_eq!(c.mdns, Some(shoal_daemon::mdns::MdnsOptions::default()));
        assert_eq!(c.registries.insecure, ["lab-registry.lan:5000"]);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9465".parse().unwrap()));
        assert_eq!(
            c.registries.credentials["registry.example.com"].username,
            "greenhouse"
        );
        let mut a = args(None);
        a.device_id = Some("d".parse().unwrap());
        a.data_dir = Some("/d".into());
        a.mdns.no_mdns = true;
        let e = agent_config(a).unwrap_err().to_string();
        assert!(e.contains("no broker and mDNS is off"), "{e}");
    }

    #[test]
    fn registry_tables_need_both_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"d\"\n[registries.\"r.lan:5000\"]\nusername = \"u\"\n",
        )
        .unwrap();
        let e = agent_config(args(Some(file))).unwrap_err().to_string();
        assert!(e.contains("registries.\"r.lan:5000\""), "{e}");
        assert!(e.contains("both username and password"), "{e}");
    }

    #[test]
    fn precedence_defaults_file_then_env_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"from-file\"\nlabels = { zone = \"a\" }\nmemory = \"64Mi\"\n",
        )
        .unwrap();
        let c = agent_config(args(Some(file.clone()))).unwrap();
        assert_eq!(c.device_id.as_str(), "from-file");
        assert_eq!(c.memory, Some(64 << 20));
        assert_eq!(c.broker, None, "default: discover over mDNS");
        assert_eq!(c.fleet, "default");
        assert_eq!(
            c.socket,
            Some(LocalSocket {
                path: "/run/shoal/agent.sock".into(),
                explicit: false
            })
        );
        assert!(c.mdns.is_some());
        let mut a = args(Some(file.clone()));
        a.device_id = Some("from-flag".parse().unwrap());
        a.memory = Some(1);
        let c = agent_config(a).unwrap();
        assert_eq!(c.device_id.as_str(), "from-flag");
        assert_eq!(c.memory, Some(1));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));

        std::fs::write(&file, "device-id = \"Bad_Id\"\ndata-dir = \"/d\"\n").unwrap();
        let e = format!("{:#}", agent_config(args(Some(file))).unwrap_err());
        assert!(e.contains("device-id") && e.contains("\"Bad_Id\""), "{e}");
        let e = format!("{:#}", agent_config(args(None)).unwrap_err());
        assert!(e.contains("no device id"), "{e}");
    }
}

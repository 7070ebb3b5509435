//! `shoal-agent`: the edge agent binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_api::endpoint::BrokerUrl;
use shoal_api::ids::DeviceId;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "shoal-agent",
    version,
    about = "Shoal edge agent: runs the WASM workloads the hub assigns to this device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory for the agent database, module cache and workload logs.
    #[arg(long, env = "SHOAL_AGENT_DATA_DIR")]
    data_dir: PathBuf,
    /// This device's id (lowercase letters, digits and '-').
    #[arg(long, env = "SHOAL_AGENT_DEVICE_ID")]
    device_id: DeviceId,
    /// Device labels, k=v,k2=v2.
    #[arg(long, env = "SHOAL_AGENT_LABELS", default_value = "", value_parser = parse_labels)]
    labels: std::collections::BTreeMap<String, String>,
    /// MQTT broker, mqtt://HOST:PORT.
    #[arg(long, env = "SHOAL_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: BrokerUrl,
    /// Memory offered to workloads (e.g. 512Mi); default: all of the machine's memory.
    #[arg(long, env = "SHOAL_AGENT_MEMORY", value_parser = parse_memory)]
    memory: Option<u64>,
}

fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    shoal_api::ids::parse_label_list(s).map_err(|e| e.to_string())
}

fn parse_memory(s: &str) -> Result<u64, String> {
    shoal_api::quantity::parse_memory(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run(a) => rt.block_on(async {
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                stop.cancel();
            });
            let config = shoal_agent::agent::AgentConfig {
                data_dir: a.data_dir,
                device_id: a.device_id,
                labels: a.labels,
                broker: a.broker,
                memory: a.memory,
            };
            shoal_agent::agent::run(config, shutdown)
                .await
                .context("agent failed")
        }),
    }
}

async fn wait_for_signal() {
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
}

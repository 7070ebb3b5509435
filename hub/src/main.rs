//! `shoal-hub`: the fleet hub binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_api::endpoint::BrokerUrl;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "shoal-hub",
    version,
    about = "Shoal hub: schedules WASM workloads onto edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (with its embedded MQTT broker unless --broker is given).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory for the hub database and blobs.
    #[arg(long, env = "SHOAL_HUB_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the embedded MQTT broker (MQTT 3.1.1 and 5 on one port).
    #[arg(long, env = "SHOAL_HUB_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Use this external broker (mqtt://HOST:PORT) instead of the embedded one.
    #[arg(long, env = "SHOAL_HUB_BROKER")]
    broker: Option<BrokerUrl>,
    /// Address of the HTTP API.
    #[arg(long, env = "SHOAL_HUB_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// URL agents fetch blobs from (default: http://<http-listen>).
    #[arg(long, env = "SHOAL_HUB_PUBLIC_URL")]
    public_url: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(a) => rt.block_on(async {
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                stop.cancel();
            });
            let config = shoal_hub::HubConfig {
                data_dir: a.data_dir,
                mqtt_listen: a.mqtt_listen,
                broker: a.broker,
                http_listen: a.http_listen,
                public_url: a.public_url,
            };
            shoal_hub::run(config, shutdown).await.context("hub failed")
        }),
    }?;
    // rumqttd's threads have no shutdown API; leave without waiting for them.
    std::process::exit(0)
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

//! `shoal-sim`: a simulated fleet for scale and chaos tests (see `shoal_e2e::sim`).
//!
//!   shoal-sim --broker mqtt://127.0.0.1:1883 --devices 1000 [--prefix sim]
//!             [--labels role=sensor] [--start-delay 50ms] [--failure-rate 0.01]
//!
//! Prints `connected N` once every device has connected, then a line per 10 s with counters;
//! Ctrl-C makes every device leave cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use shoal_e2e::sim::{self, SimConfig, SimStats};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "shoal-sim",
    about = "Simulated Shoal devices speaking the real protocol"
)]
struct Args {
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: shoal_api::wire::endpoint::BrokerUrl,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Labels every simulated device carries, k=v,k2=v2.
    #[arg(long, default_value = "")]
    labels: String,
    #[arg(long, default_value = "50ms", value_parser = shoal_api::model::quantity::duration_arg)]
    start_delay: Duration,
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let labels = if a.labels.is_empty() {
        Default::default()
    } else {
        shoal_api::model::ids::parse_label_list(&a.labels)?
    };
    let cfg = SimConfig {
        host: a.broker.host.clone(),
        port: a.broker.port,
        prefix: a.prefix,
        devices: a.devices,
        labels,
        start_delay: a.start_delay,
        failure_rate: a.failure_rate,
        memory: 1 << 30,
    };
    let stats = Arc::new(SimStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let fleet = tokio::spawn(sim::run(cfg, stats.clone(), stop.clone()));
    let mut announced = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if !announced && stats.connected.load(Ordering::Relaxed) >= a.devices {
                    println!("connected {}", a.devices);
                    announced = true;
                }
            }
            _ = report.tick() => eprintln!(
                "sim: connected {} desired {} statuses {}",
                stats.connected.load(Ordering::Relaxed),
                stats.desired_received.load(Ordering::Relaxed),
                stats.statuses_sent.load(Ordering::Relaxed)
            ),
        }
    }
    stop.cancel();
    let _ = fleet.await;
    Ok(())
}

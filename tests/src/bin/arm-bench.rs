//! `shoal-arm-bench`: ARM agents under qemu-user, side by side. For each agent binary given
//! (`TRIPLE=PATH`, e.g. a full and a runtime-only build of the same profile), it starts a hub
//! natively, the agent under qemu, and reports the agent's RSS once it is online and idle,
//! the first apply → Running of the probe module (download and compile on the board for a
//! full agent; the hub's precompile and download for a runtime-only one), and the RSS with
//! that workload running. qemu-user emulates in-process, so the RSS includes the emulator's
//! own memory and translation cache: read it as an upper bound, and compare builds with each
//! other rather than with a board.
//!
//! ```text
//! shoal-arm-bench aarch64-unknown-linux-gnu=target/…/shoal-agent \
//!                 aarch64-unknown-linux-gnu=target/…/shoal-agent-runtime-only
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use shoal_e2e::boards::Board;
use shoal_e2e::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() -> Result<()> {
    let agents: Vec<(Board, PathBuf)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (triple, path) = a
                .split_once('=')
                .with_context(|| format!("{a:?}: expected TRIPLE=PATH"))?;
            Ok((Board::by_triple(triple)?, PathBuf::from(path)))
        })
        .collect::<Result<_>>()?;
    if agents.is_empty() {
        bail!("usage: shoal-arm-bench TRIPLE=AGENT_BINARY...");
    }
    println!(
        "| agent | size | idle RSS (anon / file) | first apply → Running | RSS, one replica |"
    );
    println!("|---|---|---|---|---|");
    for (board, path) in agents {
        let dir = tempfile::tempdir()?;
        let hub = Hub::start(dir.path(), None)?;
        let a = Agent::start_program(
            dir.path(),
            "bench-board",
            "board=pi",
            &hub.join(),
            &[],
            board.qemu(&path),
        )?;
        hub.wait_devices_online(1, Duration::from_secs(120))?;
        // Let startup allocations settle before reading the idle figure.
        std::thread::sleep(Duration::from_secs(10));
        let (idle, idle_anon, idle_file) = rss_kib(a.proc.pid())?;

        std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
        let m = write_manifest(
            dir.path(),
            "bench.yaml",
            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: blink }\nspec:\n  selector: { board: pi }\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"1000\"]\n",
        );
        let t0 = Instant::now();
        hub.apply(&m)?;
        hub.wait_running("blink", 1, Duration::from_secs(300))?;
        let first = t0.elapsed();
        std::thread::sleep(Duration::from_secs(5));
        let (running, _, _) = rss_kib(a.proc.pid())?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "| {} ({}) | {:.1} MiB | {:.1} MiB ({:.1} / {:.1}) | {:.2} s | {:.1} MiB |",
            path.file_name().unwrap_or_default().to_string_lossy(),
            board.arch,
            size as f64 / (1024.0 * 1024.0),
            mib(idle),
            mib(idle_anon),
            mib(idle_file),
            first.as_secs_f64(),
            mib(running),
        );
    }
    Ok(())
}

//! Cross-compiled agents for ARM boards, proven by running them: the `aarch64` and `armv7`
//! builds of `shoal-agent` run under Debian's qemu-user (`qemu-aarch64`, `qemu-arm`, with the
//! cross C library as their sysroot), enroll with a native hub, receive a WASM workload and
//! report it Running with its output in the log. On armv7, wasmtime runs the module on its
//! Pulley interpreter (Cranelift has no 32-bit ARM backend).
//!
//! `scripts/cross.sh` builds the agents these tests run (the test command does it first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Result};
use shoal_e2e::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The cross-compiled agent for `triple` (`target/{triple}/debug/shoal-agent`).
fn cross_agent(triple: &str) -> Result<PathBuf> {
    let p = bin_dir()
        .parent()
        .unwrap()
        .join(triple)
        .join("debug")
        .join("shoal-agent");
    if !p.is_file() {
        bail!(
            "{} not found: run scripts/cross.sh first (it installs the cross toolchain and builds it)",
            p.display()
        );
    }
    Ok(p)
}

fn runs_a_workload_under_qemu(triple: &str, qemu: &str, sysroot: &str, arch: &str) -> Result<()> {
    let agent = cross_agent(triple)?;
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let mut cmd = Command::new(qemu);
    cmd.arg("-L").arg(sysroot).arg(&agent);
    let id = format!("board-{arch}");
    let a = Agent::start_program(dir.path(), &id, "board=pi", &hub.join(), &[], cmd)?;
    // Emulated, enrollment and startup take a few seconds more than natively.
    hub.wait_devices_online(1, Duration::from_secs(60))?;
    let devices = hub.devices()?;
    assert_eq!(devices[0]["arch"], arch, "{}", devices[0]);

    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "board.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: blink }\nspec:\n  selector: { board: pi }\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"200\"]\n",
    );
    hub.apply(&m)?;
    let w = hub.wait_running("blink", 1, Duration::from_secs(120))?;
    assert_eq!(w["replicas"][0]["device"], id.as_str(), "{w}");
    wait_until(Duration::from_secs(30), "heartbeats in the log", || {
        Ok((count_lines(&a.workload_log("blink-0"), "beat ") >= 3).then_some(()))
    })?;
    Ok(())
}

#[test]
fn an_aarch64_agent_under_qemu_runs_a_wasm_workload() -> Result<()> {
    runs_a_workload_under_qemu(
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
        "aarch64",
    )
}

#[test]
fn an_armv7_agent_under_qemu_runs_a_wasm_workload_on_pulley() -> Result<()> {
    runs_a_workload_under_qemu(
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
        "arm",
    )
}

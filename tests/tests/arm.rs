//! Cross-compiled agents for ARM boards, proven by running them: the `aarch64` and `armv7`
//! builds of `shoal-agent` run under Debian's qemu-user (`qemu-aarch64`, `qemu-arm`, with the
//! cross C library as their sysroot), enroll with a native hub, receive a WASM workload and
//! report it Running with its output in the log. On armv7, wasmtime runs the module on its
//! Pulley interpreter (Cranelift has no 32-bit ARM backend).
//!
//! The runtime-only builds (`--no-default-features`: no Cranelift, no containerd) do the same
//! with modules the hub precompiled for them: native aarch64 code, and Pulley bytecode for
//! armv7.
//!
//! `scripts/cross.sh` builds the agents these tests run (the test command does it first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::boards::{Board, AARCH64, ARMV7};
use shoal_e2e::*;
use std::time::Duration;

/// Runs the probe's heartbeat on `board` with the full agent, or the runtime-only one.
fn runs_a_workload_under_qemu(board: &Board, runtime_only: bool) -> Result<()> {
    let Board {
        arch,
        engine_target,
        ..
    } = *board;
    let name = if runtime_only {
        "shoal-agent-runtime-only"
    } else {
        "shoal-agent"
    };
    let agent = board.cross_agent(name)?;
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let cmd = board.qemu(&agent);
    let id = format!("board-{arch}");
    let a = Agent::start_program(dir.path(), &id, "board=pi", &hub.join(), &[], cmd)?;
    // Emulated, enrollment and startup take a few seconds more than natively.
    hub.wait_devices_online(1, Duration::from_secs(60))?;
    let devices = hub.devices()?;
    assert_eq!(devices[0]["arch"], arch, "{}", devices[0]);
    let runtime = if runtime_only {
        "wasm-precompiled"
    } else {
        "wasm"
    };
    assert_eq!(devices[0]["runtimes"][0], runtime, "{}", devices[0]);

    std::fs::copy(module("probe.wasm"), dir.path().join("probe.wasm"))?;
    let m = write_manifest(
        dir.path(),
        "board.yaml",
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: { name: blink }\nspec:\n  selector: { board: pi }\n  wasm: { module: ./probe.wasm }\n  args: [heartbeat, \"200\"]\n",
    );
    hub.apply(&m)?;
    let w = match hub.wait_running("blink", 1, Duration::from_secs(120)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "{}",
                std::fs::read_to_string(&a.proc.log).unwrap_or_default()
            );
            return Err(e);
        }
    };
    assert_eq!(w["replicas"][0]["device"], id.as_str(), "{w}");
    wait_until(Duration::from_secs(30), "heartbeats in the log", || {
        Ok((count_lines(&a.workload_log("blink-0"), "beat ") >= 3).then_some(()))
    })?;

    // Where the module was compiled: by the hub, for the board's engine, or on the board.
    let digest = shoal_api::model::ids::Digest::of(&std::fs::read(module("probe.wasm"))?);
    let precompiled = hub
        .data_dir
        .join("blobs/precompiled")
        .join(shoal_engine::ENGINE_ID)
        .join(engine_target)
        .join(format!("{}.cwasm", digest.hex()));
    let on_board = a
        .data_dir
        .join("cache/modules")
        .join(format!("{}.{engine_target}.signed.cwasm", digest.hex()));
    assert_eq!(
        precompiled.is_file(),
        runtime_only,
        "{}",
        precompiled.display()
    );
    assert_eq!(on_board.is_file(), runtime_only, "{}", on_board.display());
    Ok(())
}

#[test]
fn an_aarch64_agent_under_qemu_runs_a_wasm_workload() -> Result<()> {
    runs_a_workload_under_qemu(&AARCH64, false)
}

#[test]
fn an_armv7_agent_under_qemu_runs_a_wasm_workload_on_pulley() -> Result<()> {
    runs_a_workload_under_qemu(&ARMV7, false)
}

#[test]
fn a_runtime_only_aarch64_agent_runs_a_module_the_hub_precompiled() -> Result<()> {
    runs_a_workload_under_qemu(&AARCH64, true)
}

#[test]
fn a_runtime_only_armv7_agent_runs_pulley_bytecode_the_hub_precompiled() -> Result<()> {
    runs_a_workload_under_qemu(&ARMV7, true)
}

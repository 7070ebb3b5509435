//! `shoal-engine-bench`: what wasmtime's Pulley interpreter (the engine the agent uses on
//! 32-bit ARM boards, where Cranelift has no backend) costs against Cranelift's native
//! code, measured side by side on this machine: the same module (`probe.wasm work N`, pure
//! integer arithmetic), the same host, the same wasmtime, only the compilation target
//! differs (`pulley64` instead of the host). Prints a Markdown table for BENCHMARKS.md.
//!
//! Both engines must print the same result, so the comparison is of equal work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{ensure, Result};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::WasiCtxBuilder;

struct Measured {
    compile: Duration,
    runs: Vec<Duration>,
    output: String,
}

fn measure(target: Option<&str>, wasm: &[u8], rounds: u64, repeat: usize) -> Result<Measured> {
    let mut config = Config::new();
    if let Some(t) = target {
        config.target(t)?;
    }
    let engine = Engine::new(&config)?;
    let t0 = Instant::now();
    let module = Module::new(&engine, wasm)?;
    let compile = t0.elapsed();
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| s)?;
    let mut runs = Vec::new();
    let mut output = String::new();
    for _ in 0..repeat {
        let out = MemoryOutputPipe::new(4096);
        let wasi = WasiCtxBuilder::new()
            .args(&["probe", "work", &rounds.to_string()])
            .stdout(out.clone())
            .build_p1();
        let mut store = Store::new(&engine, wasi);
        let t = Instant::now();
        let instance = linker.instantiate(&mut store, &module)?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        // `work` returns from main: no proc_exit trap to tell apart from a failure.
        start.call(&mut store, ())?;
        runs.push(t.elapsed());
        output = String::from_utf8_lossy(&out.contents()).trim().to_string();
    }
    runs.sort();
    Ok(Measured {
        compile,
        runs,
        output,
    })
}

fn main() -> Result<()> {
    let wasm = std::fs::read(shoal_e2e::module("probe.wasm"))?;
    let rounds: u64 = std::env::var("SHOAL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000_000);
    let repeat = 5;
    let native = measure(None, &wasm, rounds, repeat)?;
    let pulley = measure(Some("pulley64"), &wasm, rounds, repeat)?;
    ensure!(
        native.output == pulley.output && native.output.starts_with("work "),
        "engines disagree: {:?} vs {:?}",
        native.output,
        pulley.output
    );
    let median = |m: &Measured| m.runs[m.runs.len() / 2];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "probe.wasm `work {rounds}` ({repeat} runs each, median; {}; wasmtime 48):\n",
        std::env::consts::ARCH
    );
    println!("| engine | compile | run (median) | run vs Cranelift |");
    println!("|---|---|---|---|");
    for (name, m) in [
        ("Cranelift (native code)", &native),
        ("Pulley (interpreter, pulley64)", &pulley),
    ] {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1}x |",
            ms(m.compile),
            ms(median(m)),
            ms(median(m)) / ms(median(&native))
        );
    }
    Ok(())
}

//! Shoal edge agent: receives desired state over MQTT and runs WASM workloads in wasmtime.

pub mod agent;
pub mod bus;
pub mod fetch;
pub mod logs;
pub mod plan;
pub mod runtime;
pub mod store;
pub mod supervisor;
pub mod wasm;

//! Shoal edge agent: receives desired state over MQTT and runs WASM workloads in wasmtime.

pub mod logs;
pub mod runtime;
pub mod wasm;
pub mod agent;
pub mod bus;
pub mod fetch;
pub mod plan;
pub mod store;
pub mod supervisor;

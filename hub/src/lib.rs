//! Shoal hub: accepts fleet manifests (over MQTT or HTTP), validates and stores them, places
//! workload replicas on devices, and publishes each device's desired state.
//!
//! Code map: [`server`] wires everything and owns the main loop; [`core`] is the state
//! machine; [`fleet`] holds the pure decisions (placement, rollouts, ingest, events, the
//! audit log), which no I/O reaches (`cargo xtask boundaries` checks); [`store`] (sled, or [`etcd`]) and
//! [`blobs`] persist; [`ha`] elects a leader among hubs on etcd; [`bus`] and [`broker`] speak
//! MQTT; [`http`] serves the API; [`logs`] relays `shoal logs` between callers and devices.

pub mod access;
pub mod blobs;
pub mod broker;
pub mod bus;
pub mod core;
pub mod dashboard;
pub mod enrollment;
pub mod etcd;
pub mod fleet;
pub mod gate;
pub mod ha;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod security;
pub mod server;
pub mod store;

pub use server::{run, HubConfig, HubError};

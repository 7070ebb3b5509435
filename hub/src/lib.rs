//! Shoal hub: accepts fleet manifests (over MQTT or HTTP), validates and stores them, places
//! workload replicas on devices, and publishes each device's desired state.
//!
//! Code map: [`config`] declares `shoal-hub serve`'s settings and merges them into a
//! [`HubConfig`]; [`app`] (the imperative shell) wires everything and owns the main loop; [`fleet`] is the functional
//! core, the fleet's state machine and its pure decisions (placement, rollouts, ingest,
//! events, the audit log), which no I/O and no clock reach (`cargo xtask boundaries`
//! checks); [`store`] (sled, or [`etcd`]) and
//! [`blobs`] persist; [`ha`] elects a leader among hubs on etcd; [`mqtt`] speaks
//! MQTT (the hub's client and the embedded broker); [`http`] serves the API; [`logs`] relays `shoal logs` between callers and devices.

pub mod access;
pub mod app;
pub mod backend;
pub mod blobs;
pub mod config;
pub mod dashboard;
pub mod enrollment;
pub mod etcd;
pub mod fleet;
pub mod gate;
pub mod ha;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod mqtt;
pub mod security;
pub mod store;

pub use app::{run, HubError};
pub use config::HubConfig;

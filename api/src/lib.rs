//! Shoal's shared contract, in four parts:
//! - [`model`]: domain types, validated with `TryFrom` (ids, workloads, labels and
//!   selectors, quantities, volumes, network rules, secrets, OCI references, WASM checks);
//! - [`wire`]: what travels as YAML/JSON: the manifest schema (strict), the bus's topics and
//!   messages (permissive, versioned), the mDNS contract, the HTTP API's views;
//! - [`policy`]: who may do what (the MQTT ACL and packet guard, operator roles);
//! - [`present`]: tables and escaping for the command lines.
//!
//! No I/O happens in this crate, and it reads no clock (`cargo xtask boundaries`): whoever
//! decides by time passes `now`.

pub mod model;
pub mod policy;
pub mod present;
pub mod wire;

/// The protocol generation spoken on the bus; it is also the `v1` in every topic.
pub const PROTOCOL_VERSION: u32 = 1;
/// `apiVersion` accepted in manifests.
pub const API_VERSION: &str = "shoal.dev/v1";

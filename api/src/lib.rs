//! Shoal's shared contract: the fleet manifest schema, MQTT topic names and the messages that
//! cross the bus between operators, the hub and edge agents.
//!
//! Two layers live here:
//! - **wire types** ([`manifest`], [`messages`]): what travels as YAML/JSON. Messages are
//!   permissive (unknown fields are ignored, most fields default) so that a newer peer can talk to
//!   an older one; manifests are strict (an unknown field is a typo, and is rejected).
//! - **domain types** ([`workload`], [`ids`], [`quantity`], [`volume`], [`secret`]): validated with `TryFrom`, so code
//!   that holds a [`workload::Workload`] never re-checks it.
//!
//! No I/O happens in this crate.

pub mod acl;
pub mod discovery;
pub mod endpoint;
pub mod ids;
pub mod labels;
pub mod manifest;
pub mod messages;
pub mod mqtt_guard;
pub mod mqtt_keepalive;
pub mod network;
pub mod oci;
pub mod operator;
pub mod printable;
pub mod quantity;
pub mod report;
pub mod secret;
pub mod selector;
pub mod table;
pub mod topics;
pub mod views;
pub mod volume;
pub mod wasm;
pub mod workload;

/// The protocol generation spoken on the bus; it is also the `v1` in every topic.
pub const PROTOCOL_VERSION: u32 = 1;
/// `apiVersion` accepted in manifests.
pub const API_VERSION: &str = "shoal.dev/v1";

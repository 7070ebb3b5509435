//! Domain types: validated once (with `TryFrom` or a parser), so code that holds one never
//! re-checks it. Ids are newtypes; a [`workload::Workload`] is a checked manifest.

pub mod caps;
pub mod config;
pub mod disconnect;
pub mod downward;
pub mod hardware;
pub mod ids;
pub mod job;
pub mod labels;
pub mod network;
pub mod oci;
pub mod order;
pub mod quantity;
pub mod refs;
pub mod schedule;
pub mod secret;
pub mod selector;
pub mod volume;
pub mod wasm;
pub mod workload;

//! The functional core, growing (issue 25, `../shared/REDESIGN.md`): decisions as plain
//! functions and types, with no I/O, no clock (`now` is a parameter), no tokio, no store and
//! no network crate. `cargo xtask boundaries` fails CI on a forbidden import here.
//!
//! - [`scheduler`]: placement (which device runs which replica);
//! - [`rollout`]: rolling updates, step by step;
//! - [`ingest`]: status reports spread over hub replicas;
//! - [`events`]: fleet events from one view to the next;
//! - [`audit`]: the audit log's numbering and bounds.

pub mod audit;
pub mod events;
pub mod ingest;
pub mod rollout;
pub mod scheduler;

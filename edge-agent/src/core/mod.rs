//! The agent's functional core, growing (issue 25, `../shared/REDESIGN.md`): decisions as
//! plain functions and types, with no I/O, no clock (`now` is a parameter), no tokio and no
//! network or runtime crate. `cargo xtask boundaries` fails CI on a forbidden import here.
//!
//! - [`plan`]: from the desired state and what runs, the replicas to start and stop;
//! - [`directory`]: what mDNS showed (hubs, peers, service endpoints), and which hub to use
//!   ([`directory::hub_link`]);
//! - [`hardware`]: which hardware nodes each replica holds;
//! - [`schedule`]: when a scheduled replica's runs start, are skipped or missed.

pub mod directory;
pub mod hardware;
pub mod plan;
pub mod schedule;

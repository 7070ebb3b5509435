//! [`EtcdStore`]: the hub's state in etcd (`shoal-hub serve --store etcd://HOST:PORT[,…]`),
//! for fleets whose control plane must not live on one disk.
//!
//! Keys sit under a prefix (default `/shoal`, or the URL's path): `{prefix}/workloads/{name}`,
//! `/devices/{id}`, `/desired/{id}`, `/rollouts/{name}`, `/secrets/{name}` and
//! `/meta/assignments`, each a JSON document as in the sled store, and `/pki/` (the keys
//! replicas share, [`crate::ha`]; skipped when the state is loaded). Beside the prefix:
//! `{prefix}.enroll/` (join tokens and enrollment records, see [`crate::enrollment`]) and
//! `{prefix}.blobs/` (modules). Writes are buffered and
//! [`Store::flush`] commits them in etcd transactions (at most [`TXN_OPS`] operations each,
//! etcd's default limit), so, as with sled, nothing is acknowledged before etcd has it; a
//! failed flush keeps the writes for the next one. A leader's store is fenced
//! ([`Store::fence`]): each transaction commits only if the leader's election key is still
//! the one it won with (see [`crate::ha`]).
//!
//! The [`Store`] trait is synchronous (the hub's main loop blocks on sled's flush the same
//! way); etcd's client is async, so the client lives on a thread of its own with a
//! single-threaded runtime, and the store talks to it over a channel. The thread ends when
//! the store is dropped.
//!
//! - [`url`]: `--store` URLs and what they may say;
//! - [`client`]: the client's thread, and the calls the store makes to it;
//! - [`store`]: the fleet's state ([`crate::store::Store`]);
//! - [`blobs`]: modules shared by replicas ([`crate::blobs::SharedBlobs`]);
//! - [`enrollment`]: join tokens and enrollment records ([`crate::enrollment::Enrollments`]).

mod blobs;
mod client;
mod enrollment;
mod store;
mod url;

pub use client::{EtcdFault, EtcdStore};
pub use url::{BadStoreUrl, EtcdTls, EtcdUrl, PLAINTEXT_REFUSED};

/// Most operations in one etcd transaction (etcd's `--max-txn-ops` default).
pub const TXN_OPS: usize = 128;

/// How long one etcd call may take before the store reports it failed.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

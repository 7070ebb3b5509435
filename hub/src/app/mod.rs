//! The imperative shell: `shoal-hub serve` wires the broker, the bus, the HTTP API and the
//! fleet ([`crate::fleet::Fleet`]) together and runs the main loop until shutdown.
//!
//! The main loop is the only owner of the fleet and the only writer of the store: it takes
//! the fleet's writes, writes and flushes them, then publishes (`MainLoop::commit`). It
//! `select!`s over bus events, HTTP requests, mDNS events, timers and the shutdown token,
//! turns each into an [`Event`], handles it, and publishes whatever desired states changed.
//! Every spawned task is tracked and awaited on shutdown.
//!
//! On an etcd store the loop first stands by (reads only, see [`crate::ha`]) until this hub
//! is elected, then leads until shutdown or until it loses the leadership.
//!
//! - [`command`]: the loop's typed inputs and outputs, the ports its adapters implement;
//! - [`compose`]: opens everything and runs standby, then leader;
//! - [`main_loop`]: the loop, commit (write → flush → publish) and the fleet's inputs;
//! - [`standby`]: what a standby does instead;
//! - [`inbound`]: MQTT messages into fleet inputs; [`requests`]: HTTP requests;
//! - [`apply`]: the apply use case; [`publish`]: sealing, signing, sending;
//! - [`book`]: the enrollment book, read off the loop; [`keys`]: the device keys secrets
//!   are sealed to, and the states that wait for one; [`views`]: metrics, events, log targets;
//! - [`mdns`]: the hub's advert.

mod apply;
mod book;
pub mod command;
mod compose;
mod inbound;
mod keys;
mod main_loop;
mod mdns;
mod publish;
pub mod request;
mod requests;
mod standby;
#[cfg(test)]
mod tests;
mod unwritten;
mod views;

use crate::blobs::BlobStore;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::store::Store;
pub use command::{Bus, BusEvent, Event};
use request::Request;
pub use request::{Failed, LogRefusal, NotDurable};
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::messages::DesiredState;
use shoal_daemon::mdns::MdnsEvent;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Hub settings, declared and merged in [`crate::config`].
pub use crate::config::HubConfig;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    #[error(transparent)]
    Broker(#[from] crate::mqtt::broker::BrokerError),
    #[error("cannot create data directory {path:?}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mdns(#[from] shoal_daemon::mdns::MdnsError),
    #[error("fleet credentials: {0}")]
    Pki(#[from] shoal_pki::PkiError),
    #[error("enrollment records: {0}")]
    Enrollments(#[from] crate::enrollment::EnrollError),
    #[error("external broker {0} is plain MQTT: use mqtts:// (or run the hub with --insecure)")]
    PlainBroker(String),
    #[error("store {0}: {msg}", msg = crate::etcd::PLAINTEXT_REFUSED)]
    PlainEtcd(String),
    #[error(transparent)]
    PublicUrl(#[from] shoal_api::wire::endpoint::PublicUrlError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}: restore DATA_DIR/pki/secrets.key from the backup it came with (a new key cannot read secrets stored under the old one)")]
    SecretsKey(String),
    #[error("lost the leadership (its etcd lease expired or its key is gone): stopping so that a supervisor starts this hub again, as a standby")]
    LeadershipLost,
}

/// Bus events handled before one commit (flush, then publish).
const BATCH: usize = 256;

/// How long status reports are gathered before a rollout steps on them.
const ROLLOUT_BATCH_MS: u64 = 50;

/// How long a replica gathers device reports before passing them on (see [`crate::fleet::ingest`]).
const RELAY_BATCH_MS: u64 = 50;

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(config: HubConfig, shutdown: CancellationToken) -> Result<(), HubError> {
    shoal_daemon::private_dir(&config.data_dir).map_err(|source| HubError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let tracker = TaskTracker::new();
    let result = compose::serve(&config, &tracker, shutdown.clone()).await;
    // Whatever happened, stop and await every task we started.
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

/// What the main loop receives from.
struct Channels {
    bus: mpsc::Receiver<BusEvent>,
    requests: mpsc::Receiver<Request>,
    mdns: mpsc::Receiver<MdnsEvent>,
    book: mpsc::Receiver<command::BookAnswer>,
}

/// What a standby main loop hands to the leader's when it is elected.
struct Parts<B: Bus> {
    publisher: Publisher<B>,
    views: Views,
    settings: LoopSettings,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    /// Open `shoal logs` sessions.
    logs: crate::logs::LogSessions,
    /// `Some` for replicas sharing status ingest.
    ingest: Option<Ingest>,
}

/// How the loop reaches devices: the bus, the keys it signs and seals with, and the
/// enrollment book it reads device keys and grants from (off the loop).
struct Publisher<B: Bus> {
    bus: B,
    /// Signs every desired state before it is published.
    signer: shoal_pki::sign::HubSigner,
    /// Encrypts secrets at rest.
    secrets_key: shoal_pki::secret::SecretsKey,
    /// Enrollment records: the device keys secrets are sealed to (`None`: `--insecure`).
    security: Option<Arc<crate::security::Security>>,
    /// Reads of the enrollment book in flight.
    book: book::BookReads,
    /// Device keys at hand, and desired states waiting for theirs.
    keys: keys::DeviceKeys,
}

/// What the loop shows of the fleet: recent events and the dashboards' change counter.
struct Views {
    /// Recent fleet events (see [`crate::fleet::events`]).
    events: crate::fleet::events::Events,
    /// Bumped when the fleet changed (the dashboard streams wait on it).
    fleet_changed: tokio::sync::watch::Sender<u64>,
    /// Something happened since the last events snapshot.
    changed: bool,
    last_snapshot: Option<std::time::Instant>,
}

/// What the loop reads of the hub's settings.
struct LoopSettings {
    fleet: String,
    /// How long a silent device is waited for before its replicas move.
    grace_ms: u64,
    /// Whether an `apply-as/{operator}` topic says who applied (the embedded broker's
    /// guard writes it) or is only a claim.
    attributed_applies: bool,
}

/// This replica's share of status ingest (see [`crate::fleet::ingest`]).
struct Ingest {
    /// Names this replica's batches (its MQTT client id's suffix).
    replica: String,
    relay: crate::fleet::ingest::Relay,
    /// Devices that enrolled through a standby lately (this one, or another by its
    /// batches), with when this replica heard: should it be elected before the leader
    /// re-sealed their states, it does so itself.
    enrolled_lately: BTreeMap<DeviceId, u64>,
}

/// How long a standby remembers that a device enrolled (well beyond a failover).
const ENROLLED_MEMORY_MS: u64 = 60_000;

impl Ingest {
    fn heard_enrolled(&mut self, device: DeviceId, now_ms: u64) {
        self.enrolled_lately
            .retain(|_, at| now_ms.saturating_sub(*at) < ENROLLED_MEMORY_MS);
        self.enrolled_lately.insert(device, now_ms);
    }
}

/// A hub standing by for the leadership (see [`crate::ha`]).
struct Standby {
    /// The store, to read what the leader wrote; no write path.
    read: Box<dyn crate::store::Load>,
    elector: crate::ha::Elector,
    /// The leader as it announced itself (for the `http` module's refusals).
    leader: tokio::sync::watch::Sender<Option<String>>,
    last_reload: Option<std::time::Instant>,
    /// Moves when the store changed ([`crate::ha::Elector::watch_state`]).
    changes: tokio::sync::watch::Receiver<u64>,
    /// When the store was last read.
    last_read: Option<std::time::Instant>,
}

/// What a main loop is: the leader, which writes, or a standby, which cannot.
enum Role<S: Store> {
    Leader(Writer<S>),
    Standby(Box<Standby>),
}

/// The leader's write path: its store, which [`MainLoop::persist`] alone writes.
struct Writer<S: Store> {
    store: S,
    /// The fleet's writes not yet in the store (see [`unwritten`]).
    unwritten: unwritten::Unwritten,
    /// Cancelled when the leadership is lost (by the lease keeper, or here when the store
    /// refuses a write as fenced).
    lost: Option<CancellationToken>,
}

struct MainLoop<S: Store, B: Bus> {
    core: Fleet,
    /// Leading (the only holder of the store's write path) or standing by (reads are
    /// answered, devices are listened to, nothing is written or published).
    role: Role<S>,
    publisher: Publisher<B>,
    views: Views,
    settings: LoopSettings,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    /// Desired states to publish at the next commit.
    outbox: Vec<DesiredState>,
    /// Status reports arrived during a rollout since its last step.
    rollout_due: bool,
    /// Open `shoal logs` sessions.
    logs: crate::logs::LogSessions,
    /// `Some` for replicas sharing status ingest.
    ingest: Option<Ingest>,
}

//! The shell's tests, with fakes at its seams: a bus that records what is sent and a store in
//! memory that can fail. They drive the leader's loop through its handlers (a device's
//! hello, an operator's apply over HTTP) and show `commit`'s order: the fleet's writes,
//! then the flush, then the publish, and nothing published while the store cannot flush.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::book::BookReads;
use super::command::{BusError, Outbound};
use super::*;
use crate::fleet::changes::Write;
use crate::store::{MemStore, Snapshot, StoreError};
use shoal_api::model::ids::{DeviceId, SecretName};
use shoal_api::wire::messages::{ApplyResult, Hello};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A `MemStore` that refuses its `fail_at`-th write (counting from 0) once, and every
/// flush while `fail_flush` is set: a disk that fails.
#[derive(Default)]
pub(super) struct TestStore {
    pub(super) inner: MemStore,
    seen: AtomicUsize,
    fail_at: Option<usize>,
    pub(super) fail_flush: AtomicBool,
}

impl TestStore {
    pub(super) fn refusing_write(fail_at: usize) -> Self {
        TestStore {
            fail_at: Some(fail_at),
            ..Default::default()
        }
    }
}

impl Store for TestStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn write(&self, w: &Write) -> Result<(), StoreError> {
        if Some(self.seen.fetch_add(1, Ordering::SeqCst)) == self.fail_at {
            return Err(StoreError::Db("disk full".into()));
        }
        self.inner.write(w)
    }
    fn put_workload(&self, w: &shoal_api::model::workload::Workload) -> Result<(), StoreError> {
        self.inner.put_workload(w)
    }
    fn delete_workload(&self, n: &shoal_api::model::ids::WorkloadName) -> Result<(), StoreError> {
        self.inner.delete_workload(n)
    }
    fn put_device(&self, d: &crate::store::DeviceRecord) -> Result<(), StoreError> {
        self.inner.put_device(d)
    }
    fn put_assignments(&self, a: &crate::fleet::scheduler::Assignments) -> Result<(), StoreError> {
        self.inner.put_assignments(a)
    }
    fn put_desired(&self, d: &shoal_api::wire::messages::DesiredState) -> Result<(), StoreError> {
        self.inner.put_desired(d)
    }
    fn put_rollout(
        &self,
        n: &shoal_api::model::ids::WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        self.inner.put_rollout(n, r)
    }
    fn put_secret(
        &self,
        n: &SecretName,
        s: Option<&crate::store::StoredSecret>,
    ) -> Result<(), StoreError> {
        self.inner.put_secret(n, s)
    }
    fn put_policy(&self, p: &shoal_api::policy::fleet::FleetPolicy) -> Result<(), StoreError> {
        self.inner.put_policy(p)
    }
    fn delete_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.inner.delete_device(id)
    }
    fn put_job(
        &self,
        n: &shoal_api::model::ids::WorkloadName,
        j: Option<&crate::fleet::job::JobState>,
    ) -> Result<(), StoreError> {
        self.inner.put_job(n, j)
    }
    fn put_config(
        &self,
        n: &shoal_api::model::ids::ConfigName,
        c: Option<&crate::fleet::records::StoredConfig>,
    ) -> Result<(), StoreError> {
        self.inner.put_config(n, c)
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        self.inner.put_labels_owned()
    }
    fn put_audit(&self, e: &shoal_api::policy::operator::AuditEntry) -> Result<(), StoreError> {
        self.inner.put_audit(e)
    }
    fn flush(&self) -> Result<(), StoreError> {
        if self.fail_flush.load(Ordering::SeqCst) {
            return Err(StoreError::Db("the disk is gone".into()));
        }
        Ok(())
    }
}

/// A bus that records what the loop sends.
#[derive(Clone, Default)]
struct FakeBus {
    sent: Arc<Mutex<Vec<Outbound>>>,
}

impl Bus for FakeBus {
    fn send(
        &self,
        msg: Outbound,
    ) -> impl std::future::Future<Output = Result<(), BusError>> + Send {
        self.sent.lock().unwrap().push(msg);
        std::future::ready(Ok(()))
    }
}

impl FakeBus {
    /// The generations of the desired states sent to `device`, in order.
    fn desired(&self, device: &str) -> Vec<u64> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                Outbound::Desired { device: d, signed } if d.as_str() == device => {
                    let signed: shoal_api::wire::messages::SignedDesired =
                        serde_json::from_slice(signed).unwrap();
                    let state = shoal_api::model::secret::b64::decode(&signed.state).unwrap();
                    let state: DesiredState = serde_json::from_slice(&state).unwrap();
                    Some(state.generation)
                }
                _ => None,
            })
            .collect()
    }
}

/// An `--insecure` leader on a `TestStore`, its bus recorded; the directory holds its blobs
/// and keys.
fn leader(dir: &std::path::Path) -> (MainLoop<TestStore, FakeBus>, FakeBus) {
    let bus = FakeBus::default();
    let (book_tx, _book_rx) = mpsc::channel(1);
    let parts = Parts {
        publisher: Publisher {
            bus: bus.clone(),
            signer: crate::security::signer(dir).unwrap(),
            secrets_key: crate::security::secrets_key(dir).unwrap(),
            security: None,
            book: BookReads::new(book_tx, TaskTracker::new()),
            keys: Default::default(),
        },
        views: Views {
            events: Default::default(),
            fleet_changed: tokio::sync::watch::channel(0).0,
            changed: true,
            last_snapshot: None,
        },
        settings: LoopSettings {
            fleet: "test".into(),
            grace_ms: 10_000,
            attributed_applies: false,
        },
        blobs: Arc::new(BlobStore::open(dir).unwrap()),
        metrics: Arc::new(Metrics::default()),
        logs: Default::default(),
        ingest: None,
    };
    let store = TestStore::default();
    let core = Fleet::open(store.load().unwrap(), "http://127.0.0.1:1".into(), true);
    let writer = Writer {
        store,
        unwritten: Default::default(),
        lost: None,
    };
    (MainLoop::new(core, parts, Role::Leader(writer)), bus)
}

fn store(main: &MainLoop<TestStore, FakeBus>) -> &TestStore {
    match &main.role {
        Role::Leader(w) => &w.store,
        Role::Standby(_) => panic!("a leader"),
    }
}

fn hello(id: &str) -> Hello {
    serde_json::from_value(serde_json::json!({
        "deviceId": id, "arch": "x86_64", "os": "linux", "runtimes": ["wasm"],
        "cpus": 2, "memory": 536870912u64, "agentVersion": "test",
    }))
    .unwrap()
}

/// `shoal apply` as the HTTP adapter hands it to the loop.
async fn apply(main: &mut MainLoop<TestStore, FakeBus>, text: String) -> ApplyResult {
    let (reply, answer) = tokio::sync::oneshot::channel();
    main.handle(Event::Http(super::request::Request::Apply {
        text: super::request::ManifestText(text),
        reply,
    }))
    .await;
    answer.await.unwrap()
}

/// A new workload `name` on every device (placed at once; a changed one would roll out).
fn workload(name: &str, digest: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  placement: every\n  wasm: {{ module: \"{digest}\" }}\n  args: [heartbeat, \"1000\"]\n"
    )
}

#[tokio::test]
async fn a_device_hears_of_an_apply_only_once_it_is_written_and_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut main, bus) = leader(dir.path());
    // An empty WASM module, uploaded as `shoal apply` would.
    let digest = main.blobs.put(b"\0asm\x01\0\0\0").unwrap().to_string();
    main.handle(Event::Bus(BusEvent::Hello(Box::new(hello("edge-a")))))
        .await;
    assert!(main.commit().await);

    let r = apply(&mut main, workload("beat", &digest)).await;
    assert!(r.accepted, "{:?}", r.errors);
    // Written and flushed: the store has the workload and the device's desired state, and
    // the device was sent that state.
    let snap = store(&main).load().unwrap();
    assert!(
        snap.workloads.keys().any(|w| w.as_str() == "beat"),
        "{snap:?}"
    );
    let stored = snap.desired.values().next().map(|d| d.generation).unwrap();
    let sent = bus.desired("edge-a");
    assert_eq!(sent.last(), Some(&stored), "{sent:?}");

    // The disk fails: the operator is told the change is not durable, and nothing reaches
    // the device (a crash now would lose what it would act on).
    store(&main).fail_flush.store(true, Ordering::SeqCst);
    let r = apply(&mut main, workload("tick", &digest)).await;
    assert!(!r.accepted, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.to_string().contains("durable")),
        "{:?}",
        r.errors
    );
    assert_eq!(
        bus.desired("edge-a"),
        sent,
        "published before it was durable"
    );

    // The disk is back: the next commit writes, flushes, and only then publishes.
    store(&main).fail_flush.store(false, Ordering::SeqCst);
    assert!(main.commit().await);
    let newest = store(&main)
        .load()
        .unwrap()
        .desired
        .values()
        .next()
        .map(|d| d.generation)
        .unwrap();
    assert!(newest > stored);
    assert_eq!(bus.desired("edge-a"), [sent, vec![newest]].concat());
}

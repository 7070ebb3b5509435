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

use crate::blobs::SharedBlobError;
use crate::enrollment::EnrollError;
use crate::store::{Fence, Snapshot, Store, StoreError, StoredSecret};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_api::ids::{DeviceId, SecretName, WorkloadName};
use shoal_api::messages::DesiredState;
use shoal_api::workload::Workload;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

/// Most operations in one etcd transaction (etcd's `--max-txn-ops` default).
pub const TXN_OPS: usize = 128;

/// How long one etcd call may take before the store reports it failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an etcd store lives and how to reach it:
/// `etcds://HOST:PORT[,HOST:PORT…][/PREFIX][?ca=FILE&cert=FILE&key=FILE&user=NAME&password-file=FILE&kek=FILE]`
/// (TLS, the server checked against `ca`, with a client certificate and/or etcd's user
/// authentication), or `etcd://…` (plaintext, which the hub refuses unless `--insecure`).
/// `kek` is the key-encryption key the fleet's private keys are wrapped with in etcd
/// (default `DATA_DIR/pki/etcd.kek`; see [`crate::ha`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// `etcds://`: the CA to check etcd with, and the client certificate and key, if any.
    pub tls: Option<EtcdTls>,
    /// etcd user and the file holding its password.
    pub user: Option<(String, std::path::PathBuf)>,
    /// The key-encryption key's file, if not the default.
    pub kek: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A `--store` value that names no store, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {url:?} is invalid: {reason}")]
pub struct BadStoreUrl {
    /// `store` or `etcd store`.
    pub what: &'static str,
    pub url: String,
    pub reason: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = BadStoreUrl;

    fn from_str(s: &str) -> Result<Self, BadStoreUrl> {
        let bad = |why: &str| BadStoreUrl {
            what: "etcd store",
            url: s.to_string(),
            reason: why.to_string(),
        };
        let (scheme_tls, rest) = match (s.strip_prefix("etcds://"), s.strip_prefix("etcd://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => {
                return Err(bad(
                    "expected etcds://HOST:PORT[,HOST:PORT…][/PREFIX][?ca=FILE…] (or etcd:// with --insecure)",
                ))
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, "/shoal".to_string()),
        };
        if prefix == "/" {
            return Err(bad("the prefix must not be empty"));
        }
        let mut endpoints = Vec::new();
        let scheme = if scheme_tls { "https" } else { "http" };
        for h in hosts.split(',') {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("{h:?} has no port")))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("{h:?} is not HOST:PORT")));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        let mut q: std::collections::BTreeMap<&str, std::path::PathBuf> = Default::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("option {pair:?} is not KEY=VALUE")))?;
            if !["ca", "cert", "key", "user", "password-file", "kek"].contains(&k) {
                return Err(bad(&format!(
                    "option {k:?} is unknown: expected ca, cert, key, user, password-file or kek"
                )));
            }
            if v.is_empty() || q.insert(k, v.into()).is_some() {
                return Err(bad(&format!("option {k:?} is empty or given twice")));
            }
        }
        let tls = match (scheme_tls, q.remove("ca")) {
            (true, Some(ca)) => Some(EtcdTls {
                ca,
                identity: match (q.remove("cert"), q.remove("key")) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => return Err(bad("cert and key go together")),
                },
            }),
            (true, None) => {
                return Err(bad(
                    "etcds:// needs ca=FILE (the CA that signed etcd's certificate)",
                ))
            }
            (false, Some(_)) => return Err(bad("ca, cert and key need etcds://")),
            (false, None) => None,
        };
        if !scheme_tls && (q.contains_key("cert") || q.contains_key("key")) {
            return Err(bad("ca, cert and key need etcds://"));
        }
        let user = match (q.remove("user"), q.remove("password-file")) {
            (Some(u), Some(p)) => Some((u.display().to_string(), p)),
            (None, None) => None,
            _ => return Err(bad("user and password-file go together")),
        };
        Ok(EtcdUrl {
            endpoints,
            prefix,
            tls,
            user,
            kek: q.remove("kek"),
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    /// The endpoints and prefix (file options are left out).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", hosts.join(","), self.prefix)
    }
}

impl EtcdUrl {
    /// Whether hub and etcd talk in the clear, unauthenticated.
    pub fn plaintext(&self) -> bool {
        self.tls.is_none()
    }

    /// Client options: TLS and credentials as the URL says, read from their files now.
    pub fn options(&self, timeout: Option<Duration>) -> Result<ConnectOptions, StoreError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StoreError::Etcd {
                url: self.to_string(),
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        let mut o = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT);
        if let Some(t) = timeout {
            o = o.with_timeout(t);
        }
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(t);
        }
        if let Some((user, file)) = &self.user {
            let password = String::from_utf8_lossy(&read(file)?).trim_end().to_string();
            o = o.with_user(user.clone(), password);
        }
        Ok(o)
    }
}

/// Why a plaintext etcd is refused.
pub const PLAINTEXT_REFUSED: &str = "etcd:// is plaintext without authentication: anyone who reaches etcd or the path to it reads and writes the fleet's state; use etcds://HOST:PORT?ca=FILE&cert=FILE&key=FILE (or user=NAME&password-file=FILE), or --insecure for local experiments";

/// One buffered write.
#[derive(Debug, Clone)]
enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// What went wrong on the etcd client's thread.
#[derive(Debug, thiserror::Error)]
pub enum EtcdFault {
    #[error("{0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd did not answer in time")]
    Timeout,
    #[error("cannot start the etcd client's runtime: {0}")]
    Runtime(std::io::Error),
    /// A fenced write found its election key gone (only unfenced writes report this).
    #[error("etcd refused the write")]
    Refused,
    #[error("blob {marker:?} has {have} of its {count} chunks")]
    Incomplete {
        marker: String,
        have: usize,
        count: usize,
    },
    #[error("the etcd client thread has stopped")]
    Stopped,
}

impl From<EtcdFault> for SharedBlobError {
    fn from(e: EtcdFault) -> Self {
        SharedBlobError(Box::new(e))
    }
}

/// Every key under the prefix, with its value.
type Entries = Vec<(String, Vec<u8>)>;

/// One key's value and its modification revision.
type Versioned = Option<(Vec<u8>, i64)>;

enum Cmd {
    /// Every key starting with the given one.
    Load(String, mpsc::Sender<Result<Entries, EtcdFault>>),
    /// The last (by key) so many keys starting with the given one, last first.
    Newest(String, i64, mpsc::Sender<Result<Entries, EtcdFault>>),
    /// One key.
    Get(String, mpsc::Sender<Result<Versioned, EtcdFault>>),
    /// Puts the values if every guard key's modification revision is still the given one
    /// (0: the key does not exist); answers whether it did.
    Cas {
        guards: Vec<(String, i64)>,
        puts: Vec<(String, Vec<u8>)>,
        reply: mpsc::Sender<Result<bool, EtcdFault>>,
    },
    Commit(Vec<Op>, Option<Fence>, mpsc::Sender<Result<(), Refused>>),
}

/// Why a commit did not happen.
enum Refused {
    Failed(EtcdFault),
    Fenced(Fence),
}

/// The hub's state in etcd. See the [module docs](self).
pub struct EtcdStore {
    url: EtcdUrl,
    pending: Mutex<Vec<Op>>,
    fence: Mutex<Option<Fence>>,
    /// `None` once dropped (the thread ends when this sender goes).
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EtcdStore {
    /// Connects (failing if no endpoint answers within a few seconds).
    pub fn connect(url: &EtcdUrl) -> Result<EtcdStore, StoreError> {
        let fail = |reason: String| StoreError::Etcd {
            url: url.to_string(),
            reason,
        };
        // Everything async happens on the client's own thread (a runtime cannot be started
        // from within the hub's); it says when it is connected, or why not.
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EtcdFault>>();
        let (tx, rx) = mpsc::channel::<Cmd>();
        let endpoints = url.endpoints.clone();
        let opts = url.options(Some(CALL_TIMEOUT))?;
        let thread = std::thread::Builder::new()
            .name("shoal-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EtcdFault::Runtime(e)));
                        return;
                    }
                };
                let connected = rt.block_on(async move {
                    let mut c = Client::connect(endpoints, Some(opts)).await?;
                    // Connecting is lazy: ask something so that a dead endpoint fails here.
                    c.status().await?;
                    Ok::<_, etcd_client::Error>(c)
                });
                match connected {
                    Ok(client) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(rt, client, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                    }
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(fail(e.to_string()));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(fail(EtcdFault::Stopped.to_string()));
            }
        }
        Ok(EtcdStore {
            url: url.clone(),
            pending: Mutex::new(Vec::new()),
            fence: Mutex::new(None),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.url.prefix)
    }

    fn audit_key(&self, name: &str) -> String {
        format!("{}.audit/{name}", self.url.prefix)
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            url: self.url.to_string(),
            reason: e.to_string(),
        }
    }

    fn push(&self, op: Op) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
    }

    fn put<T: Serialize>(&self, kind: &str, name: &str, v: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(StoreError::Encode)?;
        self.push(Op::Put(self.key(kind, name), bytes));
        Ok(())
    }

    fn ask<T, E>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, E>>) -> Cmd,
    ) -> Result<Result<T, E>, StoreError> {
        let gone = || self.fail(EtcdFault::Stopped);
        let (reply, answer) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(make(reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client thread: one command at a time, each bounded by [`CALL_TIMEOUT`].
fn serve(rt: tokio::runtime::Runtime, client: Client, rx: mpsc::Receiver<Cmd>) {
    let mut kv = client.kv_client();
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Load(from, reply) => {
                let r = rt.block_on(read(&mut kv, &from, true)).map(|resp| {
                    resp.kvs()
                        .iter()
                        .map(|kv| {
                            (
                                String::from_utf8_lossy(kv.key()).into_owned(),
                                kv.value().to_vec(),
                            )
                        })
                        .collect()
                });
                let _ = reply.send(r);
            }
            Cmd::Newest(from, limit, reply) => {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(
                        etcd_client::SortTarget::Key,
                        etcd_client::SortOrder::Descend,
                    )
                    .with_limit(limit);
                let r = rt
                    .block_on(async {
                        tokio::time::timeout(CALL_TIMEOUT, kv.get(from, Some(opts))).await
                    })
                    .map_err(|_| EtcdFault::Timeout)
                    .and_then(|r| r.map_err(EtcdFault::from))
                    .map(|resp| {
                        resp.kvs()
                            .iter()
                            .map(|kv| {
                                (
                                    String::from_utf8_lossy(kv.key()).into_owned(),
                                    kv.value().to_vec(),
                                )
                            })
                            .collect()
                    });
                let _ = reply.send(r);
            }
            Cmd::Get(key, reply) => {
                let r = rt.block_on(read(&mut kv, &key, false)).map(|resp| {
                    resp.kvs()
                        .first()
                        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
                });
                let _ = reply.send(r);
            }
            Cmd::Cas {
                guards,
                puts,
                reply,
            } => {
                let txn = Txn::new()
                    .when(
                        guards
                            .into_iter()
                            .map(|(k, rev)| Compare::mod_revision(k, CompareOp::Equal, rev))
                            .collect::<Vec<_>>(),
                    )
                    .and_then(
                        puts.into_iter()
                            .map(|(k, v)| TxnOp::put(k, v, None))
                            .collect::<Vec<_>>(),
                    );
                let call = async { tokio::time::timeout(CALL_TIMEOUT, kv.txn(txn)).await };
                let r = match rt.block_on(call) {
                    Ok(Ok(r)) => Ok(r.succeeded()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(EtcdFault::Timeout),
                };
                let _ = reply.send(r);
            }
            Cmd::Commit(ops, fence, reply) => {
                let mut result = Ok(());
                for batch in ops.chunks(TXN_OPS) {
                    let mut txn = Txn::new();
                    if let Some(f) = &fence {
                        txn = txn.when(vec![Compare::create_revision(
                            f.key.clone(),
                            CompareOp::Equal,
                            f.create_revision,
                        )]);
                    }
                    let txn = txn.and_then(
                        batch
                            .iter()
                            .map(|op| match op {
                                Op::Put(k, v) => TxnOp::put(k.as_str(), v.clone(), None),
                                Op::Delete(k) => TxnOp::delete(k.as_str(), None),
                            })
                            .collect::<Vec<_>>(),
                    );
                    let call = async { tokio::time::timeout(CALL_TIMEOUT, kv.txn(txn)).await };
                    match rt.block_on(call) {
                        Ok(Ok(r)) if r.succeeded() => {}
                        Ok(Ok(_)) => {
                            result = Err(Refused::Fenced(fence.clone().unwrap_or(Fence {
                                key: Vec::new(),
                                create_revision: 0,
                            })));
                            break;
                        }
                        Ok(Err(e)) => {
                            result = Err(Refused::Failed(e.into()));
                            break;
                        }
                        Err(_) => {
                            result = Err(Refused::Failed(EtcdFault::Timeout));
                            break;
                        }
                    }
                }
                let _ = reply.send(result);
            }
        }
    }
}

/// Reads `key` (every key starting with it if `prefix`), within [`CALL_TIMEOUT`]. A read is
/// safe to repeat: after an outage the first call on the old connection fails (broken
/// pipe) while the next one reconnects.
async fn read(
    kv: &mut etcd_client::KvClient,
    key: &str,
    prefix: bool,
) -> Result<etcd_client::GetResponse, EtcdFault> {
    let scan = async {
        let mut attempt = 0;
        loop {
            let opts = prefix.then(|| GetOptions::new().with_prefix());
            match kv.get(key, opts).await {
                Ok(resp) => return Ok(resp),
                Err(e) if attempt >= 2 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, scan).await {
        Ok(r) => r.map_err(EtcdFault::from),
        Err(_) => Err(EtcdFault::Timeout),
    }
}

fn dec<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        let base = format!("{}/", self.url.prefix);
        for (key, value) in self
            .ask(|reply| Cmd::Load(base.clone(), reply))?
            .map_err(|e| self.fail(e))?
        {
            let Some((kind, _name)) = key.strip_prefix(&base).and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            match kind {
                "workloads" => {
                    let w: Workload = dec(&key, &value)?;
                    snap.workloads.insert(w.name.clone(), w);
                }
                "devices" => {
                    let d: crate::store::DeviceRecord = dec(&key, &value)?;
                    snap.devices.insert(d.hello.device_id.clone(), d);
                }
                "desired" => {
                    let d: DesiredState = dec(&key, &value)?;
                    snap.desired.insert(d.device_id.clone(), d);
                }
                "rollouts" => {
                    let r: crate::fleet::rollout::Record = dec(&key, &value)?;
                    snap.rollouts.insert(r.workload.clone(), r);
                }
                "secrets" => {
                    let s: StoredSecret = dec(&key, &value)?;
                    snap.secrets.insert(s.name.clone(), s);
                }
                "meta" if key.ends_with("/meta/assignments") => {
                    snap.assignments = dec(&key, &value)?;
                }
                "meta" if key.ends_with("/meta/labels-owned") => snap.labels_owned = true,
                _ => {} // written by a newer hub: not ours to judge
            }
        }
        // The audit log lives beside the state (`{prefix}.audit/{seq}`, zero-padded), so the
        // state's loads and the standbys' watch never carry it: only its newest entries.
        let limit = i64::try_from(crate::fleet::audit::IN_MEMORY).unwrap_or(i64::MAX);
        let under = self.audit_key("");
        for (key, value) in self
            .ask(|reply| Cmd::Newest(under, limit, reply))?
            .map_err(|e| self.fail(e))?
        {
            snap.audit.push(dec(&key, &value)?);
        }
        snap.audit.reverse();
        Ok(snap)
    }
    fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        self.put("workloads", w.name.as_str(), w)
    }
    fn delete_workload(&self, name: &WorkloadName) -> Result<(), StoreError> {
        self.push(Op::Delete(self.key("workloads", name.as_str())));
        Ok(())
    }
    fn put_device(&self, d: &crate::store::DeviceRecord) -> Result<(), StoreError> {
        self.put("devices", d.hello.device_id.as_str(), d)
    }
    fn put_assignments(&self, a: &crate::fleet::scheduler::Assignments) -> Result<(), StoreError> {
        self.put("meta", "assignments", a)
    }
    fn put_labels_owned(&self) -> Result<(), StoreError> {
        self.put("meta", "labels-owned", &true)
    }
    fn put_audit(&self, e: &shoal_api::operator::AuditEntry) -> Result<(), StoreError> {
        if let Some(old) = e.seq.checked_sub(crate::fleet::audit::KEPT) {
            self.push(Op::Delete(self.audit_key(&format!("{old:020}"))));
        }
        let bytes = serde_json::to_vec(e).map_err(StoreError::Encode)?;
        self.push(Op::Put(self.audit_key(&format!("{:020}", e.seq)), bytes));
        Ok(())
    }
    fn put_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        self.put("desired", d.device_id.as_str(), d)
    }
    fn put_rollout(
        &self,
        name: &WorkloadName,
        r: Option<&crate::fleet::rollout::Record>,
    ) -> Result<(), StoreError> {
        match r {
            Some(r) => self.put("rollouts", name.as_str(), r),
            None => {
                self.push(Op::Delete(self.key("rollouts", name.as_str())));
                Ok(())
            }
        }
    }
    fn put_secret(&self, name: &SecretName, s: Option<&StoredSecret>) -> Result<(), StoreError> {
        match s {
            Some(s) => self.put("secrets", name.as_str(), s),
            None => {
                self.push(Op::Delete(self.key("secrets", name.as_str())));
                Ok(())
            }
        }
    }
    fn flush(&self) -> Result<(), StoreError> {
        let ops = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if ops.is_empty() {
            return Ok(());
        }
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let r = self
            .ask(|reply| Cmd::Commit(ops.clone(), fence, reply))
            .and_then(|r| {
                r.map_err(|e| match e {
                    Refused::Failed(why) => self.fail(why),
                    Refused::Fenced(f) => StoreError::Fenced {
                        url: self.url.to_string(),
                        key: String::from_utf8_lossy(&f.key).into_owned(),
                    },
                })
            });
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                // Kept, in order, ahead of anything written since: the next flush retries.
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let newer = std::mem::take(&mut *pending);
                *pending = ops;
                pending.extend(newer);
                Err(e)
            }
        }
    }
    fn fence(&self, fence: Fence) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(fence);
    }
}

/// Bytes per blob chunk: etcd takes requests of up to 1.5 MiB by default.
const BLOB_CHUNK: usize = 1 << 20;

/// Blobs shared by hub replicas, beside the state (not under it: loading the state must not
/// read every module): `{prefix}.blobs/{hex}/{chunk}` (zero-padded, in order) and, written
/// last, `{prefix}.blobs/{hex}` holding the number of chunks. Use a connection of its own,
/// so that large uploads do not hold up the state's flushes.
impl crate::blobs::SharedBlobs for EtcdStore {
    fn put(&self, d: &shoal_api::ids::Digest, bytes: &[u8]) -> Result<(), SharedBlobError> {
        let marker = format!("{}.blobs/{}", self.url.prefix, d.hex());
        if self.get_blob(&marker)?.is_some() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = bytes.chunks(BLOB_CHUNK).collect();
        for (i, c) in chunks.iter().enumerate() {
            self.put_now(Op::Put(format!("{marker}/{i:05}"), c.to_vec()))?;
        }
        Ok(self.put_now(Op::Put(marker, chunks.len().to_string().into_bytes()))?)
    }

    fn get(&self, d: &shoal_api::ids::Digest) -> Result<Option<Vec<u8>>, SharedBlobError> {
        Ok(self.get_blob(&format!("{}.blobs/{}", self.url.prefix, d.hex()))?)
    }
}

impl EtcdStore {
    /// Writes one key at once, unfenced (blobs are content-addressed: any replica may).
    fn put_now(&self, op: Op) -> Result<(), EtcdFault> {
        match self.ask(|reply| Cmd::Commit(vec![op], None, reply)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Refused::Failed(e))) => Err(e),
            Ok(Err(Refused::Fenced(_))) => Err(EtcdFault::Refused),
            Err(_) => Err(EtcdFault::Stopped),
        }
    }

    /// The blob whose marker key is `marker`, if it was completely written.
    fn get_blob(&self, marker: &str) -> Result<Option<Vec<u8>>, EtcdFault> {
        let entries = self
            .ask(|reply| Cmd::Load(marker.to_string(), reply))
            .map_err(|_| EtcdFault::Stopped)??;
        let Some(count) = entries
            .iter()
            .find(|(k, _)| k == marker)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        let chunk_prefix = format!("{marker}/");
        let chunks: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| k.starts_with(&chunk_prefix))
            .map(|(_, v)| v)
            .collect();
        if chunks.len() != count {
            return Err(EtcdFault::Incomplete {
                marker: marker.to_string(),
                have: chunks.len(),
                count,
            });
        }
        Ok(Some(chunks.into_iter().flatten().copied().collect()))
    }
}

/// Join tokens and enrollment records shared by hub replicas (see [`crate::enrollment`]):
/// `{prefix}.enroll/tokens/{id}` and `{prefix}.enroll/devices/{id}`, beside the state (not
/// under it: the state's loads and the standbys' watch leave them alone). Written by any
/// replica, unfenced; a claim is one transaction guarded by the token's modification
/// revision and, for an unbound token, the device record's absence. Use a connection of
/// its own.
impl crate::enrollment::Enrollments for EtcdStore {
    fn token(
        &self,
        id: &str,
    ) -> Result<Option<(shoal_pki::token::TokenRecord, crate::enrollment::Version)>, EnrollError>
    {
        let key = self.enroll_key("tokens", id);
        match self.get(&key)? {
            None => Ok(None),
            Some((bytes, rev)) => Ok(Some((
                shoal_pki::token::TokenRecord::from_json(&bytes, &key)?,
                rev,
            ))),
        }
    }

    fn create_token(
        &self,
        id: &str,
        record: &shoal_pki::token::TokenRecord,
    ) -> Result<bool, EnrollError> {
        let key = self.enroll_key("tokens", id);
        Ok(self.cas(vec![(key.clone(), 0)], vec![(key, record.to_json())])?)
    }

    fn claim_token(
        &self,
        id: &str,
        expected: crate::enrollment::Version,
        used: &shoal_pki::token::TokenRecord,
        device: &DeviceId,
        cert_pem: &str,
        grant: &shoal_api::labels::Grant,
    ) -> Result<bool, EnrollError> {
        let (token, record) = (
            self.enroll_key("tokens", id),
            self.enroll_key("devices", device.as_str()),
        );
        let mut guards = vec![(token.clone(), expected)];
        if grant.fresh {
            guards.push((record.clone(), 0));
        }
        let puts = vec![
            (token, used.to_json()),
            (record, cert_pem.into()),
            (
                self.enroll_key("grants", device.as_str()),
                crate::enrollment::grant_json(grant),
            ),
        ];
        Ok(self.cas(guards, puts)?)
    }

    fn grant(&self, device: &DeviceId) -> Result<Option<shoal_api::labels::Grant>, EnrollError> {
        let key = self.enroll_key("grants", device.as_str());
        match self.get(&key)? {
            Some((bytes, _)) => crate::enrollment::parse_grant(&bytes, &key).map(Some),
            None => Ok(None),
        }
    }

    fn grants(&self) -> Result<Vec<(DeviceId, shoal_api::labels::Grant)>, EnrollError> {
        let under = self.enroll_key("grants", "");
        let mut out = Vec::new();
        for (key, bytes) in self.entries(&under)? {
            let Some(device) = key
                .strip_prefix(&under)
                .and_then(|d| DeviceId::try_from(d).ok())
            else {
                continue;
            };
            out.push((device, crate::enrollment::parse_grant(&bytes, &key)?));
        }
        Ok(out)
    }

    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        let op = Op::Put(self.enroll_key("devices", device.as_str()), cert_pem.into());
        self.put_now(op)
            .map_err(|e| EnrollError::Store(self.fail(e)))
    }

    fn renew_record(
        &self,
        device: &DeviceId,
        expected: &str,
        cert_pem: &str,
    ) -> Result<bool, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        match self.get(&key)? {
            Some((bytes, rev)) if bytes == expected.as_bytes() => {
                Ok(self.cas(vec![(key.clone(), rev)], vec![(key, cert_pem.into())])?)
            }
            _ => Ok(false),
        }
    }

    fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        Ok(self.cas(vec![(key.clone(), 0)], vec![(key, cert_pem.into())])?)
    }

    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        Ok(self
            .get(&key)?
            .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn entry(
        &self,
        shelf: crate::enrollment::Shelf,
        name: &str,
    ) -> Result<Option<Vec<u8>>, EnrollError> {
        Ok(self
            .get(&self.enroll_key(shelf.dir(), name))?
            .map(|(b, _)| b))
    }

    fn put_entry(
        &self,
        shelf: crate::enrollment::Shelf,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), EnrollError> {
        let op = Op::Put(self.enroll_key(shelf.dir(), name), bytes.to_vec());
        self.put_now(op)
            .map_err(|e| EnrollError::Store(self.fail(e)))
    }

    fn entries_on(
        &self,
        shelf: crate::enrollment::Shelf,
    ) -> Result<Vec<(String, Vec<u8>)>, EnrollError> {
        let under = self.enroll_key(shelf.dir(), "");
        Ok(self
            .entries(&under)?
            .into_iter()
            .filter_map(|(k, b)| k.strip_prefix(&under).map(|n| (n.to_string(), b)))
            .collect())
    }
}

impl EtcdStore {
    fn enroll_key(&self, kind: &str, name: &str) -> String {
        format!("{}.enroll/{kind}/{name}", self.url.prefix)
    }

    /// Puts `puts` if every key in `guards` is still at its modification revision.
    fn cas(
        &self,
        guards: Vec<(String, i64)>,
        puts: Vec<(String, Vec<u8>)>,
    ) -> Result<bool, StoreError> {
        self.ask(|reply| Cmd::Cas {
            guards,
            puts,
            reply,
        })?
        .map_err(|e| self.fail(e))
    }

    /// One key's value and modification revision.
    fn get(&self, key: &str) -> Result<Versioned, StoreError> {
        self.ask(|reply| Cmd::Get(key.to_string(), reply))?
            .map_err(|e| self.fail(e))
    }

    /// Every key starting with `under`, and its value (diagnostics, and tests that look at
    /// what etcd holds).
    pub fn entries(&self, under: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.ask(|reply| Cmd::Load(under.to_string(), reply))?
            .map_err(|e| self.fail(e))
    }

    /// Writes `value` at `key` at once, unfenced, outside the state's buffered writes
    /// (repairs, and tests that play an older hub).
    pub fn put_raw(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_now(Op::Put(key.to_string(), value.to_vec()))
            .map_err(|e| self.fail(e))
    }

    /// The fleet CA's certificate as the replicas share it (`{prefix}/pki/ca.pem`, see
    /// [`crate::ha::Elector::share_keys`]), if a hub has run on this store.
    pub fn fleet_ca(&self) -> Result<Option<(String, String)>, StoreError> {
        let key = self.key("pki", "ca.pem");
        Ok(self
            .get(&key)?
            .map(|(bytes, _)| (String::from_utf8_lossy(&bytes).into_owned(), key)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(u.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(u.prefix, "/shoal");
        let u: EtcdUrl = "etcd://a:1,b:2/fleets/prod/".parse().unwrap();
        assert_eq!(u.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(u.prefix, "/fleets/prod");
        assert_eq!(u.to_string(), "etcd://a:1,b:2/fleets/prod");
        let u: EtcdUrl =
            "etcds://a:1,b:2/p?ca=/c.pem&cert=/h.pem&key=/h.key&user=hub&password-file=/pw&kek=/k"
                .parse()
                .unwrap();
        assert_eq!(u.endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(u.to_string(), "etcds://a:1,b:2/p");
        assert!(!u.plaintext());
        assert_eq!(u.user.as_ref().map(|u| u.0.as_str()), Some("hub"));
        assert_eq!(u.kek.as_deref(), Some(std::path::Path::new("/k")));
        for (bad, why) in [
            ("etcds://a:1?cert=/c", "needs ca=FILE"),
            ("etcds://a:1?ca=/c&cert=/c", "cert and key go together"),
            ("etcd://a:1?ca=/c", "need etcds://"),
            ("etcds://a:1?ca=/c&color=red", "\"color\" is unknown"),
            ("etcds://a:1?ca=/c&ca=/d", "given twice"),
            (
                "etcds://a:1?ca=/c&user=u",
                "user and password-file go together",
            ),
            ("http://a:1", "expected etcds://"),
            ("etcd://a", "\"a\" has no port"),
            ("etcd://a:x", "\"a:x\" is not HOST:PORT"),
            ("etcd://:1", "\":1\" is not HOST:PORT"),
            ("etcd://a:1/", "prefix must not be empty"),
        ] {
            let e = bad.parse::<EtcdUrl>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}

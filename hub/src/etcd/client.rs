//! The etcd client's own thread (a runtime cannot be started from within the hub's) and the
//! blocking calls the store makes to it over a channel, each bounded by [`CALL_TIMEOUT`].

use super::url::EtcdUrl;
use super::{CALL_TIMEOUT, TXN_OPS};
use crate::blobs::SharedBlobError;
use crate::store::{Fence, StoreError};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::Serialize;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

/// One buffered write.
#[derive(Debug, Clone)]
pub(super) enum Op {
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
pub(super) type Entries = Vec<(String, Vec<u8>)>;

/// One key's value and its modification revision.
pub(super) type Versioned = Option<(Vec<u8>, i64)>;

pub(super) enum Cmd {
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
pub(super) enum Refused {
    Failed(EtcdFault),
    Fenced(Fence),
}

/// The hub's state in etcd. See the [module docs](self).
pub struct EtcdStore {
    pub(super) url: EtcdUrl,
    /// Writes buffered until [`Store::flush`](crate::store::Store::flush).
    pub(super) pending: Mutex<Vec<Op>>,
    pub(super) fence: Mutex<Option<Fence>>,
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

    pub(super) fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.url.prefix)
    }

    pub(super) fn audit_key(&self, name: &str) -> String {
        format!("{}.audit/{name}", self.url.prefix)
    }

    pub(super) fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            url: self.url.to_string(),
            reason: e.to_string(),
        }
    }

    pub(super) fn push(&self, op: Op) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
    }

    pub(super) fn put<T: Serialize>(
        &self,
        kind: &str,
        name: &str,
        v: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(StoreError::Encode)?;
        self.push(Op::Put(self.key(kind, name), bytes));
        Ok(())
    }

    pub(super) fn ask<T, E>(
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

/// The keys and values of a range read.
fn entries(resp: &etcd_client::GetResponse) -> Entries {
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

/// The client thread: one command at a time, each bounded by [`CALL_TIMEOUT`].
pub(super) fn serve(rt: tokio::runtime::Runtime, client: Client, rx: mpsc::Receiver<Cmd>) {
    let mut kv = client.kv_client();
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Load(from, reply) => {
                let r = rt
                    .block_on(read(&mut kv, &from, true))
                    .map(|resp| entries(&resp));
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
                    .map(|resp| entries(&resp));
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

impl EtcdStore {
    /// Writes one key at once, unfenced (blobs are content-addressed: any replica may).
    pub(super) fn put_now(&self, op: Op) -> Result<(), EtcdFault> {
        match self.ask(|reply| Cmd::Commit(vec![op], None, reply)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Refused::Failed(e))) => Err(e),
            Ok(Err(Refused::Fenced(_))) => Err(EtcdFault::Refused),
            Err(_) => Err(EtcdFault::Stopped),
        }
    }

    /// Puts `puts` if every key in `guards` is still at its modification revision.
    pub(super) fn cas(
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
    pub(super) fn get(&self, key: &str) -> Result<Versioned, StoreError> {
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

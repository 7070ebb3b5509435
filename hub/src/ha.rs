//! Hub replicas on etcd (`--store etcd://…`): leader election, and the fleet keys every
//! replica shares.
//!
//! Every hub on an etcd store campaigns for `{prefix}/leader` with etcd's election API, on a
//! lease of its own (`--leader-lease`, kept alive at a third of its TTL). The winner
//! schedules and publishes; the others stand by and serve reads (see [`crate::app`]).
//! When the leader dies its lease expires, etcd deletes its key, and the oldest waiting
//! campaign wins.
//!
//! Fencing: the leader's store writes are transactions guarded by its election key's
//! creation revision ([`crate::store::Fence`]), so once the key is gone, lost lease or not,
//! no write of the deposed leader commits, and since desired states are published only
//! after their write commits, it publishes nothing new either. The lease keeper also
//! cancels [`Leadership::lost`] as soon as it cannot be sure the lease is still alive, and
//! the hub then stops (a supervisor starts it again, as a follower), as Kubernetes'
//! controller manager does.
//!
//! A standby follows the leader's writes by reading the store again when
//! [`Elector::watch_state`] (an etcd watch on the prefix) says it changed.
//!
//! The fleet CA, the desired-state signing key and the secrets key must be the same on every
//! replica: [`share_keys`] makes them so through etcd (`{prefix}/pki/{file}`), the first
//! hub to start creating them. The private ones are stored wrapped with a key-encryption
//! key that never goes to etcd (see `shoal_pki::wrap`): etcd is trusted with the fleet's
//! state, not with the power to sign for it.

use crate::etcd::EtcdUrl;
use crate::store::{Fence, StoreError};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest lease etcd grants (its minimum TTL with default timing is 1.5 s, rounded up).
pub const MIN_LEASE: Duration = Duration::from_secs(2);

/// The files under `DATA_DIR/pki` every replica must share: the fleet CA, the key desired
/// states are signed with, and the key secrets are encrypted with at rest.
pub const SHARED_KEYS: [&str; 4] = ["ca.key", "ca.pem", "signing.key", "secrets.key"];

/// An etcd connection for elections and shared keys.
#[derive(Clone)]
pub struct Elector {
    client: Client,
    url: EtcdUrl,
    lease_ttl: Duration,
}

/// Leadership won: the fence for the store, and a token cancelled when it may be lost.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub fence: Fence,
    pub lost: CancellationToken,
}

impl Elector {
    pub async fn connect(url: &EtcdUrl, lease_ttl: Duration) -> Result<Elector, StoreError> {
        // No per-request timeout on the client: a campaign waits as long as another hub
        // leads, and the lease keeper's stream lives on. Calls that must answer are bounded
        // one by one (`within`).
        let opts = url.options(None)?;
        let mut client = Client::connect(url.endpoints.clone(), Some(opts))
            .await
            .map_err(|e| fail(url, e))?;
        within(url, client.status()).await?;
        Ok(Elector {
            client,
            url: url.clone(),
            lease_ttl: lease_ttl.max(MIN_LEASE),
        })
    }

    fn election(&self) -> String {
        format!("{}/leader", self.url.prefix)
    }

    /// Campaigns until this hub leads (announcing `value`, e.g. its HTTP URL), keeping its
    /// lease alive from a task on `tracker` until `shutdown` (when it revokes the lease, so
    /// that another replica takes over at once) or until the lease is lost.
    pub async fn campaign(
        &self,
        value: String,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Leadership, StoreError> {
        // A standby outlives an etcd outage: it campaigns again (it serves reads meanwhile)
        // rather than exiting. Returns an error only once `shutdown` is cancelled.
        let mut wait = Duration::from_millis(250);
        loop {
            match self
                .campaign_once(value.clone(), tracker, shutdown.clone())
                .await
            {
                Ok(l) => return Ok(l),
                Err(e) => {
                    warn!(error = %e, retry_in = ?wait, "campaign for leadership failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(e),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(self.lease_ttl);
                }
            }
        }
    }

    async fn campaign_once(
        &self,
        value: String,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Leadership, StoreError> {
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let lease = within(&self.url, client.lease_grant(ttl, None)).await?.id();
        let lost = CancellationToken::new();
        tracker.spawn(keep_alive(
            client.clone(),
            lease,
            self.lease_ttl,
            lost.clone(),
            shutdown,
        ));
        info!(election = %self.election(), lease, "campaigning for leadership");
        let won = tokio::select! {
            r = client.campaign(self.election(), value, lease) => match r {
                Ok(w) => w,
                Err(e) => {
                    lost.cancel(); // ends this lease's keep-alive; the next try takes a new one
                    return Err(self.fail(e));
                }
            },
            _ = lost.cancelled() => {
                return Err(self.fail("the lease was lost while campaigning"));
            }
        };
        let key = won
            .leader()
            .ok_or_else(|| self.fail("etcd elected no key"))?;
        let fence = Fence {
            key: key.key().to_vec(),
            create_revision: key.rev(),
        };
        info!(key = %String::from_utf8_lossy(&fence.key), revision = fence.create_revision, "elected leader");
        Ok(Leadership { fence, lost })
    }

    /// What the current leader announced (`None`: there is none).
    pub async fn leader(&self) -> Option<String> {
        let mut c = self.client.clone();
        let r = tokio::time::timeout(Duration::from_secs(1), c.leader(self.election())).await;
        match r {
            Ok(Ok(resp)) => resp
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        fail(&self.url, e)
    }

    /// Counts changes to the state under the prefix, from a task on `tracker` watching it
    /// until `shutdown`: a standby reads the store again only when the count moved, instead
    /// of on every tick. While the watch is down (etcd unreachable, or the watch cancelled,
    /// e.g. compacted past) the count moves once it is back, since anything may have changed
    /// meanwhile. Starts at 1, so that the first look reads the store.
    pub fn watch_state(
        &self,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> tokio::sync::watch::Receiver<u64> {
        let (tx, mut rx) = tokio::sync::watch::channel(1u64);
        rx.mark_changed();
        let (mut client, prefix) = (self.client.clone(), format!("{}/", self.url.prefix));
        let bump = move |tx: &tokio::sync::watch::Sender<u64>| tx.send_modify(|n| *n += 1);
        tracker.spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                let opts = etcd_client::WatchOptions::new().with_prefix();
                // Ends with shutdown, or once the standby is elected (the receiver gone).
                let started = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = client.watch(prefix.as_str(), Some(opts)) => r,
                };
                match started {
                    Ok(mut stream) => {
                        bump(&tx);
                        wait = Duration::from_millis(250);
                        loop {
                            let msg = tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tx.closed() => return,
                                m = stream.message() => m,
                            };
                            match msg {
                                Ok(Some(r)) if r.canceled() => break,
                                Ok(Some(r)) => {
                                    if !r.events().is_empty() {
                                        bump(&tx);
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    warn!(error = %e, "watch of the hub store broke; watching again");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, retry_in = ?wait, "cannot watch the hub store"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
        rx
    }

    /// Makes [`SHARED_KEYS`] in `pki_dir` the fleet's: the copies in etcd if there are any,
    /// else this hub's (created if missing), which it then uploads, unless another hub did
    /// so first, whose copies it then takes. Private keys (`*.key`) go to etcd only wrapped
    /// with the key-encryption key (`kek=` in the store URL, default `pki_dir/etcd.kek`;
    /// created by the first hub, copied to every other replica by the operator). Raw keys
    /// an older hub uploaded are taken, then replaced by wrapped ones.
    pub async fn share_keys(&self, pki_dir: &Path) -> Result<(), StoreError> {
        let prefix = format!("{}/pki/", self.url.prefix);
        let kek_path = self
            .url
            .kek
            .clone()
            .unwrap_or_else(|| pki_dir.join("etcd.kek"));
        let mut kv = self.client.kv_client();
        for attempt in 0..3 {
            let got = within(
                &self.url,
                kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
            // name → (bytes as stored, mod revision)
            let stored: Vec<(String, Vec<u8>, i64)> = got
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let name = String::from_utf8_lossy(kv.key())
                        .strip_prefix(&prefix)?
                        .to_string();
                    SHARED_KEYS
                        .contains(&name.as_str())
                        .then(|| (name, kv.value().to_vec(), kv.mod_revision()))
                })
                .collect();
            if stored.len() == SHARED_KEYS.len() {
                let raw: Vec<&(String, Vec<u8>, i64)> = stored
                    .iter()
                    .filter(|(n, b, _)| is_private(n) && !shoal_pki::wrap::is_wrapped(b))
                    .collect();
                // Raw keys: an older hub's upload, which this hub wraps, with a new KEK. A hub
                // that has a KEK has seen them wrapped: raw ones now were put there.
                if !raw.is_empty() && kek_path.exists() {
                    let names: Vec<&str> = raw.iter().map(|(n, _, _)| n.as_str()).collect();
                    return Err(self.fail(format!(
                        "etcd holds unwrapped fleet keys {names:?}, yet this hub has a key-encryption key ({}): someone put keys into etcd, or restored it from before the keys were wrapped; restore the wrapped keys, or remove {} to take these and wrap them",
                        kek_path.display(),
                        kek_path.display()
                    )));
                }
                let kek = shoal_pki::wrap::Kek::load(&kek_path, !raw.is_empty())
                    .map_err(|e| self.fail(e))?;
                for (name, bytes, _) in &stored {
                    let bytes = match (&kek, shoal_pki::wrap::is_wrapped(bytes)) {
                        (Some(k), true) => k.unwrap(name, bytes, &kek_path).map_err(|e| self.fail(e))?,
                        (None, true) => {
                            return Err(self.fail(format!(
                                "etcd holds the fleet's keys wrapped with a key-encryption key this hub has not got: copy {} from a replica that runs (or give kek=FILE in the store URL)",
                                kek_path.display()
                            )))
                        }
                        (_, false) => bytes.clone(),
                    };
                    let path = pki_dir.join(name);
                    if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                        shoal_pki::write_atomic(&path, &bytes, mode(name))
                            .map_err(|e| self.fail(e))?;
                        info!(file = %path.display(), "took the fleet's copy from etcd");
                    }
                }
                let Some(kek) = kek.filter(|_| !raw.is_empty()) else {
                    return Ok(());
                };
                let mut compares = Vec::new();
                let mut puts = Vec::new();
                for (name, bytes, rev) in raw {
                    let key = format!("{prefix}{name}");
                    let wrapped = kek.wrap(name, bytes).map_err(|e| self.fail(e))?;
                    compares.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev));
                    puts.push(TxnOp::put(key, wrapped, None));
                }
                let txn = Txn::new().when(compares).and_then(puts);
                if within(&self.url, kv.txn(txn)).await?.succeeded() {
                    warn!(
                        prefix,
                        kek = %kek_path.display(),
                        "the fleet's private keys were in etcd in the clear: wrapped them with this key-encryption key; copy it to every other replica"
                    );
                    return Ok(());
                }
                // Another replica wrapped them first: read them again.
                continue;
            }
            if !stored.is_empty() {
                return Err(self.fail(format!(
                    "{prefix} holds only some of {SHARED_KEYS:?}: restore the rest from a backup"
                )));
            }
            if attempt > 0 {
                break;
            }
            // The first hub: its own keys (created now if need be) become the fleet's.
            shoal_pki::ca::FleetCa::load_or_create(pki_dir).map_err(|e| self.fail(e))?;
            shoal_pki::sign::HubSigner::load_or_create(&pki_dir.join("signing.key"))
                .map_err(|e| self.fail(e))?;
            shoal_pki::secret::SecretsKey::load_or_create(&pki_dir.join("secrets.key"))
                .map_err(|e| self.fail(e))?;
            let kek = shoal_pki::wrap::Kek::load(&kek_path, true)
                .map_err(|e| self.fail(e))?
                .ok_or_else(|| self.fail("no key-encryption key"))?;
            let mut compares = Vec::new();
            let mut puts = Vec::new();
            for name in SHARED_KEYS {
                let mut bytes = std::fs::read(pki_dir.join(name)).map_err(|e| self.fail(e))?;
                if is_private(name) {
                    bytes = kek.wrap(name, &bytes).map_err(|e| self.fail(e))?;
                }
                let key = format!("{prefix}{name}");
                compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                puts.push(TxnOp::put(key, bytes, None));
            }
            let txn = Txn::new().when(compares).and_then(puts);
            if within(&self.url, kv.txn(txn)).await?.succeeded() {
                info!(
                    prefix,
                    kek = %kek_path.display(),
                    "uploaded this hub's fleet keys, the private ones wrapped: other replicas need a copy of the key-encryption key"
                );
                return Ok(());
            }
            // Another hub uploaded first: take its keys.
        }
        Err(self.fail(format!("cannot agree on the fleet keys under {prefix}")))
    }
}

/// Whether a shared file is a private key (wrapped in etcd) rather than a certificate.
fn is_private(name: &str) -> bool {
    name.ends_with(".key")
}

fn mode(name: &str) -> u32 {
    if name.ends_with(".pem") {
        0o644
    } else {
        0o600
    }
}

/// `call`, failing after [`CALL_TIMEOUT`].
async fn within<T>(
    url: &EtcdUrl,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| fail(url, e)),
        Err(_) => Err(fail(url, "etcd did not answer in time")),
    }
}

fn fail(url: &EtcdUrl, e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd {
        url: url.to_string(),
        reason: e.to_string(),
    }
}

/// Keeps `lease` alive every third of `ttl`. Cancels `lost` once a whole `ttl` has passed
/// since the last keep-alive etcd confirmed was sent (the lease may have expired), or when
/// etcd says it has. Revokes the lease on `shutdown`.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    let period = ttl / 3;
    let mut confirmed = Instant::now();
    let mut stream = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Hand over at once rather than after the TTL.
                let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
                return;
            }
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(period.max(Duration::from_millis(200)), async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(lease).await?);
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                return Ok(None);
            };
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => confirmed = sent,
            Ok(Ok(Some(_))) => {
                warn!(lease, "etcd says the leadership lease has expired");
                lost.cancel();
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                stream = None; // reopened on the next round
                warn!(lease, "cannot keep the leadership lease alive; retrying");
            }
        }
        if confirmed.elapsed() >= ttl {
            warn!(
                lease,
                "leadership lease not renewed within its TTL: stepping down"
            );
            lost.cancel();
            return;
        }
    }
}

//! The enrollment book, read off the loop. Each read runs on a blocking thread (the book is
//! files, or etcd round trips) and its answer comes back to the loop as an
//! [`Event::Book`](super::command::Event): the loop never waits for the book once it runs.
//! Read this way: device keys, to seal secrets to ([`super::keys`]), and what a device that
//! just enrolled was granted by its join token. Only a leader that has not started its loop
//! yet waits for the book: for every grant it has not applied ([`MainLoop::catch_up_grants`]).

use super::command::BookAnswer;
use super::keys::NoDeviceKey;
use super::*;
use crate::app::command::Bus;
use crate::store::Store;
use shoal_api::model::ids::DeviceId;
use shoal_api::model::labels::Grant;
use shoal_api::wire::messages::DesiredState;
use shoal_daemon::clock::now_ms;
use std::collections::{BTreeSet, VecDeque};
use tracing::warn;

/// How many answers wait for the loop at most (readers wait beyond that, the loop never).
pub(super) const ANSWERS: usize = 64;

/// Grant reads in flight at once (enrollments come in bursts; the book is one etcd client).
pub(super) const MAX_GRANT_READS: usize = 4;

/// Reads in flight, and where their answers go.
pub(super) struct BookReads {
    answers: mpsc::Sender<BookAnswer>,
    tracker: TaskTracker,
    grants: GrantReads,
}

impl BookReads {
    pub(super) fn new(answers: mpsc::Sender<BookAnswer>, tracker: TaskTracker) -> Self {
        BookReads {
            answers,
            tracker,
            grants: GrantReads::default(),
        }
    }

    /// Runs `read` on a blocking thread, a tracked task sending its answer to the loop, or
    /// `failed` if the read did not finish (it panicked): every read is answered, so no
    /// state waits for an answer that never comes.
    fn ask(&self, read: impl FnOnce() -> BookAnswer + Send + 'static, failed: BookAnswer) {
        let answers = self.answers.clone();
        self.tracker.spawn(async move {
            let answer = match tokio::task::spawn_blocking(read).await {
                Ok(answer) => answer,
                Err(e) => {
                    warn!(error = %e, "a read of the enrollment book failed");
                    failed
                }
            };
            // The loop is gone when this fails (shutting down): nothing to tell.
            let _ = answers.send(answer).await;
        });
    }
}

/// Which devices' grants to read, at most [`MAX_GRANT_READS`] at once. A device that
/// enrolls again while its grant is read is read again after (the answer in flight may
/// predate the new grant); one queued is read once, however often it was named.
#[derive(Debug, Default)]
pub(super) struct GrantReads {
    /// Reads in flight; `true`: read again when it answers.
    reading: BTreeMap<DeviceId, bool>,
    queue: VecDeque<DeviceId>,
    queued: BTreeSet<DeviceId>,
}

impl GrantReads {
    /// `device` enrolled: its grant is to be read.
    pub(super) fn want(&mut self, device: DeviceId) {
        if let Some(again) = self.reading.get_mut(&device) {
            *again = true;
        } else if self.queued.insert(device.clone()) {
            self.queue.push_back(device);
        }
    }

    /// Devices whose grant to read now.
    pub(super) fn reads(&mut self) -> Vec<DeviceId> {
        let mut start = Vec::new();
        while self.reading.len() < MAX_GRANT_READS {
            let Some(device) = self.queue.pop_front() else {
                break;
            };
            self.queued.remove(&device);
            self.reading.insert(device.clone(), false);
            start.push(device);
        }
        start
    }

    /// `device`'s read answered: whether to apply the answer (`false`: it was not asked
    /// for, or it may be stale and the device is read again).
    pub(super) fn answered(&mut self, device: &DeviceId) -> bool {
        match self.reading.remove(device) {
            None => false,
            Some(false) => true,
            Some(true) => {
                self.want(device.clone());
                false
            }
        }
    }
}

impl<S: Store, B: Bus> MainLoop<S, B> {
    /// `read` on the enrollment book, off the loop's thread; `None` for an `--insecure` hub
    /// or when it fails (logged as `what`: the fleet then keeps the labels it has, fewer
    /// rights, never more).
    pub(super) async fn read_book<T: Send + 'static>(
        &self,
        what: &'static str,
        read: impl FnOnce(&dyn crate::enrollment::Enrollments) -> Result<T, crate::enrollment::EnrollError>
            + Send
            + 'static,
    ) -> Option<T> {
        let sec = self.publisher.security.clone()?;
        let r = tokio::task::spawn_blocking(move || read(&*sec.enrollments)).await;
        match r
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "cannot read {what} from the enrollment book");
                None
            }
        }
    }

    /// Applies every grant of the enrollment book this store has not applied yet.
    pub(super) async fn catch_up_grants(&mut self) -> Vec<DesiredState> {
        let Some(grants) = self.read_book("the grants", |b| b.grants()).await else {
            return Vec::new();
        };
        let grants = grants.into_iter().map(|(d, g)| (d, Some(g))).collect();
        self.fleet(|f| f.apply_grants(grants, now_ms()))
    }

    /// Starts the key reads the parked desired states wait for (see [`super::keys`]). A
    /// device the book says is revoked has no key to seal to, whatever the loop has heard
    /// of the revocation yet.
    pub(super) fn read_keys(&mut self) {
        let Some(sec) = &self.publisher.security else {
            return;
        };
        for device in self.publisher.keys.reads(now_ms()) {
            self.metrics.device_key_reads.inc();
            let failed = BookAnswer::Key {
                device: device.clone(),
                cert: Err(NoDeviceKey::Unreadable("the read did not finish".into())),
            };
            let sec = sec.clone();
            let read = move || {
                let b = &*sec.enrollments;
                let cert = match crate::access::revoked(b, &device) {
                    Ok(true) => Err(NoDeviceKey::Revoked),
                    Ok(false) => b
                        .enrolled_cert(&device)
                        .map_err(|e| NoDeviceKey::Unreadable(e.to_string())),
                    Err(e) => Err(NoDeviceKey::Unreadable(e.to_string())),
                };
                BookAnswer::Key { device, cert }
            };
            self.publisher.book.ask(read, failed);
        }
    }

    /// Starts the grant reads enrolled devices wait for.
    fn read_grants(&mut self) {
        let Some(sec) = &self.publisher.security else {
            return;
        };
        for device in self.publisher.book.grants.reads() {
            let failed = BookAnswer::Grant {
                device: device.clone(),
                grant: None,
            };
            let sec = sec.clone();
            let read = move || {
                let grant = sec
                    .enrollments
                    .grant(&device).unwrap_or_else(|e| {
                    warn!(%device, error = %e, "cannot read a device's grant from the enrollment book");
                    None
                });
                BookAnswer::Grant { device, grant }
            };
            self.publisher.book.ask(read, failed);
        }
    }

    /// `device` enrolled (through this replica, or another that said so): its join token's
    /// grant is read from the book (never from a message) and applied when it arrives; its
    /// key is new, so its state is sealed anew then.
    pub(super) async fn enrolled(&mut self, device: DeviceId) {
        self.publisher.keys.forget(&device);
        if self.publisher.security.is_none() {
            // No book (--insecure): nothing was granted.
            return self.granted(device, None).await;
        }
        self.publisher.book.grants.want(device);
        self.read_grants();
    }

    /// What the book answered.
    pub(super) async fn on_book(&mut self, answer: BookAnswer) {
        match answer {
            BookAnswer::Key { device, cert } => {
                if let Some((state, key)) = self.publisher.keys.answer(&device, cert, now_ms()) {
                    let state = self.sealed(state, key.as_deref().map_err(NoDeviceKey::clone));
                    self.send_signed(state).await;
                }
                self.read_keys();
            }
            BookAnswer::Grant { device, grant } => {
                if self.publisher.book.grants.answered(&device) {
                    self.granted(device, grant).await;
                }
                self.read_grants();
            }
        }
    }

    async fn granted(&mut self, device: DeviceId, grant: Option<Grant>) {
        let done = self.fleet(|f| f.enrolled(&device, grant, now_ms()));
        if let Err(e) = self.published(Some(done)).await {
            warn!(%device, error = %e, "cannot store what a device's enrollment granted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_that_panics_is_answered_as_failed() {
        let (tx, mut rx) = mpsc::channel(1);
        let tracker = TaskTracker::new();
        let reads = BookReads::new(tx, tracker.clone());
        let failed = BookAnswer::Key {
            device: dev("a"),
            cert: Err(NoDeviceKey::Unreadable("the read did not finish".into())),
        };
        reads.ask(|| panic!("the book exploded"), failed);
        match rx.recv().await {
            Some(BookAnswer::Key {
                device,
                cert: Err(NoDeviceKey::Unreadable(_)),
            }) => {
                assert_eq!(device, dev("a"))
            }
            other => panic!("{other:?}"),
        }
        tracker.close();
        tracker.wait().await;
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId::try_from(id.to_string()).unwrap()
    }

    #[test]
    fn grant_reads_are_bounded_and_each_device_is_read_once_per_enrollment() {
        let mut g = GrantReads::default();
        for i in 0..(MAX_GRANT_READS + 2) {
            g.want(dev(&format!("d{i}")));
        }
        g.want(dev("d0")); // named twice before it is read: read once
        let first = g.reads();
        assert_eq!(first.len(), MAX_GRANT_READS);
        assert!(g.reads().is_empty());
        assert!(!g.answered(&dev("stranger")), "unasked");
        assert!(g.answered(&first[0]));
        assert_eq!(g.reads(), vec![dev(&format!("d{MAX_GRANT_READS}"))]);
    }

    #[test]
    fn a_device_that_enrolls_again_while_its_grant_is_read_is_read_again() {
        let mut g = GrantReads::default();
        g.want(dev("a"));
        assert_eq!(g.reads(), vec![dev("a")]);
        g.want(dev("a")); // enrolled again: the answer in flight may predate it
        assert!(!g.answered(&dev("a")), "the older answer is not applied");
        assert_eq!(g.reads(), vec![dev("a")], "read again");
        assert!(g.answered(&dev("a")));
        assert!(g.reads().is_empty());
    }
}

//! The enrollment book, read off the loop. Each read runs on a blocking thread (the book is
//! files, or etcd round trips) and its answer comes back to the loop as an
//! [`Event::Book`](super::command::Event): the loop never waits for the book once it runs.
//! Read this way: device keys, to seal secrets to ([`super::keys`]), and what a device that
//! just enrolled was granted by its join token. Only a leader that has not started its loop
//! yet waits for the book: for every grant it has not applied ([`MainLoop::catch_up_grants`]).

use super::publish::NoDeviceKey;
use super::*;
use crate::app::command::Bus;
use crate::store::Store;
use shoal_api::ids::DeviceId;
use shoal_api::labels::Grant;
use shoal_api::messages::{now_ms, DesiredState};
use tracing::warn;

/// How many answers wait for the loop at most (readers wait beyond that, the loop never).
pub(super) const ANSWERS: usize = 64;

/// What the book said.
#[derive(Debug)]
pub enum BookAnswer {
    /// `device`'s certificate (`None`: it has no enrollment record), or why it could not
    /// be read.
    Key {
        device: DeviceId,
        cert: Result<Option<String>, NoDeviceKey>,
    },
    /// What `device`'s join token granted it (`None`: nothing, or the read failed, logged:
    /// the fleet then keeps the labels it has, fewer rights, never more). `ticket` orders
    /// the reads of one device.
    Grant {
        device: DeviceId,
        grant: Option<Grant>,
        ticket: u64,
    },
}

/// Reads in flight, and where their answers go.
pub(super) struct BookReads {
    answers: mpsc::Sender<BookAnswer>,
    tracker: TaskTracker,
    /// The latest grant read asked for each device: an older answer is dropped (the later
    /// read saw the book at least as new).
    grant_tickets: BTreeMap<DeviceId, u64>,
    next_ticket: u64,
}

impl BookReads {
    pub(super) fn new(answers: mpsc::Sender<BookAnswer>, tracker: TaskTracker) -> Self {
        BookReads {
            answers,
            tracker,
            grant_tickets: BTreeMap::new(),
            next_ticket: 0,
        }
    }

    /// Runs `read` on a blocking thread, a tracked task sending its answer to the loop.
    fn ask(
        &self,
        sec: Arc<crate::security::Security>,
        read: impl FnOnce(&dyn crate::enrollment::Enrollments) -> BookAnswer + Send + 'static,
    ) {
        let answers = self.answers.clone();
        self.tracker.spawn(async move {
            match tokio::task::spawn_blocking(move || read(&*sec.enrollments)).await {
                // The loop is gone when this fails (shutting down): nothing to tell.
                Ok(answer) => {
                    let _ = answers.send(answer).await;
                }
                Err(e) => warn!(error = %e, "a read of the enrollment book failed"),
            }
        });
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
        let sec = self.security.clone()?;
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

    /// Starts the key reads the parked desired states wait for (see [`super::keys`]).
    pub(super) fn read_keys(&mut self) {
        let Some(sec) = &self.security else {
            return;
        };
        for device in self.keys.reads() {
            self.metrics.device_key_reads.inc();
            self.book.ask(sec.clone(), move |b| {
                let cert = b
                    .enrolled_cert(&device)
                    .map_err(|e| NoDeviceKey::Unreadable(e.to_string()));
                BookAnswer::Key { device, cert }
            });
        }
    }

    /// `device` enrolled (through this replica, or another that said so): its join token's
    /// grant is read from the book (never from a message) and applied when it arrives; its
    /// key is new, so its state is sealed anew then.
    pub(super) async fn enrolled(&mut self, device: DeviceId) {
        self.keys.forget(&device);
        let Some(sec) = self.security.clone() else {
            // No book (--insecure): nothing was granted.
            return self.granted(device, None).await;
        };
        self.book.next_ticket += 1;
        let ticket = self.book.next_ticket;
        self.book.grant_tickets.insert(device.clone(), ticket);
        self.book.ask(sec, move |b| {
            let grant = b.grant(&device).unwrap_or_else(|e| {
                warn!(%device, error = %e, "cannot read a device's grant from the enrollment book");
                None
            });
            BookAnswer::Grant {
                device,
                grant,
                ticket,
            }
        });
    }

    /// What the book answered.
    pub(super) async fn on_book(&mut self, answer: BookAnswer) {
        match answer {
            BookAnswer::Key { device, cert } => {
                if let Some((state, key)) = self.keys.answer(&device, cert, now_ms()) {
                    let state = self.sealed(state, key.as_deref().map_err(NoDeviceKey::clone));
                    self.send_signed(state).await;
                }
                self.read_keys();
            }
            BookAnswer::Grant {
                device,
                grant,
                ticket,
            } => {
                if self.book.grant_tickets.get(&device) != Some(&ticket) {
                    return; // a later read of the same device answers
                }
                self.book.grant_tickets.remove(&device);
                self.granted(device, grant).await;
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

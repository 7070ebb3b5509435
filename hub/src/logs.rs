//! `shoal logs` on the hub: sessions between an HTTP caller and the devices whose logs it
//! reads.
//!
//! Opening a session publishes a [`LogRequest`] to each device on `devices/{d}/logreq`
//! (signed by the main loop with the desired-state key, for that device and time); the
//! devices answer with [`LogChunk`]s on `devices/{d}/logs/{request}`, which the main loop hands
//! to [`LogSessions::deliver`] and the session passes on to its caller over a bounded channel.
//! A follow session is renewed every [`RENEW_MS`] (the request published again) while its
//! caller listens; once the caller has gone, [`LogSessions::tick`] cancels it on the devices.
//! A device that the hub stops renewing (the hub died) ends the stream itself when the lease
//! runs out.
//!
//! Pure: the main loop publishes what the methods return.

use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::wire::messages::{LogChunk, LogRequest};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long a device keeps following without a renewal.
pub const LEASE_SECS: u32 = 15;

/// How often a follow session is renewed.
pub const RENEW_MS: u64 = 5_000;

/// Chunks buffered per session for a slow caller; more are dropped (and said so).
const CHANNEL: usize = 256;

/// What a caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAsk {
    pub workload: WorkloadName,
    pub devices: Vec<DeviceId>,
    pub tail: Option<u32>,
    pub since_secs: Option<u64>,
    pub follow: bool,
}

/// What a caller receives: chunks from the devices, and a line of its own when some were
/// dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    Chunk(LogChunk),
    /// This many chunks of `device` were dropped because the caller read too slowly.
    Dropped {
        device: DeviceId,
        chunks: u64,
    },
}

struct Session {
    request: LogRequest,
    /// The devices still streaming, with the next chunk number expected from each.
    devices: BTreeMap<DeviceId, u64>,
    tx: mpsc::Sender<LogEvent>,
    renewed_ms: u64,
    dropped: BTreeMap<DeviceId, u64>,
}

/// The open log sessions, by request id. Owned by the main loop.
#[derive(Default)]
pub struct LogSessions {
    live: HashMap<String, Session>,
}

impl LogSessions {
    /// Opens a session: the caller's end, and the requests to sign and publish (see
    /// [`message`]).
    pub fn open(
        &mut self,
        ask: LogAsk,
        now_ms: u64,
    ) -> (mpsc::Receiver<LogEvent>, Vec<(DeviceId, LogRequest)>) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        // Random, so that a device still following for a previous hub process never takes
        // a new request for a renewal of its old one.
        let id = format!("{:016x}", rand::random::<u64>());
        let request = LogRequest {
            protocol: shoal_api::PROTOCOL_VERSION,
            request: id.clone(),
            workload: ask.workload.as_str().to_string(),
            tail: ask.tail,
            since_secs: ask.since_secs,
            follow: ask.follow,
            lease_secs: LEASE_SECS,
            cancel: false,
            device_id: None,
            issued_ms: 0,
            signature: None,
        };
        let devices: BTreeMap<DeviceId, u64> = ask.devices.into_iter().map(|d| (d, 0)).collect();
        if devices.is_empty() {
            return (rx, Vec::new()); // nobody to ask: the caller's end is closed at once
        }
        let out = devices
            .keys()
            .map(|d| (d.clone(), request.clone()))
            .collect();
        debug!(request = %id, workload = %ask.workload, devices = devices.len(), "log session opened");
        self.live.insert(
            id,
            Session {
                request,
                devices,
                tx,
                renewed_ms: now_ms,
                dropped: BTreeMap::new(),
            },
        );
        (rx, out)
    }

    /// A chunk arrived from `device` (the topic's device, which the payload must match).
    /// Chunks of unknown sessions, of devices not asked, or seen already are ignored.
    pub fn deliver(&mut self, device: &DeviceId, chunk: LogChunk) {
        let Some(s) = self.live.get_mut(&chunk.request) else {
            return;
        };
        let Some(next) = s.devices.get_mut(device) else {
            warn!(%device, request = %chunk.request, "log lines from a device not asked ignored");
            return;
        };
        if chunk.seq < *next {
            return; // a redelivery (QoS 1)
        }
        *next = chunk.seq + 1;
        if chunk.done {
            s.devices.remove(device);
        }
        let id = chunk.request.clone();
        // Say what was dropped before the next chunk, once there is room for both.
        if s.dropped.contains_key(device) && s.tx.capacity() >= 2 {
            if let Some(chunks) = s.dropped.remove(device) {
                let _ = s.tx.try_send(LogEvent::Dropped {
                    device: device.clone(),
                    chunks,
                });
            }
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(LogEvent::Chunk(chunk)) {
            *s.dropped.entry(device.clone()).or_default() += 1;
        }
        if s.devices.is_empty() {
            debug!(request = %id, "log session complete");
            self.live.remove(&id);
        }
    }

    /// Renews follow sessions that are due, and ends those whose caller has gone (cancelling
    /// them on their devices): the requests to sign and publish.
    pub fn tick(&mut self, now_ms: u64) -> Vec<(DeviceId, LogRequest)> {
        let mut out = Vec::new();
        self.live.retain(|id, s| {
            if s.tx.is_closed() {
                debug!(request = %id, "log session closed by its caller");
                if s.request.follow {
                    let cancel = LogRequest {
                        cancel: true,
                        ..s.request.clone()
                    };
                    out.extend(s.devices.keys().map(|d| (d.clone(), cancel.clone())));
                }
                return false;
            }
            if s.request.follow && now_ms.saturating_sub(s.renewed_ms) >= RENEW_MS {
                s.renewed_ms = now_ms;
                out.extend(s.devices.keys().map(|d| (d.clone(), s.request.clone())));
            }
            true
        });
        out
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use shoal_api::wire::messages::LogLine;

    fn dev(d: &str) -> DeviceId {
        DeviceId::try_from(d).unwrap()
    }

    fn ask(follow: bool) -> LogAsk {
        LogAsk {
            workload: WorkloadName::try_from("web").unwrap(),
            devices: vec![dev("d1"), dev("d2")],
            tail: Some(5),
            since_secs: None,
            follow,
        }
    }

    fn chunk(device: &str, req: &str, seq: u64, line: &str, done: bool) -> LogChunk {
        LogChunk {
            protocol: 1,
            device_id: dev(device),
            request: req.into(),
            seq,
            lines: vec![LogLine {
                instance: "web-0".into(),
                line: line.into(),
            }],
            done,
            error: None,
        }
    }

    fn lines(rx: &mut mpsc::Receiver<LogEvent>) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                LogEvent::Chunk(c) => v.extend(
                    c.lines
                        .iter()
                        .map(|l| format!("{} {}", c.device_id, l.line)),
                ),
                LogEvent::Dropped { device, chunks } => {
                    v.push(format!("{device} dropped {chunks}"))
                }
            }
        }
        v
    }

    #[test]
    fn a_session_asks_each_device_and_ends_when_all_are_done() {
        let mut s = LogSessions::default();
        let (mut rx, out) = s.open(ask(false), 0);
        let devices: Vec<&str> = out.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(devices, ["d1", "d2"]);
        let req = out[0].1.clone();
        assert_eq!(
            (req.workload.as_str(), req.tail, req.follow),
            ("web", Some(5), false)
        );
        let id = req.request;

        s.deliver(&dev("d1"), chunk("d1", &id, 0, "a", false));
        s.deliver(&dev("d1"), chunk("d1", &id, 0, "a", false)); // redelivered
        s.deliver(&dev("d3"), chunk("d3", &id, 0, "intruder", true)); // not asked
        s.deliver(&dev("d1"), chunk("d1", "other", 0, "stray", true)); // unknown session
        s.deliver(&dev("d1"), chunk("d1", &id, 1, "b", true));
        assert_eq!(s.len(), 1, "d2 has not answered");
        s.deliver(&dev("d2"), chunk("d2", &id, 0, "x", true));
        assert_eq!(lines(&mut rx), ["d1 a", "d1 b", "d2 x"]);
        assert!(s.is_empty());
        assert!(s.tick(10_000).is_empty(), "nothing to renew or cancel");
    }

    #[test]
    fn follow_sessions_are_renewed_then_cancelled_when_the_caller_leaves() {
        let mut s = LogSessions::default();
        let (rx, _) = s.open(ask(true), 1_000);
        assert!(s.tick(1_000 + RENEW_MS - 1).is_empty());
        let renew = s.tick(1_000 + RENEW_MS);
        assert_eq!(renew.len(), 2);
        let req = renew[0].1.clone();
        assert!(req.follow && !req.cancel && req.lease_secs == LEASE_SECS);
        // A device that is done (it had no logs) is neither renewed nor cancelled.
        s.deliver(&dev("d2"), chunk("d2", &req.request, 0, "gone", true));
        drop(rx);
        let cancel = s.tick(1_000 + RENEW_MS + 1);
        assert_eq!(cancel.len(), 1);
        assert_eq!(cancel[0].0, dev("d1"));
        let req = cancel[0].1.clone();
        assert!(req.cancel);
        assert!(s.is_empty());
    }

    #[test]
    fn a_slow_caller_is_told_how_much_it_missed() {
        let mut s = LogSessions::default();
        let (mut rx, out) = s.open(ask(true), 0);
        let id = out[0].1.request.clone();
        for seq in 0..(CHANNEL as u64 + 3) {
            s.deliver(&dev("d1"), chunk("d1", &id, seq, "l", false));
        }
        assert_eq!(lines(&mut rx).len(), CHANNEL);
        s.deliver(
            &dev("d1"),
            chunk("d1", &id, CHANNEL as u64 + 3, "next", false),
        );
        assert_eq!(lines(&mut rx), ["d1 dropped 3", "d1 next"]);
    }
}

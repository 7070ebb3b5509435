//! Log lines for the hub (`shoal logs`): the device's side of [`LogRequest`]s.
//!
//! The hub publishes a request on `devices/{d}/logreq`; the agent's main loop hands it to
//! [`Streams::handle`], which starts one tracked task per request. The task reads the
//! workload's log files in `DATA_DIR/logs` (the window the request asks for, see
//! [`crate::logs::read_backlog`]) and publishes them in [`LogChunk`]s of at most
//! [`LOG_CHUNK_BYTES`] on `devices/{d}/logs/{request}`. A follow request then polls the files
//! for new lines until the hub cancels it or stops renewing its lease (the hub went away, or
//! its operator's connection did): a device never streams to nobody for long.

use crate::bus::Bus;
use crate::logs::{log_files, read_backlog, Follower, Window, MAX_LINE_BYTES};
use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::wire::messages::{LogChunk, LogLine, LogRequest, LOG_CHUNK_BYTES};
use shoal_api::wire::topics;
use shoal_daemon::clock::now_ms;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Most log streams a device serves at once; more are refused.
pub const MAX_STREAMS: usize = 16;

/// How often a followed log is looked at for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// A follow request's lease when the hub names none (or a shorter one).
const MIN_LEASE: Duration = Duration::from_secs(5);

/// How long a chunk is retried while the MQTT client's queue is full.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(5);

/// The log streams this device serves, by request id. Owned by the agent's main loop.
#[derive(Default)]
pub struct Streams {
    live: HashMap<String, Live>,
}

struct Live {
    /// When the stream ends unless renewed (the task holds the receiver; closed: it ended).
    lease: watch::Sender<Instant>,
    cancel: CancellationToken,
}

/// Where a stream's task finds what it needs.
pub struct Context<'a, B> {
    pub device: &'a DeviceId,
    pub logs_dir: &'a Path,
    pub bus: &'a B,
    pub tracker: &'a TaskTracker,
    pub shutdown: &'a CancellationToken,
}

impl Streams {
    /// Acts on a request from the hub: a new one starts streaming, a known one is renewed or
    /// cancelled.
    pub fn handle<B: Bus + Clone>(&mut self, req: LogRequest, cx: Context<'_, B>) {
        self.live
            .retain(|_, l| !l.lease.is_closed() && !l.cancel.is_cancelled());
        if !valid_request_id(&req.request) {
            warn!(request = %req.request, "log request with an invalid id ignored");
            return;
        }
        let lease = Instant::now() + MIN_LEASE.max(Duration::from_secs(req.lease_secs.into()));
        if let Some(live) = self.live.get(&req.request) {
            if req.cancel {
                info!(request = %req.request, "log stream cancelled by the hub");
                live.cancel.cancel();
                self.live.remove(&req.request);
            } else {
                live.lease.send_replace(lease);
            }
            return;
        }
        if req.cancel {
            return;
        }
        let topic = topics::logs(cx.device, &req.request);
        let out = Publisher {
            bus: cx.bus.clone(),
            topic,
            device: cx.device.clone(),
            request: req.request.clone(),
            seq: 0,
        };
        if self.live.len() >= MAX_STREAMS {
            let reason = format!(
                "device {} serves {MAX_STREAMS} log streams already; try again later",
                cx.device
            );
            cx.tracker.spawn(out.fail(reason));
            return;
        }
        let (lease_tx, lease_rx) = watch::channel(lease);
        let cancel = cx.shutdown.child_token();
        info!(request = %req.request, workload = %req.workload, follow = req.follow, "serving logs to the hub");
        cx.tracker.spawn(stream(
            req.clone(),
            cx.logs_dir.to_path_buf(),
            out,
            lease_rx,
            cancel.clone(),
        ));
        self.live.insert(
            req.request,
            Live {
                lease: lease_tx,
                cancel,
            },
        );
    }
}

/// Request ids are topic levels: 1 to 64 letters, digits and `-`.
fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Publishes one request's chunks, numbering them.
struct Publisher<B> {
    bus: B,
    topic: String,
    device: DeviceId,
    request: String,
    seq: u64,
}

impl<B: Bus> Publisher<B> {
    /// Sends `lines` in chunks of at most [`LOG_CHUNK_BYTES`] (the last one `done` when
    /// `last`); `false` if the bus would not take them or `cancel` fired meanwhile.
    async fn send(&mut self, lines: Vec<LogLine>, last: bool, cancel: &CancellationToken) -> bool {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let total = lines.len();
        for (i, mut l) in lines.into_iter().enumerate() {
            truncate(&mut l.line, MAX_LINE_BYTES);
            bytes += l.line.len() + l.instance.len() + 32;
            chunk.push(l);
            if bytes >= LOG_CHUNK_BYTES && i + 1 < total {
                if !self
                    .publish(std::mem::take(&mut chunk), false, None, cancel)
                    .await
                {
                    return false;
                }
                bytes = 0;
            }
        }
        if chunk.is_empty() && !last {
            return true;
        }
        self.publish(chunk, last, None, cancel).await
    }

    /// Ends the request with an error.
    async fn fail(mut self, reason: String) {
        warn!(request = %self.request, %reason, "log request failed");
        let never = CancellationToken::new();
        self.publish(Vec::new(), true, Some(reason), &never).await;
    }

    async fn publish(
        &mut self,
        lines: Vec<LogLine>,
        done: bool,
        error: Option<String>,
        cancel: &CancellationToken,
    ) -> bool {
        let chunk = LogChunk {
            protocol: shoal_api::PROTOCOL_VERSION,
            device_id: self.device.clone(),
            request: self.request.clone(),
            seq: self.seq,
            lines,
            done,
            error,
        };
        self.seq += 1;
        let Ok(payload) = serde_json::to_vec(&chunk) else {
            return false;
        };
        // The client's queue is bounded and `publish` never waits: retry a full queue a
        // little (a burst of backlog), give up when the broker is gone.
        let give_up = Instant::now() + PUBLISH_PATIENCE;
        loop {
            match self
                .bus
                .publish(self.topic.clone(), payload.clone(), false)
                .await
            {
                Ok(()) => return true,
                Err(e) if Instant::now() >= give_up => {
                    warn!(request = %self.request, error = %e, "cannot send log lines; stream ended");
                    return false;
                }
                Err(_) => {}
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// One request's task: the backlog, then (following) new lines until cancelled or the lease
/// runs out.
async fn stream<B: Bus>(
    req: LogRequest,
    dir: PathBuf,
    mut out: Publisher<B>,
    lease: watch::Receiver<Instant>,
    cancel: CancellationToken,
) {
    let workload = match WorkloadName::try_from(req.workload.as_str()) {
        Ok(w) => w,
        Err(e) => return out.fail(e.to_string()).await,
    };
    let files = log_files(&dir, workload.as_str());
    if files.is_empty() {
        let reason = format!(
            "no logs of workload {:?} on device {}",
            workload.as_str(),
            out.device
        );
        return out.fail(reason).await;
    }
    let window = Window {
        since_ms: req
            .since_secs
            .map(|s| now_ms().saturating_sub(s.saturating_mul(1000))),
        tail: req.tail.map(|t| t as usize),
    };
    let mut backlog = Vec::new();
    let mut followers = Vec::new();
    for (instance, path) in files {
        match read_backlog(&path, window) {
            Ok((lines, end)) => {
                backlog.extend(lines.into_iter().map(|line| LogLine {
                    instance: instance.clone(),
                    line,
                }));
                followers.push(Follower::new(instance, path, end));
            }
            Err(e) => {
                let reason = format!("cannot read {}: {e}", path.display());
                return out.fail(reason).await;
            }
        }
    }
    if !out.send(backlog, !req.follow, &cancel).await || !req.follow {
        return;
    }
    loop {
        if Instant::now() >= *lease.borrow() {
            info!(request = %out.request, "log stream lease ran out: the hub stopped renewing it");
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        let mut lines = Vec::new();
        for f in &mut followers {
            let instance = f.instance.clone();
            lines.extend(f.poll().into_iter().map(|line| LogLine {
                instance: instance.clone(),
                line,
            }));
        }
        if !out.send(lines, false, &cancel).await {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::bus::BusError;
    use std::sync::{Arc, Mutex};

    /// Records what is published.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, LogChunk)>>>);

    impl Bus for Recorder {
        async fn publish(
            &self,
            topic: String,
            payload: Vec<u8>,
            _retain: bool,
        ) -> Result<(), BusError> {
            let chunk = serde_json::from_slice(&payload).unwrap();
            self.0.lock().unwrap().push((topic, chunk));
            Ok(())
        }
    }

    impl Recorder {
        fn chunks(&self) -> Vec<LogChunk> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|(_, c)| c.clone())
                .collect()
        }
        fn lines(&self) -> Vec<String> {
            self.chunks()
                .iter()
                .flat_map(|c| c.lines.iter().map(|l| format!("{} {}", l.instance, l.line)))
                .collect()
        }
    }

    fn request(id: &str, workload: &str) -> LogRequest {
        LogRequest {
            protocol: 1,
            request: id.into(),
            workload: workload.into(),
            tail: None,
            since_secs: None,
            follow: false,
            lease_secs: 10,
            cancel: false,
            device_id: None,
            issued_ms: 0,
            signature: None,
        }
    }

    /// One device's streams, recording what they publish.
    struct Harness {
        dir: PathBuf,
        device: DeviceId,
        bus: Recorder,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        streams: Streams,
    }

    impl Harness {
        fn new(dir: &Path) -> Harness {
            Harness {
                dir: dir.to_path_buf(),
                device: DeviceId::try_from("dev1").unwrap(),
                bus: Recorder::default(),
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                streams: Streams::default(),
            }
        }

        fn handle(&mut self, req: LogRequest) {
            self.streams.handle(
                req,
                Context {
                    device: &self.device,
                    logs_dir: &self.dir,
                    bus: &self.bus,
                    tracker: &self.tracker,
                    shutdown: &self.shutdown,
                },
            );
        }
    }

    async fn settle(tracker: &TaskTracker) {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tracker.is_empty() {
                return;
            }
        }
    }

    #[tokio::test]
    async fn backlog_tail_errors_follow_and_cancel() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web-0.log"), "a\nb\nc\n").unwrap();
        std::fs::write(dir.path().join("web-1.log"), "x\n").unwrap();
        let mut h = Harness::new(dir.path());

        // All lines of both replicas, one done chunk, on the request's topic.
        h.handle(request("r1", "web"));
        settle(&h.tracker).await;
        assert_eq!(h.bus.lines(), ["web-0 a", "web-0 b", "web-0 c", "web-1 x"]);
        let (topic, chunk) = h.bus.0.lock().unwrap()[0].clone();
        assert_eq!(topic, "shoal/v1/devices/dev1/logs/r1");
        assert!(chunk.done && chunk.error.is_none() && chunk.seq == 0);
        h.bus.0.lock().unwrap().clear();

        // --tail 1: per replica.
        let mut r = request("r2", "web");
        r.tail = Some(1);
        h.handle(r);
        settle(&h.tracker).await;
        assert_eq!(h.bus.lines(), ["web-0 c", "web-1 x"]);
        h.bus.0.lock().unwrap().clear();

        // Unknown workload, bad workload name, bad request id.
        h.handle(request("r3", "api"));
        h.handle(request("r4", "Bad_Name"));
        h.handle(request("a/b", "web"));
        settle(&h.tracker).await;
        let errors: Vec<String> = h
            .bus
            .chunks()
            .iter()
            .map(|c| c.error.clone().unwrap())
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("no logs of workload \"api\" on device dev1")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.contains("Bad_Name")), "{errors:?}");
        h.bus.0.lock().unwrap().clear();

        // Follow: the backlog, then new lines; cancel ends it.
        let mut r = request("r5", "web");
        r.follow = true;
        r.tail = Some(0);
        h.handle(r.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("web-1.log"))
            .unwrap();
        f.write_all(b"y\n").unwrap();
        for _ in 0..50 {
            if h.bus.lines().contains(&"web-1 y".to_string()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(h.bus.lines(), ["web-1 y"]);
        assert!(h.bus.chunks().iter().all(|c| !c.done));
        // Chunks are numbered in order.
        let seqs: Vec<u64> = h.bus.chunks().iter().map(|c| c.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert!(!h.tracker.is_empty(), "still following");
        r.cancel = true;
        h.handle(r);
        settle(&h.tracker).await;
        assert!(h.tracker.is_empty(), "cancel ends the stream");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follow_stream_without_renewals_ends_with_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web-0.log"), "a\n").unwrap();
        let mut h = Harness::new(dir.path());
        let mut r = request("r1", "web");
        r.follow = true;
        r.lease_secs = 6;
        h.handle(r.clone());
        tokio::time::sleep(Duration::from_secs(4)).await;
        h.handle(r); // renewed: 6 s from now
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!h.tracker.is_empty(), "renewed, so still running at 8 s");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(h.tracker.is_empty(), "ended 6 s after the last renewal");
        assert_eq!(h.bus.lines(), ["web-0 a"]);
    }

    #[tokio::test]
    async fn big_backlogs_are_split_into_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let line = "z".repeat(1000);
        let text: String = (0..300).map(|_| format!("{line}\n")).collect();
        std::fs::write(dir.path().join("big-0.log"), text).unwrap();
        let mut h = Harness::new(dir.path());
        h.handle(request("r1", "big"));
        settle(&h.tracker).await;
        let chunks = h.bus.chunks();
        assert!(chunks.len() >= 4, "{} chunks", chunks.len());
        for c in &chunks {
            let bytes: usize = c.lines.iter().map(|l| l.line.len()).sum();
            assert!(bytes <= LOG_CHUNK_BYTES + 1000, "{bytes}");
        }
        assert_eq!(chunks.iter().filter(|c| c.done).count(), 1);
        assert!(chunks.last().unwrap().done);
        assert_eq!(h.bus.lines().len(), 300);
    }
}

//! Per-instance log sink: bounded on disk, with an in-memory tail.
//!
//! A [`LogSink`] collects one instance's output: the guest's stdout and stderr (line-buffered
//! per stream, written to the file verbatim, one line per line) and lines the agent writes about
//! the run ([`LogSink::system`], prefixed with `[shoal] `). The file `dir/{instance}.log` is
//! rotated to `{instance}.log.1` when it would exceed its size bound (one old file kept), so
//! the log never takes more than about twice the bound on disk. The last [`TAIL_LINES`] lines
//! are also kept in memory for [`LogSink::tail`].
//!
//! The sink is a cheap cloneable handle; all state sits behind a `std::sync::Mutex` that is
//! only held for the duration of a synchronous write, never across an `.await`.
//!
//! Every log file has a [`TimeIndex`] beside it (`{log}.idx`) so that readers can start at a
//! point in time (`logs --since`) without a timestamp on every line: the sink marks it as it
//! writes, and a [`Sampler`] marks it for container logs, which containerd's shim writes
//! itself. Readers: [`log_files`], [`read_backlog`] and [`Follower`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// How many lines [`LogSink::tail`] can return at most.
pub const TAIL_LINES: usize = 200;

/// A partial line (no newline yet) longer than this is written out as a line of its own.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// Which of the guest's output streams some bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Cloneable handle to one instance's log. See the [module docs](self).
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("LogSink")
            .field("instance", &inner.instance)
            .field("path", &inner.path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    instance: String,
    path: PathBuf,
    rotated: PathBuf,
    /// `None` after a failed rotation; reopened on the next write.
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    max_bytes: u64,
    ring: VecDeque<String>,
    /// Pending partial lines, indexed by [`Stream::index`].
    partial: [Vec<u8>; 2],
    /// Whether the last file operation failed (so a broken disk warns once, not per line).
    failing: bool,
    index: TimeIndex,
    /// Also print every line on standard output (`shoal-agent run MODULE`).
    echo: bool,
}

impl LogSink {
    /// Opens (appending to) `dir/{instance}.log`, creating `dir` if needed. The file is rotated
    /// to `{instance}.log.1` whenever a write would take it over `max_bytes`.
    pub fn open(dir: &Path, instance: &str, max_bytes: u64) -> io::Result<LogSink> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{instance}.log"));
        let rotated = dir.join(format!("{instance}.log.1"));
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let index = TimeIndex::open(&path, max_bytes, size);
        Ok(LogSink {
            inner: Arc::new(Mutex::new(Inner {
                instance: instance.to_string(),
                path,
                rotated,
                file: Some(file),
                size,
                max_bytes: max_bytes.max(1),
                ring: VecDeque::with_capacity(TAIL_LINES),
                partial: [Vec::new(), Vec::new()],
                failing: false,
                index,
                echo: false,
            })),
        })
    }

    /// The path of the current log file.
    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// Appends guest output. Complete lines are written out; a trailing partial line waits for
    /// its newline (or until it grows past [`MAX_LINE_BYTES`], or [`LogSink::flush_partial`]).
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let idx = stream.index();
        let mut pending = std::mem::take(&mut inner.partial[idx]);
        pending.extend_from_slice(bytes);
        let mut lines: Vec<&[u8]> = Vec::new();
        let mut rest: &[u8] = &pending;
        loop {
            let window = &rest[..rest.len().min(MAX_LINE_BYTES + 1)];
            if let Some(nl) = window.iter().position(|&b| b == b'\n') {
                lines.push(&rest[..nl]);
                rest = &rest[nl + 1..];
            } else if rest.len() > MAX_LINE_BYTES {
                lines.push(&rest[..MAX_LINE_BYTES]);
                rest = &rest[MAX_LINE_BYTES..];
            } else {
                break;
            }
        }
        inner.emit(&lines);
        let rest = rest.to_vec();
        inner.partial[idx] = rest;
    }

    /// Also prints every line on standard output from now on.
    pub fn echo_to_stdout(&self) {
        self.lock().echo = true;
    }

    /// Writes a line from the agent itself, as `[shoal] {line}`.
    pub fn system(&self, line: &str) {
        let text = format!("[shoal] {line}");
        self.lock().emit(&[text.as_bytes()]);
    }

    /// The last `n` lines (at most [`TAIL_LINES`]), oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let inner = self.lock();
        let skip = inner.ring.len().saturating_sub(n);
        inner.ring.iter().skip(skip).cloned().collect()
    }

    /// Writes out any pending partial lines (stdout first, then stderr). Call when a run ends.
    pub fn flush_partial(&self) {
        let mut inner = self.lock();
        let partial = std::mem::take(&mut inner.partial);
        let lines: Vec<&[u8]> = partial
            .iter()
            .filter(|p| !p.is_empty())
            .map(Vec::as_slice)
            .collect();
        inner.emit(&lines);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` inconsistent in a way that
        // matters for a log, so keep going with whatever is there.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Writes complete lines (without their newline) to the file and the ring.
    fn emit(&mut self, lines: &[&[u8]]) {
        if lines.is_empty() {
            return;
        }
        let now = shoal_daemon::clock::now_ms();
        self.index.mark(now, self.size);
        let mut batch: Vec<u8> = Vec::new();
        for line in lines {
            let len = line.len() as u64 + 1;
            if self.size + batch.len() as u64 + len > self.max_bytes
                && self.size + batch.len() as u64 > 0
            {
                self.write_file(&batch);
                batch.clear();
                self.rotate();
                self.index.mark(now, 0);
            }
            batch.extend_from_slice(line);
            batch.push(b'\n');
            if self.ring.len() == TAIL_LINES {
                self.ring.pop_front();
            }
            self.ring
                .push_back(String::from_utf8_lossy(line).into_owned());
        }
        if self.echo {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
        self.write_file(&batch);
    }

    fn write_file(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let result = match self.file.as_mut() {
            Some(file) => file.write_all(bytes),
            None => open_append(&self.path).and_then(|mut file| {
                self.size = file.metadata()?.len();
                file.write_all(bytes)?;
                self.file = Some(file);
                Ok(())
            }),
        };
        match result {
            Ok(()) => {
                self.size += bytes.len() as u64;
                self.failing = false;
            }
            Err(e) => self.failed("write", e),
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        self.index.rotate();
        if let Err(e) = std::fs::rename(&self.path, &self.rotated) {
            self.failed("rotate", e);
            // Rather truncate than grow without bound.
            let _ = std::fs::remove_file(&self.path);
        }
        match open_append(&self.path) {
            Ok(file) => {
                self.file = Some(file);
                self.size = 0;
            }
            Err(e) => self.failed("reopen", e),
        }
    }

    fn failed(&mut self, what: &str, e: io::Error) {
        if !self.failing {
            tracing::warn!(
                instance = %self.instance,
                path = %self.path.display(),
                error = %e,
                "failed to {what} instance log"
            );
        }
        self.failing = true;
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Where a log goes when rotated: `{log}.1` (one old file kept).
pub fn rotated_path(log: &Path) -> PathBuf {
    with_suffix(log, ".1")
}

/// The time index of a log: `{log}.idx`.
pub fn index_path(log: &Path) -> PathBuf {
    with_suffix(log, ".idx")
}

/// About how many marks an index holds at most: marks are at least `max_bytes / INDEX_MARKS`
/// bytes of log apart, so an index stays within ~100 KiB however slowly its log fills.
const INDEX_MARKS: u64 = 4096;

/// A log file's time index: the sidecar `{log}.idx`, lines `{unix_ms} {offset}`, each saying
/// that the log held `offset` bytes at `unix_ms` (so every later byte was written later). A
/// mark is written at most once per second and once per `max_bytes / INDEX_MARKS` bytes: a
/// reader asking for lines since T starts at the last mark at or before T and may get up to
/// that much before T, never less than it asked for.
///
/// Written by hand: timestamps on every line (as the CRI log format has) would need the agent
/// in the path of container output, which containerd's shim writes straight to the file.
#[derive(Debug)]
pub struct TimeIndex {
    log: PathBuf,
    path: PathBuf,
    step: u64,
    last: Option<(u64, u64)>,
    failing: bool,
}

impl TimeIndex {
    /// The index of `log`, which now holds `log_len` bytes and is bounded by `max_bytes`.
    pub fn open(log: &Path, max_bytes: u64, log_len: u64) -> TimeIndex {
        let path = index_path(log);
        let last = match read_index(&path).last().copied() {
            // An index ahead of its log (cut behind its back, or a crash between the mark and
            // the write): start it over.
            Some((_, offset)) if offset > log_len => {
                let _ = std::fs::remove_file(&path);
                None
            }
            last => last,
        };
        TimeIndex {
            log: log.to_path_buf(),
            path,
            step: (max_bytes / INDEX_MARKS).max(1),
            last,
            failing: false,
        }
    }

    /// Records that the log held `offset` bytes at `at_ms`, unless the last mark is within
    /// the same second or fewer than `step` bytes back.
    pub fn mark(&mut self, at_ms: u64, offset: u64) {
        match self.last {
            Some((t, o)) if offset >= o && (at_ms / 1000 <= t / 1000 || offset < o + self.step) => {
                return;
            }
            Some((_, o)) if offset >= o => {}
            // Shorter than at the last mark: the log was cut without `rotate`; start over.
            Some(_) => {
                let _ = std::fs::remove_file(&self.path);
            }
            None => {}
        }
        let line = format!("{at_ms} {offset}\n");
        match open_append(&self.path).and_then(|mut f| f.write_all(line.as_bytes())) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write log time index");
                }
                self.failing = true;
            }
        }
        self.last = Some((at_ms, offset));
    }

    /// The log was rotated to `{log}.1`: the index goes with it, and a new one starts.
    pub fn rotate(&mut self) {
        let _ = std::fs::rename(&self.path, index_path(&rotated_path(&self.log)));
        self.last = None;
    }
}

/// The marks of an index file, oldest first (malformed lines skipped; none if it is missing).
fn read_index(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (t, o) = l.split_once(' ')?;
            Some((t.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// Where a reader of `log` wanting the lines written at or after `since_ms` starts: the
/// offset of the last mark at or before `since_ms`, 0 if there is none.
fn start_offset(log: &Path, since_ms: u64) -> u64 {
    read_index(&index_path(log))
        .iter()
        .rev()
        .find(|(t, _)| *t <= since_ms)
        .map_or(0, |(_, o)| *o)
}

/// Builds the [`TimeIndex`] of a log another process appends to (a container's, written by
/// containerd's shim) from its size, sampled now and then: whenever the log has grown, the
/// index gets the size it had at the previous sample (every byte after it came later).
#[derive(Debug)]
pub struct Sampler {
    index: TimeIndex,
    prev: Option<(u64, u64)>,
}

impl Sampler {
    pub fn new(log: &Path, max_bytes: u64) -> Sampler {
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        Sampler {
            index: TimeIndex::open(log, max_bytes, len),
            prev: None,
        }
    }

    /// The log holds `len` bytes at `now_ms`.
    pub fn observe(&mut self, now_ms: u64, len: u64) {
        if let Some((t, l)) = self.prev {
            if len > l {
                self.index.mark(t, l);
            }
        }
        self.prev = Some((now_ms, len));
    }

    /// The log was copied to `{log}.1` and truncated at `now_ms`.
    pub fn rotated(&mut self, now_ms: u64) {
        self.index.rotate();
        self.prev = Some((now_ms, 0));
    }
}

/// The log files of `workload`'s replicas in `dir` (`{workload}-{N}.log`), by replica.
pub fn log_files(dir: &Path, workload: &str) -> Vec<(String, PathBuf)> {
    let prefix = format!("{workload}-");
    let mut found: Vec<(u32, String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let instance = name.strip_suffix(".log")?;
            let n: u32 = instance.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, instance.to_string(), e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, i, p)| (i, p)).collect()
}

/// What a reader wants of a log: lines written at or after `since_ms` (all kept when `None`),
/// then the last `tail` of those (all when `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub since_ms: Option<u64>,
    pub tail: Option<usize>,
}

/// The lines of a log and its rotated predecessor (`{path}.1`) in `window`, and the current
/// file's length (where following starts).
pub fn read_backlog(path: &Path, window: Window) -> io::Result<(Vec<String>, u64)> {
    let read = |p: &Path| -> io::Result<Vec<u8>> {
        let bytes = match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Some(since) = window.since_ms else {
            return Ok(bytes);
        };
        let mut from = (start_offset(p, since) as usize).min(bytes.len());
        // A mark a sampler took mid-line: start with that whole line.
        if from > 0 && bytes[from - 1] != b'\n' {
            from = bytes[..from]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
        }
        Ok(bytes[from..].to_vec())
    };
    let current = read(path)?;
    let end = std::fs::metadata(path).map_or(0, |m| m.len());
    let mut bytes = read(&rotated_path(path))?;
    bytes.extend_from_slice(&current);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let skip = window.tail.map_or(0, |n| lines.len().saturating_sub(n));
    Ok((lines[skip..].iter().map(|l| l.to_string()).collect(), end))
}

/// Follows one log file by polling its length: new complete lines are returned; a file that
/// got shorter (rotated to `.1`, or truncated in place by the container log bound) is read
/// again from its start. Written by hand: the crates that follow files either watch with
/// inotify (not on every board's filesystem) or do not survive copytruncate rotation.
#[derive(Debug)]
pub struct Follower {
    pub instance: String,
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    pub fn new(instance: String, path: PathBuf, offset: u64) -> Self {
        Self {
            instance,
            path,
            offset,
            partial: Vec::new(),
        }
    }

    /// The complete lines written since the last poll.
    pub fn poll(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.take(len - self.offset).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(last_nl + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&done)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn lines_split_across_writes_are_joined() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogSink::open(dir.path(), "a-0", 1 << 20).unwrap();
        log.write(Stream::Stdout, b"hel");
        log.write(Stream::Stderr, b"err ");
        log.write(Stream::Stdout, b"lo wor");
        assert_eq!(read(&log.path()), "", "partial lines must wait");
        log.write(Stream::Stdout, b"ld\nsecond\nthi");
        log.write(Stream::Stderr, b"line\n");
        log.system("started");
        assert_eq!(
            read(&log.path()),
            "hello world\nsecond\nerr line\n[shoal] started\n"
        );
        log.flush_partial();
        assert_eq!(log.tail(2), vec!["[shoal] started", "thi"]);
        assert!(read(&log.path()).ends_with("[shoal] started\nthi\n"));
        // flushing again writes nothing more
        log.flush_partial();
        assert_eq!(log.tail(10).len(), 5);
    }

    #[test]
    fn long_partial_line_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogSink::open(dir.path(), "a-0", 1 << 20).unwrap();
        log.write(Stream::Stdout, &vec![b'x'; MAX_LINE_BYTES + 10]);
        let tail = log.tail(5);
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].len(), MAX_LINE_BYTES);
        log.write(Stream::Stdout, b"\n");
        assert_eq!(log.tail(5)[1], "x".repeat(10));
    }

    #[test]
    fn rotation_bounds_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let max = 1000u64;
        let log = LogSink::open(dir.path(), "r-0", max).unwrap();
        for i in 0..500 {
            log.write(Stream::Stdout, format!("line number {i}\n").as_bytes());
            let size = std::fs::metadata(log.path()).unwrap().len();
            assert!(size <= max, "log grew to {size} bytes, over {max}");
        }
        let rotated = dir.path().join("r-0.log.1");
        assert!(rotated.exists());
        assert!(std::fs::metadata(&rotated).unwrap().len() <= max);
        let current = read(&log.path());
        assert!(current.ends_with("line number 499\n"));
        // The rotated file holds the lines just before the current file's first one.
        let first: u32 = current
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("line number "))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(read(&rotated).ends_with(&format!("line number {}\n", first - 1)));
        // Reopening continues appending to the same file.
        drop(log);
        let log = LogSink::open(dir.path(), "r-0", max).unwrap();
        log.system("again");
        assert!(read(&log.path()).ends_with("line number 499\n[shoal] again\n"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogSink::open(dir.path(), "t-0", 1 << 20).unwrap();
        let text: String = (0..(TAIL_LINES + 50)).map(|i| format!("{i}\n")).collect();
        log.write(Stream::Stdout, text.as_bytes());
        assert_eq!(log.tail(3), vec!["247", "248", "249"]);
        let all = log.tail(usize::MAX);
        assert_eq!(all.len(), TAIL_LINES);
        assert_eq!(all[0], "50");
        assert!(log.tail(0).is_empty());
    }
    #[test]
    fn log_files_tails_and_follows_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "web-10.log",
            "web-2.log",
            "web-2.log.1",
            "webby-0.log",
            "web-x.log",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let names: Vec<String> = log_files(dir.path(), "web")
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(names, ["web-2", "web-10"]);

        let log = dir.path().join("web-2.log");
        std::fs::write(dir.path().join("web-2.log.1"), "a\nb\n").unwrap();
        std::fs::write(&log, "c\nd\n").unwrap();
        let (lines, end) = read_backlog(&log, Window::default()).unwrap();
        assert_eq!(lines, ["a", "b", "c", "d"]);
        assert_eq!(end, 4);
        assert_eq!(
            read_backlog(
                &log,
                Window {
                    tail: Some(3),
                    ..Window::default()
                }
            )
            .unwrap()
            .0,
            ["b", "c", "d"]
        );
        assert_eq!(
            read_backlog(
                &log,
                Window {
                    tail: Some(0),
                    ..Window::default()
                }
            )
            .unwrap()
            .0,
            Vec::<String>::new()
        );

        let mut f = Follower::new("web-2".into(), log.clone(), end);
        assert!(f.poll().is_empty());
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"e\npart").unwrap();
        assert_eq!(f.poll(), ["e"]);
        file.write_all(b"ial\n").unwrap();
        assert_eq!(f.poll(), ["partial"]);
        // Truncated in place (the container log bound) or replaced by a new file: read again
        // from the start.
        std::fs::write(&log, "f\n").unwrap();
        assert_eq!(f.poll(), ["f"]);
    }

    #[test]
    fn since_starts_at_the_last_mark_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s-0.log");
        let since = |ms| {
            read_backlog(
                &log,
                Window {
                    since_ms: Some(ms),
                    tail: None,
                },
            )
            .unwrap()
            .0
        };
        // No index (an older agent's log): everything.
        std::fs::write(&log, "old\n").unwrap();
        assert_eq!(since(5_000), ["old"]);
        std::fs::remove_file(&log).unwrap();

        let mut index = TimeIndex::open(&log, 1 << 20, 0);
        let mut text = String::new();
        let mut write = |index: &mut TimeIndex, at_ms: u64, line: &str| {
            index.mark(at_ms, text.len() as u64);
            text.push_str(line);
            text.push('\n');
            std::fs::write(&log, &text).unwrap();
        };
        let big = "x".repeat(300);
        write(&mut index, 10_000, "a"); // marked (the first)
        write(&mut index, 10_500, &big); // not marked: the same second
        write(&mut index, 11_000, "b"); // marked: a new second, 256 bytes further
        write(&mut index, 12_000, "c"); // not marked: fewer than 256 bytes further
        write(&mut index, 13_000, "d"); // not marked either
        write(&mut index, 14_000, &big); // not marked either
        write(&mut index, 15_000, "e"); // marked
        assert_eq!(
            read_index(&index_path(&log)),
            [(10_000, 0), (11_000, 303), (15_000, 610)]
        );
        let all = ["a", &big, "b", "c", "d", &big, "e"];
        assert_eq!(since(9_000), all);
        assert_eq!(since(10_999), all);
        assert_eq!(since(11_000), all[2..]);
        assert_eq!(since(13_500), all[2..], "never less than asked for");
        assert_eq!(since(15_000), ["e"]);
        assert_eq!(since(99_000), ["e"]);
        let w = Window {
            since_ms: Some(11_000),
            tail: Some(2),
        };
        assert_eq!(read_backlog(&log, w).unwrap().0, [big.as_str(), "e"]);

        // An index ahead of its log is dropped when the log is opened.
        std::fs::write(&log, "").unwrap();
        let _ = TimeIndex::open(&log, 1 << 20, 0);
        assert!(!index_path(&log).exists());
    }

    #[test]
    fn sink_marks_and_rotates_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogSink::open(dir.path(), "m-0", 1000).unwrap();
        log.write(Stream::Stdout, b"first\n");
        let marks = read_index(&index_path(&log.path()));
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].1, 0);
        // Filling the log rotates it, and its index with it.
        for i in 0..100 {
            log.write(Stream::Stdout, format!("line number {i}\n").as_bytes());
        }
        let rotated = index_path(&rotated_path(&log.path()));
        assert!(rotated.exists());
        let now = read_index(&index_path(&log.path()));
        assert_eq!(now.first().map(|m| m.1), Some(0), "{now:?}");
        // Everything since before the first write: both files, whole.
        let (all, _) = read_backlog(
            &log.path(),
            Window {
                since_ms: Some(marks[0].0 - 1),
                tail: None,
            },
        )
        .unwrap();
        assert_eq!(all.last().map(String::as_str), Some("line number 99"));
    }

    #[test]
    fn sampler_marks_the_size_before_growth() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c-0.log");
        let mut s = Sampler::new(&log, 1 << 20);
        s.observe(1_000, 0);
        s.observe(3_000, 0); // no growth: no mark
        assert!(read_index(&index_path(&log)).is_empty());
        std::fs::write(&log, "a\nb\n").unwrap();
        s.observe(5_000, 4);
        assert_eq!(read_index(&index_path(&log)), [(3_000, 0)]);
        s.rotated(6_000);
        assert_eq!(read_index(&index_path(&rotated_path(&log))), [(3_000, 0)]);
        assert!(read_index(&index_path(&log)).is_empty());
        s.observe(8_000, 10);
        assert_eq!(read_index(&index_path(&log)), [(6_000, 0)]);
    }
}

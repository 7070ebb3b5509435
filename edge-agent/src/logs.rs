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
        let mut batch: Vec<u8> = Vec::new();
        for line in lines {
            let len = line.len() as u64 + 1;
            if self.size + batch.len() as u64 + len > self.max_bytes
                && self.size + batch.len() as u64 > 0
            {
                self.write_file(&batch);
                batch.clear();
                self.rotate();
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
}

//! Guest stdout and stderr: written synchronously into the replica's [`LogSink`], counted
//! against `spec.limits.logRate` by an [`OutputBudget`] (a flood traps the guest at once).

use super::limits::LimitExceeded;
use super::WasmRun;
use crate::logs::{LogSink, Stream};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Permit size handed to the guest's output streams (bytes per write).
pub(super) const OUTPUT_PERMIT: usize = 64 * 1024;

/// Output accounting for `spec.limits.logRate`: bytes written in the current window. A
/// window over its allowance marks the run, which the next epoch deadline stops.
#[derive(Debug)]
pub struct OutputBudget {
    per_window: u64,
    per_sec: u64,
    origin: Instant,
    window_start_ms: AtomicU64,
    bytes: AtomicU64,
    exceeded: std::sync::atomic::AtomicBool,
}

impl OutputBudget {
    pub(super) fn for_spec(spec: &WasmRun) -> Option<Arc<Self>> {
        let per_sec = spec.limits.log_bytes_per_sec?;
        let window = shoal_api::model::workload::RunLimits::LOG_WINDOW_SECS;
        Some(Arc::new(OutputBudget {
            per_window: per_sec.saturating_mul(window),
            per_sec,
            origin: Instant::now(),
            window_start_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            exceeded: Default::default(),
        }))
    }

    pub(super) fn add(&self, n: usize) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let window_ms = shoal_api::model::workload::RunLimits::LOG_WINDOW_SECS * 1000;
        if now.saturating_sub(self.window_start_ms.load(Ordering::Acquire)) >= window_ms {
            self.window_start_ms.store(now, Ordering::Release);
            self.bytes.store(0, Ordering::Release);
        }
        let total = self.bytes.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        if total > self.per_window {
            self.exceeded.store(true, Ordering::Release);
        }
    }

    pub(super) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }

    pub(super) fn error(&self) -> LimitExceeded {
        LimitExceeded::LogRate {
            per_sec: self.per_sec,
            window: shoal_api::model::workload::RunLimits::LOG_WINDOW_SECS,
        }
    }
}

/// Guest stdout or stderr, written synchronously into a [`LogSink`].
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub sink: LogSink,
    pub stream: Stream,
    /// `spec.limits.logRate` accounting, if limited.
    pub budget: Option<Arc<OutputBudget>>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(b) = &self.budget {
            b.add(buf.len());
            if b.exceeded() {
                return Poll::Ready(Err(std::io::Error::other(b.error().to_string())));
            }
        }
        self.sink.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        if let Some(b) = &self.budget {
            b.add(bytes.len());
            if b.exceeded() {
                // Stop the guest at once, not at the next deadline: a flood writes megabytes
                // in one tick.
                return Err(wasmtime_wasi::p2::StreamError::Trap(b.error().into()));
            }
        }
        self.sink.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

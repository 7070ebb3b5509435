//! CPU metering and shares: a [`Meter`] of the time a guest spends being polled, kept by
//! [`Metered`] around the guest's future (and added to the replica's usage), and the
//! [`Quota`] of a CPU share, checked at each epoch deadline: once a guest has run its share
//! of a [`CPU_PERIOD`] it sleeps off the rest.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The accounting period of CPU shares: with `cpu_millis = m`, a guest runs at most
/// `CPU_PERIOD * m / 1000` of every period.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Running time of one guest: wall time spent inside `poll` of its future.
pub(super) struct Meter {
    origin: Instant,
    /// Nanoseconds of finished polls.
    busy_nanos: AtomicU64,
    /// When the current poll started, in nanoseconds since `origin` plus one; 0: not polling.
    poll_start: AtomicU64,
}

impl Meter {
    pub(super) fn new() -> Self {
        Meter {
            origin: Instant::now(),
            busy_nanos: AtomicU64::new(0),
            poll_start: AtomicU64::new(0),
        }
    }

    pub(super) fn nanos_since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Busy time so far, including the poll in progress.
    pub(super) fn busy_at(&self, now: Instant) -> Duration {
        let mut nanos = self.busy_nanos.load(Ordering::Acquire);
        let start = self.poll_start.load(Ordering::Acquire);
        if start != 0 {
            nanos = nanos.saturating_add(self.nanos_since_origin(now).saturating_sub(start - 1));
        }
        Duration::from_nanos(nanos)
    }

    pub(super) fn busy(&self) -> Duration {
        self.busy_at(Instant::now())
    }
}

/// Wraps the guest's future, accounting the time spent in its `poll` to a [`Meter`].
pub(super) struct Metered<F: ?Sized> {
    pub(super) inner: Pin<Box<F>>,
    pub(super) meter: Arc<Meter>,
    /// The replica's running total, for `ps` and metrics.
    pub(super) usage: Arc<crate::runtime::Usage>,
}

impl<F: Future + ?Sized> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let start = Instant::now();
        let start_nanos = this.meter.nanos_since_origin(start);
        this.meter
            .poll_start
            .store(start_nanos.saturating_add(1), Ordering::Release);
        let result = this.inner.as_mut().poll(cx);
        let elapsed = this
            .meter
            .nanos_since_origin(Instant::now())
            .saturating_sub(start_nanos);
        this.meter.busy_nanos.fetch_add(elapsed, Ordering::AcqRel);
        this.meter.poll_start.store(0, Ordering::Release);
        this.usage.add_cpu(elapsed);
        result
    }
}

/// CPU share state, read and updated at each epoch deadline.
pub(super) struct Quota {
    /// Running time allowed per [`CPU_PERIOD`].
    budget: Duration,
    period_start: Instant,
    /// Busy time at the start of the period (less any overrun carried over).
    busy_at_start: Duration,
}

impl Quota {
    pub(super) fn new(cpu_millis: u32, now: Instant) -> Self {
        let millis = cpu_millis.clamp(1, 1000);
        Quota {
            budget: CPU_PERIOD * millis / 1000,
            period_start: now,
            busy_at_start: Duration::ZERO,
        }
    }

    /// `Some(wake)`: the budget of this period is used up; sleep until `wake`.
    pub(super) fn check(&mut self, busy: Duration, now: Instant) -> Option<Instant> {
        if now >= self.period_start + CPU_PERIOD {
            // New period; an overrun of the last one (the guest runs a whole tick between
            // checks) is charged to this one, at most one budget's worth.
            let used = busy.saturating_sub(self.busy_at_start);
            let overrun = used.saturating_sub(self.budget).min(self.budget);
            self.period_start = now;
            self.busy_at_start = busy.saturating_sub(overrun);
        }
        let used = busy.saturating_sub(self.busy_at_start);
        (used >= self.budget).then_some(self.period_start + CPU_PERIOD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_sleeps_once_the_budget_is_used() {
        let t0 = Instant::now();
        let mut q = Quota::new(100, t0);
        assert_eq!(q.budget, Duration::from_millis(10));
        let ms = Duration::from_millis;
        assert_eq!(q.check(ms(5), t0 + ms(5)), None);
        assert_eq!(q.check(ms(10), t0 + ms(12)), Some(t0 + CPU_PERIOD));
        // Next period: the 5 ms overrun is charged to it.
        let t1 = t0 + ms(101);
        assert_eq!(q.check(ms(15), t1), None);
        assert_eq!(q.check(ms(20), t1 + ms(5)), Some(t1 + CPU_PERIOD));
    }
}

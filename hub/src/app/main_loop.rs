//! The main loop: `select!` over events, handle each, commit per batch (the fleet's writes,
//! flush, then publish). The only place the hub's store is written ([`MainLoop::persist`]).

use super::*;
use crate::app::command::{Bus, BusEvent};
use crate::fleet::Fleet;
use crate::store::Store;
use shoal_api::model::ids::DeviceId;
use shoal_api::wire::discovery::AgentAd;
use shoal_api::wire::messages::DesiredState;
use shoal_daemon::clock::now_ms;
use shoal_daemon::mdns::MdnsEvent;
use tokio_util::sync::CancellationToken;
use tracing::warn;

impl<S: Store, B: Bus> MainLoop<S, B> {
    pub(super) fn new(core: Fleet, p: Parts<B>, role: Role<S>) -> Self {
        let mut publisher = p.publisher;
        // A new leader reads every key afresh (a standby seals nothing, but say so).
        publisher.keys = Default::default();
        // And records a snapshot of the fleet at once.
        let mut views = p.views;
        views.changed = true;
        views.last_snapshot = None;
        MainLoop {
            core,
            role,
            publisher,
            views,
            settings: p.settings,
            blobs: p.blobs,
            metrics: p.metrics,
            outbox: Vec::new(),
            rollout_due: false,
            logs: p.logs,
            ingest: p.ingest,
        }
    }

    pub(super) fn into_parts(self) -> (Fleet, Parts<B>) {
        let p = Parts {
            publisher: self.publisher,
            views: self.views,
            settings: self.settings,
            blobs: self.blobs,
            metrics: self.metrics,
            logs: self.logs,
            ingest: self.ingest,
        };
        (self.core, p)
    }

    /// Handles events until `shutdown` (`None`) or until `until` is ready (its output).
    pub(super) async fn run<R>(
        &mut self,
        chans: &mut Channels,
        shutdown: &CancellationToken,
        until: impl std::future::Future<Output = R>,
    ) -> Option<R> {
        tokio::pin!(until);
        // Often enough that a lost device is noticed within a second of its grace period.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(
            (self.settings.grace_ms / 4).clamp(50, 1000),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rollout_tick =
            tokio::time::interval(std::time::Duration::from_millis(ROLLOUT_BATCH_MS));
        rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relay_tick =
            tokio::time::interval(std::time::Duration::from_millis(RELAY_BATCH_MS));
        relay_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let relay_due = self.ingest.as_ref().is_some_and(|i| !i.relay.is_empty());
            let event = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = &mut until => return Some(r),
                Some(e) = chans.bus.recv() => Event::Bus(e),
                Some(r) = chans.requests.recv() => Event::Http(r),
                Some(m) = chans.mdns.recv() => Event::Mdns(m),
                Some(a) = chans.book.recv() => Event::Book(a),
                _ = tick.tick() => Event::Tick,
                _ = rollout_tick.tick(), if self.rollout_due => Event::RolloutTick,
                _ = relay_tick.tick(), if relay_due => Event::RelayTick,
            };
            self.handle(event).await;
            // Group commit: handle whatever else the bus has ready (bounded), then flush
            // once and publish everything those events changed.
            for _ in 0..BATCH {
                match chans.bus.try_recv() {
                    Ok(e) => self.handle(Event::Bus(e)).await,
                    Err(_) => break,
                }
            }
            self.commit().await;
        }
    }

    /// Flushes the store, then publishes the queued desired states (the newest per device).
    /// `false` if the store could not be flushed: nothing is published then (the queue is
    /// kept for the next commit), and whoever asked must not be told it worked.
    pub(super) async fn commit(&mut self) -> bool {
        if self.is_standby() {
            // The leader writes and publishes.
            self.core.take_writes();
            self.outbox.clear();
            return true;
        }
        // Always flush: an accepted apply is acknowledged right after, even when it changes
        // no device (sled's flush is cheap when nothing is dirty).
        if let Err(e) = self.persist() {
            // Not durable: do not tell devices (they would act on state a crash could lose).
            warn!(error = %e, "cannot flush the hub store; desired states held back");
            if let (crate::store::StoreError::Fenced { .. }, Role::Leader(w)) = (&e, &self.role) {
                if let Some(lost) = &w.lost {
                    lost.cancel();
                }
            }
            return false;
        }
        let mut newest: std::collections::BTreeMap<DeviceId, DesiredState> =
            std::collections::BTreeMap::new();
        for d in self.outbox.drain(..) {
            match newest.get(&d.device_id) {
                Some(have) if have.generation >= d.generation => {}
                _ => {
                    newest.insert(d.device_id.clone(), d);
                }
            }
        }
        self.send_desired(newest.into_values().collect()).await;
        true
    }

    /// Writes what the fleet changed to the store and flushes: durable from here on. The
    /// only place the hub's store is written (a standby's loop never calls it).
    pub(super) fn persist(&mut self) -> Result<(), crate::store::StoreError> {
        let writes = self.core.take_writes();
        let Role::Leader(w) = &mut self.role else {
            return Err(crate::store::StoreError::Standby);
        };
        // After a refusal the memory is ahead of the store, and nothing is published (see
        // `commit`) until a later commit has written the rest.
        w.unwritten.write(writes, &w.store)?;
        w.store.flush()
    }

    /// Whether this loop stands by (reads only, see [`Role`]).
    pub(super) fn is_standby(&self) -> bool {
        matches!(self.role, Role::Standby(_))
    }

    /// [`MainLoop::persist`] for an answer: the store's error is logged, the caller told
    /// the change is not durable.
    pub(super) fn persisted(&mut self) -> Result<(), NotDurable> {
        self.persist().map_err(|e| {
            warn!(error = %e, "cannot make a change durable");
            NotDurable
        })
    }

    /// Runs one of the fleet's inputs, and times the scheduler runs it caused for the
    /// metrics (the fleet reads no clock).
    pub(super) fn fleet<R>(&mut self, input: impl FnOnce(&mut Fleet) -> R) -> R {
        let started = std::time::Instant::now();
        let r = input(&mut self.core);
        let runs = self.core.take_scheduling_runs();
        if !runs.is_empty() {
            self.metrics.scheduled(&runs, started.elapsed());
        }
        r
    }

    /// Queues desired states for the next commit (bus events, handled in batches).
    pub(super) fn queue(&mut self, states: Vec<DesiredState>) {
        self.outbox.extend(states);
    }

    /// Queues desired states and commits at once (requests answered right after);
    /// `false`: not durable, see [`MainLoop::commit`].
    pub(super) async fn publish_desired(&mut self, states: Vec<DesiredState>) -> bool {
        self.queue(states);
        self.commit().await
    }

    pub(super) async fn handle(&mut self, event: Event) {
        match &event {
            Event::Tick | Event::RolloutTick | Event::RelayTick => {}
            // A key changes nothing in the fleet; a grant may change labels.
            Event::Book(crate::app::command::BookAnswer::Key { .. }) => {}
            Event::Http(r) if r.reads_only() => {}
            // Log lines change nothing in the fleet.
            Event::Bus(BusEvent::Logs(_)) => {}
            _ => self.views.changed = true,
        }
        if self.is_standby() {
            return self.stand_by(event).await;
        }
        match event {
            Event::Bus(BusEvent::Connected) => {
                // The broker may have lost retained desired states (e.g. the embedded broker
                // after a hub restart): publish them all again. Agents ignore generations they
                // already have.
                let all = self.core.all_desired();
                self.publish_desired(all).await;
            }
            Event::Bus(e) => self.on_message(e).await,
            Event::Http(r) => self.on_request(r).await,
            Event::RelayTick => self.relay().await,
            Event::RolloutTick => {
                self.rollout_due = false;
                self.advance_rollouts().await;
            }
            Event::Book(answer) => self.on_book(answer).await,
            Event::Tick => {
                let grace = self.settings.grace_ms;
                self.publisher.keys.prune(now_ms());
                self.read_keys(); // failed reads, due again
                let publish = self.fleet(|f| f.check_lost(now_ms(), grace));
                self.publish_desired(publish).await;
                // Readiness periods, deadlines and jobs' lifetimes pass with time, not
                // only with reports.
                if self.core.rolling() || self.core.draining() || self.core.has_jobs() {
                    self.advance_rollouts().await;
                }
                self.record_events(false);
                let due = self.logs.tick(now_ms());
                self.publish_log_requests(due).await;
            }
            Event::Mdns(MdnsEvent::Resolved(r)) => match AgentAd::from_txt(&r.fullname, &r.txt) {
                Ok(ad) if ad.fleet == self.settings.fleet => {
                    self.core.mdns_seen(r.fullname, ad.device, r.addrs)
                }
                Ok(_) => {} // another fleet's device
                Err(e) => warn!(error = %e, "agent advertisement ignored"),
            },
            Event::Mdns(MdnsEvent::Removed { fullname, .. }) => self.core.mdns_gone(&fullname),
        }
    }

    /// Publishes what a delete or device action changed: `Ok(false)` when its target does
    /// not exist, `Err` when it could not be made durable.
    pub(super) async fn published(
        &mut self,
        r: Option<Vec<DesiredState>>,
    ) -> Result<bool, NotDurable> {
        match r {
            Some(publish) => match self.publish_desired(publish).await {
                true => Ok(true),
                false => Err(NotDurable),
            },
            None => Ok(false),
        }
    }

    /// Publishes what an operator command changed, once durable.
    pub(super) async fn command<R>(
        &mut self,
        r: Result<Vec<DesiredState>, R>,
    ) -> Result<(), Failed<R>> {
        let publish = r.map_err(Failed::Refused)?;
        match self.publish_desired(publish).await {
            true => Ok(()),
            false => Err(NotDurable.into()),
        }
    }

    /// Steps rollouts, jobs and drains on what devices reported.
    pub(super) async fn advance_rollouts(&mut self) {
        let publish = self.fleet(|f| f.advance_rollouts(now_ms()));
        self.publish_desired(publish).await;
        if self.core.has_jobs() {
            let publish = self.fleet(|f| f.advance_jobs(now_ms()));
            self.publish_desired(publish).await;
        }
        if self.core.draining() {
            let publish = self.fleet(|f| f.advance_drains());
            self.publish_desired(publish).await;
        }
    }

    /// Records `change` in the audit log, durably, and returns its number.
    pub(super) fn record_audit(
        &mut self,
        change: crate::fleet::audit::Change,
    ) -> Result<u64, NotDurable> {
        let e = self.core.record_audit(change, now_ms());
        self.persisted()?;
        Ok(e.seq)
    }
}

//! Which hub the agent uses. mDNS only proposes: [`super::Directory::hub_choice`] gives the
//! candidates, best first. A candidate is used once the agent has authenticated it (TLS
//! against the fleet CA this device enrolled with, for the hub's names), one candidate at a
//! time. What the operator gave (`--broker`, `--hub`, from flags, environment or config
//! file) is never replaced: a pinned part is left out of every [`Target`].
//!
//! Authentication proves a hub's certificate, not that the path to it stays open: a LAN
//! host can advertise the fleet under a smaller name with the real `ca` hash and relay TCP
//! to the real hub while it is probed, then stop. So the choice is **sticky**: while the
//! hub in use works (the bus is connected, or was less than [`DOWN_MS`] ago, or the hub was
//! chosen less than [`DOWN_MS`] ago), no candidate is probed or used, however it ranks.
//! Once it has been unreachable for [`DOWN_MS`], the last hub the bus was connected to is
//! tried first (at the address it worked at, advertised or not), then the other candidates.
//!
//! Probes are rate-limited per instance: at most one per [`PROBE_EVERY_MS`] whatever its
//! record does, and one that failed is skipped for [`RETRY_MS`] while its record stays.
//! Among the candidates due, the one waiting longest (since it was last probed, or first
//! seen) goes first, the best-ranked among equals: an instance that keeps changing its
//! record, or new names that sort first, cannot keep the others from being probed.
//!
//! Pure, time is a parameter: the agent's main loop runs the probes a [`Step::Probe`] asks
//! for and reports how they went with [`HubLink::probed`], reports the bus with
//! [`HubLink::connected`] and [`HubLink::disconnected`], and asks [`HubLink::next`] again
//! after a [`Step::Use`] and every few seconds.

use shoal_api::wire::discovery::SelectedHub;
use shoal_api::wire::endpoint::BrokerUrl;
use std::collections::BTreeMap;

/// How long a candidate that failed authentication is skipped (unless its record changes).
pub const RETRY_MS: u64 = 60_000;
/// At most one probe of an instance per this long, even when its record changes.
pub const PROBE_EVERY_MS: u64 = 30_000;
/// How long the hub in use may be unreachable (the bus disconnected, or not connected yet
/// since it was chosen) before another is tried.
pub const DOWN_MS: u64 = 15_000;

/// What the operator gave: those parts never come from mDNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pins {
    /// `--broker`.
    pub broker: bool,
    /// `--hub`: the HTTP API (enrollment, renewal, module downloads).
    pub http: bool,
}

/// A hub as the agent would point at it: its mDNS instance and the parts not pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub instance: String,
    /// The broker to connect to; `None` when `--broker` pins it.
    pub broker: Option<BrokerUrl>,
    /// The HTTP API (renewal, module downloads); `None` when `--hub` pins it.
    pub http: Option<String>,
}

/// What the agent should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: the hub in use works, a probe is under way, or no candidate is due (the hub
    /// in use, if any, stays: a hub that withdrew is retried at its last address).
    Wait,
    /// Authenticate this candidate, then report with [`HubLink::probed`].
    Probe(Target),
    /// Point the agent's connections at this hub (authenticated, unless the agent does not
    /// authenticate).
    Use(Target),
}

/// How the probe of a candidate went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Authenticated,
    /// Not authenticated (unreachable, another CA, not the hub's name), with why.
    Failed(String),
}

#[derive(Debug, Clone)]
struct Failure {
    target: Target,
    at_ms: u64,
    reason: String,
}

/// What is known of one instance.
#[derive(Debug, Clone)]
struct Seen {
    /// When it was first advertised.
    since_ms: u64,
    /// When it was last probed (or, by an agent that does not authenticate, used).
    probed_ms: Option<u64>,
    /// Its record that last failed authentication.
    failure: Option<Failure>,
}

impl Seen {
    /// Whether `t` (a record of this instance) may be probed at `now_ms`.
    fn due(&self, t: &Target, now_ms: u64) -> bool {
        let limited = self
            .probed_ms
            .is_some_and(|p| now_ms < p.saturating_add(PROBE_EVERY_MS));
        let failed = self
            .failure
            .as_ref()
            .is_some_and(|f| &f.target == t && now_ms < f.at_ms.saturating_add(RETRY_MS));
        !limited && !failed
    }

    /// Since when it waits for a probe (the oldest goes first).
    fn waiting_since(&self) -> u64 {
        self.probed_ms.unwrap_or(self.since_ms)
    }
}

/// The agent's choice of hub over time.
#[derive(Debug, Clone)]
pub struct HubLink {
    pins: Pins,
    authenticate: bool,
    /// The hub in use.
    current: Option<Target>,
    /// When it was chosen.
    used_ms: u64,
    /// The last hub the bus was connected to (a fall-back proven to work).
    good: Option<Target>,
    /// Since when the bus is not connected; `None` while it is.
    down_since_ms: Option<u64>,
    /// The candidate being authenticated, and since when.
    probing: Option<(Target, u64)>,
    /// Instances advertised, or probed less than [`PROBE_EVERY_MS`] ago.
    seen: BTreeMap<String, Seen>,
}

impl HubLink {
    /// `authenticate`: candidates must be authenticated before use (`false` only for an
    /// `--insecure` agent, which has nothing to authenticate them with).
    pub fn new(pins: Pins, authenticate: bool) -> Self {
        Self {
            pins,
            authenticate,
            current: None,
            used_ms: 0,
            good: None,
            down_since_ms: Some(0),
            probing: None,
            seen: BTreeMap::new(),
        }
    }

    /// The hub in use (found over mDNS; `None` before one was authenticated).
    pub fn current(&self) -> Option<&Target> {
        self.current.as_ref()
    }

    /// The last hub the bus was connected to.
    pub fn last_good(&self) -> Option<&Target> {
        self.good.as_ref()
    }

    /// The candidate being authenticated.
    pub fn probing(&self) -> Option<&Target> {
        self.probing.as_ref().map(|(t, _)| t)
    }

    /// The record of `instance` that last failed authentication, and why.
    pub fn failure(&self, instance: &str) -> Option<(&Target, &str)> {
        self.seen
            .get(instance)
            .and_then(|s| s.failure.as_ref())
            .map(|f| (&f.target, f.reason.as_str()))
    }

    /// The bus is connected: the hub in use works (and, if it gave the broker, is the one to
    /// fall back to later).
    pub fn connected(&mut self) {
        self.down_since_ms = None;
        if let Some(c) = self.current.as_ref().filter(|c| c.broker.is_some()) {
            self.good = Some(c.clone());
        }
    }

    /// The bus lost its connection, or could not make one.
    pub fn disconnected(&mut self, now_ms: u64) {
        self.down_since_ms.get_or_insert(now_ms);
    }

    /// Whether the hub in use works, or may still: it was chosen, or the bus was
    /// connected, less than [`DOWN_MS`] ago.
    fn current_holds(&self, now_ms: u64) -> bool {
        self.current.is_some()
            && self
                .down_since_ms
                .is_none_or(|d| now_ms < d.max(self.used_ms).saturating_add(DOWN_MS))
    }

    fn target(&self, hub: &SelectedHub) -> Target {
        Target {
            instance: hub.instance.clone(),
            broker: (!self.pins.broker).then(|| hub.broker.clone()),
            http: (!self.pins.http).then(|| hub.http.clone()),
        }
    }

    /// Whether `t` may be probed (or used) now: not the hub in use, and due.
    fn due(&self, t: &Target, now_ms: u64) -> bool {
        self.current.as_ref() != Some(t)
            && self.seen.get(&t.instance).is_none_or(|s| s.due(t, now_ms))
    }

    /// The next step, given the candidates (best first). While the hub in use holds (see
    /// the module docs), or a probe is under way, nothing. Otherwise the last hub the bus
    /// was connected to, if due, else the due candidate waiting longest, is probed (or used
    /// at once by an agent that does not authenticate).
    pub fn next(&mut self, candidates: &[SelectedHub], now_ms: u64) -> Step {
        self.track(candidates, now_ms);
        if self
            .probing
            .as_ref()
            .is_some_and(|(_, at)| now_ms >= at.saturating_add(PROBE_EVERY_MS))
        {
            // A report this late is not waited for (it will be stale).
            self.probing = None;
        }
        if (self.pins.broker && self.pins.http)
            || self.probing.is_some()
            || self.current_holds(now_ms)
        {
            return Step::Wait;
        }
        let fallback = self.good.clone().filter(|g| self.due(g, now_ms));
        let pick = fallback.or_else(|| {
            candidates
                .iter()
                .enumerate()
                .map(|(rank, hub)| (rank, self.target(hub)))
                .filter(|(_, t)| self.due(t, now_ms))
                .min_by_key(|(rank, t)| {
                    let waiting = self
                        .seen
                        .get(&t.instance)
                        .map_or(now_ms, Seen::waiting_since);
                    (waiting, *rank)
                })
                .map(|(_, t)| t)
        });
        let Some(t) = pick else {
            return Step::Wait;
        };
        self.seen
            .entry(t.instance.clone())
            .or_insert(Seen {
                since_ms: now_ms,
                probed_ms: None,
                failure: None,
            })
            .probed_ms = Some(now_ms);
        if !self.authenticate {
            self.use_target(&t, now_ms);
            return Step::Use(t);
        }
        self.probing = Some((t.clone(), now_ms));
        Step::Probe(t)
    }

    /// Notes new instances; forgets those neither advertised nor probed less than
    /// [`PROBE_EVERY_MS`] ago (so their number stays bounded, and withdrawing a record and
    /// advertising it again does not get it probed sooner).
    fn track(&mut self, candidates: &[SelectedHub], now_ms: u64) {
        self.seen.retain(|i, s| {
            candidates.iter().any(|c| &c.instance == i)
                || s.probed_ms
                    .is_some_and(|p| now_ms < p.saturating_add(PROBE_EVERY_MS))
        });
        for c in candidates {
            self.seen.entry(c.instance.clone()).or_insert(Seen {
                since_ms: now_ms,
                probed_ms: None,
                failure: None,
            });
        }
    }

    fn use_target(&mut self, t: &Target, now_ms: u64) {
        let old_broker = self.current.as_ref().and_then(|c| c.broker.as_ref());
        if t.broker.is_some() && t.broker.as_ref() != old_broker {
            // The bus reconnects: the new hub works once it says so.
            self.down_since_ms = Some(now_ms);
        }
        self.current = Some(t.clone());
        self.used_ms = now_ms;
    }

    /// Records how the probe of `target` went. Authenticated: used, unless the hub in use
    /// came back meanwhile (it stays). Failed: skipped, and the next due candidate is
    /// probed. The report of a probe not asked for (stale) changes nothing.
    pub fn probed(
        &mut self,
        target: &Target,
        probe: Probe,
        candidates: &[SelectedHub],
        now_ms: u64,
    ) -> Step {
        if self.probing().is_none_or(|p| p != target) {
            return Step::Wait;
        }
        self.probing = None;
        let seen = self.seen.entry(target.instance.clone()).or_insert(Seen {
            since_ms: now_ms,
            probed_ms: Some(now_ms),
            failure: None,
        });
        match probe {
            Probe::Authenticated => {
                seen.failure = None;
                if self.current_holds(now_ms) {
                    return Step::Wait;
                }
                self.use_target(target, now_ms);
                Step::Use(target.clone())
            }
            Probe::Failed(reason) => {
                seen.failure = Some(Failure {
                    target: target.clone(),
                    at_ms: now_ms,
                    reason,
                });
                self.next(candidates, now_ms)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, addr: &str) -> SelectedHub {
        SelectedHub {
            instance: name.into(),
            broker: format!("mqtts://{addr}:8883").parse().unwrap(),
            http: format!("https://{addr}:8080"),
            pins_ca: true,
        }
    }

    fn target(h: &SelectedHub) -> Target {
        Target {
            instance: h.instance.clone(),
            broker: Some(h.broker.clone()),
            http: Some(h.http.clone()),
        }
    }

    const S: u64 = 1_000;

    /// What happens to the link, one input at a time (each at a time, in ms).
    enum In<'a> {
        /// `next` with these candidates.
        Next(&'a [SelectedHub], u64),
        /// The probe under way went so (with these candidates).
        Probed(Probe, &'a [SelectedHub], u64),
        /// The bus connected.
        Up,
        /// The bus disconnected (no step: `Wait` is expected).
        Down(u64),
    }

    /// Feeds `inputs` to `link`, checking each step and the hub in use after it.
    fn run(link: &mut HubLink, script: &[(In, Step, Option<&SelectedHub>)]) {
        for (i, (input, want, using)) in script.iter().enumerate() {
            let got = match input {
                In::Next(c, now) => link.next(c, *now),
                In::Probed(p, c, now) => {
                    let t = link.probing().cloned().expect("a probe under way");
                    link.probed(&t, p.clone(), c, *now)
                }
                In::Up => {
                    link.connected();
                    Step::Wait
                }
                In::Down(now) => {
                    link.disconnected(*now);
                    Step::Wait
                }
            };
            assert_eq!(&got, want, "step {i}");
            assert_eq!(link.current(), using.map(target).as_ref(), "step {i}");
        }
    }

    fn no() -> Probe {
        Probe::Failed("invalid peer certificate: UnknownIssuer".into())
    }

    /// A link using `real`, its bus connected at `now`.
    fn connected_to(real: &SelectedHub, now: u64) -> HubLink {
        let mut link = HubLink::new(Pins::default(), true);
        let only = std::slice::from_ref(real);
        assert_eq!(link.next(only, now), Step::Probe(target(real)));
        assert_eq!(
            link.probed(&target(real), Probe::Authenticated, only, now),
            Step::Use(target(real))
        );
        link.connected();
        link
    }

    #[test]
    fn a_working_hub_is_never_left_for_a_better_ranked_one() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let relay = hub("farm-a-relay", "10.0.0.3");
        let better = hub("farm-hub-0", "10.0.0.5");
        let all = [relay.clone(), better.clone(), real.clone()];
        let mut link = connected_to(&real, 0);
        let mut moved = relay.clone();
        let mut script = Vec::new();
        // Better-ranked candidates, however their records change, are not even probed.
        for n in 1..40u64 {
            moved.broker = format!("mqtts://10.0.1.{n}:8883").parse().unwrap();
            script.push((n * S, [moved.clone(), better.clone(), real.clone()]));
        }
        for (now, c) in &script {
            assert_eq!(link.next(c, *now), Step::Wait, "at {now}");
            assert_eq!(link.current(), Some(&target(&real)));
        }
        // A short outage (under DOWN_MS) changes nothing either.
        run(
            &mut link,
            &[
                (In::Down(100 * S), Step::Wait, Some(&real)),
                (
                    In::Next(&all, 100 * S + DOWN_MS - 1),
                    Step::Wait,
                    Some(&real),
                ),
                (In::Up, Step::Wait, Some(&real)),
                (In::Next(&all, 200 * S), Step::Wait, Some(&real)),
            ],
        );
    }

    /// The relay of the review: it advertises the fleet under a name that sorts first with
    /// the real `ca` hash, relays TCP to the real hub while probed, then stops forwarding.
    #[test]
    fn a_relay_that_goes_quiet_is_left_for_the_last_hub_that_worked() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let relay = hub("farm-a-relay", "10.0.0.3");
        let both = [relay.clone(), real.clone()];
        let mut link = connected_to(&real, 0);
        let t = 100 * S;
        run(
            &mut link,
            &[
                // Connected: the relay is not probed.
                (In::Next(&both, t), Step::Wait, Some(&real)),
                // The real hub is unreachable (a restart) for longer than DOWN_MS: the
                // relay, waiting longest, is probed and passes (it relays).
                (In::Down(t), Step::Wait, Some(&real)),
                (In::Next(&both, t + DOWN_MS - 1), Step::Wait, Some(&real)),
                (
                    In::Next(&both, t + DOWN_MS),
                    Step::Probe(target(&relay)),
                    Some(&real),
                ),
                (
                    In::Probed(Probe::Authenticated, &both, t + DOWN_MS + 1),
                    Step::Use(target(&relay)),
                    Some(&relay),
                ),
                // The relay stops forwarding: the bus never connects. A fresh grace…
                (In::Next(&both, t + 2 * DOWN_MS), Step::Wait, Some(&relay)),
                // …then the last hub that worked, though the relay ranks first.
                (
                    In::Next(&both, t + 2 * DOWN_MS + 1),
                    Step::Probe(target(&real)),
                    Some(&relay),
                ),
                (
                    In::Probed(Probe::Authenticated, &both, t + 2 * DOWN_MS + 2),
                    Step::Use(target(&real)),
                    Some(&real),
                ),
                (In::Up, Step::Wait, Some(&real)),
                // And there it stays.
                (In::Next(&both, t + 10 * DOWN_MS), Step::Wait, Some(&real)),
            ],
        );
        assert_eq!(link.last_good(), Some(&target(&real)));
    }

    #[test]
    fn a_relay_withdrawing_the_real_record_does_not_hide_the_fallback() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let relay = hub("farm-a-relay", "10.0.0.3");
        let both = [relay.clone(), real.clone()];
        let only_relay = std::slice::from_ref(&relay);
        let mut link = connected_to(&real, 0);
        let t = 100 * S;
        run(
            &mut link,
            &[
                (In::Down(t), Step::Wait, Some(&real)),
                (
                    In::Next(&both, t + DOWN_MS),
                    Step::Probe(target(&relay)),
                    Some(&real),
                ),
                (
                    In::Probed(Probe::Authenticated, &both, t + DOWN_MS),
                    Step::Use(target(&relay)),
                    Some(&relay),
                ),
                // The real hub's record is gone (a forged goodbye): it is still tried, at
                // the address where it worked.
                (
                    In::Next(only_relay, t + 2 * DOWN_MS),
                    Step::Probe(target(&real)),
                    Some(&relay),
                ),
                (
                    In::Probed(Probe::Authenticated, only_relay, t + 2 * DOWN_MS),
                    Step::Use(target(&real)),
                    Some(&real),
                ),
            ],
        );
    }

    #[test]
    fn a_probe_that_ends_after_the_hub_came_back_changes_nothing() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let relay = hub("farm-a-relay", "10.0.0.3");
        let both = [relay.clone(), real.clone()];
        let mut link = connected_to(&real, 0);
        run(
            &mut link,
            &[
                (In::Down(S), Step::Wait, Some(&real)),
                (
                    In::Next(&both, S + DOWN_MS),
                    Step::Probe(target(&relay)),
                    Some(&real),
                ),
                (In::Up, Step::Wait, Some(&real)),
                (
                    In::Probed(Probe::Authenticated, &both, S + DOWN_MS + 2),
                    Step::Wait,
                    Some(&real),
                ),
            ],
        );
        assert!(link.probing().is_none());
    }

    /// The starvation of the review: records that keep changing, and names that sort
    /// first, do not keep a fresh agent from probing the real hub, which sorts last.
    #[test]
    fn churning_records_do_not_starve_the_other_candidates() {
        let real = hub("farm-hub-z", "10.0.0.1");
        let rogue = |n: u64| hub("farm-a-rogue", &format!("10.0.1.{n}"));
        let mut link = HubLink::new(Pins::default(), true);
        // (candidates, time, what is probed)
        let mut probed = Vec::new();
        let mut now = 0;
        for n in 0..8u64 {
            let candidates = [rogue(n), real.clone()];
            let mut step = link.next(&candidates, now);
            while let Step::Probe(t) = step {
                probed.push(t.instance.clone());
                now += 5 * S; // the probe times out
                let ok = if t.instance == real.instance {
                    Probe::Authenticated
                } else {
                    no()
                };
                step = link.probed(&t, ok, &candidates, now);
            }
            if let Step::Use(t) = step {
                assert_eq!(t, target(&real));
                break;
            }
            now += S; // the next record
        }
        assert_eq!(probed, ["farm-a-rogue", "farm-hub-z"]);
        assert_eq!(link.current(), Some(&target(&real)));
    }

    #[test]
    fn new_names_that_sort_first_wait_their_turn() {
        let real = hub("farm-hub-z", "10.0.0.1");
        let mut link = HubLink::new(Pins::default(), true);
        let mut candidates = vec![hub("farm-a-0", "10.0.1.0"), real.clone()];
        // Both seen at once: the better-ranked goes first.
        assert_eq!(
            link.next(&candidates, 0),
            Step::Probe(target(&candidates[0]))
        );
        // While it is probed, another name that sorts first appears: it waits behind the
        // real hub, seen earlier.
        candidates.insert(0, hub("farm-a-00", "10.0.1.1"));
        assert_eq!(link.next(&candidates, 3 * S), Step::Wait);
        let t = link.probing().cloned().unwrap();
        assert_eq!(
            link.probed(&t, no(), &candidates, 5 * S),
            Step::Probe(target(&real))
        );
    }

    #[test]
    fn each_instance_is_probed_at_most_once_per_period() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let moved = hub("farm-a-rogue", "10.0.0.4");
        let both = [rogue.clone(), real.clone()];
        let both_moved = [moved.clone(), real.clone()];
        let mut link = HubLink::new(Pins::default(), true);
        run(
            &mut link,
            &[
                (In::Next(&both, 0), Step::Probe(target(&rogue)), None),
                // The real hub is unreachable too, for now.
                (In::Probed(no(), &both, 1), Step::Probe(target(&real)), None),
                (In::Probed(no(), &both, 2), Step::Wait, None),
                // A changed record is not probed sooner than PROBE_EVERY_MS…
                (In::Next(&both_moved, 3), Step::Wait, None),
                (In::Next(&both_moved, PROBE_EVERY_MS - 1), Step::Wait, None),
                (
                    In::Next(&both_moved, PROBE_EVERY_MS),
                    Step::Probe(target(&moved)),
                    None,
                ),
                (
                    In::Probed(no(), &both_moved, PROBE_EVERY_MS),
                    Step::Wait,
                    None,
                ),
                // …the same record that failed, not sooner than RETRY_MS.
                (In::Next(&both_moved, RETRY_MS + 1), Step::Wait, None),
                (
                    In::Next(&both_moved, RETRY_MS + 2),
                    Step::Probe(target(&real)),
                    None,
                ),
                (
                    In::Probed(Probe::Authenticated, &both_moved, RETRY_MS + 3),
                    Step::Use(target(&real)),
                    Some(&real),
                ),
            ],
        );
        // Withdrawing a record and advertising it again does not reset the period.
        let mut link = HubLink::new(Pins::default(), true);
        let only_rogue = std::slice::from_ref(&rogue);
        assert_eq!(link.next(only_rogue, 0), Step::Probe(target(&rogue)));
        assert_eq!(
            link.probed(&target(&rogue), no(), only_rogue, 1),
            Step::Wait
        );
        assert_eq!(link.next(&[], 2), Step::Wait);
        let only_moved = std::slice::from_ref(&moved);
        assert_eq!(link.next(only_moved, 3), Step::Wait);
        assert_eq!(
            link.next(only_moved, PROBE_EVERY_MS),
            Step::Probe(target(&moved))
        );
    }

    /// Whether the hub in use is left, by how long the bus has been down and whether it
    /// was ever connected.
    #[test]
    fn when_the_hub_in_use_is_left() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let other = hub("farm-hub-b", "10.0.0.2");
        let both = [real.clone(), other.clone()];
        // (bus connected after use, went down at, asked at, probes the other)
        let cases = [
            (true, None, 10 * DOWN_MS, false),
            (true, Some(S), S + DOWN_MS - 1, false),
            (true, Some(S), S + DOWN_MS, true),
            // Never connected since it was chosen (at 0).
            (false, None, DOWN_MS - 1, false),
            (false, None, DOWN_MS, true),
        ];
        for (up, down, at, leaves) in cases {
            let mut link = HubLink::new(Pins::default(), true);
            let only = std::slice::from_ref(&real);
            assert_eq!(link.next(only, 0), Step::Probe(target(&real)));
            link.probed(&target(&real), Probe::Authenticated, only, 0);
            if up {
                link.connected();
            }
            if let Some(d) = down {
                link.disconnected(d);
            }
            let want = if leaves {
                Step::Probe(target(&other))
            } else {
                Step::Wait
            };
            assert_eq!(link.next(&both, at), want, "{up} {down:?} {at}");
            assert_eq!(link.current(), Some(&target(&real)));
        }
    }

    #[test]
    fn a_hub_that_moved_is_followed_once_its_old_address_is_dead() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let moved = hub("farm-hub-a", "10.0.0.9");
        let only_moved = std::slice::from_ref(&moved);
        let mut link = connected_to(&real, 0);
        let t = 100 * S;
        run(
            &mut link,
            &[
                (In::Down(t), Step::Wait, Some(&real)),
                (In::Next(only_moved, t + 1), Step::Wait, Some(&real)),
                (
                    In::Next(only_moved, t + DOWN_MS),
                    Step::Probe(target(&moved)),
                    Some(&real),
                ),
                (
                    In::Probed(Probe::Authenticated, only_moved, t + DOWN_MS),
                    Step::Use(target(&moved)),
                    Some(&moved),
                ),
                (In::Up, Step::Wait, Some(&moved)),
            ],
        );
        // A hub that withdrew with nothing else about: still used, at its last address.
        let mut link = connected_to(&real, 0);
        link.disconnected(S);
        assert_eq!(link.next(&[], 10 * DOWN_MS), Step::Wait);
        assert_eq!(link.current(), Some(&target(&real)));
    }

    #[test]
    fn what_the_operator_pinned_is_never_replaced() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let both = [rogue.clone(), real.clone()];
        // (pins, the target mDNS may propose for the real hub)
        let cases = [
            (
                Pins {
                    broker: true,
                    http: false,
                },
                Some(Target {
                    instance: real.instance.clone(),
                    broker: None,
                    http: Some(real.http.clone()),
                }),
            ),
            (
                Pins {
                    broker: false,
                    http: true,
                },
                Some(Target {
                    instance: real.instance.clone(),
                    broker: Some(real.broker.clone()),
                    http: None,
                }),
            ),
            (
                Pins {
                    broker: true,
                    http: true,
                },
                None,
            ),
        ];
        for (pins, want) in cases {
            let mut link = HubLink::new(pins, true);
            let mut used = Vec::new();
            let mut step = link.next(&both, 0);
            // Every step for a long while, the bus down throughout.
            for now in (1..20).map(|n| n * PROBE_EVERY_MS) {
                step = match step {
                    Step::Probe(t) => {
                        let ok = if t.instance == real.instance {
                            Probe::Authenticated
                        } else {
                            Probe::Failed("no".into())
                        };
                        link.probed(&t, ok, &both, now)
                    }
                    Step::Use(t) => {
                        used.push(t);
                        link.next(&both, now)
                    }
                    Step::Wait => link.next(&both, now),
                };
            }
            used.dedup();
            assert_eq!(used, want.into_iter().collect::<Vec<_>>(), "{pins:?}");
            for t in &used {
                assert!(t.broker.is_none() || !pins.broker, "{pins:?}");
                assert!(t.http.is_none() || !pins.http, "{pins:?}");
            }
        }
    }

    #[test]
    fn an_insecure_agent_uses_a_candidate_at_once_and_sticks_to_it() {
        let a = hub("farm-a", "10.0.0.1");
        let b = hub("farm-b", "10.0.0.2");
        let mut link = HubLink::new(Pins::default(), false);
        let both = [a.clone(), b.clone()];
        run(
            &mut link,
            &[
                (
                    In::Next(std::slice::from_ref(&b), 0),
                    Step::Use(target(&b)),
                    Some(&b),
                ),
                (In::Up, Step::Wait, Some(&b)),
                (In::Next(&both, 2), Step::Wait, Some(&b)),
                (In::Down(3), Step::Wait, Some(&b)),
                (
                    In::Next(&both, 3 + DOWN_MS),
                    Step::Use(target(&a)),
                    Some(&a),
                ),
                // `a` does not answer either: back to `b`, which worked.
                (
                    In::Next(&both, 3 + 2 * DOWN_MS),
                    Step::Use(target(&b)),
                    Some(&b),
                ),
            ],
        );
    }

    #[test]
    fn stale_reports_change_nothing() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let both = [rogue.clone(), real.clone()];
        let mut link = HubLink::new(Pins::default(), true);
        assert_eq!(link.next(&both, 0), Step::Probe(target(&rogue)));
        // While the probe runs, nothing else starts.
        assert_eq!(link.next(&both, 1), Step::Wait);
        // A report for what is not being probed: ignored, the probe still runs.
        assert_eq!(
            link.probed(&target(&real), Probe::Authenticated, &both, 1),
            Step::Wait
        );
        assert_eq!(link.current(), None);
        assert_eq!(link.probing(), Some(&target(&rogue)));
        assert_eq!(
            link.probed(&target(&rogue), Probe::Failed("bad CA".into()), &both, 2),
            Step::Probe(target(&real))
        );
        assert_eq!(
            link.failure(&rogue.instance).map(|(_, why)| why),
            Some("bad CA")
        );
        // A probe that never reports is given up after PROBE_EVERY_MS; its report is then
        // stale.
        assert_eq!(link.next(&both, 2 + PROBE_EVERY_MS - 1), Step::Wait);
        assert_eq!(
            link.next(&both, 2 + PROBE_EVERY_MS),
            Step::Probe(target(&real))
        );
        // A hub that stops advertising is forgotten, failures and all, once its period
        // is over.
        link.next(std::slice::from_ref(&real), RETRY_MS);
        assert!(link.failure(&rogue.instance).is_none());
    }
}

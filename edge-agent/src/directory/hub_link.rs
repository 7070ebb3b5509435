//! Which hub the agent uses. mDNS only proposes: [`super::Directory::hub_choice`] gives the
//! candidates, best first. A candidate is used once the agent has authenticated it (TLS
//! against the fleet CA this device enrolled with, for the hub's names), one candidate at a
//! time, and the hub in use stays in use meanwhile. So a host that advertises the fleet
//! under a smaller name, with a CA of its own or a false hash, takes no device off its hub:
//! it fails authentication and is skipped, tried again only after [`RETRY_MS`] or when its
//! record changes. What the operator gave (`--broker`, `--hub`, from flags, environment or
//! config file) is never replaced: a pinned part is left out of every [`Target`].
//!
//! Pure: the agent's main loop runs the probes a [`Step::Probe`] asks for and reports how
//! they went with [`HubLink::probed`]; after a [`Step::Use`] it asks [`HubLink::next`] again.

use shoal_api::discovery::SelectedHub;
use shoal_api::endpoint::BrokerUrl;
use std::collections::BTreeMap;

/// How long a candidate that failed authentication is skipped (unless its record changes).
pub const RETRY_MS: u64 = 60_000;

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
    /// Nothing: the best usable hub is in use, a probe is under way, or there is no
    /// candidate (the hub in use, if any, stays: a hub that withdrew is retried at its last
    /// address).
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

/// The agent's choice of hub over time.
#[derive(Debug, Clone)]
pub struct HubLink {
    pins: Pins,
    authenticate: bool,
    /// The hub in use.
    current: Option<Target>,
    /// The candidate being authenticated.
    probing: Option<Target>,
    /// Candidates that failed authentication, by instance.
    failed: BTreeMap<String, Failure>,
}

impl HubLink {
    /// `authenticate`: candidates must be authenticated before use (`false` only for an
    /// `--insecure` agent, which has nothing to authenticate them with).
    pub fn new(pins: Pins, authenticate: bool) -> Self {
        Self {
            pins,
            authenticate,
            current: None,
            probing: None,
            failed: BTreeMap::new(),
        }
    }

    /// The hub in use (found over mDNS; `None` before one was authenticated).
    pub fn current(&self) -> Option<&Target> {
        self.current.as_ref()
    }

    /// The candidate being authenticated.
    pub fn probing(&self) -> Option<&Target> {
        self.probing.as_ref()
    }

    /// The record of `instance` that last failed authentication, and why.
    pub fn failure(&self, instance: &str) -> Option<(&Target, &str)> {
        self.failed
            .get(instance)
            .map(|f| (&f.target, f.reason.as_str()))
    }

    fn target(&self, hub: &SelectedHub) -> Target {
        Target {
            instance: hub.instance.clone(),
            broker: (!self.pins.broker).then(|| hub.broker.clone()),
            http: (!self.pins.http).then(|| hub.http.clone()),
        }
    }

    /// The next step, given the candidates (best first): the first one that is neither in
    /// use nor skipped (it failed authentication less than [`RETRY_MS`] ago with the same
    /// record) is probed, or used at once by an agent that does not authenticate. When the
    /// first such candidate is the hub in use, or there is none, nothing changes.
    pub fn next(&mut self, candidates: &[SelectedHub], now_ms: u64) -> Step {
        // Failures of hubs no longer advertised are forgotten (their number stays bounded).
        self.failed
            .retain(|i, _| candidates.iter().any(|c| &c.instance == i));
        if (self.pins.broker && self.pins.http) || self.probing.is_some() {
            return Step::Wait;
        }
        for hub in candidates {
            let t = self.target(hub);
            if self.current.as_ref() == Some(&t) {
                return Step::Wait;
            }
            let skipped = self
                .failed
                .get(&t.instance)
                .is_some_and(|f| f.target == t && now_ms < f.at_ms.saturating_add(RETRY_MS));
            if skipped {
                continue;
            }
            if !self.authenticate {
                self.current = Some(t.clone());
                return Step::Use(t);
            }
            self.probing = Some(t.clone());
            return Step::Probe(t);
        }
        Step::Wait
    }

    /// Records how the probe of `target` went. Authenticated: use it. Failed: skip it, keep
    /// the hub in use, and go on with the next candidate. The report of a probe not asked
    /// for (stale) changes nothing.
    pub fn probed(
        &mut self,
        target: &Target,
        probe: Probe,
        candidates: &[SelectedHub],
        now_ms: u64,
    ) -> Step {
        if self.probing.as_ref() != Some(target) {
            return Step::Wait;
        }
        self.probing = None;
        match probe {
            Probe::Authenticated => {
                self.failed.remove(&target.instance);
                self.current = Some(target.clone());
                Step::Use(target.clone())
            }
            Probe::Failed(reason) => {
                self.failed.insert(
                    target.instance.clone(),
                    Failure {
                        target: target.clone(),
                        at_ms: now_ms,
                        reason,
                    },
                );
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

    /// What happens to the link, one input at a time.
    enum In<'a> {
        /// `next` with these candidates at this time.
        Next(&'a [SelectedHub], u64),
        /// The probe under way went so (with these candidates, at this time).
        Probed(Probe, &'a [SelectedHub], u64),
    }

    /// Feeds `inputs` to a link, checking each step and the hub in use after it.
    fn run(mut link: HubLink, script: &[(In, Step, Option<&SelectedHub>)]) {
        for (i, (input, want, using)) in script.iter().enumerate() {
            let got = match input {
                In::Next(c, now) => link.next(c, *now),
                In::Probed(p, c, now) => {
                    let t = link.probing().cloned().expect("a probe under way");
                    link.probed(&t, p.clone(), c, *now)
                }
            };
            assert_eq!(&got, want, "step {i}");
            assert_eq!(link.current(), using.map(target).as_ref(), "step {i}");
        }
    }

    #[test]
    fn a_rogue_that_sorts_first_takes_nothing() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let both = [rogue.clone(), real.clone()];
        let moved = hub("farm-a-rogue", "10.0.0.4");
        let both_moved = [moved.clone(), real.clone()];
        let no = || Probe::Failed("invalid peer certificate: UnknownIssuer".into());
        run(
            HubLink::new(Pins::default(), true),
            &[
                // The real hub first: authenticated, used.
                (
                    In::Next(std::slice::from_ref(&real), 0),
                    Step::Probe(target(&real)),
                    None,
                ),
                (
                    In::Probed(Probe::Authenticated, std::slice::from_ref(&real), 1),
                    Step::Use(target(&real)),
                    Some(&real),
                ),
                (
                    In::Next(std::slice::from_ref(&real), 2),
                    Step::Wait,
                    Some(&real),
                ),
                // The rogue appears with a smaller name: probed, fails, the real hub stays.
                (
                    In::Next(&both, 10),
                    Step::Probe(target(&rogue)),
                    Some(&real),
                ),
                // While the probe runs, nothing else starts.
                (In::Next(&both, 11), Step::Wait, Some(&real)),
                (In::Probed(no(), &both, 12), Step::Wait, Some(&real)),
                // Skipped while it keeps advertising the same record...
                (In::Next(&both, 12 + RETRY_MS - 1), Step::Wait, Some(&real)),
                // ...tried again after RETRY_MS...
                (
                    In::Next(&both, 12 + RETRY_MS),
                    Step::Probe(target(&rogue)),
                    Some(&real),
                ),
                (
                    In::Probed(no(), &both, 13 + RETRY_MS),
                    Step::Wait,
                    Some(&real),
                ),
                // ...or at once when its record changes.
                (
                    In::Next(&both_moved, 14 + RETRY_MS),
                    Step::Probe(target(&moved)),
                    Some(&real),
                ),
                (
                    In::Probed(no(), &both_moved, 15 + RETRY_MS),
                    Step::Wait,
                    Some(&real),
                ),
                // The real hub withdraws: still used (retried at its last address).
                (
                    In::Next(std::slice::from_ref(&moved), 16 + RETRY_MS),
                    Step::Wait,
                    Some(&real),
                ),
            ],
        );
    }

    #[test]
    fn the_first_candidate_that_authenticates_is_used() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let better = hub("farm-hub-0", "10.0.0.5");
        let both = [rogue.clone(), real.clone()];
        let three = [rogue.clone(), better.clone(), real.clone()];
        let mut real_moved = real.clone();
        real_moved.broker = "mqtts://10.0.0.9:8883".parse().unwrap();
        real_moved.http = "https://10.0.0.9:8080".into();
        run(
            HubLink::new(Pins::default(), true),
            &[
                // At start both are seen: the rogue is tried first, fails, the real one is
                // tried next.
                (In::Next(&both, 0), Step::Probe(target(&rogue)), None),
                (
                    In::Probed(Probe::Failed("no".into()), &both, 1),
                    Step::Probe(target(&real)),
                    None,
                ),
                (
                    In::Probed(Probe::Authenticated, &both, 2),
                    Step::Use(target(&real)),
                    Some(&real),
                ),
                (In::Next(&both, 3), Step::Wait, Some(&real)),
                // A better hub of the fleet that authenticates: every agent moves to it.
                (
                    In::Next(&three, 4),
                    Step::Probe(target(&better)),
                    Some(&real),
                ),
                (
                    In::Probed(Probe::Authenticated, &three, 5),
                    Step::Use(target(&better)),
                    Some(&better),
                ),
                // The hub in use moves: its new address is authenticated before use.
                (
                    In::Next(std::slice::from_ref(&real_moved), 6),
                    Step::Probe(target(&real_moved)),
                    Some(&better),
                ),
                (
                    In::Probed(Probe::Authenticated, std::slice::from_ref(&real_moved), 7),
                    Step::Use(target(&real_moved)),
                    Some(&real_moved),
                ),
            ],
        );
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
            for now in 1..10 {
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
                    Step::Wait => break,
                };
            }
            assert_eq!(used, want.into_iter().collect::<Vec<_>>(), "{pins:?}");
            for t in &used {
                assert!(t.broker.is_none() || !pins.broker, "{pins:?}");
                assert!(t.http.is_none() || !pins.http, "{pins:?}");
            }
        }
    }

    #[test]
    fn an_insecure_agent_uses_the_first_candidate_at_once() {
        let a = hub("farm-a", "10.0.0.1");
        let b = hub("farm-b", "10.0.0.2");
        let mut link = HubLink::new(Pins::default(), false);
        assert_eq!(
            link.next(std::slice::from_ref(&b), 0),
            Step::Use(target(&b))
        );
        assert_eq!(link.next(std::slice::from_ref(&b), 1), Step::Wait);
        assert_eq!(link.next(&[a.clone(), b], 2), Step::Use(target(&a)));
    }

    #[test]
    fn stale_reports_change_nothing() {
        let real = hub("farm-hub-a", "10.0.0.1");
        let rogue = hub("farm-a-rogue", "10.0.0.3");
        let both = [rogue.clone(), real.clone()];
        let mut link = HubLink::new(Pins::default(), true);
        assert_eq!(link.next(&both, 0), Step::Probe(target(&rogue)));
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
        // A hub that stops advertising is forgotten, failures and all.
        link.next(std::slice::from_ref(&real), 3);
        assert!(link.failure(&rogue.instance).is_none());
    }
}

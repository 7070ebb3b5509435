//! The connection gate: how many connections the hub holds open, so that clients who have
//! not shown a fleet certificate cannot take the descriptors everyone else needs.
//!
//! Both listeners (HTTPS and the embedded broker) take a [`Ticket`] per accepted connection,
//! weighted by the descriptors it costs (an MQTT connection holds three: the client's, and
//! both ends of the front's link to rumqttd). The budget is the process's open-file limit
//! (raised to its hard limit at start) less a reserve for the store, files and the hub's own
//! links. Connections start *in their handshake*; one admitted with a fleet certificate
//! becomes *verified* and stays until it ends; one without (enrollment, the CA, a browser)
//! becomes *anonymous*. Handshaking and anonymous connections each share a quarter of the
//! budget: when a share is full, its oldest connection is closed to make room, so a flood
//! of half-open or slow clients evicts itself while a real client's handshake, a few
//! milliseconds, gets through; and an anonymous HTTPS connection lives at most
//! [`UNVERIFIED_LIFETIME`] unless it shows a dashboard session. Past the whole budget, a
//! new connection is closed at once.
//!
//! A verified identity holds at most [`max_per_identity`] connections, so no single
//! certificate (a device's, taken from a board) fills the gate; the budget is at most
//! [`MAX_BUDGET`] whatever the limit (connections cost memory too).
//!
//! The bookkeeping ([`Books`]) is plain data, tested with tables; [`Gate`] wraps it in a
//! lock held for a few instructions, never across an await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Descriptors kept for everything but client connections.
pub const RESERVE: u64 = 64;
/// How long an HTTPS connection without a fleet certificate may stay open (enrollment, the
/// CA, the dashboard's files: each a request or two).
pub const UNVERIFIED_LIFETIME: Duration = Duration::from_secs(30);
/// What an MQTT connection costs in descriptors.
pub const MQTT_COST: u64 = 3;
/// What an HTTPS connection costs.
pub const HTTP_COST: u64 = 1;
/// The most descriptors the gate hands out, whatever the open-file limit: each connection
/// also costs memory (TLS state, buffers), which a board has little of.
pub const MAX_BUDGET: u64 = 16_384;

/// How many connections one identity may hold at once: a device needs its MQTT session and
/// a download or two, an operator a CLI or a few and a browser; the hub is not counted. No
/// single certificate (a device's, taken from a board) fills the gate.
pub fn max_per_identity(who: &shoal_api::policy::acl::Identity) -> usize {
    match who {
        shoal_api::policy::acl::Identity::Hub => usize::MAX,
        shoal_api::policy::acl::Identity::Device(_) => 8,
        shoal_api::policy::acl::Identity::Operator(_) => 64,
    }
}

/// A pool of evictable connections (oldest first), within a share of the budget.
#[derive(Debug)]
struct Pool {
    budget: u64,
    held: u64,
    members: BTreeMap<u64, u64>,
}

impl Pool {
    fn new(budget: u64) -> Self {
        Pool {
            budget,
            held: 0,
            members: BTreeMap::new(),
        }
    }

    /// Makes room for `cost`: the oldest members to evict.
    fn make_room(&mut self, cost: u64) -> Vec<u64> {
        let mut evict = Vec::new();
        while self.held + cost > self.budget {
            let Some((id, c)) = self.members.pop_first() else {
                break;
            };
            self.held -= c;
            evict.push(id);
        }
        evict
    }

    fn add(&mut self, id: u64, cost: u64) {
        self.held += cost;
        self.members.insert(id, cost);
    }

    fn remove(&mut self, id: u64) -> Option<u64> {
        let c = self.members.remove(&id)?;
        self.held -= c;
        Some(c)
    }
}

/// The gate's state: what is held, and the evictable connections oldest first: those still
/// in their TLS handshake, and those past it without a fleet certificate. The two pools are
/// apart so that a flood of one kind (slow bodies after quick handshakes) never evicts a
/// real client in the middle of its handshake.
#[derive(Debug)]
pub struct Books {
    budget: u64,
    held: u64,
    handshaking: Pool,
    anonymous: Pool,
    next: u64,
}

/// What [`Books::open`] and [`Books::anonymous`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Ticket `id`; close the connections `evict` (the oldest of its pool) to make room.
    In { id: u64, evict: Vec<u64> },
    /// Over the budget: close the new connection (and still the connections `evict`).
    Full { evict: Vec<u64> },
}

impl Books {
    /// Books for a process allowed `open_files` descriptors.
    pub fn new(open_files: u64) -> Self {
        let budget = open_files.min(MAX_BUDGET).saturating_sub(RESERVE).max(16);
        Books {
            budget,
            held: 0,
            handshaking: Pool::new((budget / 4).max(4)),
            anonymous: Pool::new((budget / 4).max(4)),
            next: 0,
        }
    }

    /// A new connection costing `cost`, in its handshake.
    pub fn open(&mut self, cost: u64) -> Opened {
        let evict = self.handshaking.make_room(cost);
        // Evicted connections still hold their descriptors until they close; the new one
        // needs room in the whole budget beside them.
        if self.held + cost > self.budget {
            return Opened::Full { evict };
        }
        let id = self.next;
        self.next += 1;
        self.held += cost;
        self.handshaking.add(id, cost);
        Opened::In { id, evict }
    }

    /// Ticket `id` finished its handshake without a fleet certificate: it joins the
    /// anonymous pool; the connections to evict to make room.
    pub fn anonymous(&mut self, id: u64) -> Vec<u64> {
        let Some(cost) = self.handshaking.remove(id) else {
            return Vec::new();
        };
        let evict = self.anonymous.make_room(cost);
        self.anonymous.add(id, cost);
        evict
    }

    /// Ticket `id` showed a fleet certificate: it is no longer evicted.
    pub fn verify(&mut self, id: u64) {
        self.handshaking.remove(id);
        self.anonymous.remove(id);
    }

    /// Ticket `id` (costing `cost`) closed.
    pub fn close(&mut self, id: u64, cost: u64) {
        self.verify(id);
        self.held = self.held.saturating_sub(cost);
    }
}

/// The gate both listeners share.
#[derive(Debug)]
pub struct Gate {
    books: Mutex<Books>,
    /// The unverified connections' tokens, cancelled to evict them.
    tokens: Mutex<BTreeMap<u64, CancellationToken>>,
    /// Verified connections per identity.
    identities: Mutex<std::collections::HashMap<String, usize>>,
}

/// One connection's place: dropping it gives the place back.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    cost: u64,
    evicted: CancellationToken,
    verified: std::sync::atomic::AtomicBool,
    /// The identity counted for this connection (see [`Ticket::verified_as`]).
    counted: Mutex<Option<String>>,
}

impl Gate {
    pub fn new(open_files: u64) -> Arc<Gate> {
        Arc::new(Gate {
            books: Mutex::new(Books::new(open_files)),
            tokens: Mutex::new(BTreeMap::new()),
            identities: Mutex::new(Default::default()),
        })
    }

    /// A place for a new connection costing `cost` descriptors; `None`: close it at once.
    pub fn enter(self: &Arc<Self>, cost: u64) -> Option<Ticket> {
        let opened = self
            .books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open(cost);
        let (id, evict) = match opened {
            Opened::In { id, evict } => (Some(id), evict),
            Opened::Full { evict } => (None, evict),
        };
        self.evict(evict);
        let id = id?;
        let evicted = CancellationToken::new();
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, evicted.clone());
        Some(Ticket {
            gate: self.clone(),
            id,
            cost,
            evicted,
            verified: Default::default(),
            counted: Mutex::new(None),
        })
    }
}

impl Gate {
    fn evict(&self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(t) = tokens.remove(&id) {
                t.cancel();
            }
        }
    }
}

impl Ticket {
    /// The connection showed `who`'s certificate: it keeps its place, unless `who` holds
    /// as many connections as it may (`false`: close this one).
    pub fn verified_as(&self, who: &shoal_api::policy::acl::Identity) -> bool {
        let max = max_per_identity(who);
        if max != usize::MAX {
            let key = who.to_string();
            let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
            if counted.is_none() {
                let mut ids = self
                    .gate
                    .identities
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let n = ids.entry(key.clone()).or_default();
                if *n >= max {
                    return false;
                }
                *n += 1;
                *counted = Some(key);
            }
        }
        self.verified();
        true
    }

    /// Whether [`Ticket::verified`] was called.
    pub fn is_verified(&self) -> bool {
        self.verified.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection showed a fleet certificate (or a dashboard session): it keeps its
    /// place.
    pub fn verified(&self) {
        self.verified
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.gate
            .books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verify(self.id);
        self.gate
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }

    /// The connection finished its handshake without a fleet certificate: it may stay a
    /// while, among the anonymous (the oldest of which are closed to make room).
    pub fn anonymous(&self) {
        let evict = self
            .gate
            .books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .anonymous(self.id);
        self.gate.evict(evict);
    }

    /// Cancelled when the gate evicts this connection.
    pub fn evicted(&self) -> CancellationToken {
        self.evicted.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self
            .counted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let mut ids = self
                .gate
                .identities
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = ids.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ids.remove(&key);
                }
            }
        }
        self.gate
            .books
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close(self.id, self.cost);
        self.gate
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(o: Opened) -> u64 {
        match o {
            Opened::In { id, .. } => id,
            Opened::Full { .. } => panic!("full"),
        }
    }

    #[test]
    fn handshakes_evict_the_oldest_handshake_and_verified_ones_stay() {
        // A budget of 40: 10 for handshakes, 10 for anonymous connections.
        let mut b = Books::new(RESERVE + 40);
        for _ in 0..10 {
            assert!(matches!(b.open(1), Opened::In { evict, .. } if evict.is_empty()));
        }
        assert_eq!(
            b.open(1),
            Opened::In {
                id: 10,
                evict: vec![0]
            }
        );
        // A verified one leaves the pool (and is never evicted): room for one more.
        b.verify(1);
        assert_eq!(
            b.open(1),
            Opened::In {
                id: 11,
                evict: vec![]
            }
        );
        assert_eq!(
            b.open(MQTT_COST),
            Opened::In {
                id: 12,
                evict: vec![2, 3, 4]
            }
        );
    }

    #[test]
    fn slow_anonymous_clients_evict_each_other_not_handshakes() {
        let mut b = Books::new(RESERVE + 40);
        // A real client in its handshake.
        let real = id(b.open(1));
        // 30 attackers finish their handshakes without certificates, one after the other.
        let mut evicted = Vec::new();
        for _ in 0..30 {
            let a = id(b.open(1));
            evicted.extend(b.anonymous(a));
        }
        assert_eq!(evicted.len(), 20, "the anonymous share holds 10");
        assert!(
            !evicted.contains(&real),
            "a handshake is not evicted by them"
        );
        b.verify(real);
    }

    #[test]
    fn past_the_budget_new_connections_are_refused_until_some_close() {
        let mut b = Books::new(RESERVE + 16);
        let mut verified = Vec::new();
        for _ in 0..16 {
            let i = id(b.open(1));
            b.verify(i);
            verified.push(i);
        }
        assert_eq!(b.open(1), Opened::Full { evict: vec![] });
        b.close(verified[0], 1);
        assert!(matches!(b.open(1), Opened::In { .. }));
    }

    #[test]
    fn evicted_connections_hold_their_descriptors_until_they_close() {
        let mut b = Books::new(RESERVE + 16);
        for _ in 0..12 {
            let i = id(b.open(1));
            b.verify(i);
        }
        let open: Vec<u64> = (0..4).map(|_| id(b.open(1))).collect();
        // A fifth evicts the oldest handshake, which has not closed yet: full.
        assert_eq!(
            b.open(1),
            Opened::Full {
                evict: vec![open[0]]
            }
        );
        b.close(open[0], 1);
        assert!(matches!(b.open(1), Opened::In { .. }));
    }

    #[test]
    fn one_identity_holds_only_so_many_connections() {
        let g = Gate::new(RESERVE + 1000);
        let d = shoal_api::policy::acl::Identity::Device(
            shoal_api::model::ids::DeviceId::try_from("d").unwrap(),
        );
        let held: Vec<Ticket> = (0..8).map(|_| g.enter(1).unwrap()).collect();
        assert!(held.iter().all(|t| t.verified_as(&d)));
        let ninth = g.enter(1).unwrap();
        assert!(!ninth.verified_as(&d), "a ninth connection of one device");
        assert!(ninth.verified_as(&shoal_api::policy::acl::Identity::Hub));
        drop(held);
        let again = g.enter(1).unwrap();
        assert!(
            again.verified_as(&d),
            "places come back when connections close"
        );
    }

    #[tokio::test]
    async fn a_ticket_gives_its_place_back_and_eviction_cancels() {
        let g = Gate::new(RESERVE + 16);
        let first = g.enter(1).unwrap();
        let tickets: Vec<Ticket> = (0..3).map(|_| g.enter(1).unwrap()).collect();
        assert!(!first.evicted().is_cancelled());
        let fifth = g.enter(1).unwrap();
        assert!(first.evicted().is_cancelled(), "the oldest handshake went");
        fifth.verified();
        assert!(fifth.is_verified());
        drop(tickets);
        drop(first);
        assert_eq!(g.books.lock().unwrap().held, 1);
    }
}

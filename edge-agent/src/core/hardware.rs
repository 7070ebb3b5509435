//! Which hardware nodes a replica holds (pure): the device's inventory per class, who holds
//! which node, and the first free nodes for a replica that asks (`resources.devices`).
//!
//! A replica keeps its nodes across restarts and gives them back when it stops; a container
//! stopping in the background keeps them until it is gone, so a successor never shares a
//! node with it. Nodes are handed out in the inventory's order, first free first.

use shoal_api::model::hardware::DeviceRequests;
use shoal_api::model::ids::DeviceClass;
use std::collections::BTreeMap;

/// The nodes the device offers, per class, in the order they are handed out.
pub type Inventory = BTreeMap<DeviceClass, Vec<String>>;

/// The nodes one replica holds, per class.
pub type Grant = BTreeMap<DeviceClass, Vec<String>>;

/// Who holds nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A supervised replica, by instance (`logger-0`).
    Replica(String),
    /// A container still stopping in the background, by container id.
    Stopping(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Replica(i) => f.write_str(i),
            Holder::Stopping(id) => write!(f, "stopping container {id}"),
        }
    }
}

/// Not enough free nodes of a class; says which are held by whom.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("waiting for a free {class} device: needs {need}, {free} of {total} free{held}")]
pub struct Shortage {
    pub class: DeviceClass,
    pub need: u32,
    pub free: usize,
    pub total: usize,
    /// ` (/dev/ttyUSB0 held by logger-0)`, or empty.
    held: String,
}

/// Who holds which node.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    inventory: Inventory,
    held: BTreeMap<Holder, Grant>,
}

impl Holdings {
    pub fn new(inventory: Inventory) -> Self {
        Holdings {
            inventory,
            held: BTreeMap::new(),
        }
    }

    /// How many nodes of each class the device offers (its hello's `devices`).
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.inventory
            .iter()
            .map(|(c, nodes)| {
                (
                    c.to_string(),
                    u32::try_from(nodes.len()).unwrap_or(u32::MAX),
                )
            })
            .collect()
    }

    /// What `holder` holds (empty when nothing).
    pub fn of(&self, holder: &Holder) -> Grant {
        self.held.get(holder).cloned().unwrap_or_default()
    }

    /// Gives `holder` the nodes `wants` asks for, keeping what it already holds when that
    /// still answers the request; all or nothing.
    pub fn take(&mut self, holder: Holder, wants: &DeviceRequests) -> Result<Grant, Shortage> {
        if let Some(g) = self.held.get(&holder) {
            let same = g.len() == wants.len()
                && wants
                    .iter()
                    .all(|(c, n)| g.get(c).map(Vec::len) == Some(*n as usize));
            if same {
                return Ok(g.clone());
            }
        }
        self.held.remove(&holder);
        let mut grant = Grant::new();
        for (class, need) in wants {
            let all = self.inventory.get(class).map(Vec::as_slice).unwrap_or(&[]);
            let free: Vec<&String> = all.iter().filter(|n| self.holder_of(n).is_none()).collect();
            if free.len() < *need as usize {
                let held: Vec<String> = all
                    .iter()
                    .filter_map(|n| self.holder_of(n).map(|h| format!("{n} held by {h}")))
                    .collect();
                return Err(Shortage {
                    class: class.clone(),
                    need: *need,
                    free: free.len(),
                    total: all.len(),
                    held: if held.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", held.join(", "))
                    },
                });
            }
            grant.insert(
                class.clone(),
                free.into_iter().take(*need as usize).cloned().collect(),
            );
        }
        if !grant.is_empty() {
            self.held.insert(holder, grant.clone());
        }
        Ok(grant)
    }

    /// What each replica holds (not containers stopping), as the agent persists it.
    pub fn replicas(&self) -> BTreeMap<String, Grant> {
        self.held
            .iter()
            .filter_map(|(h, g)| match h {
                Holder::Replica(i) => Some((i.clone(), g.clone())),
                Holder::Stopping(_) => None,
            })
            .collect()
    }

    /// Takes up what replica `instance` held before the agent restarted (its container may
    /// still run with those nodes): `false`, and nothing held, when a node is no longer
    /// offered or already held.
    pub fn resume(&mut self, instance: &str, grant: Grant) -> bool {
        let offered = grant.iter().all(|(c, nodes)| {
            let all = self.inventory.get(c).map(Vec::as_slice).unwrap_or(&[]);
            nodes
                .iter()
                .all(|n| all.contains(n) && self.holder_of(n).is_none())
        });
        if offered && !grant.is_empty() {
            self.held
                .insert(Holder::Replica(instance.to_string()), grant);
        }
        offered
    }

    /// `holder` gives back what it holds.
    pub fn release(&mut self, holder: &Holder) {
        self.held.remove(holder);
    }

    /// What `from` holds passes to `to` (a replica's container stopping in the background).
    pub fn hand_over(&mut self, from: &Holder, to: Holder) {
        if let Some(g) = self.held.remove(from) {
            self.held.insert(to, g);
        }
    }

    fn holder_of(&self, node: &str) -> Option<&Holder> {
        self.held
            .iter()
            .find(|(_, g)| g.values().any(|nodes| nodes.iter().any(|n| n == node)))
            .map(|(h, _)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(c: &str) -> DeviceClass {
        DeviceClass::try_from(c).unwrap()
    }

    fn holdings() -> Holdings {
        Holdings::new(
            [
                (
                    class("serial"),
                    vec!["/dev/ttyUSB0".into(), "/dev/ttyUSB1".into()],
                ),
                (class("camera"), vec!["/dev/video0".into()]),
            ]
            .into(),
        )
    }

    fn wants(pairs: &[(&str, u32)]) -> DeviceRequests {
        pairs.iter().map(|(c, n)| (class(c), *n)).collect()
    }

    fn replica(i: &str) -> Holder {
        Holder::Replica(i.into())
    }

    #[test]
    fn nodes_go_first_free_first_and_come_back_on_release() {
        let mut h = holdings();
        assert_eq!(
            h.counts(),
            [("camera".to_string(), 1), ("serial".to_string(), 2)].into()
        );
        let a = h.take(replica("a-0"), &wants(&[("serial", 1)])).unwrap();
        assert_eq!(a[&class("serial")], ["/dev/ttyUSB0"]);
        let b = h
            .take(replica("b-0"), &wants(&[("serial", 1), ("camera", 1)]))
            .unwrap();
        assert_eq!(b[&class("serial")], ["/dev/ttyUSB1"]);
        assert_eq!(b[&class("camera")], ["/dev/video0"]);
        let short = h
            .take(replica("c-0"), &wants(&[("serial", 1)]))
            .unwrap_err();
        assert_eq!(
            short.to_string(),
            "waiting for a free serial device: needs 1, 0 of 2 free (/dev/ttyUSB0 held by a-0, /dev/ttyUSB1 held by b-0)"
        );
        // All or nothing: c-0 holds nothing after its refusal.
        assert!(h.of(&replica("c-0")).is_empty());
        h.release(&replica("a-0"));
        let c = h.take(replica("c-0"), &wants(&[("serial", 1)])).unwrap();
        assert_eq!(c[&class("serial")], ["/dev/ttyUSB0"]);
    }

    #[test]
    fn a_replica_keeps_its_nodes_and_a_stopping_container_holds_them_until_gone() {
        let mut h = holdings();
        h.take(replica("a-0"), &wants(&[("serial", 1)])).unwrap();
        h.take(replica("b-0"), &wants(&[("serial", 1)])).unwrap();
        h.release(&replica("a-0"));
        // b-0 asks again (a restart): it keeps /dev/ttyUSB1, not the first free one.
        let again = h.take(replica("b-0"), &wants(&[("serial", 1)])).unwrap();
        assert_eq!(again[&class("serial")], ["/dev/ttyUSB1"]);
        h.hand_over(&replica("b-0"), Holder::Stopping("b-0-rev1".into()));
        let short = h
            .take(replica("b-0"), &wants(&[("serial", 2)]))
            .unwrap_err();
        assert!(
            short
                .to_string()
                .contains("/dev/ttyUSB1 held by stopping container b-0-rev1"),
            "{short}"
        );
        h.release(&Holder::Stopping("b-0-rev1".into()));
        assert_eq!(
            h.take(replica("b-0"), &wants(&[("serial", 2)])).unwrap()[&class("serial")].len(),
            2
        );
    }

    #[test]
    fn a_class_the_device_lacks_is_a_shortage_of_zero() {
        let mut h = holdings();
        let short = h.take(replica("a-0"), &wants(&[("gpio", 1)])).unwrap_err();
        assert_eq!(
            short.to_string(),
            "waiting for a free gpio device: needs 1, 0 of 0 free"
        );
        assert!(h.take(replica("a-0"), &wants(&[])).unwrap().is_empty());
    }

    #[test]
    fn what_replicas_held_before_a_restart_is_taken_up_first() {
        let mut h = holdings();
        h.take(replica("x-0"), &wants(&[("serial", 1)])).unwrap();
        h.take(replica("y-0"), &wants(&[("serial", 1)])).unwrap();
        h.release(&replica("x-0"));
        let saved = h.replicas();
        assert_eq!(saved.len(), 1);

        // The agent restarts: y-0's container still runs with /dev/ttyUSB1.
        let mut again = holdings();
        for (i, g) in saved {
            assert!(again.resume(&i, g));
        }
        let z = again
            .take(replica("z-0"), &wants(&[("serial", 1)]))
            .unwrap();
        assert_eq!(z[&class("serial")], ["/dev/ttyUSB0"], "not y-0's node");
        let y = again
            .take(replica("y-0"), &wants(&[("serial", 1)]))
            .unwrap();
        assert_eq!(y[&class("serial")], ["/dev/ttyUSB1"]);
        // A node no longer offered, or held, is not taken up.
        let gone: Grant = [(class("serial"), vec!["/dev/ttyUSB9".to_string()])].into();
        assert!(!again.resume("w-0", gone));
        let taken: Grant = [(class("serial"), vec!["/dev/ttyUSB0".to_string()])].into();
        assert!(!again.resume("v-0", taken));
    }
}

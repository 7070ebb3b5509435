//! The audit log: every change asked of the hub (who, when, what, from where, and what came
//! of it), numbered, kept durable in the hub's store like the rest of its state and read
//! with `GET /v1/audit` (`shoal get audit`). Pure: the store writes what
//! [`AuditLog::record`] returns; the clock is a parameter.

use shoal_api::policy::operator::AuditEntry;
use std::collections::VecDeque;

/// How many entries the store keeps (older ones are deleted as new ones come).
pub const KEPT: u64 = 10_000;
/// How many of the newest the hub holds in memory to answer reads.
pub const IN_MEMORY: usize = 1_000;

/// The newest entries, and the next number (entries count from 1).
#[derive(Debug, Clone)]
pub struct AuditLog {
    recent: VecDeque<AuditEntry>,
    next_seq: u64,
}

impl Default for AuditLog {
    fn default() -> Self {
        Self::from_loaded(Vec::new())
    }
}

/// One change to record; [`AuditLog::record`] numbers and dates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub who: String,
    pub from: String,
    pub action: String,
    pub outcome: String,
    pub accepted: bool,
}

impl AuditLog {
    /// From what the store loaded (oldest first).
    pub fn from_loaded(entries: Vec<AuditEntry>) -> Self {
        let next_seq = entries.last().map_or(1, |e| e.seq + 1);
        let mut recent: VecDeque<AuditEntry> = entries.into();
        while recent.len() > IN_MEMORY {
            recent.pop_front();
        }
        AuditLog { recent, next_seq }
    }

    /// Numbers `change` as the next entry, at `now_ms`; the caller writes it to the store
    /// and flushes before it answers the change.
    pub fn record(&mut self, change: Change, now_ms: u64) -> AuditEntry {
        let e = AuditEntry {
            seq: self.next_seq,
            time_ms: now_ms,
            who: bounded(change.who),
            from: bounded(change.from),
            action: bounded(change.action),
            outcome: bounded(change.outcome),
            accepted: change.accepted,
        };
        self.next_seq += 1;
        self.recent.push_back(e.clone());
        if self.recent.len() > IN_MEMORY {
            self.recent.pop_front();
        }
        e
    }

    /// Entries numbered after `after`, oldest first, at most `limit`.
    pub fn since(&self, after: u64, limit: usize) -> Vec<AuditEntry> {
        self.recent
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Refused requests each identity may have recorded per minute. Refusals are kept (they
/// are how an attempt shows), but not so many that one operator's flood of refused
/// requests pushes everyone's entries out of the log.
pub const REFUSALS_PER_MINUTE: u32 = 30;

/// Per identity: refusals recorded in the current minute, and those left out.
#[derive(Debug, Default)]
pub struct RefusalBudget {
    minute: u64,
    used: std::collections::HashMap<String, (u32, u64)>,
}

impl RefusalBudget {
    /// Whether a refusal of `who`'s at `now_ms` is recorded; `Some(n)`: yes, and `n` before
    /// it were left out (say so in its entry).
    pub fn take(&mut self, who: &str, now_ms: u64) -> Option<u64> {
        let minute = now_ms / 60_000;
        if minute != self.minute {
            self.minute = minute;
            // Keep only the counts of what was left out, to report them.
            self.used.retain(|_, (_, skipped)| *skipped > 0);
            self.used.values_mut().for_each(|(n, _)| *n = 0);
        }
        let (n, skipped) = self.used.entry(who.to_string()).or_default();
        if *n >= REFUSALS_PER_MINUTE {
            *skipped += 1;
            return None;
        }
        *n += 1;
        Some(std::mem::take(skipped))
    }
}

/// The longest field an entry keeps (in characters): an entry is small whatever a client
/// sends, so the log's size is bounded by its count.
pub const FIELD_CHARS: usize = 256;

fn bounded(s: String) -> String {
    if s.chars().count() <= FIELD_CHARS {
        return s;
    }
    s.chars().take(FIELD_CHARS - 1).chain(['…']).collect()
}

/// What an apply did, in one line: `secret/db unchanged, config/site configured,
/// workload/web created`, or why it
/// was refused.
pub fn apply_outcome(r: &shoal_api::wire::messages::ApplyResult) -> String {
    if !r.accepted {
        let first = r
            .errors
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        return match r.errors.len() {
            0 | 1 => format!("refused: {first}"),
            n => format!("refused: {first} (and {} more)", n - 1),
        };
    }
    let parts: Vec<String> = r
        .secrets
        .iter()
        .map(|(n, v)| format!("secret/{n} {v}"))
        .chain(r.configs.iter().map(|(n, v)| format!("config/{n} {v}")))
        .chain(r.workloads.iter().map(|(n, v)| format!("workload/{n} {v}")))
        .collect();
    if parts.is_empty() {
        "nothing to apply".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn apply_outcomes_read_as_one_line() {
        let mut r = shoal_api::wire::messages::ApplyResult {
            protocol: 1,
            request_id: None,
            accepted: true,
            workloads: [("web".to_string(), "created".to_string())].into(),
            secrets: [("db".to_string(), "unchanged".to_string())].into(),
            configs: [("site".to_string(), "configured".to_string())].into(),
            errors: Vec::new(),
        };
        assert_eq!(
            apply_outcome(&r),
            "secret/db unchanged, config/site configured, workload/web created"
        );
        r.accepted = false;
        assert_eq!(apply_outcome(&r), "refused: ");
    }

    fn change(what: &str) -> Change {
        Change {
            who: "operator alice (deployer)".into(),
            from: "127.0.0.1:5000".into(),
            action: what.into(),
            outcome: "ok".into(),
            accepted: true,
        }
    }

    #[test]
    fn entries_are_numbered_on_from_what_was_loaded() {
        let mut log = AuditLog::default();
        let a = log.record(change("a"), 10);
        let b = log.record(change("b"), 11);
        assert_eq!((a.seq, b.seq, b.time_ms), (1, 2, 11));
        assert_eq!(log.since(1, 10), std::slice::from_ref(&b));
        let mut again = AuditLog::from_loaded(vec![a, b]);
        assert_eq!(again.record(change("c"), 12).seq, 3);
        assert_eq!(again.since(0, 2).len(), 2);
    }

    #[test]
    fn a_flood_of_refusals_is_recorded_in_part_and_counted() {
        let mut b = RefusalBudget::default();
        for _ in 0..REFUSALS_PER_MINUTE {
            assert_eq!(b.take("vic", 1_000), Some(0));
        }
        assert_eq!(b.take("vic", 1_000), None);
        assert_eq!(b.take("vic", 2_000), None);
        assert_eq!(b.take("alice", 2_000), Some(0), "others are not held back");
        assert_eq!(
            b.take("vic", 61_000),
            Some(2),
            "the next minute says how many were left out"
        );
        assert_eq!(b.take("vic", 61_001), Some(0));
    }

    #[test]
    fn fields_are_bounded() {
        let mut c = change("x");
        c.outcome = "a".repeat(100_000);
        let e = AuditLog::default().record(c, 1);
        assert_eq!(e.outcome.chars().count(), FIELD_CHARS);
        assert!(e.outcome.ends_with('…'));
    }

    #[test]
    fn memory_holds_the_newest_only() {
        let mut log = AuditLog::default();
        for i in 0..(IN_MEMORY as u64 + 5) {
            log.record(change("x"), i);
        }
        let all = log.since(0, usize::MAX);
        assert_eq!(all.len(), IN_MEMORY);
        assert_eq!(all[0].seq, 6);
    }
}

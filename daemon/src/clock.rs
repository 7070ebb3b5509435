//! The wall clock of the hub and the agent: the one place their shells read the time as
//! milliseconds since the Unix epoch. Everything that decides takes `now` as a parameter
//! (the fleet core, the agent's plan, the wire types in `shoal_api`), so tests pass times.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

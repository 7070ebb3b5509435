//! Memory and table caps: each linear memory is capped at the spec's memory limit by a
//! [`ResourceLimiter`] (which also reports what the guest holds to its [`crate::runtime::Usage`]),
//! tables at a size derived from it; and [`LimitExceeded`], why a run hit one of its limits,
//! which becomes the run's failure reason.

use std::sync::Arc;
use wasmtime::ResourceLimiter;

/// Size counted per table element when capping tables against the memory limit.
pub(super) const TABLE_ELEMENT_BYTES: u64 = 8;
/// Absolute cap on the elements of one table, whatever the memory limit.
pub(super) const MAX_TABLE_ELEMENTS: u64 = 1 << 20;

/// Why a run hit one of its limits; becomes the run's failure reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum LimitExceeded {
    #[error(
        "memory limit exceeded: the module tried to grow its memory to {}, above its limit of {}",
        fmt_bytes(*.desired),
        fmt_bytes(*.limit)
    )]
    Memory { desired: u64, limit: u64 },
    #[error(
        "table limit exceeded: the module tried to grow a table to {desired} elements, above \
         its limit of {limit}"
    )]
    Table { desired: u64, limit: u64 },
    #[error("CPU time limit exceeded: the run used its limit of {} of CPU time (spec.limits.cpuTime)", shoal_api::model::quantity::format_duration_ms(*.limit_ms))]
    CpuTime { limit_ms: u64 },
    #[error("log rate limit exceeded: the run wrote more than {}/s over {window} s (spec.limits.logRate)", fmt_bytes(*.per_sec))]
    LogRate { per_sec: u64, window: u64 },
}

pub(super) struct Limits {
    memory: u64,
    table_elements: u64,
    /// Where the memory the guest holds is reported.
    usage: Arc<crate::runtime::Usage>,
}

impl Limits {
    pub(super) fn new(memory_limit: u64, usage: Arc<crate::runtime::Usage>) -> Self {
        Limits {
            memory: memory_limit,
            table_elements: (memory_limit / TABLE_ELEMENT_BYTES).min(MAX_TABLE_ELEMENTS),
            usage,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Also called with `current = 0` when an instance creates its memories, so a module
        // whose initial memory is over the limit fails the same way.
        let desired = desired as u64;
        if desired > self.memory {
            return Err(LimitExceeded::Memory {
                desired,
                limit: self.memory,
            }
            .into());
        }
        self.usage.memory_grew(current as u64, desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.table_elements {
            return Err(LimitExceeded::Table {
                desired,
                limit: self.table_elements,
            }
            .into());
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        1_000
    }

    fn tables(&self) -> usize {
        1_000
    }

    fn memories(&self) -> usize {
        100
    }
}

/// `17.1 MiB`, `16 MiB`, `64 KiB`.
pub(super) fn fmt_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let (unit, name) = if bytes >= MIB {
        (MIB, "MiB")
    } else if bytes >= KIB {
        (KIB, "KiB")
    } else {
        return format!("{bytes} B");
    };
    if bytes.is_multiple_of(unit) {
        format!("{} {name}", bytes / unit)
    } else {
        format!("{:.1} {name}", bytes as f64 / unit as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn sizes_are_formatted_for_people() {
        assert_eq!(fmt_bytes(16 * MIB), "16 MiB");
        assert_eq!(fmt_bytes(17 * MIB + MIB / 10), "17.1 MiB");
        assert_eq!(fmt_bytes(64 * 1024), "64 KiB");
        let err = LimitExceeded::Memory {
            desired: 17 * MIB + MIB / 10,
            limit: 16 * MIB,
        };
        assert_eq!(
            err.to_string(),
            "memory limit exceeded: the module tried to grow its memory to 17.1 MiB, above its \
             limit of 16 MiB"
        );
    }
}

//! What the machine the agent runs on has: memory (`/proc/meminfo`), the agent's own resident
//! set (`/proc/self/status`) and free space on the data directory's filesystem (`statvfs`).
//! Each reader answers 0 (or `None`) where the source cannot be read (e.g. off Linux).

use std::path::Path;

/// A `Key:   N kB` line of a `/proc` file, in bytes.
fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| proc_kib(&t, key))
        .unwrap_or(0)
}

/// The machine's memory.
pub fn total_memory() -> u64 {
    meminfo("MemTotal")
}

/// Memory the kernel could give to new work without swapping.
pub fn available_memory() -> u64 {
    meminfo("MemAvailable")
}

/// The agent's resident set size.
pub fn agent_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| proc_kib(&t, "VmRSS"))
        .unwrap_or(0)
}

/// Total and available bytes of the filesystem holding `path`.
pub fn disk(path: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some((
        s.f_blocks.saturating_mul(s.f_frsize),
        s.f_bavail.saturating_mul(s.f_frsize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_are_read_in_bytes() {
        let t = "MemTotal:        8000 kB\nMemFree:  10 kB\nMemAvailable:    4000 kB\n";
        assert_eq!(proc_kib(t, "MemTotal"), Some(8000 * 1024));
        assert_eq!(proc_kib(t, "MemAvailable"), Some(4000 * 1024));
        assert_eq!(proc_kib(t, "Mem"), None);
        assert_eq!(proc_kib(t, "SwapTotal"), None);
        assert!(total_memory() > 0 && available_memory() > 0 && agent_rss() > 0);
        let (total, free) = disk(Path::new("/")).unwrap();
        assert!(total >= free && total > 0);
    }
}

//! What a container's cgroup says: its memory and CPU time ([`cgroup_usage`], for `ps` and
//! metrics) and how many of its processes the OOM killer took ([`parse_oom_kills`]), under
//! cgroup v2 or v1.

use crate::runtime::UsageSample;
use std::path::{Path, PathBuf};

/// Memory and CPU time of container `id`'s cgroup under `root` (cgroup v2:
/// `memory.current`, `cpu.stat` `usage_usec`; v1: `memory/…/memory.usage_in_bytes`,
/// `cpuacct/…/cpuacct.usage`). `None` when neither layout can be read.
pub fn cgroup_usage(root: &Path, namespace: &str, id: &str) -> Option<UsageSample> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let number = |t: String| t.trim().parse::<u64>().ok();
    let v2 = root.join(namespace).join(id);
    if let Some(memory) = read(v2.join("memory.current")).and_then(number) {
        let cpu_usec = read(v2.join("cpu.stat"))
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == "usage_usec")
                        .then(|| v.trim().parse::<u64>().ok())
                        .flatten()
                })
            })
            .unwrap_or(0);
        return Some(UsageSample {
            memory_bytes: memory,
            cpu_nanos: cpu_usec.saturating_mul(1000),
        });
    }
    let memory = read(
        root.join("memory")
            .join(namespace)
            .join(id)
            .join("memory.usage_in_bytes"),
    )
    .and_then(number)?;
    let cpu_nanos = read(
        root.join("cpuacct")
            .join(namespace)
            .join(id)
            .join("cpuacct.usage"),
    )
    .and_then(number)
    .unwrap_or(0);
    Some(UsageSample {
        memory_bytes: memory,
        cpu_nanos,
    })
}

/// How many processes of container `id` the kernel's OOM killer has killed, from its memory
/// cgroup (`runtime_spec` puts it at `/{namespace}/{id}`): `memory.events` under cgroup v2,
/// `memory.oom_control` under v1. `None` when neither can be read (another cgroup driver, or
/// a kernel without the counter).
pub(super) async fn oom_kills(namespace: &str, id: &str) -> Option<u64> {
    let v2 = format!("/sys/fs/cgroup/{namespace}/{id}/memory.events");
    let v1 = format!("/sys/fs/cgroup/memory/{namespace}/{id}/memory.oom_control");
    for path in [v2, v1] {
        if let Ok(text) = tokio::fs::read_to_string(&path).await {
            if let Some(n) = parse_oom_kills(&text) {
                return Some(n);
            }
        }
    }
    None
}

/// The `oom_kill N` line of a `memory.events` or `memory.oom_control` file.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "oom_kill").then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_either_cgroup_version() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_usage(root.path(), "shoal", "c1"), None);
        let v2 = root.path().join("shoal/c1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.current"), "4096\n").unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        assert_eq!(
            cgroup_usage(root.path(), "shoal", "c1"),
            Some(UsageSample {
                memory_bytes: 4096,
                cpu_nanos: 1_500_000
            })
        );
        let v1 = root.path().join("memory/shoal/c2");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "8192\n").unwrap();
        let cpu = root.path().join("cpuacct/shoal/c2");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "777\n").unwrap();
        assert_eq!(
            cgroup_usage(root.path(), "shoal", "c2"),
            Some(UsageSample {
                memory_bytes: 8192,
                cpu_nanos: 777
            })
        );
    }

    #[test]
    fn oom_kill_counters_are_read_from_either_cgroup_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        assert_eq!(parse_oom_kills(v1), Some(0));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }
}

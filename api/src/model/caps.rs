//! `spec.container.capabilities: { add, drop }`: Linux capabilities a container keeps, as
//! Kubernetes' `securityContext.capabilities` spells them (`NET_RAW`, with or without `CAP_`).
//!
//! A container starts with the OCI runtime's minimal set ([`DEFAULT`]: what `runc spec`
//! writes, fewer than Docker's). `drop` removes any of them (`ALL`: every one); `add` may
//! give one of [`EXTRA`]: those of Docker's defaults that act only on the container's own
//! files and processes (`CHOWN`, `SETUID`, …) and locked memory (counted in its memory
//! limit). Containers share the device's network namespace, so `NET_RAW` (capture and spoof
//! on every interface) is not among them; nor `SYS_NICE` (real-time threads escape the CPU
//! limit and starve the device), `WAKE_ALARM`, `MKNOD`, `SYS_ADMIN`, `NET_ADMIN`,
//! `SYS_TIME`, `SYS_RAWIO`, `SYS_MODULE`, `SYS_PTRACE`, `BPF` or any other: they act on the
//! whole device and are refused at apply (a privileged container, which has them all, needs
//! the fleet's policy and the device's consent: [`crate::policy::fleet`]). The agent
//! checks the same rule again before it starts a container. Added capabilities reach a
//! non-root process only through its bounding, permitted and effective sets, as in
//! Kubernetes: they are not ambient, so a non-root `USER` does not gain them.

/// The capabilities every container has unless it drops them.
pub const DEFAULT: &[&str] = &["AUDIT_WRITE", "KILL", "NET_BIND_SERVICE"];

/// What `add` may give besides the defaults.
pub const EXTRA: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Every capability name Linux knows (for clear errors: a typo is not "not allowed"), in the
/// order of their numbers (`CAP_CHOWN` is 0): what a privileged container gets, of those
/// the agent itself holds (see [`crate::policy::fleet`]).
pub const KNOWN: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities of `bounding` (a bit per capability number, as `/proc/self/status`
/// writes `CapBnd`) by name; `None`: every known one.
pub fn held(bounding: Option<u64>) -> Vec<&'static str> {
    KNOWN
        .iter()
        .enumerate()
        .filter(|(i, _)| bounding.is_none_or(|b| b >> i & 1 == 1))
        .map(|(_, n)| *n)
        .collect()
}

/// `name` without `CAP_`, upper-cased.
fn normal(name: &str) -> String {
    let up = name.to_ascii_uppercase();
    up.strip_prefix("CAP_").map(str::to_string).unwrap_or(up)
}

/// Checks `add` and `drop` (field names in errors under `field`), returning them normalised.
pub fn validate(
    field: &str,
    add: &[String],
    drop: &[String],
    errs: &mut Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let mut out_add = Vec::new();
    for (i, a) in add.iter().enumerate() {
        let n = normal(a);
        if !KNOWN.contains(&n.as_str()) {
            errs.push(format!("{field}.add[{i}] {a:?} is not a Linux capability"));
        } else if !(DEFAULT.contains(&n.as_str()) || EXTRA.contains(&n.as_str())) {
            errs.push(format!(
                "{field}.add[{i}] {a:?} is not allowed: it acts on the whole device; a container may add only {} (privileged containers are not offered)",
                EXTRA.join(", ")
            ));
        } else if !out_add.contains(&n) {
            out_add.push(n);
        }
    }
    let mut out_drop = Vec::new();
    for (i, d) in drop.iter().enumerate() {
        let n = normal(d);
        if n != "ALL" && !KNOWN.contains(&n.as_str()) {
            errs.push(format!(
                "{field}.drop[{i}] {d:?} is not a Linux capability (or ALL)"
            ));
        } else if !out_drop.contains(&n) {
            out_drop.push(n);
        }
    }
    for a in &out_add {
        if out_drop.contains(a) {
            errs.push(format!("{field}: {a:?} is both added and dropped"));
        }
    }
    (out_add, out_drop)
}

/// The capabilities a container runs with: the defaults, less `drop`, plus `add`, each as
/// `CAP_{NAME}`; `None` when `add` names one that is not allowed (the agent refuses it).
pub fn effective(add: &[String], drop: &[String]) -> Option<Vec<String>> {
    let mut set: Vec<String> = if drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        DEFAULT
            .iter()
            .filter(|c| !drop.iter().any(|d| d == *c))
            .map(|c| c.to_string())
            .collect()
    };
    for a in add {
        if !(DEFAULT.contains(&a.as_str()) || EXTRA.contains(&a.as_str())) {
            return None;
        }
        if !set.contains(a) {
            set.push(a.clone());
        }
    }
    set.sort();
    Some(set.into_iter().map(|c| format!("CAP_{c}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn only_capabilities_that_stay_in_the_container_are_added() {
        let mut errs = Vec::new();
        let (add, drop) = validate("c", &v(&["cap_setuid", "CHOWN"]), &v(&["all"]), &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(add, ["SETUID", "CHOWN"]);
        assert_eq!(effective(&add, &drop).unwrap(), ["CAP_CHOWN", "CAP_SETUID"]);
        // Acting on the whole device: refused, however common elsewhere.
        for cap in ["NET_RAW", "SYS_NICE", "WAKE_ALARM", "MKNOD"] {
            let mut errs = Vec::new();
            validate("c", &v(&[cap]), &[], &mut errs);
            assert_eq!(errs.len(), 1, "{cap}");
        }
        let mut errs = Vec::new();
        validate(
            "c",
            &v(&["SYS_ADMIN", "NET_ADMN", "CHOWN"]),
            &v(&["CHOWN", "EVERYTHING"]),
            &mut errs,
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0]
            .starts_with("c.add[0] \"SYS_ADMIN\" is not allowed: it acts on the whole device"));
        assert_eq!(errs[1], "c.add[1] \"NET_ADMN\" is not a Linux capability");
        assert_eq!(
            errs[2],
            "c.drop[1] \"EVERYTHING\" is not a Linux capability (or ALL)"
        );
        assert_eq!(errs[3], "c: \"CHOWN\" is both added and dropped");
        // The agent's own check.
        assert_eq!(effective(&v(&["SYS_ADMIN"]), &[]), None);
        let none = effective(&[], &[]).unwrap();
        assert_eq!(none.len(), DEFAULT.len());
        let less = effective(&[], &v(&["NET_RAW"])).unwrap();
        assert!(!less.contains(&"CAP_NET_RAW".to_string()));
    }
}

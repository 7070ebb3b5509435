//! The seccomp profile every container runs under: containerd's default one, the profile
//! `ctr run --seccomp` and the CRI plugin give, written out here as data because no
//! maintained crate carries it. The facts (which system calls are allowed, with which
//! argument checks, on which architectures and with which capabilities) follow
//! `DefaultProfile` in containerd's `contrib/seccomp` package as of containerd 2.x (the
//! profile rides in the OCI spec's `linux.seccomp`, which runc compiles into a BPF filter).
//! Anything not listed fails with `EPERM`; `clone3` fails with `ENOSYS` instead, so that C libraries fall back to
//! `clone`, whose namespace flags are checked. Unlike containerd's, `socketcall` fails with
//! `ENOSYS` too: through it the 32-bit ABIs (also reachable from x86_64) would open the
//! socket families the `socket` rule refuses.
//!
//! Names the host's libseccomp does not know (system calls newer than it) are skipped by
//! runc, so one list serves old and new devices alike.

use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg,
    LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};
use oci_spec::OciSpecError;

/// Allowed whatever their arguments, on every architecture.
const ALWAYS: &str = "
_llseek _newselect accept accept4 access adjtimex alarm bind brk cachestat capget capset
chdir chmod chown chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64
clock_gettime clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range
connect copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl
epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve
execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark
fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync
ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake
futimesat get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid
getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername
getpgid getpgrp getpid getppid getpriority getrandom getresgid getresgid32 getresuid
getresuid32 getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday getuid
getuid32 getxattr getxattrat inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64 io_setup io_submit
ioctl ioprio_get ioprio_set ipc kill landlock_add_rule landlock_create_ruleset
landlock_restrict_self lchown lchown32 lgetxattr link linkat listen listmount listxattr
listxattrat llistxattr lremovexattr lseek lsetxattr lsm_get_self_attr lsm_list_modules
lsm_set_self_attr lstat lstat64 madvise map_shadow_stack membarrier memfd_create
memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect
mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap name_to_handle_at nanosleep newfstatat open openat openat2 pause
pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll
ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv
recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr removexattrat rename
renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64
rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min sched_getaffinity
sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto set_robust_list
set_thread_area set_tid_address setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32
setgroups setgroups32 setitimer setpgid setpriority setregid setregid32 setresgid
setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit setsid setsockopt setuid
setuid32 setxattr setxattrat shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 sigprocmask sigreturn socketpair splice stat stat64 statfs statfs64
statmount statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat
uretprobe utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write
writev";

/// Allowed on one architecture only (Rust's `target_arch` names).
const BY_ARCH: [(&str, &str); 3] = [
    ("x86_64", "arch_prctl modify_ldt"),
    (
        "aarch64",
        "arm_fadvise64_64 arm_sync_file_range breakpoint cacheflush set_tls sync_file_range2",
    ),
    (
        "arm",
        "arm_fadvise64_64 arm_sync_file_range breakpoint cacheflush set_tls sync_file_range2",
    ),
];

/// Allowed from Linux 4.8 on: older kernels ran seccomp before ptrace, so a tracer could
/// get around the filter.
const TRACING: &str = "process_vm_readv process_vm_writev ptrace";

/// Allowed when the container's bounding set holds the capability (they would fail
/// without it anyway).
const BY_CAPABILITY: [(Capability, &str); 14] = [
    (Capability::DacReadSearch, "open_by_handle_at"),
    (
        Capability::SysAdmin,
        "bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount \
         mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd \
         setdomainname sethostname setns syslog umount umount2 unshare",
    ),
    (Capability::SysBoot, "reboot"),
    (Capability::SysChroot, "chroot"),
    (
        Capability::SysModule,
        "delete_module init_module finit_module",
    ),
    (Capability::SysPacct, "acct"),
    (
        Capability::SysPtrace,
        "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
    ),
    (Capability::SysRawio, "iopl ioperm"),
    (
        Capability::SysTime,
        "settimeofday stime clock_settime clock_settime64",
    ),
    (Capability::SysTtyConfig, "vhangup"),
    (Capability::SysNice, "set_mempolicy_home_node"),
    (Capability::Syslog, "syslog"),
    (Capability::Bpf, "bpf"),
    (Capability::Perfmon, "perf_event_open"),
];

/// `personality(2)` arguments allowed: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `UNAME26 | PER_LINUX32`, and `0xffffffff` (which only asks for the current persona).
const PERSONAS: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The `clone(2)` flags that make new namespaces: refused without `CAP_SYS_ADMIN`.
const NEW_NAMESPACES: u64 = 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET

/// `socket(2)` address families refused: `AF_ALG` (38, the kernel's crypto API) and
/// `AF_VSOCK` (40). Allowed as three ranges (below 38, 39, above 40), one condition each:
/// runc joins several conditions on one argument with OR, not AND.
const AF_ALG: u64 = 38;
const AF_VSOCK: u64 = 40;

const ENOSYS: u32 = 38;

/// What the profile depends on besides the container: the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host<'a> {
    /// `std::env::consts::ARCH`.
    pub arch: &'a str,
    /// `(major, minor)` of the running kernel; `None` when unknown (tracing stays refused).
    pub kernel: Option<(u32, u32)>,
    /// The agent's own bounding capabilities (`CapBnd`): a privileged container gets these,
    /// which runc can give; `None` when unknown (then every known one).
    pub cap_bounding: Option<u64>,
}

/// `CapBnd` of a `/proc/PID/status` text.
pub fn cap_bounding(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The default profile for a container whose bounding set is `bounding`, on `host`.
pub fn default_profile(host: &Host, bounding: &Capabilities) -> Result<LinuxSeccomp, OciSpecError> {
    let (arch, kernel) = (host.arch, host.kernel);
    let mut rules = vec![allow(ALWAYS, vec![])];
    for (value, op) in [
        (AF_ALG, LinuxSeccompOperator::ScmpCmpLt),
        (AF_ALG + 1, LinuxSeccompOperator::ScmpCmpEq),
        (AF_VSOCK, LinuxSeccompOperator::ScmpCmpGt),
    ] {
        rules.push(allow("socket", vec![arg(0, value, op)?]));
    }
    for persona in PERSONAS {
        rules.push(allow(
            "personality",
            vec![arg(0, persona, LinuxSeccompOperator::ScmpCmpEq)?],
        ));
    }
    if kernel.is_some_and(|k| k >= (4, 8)) {
        rules.push(allow(TRACING, vec![]));
    }
    for (a, names) in BY_ARCH {
        if a == arch {
            rules.push(allow(names, vec![]));
        }
    }
    for (cap, names) in BY_CAPABILITY {
        if bounding.contains(&cap) {
            rules.push(allow(names, vec![]));
        }
    }
    if !bounding.contains(&Capability::SysAdmin) {
        // clone's flags are its first argument (the second on s390, which Shoal does not
        // build for).
        let flags = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(NEW_NAMESPACES)
            .value_two(0u64)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()?;
        rules.push(allow("clone", vec![flags]));
        let mut clone3 = rule("clone3", LinuxSeccompAction::ScmpActErrno);
        clone3.set_errno_ret(Some(ENOSYS));
        rules.push(clone3);
    }
    // `socketcall` (the 32-bit ABIs' multiplexer) would open socket families the `socket`
    // rule refuses (AF_ALG, AF_VSOCK), even from a 64-bit process through `int 0x80`: it
    // fails with ENOSYS, and C libraries use the direct calls (Linux 4.3 and later).
    let mut socketcall = rule("socketcall", LinuxSeccompAction::ScmpActErrno);
    socketcall.set_errno_ret(Some(ENOSYS));
    rules.push(socketcall);
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActErrno);
    profile.set_architectures(Some(architectures(arch)));
    profile.set_syscalls(Some(rules));
    Ok(profile)
}

/// The seccomp architectures a process on `arch` may use: the native one and the
/// compatibility ABIs the kernel also runs there. An unlisted `arch` gets none, which
/// runc reads as the native one only.
fn architectures(arch: &str) -> Vec<Arch> {
    match arch {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => vec![Arch::ScmpArchArm, Arch::ScmpArchAarch64],
        "arm" => vec![Arch::ScmpArchArm],
        _ => vec![],
    }
}

fn rule(names: &str, action: LinuxSeccompAction) -> LinuxSyscall {
    let mut r = LinuxSyscall::default();
    r.set_names(names.split_whitespace().map(str::to_string).collect());
    r.set_action(action);
    r
}

fn allow(names: &str, args: Vec<LinuxSeccompArg>) -> LinuxSyscall {
    let mut r = rule(names, LinuxSeccompAction::ScmpActAllow);
    if !args.is_empty() {
        r.set_args(Some(args));
    }
    r
}

fn arg(
    index: usize,
    value: u64,
    op: LinuxSeccompOperator,
) -> Result<LinuxSeccompArg, OciSpecError> {
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op)
        .build()
}

/// `(major, minor)` of a kernel release string (`/proc/sys/kernel/osrelease`, e.g.
/// `6.1.0-18-amd64`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rule allowing `name`, as (action, args).
    fn rules_for(p: &LinuxSeccomp, name: &str) -> Vec<LinuxSyscall> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.names().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    fn unconditional(p: &LinuxSeccomp, name: &str) -> bool {
        rules_for(p, name).iter().any(|r| {
            r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().as_ref().is_none_or(Vec::is_empty)
        })
    }

    fn host(arch: &str, kernel: Option<(u32, u32)>) -> Host<'_> {
        Host {
            arch,
            kernel,
            cap_bounding: None,
        }
    }

    fn oci_default_caps() -> Capabilities {
        [
            Capability::AuditWrite,
            Capability::Kill,
            Capability::NetBindService,
        ]
        .into()
    }

    #[test]
    fn refuses_by_default_and_allows_the_usual_calls() {
        let p = default_profile(&host("x86_64", Some((6, 1))), &oci_default_caps()).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), None, "EPERM");
        for name in [
            "read",
            "openat",
            "execve",
            "futex",
            "setuid",
            "ptrace",
            "arch_prctl",
        ] {
            assert!(unconditional(&p, name), "{name}");
        }
        for name in [
            "mount",
            "unshare",
            "setns",
            "reboot",
            "kexec_load",
            "bpf",
            "keyctl",
            "add_key",
            "init_module",
            "chroot",
            "socket",
            "clone",
            "personality",
            "acct",
        ] {
            assert!(
                !unconditional(&p, name),
                "{name} must not be allowed outright"
            );
        }
        // The list has no name twice.
        let names: Vec<&str> = ALWAYS.split_whitespace().collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    #[test]
    fn architectures_follow_the_device() {
        let caps = oci_default_caps();
        let table: [(&str, &[Arch], &str, bool); 4] = [
            (
                "x86_64",
                &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
                "arch_prctl",
                true,
            ),
            (
                "aarch64",
                &[Arch::ScmpArchArm, Arch::ScmpArchAarch64],
                "set_tls",
                true,
            ),
            ("arm", &[Arch::ScmpArchArm], "cacheflush", true),
            ("riscv64", &[], "arch_prctl", false),
        ];
        for (arch, want, special, allowed) in table {
            let p = default_profile(&host(arch, Some((6, 1))), &caps).unwrap();
            assert_eq!(p.architectures().as_deref(), Some(want), "{arch}");
            assert_eq!(unconditional(&p, special), allowed, "{arch}: {special}");
        }
        let x86 = default_profile(&host("x86_64", None), &caps).unwrap();
        assert!(!unconditional(&x86, "set_tls"));
    }

    #[test]
    fn clone_may_not_make_namespaces_without_sys_admin() {
        let p = default_profile(&host("x86_64", Some((6, 1))), &oci_default_caps()).unwrap();
        let clone = rules_for(&p, "clone");
        assert_eq!(clone.len(), 1);
        let a = clone[0].args().clone().unwrap_or_default();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].index(), a[0].value(), a[0].value_two(), a[0].op()),
            (
                0,
                0x7e02_0000,
                Some(0),
                LinuxSeccompOperator::ScmpCmpMaskedEq
            )
        );
        let clone3 = rules_for(&p, "clone3");
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(38));

        let mut admin = oci_default_caps();
        admin.insert(Capability::SysAdmin);
        let p = default_profile(&host("x86_64", Some((6, 1))), &admin).unwrap();
        assert!(unconditional(&p, "clone") && unconditional(&p, "mount"));
        assert!(rules_for(&p, "clone3")
            .iter()
            .all(|r| r.action() == LinuxSeccompAction::ScmpActAllow));
    }

    #[test]
    fn argument_checks_for_socket_and_personality() {
        let p = default_profile(&host("aarch64", Some((6, 1))), &oci_default_caps()).unwrap();
        let socket: Vec<(u64, LinuxSeccompOperator)> = rules_for(&p, "socket")
            .iter()
            .flat_map(|r| r.args().clone().unwrap_or_default())
            .map(|a| (a.value(), a.op()))
            .collect();
        use LinuxSeccompOperator::*;
        assert_eq!(socket, [(38, ScmpCmpLt), (39, ScmpCmpEq), (40, ScmpCmpGt)]);
        let personas: Vec<u64> = rules_for(&p, "personality")
            .iter()
            .flat_map(|r| r.args().clone().unwrap_or_default())
            .map(|a| a.value())
            .collect();
        assert_eq!(personas, PERSONAS);
    }

    #[test]
    fn tracing_needs_a_kernel_of_4_8_or_later() {
        let caps = oci_default_caps();
        for (kernel, allowed) in [
            (Some((4, 7)), false),
            (Some((4, 8)), true),
            (Some((6, 1)), true),
            (None, false),
        ] {
            let p = default_profile(&host("x86_64", kernel), &caps).unwrap();
            assert_eq!(unconditional(&p, "ptrace"), allowed, "{kernel:?}");
        }
        for (release, want) in [
            ("6.1.0-18-amd64\n", Some((6, 1))),
            ("4.8", Some((4, 8))),
            ("5.15.0-rpi", Some((5, 15))),
            ("", None),
            ("x.y", None),
        ] {
            assert_eq!(kernel_version(release), want, "{release:?}");
        }
    }

    #[test]
    fn the_profile_is_what_runc_reads() {
        let p = default_profile(&host("x86_64", Some((6, 1))), &oci_default_caps()).unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["architectures"][0], "SCMP_ARCH_X86_64");
        let clone3 = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"][0] == "clone3")
            .unwrap();
        assert_eq!(clone3["errnoRet"], 38);
        assert_eq!(clone3["action"], "SCMP_ACT_ERRNO");
    }
}

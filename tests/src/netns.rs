//! Multi-host end-to-end tests on one machine: a [`Lan`] of Linux network namespaces joined by a
//! bridge, with real multicast (mDNS, `224.0.0.251:5353`) between the hosts.
//!
//! ```text
//!   host ns 0              host ns 1              host ns 2          (one per host)
//!   lo, lan0 10.a.b.1      lo, lan1 10.a.b.2      lo, lan2 10.a.b.3
//!        │ veth                 │ veth                 │ veth
//!   ┌────┴──────────────────────┴──────────────────────┴────┐
//!   │ switch ns: port0, port1, port2 enslaved to br0         │  (mcast_snooping 0)
//!   └────────────────────────────────────────────────────────┘
//! ```
//!
//! Nothing is created in the root namespace, so interface names are short and fixed (`br0`,
//! `port{i}` in the switch, `lan{i}` in host `i`) and cannot clash between Lans or test
//! binaries; only the namespace names (`shoal-e2e-{pid}-{start}-{n}-…`, global in
//! `/run/netns`) carry the creating process's pid and start time and a per-process counter.
//! Each Lan also gets its own `10.a.b.0/24` (`a` ≥ 200), distinct from every other live Lan.
//!
//! Multicast needs three things, all set up here: the interfaces are up with `multicast on`;
//! each host has a route `224.0.0.0/4 dev lan{i}` (without it a socket that joins a group on
//! `INADDR_ANY` gets `ENODEV` and a send without `IP_MULTICAST_IF` gets `ENETUNREACH`, because
//! the hosts have no default route); and the bridge has multicast snooping off, so group
//! traffic is flooded to every port. IPv6 duplicate address detection is off on the host
//! interfaces, so their link-local addresses are usable at once.
//!
//! Running a process on a host: build it with [`Lan::command`] and spawn it as usual, e.g.
//! `Proc::spawn("agent-1", lan.command(1, bin("shoal-agent")).args([...]), log)`. `ip netns
//! exec` execs the program in place, so the [`crate::Proc`] kills the program itself. Dropping
//! the [`Lan`] kills whatever still runs in its namespaces before deleting them (a process
//! would otherwise keep a deleted namespace, and its interfaces, alive).
//!
//! Needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and iproute2. Without root, [`Lan::new`]
//! prints a loud `SKIPPED` message and returns `Ok(None)`; set `SHOAL_E2E_REQUIRE_NETNS=1`
//! to make that an error instead (CI that must run these tests).

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Every namespace this harness creates is named `{NS_PREFIX}{pid}-{start}-{n}-{role}`.
pub const NS_PREFIX: &str = "shoal-e2e-";

/// The bridge's name, inside the switch namespace.
const BRIDGE: &str = "br0";

/// Subnets are `10.{200 + k / 256}.{k % 256}.0/24` for `k < SUBNETS`.
const SUBNETS: u32 = 56 * 256;

/// Set to `1` to turn the "not root" skip into an error.
const REQUIRE_ENV: &str = "SHOAL_E2E_REQUIRE_NETNS";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Serialises Lan creation within the process (the first `ip netns add` sets up the
/// `/run/netns` mount; concurrent first calls would race on it).
static CREATE: Mutex<()> = Mutex::new(());

/// One host of a [`Lan`].
struct Host {
    ns: String,
    iface: String,
    port: String,
    addr: Ipv4Addr,
}

/// A LAN of `hosts` network namespaces on one bridge. Host `i` has interface `lan{i}` with
/// address `10.a.b.{i+1}/24`. Dropping it kills the processes left in its namespaces and
/// deletes them.
pub struct Lan {
    tag: String,
    subnet: [u8; 2],
    switch: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, deleted on drop (also when `new` fails half-way).
    created: Vec<String>,
}

impl Lan {
    /// Creates a LAN of `hosts` hosts (at most 254), first sweeping namespaces left by dead
    /// test processes ([`sweep_stale`]).
    ///
    /// Returns `Ok(None)`, after printing a loud `SKIPPED` message to stderr, when the process
    /// is not root or creating a namespace is not permitted (unless `SHOAL_E2E_REQUIRE_NETNS=1`);
    /// any other failure is an error. Tests start with
    /// `let Some(lan) = Lan::new(3)? else { return Ok(()) };`.
    pub fn new(hosts: usize) -> Result<Option<Lan>> {
        if hosts > 254 {
            bail!("a Lan has at most 254 hosts (asked for {hosts})");
        }
        if !is_root() {
            return skip("the process is not root");
        }
        let _guard = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        sweep_stale();

        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{}-{n}", start_time(pid).unwrap_or(0));
        let subnet = pick_subnet(pid, n);
        let switch = format!("{NS_PREFIX}{tag}-sw-{}-{}", subnet[0], subnet[1]);

        // The first namespace tells whether we may create namespaces at all.
        let out = ip_output(&["netns", "add", &switch])?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") || err.contains("Permission denied") {
                return skip(&format!("`ip netns add` failed: {}", err.trim()));
            }
            bail!("ip netns add {switch}: {}", err.trim());
        }
        let mut lan = Lan {
            tag: tag.clone(),
            subnet,
            switch: switch.clone(),
            hosts: Vec::with_capacity(hosts),
            created: vec![switch.clone()],
        };

        ip_ns(&switch, &["link", "set", "lo", "up"])?;
        ip_ns(
            &switch,
            &[
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
                "forward_delay",
                "0",
                "stp_state",
                "0",
            ],
        )?;
        ip_ns(&switch, &["link", "set", BRIDGE, "up"])?;

        for i in 0..hosts {
            let ns = format!("{NS_PREFIX}{tag}-h{i}");
            ip(&["netns", "add", &ns])?;
            lan.created.push(ns.clone());
            let host = Host {
                iface: format!("lan{i}"),
                port: format!("port{i}"),
                addr: Ipv4Addr::new(10, subnet[0], subnet[1], i as u8 + 1),
                ns,
            };
            lan.wire(&host)?;
            lan.hosts.push(host);
        }
        Ok(Some(lan))
    }

    /// Sets up host `h`: loopback, the veth pair to the bridge, its address and the
    /// multicast route.
    fn wire(&self, h: &Host) -> Result<()> {
        let (ns, iface, port) = (h.ns.as_str(), h.iface.as_str(), h.port.as_str());
        ip_ns(ns, &["link", "set", "lo", "up"])?;
        ip_ns(
            &self.switch,
            &[
                "link", "add", port, "type", "veth", "peer", "name", iface, "netns", ns,
            ],
        )?;
        ip_ns(&self.switch, &["link", "set", port, "master", BRIDGE, "up"])?;
        // Best effort (IPv6 may be disabled): no DAD, so the link-local address is not
        // "tentative" for a second or two after the link comes up.
        let _ = Command::new(ip_bin())
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{iface}.accept_dad=0"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        ip_ns(ns, &["link", "set", iface, "multicast", "on", "up"])?;
        ip_ns(
            ns,
            &["addr", "add", &format!("{}/24", h.addr), "dev", iface],
        )?;
        // No default route in a host: multicast needs its own (joins on INADDR_ANY and sends
        // without IP_MULTICAST_IF look the group up in the routing table).
        ip_ns(ns, &["route", "add", "224.0.0.0/4", "dev", iface])?;
        Ok(())
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the Lan has no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// This Lan's unique tag, `{pid}-{start}-{n}` (part of every namespace name).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The Lan's subnet, `10.a.b.0` (prefix length 24).
    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet[0], self.subnet[1], 0)
    }

    /// Address of host `i`, `10.a.b.{i+1}`. Panics if `i` is out of range.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.hosts[i].addr
    }

    /// Name of host `i`'s network namespace (for `ip netns exec`, `ip -n`).
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i].ns
    }

    /// Name of host `i`'s interface on the LAN, inside its namespace (`lan{i}`).
    pub fn iface(&self, i: usize) -> &str {
        &self.hosts[i].iface
    }

    /// Name of the switch namespace holding the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// A command running `program` in host `i`'s namespace (`ip netns exec NS program`); add
    /// arguments and environment, then spawn it (e.g. with [`crate::Proc::spawn`]). The child's
    /// pid is the program's own: `ip netns exec` execs it in place.
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(ip_bin());
        c.args(["netns", "exec", self.ns(i)]).arg(program);
        c
    }

    /// Plugs host `i`'s cable out (`up = false`) or back in (`up = true`): sets its port on the
    /// switch down or up. The host sees its interface lose carrier but keeps its address and
    /// routes, so nothing has to be restored when the link comes back.
    pub fn set_link(&self, i: usize, up: bool) -> Result<()> {
        let port = &self.hosts[i].port;
        ip_ns(
            &self.switch,
            &["link", "set", port, if up { "up" } else { "down" }],
        )
        .with_context(|| {
            format!(
                "cannot set host {i}'s link {}",
                if up { "up" } else { "down" }
            )
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            kill_processes_in(ns);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: cannot delete network namespace {ns}: {e:#}");
            }
        }
    }
}

/// Deletes namespaces left by this harness in processes that are gone (a test binary killed
/// before its `Lan`s were dropped), killing whatever still runs in them. Best effort: errors
/// are ignored. Called by [`Lan::new`].
pub fn sweep_stale() {
    if start_time(std::process::id()).is_none() {
        return; // no /proc to tell live owners from dead ones
    }
    for ns in harness_namespaces() {
        let Some((pid, start)) = owner(&ns) else {
            continue;
        };
        if start_time(pid) == Some(start) {
            continue; // its process is alive
        }
        kill_processes_in(&ns);
        let _ = ip_output(&["netns", "del", &ns]);
    }
}

/// Names of the namespaces in `/run/netns` that this harness created (any process).
fn harness_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(NS_PREFIX))
        .collect()
}

/// `(pid, start time)` of the process that created namespace `ns`.
fn owner(ns: &str) -> Option<(u32, u64)> {
    let mut parts = ns.strip_prefix(NS_PREFIX)?.split('-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    Some((pid, start))
}

/// Start time of process `pid` (clock ticks since boot, field 22 of `/proc/{pid}/stat`), so
/// a reused pid is told apart from the process that created a namespace.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" of the command name start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A subnet index derived from pid and counter, moved on past subnets used by live Lans
/// (encoded in their switch namespace names).
fn pick_subnet(pid: u32, n: u32) -> [u8; 2] {
    let used: HashSet<[u8; 2]> = harness_namespaces()
        .iter()
        .filter_map(|ns| {
            let mut p = ns.rsplit('-');
            let b = p.next()?.parse().ok()?;
            let a = p.next()?.parse().ok()?;
            (p.next()? == "sw").then_some([a, b])
        })
        .collect();
    let subnet = |k: u32| [(200 + k / 256) as u8, (k % 256) as u8];
    let first = pid.wrapping_mul(131).wrapping_add(n) % SUBNETS;
    (0..SUBNETS)
        .map(|d| subnet((first + d) % SUBNETS))
        .find(|s| !used.contains(s))
        .unwrap_or(subnet(first))
}

/// SIGKILLs every process in namespace `ns` and waits (up to 2 s) until they are gone.
fn kill_processes_in(ns: &str) {
    let t0 = Instant::now();
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() {
            return;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            eprintln!("warning: processes {pids:?} in namespace {ns} survived SIGKILL");
            return;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of the processes in namespace `ns` (`ip netns pids`), zombies excluded.
fn pids_in(ns: &str) -> Vec<String> {
    let Ok(out) = ip_output(&["netns", "pids", ns]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|p| {
            // A zombie has left its namespace already; only its parent can reap it.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect()
}

/// Whether the effective uid is 0 (from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?;
            Some(line.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

fn skip(why: &str) -> Result<Option<Lan>> {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        bail!("network-namespace tests need root (CAP_NET_ADMIN) and {REQUIRE_ENV}=1: {why}");
    }
    let bar = "=".repeat(78);
    eprintln!(
        "\n{bar}\nSKIPPED: network-namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): \
         {why}.\nRun them as root (set {REQUIRE_ENV}=1 to fail instead of skipping).\n{bar}\n"
    );
    Ok(None)
}

/// The `ip` binary (root's PATH has `/usr/sbin`, a user's may not).
fn ip_bin() -> &'static str {
    static IP: OnceLock<&'static str> = OnceLock::new();
    IP.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("ip")
    })
}

fn ip_output(args: &[&str]) -> Result<std::process::Output> {
    Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `ip` (is iproute2 installed?): ip {}",
                args.join(" ")
            )
        })
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = ip_output(args)?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n NS ARGS`.
fn ip_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, ChildStdout};

    /// Joins `group` on the interface with address `ifaddr` (`0.0.0.0`: let the routing table
    /// choose), prints `ready`, then prints `src payload` for each distinct datagram on `port`
    /// until it has seen `count` of them (exits 1 after 5 s without).
    const MCAST_RECV: &str = r#"
import socket, sys
group, ifaddr, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(group) + socket.inet_aton(ifaddr))
print("ready", flush=True)
s.settimeout(5)
seen = set()
while len(seen) < count:
    data, src = s.recvfrom(2048)
    msg = data.decode()
    if msg not in seen:
        seen.add(msg)
        print(src[0], msg, flush=True)
"#;

    /// Sends `via-if` (IP_MULTICAST_IF = `ifaddr`) and `via-route` (no IP_MULTICAST_IF) to
    /// `group:port` with TTL 1, three times each.
    const MCAST_SEND: &str = r#"
import socket, sys, time
group, ifaddr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def sock(ifa):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    if ifa:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ifa))
    return s
a, b = sock(ifaddr), sock(None)
for _ in range(3):
    a.sendto(b"via-if", (group, port))
    b.sendto(b"via-route", (group, port))
    time.sleep(0.1)
"#;

    /// Listens on TCP `addr:port`, prints `ready`, accepts one connection (5 s at most) and
    /// prints the peer's address.
    const TCP_LISTEN: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
s.settimeout(5)
c, peer = s.accept()
print(peer[0], flush=True)
"#;

    /// Connects to TCP `addr:port` within 1 s (exit 0) or fails (exit 1).
    const TCP_CONNECT: &str = r#"
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
"#;

    /// A background process, killed on drop, whose first stdout line was `ready`.
    struct Bg {
        child: Child,
        out: BufReader<ChildStdout>,
    }

    impl Bg {
        fn start(lan: &Lan, i: usize, script: &str, args: &[String]) -> Bg {
            let mut child = lan
                .command(i, "python3")
                .arg("-c")
                .arg(script)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "helper on host {i} did not start");
            Bg { child, out }
        }

        /// Waits for the exit; returns success and the rest of stdout.
        fn finish(mut self) -> (bool, String) {
            let mut rest = String::new();
            self.out.read_to_string(&mut rest).unwrap();
            (self.child.wait().unwrap().success(), rest)
        }
    }

    impl Drop for Bg {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn python(lan: &Lan, i: usize, script: &str, args: &[String]) -> bool {
        lan.command(i, "python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Host `from` can open a TCP connection to host `to` (checked by the listener too).
    fn tcp_reaches(lan: &Lan, from: usize, to: usize, port: u16) -> bool {
        let target = lan.addr(to).to_string();
        let listener = Bg::start(lan, to, TCP_LISTEN, &[target.clone(), port.to_string()]);
        if !python(lan, from, TCP_CONNECT, &[target, port.to_string()]) {
            return false;
        }
        let (ok, out) = listener.finish();
        assert!(ok, "listener on host {to} failed");
        assert_eq!(out.trim(), lan.addr(from).to_string());
        true
    }

    fn harness_ns_of(tag: &str) -> Vec<String> {
        let out = Command::new(ip_bin())
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{NS_PREFIX}{tag}-")))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn lan_unicast_multicast_partition_cleanup() {
        let Some(lan) = Lan::new(3).unwrap() else {
            return;
        };
        let tag = lan.tag().to_string();
        assert_eq!(harness_ns_of(&tag).len(), 4, "switch + 3 hosts");
        assert_eq!(lan.addr(2), {
            let s = lan.subnet().octets();
            Ipv4Addr::new(s[0], s[1], s[2], 3)
        });
        let bridge = Command::new(ip_bin())
            .args(["-n", lan.switch_ns(), "-d", "link", "show", BRIDGE])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&bridge.stdout).contains("mcast_snooping 0"));

        // Loopback works inside a host.
        let lo = Bg::start(&lan, 1, TCP_LISTEN, &["127.0.0.1".into(), "7000".into()]);
        assert!(python(
            &lan,
            1,
            TCP_CONNECT,
            &["127.0.0.1".into(), "7000".into()]
        ));
        assert!(lo.finish().0);

        // Unicast across the bridge.
        assert!(tcp_reaches(&lan, 0, 2, 7001), "host 0 cannot reach host 2");

        // Multicast: host 2 joins on its interface address, host 1 on INADDR_ANY (routing
        // table); host 0 sends with and without IP_MULTICAST_IF.
        let group = "224.0.0.251".to_string();
        let port = "5353".to_string();
        let r2 = Bg::start(
            &lan,
            2,
            MCAST_RECV,
            &[
                group.clone(),
                lan.addr(2).to_string(),
                port.clone(),
                "2".into(),
            ],
        );
        let r1 = Bg::start(
            &lan,
            1,
            MCAST_RECV,
            &[group.clone(), "0.0.0.0".into(), port.clone(), "2".into()],
        );
        assert!(python(
            &lan,
            0,
            MCAST_SEND,
            &[group.clone(), lan.addr(0).to_string(), port.clone()]
        ));
        for (i, r) in [(2, r2), (1, r1)] {
            let (ok, out) = r.finish();
            assert!(ok, "host {i} missed multicast; got {out:?}");
            let mut lines: Vec<&str> = out.lines().collect();
            lines.sort();
            let from = lan.addr(0);
            assert_eq!(
                lines,
                [format!("{from} via-if"), format!("{from} via-route")]
            );
        }

        // Partition: host 2's cable out, then back in.
        lan.set_link(2, false).unwrap();
        assert!(!tcp_reaches(&lan, 0, 2, 7002), "host 2 still reachable");
        lan.set_link(2, true).unwrap();
        assert!(
            tcp_reaches(&lan, 0, 2, 7003),
            "host 2 unreachable after link up"
        );

        // Drop kills what still runs in the namespaces, then deletes them.
        let mut orphan = lan.command(1, "sleep").arg("600").spawn().unwrap();
        drop(lan);
        // SIGKILL is delivered asynchronously: give the kernel a moment to end it.
        crate::wait_until(
            Duration::from_secs(5),
            "the process in the namespace to end with the Lan",
            || Ok(orphan.try_wait()?.map(|_| ())),
        )
        .unwrap();
        assert_eq!(harness_ns_of(&tag), Vec::<String>::new());
    }

    #[test]
    fn stale_namespaces_are_swept() {
        // Skips (loudly) where namespaces cannot be created.
        let Some(_probe) = Lan::new(0).unwrap() else {
            return;
        };
        // A namespace named as if created by a process that is gone (our pid, but start time
        // 1), with a process still running in it.
        let ns = format!("{NS_PREFIX}{}-1-0-sw-255-255", std::process::id());
        ip(&["netns", "add", &ns]).unwrap();
        let mut orphan = Command::new(ip_bin())
            .args(["netns", "exec", &ns, "sleep", "600"])
            .spawn()
            .unwrap();
        crate::wait_until(Duration::from_secs(5), "sleep in the namespace", || {
            // (Another test process's sweep may have taken it already: fine too.)
            let gone = orphan.try_wait()?.is_some();
            Ok((gone || !pids_in(&ns).is_empty()).then_some(()))
        })
        .unwrap();
        sweep_stale();
        assert!(!harness_namespaces().contains(&ns), "{ns} was not swept");
        crate::wait_until(Duration::from_secs(5), "its process to end", || {
            Ok(orphan.try_wait()?.map(|_| ()))
        })
        .unwrap();
    }

    #[test]
    fn names_parse() {
        assert_eq!(owner("shoal-e2e-123-456-7-h2"), Some((123, 456)));
        assert_eq!(owner("shoal-e2e-123-456-7-sw-200-17"), Some((123, 456)));
        assert_eq!(owner("other-123-456"), None);
        assert!(start_time(std::process::id()).is_some());
    }
}

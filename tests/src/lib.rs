//! Harness for Shoal's end-to-end tests: starts the real `shoal-hub`, `shoal-agent` and
//! `shoal` binaries (and Debian's mosquitto) as processes on loopback, and cleans them up.
//!
//! Binaries are taken from `SHOAL_BIN_DIR`, or from the cargo target directory this test runs
//! from (so `cargo build --workspace` must come first; the README test command does it).
//! Example modules come from `SHOAL_MODULES_DIR` or `modules/dist` (built by
//! `scripts/build-modules.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod boards;
pub mod browser;
pub mod image;
pub mod mqtt;
pub mod netns;
pub mod pty;
pub mod sim;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SHOAL_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/debug/deps/<test binary> → target/debug
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace` first (or set SHOAL_BIN_DIR)",
        p.display()
    );
    p
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of an example module (`hello.wasm`, `ticker.wasm`, `probe.wasm`).
pub fn module(name: &str) -> PathBuf {
    let dir = std::env::var("SHOAL_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("modules").join("dist"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: run scripts/build-modules.sh first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("SHOAL_LOG", "info,rumqttd=warn")
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no chance to clean up (crash test).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn terminate(&mut self, within: Duration) -> Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st.success());
            }
            if t0.elapsed() > within {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a client reaches a broker: its port and, unless the fleet runs `--insecure`, the
/// operator bundle (fleet CA, operator certificate and key) to connect with.
#[derive(Debug, Clone)]
pub struct BrokerAccess {
    pub port: u16,
    pub bundle: Option<PathBuf>,
}

impl BrokerAccess {
    /// `mosquitto_sub`/`mosquitto_pub` arguments for host, port and credentials.
    pub fn mosquitto_args(&self) -> Vec<String> {
        let mut a = vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
        ];
        if let Some(b) = &self.bundle {
            for (flag, file) in [
                ("--cafile", "ca.pem"),
                ("--cert", "operator.pem"),
                ("--key", "operator.key"),
            ] {
                a.push(flag.into());
                a.push(b.join(file).display().to_string());
            }
        }
        a
    }
}

/// What an agent needs to join a fleet: the broker, the hub's HTTP API, and the hub's data
/// directory to issue a join token from (`None`: the fleet runs `--insecure`), or the etcd
/// store hub replicas share (tokens then go to etcd, and enroll through any replica).
#[derive(Debug, Clone)]
pub struct Join {
    pub broker: String,
    pub hub: String,
    pub hub_data: Option<PathBuf>,
    pub etcd: Option<String>,
    /// Whether [`Agent::start`] grants an agent the labels it asks for, through its join
    /// token (the operator's word; a device's own `--labels` steer nothing). `false` plays a
    /// device that claims labels nobody gave it.
    pub grant_labels: bool,
}

impl Join {
    /// A fresh one-time join token.
    pub fn token(&self) -> Result<Option<String>> {
        self.token_with_labels("")
    }

    /// A fresh one-time join token that binds `labels` (`k=v,…`) to the device it enrolls.
    pub fn token_with_labels(&self, labels: &str) -> Result<Option<String>> {
        self.token_for(None, labels)
    }

    /// [`Join::token_with_labels`], bound to `device` when given (the token that enrolls a
    /// wiped board under its old id).
    pub fn token_for(&self, device: Option<&str>, labels: &str) -> Result<Option<String>> {
        let Some(d) = &self.hub_data else {
            return Ok(None);
        };
        let mut cmd = Command::new(bin("shoal-hub"));
        cmd.args(["token", "create"]);
        if let Some(device) = device {
            cmd.args(["--device", device]);
        }
        match &self.etcd {
            Some(url) => cmd.args(["--store", url]),
            None => cmd.arg("--data-dir").arg(d),
        };
        if !labels.is_empty() {
            cmd.args(["--labels", labels]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Some(String::from_utf8(out.stdout)?.trim().to_string()))
    }
}

/// A hub (embedded broker unless `broker` is given), over TLS unless started with
/// `--insecure`.
pub struct Hub {
    pub proc: Proc,
    pub mqtt: u16,
    pub http: u16,
    pub broker_url: String,
    pub data_dir: PathBuf,
    pub insecure: bool,
    /// The etcd store it runs on (`--store etcd://…`).
    pub etcd: Option<String>,
}

impl Hub {
    pub fn start(dir: &Path, external_broker: Option<&str>) -> Result<Hub> {
        Self::start_on(dir, external_broker, free_port(), free_port())
    }

    pub fn start_on(
        dir: &Path,
        external_broker: Option<&str>,
        mqtt: u16,
        http: u16,
    ) -> Result<Hub> {
        Self::start_with(dir, external_broker, mqtt, http, &[])
    }

    /// Like [`Hub::start_on`], with extra `shoal-hub serve` flags.
    pub fn start_with(
        dir: &Path,
        external_broker: Option<&str>,
        mqtt: u16,
        http: u16,
        extra: &[&str],
    ) -> Result<Hub> {
        Self::start_program(
            dir,
            external_broker,
            (mqtt, http),
            extra,
            Command::new(bin("shoal-hub")),
        )
    }

    /// [`Hub::start_with`] running `cmd` as the hub binary (e.g. `prlimit --nofile=N:N
    /// shoal-hub`: `cmd` is the program and its leading arguments).
    pub fn start_program(
        dir: &Path,
        external_broker: Option<&str>,
        (mqtt, http): (u16, u16),
        extra: &[&str],
        mut cmd: Command,
    ) -> Result<Hub> {
        let data_dir = dir.join("hub");
        let insecure = extra.contains(&"--insecure");
        let etcd = extra
            .windows(2)
            .find(|w| w[0] == "--store" && w[1].starts_with("etcd"))
            .map(|w| w[1].to_string());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt}"))
            // Loopback tests stay off the host's LAN; tests/tests/mdns.rs covers discovery.
            .arg("--no-mdns")
            .args(extra);
        let broker_url = match external_broker {
            Some(b) => {
                cmd.arg("--broker").arg(b);
                b.to_string()
            }
            None if insecure => format!("mqtt://127.0.0.1:{mqtt}"),
            None => format!("mqtts://127.0.0.1:{mqtt}"),
        };
        let proc = Proc::spawn("shoal-hub", &mut cmd, dir.join("hub.log"))?;
        let hub = Hub {
            proc,
            mqtt,
            http,
            broker_url,
            data_dir,
            insecure,
            etcd,
        };
        let up = wait_until(Duration::from_secs(20), "hub HTTP API up", || {
            Ok(hub
                .shoal(&["get", "devices"])
                .status
                .success()
                .then_some(()))
        });
        if let Err(e) = up {
            // What the hub said is the first thing to read.
            let log = hub.proc.log_text();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e}\n--- hub log (last lines) ---\n{}", tail.join("\n"));
        }
        Ok(hub)
    }

    pub fn hub_url(&self) -> String {
        let scheme = if self.insecure { "http" } else { "https" };
        format!("{scheme}://127.0.0.1:{}", self.http)
    }

    /// The operator credential bundle the hub wrote (`None` with `--insecure`).
    pub fn bundle(&self) -> Option<PathBuf> {
        (!self.insecure).then(|| self.data_dir.join("operator"))
    }

    /// The embedded broker, as an operator reaches it.
    pub fn access(&self) -> BrokerAccess {
        BrokerAccess {
            port: self.mqtt,
            bundle: self.bundle(),
        }
    }

    /// What an agent needs to join this hub's fleet.
    pub fn join(&self) -> Join {
        Join {
            broker: self.broker_url.clone(),
            hub: self.hub_url(),
            hub_data: (!self.insecure).then(|| self.data_dir.clone()),
            etcd: self.etcd.clone(),
            grant_labels: true,
        }
    }

    /// Runs the `shoal` CLI against this hub.
    pub fn shoal(&self, args: &[&str]) -> Output {
        self.shoal_in(args, None)
    }

    pub fn shoal_in(&self, args: &[&str], cwd: Option<&Path>) -> Output {
        self.shoal_with(args, cwd, &[])
    }

    /// `shoal ARGS`, which must succeed (panics with its stderr otherwise).
    pub fn shoal_ok(&self, args: &[&str]) -> Output {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `shoal ARGS` set up to talk to this hub, not started (for one that runs on).
    pub fn shoal_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("shoal"));
        c.args(args)
            .env("SHOAL_BROKER", &self.broker_url)
            .env("SHOAL_HUB", self.hub_url())
            .env("SHOAL_CREDENTIALS", self.data_dir.join("operator"));
        c
    }

    /// `shoal ARGS` in `cwd` with extra environment variables.
    pub fn shoal_with(&self, args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> Output {
        let mut c = self.shoal_command(args);
        c.envs(env.iter().copied());
        if let Some(d) = cwd {
            c.current_dir(d);
        }
        c.output().expect("run shoal")
    }

    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.shoal(&a);
        if !out.status.success() {
            bail!(
                "shoal {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A scrape of the hub's `/metrics` (over HTTPS with the operator bundle unless the hub
    /// runs `--insecure`).
    pub fn metrics(&self) -> Result<Vec<Sample>> {
        let text = match self.bundle() {
            None => http_get(self.http, "/metrics")?,
            Some(b) => {
                let (_, body) = https_get(
                    self.http,
                    "/metrics",
                    (
                        &b.join("ca.pem"),
                        &b.join("operator.pem"),
                        &b.join("operator.key"),
                    ),
                )?;
                format!("\r\n\r\n{body}")
            }
        };
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        parse_metrics(body)
    }

    /// Whether this hub leads its fleet (`shoal_hub_leader`; `None`: no answer).
    pub fn is_leader(&self) -> Option<bool> {
        let m = self.metrics().ok()?;
        metric(&m, "shoal_hub_leader", &[]).map(|v| v == 1.0)
    }

    pub fn apply(&self, manifest: &Path) -> Result<String> {
        let out = self.shoal(&["apply", "-f", manifest.to_str().unwrap()]);
        if !out.status.success() {
            bail!("apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `shoal get workloads -o json`, as a map name → workload.
    pub fn workloads(&self) -> Result<Vec<Value>> {
        Ok(self
            .json(&["get", "workloads"])?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    pub fn workload(&self, name: &str) -> Result<Option<Value>> {
        Ok(self.workloads()?.into_iter().find(|w| w["name"] == name))
    }

    /// Waits until every replica of `name` is `Running`, returning the workload view.
    pub fn wait_running(&self, name: &str, replicas: usize, within: Duration) -> Result<Value> {
        wait_until(
            within,
            &format!("{name}: {replicas} replicas Running"),
            || {
                let Some(w) = self.workload(name)? else {
                    return Ok(None);
                };
                let reps = w["replicas"].as_array().cloned().unwrap_or_default();
                let running = reps.iter().filter(|r| r["phase"] == "Running").count();
                Ok((reps.len() == replicas && running == replicas).then_some(w))
            },
        )
    }

    pub fn devices(&self) -> Result<Vec<Value>> {
        Ok(self
            .json(&["get", "devices"])?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    pub fn wait_devices_online(&self, n: usize, within: Duration) -> Result<()> {
        wait_until(within, &format!("{n} devices online"), || {
            let online = self
                .devices()?
                .iter()
                .filter(|d| d["online"] == true)
                .count();
            Ok((online == n).then_some(()))
        })
    }
}

pub struct Agent {
    pub proc: Proc,
    pub id: String,
    pub data_dir: PathBuf,
}

impl Agent {
    /// Starts an agent joining the fleet `join` describes (enrolling with a fresh join token
    /// unless it runs `--insecure`).
    pub fn start(dir: &Path, id: &str, labels: &str, join: &Join) -> Result<Agent> {
        Self::start_with(dir, id, labels, join, &[])
    }

    /// [`Agent::start`] with extra flags. Agents run without containerd unless `extra` names
    /// a `--containerd-socket` (a host's own containerd must not leak into tests).
    pub fn start_with(
        dir: &Path,
        id: &str,
        labels: &str,
        join: &Join,
        extra: &[&str],
    ) -> Result<Agent> {
        Self::start_program(
            dir,
            id,
            labels,
            join,
            extra,
            Command::new(bin("shoal-agent")),
        )
    }

    /// [`Agent::start_with`] running `cmd` as the agent binary: e.g. a cross-compiled agent
    /// under `qemu-aarch64` (`cmd` is the program and its leading arguments).
    pub fn start_program(
        dir: &Path,
        id: &str,
        labels: &str,
        join: &Join,
        extra: &[&str],
        cmd: Command,
    ) -> Result<Agent> {
        let token = join.token_with_labels(if join.grant_labels { labels } else { "" })?;
        Self::spawn(dir, id, labels, join, extra, cmd, token)
    }

    /// A board wiped (its data directory removed: a new key) that enrolls again under id
    /// `id`, with a token bound to that id granting `labels`.
    pub fn enroll_again(dir: &Path, id: &str, labels: &str, join: &Join) -> Result<Agent> {
        let _ = std::fs::remove_dir_all(dir.join(id));
        let token = join.token_for(Some(id), labels)?;
        let cmd = Command::new(bin("shoal-agent"));
        Self::spawn(dir, id, labels, join, &[], cmd, token)
    }

    fn spawn(
        dir: &Path,
        id: &str,
        labels: &str,
        join: &Join,
        extra: &[&str],
        mut cmd: Command,
        token: Option<String>,
    ) -> Result<Agent> {
        let data_dir = dir.join(id);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--device-id")
            .arg(id)
            .arg("--labels")
            .arg(labels)
            .arg("--broker")
            .arg(&join.broker)
            .arg("--hub")
            .arg(&join.hub)
            .arg("--memory")
            .arg("1Gi")
            .arg("--no-mdns")
            .arg("--socket")
            .arg(data_dir.join("agent.sock"))
            .args(extra);
        if !extra.contains(&"--containerd-socket") {
            cmd.arg("--no-containerd");
        }
        match token {
            Some(t) => {
                cmd.env("SHOAL_AGENT_JOIN_TOKEN", t);
            }
            None => {
                cmd.arg("--insecure");
            }
        }
        let proc = Proc::spawn(id, &mut cmd, dir.join(format!("{id}.log")))?;
        Ok(Agent {
            proc,
            id: id.to_string(),
            data_dir,
        })
    }

    /// The workload log of a replica on this device (`{workload}-{replica}`).
    pub fn workload_log(&self, instance: &str) -> String {
        std::fs::read_to_string(self.data_dir.join("logs").join(format!("{instance}.log")))
            .unwrap_or_default()
    }
}

/// Debian's docker-registry (the CNCF distribution registry) on a private loopback port,
/// storing under the test's directory.
pub struct Registry {
    pub proc: Proc,
    pub port: u16,
    pub storage: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_inner(dir, None)
    }

    /// A registry that wants `user`/`password` (HTTP basic auth from an htpasswd file, the
    /// way the distribution registry is usually protected).
    pub fn start_with_auth(dir: &Path, user: &str, password: &str) -> Result<Registry> {
        Self::start_inner(dir, Some((user, password)))
    }

    fn start_inner(dir: &Path, auth: Option<(&str, &str)>) -> Result<Registry> {
        let exe = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("docker-registry is not installed (apt-get install docker-registry)")?;
        let port = free_port();
        let storage = dir.join(format!("registry-{port}"));
        let conf = dir.join(format!("registry-{port}.yml"));
        let mut text = format!(
            "version: 0.1\nlog: {{ level: warn }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  delete: {{ enabled: true }}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.join(format!("registry-{port}.htpasswd"));
            // The registry reads bcrypt hashes only.
            let hash = bcrypt::hash(password, 5)?;
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            text.push_str(&format!(
                "auth:\n  htpasswd: {{ realm: shoal-test, path: {} }}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&conf, text)?;
        let proc = Proc::spawn(
            "docker-registry",
            Command::new(exe).arg("serve").arg(&conf),
            dir.join(format!("registry-{port}.log")),
        )?;
        wait_until(Duration::from_secs(10), "registry answering /v2/", || {
            Ok(http_get(port, "/v2/").is_ok().then_some(()))
        })?;
        Ok(Registry {
            proc,
            port,
            storage,
        })
    }

    /// `oci://127.0.0.1:PORT/{repo_tag}`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("oci://127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Where the registry keeps the blob `sha256:HEX` (to tamper with it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// A private containerd (Debian's package) with its own root, state and socket under the
/// test's directory. `None` (after saying why on stderr) when it cannot run here: not root,
/// or containerd/runc missing; `SHOAL_E2E_REQUIRE_CONTAINERD=1` (set by .ci/run) turns that
/// into a failure.
pub struct PrivateContainerd {
    pub proc: Proc,
    pub socket: PathBuf,
    pub root: PathBuf,
}

impl PrivateContainerd {
    pub fn start(dir: &Path) -> Result<Option<PrivateContainerd>> {
        let missing = if !is_root() {
            Some("not running as root")
        } else if !Path::new("/usr/bin/containerd").is_file() {
            Some("containerd is not installed (apt-get install containerd runc)")
        } else if !Path::new("/usr/sbin/runc").is_file() && !Path::new("/usr/bin/runc").is_file() {
            Some("runc is not installed")
        } else {
            None
        };
        if let Some(why) = missing {
            if std::env::var("SHOAL_E2E_REQUIRE_CONTAINERD").is_ok_and(|v| v == "1") {
                bail!("containerd tests required but cannot run: {why}");
            }
            eprintln!("SKIPPED: containerd test: {why}");
            return Ok(None);
        }
        let base = dir.join("containerd");
        std::fs::create_dir_all(&base)?;
        let socket = base.join("containerd.sock");
        let conf = base.join("config.toml");
        std::fs::write(
            &conf,
            format!(
                "version = 2\nroot = \"{b}/root\"\nstate = \"{b}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{s}\"\n[ttrpc]\naddress = \"{s}.ttrpc\"\n[debug]\naddress = \"{b}/debug.sock\"\n",
                b = base.display(),
                s = socket.display()
            ),
        )?;
        let proc = Proc::spawn(
            "containerd",
            Command::new("/usr/bin/containerd")
                .arg("--config")
                .arg(&conf),
            dir.join("containerd.log"),
        )?;
        wait_until(Duration::from_secs(20), "containerd socket", || {
            Ok(std::os::unix::net::UnixStream::connect(&socket)
                .is_ok()
                .then_some(()))
        })?;
        Ok(Some(PrivateContainerd {
            proc,
            socket,
            root: base.join("root"),
        }))
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        // Tests remove their tasks; this is the backstop when one failed halfway. Shims
        // outlive containerd: kill each container's init (the kernel then kills the rest of
        // its PID namespace), then the shims, then unmount what they left (containerd 1.6
        // mounts task root file systems under the state directory).
        self.proc.kill();
        kill_shims_of(&self.socket);
        if let Some(base) = self.root.parent() {
            unmount_below(base);
        }
    }
}

/// Unmounts every mount point below `dir`, deepest first (a task's root file system is
/// mounted at `state/io.containerd.runtime.v2.task/{ns}/{id}/rootfs`).
fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let ok = Command::new("umount")
            .arg(p)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .args(["-l", p])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// SIGKILLs the children of the containerd shims serving `socket` (container inits), then
/// the shims.
fn kill_shims_of(socket: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let needle = socket.to_string_lossy().into_owned();
    // (pid, parent pid, command line) of every process.
    let procs: Vec<(u32, u32, String)> = entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces, so split after its ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((
                pid,
                ppid,
                String::from_utf8_lossy(&cmdline).replace('\0', " "),
            ))
        })
        .collect();
    let shims: Vec<u32> = procs
        .iter()
        .filter(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(&needle))
        .map(|(pid, _, _)| *pid)
        .collect();
    let kill = |pids: Vec<String>| {
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(pids)
                .stderr(Stdio::null())
                .status();
        }
    };
    kill(
        procs
            .iter()
            .filter(|(_, ppid, _)| shims.contains(ppid))
            .map(|(pid, _, _)| pid.to_string())
            .collect(),
    );
    kill(shims.iter().map(u32::to_string).collect());
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Debian's mosquitto on a private loopback port, no persistence. By default it is set up
/// as `examples/mosquitto/` documents: TLS with certificates from the fleet CA of the hub
/// that will use `DIR/hub` (issued with `shoal-hub cert broker`), client certificates
/// required, and the shipped ACL file.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    /// The operator bundle of the fleet (`None`: plain, anonymous).
    pub bundle: Option<PathBuf>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Result<Mosquitto> {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> Result<Mosquitto> {
        Self::start_mode(dir, port, true, true)
    }

    /// Plain and anonymous, for hubs run `--insecure`.
    pub fn start_insecure(dir: &Path) -> Result<Mosquitto> {
        Self::start_mode(dir, free_port(), false, false)
    }

    /// A compromised broker: the fleet's certificates, but no ACL (any client with a fleet
    /// certificate may publish anything, e.g. desired states).
    pub fn start_without_acl(dir: &Path, port: u16) -> Result<Mosquitto> {
        Self::start_mode(dir, port, true, false)
    }

    fn start_mode(dir: &Path, port: u16, tls: bool, acl: bool) -> Result<Mosquitto> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let text = if tls {
            let hub_data = dir.join("hub");
            let pki = dir.join("mosquitto-pki");
            let out = Command::new(bin("shoal-hub"))
                .args(["cert", "broker", "--data-dir"])
                .arg(&hub_data)
                .arg("--out")
                .arg(&pki)
                .output()?;
            if !out.status.success() {
                bail!(
                    "shoal-hub cert broker failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // The shipped config, pointed at this test's files and port.
            let shipped =
                std::fs::read_to_string(repo_root().join("examples/mosquitto/mosquitto.conf"))?;
            std::fs::copy(repo_root().join("examples/mosquitto/acl"), pki.join("acl"))?;
            // Run as root in tests: the files live in a private temporary directory the
            // `mosquitto` user could not read (in production: chown the key, see the file).
            let conf = shipped
                .replace("listener 8883", &format!("listener {port} 127.0.0.1"))
                .replace("/etc/mosquitto/shoal", &pki.display().to_string())
                + "user root\n";
            if acl {
                conf
            } else {
                conf.lines()
                    .filter(|l| !l.starts_with("acl_file"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        } else {
            // The hub's one subscription takes every device's messages: mosquitto's default
            // queue of 1,000 per client would drop a large fleet's join burst.
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size 8388608\nmax_queued_messages 1000000\n")
        };
        std::fs::write(&conf, text)?;
        let proc = Proc::spawn(
            "mosquitto",
            Command::new(exe).arg("-c").arg(&conf),
            dir.join(format!("mosquitto-{port}.log")),
        )?;
        wait_until(Duration::from_secs(10), "mosquitto listening", || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(()))
        })?;
        Ok(Mosquitto {
            proc,
            port,
            bundle: tls.then(|| dir.join("hub").join("operator")),
        })
    }

    pub fn url(&self) -> String {
        match self.bundle {
            Some(_) => format!("mqtts://127.0.0.1:{}", self.port),
            None => format!("mqtt://127.0.0.1:{}", self.port),
        }
    }

    pub fn access(&self) -> BrokerAccess {
        BrokerAccess {
            port: self.port,
            bundle: self.bundle.clone(),
        }
    }
}

/// `GET path` over HTTPS on 127.0.0.1:`port` with a client certificate (`tls`: CA, cert,
/// key files): the status code and the body.
pub fn https_get(port: u16, path: &str, tls: (&Path, &Path, &Path)) -> Result<(u16, String)> {
    https_request(port, "GET", path, &[], b"", tls)
}

/// `method path` with `headers` and `body` over HTTPS, as [`https_get`].
pub fn https_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    tls: (&Path, &Path, &Path),
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let read = |f: &Path| std::fs::read_to_string(f);
    let id = shoal_pki::tls::ClientIdentity::new(&read(tls.1)?, &read(tls.2)?)?;
    let config = shoal_pki::tls::client_config(&read(tls.0)?, Some(id))?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let conn = rustls::ClientConnection::new(config, name)?;
    let sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes())?;
    tls.write_all(body)?;
    let mut raw = Vec::new();
    // The hub may close without a TLS close_notify: keep what arrived.
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// `mosquitto_pub` as `agent`'s device (its enrolled certificate and key, its client id,
/// MQTT 3.1.1) to the broker on 127.0.0.1:`port`, with `args` (`-t`, `-m`/`-f`, `-r`…):
/// what whoever holds a device's key can publish. Stop the agent first, or it takes its
/// client id back.
pub fn publish_as_device(port: u16, agent: &Agent, args: &[&std::ffi::OsStr]) -> Result<Output> {
    let pki = agent.data_dir.join("pki");
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .arg("--cafile")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("device.pem"))
        .arg("--key")
        .arg(pki.join("device.key"))
        .args(["-i", &format!("shoal-agent-{}", agent.id)])
        .args(args)
        .output()
        .context("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
}

/// Reads the retained message on `topic` with `mosquitto_sub` (None if there is none).
pub fn retained(broker: &BrokerAccess, topic: &str) -> Result<Option<String>> {
    let out = Command::new("mosquitto_sub")
        .args(broker.mosquitto_args())
        .args(["-t", topic, "-C", "1", "-W", "2", "--retained-only"])
        .output()
        .context("mosquitto_sub is not installed (apt-get install mosquitto-clients)")?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((!s.is_empty()).then_some(s))
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `within`.
pub fn wait_until<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let t0 = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if t0.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what} (last error: {last_err:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a manifest file into `dir`.
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Debian's etcd (`etcd-server`) as a one-member cluster on private loopback ports, its data
/// under the test's directory.
pub struct Etcd {
    pub proc: Proc,
    pub port: u16,
    peer: u16,
    /// Plain HTTP `/health` (the client port wants a client certificate).
    metrics: u16,
    /// The test's etcd CA and the certificates issued from it (`server.*`, `client.*`).
    pub pki: PathBuf,
}

impl Etcd {
    /// Debian's etcd on private loopback ports, serving clients over TLS and accepting only
    /// client certificates from a CA of the test's own (`client-cert-auth`), as a
    /// production etcd does.
    pub fn start(dir: &Path) -> Result<Etcd> {
        Self::start_on(dir, free_port(), free_port(), free_port())
    }

    /// Starts `old`'s member again (it is killed first if still running): same ports, same
    /// data, same certificates.
    pub fn restart(dir: &Path, old: Etcd) -> Result<Etcd> {
        let (port, peer, metrics) = (old.port, old.peer, old.metrics);
        drop(old);
        Self::start_on(dir, port, peer, metrics)
    }

    fn start_on(dir: &Path, port: u16, peer: u16, metrics: u16) -> Result<Etcd> {
        let pki = dir.join(format!("etcd-pki-{port}"));
        if !pki.join("client.key").exists() {
            let ca = shoal_pki::ca::FleetCa::load_or_create(&pki)?;
            let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
            for (name, usage) in [
                ("server", shoal_pki::ca::Usage::Server { names }),
                ("client", shoal_pki::ca::Usage::Client),
            ] {
                let (cert, key) = ca.issue(&format!("etcd-{name}"), &usage)?;
                shoal_pki::write_atomic(&pki.join(format!("{name}.pem")), cert.as_bytes(), 0o644)?;
                shoal_pki::write_atomic(&pki.join(format!("{name}.key")), key.as_bytes(), 0o600)?;
            }
        }
        let client = format!("https://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("/usr/bin/etcd");
        cmd.arg("--name")
            .arg("shoal-test")
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{port}")))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--cert-file")
            .arg(pki.join("server.pem"))
            .arg("--key-file")
            .arg(pki.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(pki.join("ca.pem"))
            .arg("--client-cert-auth")
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{metrics}"))
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("shoal-test={peer_url}"));
        let proc = Proc::spawn("etcd", &mut cmd, dir.join(format!("etcd-{port}.log")))?;
        let etcd = Etcd {
            proc,
            port,
            peer,
            metrics,
            pki,
        };
        wait_until(Duration::from_secs(20), "etcd serving", || {
            Ok(http_get(metrics, "/health")
                .ok()
                .filter(|b| b.contains("\"health\":\"true\""))
                .map(|_| ()))
        })?;
        Ok(etcd)
    }

    /// `--store` for a hub on this etcd (prefix `/shoal`).
    pub fn url(&self) -> String {
        self.url_at("/shoal")
    }

    /// `--store` for a hub on this etcd, with its keys under `prefix`. Every hub given it
    /// shares one key-encryption key (`fleet.kek` beside the certificates: the first hub
    /// creates it), as an operator copies it to each replica.
    pub fn url_at(&self, prefix: &str) -> String {
        format!(
            "{}&kek={}",
            self.url_without_kek(prefix),
            self.kek().display()
        )
    }

    /// [`Etcd::url_at`] without `kek=`: a hub then looks for `DATA_DIR/pki/etcd.kek`.
    pub fn url_without_kek(&self, prefix: &str) -> String {
        let f = |n: &str| self.pki.join(n).display().to_string();
        format!(
            "etcds://127.0.0.1:{}{prefix}?ca={}&cert={}&key={}",
            self.port,
            f("ca.pem"),
            f("client.pem"),
            f("client.key")
        )
    }

    /// The key-encryption key file hubs given [`Etcd::url`] share.
    pub fn kek(&self) -> PathBuf {
        self.pki.join("fleet.kek")
    }
}

/// Writes `beat.yaml` into `dir`: workload `beat`, `replicas` copies of the probe module
/// printing a heartbeat line every `every_ms`.
pub fn heartbeat_manifest(dir: &Path, replicas: u32, every_ms: u32) -> PathBuf {
    write_manifest(
        dir,
        "beat.yaml",
        &format!(
            r#"
apiVersion: shoal.dev/v1
kind: Workload
metadata: {{ name: beat }}
spec:
  replicas: {replicas}
  wasm: {{ module: "{probe}" }}
  args: ["heartbeat", "{every_ms}"]
  resources: {{ memory: 16Mi }}
"#,
            probe = module("probe.wasm").display()
        ),
    )
}

/// Counts lines of `log` that start with `prefix`.
pub fn count_lines(log: &str, prefix: &str) -> usize {
    log.lines().filter(|l| l.starts_with(prefix)).count()
}

/// CPU time (user + system) of a process in seconds, from /proc.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" of the command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// A plain HTTP/1.0 GET on loopback (for endpoints the CLI does not wrap, like `/metrics`).
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The `p` quantile (0–1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// (total RSS, anonymous, file-backed) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name}"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("bad status line")?
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus/OpenMetrics text format strictly enough to catch a broken exposition:
/// every sample line is `name{k="v",…} value`, every sample's family was declared by a
/// `# TYPE` line before it, names are valid metric names, and an OpenMetrics text ends with
/// `# EOF`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut families: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        anyhow::ensure!(!eof, "text after # EOF at {}", at());
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            anyhow::ensure!(valid_name(name), "bad family name at {}", at());
            families.push(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value at {}", at()))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value at {}", at()))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels at {}", at()))?;
                let mut labels = std::collections::BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .with_context(|| format!("bad label at {}", at()))?;
                    anyhow::ensure!(valid_name(k), "bad label name {k:?} at {}", at());
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name, labels)
            }
        };
        anyhow::ensure!(valid_name(name), "bad metric name at {}", at());
        anyhow::ensure!(
            families.iter().any(|f| name == f
                || ["_total", "_created", "_bucket", "_sum", "_count", "_info"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))),
            "sample of an undeclared family at {}",
            at()
        );
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the sample `name` whose labels include every `(k, v)` of `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

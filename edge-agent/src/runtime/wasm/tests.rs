//! The wasmtime runtime against the example guests (`scripts/build-modules.sh`): exits,
//! sandbox, sockets, volumes, memory and CPU limits, run limits, the artifact cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::logs::LogSink;
use crate::runtime::{Exit, RuntimeError};
use std::collections::BTreeMap;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1024 * 1024;

/// Path of an example guest; fails the test (with how to build it) when it is missing.
fn example(name: &str) -> PathBuf {
    let file = format!("{name}.wasm");
    let target = if ["hello", "netprobe", "serial-component"].contains(&name) {
        "wasm32-wasip2"
    } else {
        "wasm32-wasip1"
    };
    let path = match std::env::var_os("SHOAL_MODULES_DIR") {
        Some(dir) => PathBuf::from(dir).join(&file),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/shoal/modules-target")
            .join(target)
            .join("release")
            .join(&file),
    };
    assert!(
        path.is_file(),
        "example guest {path:?} is missing: build the examples with scripts/build-modules.sh \
         (or set SHOAL_MODULES_DIR to a directory holding them)"
    );
    path
}

struct Fixture {
    runtime: WasmRuntime,
    shutdown: CancellationToken,
    ticker: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture::with_cache(dir, "cache")
    }

    fn with_cache(dir: tempfile::TempDir, cache: &str) -> Fixture {
        let shutdown = CancellationToken::new();
        let (runtime, ticker) = WasmRuntime::new(dir.path().join(cache), shutdown.clone()).unwrap();
        Fixture {
            runtime,
            shutdown,
            ticker,
            dir,
        }
    }

    async fn prepare(&self, name: &str) -> Arc<WasmModule> {
        let path = example(name);
        let digest = Digest::of(&std::fs::read(&path).unwrap());
        self.runtime.prepare(&digest, path).await.unwrap()
    }

    fn log(&self, instance: &str) -> LogSink {
        LogSink::open(&self.dir.path().join("logs"), instance, MIB).unwrap()
    }

    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.ticker)
            .await
            .unwrap()
            .unwrap();
        self.dir
    }
}

fn spec(instance: &str, args: &[&str]) -> WasmRun {
    WasmRun {
        instance: instance.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        memory_limit: 64 * MIB,
        cpu_millis: None,
        network: Default::default(),
        mounts: vec![],
        limits: Default::default(),
        devices: vec![],
        usage: Default::default(),
    }
}

fn log_text(log: &LogSink) -> String {
    std::fs::read_to_string(log.path()).unwrap()
}

async fn run_to_end(fx: &Fixture, module: Arc<WasmModule>, spec: WasmRun) -> (Exit, LogSink) {
    let log = fx.log(&spec.instance);
    let run = fx
        .runtime
        .run(module, spec, log.clone(), CancellationToken::new());
    let exit = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap();
    (exit, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_and_log_rate_limits_stop_the_run_with_a_reason() {
    let fx = Fixture::new();
    let module = fx.prepare("probe").await;
    // An endless loop with a CPU time limit: stopped once it used 300 ms.
    let mut spinner = spec("spin-0", &["spin"]);
    spinner.limits.cpu_time_ms = Some(300);
    let t0 = Instant::now();
    let (exit, _) = run_to_end(&fx, module.clone(), spinner).await;
    let Exit::Failure { reason, .. } = exit else {
        panic!("{exit:?}")
    };
    assert!(
        reason.contains("CPU time limit exceeded") && reason.contains("300ms"),
        "{reason}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A heartbeat under the same limit is not stopped for sleeping.
    let mut beat = spec("beat-0", &["heartbeat", "100"]);
    beat.limits.cpu_time_ms = Some(300);
    let log = fx.log("beat-0");
    let cancel = CancellationToken::new();
    let run = fx
        .runtime
        .run(module.clone(), beat, log.clone(), cancel.clone());
    let stop = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        cancel.cancel();
    };
    let (exit, ()) = tokio::join!(run, stop);
    assert_eq!(exit, Exit::Cancelled);

    // A flood of output with a log rate limit: stopped, and the log stays small.
    let mut flood = spec("flood-0", &["flood"]);
    flood.limits.log_bytes_per_sec = Some(10 * 1024);
    let (exit, log) = run_to_end(&fx, module, flood).await;
    let Exit::Failure { reason, .. } = exit else {
        panic!("{exit:?}")
    };
    assert!(
        reason.contains("log rate limit exceeded") && reason.contains("10 KiB/s"),
        "{reason}"
    );
    let written = std::fs::metadata(log.path()).unwrap().len();
    assert!(
        written < 2 << 20,
        "the flood wrote {written} bytes before it was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_hello_succeeds_after_its_beats() {
    let fx = Fixture::new();
    let module = fx.prepare("hello").await;
    assert!(module.is_component());
    let mut spec = spec("hello-0", &["world"]);
    spec.env.insert("BEATS".into(), "3".into());
    spec.env.insert("INTERVAL_MS".into(), "20".into());
    let (exit, log) = run_to_end(&fx, module, spec).await;
    let text = log_text(&log);
    assert_eq!(exit, Exit::Success, "log:\n{text}");
    assert!(
        text.contains("hello from a wasip2 component; args=[\"world\"]\n"),
        "log:\n{text}"
    );
    assert!(text.contains("\nheartbeat 3\n"), "log:\n{text}");
    assert!(!text.contains("heartbeat 4"), "log:\n{text}");
    assert!(text.contains("[shoal] exited: success"), "log:\n{text}");
    fx.stop().await;
}

/// Polls `log` until it contains `needle` (10 s at most).
async fn wait_for(log: &LogSink, needle: &str) -> String {
    for _ in 0..200 {
        let text = log_text(log);
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{needle:?} never appeared in:\n{}", log_text(log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_only_where_the_manifest_grants_them() {
    let fx = Fixture::new();
    let module = fx.prepare("netprobe").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port_s = port.to_string();

    // No `ports`: listening is refused.
    let (exit, log) = run_to_end(&fx, module.clone(), spec("deny-0", &["serve", &port_s])).await;
    assert!(
        matches!(exit, Exit::Failure { code: Some(1), .. }),
        "{exit:?}"
    );
    assert!(log_text(&log).contains(&format!("cannot listen on port {port}")));

    // The declared port: it serves.
    let mut serve = spec("serve-0", &["serve", &port_s]);
    serve.network.listen = vec![port];
    let log = fx.log("serve-0");
    let stop = CancellationToken::new();
    let client = async {
        wait_for(&log, "serving on port").await;
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
        .await
        .unwrap();
        stop.cancel();
        reply
    };
    let (exit, reply) = tokio::join!(
        fx.runtime
            .run(module.clone(), serve, log.clone(), stop.clone()),
        client
    );
    assert_eq!(reply, "hello from serve-0\n");
    assert_eq!(exit, Exit::Cancelled);

    // A consumer: connects only to what its allow-list holds right now.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = host.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in host.incoming() {
            use std::io::Write;
            let _ = writeln!(conn.unwrap(), "hi from the host");
        }
    });
    let services = fx.dir.path().join("services");
    std::fs::create_dir_all(services.join("svc")).unwrap();
    std::fs::write(services.join("svc/tcp"), format!("{target}\n")).unwrap();
    let allow: crate::runtime::AllowList = Default::default();
    let mut call = spec("call-0", &["call", "svc", "tcp", "50"]);
    call.network.connect = Some(allow.clone());
    call.network.services_dir = Some(services);
    let log = fx.log("call-0");
    let stop = CancellationToken::new();
    let check = async {
        let text = wait_for(&log, &format!("cannot connect to {target}")).await;
        assert!(
            text.contains(&format!("endpoints of svc/tcp: [{target}]")),
            "{text}"
        );
        assert!(!text.contains("reply from"), "{text}");
        allow.write().unwrap().insert(target);
        wait_for(&log, &format!("reply from {target}: hi from the host")).await;
        stop.cancel();
    };
    let (exit, ()) = tokio::join!(
        fx.runtime.run(module, call, log.clone(), stop.clone()),
        check
    );
    assert_eq!(exit, Exit::Cancelled);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_probe_crash_exits_with_status_3() {
    let fx = Fixture::new();
    let module = fx.prepare("probe").await;
    assert!(!module.is_component());
    let (exit, log) = run_to_end(&fx, module, spec("probe-0", &["crash"])).await;
    assert_eq!(
        exit,
        Exit::Failure {
            code: Some(3),
            reason: "exited with status 3".into()
        }
    );
    let text = log_text(&log);
    assert!(text.contains("probe: about to crash\n"), "log:\n{text}");
    assert!(text.contains("[shoal] exited: exited with status 3"));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_keeps_its_files_across_runs_and_nothing_else_is_visible() {
    let fx = Fixture::new();
    let module = fx.prepare("probe").await;
    let vol = fx.dir.path().join("volumes/probe/data");
    std::fs::create_dir_all(&vol).unwrap();
    let mut s = spec("probe-0", &["count", "/data/n"]);
    s.mounts = vec![crate::runtime::Mount {
        host: vol.clone(),
        guest: "/data".into(),
        read_only: false,
    }];
    for want in ["count 1", "count 2"] {
        let (exit, log) = run_to_end(&fx, module.clone(), s.clone()).await;
        assert_eq!(exit, Exit::Success, "{}", log_text(&log));
        assert!(log_text(&log).contains(want), "{}", log_text(&log));
    }
    assert_eq!(std::fs::read_to_string(vol.join("n")).unwrap(), "2");
    // Without the volume the same path does not exist: no file system by default.
    let (exit, log) = run_to_end(&fx, module.clone(), spec("probe-1", &["count", "/data/n"])).await;
    assert!(
        matches!(exit, Exit::Failure { code: Some(1), .. }),
        "{exit:?}"
    );
    assert!(log_text(&log).contains("cannot write /data/n"));
    // Nothing leads out of a volume: not `..`, not a symlink planted in it (cap-std
    // resolves every path beneath the preopened directory).
    std::fs::write(fx.dir.path().join("secret"), "host secret").unwrap();
    std::os::unix::fs::symlink(fx.dir.path().join("secret"), vol.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../secret", vol.join("rel")).unwrap();
    for path in ["/data/../secret", "/data/abs", "/data/rel", "/secret"] {
        let mut s = s.clone();
        s.instance = "probe-2".into();
        s.args = vec!["cat".into(), path.into()];
        let (exit, log) = run_to_end(&fx, module.clone(), s).await;
        let text = log_text(&log);
        assert!(
            matches!(exit, Exit::Failure { code: Some(1), .. }),
            "{path}: {exit:?} {text}"
        );
        assert!(!text.contains("host secret"), "{path} escaped: {text}");
    }
    // A file inside the volume is readable, so the failures above are the sandbox's.
    std::fs::write(vol.join("inside"), "mine").unwrap();
    let mut inside = s.clone();
    inside.args = vec!["cat".into(), "/data/inside".into()];
    let (exit, log) = run_to_end(&fx, module, inside).await;
    assert_eq!(exit, Exit::Success, "{}", log_text(&log));
    assert!(log_text(&log).contains("mine"));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_hits_the_memory_limit() {
    let fx = Fixture::new();
    let module = fx.prepare("probe").await;
    let mut hog = spec("hog-0", &["hog"]);
    hog.memory_limit = 16 * MIB;
    let (exit, log) = run_to_end(&fx, module.clone(), hog).await;
    let text = log_text(&log);
    match &exit {
        Exit::Failure { code: None, reason } => {
            assert!(
                reason.contains("memory limit exceeded") && reason.contains("16 MiB"),
                "{reason}"
            );
        }
        other => panic!("expected a memory limit failure, got {other:?}; log:\n{text}"),
    }
    assert!(text.contains("hog: holding 1 MiB\n"), "log:\n{text}");
    assert!(!text.contains("hog: holding 16 MiB"), "log:\n{text}");

    // A limit below the module's initial memory fails at instantiation, the same way.
    let mut tiny = spec("hog-1", &["hog", "1"]);
    tiny.memory_limit = 64 * 1024;
    let (exit, log) = run_to_end(&fx, module, tiny).await;
    match &exit {
        Exit::Failure { code: None, reason } => {
            assert!(reason.contains("memory limit exceeded"), "{reason}");
        }
        other => panic!("expected a memory limit failure, got {other:?}"),
    }
    assert!(!log_text(&log).contains("hog: holding"));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_share_throttles_a_spinner_without_starving_others() {
    let fx = Fixture::new();
    let probe = fx.prepare("probe").await;

    let start_run = |spec: WasmRun, cancel: CancellationToken| {
        let log = fx.log(&spec.instance);
        let runtime = fx.runtime.clone();
        let module = probe.clone();
        let sink = log.clone();
        let task = tokio::spawn(async move {
            let (exit, stats) = runtime.run_measured(module, spec, sink, cancel).await;
            (exit, stats, Instant::now())
        });
        (task, log)
    };
    let cancel = CancellationToken::new();
    let mut spinner = spec("spin-0", &["spin"]);
    spinner.cpu_millis = Some(100);
    let (spin_task, spin_log) = start_run(spinner, cancel.clone());
    let (beat_task, beat_log) = start_run(spec("beat-0", &["heartbeat", "50"]), cancel.clone());

    let window = Duration::from_millis(1500);
    tokio::time::sleep(window).await;
    let beats = beat_log
        .tail(usize::MAX)
        .iter()
        .filter(|l| l.starts_with("beat "))
        .count();
    let cancelled_at = Instant::now();
    cancel.cancel();
    let (spin_exit, spin_stats, spin_end) = tokio::time::timeout(Duration::from_secs(5), spin_task)
        .await
        .unwrap()
        .unwrap();
    let (beat_exit, _, beat_end) = tokio::time::timeout(Duration::from_secs(5), beat_task)
        .await
        .unwrap()
        .unwrap();

    let expected = window.as_millis() as usize / 50;
    assert!(
        beats * 10 >= expected * 7,
        "heartbeat kept {beats} of {expected} beats next to the spinner"
    );
    let share = spin_stats.busy.as_secs_f64() / spin_stats.wall.as_secs_f64();
    assert!(
        share < 0.5,
        "spinner with a 100m share was busy {:?} of {:?} ({:.0}%)",
        spin_stats.busy,
        spin_stats.wall,
        share * 100.0
    );
    assert!(
        spin_stats.busy >= Duration::from_millis(50),
        "the spinner barely ran: {spin_stats:?}"
    );
    assert_eq!(spin_exit, Exit::Cancelled);
    assert_eq!(beat_exit, Exit::Cancelled);
    for (what, end) in [("spinner", spin_end), ("heartbeat", beat_end)] {
        let took = end.saturating_duration_since(cancelled_at);
        assert!(
            took < Duration::from_millis(500),
            "{what} took {took:?} to stop"
        );
    }
    assert!(log_text(&spin_log).contains("[shoal] exited: cancelled"));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_artifacts_are_cached_in_memory_and_on_disk() {
    let fx = Fixture::new();
    let path = example("probe");
    let digest = Digest::of(&std::fs::read(&path).unwrap());
    let artifact = fx.runtime.artifact_path(&digest);
    assert!(!artifact.exists());

    let first = fx.runtime.prepare(&digest, path.clone()).await.unwrap();
    assert_eq!(fx.runtime.compile_count(), 1);
    assert!(artifact.is_file(), "{artifact:?} was not written");
    assert!(artifact.starts_with(fx.dir.path().join("cache")));
    let again = fx.runtime.prepare(&digest, path.clone()).await.unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "second prepare did not hit memory"
    );
    assert_eq!(fx.runtime.compile_count(), 1);
    let dir = fx.stop().await;

    // A fresh runtime on the same cache directory loads the artifact instead of compiling
    // (the source path no longer even exists), and the loaded module runs.
    let fx = Fixture::with_cache(dir, "cache");
    assert_eq!(fx.runtime.artifact_path(&digest), artifact);
    let loaded = fx
        .runtime
        .prepare(&digest, fx.dir.path().join("no-such-file.wasm"))
        .await
        .unwrap();
    assert_eq!(fx.runtime.compile_count(), 0);
    let (exit, _) = run_to_end(&fx, loaded, spec("probe-0", &["crash"])).await;
    assert!(
        matches!(exit, Exit::Failure { code: Some(3), .. }),
        "{exit:?}"
    );

    // A corrupt artifact is ignored and replaced. (Replace the file, never overwrite it in
    // place: a loaded artifact is mapped from it.)
    std::fs::remove_file(&artifact).unwrap();
    std::fs::write(&artifact, b"garbage").unwrap();
    let dir = fx.stop().await;
    let fx = Fixture::with_cache(dir, "cache");
    fx.runtime.prepare(&digest, path).await.unwrap();
    assert_eq!(fx.runtime.compile_count(), 1);
    assert!(std::fs::metadata(&artifact).unwrap().len() > 1000);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_an_invalid_module() {
    let fx = Fixture::new();
    for (name, bytes) in [
        ("garbage", b"this is not wasm at all".to_vec()),
        ("broken", b"\0asm\x01\0\0\0\x01\xff\xff".to_vec()),
    ] {
        let path = fx.dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let digest = Digest::of(&bytes);
        match fx.runtime.prepare(&digest, path).await {
            Err(RuntimeError::InvalidModule { digest: d, reason }) => {
                assert_eq!(d, digest.as_str());
                assert!(!reason.is_empty());
            }
            other => panic!("{name}: expected InvalidModule, got {other:?}"),
        }
    }
    assert!(!fx
        .runtime
        .artifact_dir()
        .read_dir()
        .unwrap()
        .any(|e| e.is_ok()));
    fx.stop().await;
}

/// A pseudo-terminal: its master side, and the path of its slave (a real character device,
/// as a USB serial adapter would be), kept open so the master reads whatever is written.
pub(crate) fn pty() -> (std::fs::File, std::fs::File, String) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::os::unix::fs::OpenOptionsExt as _;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let path = name.to_str().unwrap().to_string();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(&path)
        .unwrap();
    (std::fs::File::from(master), slave, path)
}

/// Reads `file` on a blocking thread until a line containing `want`; fails after 20 s.
pub(crate) async fn read_line_with(file: &std::fs::File, want: &str) -> String {
    let mut file = file.try_clone().unwrap();
    let want = want.to_string();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = file.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(line) = text.lines().find(|l| l.contains(&want)) {
                return line.to_string();
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the line in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_talks_to_its_granted_serial_device_and_opens_no_other() {
    use std::io::Write;
    let fx = Fixture::new();
    let module = fx.prepare("serial").await;
    let (master, slave, path) = pty();
    let echo = |f: &std::fs::File| {
        rustix::termios::tcgetattr(f)
            .unwrap()
            .local_modes
            .contains(rustix::termios::LocalModes::ECHO)
    };
    assert!(echo(&slave), "a fresh terminal echoes");
    let mut run = spec("serial-0", &["t1", "--once", "--try", "/dev/null"]);
    run.env.insert("SHOAL_DEVICES_SERIAL".into(), path.clone());
    run.devices = vec![PathBuf::from(&path)];
    let log = fx.log("serial-0");
    let guest =
        tokio::spawn(
            fx.runtime
                .run(module.clone(), run, log.clone(), CancellationToken::new()),
        );
    let ping = read_line_with(&master, "ping from").await;
    assert_eq!(ping, "ping from ? t1", "raw mode: no CR added");
    assert!(!echo(&slave), "no echo while the guest holds it");
    (&master).write_all(b"pong 42\n").unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), guest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::Success, "{}", log_text(&log));
    let text = log_text(&log);
    assert!(text.contains("reply: pong 42"), "{text}");
    // /dev/null is no grant of this replica: refused (-1), and said in its log.
    assert!(text.contains("open /dev/null: -1"), "{text}");
    assert!(
        text.contains("open of device \"/dev/null\" denied: not granted to this replica"),
        "{text}"
    );
    // Closed (on the blocking pool) with its settings put back.
    let t0 = Instant::now();
    while !echo(&slave) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "settings not restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Without a grant, the same node stays closed even when named in the environment.
    let mut ungranted = spec("serial-1", &["t2", "--once"]);
    ungranted
        .env
        .insert("SHOAL_DEVICES_SERIAL".into(), path.clone());
    let log = fx.log("serial-1");
    let exit = fx
        .runtime
        .run(module, ungranted, log.clone(), CancellationToken::new())
        .await;
    assert_eq!(
        exit,
        Exit::Failure {
            code: Some(3),
            reason: "exited with status 3".into()
        }
    );
    assert!(log_text(&log).contains(&format!("cannot open {path}: -1")));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_talks_to_its_granted_serial_device_through_shoal_device_io() {
    use std::io::Write;
    let fx = Fixture::new();
    let module = fx.prepare("serial-component").await;
    let (master, _slave, path) = pty();
    let mut run = spec("serial-c-0", &["c1", "--try", "/dev/null"]);
    run.env.insert("SHOAL_DEVICES_SERIAL".into(), path.clone());
    run.devices = vec![PathBuf::from(&path)];
    let log = fx.log("serial-c-0");
    let guest = tokio::spawn(
        fx.runtime
            .run(module, run, log.clone(), CancellationToken::new()),
    );
    assert_eq!(read_line_with(&master, "ping from").await, "ping from c1");
    (&master).write_all(b"pong 7\n").unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), guest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::Success, "{}", log_text(&log));
    let text = log_text(&log);
    assert!(text.contains("reply: pong 7"), "{text}");
    assert!(
        text.contains("open /dev/null: device \"/dev/null\" is not granted to this replica"),
        "{text}"
    );
    fx.stop().await;
}

//! The hub's state in etcd (issue 9): the `EtcdStore` adapter against Debian's etcd (writes,
//! fencing, join tokens claimed once), and a hub run with `--store etcd://…` that is
//! SIGKILLed and replaced by a hub with an empty data directory, which carries on from what
//! etcd holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_api::model::ids::{DeviceId, WorkloadName};
use shoal_api::wire::messages::DesiredState;
use shoal_e2e::*;
use shoal_hub::etcd::{EtcdStore, EtcdUrl, TXN_OPS};
use shoal_hub::store::Store;
use std::time::Duration;

fn desired(device: &str, generation: u64) -> DesiredState {
    DesiredState {
        protocol: 1,
        device_id: DeviceId::try_from(device).unwrap(),
        generation,
        artifact_base: String::new(),
        artifact_port: None,
        workloads: vec![],
        secrets: vec![],
    }
}

#[test]
fn etcd_store_keeps_writes_until_flushed_and_retries_a_failed_flush() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut etcd = Etcd::start(dir.path())?;
    let url: EtcdUrl = etcd.url_at("/t1").parse().map_err(anyhow::Error::msg)?;
    let store = EtcdStore::connect(&url)?;
    assert!(store.load()?.desired.is_empty());

    // More writes than one etcd transaction takes.
    let n = TXN_OPS * 2 + 7;
    for i in 0..n {
        store.put_desired(&desired(&format!("d{i}"), i as u64))?;
    }
    assert!(
        EtcdStore::connect(&url)?.load()?.desired.is_empty(),
        "nothing is written before the flush"
    );
    store.flush()?;
    let other = EtcdStore::connect(&url)?;
    let snap = other.load()?;
    assert_eq!(snap.desired.len(), n);
    assert_eq!(
        snap.desired[&DeviceId::try_from("d9").unwrap()].generation,
        9
    );

    // Deletes, and a prefix of its own per hub fleet.
    let manifest = format!(
        "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: web }}\nspec:\n  wasm: {{ module: \"sha256:{}\" }}\n",
        "0".repeat(64)
    );
    let stream = shoal_api::wire::manifest::parse_stream(&manifest).unwrap();
    let w = shoal_api::model::workload::validate_all(stream.workloads)
        .unwrap()
        .remove(0);
    store.put_workload(&w)?;
    store.flush()?;
    assert_eq!(other.load()?.workloads.len(), 1);
    store.delete_workload(&WorkloadName::try_from("web").unwrap())?;
    store.flush()?;
    assert!(other.load()?.workloads.is_empty());
    let elsewhere: EtcdUrl = etcd.url_at("/t2").parse().map_err(anyhow::Error::msg)?;
    assert!(EtcdStore::connect(&elsewhere)?.load()?.desired.is_empty());

    // etcd gone: the flush fails, naming the store, and keeps the write for the next one.
    etcd.proc.kill();
    store.put_desired(&desired("late", 42))?;
    let err = store.flush().unwrap_err().to_string();
    assert!(err.contains(&url.to_string()), "{err}");
    let err = EtcdStore::connect(&url).err().unwrap().to_string();
    assert!(err.contains(&url.to_string()), "{err}");
    // Same data directory, same port: the member comes back with what it had.
    let etcd = Etcd::restart(dir.path(), etcd)?;
    store.flush()?;
    let snap = EtcdStore::connect(&url)?.load()?;
    assert_eq!(snap.desired.len(), n + 1);
    assert_eq!(
        snap.desired[&DeviceId::try_from("late").unwrap()].generation,
        42
    );
    drop(etcd);
    Ok(())
}

/// Fencing: a leader's writes commit only while its election key lives. Two candidates
/// campaign; the loser waits; the winner's lease is revoked (as etcd does when a leader
/// dies); the old leader's next flush is refused and leaves nothing behind, and the other
/// candidate is elected and writes.
#[test]
fn a_deposed_leader_cannot_write_and_the_next_candidate_is_elected() -> anyhow::Result<()> {
    use shoal_hub::ha::Elector;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let url: EtcdUrl = etcd.url_at("/fence").parse().map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new()?;
    let tracker = TaskTracker::new();
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let lease = Duration::from_secs(2);
    let elector = rt.block_on(Elector::connect(&url, lease))?;
    let a = rt.block_on(elector.campaign("a".into(), &tracker, a_stop.clone()))?;
    assert_eq!(rt.block_on(elector.leader()).as_deref(), Some("a"));
    let b = {
        let (e, t, s) = (elector.clone(), tracker.clone(), b_stop.clone());
        rt.spawn(async move { e.campaign("b".into(), &t, s).await })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!b.is_finished(), "b must wait while a leads");

    let store = EtcdStore::connect(&url)?;
    store.fence(a.fence.clone());
    store.put_desired(&desired("d1", 1))?;
    store.flush()?;
    // A outlives the lease TTL: its keeper renews it.
    std::thread::sleep(lease + Duration::from_millis(500));
    assert!(!a.lost.is_cancelled() && !b.is_finished());

    // The leader's lease ends (revoked here; expired when a leader dies).
    a_stop.cancel();
    let b = rt.block_on(b)??;
    assert_eq!(rt.block_on(elector.leader()).as_deref(), Some("b"));
    store.put_desired(&desired("d1", 2))?;
    store.put_desired(&desired("d2", 1))?;
    let err = store.flush().unwrap_err();
    assert!(
        matches!(err, shoal_hub::store::StoreError::Fenced { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no longer the leader"), "{err}");
    let snap = EtcdStore::connect(&url)?.load()?;
    assert_eq!(
        snap.desired.len(),
        1,
        "nothing of the deposed leader's commit"
    );
    assert_eq!(
        snap.desired[&DeviceId::try_from("d1").unwrap()].generation,
        1
    );

    // The new leader writes under its own fence.
    let newer = EtcdStore::connect(&url)?;
    newer.fence(b.fence.clone());
    newer.put_desired(&desired("d1", 3))?;
    newer.flush()?;
    assert_eq!(
        EtcdStore::connect(&url)?.load()?.desired[&DeviceId::try_from("d1").unwrap()].generation,
        3
    );
    b_stop.cancel();
    tracker.close();
    rt.block_on(tracker.wait());
    drop(etcd);
    Ok(())
}

/// Join tokens in etcd: hub replicas racing over their own connections to claim one token,
/// or with four unbound tokens to enroll one new id (as enrollments through several
/// replicas would): exactly one wins, every round. Records live beside the state, which
/// the state's loader does not read.
#[test]
fn of_replicas_racing_for_one_join_token_or_one_new_id_exactly_one_wins() -> anyhow::Result<()> {
    use shoal_hub::enrollment::{claim, issue, EnrollError, Enrollments};
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let url: EtcdUrl = etcd.url_at("/tokens").parse().map_err(anyhow::Error::msg)?;
    let replicas: Vec<EtcdStore> = (0..4)
        .map(|_| EtcdStore::connect(&url))
        .collect::<Result<_, _>>()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for round in 0..20 {
        let same_token = round % 2 == 0;
        let tokens = (0..4)
            .map(|_| {
                issue(
                    &replicas[0],
                    &"a".repeat(64),
                    now,
                    60_000,
                    None,
                    Default::default(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = std::sync::Barrier::new(replicas.len());
        let won: Vec<String> = std::thread::scope(|s| {
            let racers: Vec<_> = replicas
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let (t, start) = (&tokens[if same_token { 0 } else { i }], &start);
                    s.spawn(move || {
                        let d = match same_token {
                            true => format!("r{round}-d{i}"),
                            false => format!("r{round}"),
                        };
                        let d = DeviceId::try_from(d.as_str()).unwrap();
                        start.wait();
                        match claim(r, &t.id, t.secret(), &d, &format!("CERT{i}"), now) {
                            Ok(_) => Some(format!("{d} with CERT{i}")),
                            Err(EnrollError::Refused(e)) => {
                                let why = if same_token {
                                    "already used"
                                } else {
                                    "enrolled already"
                                };
                                assert!(e.to_string().contains(why), "{e}");
                                None
                            }
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            racers
                .into_iter()
                .filter_map(|r| r.join().unwrap())
                .collect()
        });
        assert_eq!(
            won.len(),
            1,
            "round {round} (one token: {same_token}): {won:?}"
        );
        // The winner's certificate is the one recorded.
        let (device, cert) = won[0].split_once(" with ").unwrap();
        let recorded = replicas[3].enrolled_cert(&DeviceId::try_from(device)?)?;
        assert_eq!(recorded.as_deref(), Some(cert));
    }
    let snap = replicas[2].load()?;
    assert!(snap.devices.is_empty() && snap.desired.is_empty());
    // Without a hub having run, there is no fleet CA to pin a token to.
    assert!(replicas[0].fleet_ca()?.is_none());
    drop(etcd);
    Ok(())
}

#[test]
fn a_hub_on_etcd_is_replaced_by_one_with_an_empty_data_dir_and_carries_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let store = etcd.url();
    let first = dir.path().join("first");
    std::fs::create_dir_all(&first)?;
    let (mqtt, http) = (free_port(), free_port());
    let mut hub = Hub::start_with(&first, None, mqtt, http, &["--insecure", "--store", &store])?;
    let agent = Agent::start(dir.path(), "dev1", "role=edge", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    // The module is uploaded to the hub's blob store (in its data directory); the agent
    // caches it, so the replacement hub does not need the blob.
    hub.apply(&heartbeat_manifest(dir.path(), 1, 100))?;
    hub.wait_running("beat", 1, Duration::from_secs(60))?;
    let generation = |hub: &Hub| -> anyhow::Result<u64> {
        Ok(hub
            .devices()?
            .iter()
            .find(|d| d["id"] == "dev1")
            .and_then(|d| d["desiredGeneration"].as_u64())
            .unwrap_or(0))
    };
    let before = generation(&hub)?;
    assert!(before > 0);

    hub.proc.kill();
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second)?;
    let hub = Hub::start_with(
        &second,
        None,
        mqtt,
        http,
        &["--insecure", "--store", &store],
    )?;
    assert!(
        !second.join("hub").join("hub.db").exists(),
        "nothing in sled"
    );
    let w = hub.wait_running("beat", 1, Duration::from_secs(30))?;
    assert_eq!(w["replicas"][0]["device"], "dev1");
    assert!(generation(&hub)? >= before, "generations only grow");
    // The replica was never restarted: the new hub took over the same desired state.
    let log = agent.workload_log("beat-0");
    assert_eq!(count_lines(&log, "[shoal] started"), 1, "{log}");

    // A bad store is refused at start, naming it.
    let out = std::process::Command::new(bin("shoal-hub"))
        .args(["serve", "--insecure", "--data-dir"])
        .arg(dir.path().join("third"))
        .args(["--store", "etcd://nowhere"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"etcd://nowhere\"") && err.contains("no port"),
        "{err}"
    );
    Ok(())
}

/// etcd is SIGKILLed under two hub replicas: the leader cannot renew its lease and steps
/// down (it exits, for its supervisor to restart), the standby's campaign fails; the standby
/// keeps serving reads and campaigning, and is elected once etcd is back.
#[test]
fn a_standby_outlives_an_etcd_outage_and_is_elected_after_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    let store = etcd.url();
    let flags = ["--insecure", "--store", &store, "--leader-lease", "2s"];
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a)?;
    std::fs::create_dir_all(&b)?;
    let mut leader = Hub::start_with(&a, None, free_port(), free_port(), &flags)?;
    wait_until(Duration::from_secs(15), "the first hub leads", || {
        Ok((leader.is_leader() == Some(true)).then_some(()))
    })?;
    let mut standby = Hub::start_with(&b, None, free_port(), free_port(), &flags)?;
    assert_eq!(standby.is_leader(), Some(false));

    let mut etcd = etcd;
    etcd.proc.kill();
    wait_until(Duration::from_secs(15), "the leader steps down", || {
        Ok((!leader.proc.running()).then_some(()))
    })?;
    // Past several failed campaigns: the standby is still there, answering reads.
    std::thread::sleep(Duration::from_secs(4));
    assert!(standby.proc.running(), "{}", standby.proc.log_text());
    assert_eq!(standby.is_leader(), Some(false));
    assert!(standby
        .proc
        .log_text()
        .contains("campaign for leadership failed; retrying"));

    let etcd = Etcd::restart(dir.path(), etcd)?;
    let elected = wait_until(Duration::from_secs(20), "the standby is elected", || {
        Ok((standby.is_leader() == Some(true)).then_some(()))
    });
    if let Err(e) = elected {
        let log = standby.proc.log_text();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        anyhow::bail!("{e}; standby log (last lines first):\n{}", tail.join("\n"));
    }
    assert!(standby.proc.running());
    drop(etcd);
    Ok(())
}

/// Kills the hub (SIGKILL) `kills` times while a client applies manifests as fast as it
/// can; after each restart every apply that was acknowledged must be there.
fn acknowledged_applies_survive_hub_kills(store: Option<&str>, kills: usize) -> anyhow::Result<()> {
    use rand::Rng;
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir()?;
    let (mqtt, http) = (free_port(), free_port());
    let mut flags = vec!["--insecure"];
    if let Some(s) = store {
        flags.extend(["--store", s, "--leader-lease", "2s"]);
    }
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut digest = String::new();
    let mut rng = rand::rng();
    for kill in 0..=kills {
        let mut hub = Hub::start_with(dir.path(), None, mqtt, http, &flags)?;
        let have: BTreeSet<String> = hub
            .workloads()?
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect();
        let missing: Vec<&String> = acked.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "after {kill} kills, acknowledged but gone: {missing:?}"
        );
        if kill == kills {
            break;
        }
        // On etcd the restarted hub stands by until the killed one's lease has expired:
        // the applies are meant for a leader.
        if store.is_some() {
            wait_until(Duration::from_secs(15), "the hub leads", || {
                Ok((hub.is_leader() == Some(true)).then_some(()))
            })?;
        }
        if digest.is_empty() {
            let out = hub.shoal_ok(&["push", module("probe.wasm").to_str().unwrap()]);
            digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let applier = {
            let stop = stop.clone();
            let (dir, digest) = (dir.path().to_path_buf(), digest.clone());
            let (hub_url, broker) = (hub.hub_url(), hub.broker_url.clone());
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("w-{kill}-{n}");
                    n += 1;
                    let path = write_manifest(
                        &dir,
                        "apply.yaml",
                        &format!(
                            "apiVersion: shoal.dev/v1\nkind: Workload\nmetadata: {{ name: {name} }}\nspec:\n  wasm: {{ module: \"{digest}\" }}\n"
                        ),
                    );
                    let out = std::process::Command::new(bin("shoal"))
                        .args(["apply", "--timeout", "2s", "-f"])
                        .arg(&path)
                        .env("SHOAL_HUB", &hub_url)
                        .env("SHOAL_BROKER", &broker)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        ok.push(name);
                    }
                }
                ok
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(150..600)));
        hub.proc.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        acked.extend(applier.join().unwrap());
    }
    eprintln!(
        "{} applies acknowledged across {kills} kills of the hub",
        acked.len()
    );
    assert!(
        acked.len() >= kills,
        "only {} applies acknowledged in {kills} runs",
        acked.len()
    );
    Ok(())
}

#[test]
fn acknowledged_applies_survive_50_kills_of_a_hub_on_sled() -> anyhow::Result<()> {
    acknowledged_applies_survive_hub_kills(None, 50)
}

#[test]
fn acknowledged_applies_survive_50_kills_of_a_hub_on_etcd() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path())?;
    acknowledged_applies_survive_hub_kills(Some(&etcd.url()), 50)
}

//! The agent's containerd adapter against a real, private containerd (Debian's 1.6) and a
//! real registry: a multi-platform busybox image built by the test is pulled for this
//! machine's platform, unpacked and run; output reaches the log, exit codes come back, a
//! cancelled container stops (SIGTERM ignored by PID 1, then SIGKILL), and nothing is left
//! in containerd afterwards. A second prepare needs no registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_agent::containerd::{ContainerRun, Containerd};
use shoal_agent::runtime::Exit;
use shoal_e2e::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run(id: &str, args: &[&str], log: &std::path::Path) -> ContainerRun {
    ContainerRun {
        id: id.into(),
        command: vec!["/bin/sh".into()],
        args: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("GREETING".into(), "hello".into())]),
        memory_limit: 32 << 20,
        cpu_millis: Some(500),
        read_only_root: true,
        mounts: vec![],
        log_path: log.to_path_buf(),
        log_max_bytes: 1 << 20,
        stop_grace: Duration::from_millis(500),
        labels: BTreeMap::new(),
        devices: vec![],
        cap_add: vec![],
        cap_drop: vec![],
        groups: vec![],
        privileged: false,
        host_devices: vec![],
        allow: Default::default(),
    }
}

#[test]
fn containers_pull_run_stop_and_leave_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(ctrd) = PrivateContainerd::start(dir.path())? else {
        return Ok(());
    };
    let registry = Registry::start(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let registries = Arc::new(shoal_registry::Registries::new(Default::default()));
        let tag: shoal_api::model::oci::OciRef = registry.reference("shoal/busybox:1").parse()?;
        let pinned = shoal_e2e::image::push_busybox(
            &registries,
            &tag,
            &[("amd64", None), ("arm64", Some("v8")), ("arm", Some("v7"))],
        )
        .await?;
        let ns = format!("shoal-test-{}", std::process::id());
        let (c, version) = Containerd::connect(
            &ctrd.socket,
            &ns,
            dir.path().join("cache"),
            registries.clone(),
        )
        .await?;
        assert!(
            version.starts_with("1.") || version.starts_with('v'),
            "{version}"
        );
        let image = c.prepare(&pinned).await?;
        assert_eq!(image.config.cmd, ["/bin/sh"]);
        // One container from start to end (no cancel, no detach).
        let run_to_end = |r: &ContainerRun| {
            let (c, image, r) = (&c, &image, r.clone());
            async move {
                c.run(image, &r, Default::default(), Default::default())
                    .await
            }
        };
        // This machine's manifest was chosen from the index.
        if cfg!(target_arch = "x86_64") {
            assert!(
                image
                    .config
                    .env
                    .contains(&"SHOAL_TEST_PLATFORM=linux/amd64".to_string()),
                "{:?}",
                image.config.env
            );
        }
        // Other boards get theirs: arm64, a v7 board the v7 image, a v6 board none.
        for (arch, variant, want) in [
            ("aarch64", Some("v8"), Some("linux/arm64/v8")),
            ("arm", Some("v7"), Some("linux/arm/v7")),
            ("arm", Some("v6"), None),
        ] {
            let pulled = registries
                .pull_image(&pinned, arch, variant, &dir.path().join("foreign"))
                .await;
            match (pulled, want) {
                (Ok(p), Some(want)) => {
                    let config = String::from_utf8(p.config.1)?;
                    assert!(
                        config.contains(&format!("SHOAL_TEST_PLATFORM={want}")),
                        "{config}"
                    );
                }
                (Err(e), None) => assert!(
                    e.to_string().contains("no manifest for linux/arm/v6"),
                    "{e}"
                ),
                (other, want) => panic!("{arch} {variant:?}: {other:?}, wanted {want:?}"),
            }
        }

        // Output, environment and exit status; the root is read-only.
        let log = dir.path().join("logs/box-0.log");
        let exit = run_to_end(&run(
            "box-0",
            &[
                "-c",
                "echo out $GREETING; echo err >&2; touch /x || echo read-only; exit 3",
            ],
            &log,
        ))
        .await;
        assert_eq!(
            exit,
            Exit::Failure {
                code: Some(3),
                reason: "exited with status 3".into()
            }
        );
        // The log is copied from the task's pipes: its last lines may land just after the
        // exit is seen.
        let wants = ["out hello", "err", "read-only"];
        let mut text = String::new();
        for _ in 0..50 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if wants.iter().all(|w| text.contains(w)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for want in wants {
            assert!(text.contains(want), "{want:?} not in {text:?}");
        }

        // Over its memory limit (32Mi), the kernel kills it, and the reason says so.
        let exit = run_to_end(&run(
            "box-3",
            &["-c", "x=$(yes | head -c 100000000); echo survived"],
            &log,
        ))
        .await;
        match &exit {
            Exit::Failure {
                code: Some(137),
                reason,
            } => {
                assert_eq!(
                    reason,
                    "OOMKilled: memory limit of 32Mi exceeded (status 137)"
                )
            }
            other => panic!("expected an OOM kill, got {other:?}"),
        }
        assert!(!std::fs::read_to_string(&log)?.contains("survived"));
        // A SIGKILL that is not the OOM killer's is told apart.
        // PID 1 of the container ignores its own SIGKILL: a child takes it, and the shell
        // exits with its status.
        let exit = run_to_end(&run("box-4", &["-c", "sh -c 'kill -9 $$'; exit $?"], &log)).await;
        assert_eq!(
            exit,
            Exit::Failure {
                code: Some(137),
                reason: "killed by SIGKILL (status 137)".into()
            }
        );

        // A volume is writable under the read-only root and keeps what was written
        // from one container to the next.
        let vol = dir.path().join("volumes/box/data");
        std::fs::create_dir_all(&vol)?;
        let counter = |id: &str| {
            let mut r = run(
                id,
                &[
                    "-c",
                    "n=$(cat /data/n 2>/dev/null || echo 0); echo $((n+1)) > /data/n",
                ],
                &log,
            );
            r.mounts = vec![shoal_agent::runtime::Mount {
                host: vol.clone(),
                guest: "/data".into(),
                read_only: false,
            }];
            r
        };
        for id in ["box-5", "box-6"] {
            let exit = run_to_end(&counter(id)).await;
            assert_eq!(exit, Exit::Success, "{}", std::fs::read_to_string(&log)?);
        }
        assert_eq!(std::fs::read_to_string(vol.join("n"))?.trim(), "2");

        // A container that ignores SIGTERM is killed after the grace period.
        let cancel = tokio_util::sync::CancellationToken::new();
        let stopper = {
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(800)).await;
                cancel.cancel();
                Instant::now()
            }
        };
        let long = run(
            "box-1",
            &["-c", "trap '' TERM; echo up; while true; do sleep 1; done"],
            &log,
        );
        let (exit, cancelled_at) =
            tokio::join!(c.run(&image, &long, cancel, Default::default()), stopper);
        assert_eq!(exit, Exit::Cancelled);
        let took = cancelled_at.elapsed();
        assert!(took < Duration::from_secs(8), "stopping took {took:?}");
        assert!(std::fs::read_to_string(&log)?.contains("up"));

        // Nothing left behind, and the image is prepared again without the registry.
        assert!(c.managed().await?.is_empty(), "{:?}", c.managed().await?);
        drop(registry);
        let again = c.prepare(&pinned).await?;
        assert_eq!(again.chain, image.chain);
        let exit = run_to_end(&run("box-2", &["-c", "true"], &log)).await;
        assert_eq!(exit, Exit::Success);
        anyhow::Ok(())
    })?;
    drop(ctrd);
    Ok(())
}

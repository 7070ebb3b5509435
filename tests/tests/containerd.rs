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
        log_path: log.to_path_buf(),
        log_max_bytes: 1 << 20,
        stop_grace: Duration::from_millis(500),
        labels: BTreeMap::new(),
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
        let tag: shoal_api::oci::OciRef = registry.reference("shoal/busybox:1").parse()?;
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

        // Output, environment and exit status; the root is read-only.
        let log = dir.path().join("logs/box-0.log");
        let exit = c
            .run(
                &image,
                &run(
                    "box-0",
                    &[
                        "-c",
                        "echo out $GREETING; echo err >&2; touch /x || echo read-only; exit 3",
                    ],
                    &log,
                ),
                Default::default(),
                Default::default(),
            )
            .await;
        assert_eq!(
            exit,
            Exit::Failure {
                code: Some(3),
                reason: "exited with status 3".into()
            }
        );
        let text = std::fs::read_to_string(&log)?;
        for want in ["out hello", "err", "read-only"] {
            assert!(text.contains(want), "{want:?} not in {text:?}");
        }

        // Over its memory limit (32Mi), the kernel kills it, and the reason says so.
        let exit = c
            .run(
                &image,
                &run(
                    "box-3",
                    &["-c", "x=$(yes | head -c 100000000); echo survived"],
                    &log,
                ),
                Default::default(),
                Default::default(),
            )
            .await;
        match &exit {
            Exit::Failure {
                code: Some(137),
                reason,
            } => {
                assert!(reason.contains("memory limit of 32Mi"), "{reason}")
            }
            other => panic!("expected an OOM kill, got {other:?}"),
        }
        assert!(!std::fs::read_to_string(&log)?.contains("survived"));

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
        let exit = c
            .run(
                &image,
                &run("box-2", &["-c", "true"], &log),
                Default::default(),
                Default::default(),
            )
            .await;
        assert_eq!(exit, Exit::Success);
        anyhow::Ok(())
    })?;
    drop(ctrd);
    Ok(())
}

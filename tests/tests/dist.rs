//! The agent's packages for ARM boards (`cargo xtask dist`), checked as a user would: the
//! .deb's metadata and contents with `dpkg-deb --info/--contents`, the binary extracted
//! from it runs (under qemu-user) and accepts the packaged config, and the tarball holds the
//! binary, the systemd unit and the configs. Packages the dev builds `scripts/cross.sh`
//! made (`--profile dev --no-build`); a release build goes through the same code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use shoal_e2e::*;
use std::path::Path;
use std::process::{Command, Output};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    text(&out)
}

fn check_board(out: &Path, triple: &str, deb_arch: &str, qemu: &str, sysroot: &str, machine: u16) {
    let version = env!("CARGO_PKG_VERSION");
    let deb = out.join(format!("shoal-agent_{version}_{deb_arch}.deb"));
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for want in [
        "Package: shoal-agent".to_string(),
        format!("Architecture: {deb_arch}"),
        format!("Version: {version}"),
        "Depends: libc6 (>= 2.".to_string(),
        "postinst".to_string(),
    ] {
        assert!(info.contains(&want), "{want:?} missing in:\n{info}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/shoal/agent.toml");
    let postinst = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("postinst"));
    assert!(
        postinst.contains("install -d -m 0700 /var/lib/shoal-agent"),
        "{postinst}"
    );
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/shoal-agent"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/shoal-agent.service",
        ),
        ("-rw-r--r-- root/root", "./etc/shoal/agent.toml"),
        (
            "-rw-r--r-- root/root",
            "./usr/share/doc/shoal-agent/agent.toml.example",
        ),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} missing in:\n{contents}"
        );
    }

    // What the package installs works: the binary is for the board, runs, and reads the
    // packaged config (which only lacks the device id a technician sets).
    let root = out.join(format!("root-{deb_arch}"));
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let bin = root.join("usr/bin/shoal-agent");
    let head = std::fs::read(&bin).unwrap();
    assert_eq!(
        u16::from_le_bytes([head[18], head[19]]),
        machine,
        "{triple}"
    );
    let version_out = ok(Command::new(qemu)
        .arg("-L")
        .arg(sysroot)
        .arg(&bin)
        .arg("--version"));
    assert_eq!(version_out.trim(), format!("shoal-agent {version}"));
    let run = Command::new(qemu)
        .arg("-L")
        .arg(sysroot)
        .arg(&bin)
        .arg("run")
        .arg("--config")
        .arg(root.join("etc/shoal/agent.toml"))
        .env_remove("SHOAL_AGENT_DEVICE_ID")
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(text(&run).contains("no device id"), "{}", text(&run));
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/shoal-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/shoal-agent run --config /etc/shoal/agent.toml"));

    let tarball = out.join(format!("shoal-agent-{version}-{deb_arch}.tar.gz"));
    let listing = ok(Command::new("tar").arg("tzvf").arg(&tarball));
    for name in [
        "shoal-agent",
        "shoal-agent.service",
        "agent.toml",
        "agent.toml.example",
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.ends_with(&format!("shoal-agent-{version}-{deb_arch}/{name}"))),
            "{name} missing in:\n{listing}"
        );
    }
}

#[test]
fn dist_packages_the_arm_agents_as_tarballs_and_debs() -> Result<()> {
    let out = tempfile::tempdir()?;
    let target_dir = bin_dir().parent().unwrap().to_path_buf();
    ok(Command::new(bin("xtask"))
        .args(["dist", "--profile", "dev", "--no-build"])
        .args(["--target", "aarch64-unknown-linux-gnu"])
        .args(["--target", "armv7-unknown-linux-gnueabihf"])
        .arg("--out")
        .arg(out.path())
        .env("CARGO_TARGET_DIR", &target_dir));
    check_board(
        out.path(),
        "aarch64-unknown-linux-gnu",
        "arm64",
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
        183,
    );
    check_board(
        out.path(),
        "armv7-unknown-linux-gnueabihf",
        "armhf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
        40,
    );
    // A target Shoal does not ship for is refused by name.
    let bad = Command::new(bin("xtask"))
        .args(["dist", "--no-build", "--target", "mips-unknown-linux-gnu"])
        .arg("--out")
        .arg(out.path())
        .output()?;
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("\"mips-unknown-linux-gnu\" is not supported"),
        "{}",
        text(&bad)
    );
    Ok(())
}

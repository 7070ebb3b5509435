//! The agent's packages for ARM boards (`cargo xtask dist`), checked as a user would: the
//! .deb's metadata and contents with `dpkg-deb --info/--contents`, the binary extracted
//! from it runs (under qemu-user) and accepts the packaged config, and the tarball holds the
//! binary, the systemd unit and the configs. The OCI image index lists the three platforms,
//! each manifest's config names its architecture, containerd imports it and runs the amd64
//! image, and `ctr` pushes the whole index to a real registry. Packages the dev builds
//! `scripts/cross.sh` made (`--profile dev --no-build`); a release build goes through the
//! same code.
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

/// Whether `needle` occurs in the file at `path`.
fn mentions(path: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn dist_packages_the_runtime_only_agents_under_their_own_name() -> Result<()> {
    let out = tempfile::tempdir()?;
    let target_dir = bin_dir().parent().unwrap().to_path_buf();
    ok(Command::new(bin("xtask"))
        .args(["dist", "--profile", "dev", "--no-build", "--runtime-only"])
        .args(["--target", "aarch64-unknown-linux-gnu"])
        .args(["--target", "armv7-unknown-linux-gnueabihf"])
        .arg("--out")
        .arg(out.path())
        .env("CARGO_TARGET_DIR", &target_dir));
    let version = env!("CARGO_PKG_VERSION");
    for (triple, deb_arch, qemu, sysroot) in [
        (
            "aarch64-unknown-linux-gnu",
            "arm64",
            "qemu-aarch64",
            "/usr/aarch64-linux-gnu",
        ),
        (
            "armv7-unknown-linux-gnueabihf",
            "armhf",
            "qemu-arm",
            "/usr/arm-linux-gnueabihf",
        ),
    ] {
        let deb = out
            .path()
            .join(format!("shoal-agent-runtime-only_{version}_{deb_arch}.deb"));
        let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
        for want in [
            "Package: shoal-agent-runtime-only",
            "Provides: shoal-agent",
            "Conflicts: shoal-agent",
            "no WASM compiler",
        ] {
            assert!(info.contains(want), "{want:?} missing in:\n{info}");
        }
        assert!(!info.contains("containerd\n"), "{info}");
        let root = out.path().join(format!("root-{deb_arch}"));
        ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let installed = root.join("usr/bin/shoal-agent");
        let version_out = ok(Command::new(qemu)
            .arg("-L")
            .arg(sysroot)
            .arg(&installed)
            .arg("--version"));
        assert_eq!(version_out.trim(), format!("shoal-agent {version}"));
        // No compiler inside: Cranelift's code generator leaves its name in any binary that
        // carries it (the full build beside it does).
        assert!(!mentions(&installed, b"cranelift-codegen"), "{triple}");
        let full = target_dir.join(triple).join("debug/shoal-agent");
        assert!(mentions(&full, b"cranelift-codegen"), "{}", full.display());
        let tarball = out.path().join(format!(
            "shoal-agent-runtime-only-{version}-{deb_arch}.tar.gz"
        ));
        let listing = ok(Command::new("tar").arg("tzvf").arg(&tarball));
        assert!(
            listing.contains(&format!(
                "shoal-agent-runtime-only-{version}-{deb_arch}/shoal-agent\n"
            )),
            "{listing}"
        );
    }
    assert!(out
        .path()
        .join(format!("shoal-agent-runtime-only-{version}-oci.tar"))
        .is_file());
    Ok(())
}

#[test]
fn dist_packages_the_arm_agents_as_tarballs_and_debs() -> Result<()> {
    let out = tempfile::tempdir()?;
    let target_dir = bin_dir().parent().unwrap().to_path_buf();
    ok(Command::new(bin("xtask"))
        .args(["dist", "--profile", "dev", "--no-build"])
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
    check_image(out.path())?;
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

/// The OCI layout: an index of three platforms whose configs agree; containerd imports it
/// and runs the amd64 image; `ctr` pushes the index to a registry, which then serves it.
fn check_image(out: &Path) -> Result<()> {
    use std::collections::BTreeMap;
    use std::io::Read;
    let version = env!("CARGO_PKG_VERSION");
    let layout = out.join(format!("shoal-agent-{version}-oci.tar"));
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(&layout)?);
    for e in tar.entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes)?;
        files.insert(name, bytes);
    }
    let blob = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&files[&format!("blobs/sha256/{hex}")]).unwrap()
    };
    let top: serde_json::Value = serde_json::from_slice(&files["index.json"])?;
    let index_desc = &top["manifests"][0];
    assert_eq!(
        index_desc["annotations"]["io.containerd.image.name"],
        format!("shoal.local/shoal-agent:{version}")
    );
    let index = blob(index_desc["digest"].as_str().unwrap());
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let mut platforms = Vec::new();
    for m in index["manifests"].as_array().unwrap() {
        let p = &m["platform"];
        let manifest = blob(m["digest"].as_str().unwrap());
        let config = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(config["architecture"], p["architecture"], "{config}");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/shoal-agent");
        let variant = p["variant"]
            .as_str()
            .map(|v| format!("/{v}"))
            .unwrap_or_default();
        platforms.push(format!("{}{variant}", p["architecture"].as_str().unwrap()));
    }
    assert_eq!(platforms, vec!["amd64", "arm64", "arm/v7"]);

    let dir = tempfile::tempdir()?;
    let Some(ctrd) = PrivateContainerd::start(dir.path())? else {
        return Ok(()); // said why (not root, or no containerd) unless CI requires it
    };
    let socket = ctrd.socket.display().to_string();
    let ctr = |args: &[&str]| -> Result<String> {
        let out = Command::new("ctr")
            .args(["-a", &socket, "-n", "shoal-dist"])
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "ctr {args:?}: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let image = format!("shoal.local/shoal-agent:{version}");
    ctr(&[
        "images",
        "import",
        "--all-platforms",
        layout.to_str().unwrap(),
    ])?;
    let ran = ctr(&[
        "run",
        "--rm",
        &image,
        "agent-version",
        "/usr/bin/shoal-agent",
        "--version",
    ])?;
    assert_eq!(ran.trim(), format!("shoal-agent {version}"));

    let registry = Registry::start(dir.path())?;
    let pushed = format!("127.0.0.1:{}/shoal/agent:{version}", registry.port);
    ctr(&["images", "tag", &image, &pushed])?;
    ctr(&["images", "push", "--plain-http", &pushed, &image])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let regs = shoal_registry::Registries::new(Default::default());
    let (_, served) = rt.block_on(
        regs.resolve_image(
            &registry
                .reference(&format!("shoal/agent:{version}"))
                .parse()?,
        ),
    )?;
    let served: Vec<String> = served
        .iter()
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{v}", p.architecture),
            None => p.architecture.clone(),
        })
        .collect();
    assert_eq!(served, vec!["amd64", "arm64", "arm/v7"]);
    Ok(())
}

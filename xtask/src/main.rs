//! Shoal's release tooling, and `cargo xtask boundaries` (the functional core stays pure,
//! see [`boundaries`]).
//!
//! `cargo xtask dist` cross-compiles `shoal-agent` for the boards Shoal supports and packages
//! each build three ways, into `target/dist/` (or `--out`):
//!
//! - `{triple}/shoal-agent`: the stripped binary;
//! - `shoal-agent-{version}-{arch}.tar.gz`: the binary, the systemd unit, a minimal
//!   `agent.toml` and the fully commented `agent.toml.example`;
//! - `shoal-agent-{version}-oci.tar`: an OCI image layout holding an image index over one
//!   image per architecture ([`oci`]);
//! - `shoal-agent_{version}_{arch}.deb`: the same, installed as `/usr/bin/shoal-agent`,
//!   `/lib/systemd/system/shoal-agent.service`, `/etc/shoal/agent.toml` (a conffile) and
//!   `/usr/share/doc/shoal-agent/agent.toml.example`; its maintainer scripts create the data
//!   directory (`/var/lib/shoal-agent`, 0700) and remove it on purge. Built with Debian's
//!   `dpkg-deb` from a staged tree: cargo-deb would need a compile of its own and knows
//!   nothing the staged tree does not say.
//!
//! `--runtime-only` packages the runtime-only agent (`--no-default-features`: no Cranelift, no
//! containerd client; it runs modules the hub precompiles for it) the same way, under the name
//! `shoal-agent-runtime-only` (the .deb conflicts with, and provides, `shoal-agent`).
//!
//! The linkers are Debian's cross gcc packages (`.cargo/config.toml`;
//! `scripts/install-deps.sh` installs them). `--profile dev --no-build` packages what
//! `scripts/cross.sh` built, which is how the tests check the packaging without a release
//! build.

mod boundaries;
mod circles;
mod oci;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(about = "Shoal's release tooling")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that the functional core names no I/O crate and no clock, the hub's shell no adapter, `api` no clock, and no file of the hub or the agent imports in a circle.
    Boundaries,
    /// Build and package shoal-agent for each target (default: amd64, arm64 and armhf).
    Dist {
        /// Cargo profile (`release`, `release-small`, or `dev` to package test builds).
        #[arg(long, default_value = "release")]
        profile: String,
        /// Target triple (repeatable): x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu,
        /// armv7-unknown-linux-gnueabihf.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Where the artifacts go (default: TARGET_DIR/dist).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Package the binaries already built instead of building them.
        #[arg(long)]
        no_build: bool,
        /// The runtime-only agent (no compiler, no containerd), for the smallest boards.
        #[arg(long)]
        runtime_only: bool,
    },
}

/// A board architecture Shoal ships for.
struct Board {
    triple: &'static str,
    /// Debian's name for it (`Architecture:` of the .deb, and the artifact suffix).
    deb: &'static str,
    /// The binutils `strip` for its binaries.
    strip: &'static str,
    /// ELF `e_machine` of its binaries (checked before packaging).
    machine: u16,
    /// The OCI platform of its image.
    oci_arch: oci_spec::image::Arch,
    oci_variant: Option<&'static str>,
    /// The C runtime its binary needs, for the image: (file on this machine, path in the
    /// image). The program interpreter first.
    runtime: [(&'static str, &'static str); 4],
}

const BOARDS: [Board; 3] = [
    Board {
        triple: "x86_64-unknown-linux-gnu",
        deb: "amd64",
        strip: "strip",
        machine: 62,
        oci_arch: oci_spec::image::Arch::Amd64,
        oci_variant: None,
        runtime: [
            ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
            (
                "/lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libc.so.6",
            ),
            (
                "/lib/x86_64-linux-gnu/libm.so.6",
                "lib/x86_64-linux-gnu/libm.so.6",
            ),
            (
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "lib/x86_64-linux-gnu/libgcc_s.so.1",
            ),
        ],
    },
    Board {
        triple: "aarch64-unknown-linux-gnu",
        deb: "arm64",
        strip: "aarch64-linux-gnu-strip",
        machine: 183,
        oci_arch: oci_spec::image::Arch::ARM64,
        oci_variant: None,
        runtime: [
            (
                "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1",
                "lib/ld-linux-aarch64.so.1",
            ),
            (
                "/usr/aarch64-linux-gnu/lib/libc.so.6",
                "lib/aarch64-linux-gnu/libc.so.6",
            ),
            (
                "/usr/aarch64-linux-gnu/lib/libm.so.6",
                "lib/aarch64-linux-gnu/libm.so.6",
            ),
            (
                "/usr/aarch64-linux-gnu/lib/libgcc_s.so.1",
                "lib/aarch64-linux-gnu/libgcc_s.so.1",
            ),
        ],
    },
    Board {
        triple: "armv7-unknown-linux-gnueabihf",
        deb: "armhf",
        strip: "arm-linux-gnueabihf-strip",
        machine: 40,
        oci_arch: oci_spec::image::Arch::ARM,
        oci_variant: Some("v7"),
        runtime: [
            (
                "/usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3",
                "lib/ld-linux-armhf.so.3",
            ),
            (
                "/usr/arm-linux-gnueabihf/lib/libc.so.6",
                "lib/arm-linux-gnueabihf/libc.so.6",
            ),
            (
                "/usr/arm-linux-gnueabihf/lib/libm.so.6",
                "lib/arm-linux-gnueabihf/libm.so.6",
            ),
            (
                "/usr/arm-linux-gnueabihf/lib/libgcc_s.so.1",
                "lib/arm-linux-gnueabihf/libgcc_s.so.1",
            ),
        ],
    },
];

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which agent build is packaged.
struct Flavour {
    /// The package, tarball and image name (the installed binary is always `shoal-agent`).
    name: &'static str,
    /// Extra `cargo build` arguments.
    cargo_args: &'static [&'static str],
    /// The .deb's relationship fields beyond `Depends`.
    relations: &'static str,
    /// The .deb description's body (each line starting with a space).
    description: &'static str,
}

const FULL: Flavour = Flavour {
    name: "shoal-agent",
    cargo_args: &[],
    relations: "Recommends: containerd\n",
    description:
        " Runs the WASM modules (in wasmtime) and containers (through containerd) that a\n \
                  Shoal hub schedules onto this device, and reports their status over MQTT.\n",
};

const RUNTIME_ONLY: Flavour = Flavour {
    name: "shoal-agent-runtime-only",
    cargo_args: &["--no-default-features"],
    relations: "Provides: shoal-agent\nConflicts: shoal-agent\nReplaces: shoal-agent\n",
    description: " The runtime-only build, for the smallest boards: no WASM compiler and no\n \
                  containers. It runs the WASM modules a Shoal hub schedules onto this device\n \
                  and precompiles for it, and reports their status over MQTT.\n",
};

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Boundaries => {
            let found = boundaries::run(&repo_root())?;
            for v in &found {
                eprintln!("{v}");
            }
            let circles = circles::run(&repo_root())?;
            for c in &circles {
                eprintln!("{c}");
            }
            if !found.is_empty() || !circles.is_empty() {
                bail!(
                    "{} forbidden name(s) across the checked boundaries (see xtask/src/boundaries.rs), {} import circle(s) (xtask/src/circles.rs)",
                    found.len(),
                    circles.len()
                );
            }
            println!("the functional core names no I/O crate and no clock; the hub's shell no topic, status code or client; the agent's supervisor no runtime variant, its runtimes no supervisor; the shared types no clock; no import circle between the hub's or the agent's files");
            Ok(())
        }
        Cmd::Dist {
            profile,
            targets,
            out,
            no_build,
            runtime_only,
        } => {
            let flavour = if runtime_only { &RUNTIME_ONLY } else { &FULL };
            dist(&profile, &targets, out, no_build, flavour)
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Cargo's target directory, as cargo would choose it (without asking cargo, which may hold
/// the build lock when this runs from a test).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn dist(
    profile: &str,
    targets: &[String],
    out: Option<PathBuf>,
    no_build: bool,
    flavour: &Flavour,
) -> Result<()> {
    let boards: Vec<&Board> = if targets.is_empty() {
        BOARDS.iter().collect()
    } else {
        targets
            .iter()
            .map(|t| {
                BOARDS.iter().find(|b| b.triple == t).with_context(|| {
                    let known: Vec<&str> = BOARDS.iter().map(|b| b.triple).collect();
                    format!("target {t:?} is not supported: expected one of {known:?}")
                })
            })
            .collect::<Result<_>>()?
    };
    let out = out.unwrap_or_else(|| target_dir().join("dist"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    // Cargo names the dev profile's directory `debug`.
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let mut images = Vec::new();
    for b in &boards {
        if !no_build {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(cargo)
                .current_dir(repo_root())
                .args([
                    "build",
                    "-p",
                    "shoal-agent",
                    "--target",
                    b.triple,
                    "--profile",
                    profile,
                ])
                .args(flavour.cargo_args))?;
        }
        // `scripts/cross.sh` keeps its runtime-only builds beside the full ones, under the
        // flavour's name; a build of this run is still called `shoal-agent`.
        let built_name = if no_build {
            flavour.name
        } else {
            "shoal-agent"
        };
        let mut built = target_dir()
            .join(b.triple)
            .join(profile_dir)
            .join(built_name);
        if !built.is_file() && no_build && b.triple == HOST {
            // A plain `cargo build` puts the host's binary outside any triple directory.
            built = target_dir().join(profile_dir).join(built_name);
        }
        let bin = out.join(b.triple).join(flavour.name);
        stage_binary(b, &built, &bin)?;
        let glibc = needed_glibc(&std::fs::read(&bin)?);
        let tarball = out.join(format!("{}-{VERSION}-{}.tar.gz", flavour.name, b.deb));
        write_tarball(b, flavour, &bin, &tarball)?;
        let deb = out.join(format!("{}_{VERSION}_{}.deb", flavour.name, b.deb));
        write_deb(b, flavour, &bin, glibc.as_deref(), profile == "dev", &deb)?;
        let size = std::fs::metadata(&bin)?.len();
        println!(
            "{:<32} {:>6.1} MiB stripped  {}  {}",
            b.triple,
            size as f64 / (1024.0 * 1024.0),
            tarball.display(),
            deb.display()
        );
        let mut files = std::collections::BTreeMap::new();
        files.insert("usr/bin/shoal-agent".to_string(), (bin.clone(), 0o755));
        files.insert(
            "etc/shoal/agent.toml".to_string(),
            (repo_root().join("edge-agent/packaging/agent.toml"), 0o644),
        );
        for (from, to) in b.runtime {
            files.insert(to.to_string(), (PathBuf::from(from), 0o755));
        }
        images.push(oci::Image {
            arch: b.oci_arch.clone(),
            variant: b.oci_variant,
            files,
        });
    }
    // The image index covers the boards built in this run.
    let image = out.join(format!("{}-{VERSION}-oci.tar", flavour.name));
    let image_name = format!("shoal.local/{}", flavour.name);
    oci::write_layout(&image, &image_name, VERSION, &images)?;
    let arches: Vec<String> = boards.iter().map(|b| b.deb.to_string()).collect();
    println!(
        "{:<32} index of {}  {}",
        "OCI image",
        arches.join(", "),
        image.display()
    );
    Ok(())
}

/// The triple this tool was built for (the `dev` agent of a plain `cargo build`).
const HOST: &str = "x86_64-unknown-linux-gnu";

/// Copies the built binary next to the artifacts, checks it is for `b`, and strips it.
fn stage_binary(b: &Board, built: &Path, bin: &Path) -> Result<()> {
    if !built.is_file() {
        bail!(
            "{} not found: build it first (scripts/cross.sh, or drop --no-build)",
            built.display()
        );
    }
    if let Some(dir) = bin.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(built, bin)
        .with_context(|| format!("cannot copy {} to {}", built.display(), bin.display()))?;
    let head = std::fs::read(bin)?;
    let machine = head
        .get(18..20)
        .map(|m| u16::from_le_bytes([m[0], m[1]]))
        .unwrap_or_default();
    if !head.starts_with(b"\x7fELF") || machine != b.machine {
        bail!(
            "{} is not a {} binary (ELF machine {machine})",
            built.display(),
            b.triple
        );
    }
    run(Command::new(b.strip).arg(bin))
}

/// The newest `GLIBC_x.y` symbol version the binary asks for (the .deb's libc6 dependency).
fn needed_glibc(elf: &[u8]) -> Option<String> {
    let mut best: Option<(u32, u32)> = None;
    let tag = b"GLIBC_";
    let mut i = 0;
    while let Some(pos) = elf[i..].windows(tag.len()).position(|w| w == tag) {
        let start = i + pos + tag.len();
        let end = elf[start..]
            .iter()
            .position(|c| !(c.is_ascii_digit() || *c == b'.'))
            .map_or(elf.len(), |n| start + n);
        let text = std::str::from_utf8(&elf[start..end]).unwrap_or_default();
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
            best = best.max(Some((major, minor)));
        }
        i = end.max(start);
    }
    best.map(|(a, b)| format!("{a}.{b}"))
}

/// The packaging files: (path in the package, source, mode).
fn payload(bin: &Path) -> Vec<(&'static str, PathBuf, u32)> {
    let root = repo_root();
    vec![
        ("shoal-agent", bin.to_path_buf(), 0o755),
        (
            "shoal-agent.service",
            root.join("edge-agent/packaging/shoal-agent.service"),
            0o644,
        ),
        (
            "agent.toml",
            root.join("edge-agent/packaging/agent.toml"),
            0o644,
        ),
        (
            "agent.toml.example",
            root.join("examples/agent.toml"),
            0o644,
        ),
    ]
}

/// `shoal-agent-{version}-{arch}/…` in a gzipped tar, owned by root, timestamps zeroed.
fn write_tarball(b: &Board, flavour: &Flavour, bin: &Path, path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    let top = format!("{}-{VERSION}-{}", flavour.name, b.deb);
    for (name, src, mode) in payload(bin) {
        let bytes =
            std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("{top}/{name}"), bytes.as_slice())?;
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

/// Stages the package tree and builds it with `dpkg-deb`.
fn write_deb(
    b: &Board,
    flavour: &Flavour,
    bin: &Path,
    glibc: Option<&str>,
    fast: bool,
    path: &Path,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let stage = path.with_extension("staging");
    let _ = std::fs::remove_dir_all(&stage);
    let mut installed_bytes = 0u64;
    let place = |to: &str, from: &Path, mode: u32, total: &mut u64| -> Result<()> {
        let dest = stage.join(to);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(from, &dest)
            .with_context(|| format!("cannot copy {} into the package", from.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        *total += std::fs::metadata(&dest)?.len();
        Ok(())
    };
    for (name, src, mode) in payload(bin) {
        let to = match name {
            "shoal-agent" => "usr/bin/shoal-agent",
            "shoal-agent.service" => "lib/systemd/system/shoal-agent.service",
            "agent.toml" => "etc/shoal/agent.toml",
            _ => "usr/share/doc/shoal-agent/agent.toml.example",
        };
        place(to, &src, mode, &mut installed_bytes)?;
    }
    let depends = match glibc {
        Some(v) => format!("libc6 (>= {v})"),
        None => "libc6".to_string(),
    };
    let control = format!(
        "Package: {name}\n\
         Version: {VERSION}\n\
         Architecture: {arch}\n\
         Maintainer: Shoal developers <shoal@example.invalid>\n\
         Installed-Size: {kib}\n\
         Depends: {depends}\n\
         {relations}\
         Section: admin\n\
         Priority: optional\n\
         Homepage: https://example.invalid/shoal\n\
         Description: Shoal edge agent\n\
         {description}",
        name = flavour.name,
        relations = flavour.relations,
        description = flavour.description,
        arch = b.deb,
        kib = installed_bytes.div_ceil(1024),
    );
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    let script = |name: &str, text: &str, mode: u32| -> Result<()> {
        let p = debian.join(name);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    script("control", &control, 0o644)?;
    script("conffiles", "/etc/shoal/agent.toml\n", 0o644)?;
    script(
        "postinst",
        "#!/bin/sh\n\
         set -e\n\
         if [ \"$1\" = configure ]; then\n\
         \x20 install -d -m 0700 /var/lib/shoal-agent\n\
         \x20 if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi\n\
         \x20 echo 'shoal-agent: set device-id in /etc/shoal/agent.toml and SHOAL_AGENT_JOIN_TOKEN in /etc/default/shoal-agent, then: systemctl enable --now shoal-agent'\n\
         fi\n",
        0o755,
    )?;
    script(
        "prerm",
        "#!/bin/sh\n\
         set -e\n\
         if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then\n\
         \x20 systemctl stop shoal-agent.service >/dev/null 2>&1 || true\n\
         fi\n",
        0o755,
    )?;
    script(
        "postrm",
        "#!/bin/sh\n\
         set -e\n\
         if [ \"$1\" = purge ]; then rm -rf /var/lib/shoal-agent; fi\n\
         if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi\n",
        0o755,
    )?;
    // Test packages of debug builds: quick gzip instead of xz.
    let compression: &[&str] = if fast {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz", "-z9"]
    };
    run(Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .args(compression)
        .arg("--build")
        .arg(&stage)
        .arg(path)
        .stdout(std::process::Stdio::null()))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn needed_glibc_is_the_newest_version_asked_for() {
        let elf = b"\0GLIBC_2.17\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.4\0GLIBC_2.";
        assert_eq!(needed_glibc(elf).as_deref(), Some("2.34"));
        assert_eq!(needed_glibc(b"nothing here"), None);
    }
}

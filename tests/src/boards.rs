//! The ARM boards the tests and benchmarks emulate with Debian's qemu-user, and where
//! `scripts/cross.sh` leaves the agents built for them.

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;

/// A board to emulate.
#[derive(Debug, Clone, Copy)]
pub struct Board {
    pub triple: &'static str,
    /// The qemu-user binary that runs the target's code.
    pub qemu: &'static str,
    /// The cross C library (qemu's `-L`).
    pub sysroot: &'static str,
    /// What the agent reports as its architecture.
    pub arch: &'static str,
    /// The engine target a runtime-only agent asks the hub to compile for.
    pub engine_target: &'static str,
}

pub const AARCH64: Board = Board {
    triple: "aarch64-unknown-linux-gnu",
    qemu: "qemu-aarch64",
    sysroot: "/usr/aarch64-linux-gnu",
    arch: "aarch64",
    engine_target: "aarch64-unknown-linux-gnu",
};

pub const ARMV7: Board = Board {
    triple: "armv7-unknown-linux-gnueabihf",
    qemu: "qemu-arm",
    sysroot: "/usr/arm-linux-gnueabihf",
    arch: "arm",
    engine_target: "pulley32",
};

impl Board {
    /// The board whose triple `triple` names.
    pub fn by_triple(triple: &str) -> Result<Board> {
        match [AARCH64, ARMV7].into_iter().find(|b| b.triple == triple) {
            Some(b) => Ok(b),
            None => bail!("unknown board triple {triple:?} (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)"),
        }
    }

    /// A cross-compiled agent from `scripts/cross.sh` (`target/{triple}/debug/{name}`):
    /// `shoal-agent`, or `shoal-agent-runtime-only`.
    pub fn cross_agent(&self, name: &str) -> Result<PathBuf> {
        let p = crate::bin_dir()
            .parent()
            .map(|t| t.join(self.triple).join("debug").join(name))
            .unwrap_or_default();
        if !p.is_file() {
            bail!(
                "{} not found: run scripts/cross.sh first (it installs the cross toolchain and builds it)",
                p.display()
            );
        }
        Ok(p)
    }

    /// The command that runs `agent` (built for this board) under qemu-user.
    pub fn qemu(&self, agent: &std::path::Path) -> Command {
        let mut cmd = Command::new(self.qemu);
        cmd.arg("-L").arg(self.sysroot).arg(agent);
        cmd
    }
}

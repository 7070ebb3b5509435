//! A pseudo-terminal standing in for a serial device: its slave is a real character device
//! (`/dev/pts/N`) an agent can offer as `serial` hardware, its master is the "sensor" the test
//! plays. Both sides are raw (no echo, no CR/LF translation), as a serial line is.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

pub struct Pty {
    master: File,
    /// Held open so the master reads (and keeps) whatever is written before a workload
    /// opens the slave, and after it closes it.
    _slave: File,
    /// The slave's path, e.g. `/dev/pts/3`.
    pub path: String,
    lines: mpsc::Receiver<String>,
}

impl Pty {
    pub fn open() -> Result<Pty> {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        use std::os::unix::fs::OpenOptionsExt;
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let path = ptsname(&master, Vec::new())?
            .into_string()
            .ok()
            .context("pty name is not UTF-8")?;
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(&path)
            .with_context(|| format!("open {path}"))?;
        let mut t = rustix::termios::tcgetattr(&slave)?;
        t.make_raw();
        rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t)?;
        let master = File::from(master);
        let reader = master.try_clone()?;
        let (tx, lines) = mpsc::channel();
        // Ends when the master is closed (read fails) or the receiver is gone.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Ok(Pty {
            master,
            _slave: slave,
            path,
            lines,
        })
    }

    /// The next line written to the device that contains `want` (earlier ones are skipped).
    pub fn expect_line(&self, want: &str, within: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("no line with {want:?} on {} in {within:?}", self.path))?;
            if line.contains(want) {
                return Ok(line);
            }
        }
    }

    /// Writes `text` to the device, as the sensor answering.
    pub fn send(&self, text: &str) -> Result<()> {
        (&self.master).write_all(text.as_bytes())?;
        Ok(())
    }
}

//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! installed by `scripts/install-deps.sh`), for the dashboard test.
//!
//! The WebDriver calls are written by hand: the test needs five endpoints (new session,
//! navigate, execute script, screenshot, delete session), and the Rust WebDriver clients
//! (fantoccini, thirtyfour) pull in a TLS stack with a C build (aws-lc-sys) and ICU for them.

use crate::{free_port, wait_until, Proc};
use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A browser session; the browser (and chromedriver) are gone when it is dropped.
pub struct Browser {
    port: u16,
    session: String,
    driver: Proc,
}

/// One WebDriver call (HTTP/1.1, one connection per call); the `value` of the answer.
fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open whatever we ask: read by Content-Length.
    let mut answer = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, body) = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("webdriver {method} {path}: connection closed early");
        }
        answer.extend_from_slice(&buf[..n]);
        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&answer[..end]).into_owned();
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .with_context(|| format!("webdriver {method} {path}: no Content-Length in {head}"))?;
        while answer.len() < end + 4 + len {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("webdriver {method} {path}: answer cut short");
            }
            answer.extend_from_slice(&buf[..n]);
        }
        break (
            head,
            String::from_utf8_lossy(&answer[end + 4..end + 4 + len]).into_owned(),
        );
    };
    let v: Value = serde_json::from_str(&body)
        .with_context(|| format!("webdriver {method} {path}: {head}\n{body}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("webdriver {method} {path}: {head}\n{v}");
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (its profile under `dir`).
    pub fn start(dir: &Path) -> Result<Browser> {
        for p in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(p).exists() {
                bail!("{p} not found: run scripts/install-deps.sh (it installs Debian's chromium and chromium-driver)");
            }
        }
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            // Its own process group: dropping the browser kills Chromium's helpers too.
            .process_group(0);
        let driver = Proc::spawn("chromedriver", &mut cmd, dir.join("chromedriver.log"))?;
        wait_until(Duration::from_secs(20), "chromedriver ready", || {
            Ok(call(port, "GET", "/status", None)
                .ok()
                .filter(|v| v["ready"] == true)
                .map(|_| ()))
        })?;
        let profile = dir.join("chromium-profile");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // The hubs under test use their own fleet CA.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let session = call(port, "POST", "/session", Some(&caps))?;
        let Some(id) = session["sessionId"].as_str() else {
            bail!("webdriver gave no session: {session}");
        };
        Ok(Browser {
            port,
            session: id.to_string(),
            driver,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        call(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    /// Saves a PNG of the page to `path`; returns its size in bytes.
    pub fn screenshot(&self, path: &Path) -> Result<usize> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("screenshot is not a string")?)?;
        if !png.starts_with(b"\x89PNG") {
            bail!("screenshot is not a PNG");
        }
        std::fs::write(path, &png)?;
        Ok(png.len())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Quit the browser cleanly, then make sure nothing of the group is left.
        let _ = call(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let pid = self.driver.pid();
        if pid != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        self.driver.kill();
    }
}

//! The web dashboard in a real browser: Debian's headless Chromium, driven over WebDriver,
//! against a running hub with an agent. A workload applied with the CLI shows up live (no
//! reload) with its phase; the workload and device pages and the events render; screenshots
//! are saved as artifacts (`$SHOAL_ARTIFACTS`, else `artifacts/` in the repository).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_e2e::browser::Browser;
use shoal_e2e::*;
use std::time::Duration;

/// Waits until `script` (a function body) returns something other than null/false/"".
fn wait_js(b: &Browser, what: &str, script: &str) -> anyhow::Result<Value> {
    wait_until(Duration::from_secs(30), what, || {
        let v = b.eval(script)?;
        Ok(match &v {
            Value::Null | Value::Bool(false) => None,
            Value::String(s) if s.is_empty() => None,
            _ => Some(v),
        })
    })
    .map_err(|e| {
        let body = b.eval("return document.body.innerText").unwrap_or_default();
        e.context(format!("page text:\n{}", body.as_str().unwrap_or_default()))
    })
}

fn artifacts() -> std::path::PathBuf {
    let dir = std::env::var_os("SHOAL_ARTIFACTS")
        .map(Into::into)
        .unwrap_or_else(|| repo_root().join("artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_dashboard_shows_a_workload_applied_with_the_cli_live() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start_with(dir.path(), None, free_port(), free_port(), &["--insecure"])?;
    let _agent = Agent::start(dir.path(), "dev1", "role=edge", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;

    let browser = Browser::start(dir.path())?;
    browser.goto(&format!("{}/", hub.hub_url()))?;
    wait_js(
        &browser,
        "dev1 online on the overview",
        r#"return document.querySelector('#devices tr[data-device="dev1"]')?.dataset.state === "Online""#,
    )?;
    assert_eq!(
        browser.eval("return document.getElementById('link').textContent")?,
        "live"
    );
    // Marks this page load: a reload would lose it.
    browser.eval("window.shoalMarker = 42; return null")?;

    hub.apply(&heartbeat_manifest(dir.path(), 2, 100))?;
    wait_js(
        &browser,
        "beat running on the overview",
        r#"return document.querySelector('#workloads tr[data-workload="beat"]')?.dataset.phases === "Running,Running""#,
    )?;
    assert_eq!(
        browser.eval("return window.shoalMarker ?? null")?,
        42,
        "updated live, not reloaded"
    );
    wait_js(
        &browser,
        "the Created event listed",
        r#"return !!document.querySelector('table.events tr[data-reason="Created"]')"#,
    )?;
    let summary = browser.eval("return document.getElementById('summary').innerText")?;
    assert!(
        summary.as_str().unwrap().contains("2/2 replicas running"),
        "{summary}"
    );
    let shots = artifacts();
    let size = browser.screenshot(&shots.join("dashboard-overview.png"))?;
    assert!(size > 10_000, "a real page, not a blank one: {size} bytes");

    // The workload's page: its replicas; then a new revision rolls out and the page shows it.
    browser.eval("location.hash = '#/workloads/beat'; return null")?;
    wait_js(
        &browser,
        "beat's replicas on its page",
        r#"return document.querySelectorAll('#replicas tr[data-phase="Running"]').length === 2"#,
    )?;
    hub.apply(&heartbeat_manifest(dir.path(), 2, 150))?;
    wait_js(
        &browser,
        "the rollout complete on beat's page",
        r#"const r = document.getElementById('rollout'); return r && r.innerText.includes('Complete') && r.innerText.includes('2/2 updated')"#,
    )?;
    browser.screenshot(&shots.join("dashboard-workload.png"))?;

    // The device's page: what runs there.
    browser.eval("location.hash = '#/devices/dev1'; return null")?;
    wait_js(
        &browser,
        "dev1's replicas on its page",
        r#"return document.querySelectorAll('#device-replicas tr[data-phase="Running"]').length === 2"#,
    )?;
    let text = browser.eval("return document.getElementById('view').innerText")?;
    assert!(text.as_str().unwrap().contains("DeviceJoined"), "{text}");
    browser.screenshot(&shots.join("dashboard-device.png"))?;
    eprintln!("screenshots in {}", shots.display());
    Ok(())
}

#[test]
fn a_browser_signs_in_to_a_tls_hub_with_a_one_time_link_and_may_only_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path(), None)?;
    let _agent = Agent::start(dir.path(), "dev1", "role=edge", &hub.join())?;
    hub.wait_devices_online(1, Duration::from_secs(20))?;
    let browser = Browser::start(dir.path())?;

    // Without signing in: the page loads, its data does not.
    browser.goto(&format!("{}/", hub.hub_url()))?;
    let status = browser.eval("return fetch('/v1/devices').then(r => r.status)")?;
    assert_eq!(status, 401);
    assert_ne!(
        browser.eval("return document.getElementById('link').textContent")?,
        "live"
    );

    // `shoal dashboard`: a link, good once.
    let link = String::from_utf8(hub.shoal_ok(&["dashboard"]).stdout)?;
    let link = link.trim();
    assert!(
        link.starts_with(&format!("{}/login?token=", hub.hub_url())),
        "{link}"
    );
    browser.goto(link)?;
    wait_js(
        &browser,
        "dev1 online after signing in",
        r#"return location.pathname === "/" && document.querySelector('#devices tr[data-device="dev1"]')?.dataset.state === "Online""#,
    )?;
    // Read-only: a change is refused even with the session.
    let status = browser
        .eval("return fetch('/v1/workloads/x', { method: 'DELETE' }).then(r => r.status)")?;
    assert_eq!(status, 401);
    let status = browser.eval("return fetch('/v1/secrets').then(r => r.status)")?;
    assert_eq!(status, 401);
    // The link was used up.
    let again = browser.eval(&format!(
        "return fetch('{}', {{ redirect: 'manual', credentials: 'omit' }}).then(r => r.status)",
        link.trim_start_matches(&hub.hub_url())
    ))?;
    assert_eq!(again, 401);
    Ok(())
}

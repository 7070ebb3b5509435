//! Streams: `shoal events` and `shoal logs` (the hub relays device logs), followed until
//! interrupted with `-f`.

use super::*;

/// `shoal get events [--for OBJECT] [-w]`.
pub(crate) async fn events(
    hub: &Hub,
    object: Option<String>,
    watch: bool,
    output: Output,
) -> anyhow::Result<()> {
    if let Some(o) = &object {
        match o.split_once('/') {
            Some(("workload" | "device", name)) if !name.is_empty() => {}
            _ => bail!("--for {o:?}: expected workload/NAME or device/ID"),
        }
    }
    let path = |after: u64| {
        let mut p = format!("/v1/events?after={after}");
        if let Some(o) = &object {
            p.push_str("&object=");
            p.push_str(&url_escape(o));
        }
        p
    };
    let mut seen: Vec<EventView> = hub.get(&path(0)).await?;
    if !watch {
        return emit(&seen, output, |wide| events_table(&seen, wide, true));
    }
    // Watch: the list so far, then new events as they come (one JSON document per line
    // with -o json, as `kubectl get -w` does).
    let mut header = true;
    loop {
        match output {
            Output::Json => {
                for e in &seen {
                    println!("{}", serde_json::to_string(e)?);
                }
            }
            Output::Yaml => {
                for e in &seen {
                    print!("---\n{}", serde_yaml_ng::to_string(e)?);
                }
            }
            Output::Table | Output::Wide if !seen.is_empty() => {
                print!("{}", events_table(&seen, output == Output::Wide, header));
                header = false;
            }
            _ => {}
        }
        let after = seen.last().map(|e| e.seq);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        seen = hub.get(&path(after.unwrap_or(0))).await?;
    }
}

/// `shoal logs`: prints the hub's stream of [`LogEntry`]s as it comes.
pub(crate) async fn logs(
    hub: &Hub,
    path: &str,
    follow: bool,
    prefix: bool,
    output: Output,
) -> anyhow::Result<()> {
    use std::io::Write;
    // A followed stream lasts as long as the operator wants (the client's 30 s does not
    // apply); a plain read ends when every device has answered or timed out.
    let timeout = if follow {
        Duration::from_secs(u64::from(u32::MAX))
    } else {
        Duration::from_secs(120)
    };
    let send = hub
        .http()?
        .get(format!("{}{path}", hub.base))
        .timeout(timeout)
        .send()
        .await;
    let mut resp = hub.check(send, path).await?;
    let replicas: usize = resp
        .headers()
        .get("x-shoal-replicas")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let prefixed = prefix || replicas > 1;
    let mut failed = 0;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            c = resp.chunk() => c.context("the hub's log stream broke off")?,
        };
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        let mut out = std::io::stdout().lock();
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let entry: LogEntry =
                serde_json::from_slice(&line[..nl]).context("hub sent an unreadable log entry")?;
            if let Some(e) = &entry.error {
                failed += 1;
                eprintln!("error: {}", escaped(e));
            }
            match output {
                Output::Json => out.write_all(&line)?,
                Output::Yaml => write!(out, "---\n{}", serde_yaml_ng::to_string(&entry)?)?,
                Output::Table | Output::Wide if entry.error.is_none() => {
                    // Lines come from workloads on devices: control characters are shown
                    // escaped, so they cannot drive the terminal (`-o json` has them raw).
                    if prefixed {
                        writeln!(
                            out,
                            "[{}] {}",
                            escaped(&entry.instance),
                            escaped(&entry.line)
                        )?;
                    } else {
                        writeln!(out, "{}", escaped(&entry.line))?;
                    }
                }
                _ => {}
            }
        }
        // Flushed per chunk: `shoal logs -f web | grep …` sees lines as they come.
        out.flush()?;
    }
    if failed > 0 {
        bail!("{failed} device(s) could not send their lines (see above)");
    }
    Ok(())
}

/// Escapes what a query value must not carry raw (names are `[a-z0-9-]`, plus the slash).
pub(crate) fn url_escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('&', "%26")
        .replace('#', "%23")
        .replace('+', "%2B")
}

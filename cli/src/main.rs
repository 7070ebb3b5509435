//! `shoal`: the operator command line.
//!
//! `apply` validates a manifest locally, uploads modules given as local paths, pins `oci://`
//! tags to their manifest digests, and publishes
//! the manifest on `shoal/v1/apply/{req}`, waiting for the hub's verdict on
//! `shoal/v1/results/{req}` — exactly what a third-party MQTT client would do. The read and
//! delete commands, and `logs` (which the hub relays from the devices over MQTT), use the
//! hub's HTTP API.
//!
//! Output: tables sized to the terminal by default (`-o wide` for every column), or
//! `-o json` / `-o yaml` for scripts. Exit status: 0 done, 1 failed (the reason on stderr;
//! for `rollout status`, a rollout that failed), 2 bad usage.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shoal_api::endpoint::BrokerUrl;
use shoal_api::manifest::{parse_stream, to_yaml_stream, ManifestError};
use shoal_api::messages::ApplyResult;
use shoal_api::operator::AuditEntry;
use shoal_api::printable::escaped;
use shoal_api::quantity::format_memory_rounded;
use shoal_api::table::Table;
use shoal_api::topics;
use shoal_api::views::{
    ApiError, BlobRef, DeviceView, EventView, LogEntry, SecretView, WorkloadView,
};
use shoal_api::workload::{validate_all, ModuleRef};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What `shoal label` labels.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LabelKind {
    Device,
}

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Operate a Shoal fleet",
    after_help = "Examples:
  shoal apply -f examples/fleet.yaml       apply a fleet manifest and wait for the verdict
  shoal get workloads                      what runs, how many replicas are ready
  shoal get devices -o wide                every column (labels, mDNS addresses, generations)
  shoal label device edge-1 role=vault     grant a label (placement selects on operators' labels)
  shoal get events --for workload/web -w   what happened to web, then follow new events
  shoal logs web --since 10m -f            web's recent lines from its devices, then new ones
  shoal describe workload web -o yaml      one workload, with its spec, as YAML
  shoal rollout status web                 wait for a rollout (exit 1 if it fails)
  shoal dashboard                          a link that signs a browser in to the dashboard
  shoal completion bash > /etc/bash_completion.d/shoal

Exit status: 0 done, 1 failed (the reason is on stderr), 2 bad usage."
)]
struct Cli {
    /// MQTT broker of the fleet (`mqtt://` only for a hub run --insecure).
    #[arg(
        long,
        global = true,
        env = "SHOAL_BROKER",
        default_value = "mqtts://127.0.0.1:8883"
    )]
    broker: BrokerUrl,
    /// HTTP API of the hub (`http://` only for a hub run --insecure).
    #[arg(
        long,
        global = true,
        env = "SHOAL_HUB",
        default_value = "https://127.0.0.1:8080"
    )]
    hub: String,
    /// The operator credential bundle (ca.pem, operator.pem, operator.key) the hub writes to
    /// its DATA_DIR/operator [default: ~/.config/shoal/operator, else ./.shoal/hub/operator,
    /// where scripts/up.sh keeps its hub].
    #[arg(long, global = true, env = "SHOAL_CREDENTIALS", value_name = "DIR")]
    credentials: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// A registry (`HOST:PORT`) that may be reached over plain HTTP; loopback ones always may.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// User name for the registry of an `oci://` reference (with SHOAL_REGISTRY_PASSWORD).
    #[arg(
        long,
        global = true,
        env = "SHOAL_REGISTRY_USERNAME",
        requires = "registry_password"
    )]
    registry_username: Option<String>,
    #[arg(
        long,
        global = true,
        env = "SHOAL_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    registry_password: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Columns that fit the terminal.
    Table,
    /// Every column, nothing shortened.
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Apply a fleet manifest (YAML stream or JSON); `-f -` reads standard input.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// How long to wait for the hub's verdict.
        #[arg(long, default_value = "10s", value_parser = shoal_api::quantity::duration_arg)]
        timeout: Duration,
    },
    /// Upload a WASM module to the hub and print its digest, or with an `oci://` reference
    /// publish it to that registry and print the reference pinned to its digest.
    Push {
        file: PathBuf,
        /// `oci://REGISTRY/REPOSITORY:TAG`.
        destination: Option<shoal_api::oci::OciRef>,
    },
    /// List devices, workloads, secrets (names and keys, never values) or recent events.
    Get {
        #[arg(value_enum)]
        kind: Kind,
        /// `events`: only those about this object (`workload/NAME` or `device/ID`).
        #[arg(long = "for", value_name = "KIND/NAME")]
        object: Option<String>,
        /// `events`: keep printing new events as they happen (until Ctrl-C).
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show one workload (or secret) in detail.
    Describe {
        #[arg(value_enum)]
        kind: OneKind,
        name: String,
    },
    /// Delete a workload, or a secret no workload uses.
    Delete {
        #[arg(value_enum)]
        kind: OneKind,
        name: String,
    },
    /// Watch or steer a workload's rollout.
    Rollout {
        #[arg(value_enum)]
        action: RolloutCmd,
        workload: String,
        /// `status`: print once instead of waiting for the rollout to finish.
        #[arg(long)]
        no_wait: bool,
        /// `status`: how long to wait.
        #[arg(long, default_value = "10m", value_parser = shoal_api::quantity::duration_arg)]
        timeout: Duration,
        /// `undo`: the revision to go back to (from `rollout history`; a unique prefix does).
        #[arg(long, value_name = "REVISION")]
        to_revision: Option<String>,
    },
    /// Change a workload's replica count (no rollout: the revision stays).
    Scale {
        workload: String,
        #[arg(long)]
        replicas: u32,
    },
    /// Set or remove a device's labels. Placement selects on these only: a device's own
    /// `--labels` steer nothing until an operator grants them (here, or with `shoal-hub
    /// token create --labels` when it enrolls). Keys under `shoal.dev/` are operators' alone.
    #[command(after_help = "Examples:
  shoal label device edge-1 role=vault zone=a   grant labels
  shoal label device edge-1 role=db --overwrite  change one that has another value
  shoal label device edge-1 role-                remove one")]
    Label {
        /// What to label.
        kind: LabelKind,
        device: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
        /// Allow changing a label that has another value.
        #[arg(long)]
        overwrite: bool,
    },
    /// Stop placing new replicas on a device (what runs there stays).
    Cordon { device: String },
    /// Let a cordoned device take new replicas again.
    Uncordon { device: String },
    /// Cordon a device and move its replicas elsewhere (`placement: every` ones stay).
    Drain { device: String },
    /// Print a workload's log lines, which the hub reads from its devices over MQTT (each
    /// device keeps its replicas' recent logs in bounded files).
    #[command(after_help = "Examples:
  shoal logs web                     every replica's lines, prefixed with the replica
  shoal logs web --device edge-1 -f  one device's replicas, then new lines until Ctrl-C
  shoal logs web --since 10m         what the last ten minutes wrote
  shoal logs web --tail 20 -o json   the last 20 lines per replica, one JSON object each

Exit status 1 if a device could not send its lines (offline, silent, no logs there); the
lines of the others are printed anyway.")]
    Logs {
        workload: String,
        /// Only from this device (default: every device with a replica of the workload).
        #[arg(long)]
        device: Option<String>,
        /// Keep printing new lines as the replicas write them (until Ctrl-C).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only lines written this recently (e.g. 30s, 10m, 2h), by each device's clock.
        #[arg(long, value_parser = shoal_api::quantity::duration_arg, value_name = "DURATION")]
        since: Option<Duration>,
        /// Only the last N lines of each replica.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
        /// Prefix each line with its replica (the default when there are several).
        #[arg(long)]
        prefix: bool,
    },
    /// Print a link that signs a browser in to the hub's web dashboard (read-only; one use,
    /// within 5 minutes). A hub run --insecure needs none: its address is printed.
    Dashboard,
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(after_help = "Examples:
  shoal completion bash > /etc/bash_completion.d/shoal
  shoal completion zsh > \"${fpath[1]}/_shoal\"
  shoal completion fish > ~/.config/fish/completions/shoal.fish")]
    Completion { shell: clap_complete::Shell },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RolloutCmd {
    /// Progress of the latest rollout; waits until it ends (exit status 1 if it failed).
    Status,
    /// The workload's revisions and how each ended.
    History,
    Pause,
    Resume,
    /// Go past the canary without waiting for it to be ready.
    Promote,
    /// Go back to the revision before the current one (after an automatic rollback, the one
    /// that failed), or to `--to-revision`; the replica count and placement stay.
    Undo,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    #[value(alias = "device")]
    Devices,
    #[value(alias = "workload")]
    Workloads,
    /// Names, keys and versions only: values are never shown.
    #[value(alias = "secret")]
    Secrets,
    /// What happened in the fleet: placements, restarts, failures, rollouts, devices.
    #[value(alias = "event")]
    Events,
    /// Who changed what, when and from where (admins; the hub keeps it durably).
    Audit,
}

#[derive(Clone, Copy, ValueEnum)]
enum OneKind {
    #[value(alias = "workloads")]
    Workload,
    #[value(alias = "secrets")]
    Secret,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The operator's TLS client configuration, from the credential bundle.
/// The operator's TLS client: for HTTPS to the hub (`mqtt` false: the hub only), or for
/// MQTT (the hub's embedded broker, or an external broker of the fleet).
fn operator_tls(dir: Option<&Path>, mqtt: bool) -> Result<Arc<rustls::ClientConfig>, String> {
    let dir = credentials_dir(dir)?;
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| {
            format!(
                "operator credentials {:?}: {e}",
                dir.join(f).display().to_string()
            )
        })
    };
    let identity =
        shoal_pki::tls::ClientIdentity::new(&read("operator.pem")?, &read("operator.key")?)
            .map_err(|e| {
                format!(
                    "operator credentials in {:?}: {e}",
                    dir.display().to_string()
                )
            })?;
    let config = if mqtt {
        shoal_pki::tls::mqtt_client_config
    } else {
        shoal_pki::tls::client_config
    };
    config(&read("ca.pem")?, Some(identity)).map_err(|e| {
        format!(
            "operator credentials in {:?}: {e}",
            dir.display().to_string()
        )
    })
}

/// The start of the MQTT client ids this operator may use: `{name}.` for a named operator
/// (`shoal-operator:NAME`; the broker holds it to that, so nobody takes over another's
/// session), none for the hub's own bundle or without credentials.
fn client_id_prefix(dir: Option<&Path>) -> String {
    credentials_dir(dir)
        .ok()
        .and_then(|d| std::fs::read_to_string(d.join("operator.pem")).ok())
        .and_then(|pem| shoal_pki::tls::first_cert(&pem).ok())
        .and_then(|der| shoal_pki::tls::common_name(&der))
        .and_then(|cn| shoal_api::operator::named_in(&cn))
        .map(|name| format!("{name}."))
        .unwrap_or_default()
}

/// Where the operator's credential bundle is.
fn credentials_dir(dir: Option<&Path>) -> Result<PathBuf, String> {
    Ok(match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let home =
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/shoal/operator"));
            let local = PathBuf::from(".shoal/hub/operator");
            match home.filter(|h| h.join("operator.pem").exists()) {
                Some(h) => h,
                None if local.join("operator.pem").exists() => local,
                None => return Err("no operator credentials found: point --credentials (or SHOAL_CREDENTIALS) at a bundle from `shoal-hub operator create NAME --role R --out DIR` (or, on the hub's host, its DATA_DIR/operator), or put it in ~/.config/shoal/operator".into()),
            }
        }
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completion { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "shoal", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Get {
        kind: Kind::Devices | Kind::Workloads | Kind::Secrets,
        object: Some(_),
        ..
    }
    | Command::Get {
        kind: Kind::Devices | Kind::Workloads | Kind::Secrets,
        watch: true,
        ..
    } = &cli.command
    {
        bail!("--for and --watch go with `get events` only");
    }
    shoal_registry::install_crypto();
    // Loaded only if a TLS endpoint is used; an error is reported when one is.
    let tls = if cli.hub.starts_with("https://") {
        operator_tls(cli.credentials.as_deref(), false)
    } else {
        Err("unused".into())
    };
    let mqtt_tls = if cli.broker.tls {
        operator_tls(cli.credentials.as_deref(), true)
    } else {
        Err("unused".into())
    };
    let hub = Hub::new(&cli.hub, &tls)?;
    let registries = registries(&cli);
    match cli.command {
        Command::Apply { file, timeout } => {
            let target = MqttTarget {
                broker: &cli.broker,
                tls: &mqtt_tls,
                client_prefix: client_id_prefix(cli.credentials.as_deref()),
            };
            apply(&target, &hub, &registries, &file, timeout, cli.output).await
        }
        Command::Push {
            file,
            destination: None,
        } => {
            let digest = push(&hub, &file).await?;
            println!("{digest}");
            Ok(())
        }
        Command::Push {
            file,
            destination: Some(to),
        } => {
            let bytes = read_module(&file)
                .map_err(|e| anyhow::anyhow!("module {:?}: {e}", file.display().to_string()))?;
            let what = format!(
                "pushing {} ({}) to {to}",
                file.display(),
                format_memory_rounded(bytes.len() as u64)
            );
            let pushed = with_spinner(what, registries.push_wasm(&to, bytes)).await?;
            println!("{}", pushed.reference);
            Ok(())
        }
        Command::Get {
            kind: Kind::Devices,
            ..
        } => {
            let devices: Vec<DeviceView> = hub.get("/v1/devices").await?;
            print_devices(&devices, cli.output)
        }
        Command::Get {
            kind: Kind::Workloads,
            ..
        } => {
            let workloads: Vec<WorkloadView> = hub.get("/v1/workloads").await?;
            print_workloads(&workloads, cli.output)
        }
        Command::Get {
            kind: Kind::Secrets,
            ..
        } => {
            let secrets: Vec<SecretView> = hub.get("/v1/secrets").await?;
            print_secrets(&secrets, cli.output)
        }
        Command::Get {
            kind: Kind::Events,
            object,
            watch,
        } => events(&hub, object, watch, cli.output).await,
        Command::Get {
            kind: Kind::Audit, ..
        } => {
            let entries: Vec<AuditEntry> = hub.get("/v1/audit").await?;
            emit(&entries, cli.output, |wide| audit_table(&entries, wide))
        }
        Command::Describe {
            kind: OneKind::Secret,
            name,
        } => {
            let secrets: Vec<SecretView> = hub.get("/v1/secrets").await?;
            let found: Vec<SecretView> = secrets.into_iter().filter(|s| s.name == name).collect();
            if found.is_empty() {
                bail!("secret {name:?} not found");
            }
            print_secrets(&found, cli.output)
        }
        Command::Describe { name, .. } => {
            let w: WorkloadView = hub.get(&format!("/v1/workloads/{name}")).await?;
            describe(&w, cli.output)
        }
        Command::Delete {
            kind: OneKind::Secret,
            name,
        } => {
            hub.delete(&format!("/v1/secrets/{name}")).await?;
            println!("secret/{name} deleted");
            Ok(())
        }
        Command::Delete { name, .. } => {
            hub.delete(&format!("/v1/workloads/{name}")).await?;
            println!("workload/{name} deleted");
            Ok(())
        }
        Command::Rollout {
            action,
            workload,
            no_wait,
            timeout,
            to_revision,
        } => {
            rollout(
                &hub,
                action,
                &workload,
                no_wait,
                timeout,
                to_revision,
                cli.output,
            )
            .await
        }
        Command::Scale { workload, replicas } => {
            hub.post_json(
                &format!("/v1/workloads/{workload}/scale"),
                &serde_json::json!({ "replicas": replicas }),
            )
            .await?;
            println!("workload/{workload} scaled to {replicas}");
            Ok(())
        }
        Command::Label {
            kind: LabelKind::Device,
            device,
            changes,
            overwrite,
        } => {
            let change = shoal_api::labels::LabelChange::parse(&changes, overwrite)?;
            let labels: shoal_api::labels::Labels = hub
                .post_for(
                    &format!("/v1/devices/{device}/labels"),
                    &serde_json::to_value(&change)?,
                )
                .await?;
            let now: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("device/{device} labelled: {}", now.join(","));
            Ok(())
        }
        Command::Cordon { device } => hub.device_action(&device, "cordon").await,
        Command::Uncordon { device } => hub.device_action(&device, "uncordon").await,
        Command::Drain { device } => hub.device_action(&device, "drain").await,
        Command::Completion { .. } => Ok(()), // answered above, before any setup
        Command::Logs {
            workload,
            device,
            follow,
            since,
            tail,
            prefix,
        } => {
            let mut path = format!(
                "/v1/workloads/{}/logs?follow={follow}",
                url_escape(&workload)
            );
            if let Some(d) = &device {
                path.push_str(&format!("&device={}", url_escape(d)));
            }
            if let Some(t) = tail {
                path.push_str(&format!("&tail={t}"));
            }
            if let Some(s) = since {
                path.push_str(&format!("&since={}", s.as_secs().max(1)));
            }
            logs(&hub, &path, follow, prefix, cli.output).await
        }
        Command::Dashboard => {
            if hub.base.starts_with("http://") {
                println!("{}/", hub.base);
                return Ok(());
            }
            let link: serde_json::Value = hub
                .post_for("/v1/dashboard/login", &serde_json::json!({}))
                .await?;
            let path = link["path"]
                .as_str()
                .context("hub sent an unreadable answer")?;
            println!("{}{path}", hub.base);
            eprintln!(
                "open it within {}s (once); the browser must trust the fleet CA (ca.pem of the operator bundle) or be told to accept the hub's certificate",
                link["expiresInSeconds"]
            );
            Ok(())
        }
    }
}

/// Prints `value` as JSON or YAML, or with `table` (told whether the view is wide).
fn emit<T: serde::Serialize + ?Sized>(
    value: &T,
    output: Output,
    table: impl FnOnce(bool) -> Table,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Output::Table => {
            let mut t = table(false);
            if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size() {
                t.fit(usize::from(w));
            }
            print!("{t}");
        }
        Output::Wide => print!("{}", table(true)),
    }
    Ok(())
}

/// `shoal get events [--for OBJECT] [-w]`.
async fn events(
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
async fn logs(
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
fn url_escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('&', "%26")
        .replace('#', "%23")
        .replace('+', "%2B")
}

fn events_table(events: &[EventView], wide: bool, header: bool) -> Table {
    let mut t = Table::new(&[
        "SEQ",
        "LAST SEEN",
        "TIME",
        "TYPE",
        "REASON",
        "OBJECT",
        "MESSAGE",
    ]);
    if !header {
        t.no_header();
    }
    for e in events {
        t.row(vec![
            e.seq.to_string(),
            ago(e.time_ms),
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms),
            )
            .to_string(),
            e.kind.clone(),
            e.reason.clone(),
            e.object.clone(),
            e.message.clone(),
        ]);
    }
    if !wide {
        t.hide(&["SEQ", "TIME"]);
    }
    t
}

struct Hub {
    base: String,
    /// `Err`: no client could be made (missing operator credentials), said on first use.
    client: Result<reqwest::Client, String>,
}

impl Hub {
    fn new(base: &str, tls: &Result<Arc<rustls::ClientConfig>, String>) -> anyhow::Result<Self> {
        let secure = base.starts_with("https://");
        if !secure && !base.starts_with("http://") {
            bail!("hub address {base:?} is invalid: expected https://HOST:PORT");
        }
        // The hub refuses state-changing requests a browser could send cross-site ("simple"
        // requests): this header, which a page cannot add without the hub's consent, says
        // the request is not one.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            shoal_api::views::CLIENT_HEADER,
            reqwest::header::HeaderValue::from_static("shoal-cli"),
        );
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .default_headers(headers);
        let client = match (secure, tls) {
            (false, _) => Ok(builder),
            (true, Ok(t)) => Ok(builder.use_preconfigured_tls((**t).clone())),
            (true, Err(e)) => Err(e.clone()),
        }
        .and_then(|b| {
            b.build()
                .map_err(|e| format!("cannot create an http client: {e}"))
        });
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client,
        })
    }

    fn http(&self) -> anyhow::Result<&reqwest::Client> {
        self.client.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    async fn check(
        &self,
        resp: reqwest::Result<reqwest::Response>,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let resp =
            resp.with_context(|| format!("cannot reach the hub at {} ({what})", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or(body);
        bail!("{msg} (hub answered {status})")
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self
            .check(
                self.http()?
                    .get(format!("{}{path}", self.base))
                    .send()
                    .await,
                path,
            )
            .await?;
        r.json().await.context("hub sent an unreadable answer")
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.check(
            self.http()?
                .delete(format!("{}{path}", self.base))
                .send()
                .await,
            path,
        )
        .await?;
        Ok(())
    }

    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<reqwest::Response> {
        self.check(
            self.http()?
                .post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await,
            path,
        )
        .await
    }

    async fn post_for<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let r = self.post(path, body).await?;
        r.json().await.context("hub sent an unreadable answer")
    }

    async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        self.post(path, body).await.map(drop)
    }

    /// `POST /v1/devices/{device}/{action}`, then says what was done.
    async fn device_action(&self, device: &str, action: &str) -> anyhow::Result<()> {
        let path = format!("/v1/devices/{device}/{action}");
        self.check(
            self.http()?
                .post(format!("{}{path}", self.base))
                .send()
                .await,
            &path,
        )
        .await?;
        println!("device/{device} {action}ed");
        Ok(())
    }

    /// `POST /v1/apply`: the hub's verdict, accepted (200) or not (422).
    async fn apply(&self, manifest: String) -> anyhow::Result<ApplyResult> {
        let r = self
            .http()?
            .post(format!("{}/v1/apply", self.base))
            .body(manifest)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = r.status();
        if status.is_success() || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            return r.json().await.context("hub sent an unreadable verdict");
        }
        let body = r.text().await.unwrap_or_default();
        bail!("hub answered {status} to apply: {body}")
    }

    async fn put_blob(&self, bytes: Vec<u8>) -> anyhow::Result<BlobRef> {
        let what = format!(
            "uploading {} to the hub",
            format_memory_rounded(bytes.len() as u64)
        );
        with_spinner(what, self.put_blob_quiet(bytes)).await
    }

    async fn put_blob_quiet(&self, bytes: Vec<u8>) -> anyhow::Result<BlobRef> {
        let r = self
            .check(
                self.http()?
                    .post(format!("{}/v1/blobs", self.base))
                    .body(bytes)
                    .send()
                    .await,
                "upload",
            )
            .await?;
        r.json().await.context("hub sent an unreadable answer")
    }
}

/// The registries `oci://` references are resolved against, with the credentials given.
fn registries(cli: &Cli) -> shoal_registry::Registries {
    let mut config = shoal_registry::RegistryConfig {
        insecure: cli.insecure_registries.clone(),
        ..Default::default()
    };
    if let (Some(username), Some(password)) = (&cli.registry_username, &cli.registry_password) {
        // Given once for the command: it applies to whichever registry it talks to.
        config.default_credentials = Some(shoal_registry::Credentials {
            username: username.clone(),
            password: password.clone(),
        });
    }
    shoal_registry::Registries::new(config)
}

/// Reads a module file and checks that it is valid WASM; the error is the reason only.
fn read_module(file: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
    shoal_api::wasm::validate(&bytes)
        .map_err(|e| format!("not a valid wasm module or component: {e}"))?;
    Ok(bytes)
}

/// Awaits `work`, with a spinner saying `what` on a terminal (nothing in scripts and pipes).
async fn with_spinner<T>(what: String, work: impl std::future::Future<Output = T>) -> T {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return work.await;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what);
    bar.enable_steady_tick(Duration::from_millis(120));
    let out = work.await;
    bar.finish_and_clear();
    out
}

/// `shoal push`: validates and uploads a module, returning its digest.
async fn push(hub: &Hub, file: &Path) -> anyhow::Result<String> {
    let bytes = read_module(file)
        .map_err(|e| anyhow::anyhow!("module {:?}: {e}", file.display().to_string()))?;
    Ok(hub.put_blob(bytes).await?.digest)
}

fn report(errors: &[ManifestError]) -> anyhow::Error {
    for e in errors {
        eprintln!("error: {e}");
    }
    anyhow::anyhow!(
        "manifest rejected ({} problem{})",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    )
}

/// Where `shoal apply` publishes: the broker, the operator's TLS client, and the start of
/// its MQTT client ids (see [`client_id_prefix`]).
struct MqttTarget<'a> {
    broker: &'a BrokerUrl,
    tls: &'a Result<Arc<rustls::ClientConfig>, String>,
    client_prefix: String,
}

async fn apply(
    mqtt: &MqttTarget<'_>,
    hub: &Hub,
    registries: &shoal_registry::Registries,
    file: &Path,
    timeout: Duration,
    output: Output,
) -> anyhow::Result<()> {
    let (text, base_dir) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("cannot read standard input")?;
        (s, PathBuf::from("."))
    } else {
        let s = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read manifest {:?}", file.display().to_string()))?;
        (s, file.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    // Validate locally first: the same checks as the hub, without a round trip.
    let stream = parse_stream(&text).map_err(|e| report(&e))?;
    let positions: Vec<(usize, String)> = stream
        .workloads
        .iter()
        .map(|(n, m)| (*n, m.metadata.name.clone()))
        .collect();
    let mut manifests: Vec<_> = stream.workloads.iter().map(|(_, m)| m.clone()).collect();
    let secrets: Vec<_> = stream.secrets.into_iter().map(|(_, s)| s).collect();
    let workloads = validate_all(stream.workloads).map_err(|e| report(&e))?;

    // Upload modules given as local paths; refer to them by digest. Pin `oci://` tags to the
    // digest they point at now, so every device runs the same bytes and a tag moved later
    // changes nothing until the next apply.
    let mut errors = Vec::new();
    for ((w, m), (doc, name)) in workloads.iter().zip(manifests.iter_mut()).zip(&positions) {
        let fail = |message: String| ManifestError {
            document: *doc,
            kind: None,
            workload: Some(name.clone()),
            message,
        };
        if let Some(c) = &w.container {
            // Pinned or not, learn the platforms unless the manifest lists them.
            if !c.image.is_pinned() || c.platforms.is_empty() {
                match registries.resolve_image(&c.image).await {
                    Ok((digest, platforms)) => {
                        if let Some(spec) = m.spec.container.as_mut() {
                            if !c.image.is_pinned() {
                                spec.image = c.image.pinned(digest).to_string();
                            }
                            if spec.platforms.is_empty() {
                                spec.platforms = platforms.iter().map(|p| p.to_string()).collect();
                            }
                        }
                    }
                    Err(e) => errors.push(fail(format!("spec.container.image: {e}"))),
                }
            }
        }
        if let Some(ModuleRef::Oci(r)) = &w.module {
            // Pin tags to the digest they point at now, so every device runs the same bytes
            // and a tag moved later changes nothing until the next apply.
            if !r.is_pinned() {
                match with_spinner(format!("resolving {r}"), registries.resolve(r)).await {
                    Ok(digest) => {
                        if let Some(wasm) = m.spec.wasm.as_mut() {
                            wasm.module = r.pinned(digest).to_string();
                        }
                    }
                    Err(e) => errors.push(fail(format!("spec.wasm.module: {e}"))),
                }
            }
            continue;
        }
        if let Some(ModuleRef::Path(p)) = &w.module {
            let uploaded = match read_module(&base_dir.join(p)) {
                Ok(bytes) => hub
                    .put_blob(bytes)
                    .await
                    .map(|b| b.digest)
                    .map_err(|e| format!("{e:#}")),
                Err(e) => Err(e),
            };
            match uploaded {
                Ok(digest) => {
                    if let Some(wasm) = m.spec.wasm.as_mut() {
                        wasm.module = digest;
                    }
                }
                Err(e) => errors.push(fail(format!("spec.wasm.module {p:?}: {e}"))),
            }
        }
    }
    if !errors.is_empty() {
        return Err(report(&errors));
    }
    let payload = to_yaml_stream(&manifests, &secrets).context("cannot encode manifest")?;
    // Secret values go over HTTPS to the hub only: on MQTT the broker (and any operator
    // subscribed to shoal/v1/apply) would see them.
    let result = if secrets.is_empty() {
        publish_apply(mqtt, payload, timeout).await?
    } else {
        hub.apply(payload).await?
    };
    if matches!(output, Output::Json | Output::Yaml) {
        emit(&result, output, |_| Table::new(&[]))?;
    }
    if !result.accepted {
        return Err(report(&result.errors));
    }
    if matches!(output, Output::Table | Output::Wide) {
        for (name, verdict) in &result.secrets {
            println!("secret/{name} {verdict}");
        }
        for (name, verdict) in &result.workloads {
            println!("workload/{name} {verdict}");
        }
    }
    Ok(())
}

/// Publishes on `shoal/v1/apply/{req}` and waits for `shoal/v1/results/{req}`.
async fn publish_apply(
    mqtt: &MqttTarget<'_>,
    payload: String,
    timeout: Duration,
) -> anyhow::Result<ApplyResult> {
    let (broker, tls, client_prefix) = (mqtt.broker, mqtt.tls, &mqtt.client_prefix);
    let req = format!("{:016x}", rand::random::<u64>());
    let mut opts = MqttOptions::new(
        format!("{client_prefix}shoal-cli-{req}"),
        broker.host.clone(),
        broker.port,
    );
    if broker.tls {
        let tls = tls.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut events) = AsyncClient::new(opts, 16);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let results = topics::results(&req);
    let work = async {
        let mut published = false;
        loop {
            match events
                .poll()
                .await
                .with_context(|| format!("cannot reach the broker at {broker}"))?
            {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client.subscribe(results.clone(), QoS::AtLeastOnce).await?;
                }
                Event::Incoming(Packet::SubAck(_)) if !published => {
                    client
                        .publish(
                            topics::apply(&req),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone().into_bytes(),
                        )
                        .await?;
                    published = true;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == results => {
                    let r: ApplyResult = serde_json::from_slice(&p.payload)
                        .context("hub sent an unreadable verdict")?;
                    let _ = client.try_disconnect();
                    return Ok::<_, anyhow::Error>(r);
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => bail!(
            "no verdict from the hub on {results} within {}s: is shoal-hub running and connected to {broker}?",
            timeout.as_secs()
        ),
    }
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shoal_api::quantity::format_age(now.saturating_sub(ms))
}

fn print_devices(devices: &[DeviceView], output: Output) -> anyhow::Result<()> {
    emit(devices, output, |wide| devices_table(devices, wide))
}

fn devices_table(devices: &[DeviceView], wide: bool) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "STATUS",
        "ARCH",
        "RUNTIMES",
        "CPUS",
        "MEMORY",
        "ALLOCATED",
        "REPLICAS",
        "GENERATION",
        "LAST SEEN",
        "MDNS",
        "LABELS",
        "NOT GRANTED",
    ]);
    let list = |l: &std::collections::BTreeMap<String, String>| -> String {
        let items: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if items.is_empty() {
            "<none>".into()
        } else {
            items.join(",")
        }
    };
    for d in devices {
        t.row(vec![
            d.id.clone(),
            {
                let state = match (d.online, d.lost) {
                    _ if d.revoked => "Revoked",
                    (true, _) => "Online",
                    (false, true) => "Lost",
                    // Enrolled, never connected.
                    (false, false) if d.last_seen_ms == 0 => "Enrolled",
                    (false, false) => "Offline",
                };
                if d.cordoned {
                    format!("{state},Cordoned")
                } else {
                    state.to_string()
                }
            },
            d.arch.clone(),
            d.runtimes.join(","),
            d.cpus.to_string(),
            format_memory_rounded(d.memory),
            format_memory_rounded(d.memory_allocated),
            d.replicas.to_string(),
            format!("{}/{}", d.observed_generation, d.desired_generation),
            ago(d.last_seen_ms),
            if d.mdns_addresses.is_empty() {
                "-".into()
            } else {
                d.mdns_addresses.join(",")
            },
            list(&d.labels),
            // What the device asked for (its own --labels) and was not given.
            list(&d.requested_labels),
        ]);
    }
    if !wide {
        t.hide(&["RUNTIMES", "GENERATION", "MDNS", "NOT GRANTED"]);
    }
    t
}

fn audit_table(entries: &[AuditEntry], wide: bool) -> Table {
    let mut t = Table::new(&["SEQ", "AGE", "WHO", "FROM", "ACTION", "OUTCOME"]);
    for e in entries {
        t.row(vec![
            e.seq.to_string(),
            ago(e.time_ms),
            e.who.clone(),
            e.from.clone(),
            e.action.clone(),
            e.outcome.clone(),
        ]);
    }
    if !wide {
        t.hide(&["FROM"]);
    }
    t
}

fn print_secrets(secrets: &[SecretView], output: Output) -> anyhow::Result<()> {
    emit(secrets, output, |_| secrets_table(secrets))
}

fn secrets_table(secrets: &[SecretView]) -> Table {
    let mut t = Table::new(&["NAME", "KEYS", "VERSION", "USED BY"]);
    for s in secrets {
        t.row(vec![
            s.name.clone(),
            s.keys.join(","),
            s.version.clone(),
            if s.used_by.is_empty() {
                "-".into()
            } else {
                s.used_by.join(",")
            },
        ]);
    }
    t
}

fn print_workloads(workloads: &[WorkloadView], output: Output) -> anyhow::Result<()> {
    emit(workloads, output, |wide| workloads_table(workloads, wide))
}

fn workloads_table(workloads: &[WorkloadView], wide: bool) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "READY",
        "PLACEMENT",
        "REVISION",
        "PHASES",
        "DEVICES",
    ]);
    for w in workloads {
        let mut phases: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &w.replicas {
            *phases.entry(r.phase.to_string()).or_default() += 1;
        }
        let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{p}:{n}")).collect();
        let mut devices: Vec<String> = w.replicas.iter().filter_map(|r| r.device.clone()).collect();
        devices.dedup();
        t.row(vec![
            w.name.clone(),
            format!("{}/{}", w.ready, w.desired),
            w.placement.clone(),
            if wide {
                w.revision.clone()
            } else {
                w.revision.chars().take(12).collect()
            },
            if phases.is_empty() {
                "-".into()
            } else {
                phases.join(",")
            },
            if devices.is_empty() {
                "-".into()
            } else {
                devices.join(",")
            },
        ]);
    }
    t
}

fn describe(w: &WorkloadView, output: Output) -> anyhow::Result<()> {
    if matches!(output, Output::Json | Output::Yaml) {
        return emit(w, output, |_| Table::new(&[]));
    }
    println!("Name:       {}", w.name);
    println!("Revision:   {}", w.revision);
    println!(
        "Placement:  {} ({} ready / {} desired)",
        w.placement, w.ready, w.desired
    );
    if let Some(spec) = &w.spec {
        if let Some(module) = &spec.module {
            let module = match module {
                ModuleRef::Digest(d) => d.to_string(),
                ModuleRef::Path(p) => p.clone(),
                ModuleRef::Oci(r) => r.to_string(),
            };
            println!("Module:     {module}");
        }
        if let Some(c) = &spec.container {
            let platforms: Vec<String> = c.platforms.iter().map(|p| p.to_string()).collect();
            println!("Image:      {} ({})", c.image, platforms.join(", "));
        }
        println!(
            "Selector:   {}",
            if spec.selector.is_empty() {
                "<none>".to_string()
            } else {
                spec.selector.to_string()
            }
        );
        if let Some(key) = &spec.spread {
            println!("Spread:     by label {key}");
        }
        println!(
            "Resources:  {}",
            shoal_api::workload::describe_resources(&spec.resources)
        );
        if !spec.volumes.is_empty() {
            let v: Vec<String> = spec
                .volumes
                .iter()
                .map(|v| format!("{} at {}", v.name, v.path))
                .collect();
            println!("Volumes:    {}", v.join(", "));
        }
        println!(
            "Restart:    {:?} (back-off {}ms .. {}ms)",
            spec.restart.policy, spec.restart.initial_backoff_ms, spec.restart.max_backoff_ms
        );
        if !spec.args.is_empty() {
            println!("Args:       {:?}", spec.args);
        }
        for (k, v) in &spec.env {
            println!("Env:        {k}={v}");
        }
    }
    if let Some(p) = &w.pending_reason {
        println!("Pending:    {}", escaped(p));
    }
    println!("Replicas:");
    let mut t = Table::new(&[
        "REPLICA", "DEVICE", "VARIANT", "PHASE", "RESTARTS", "STARTED", "REASON",
    ]);
    for r in &w.replicas {
        t.row(vec![
            r.replica.to_string(),
            r.device.clone().unwrap_or_else(|| "<none>".into()),
            if r.variant.is_empty() {
                "-".into()
            } else {
                r.variant.clone()
            },
            r.phase.to_string(),
            r.restarts.to_string(),
            r.started_at_ms.map_or("-".into(), ago),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    print!("{t}");
    Ok(())
}

/// `shoal rollout ACTION WORKLOAD`.
async fn rollout(
    hub: &Hub,
    action: RolloutCmd,
    workload: &str,
    no_wait: bool,
    timeout: Duration,
    to_revision: Option<String>,
    output: Output,
) -> anyhow::Result<()> {
    if to_revision.is_some() && action != RolloutCmd::Undo {
        anyhow::bail!("--to-revision goes with `rollout undo` only");
    }
    let verb = match action {
        RolloutCmd::Pause => Some("pause"),
        RolloutCmd::Resume => Some("resume"),
        RolloutCmd::Promote => Some("promote"),
        RolloutCmd::Undo => Some("undo"),
        RolloutCmd::Status | RolloutCmd::History => None,
    };
    if let Some(verb) = verb {
        let body = match &to_revision {
            Some(rev) => serde_json::json!({ "toRevision": rev }),
            None => serde_json::json!({}),
        };
        hub.post_json(&format!("/v1/workloads/{workload}/rollout/{verb}"), &body)
            .await?;
        let done = match action {
            RolloutCmd::Undo => "undone",
            RolloutCmd::Pause => "paused",
            RolloutCmd::Resume => "resumed",
            _ => "promoted",
        };
        println!("workload/{workload} rollout {done}");
        return Ok(());
    }
    let path = format!("/v1/workloads/{workload}");
    if action == RolloutCmd::History {
        let w: WorkloadView = hub.get(&path).await?;
        let history = w.rollout.map(|r| r.history).unwrap_or_default();
        return emit(&history, output, |_| {
            let mut t = Table::new(&["REVISION", "APPLIED", "OUTCOME"]);
            for e in &history {
                t.row(vec![
                    e.revision.clone(),
                    ago(e.applied_ms),
                    e.outcome.clone(),
                ]);
            }
            t
        });
    }
    // Status until the rollout ends (kubectl rollout status): a live bar on a terminal,
    // otherwise one line per change (for logs and scripts). The last line always goes to
    // stdout.
    let deadline = tokio::time::Instant::now() + timeout;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} updated {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>.");
        let bar = indicatif::ProgressBar::new(0).with_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last = String::new();
    loop {
        let w: WorkloadView = hub.get(&path).await?;
        let Some(r) = w.rollout else {
            println!(
                "workload/{workload} has had no rollout (revision {})",
                w.revision
            );
            return Ok(());
        };
        // The reason may quote what a device reported: shown escaped.
        let reason = r
            .reason
            .map(|x| format!(" ({})", escaped(&x)))
            .unwrap_or_default();
        let line = format!(
            "workload/{workload} revision {}: {} {} {}/{} updated, {}/{} ready{reason}",
            r.revision,
            r.state,
            progress_bar(r.updated, r.total, 20),
            r.updated,
            r.total,
            w.ready,
            w.desired,
        );
        let finished = matches!(r.state.as_str(), "Complete" | "Failed" | "RolledBack");
        match &bar {
            Some(bar) => {
                bar.set_prefix(format!("workload/{workload} {} {}", r.revision, r.state));
                bar.set_length(u64::from(r.total));
                bar.set_position(u64::from(r.updated));
                bar.set_message(format!("{}/{} ready{reason}", w.ready, w.desired));
                if finished || no_wait {
                    bar.finish_and_clear();
                    println!("{line}");
                }
            }
            None if line != last => println!("{line}"),
            None => {}
        }
        last = line;
        match r.state.as_str() {
            "Complete" => return Ok(()),
            "Failed" | "RolledBack" => bail!("rollout of {workload} did not complete"),
            _ if no_wait => return Ok(()),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!("rollout of {workload} still {} after {timeout:?}", r.state);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `[#####.....]`: `done` of `total` in `width` cells.
fn progress_bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        (done as usize * width) / total as usize
    };
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(width - filled.min(width))
    )
}

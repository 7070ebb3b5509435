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
//!
//! This file declares the commands and dispatches them; [`credentials`], [`hub`] (HTTPS),
//! [`mqtt`] (the only MQTT client), [`apply`], [`tables`], [`watch`] and [`rollout`] do the
//! work.

mod apply;
mod config;
mod credentials;
mod device;
mod hub;
mod jobs;
mod mqtt;
mod rollout;
mod tables;
mod watch;

use apply::*;
use config::*;
use credentials::*;
use device::*;
use hub::*;
use jobs::*;
use mqtt::*;
use rollout::*;
use tables::*;
use watch::*;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use shoal_api::model::quantity::format_memory_rounded;
use shoal_api::model::workload::{validate_all, ModuleRef};
use shoal_api::policy::operator::AuditEntry;
use shoal_api::present::printable::escaped;
use shoal_api::present::table::Table;
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_api::wire::manifest::{parse_stream, to_yaml_stream, ManifestError};
use shoal_api::wire::messages::ApplyResult;
use shoal_api::wire::topics;
use shoal_api::wire::views::{
    ApiError, BlobRef, ConfigView, DeviceView, EventView, LogEntry, SecretView, WorkloadView,
};
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
  shoal annotate device edge-1 note='fan replaced'   a note for people (steers nothing)
  shoal get events --for workload/web -w   what happened to web, then follow new events
  shoal logs web --since 10m -f            web's recent lines from its devices, then new ones
  shoal describe workload web -o yaml      one workload, with its spec, as YAML
  shoal describe device edge-1             a device: capacity, hardware, labels, replicas, events
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
        #[arg(long, default_value = "10s", value_parser = shoal_api::model::quantity::duration_arg)]
        timeout: Duration,
    },
    /// Upload a WASM module to the hub and print its digest, or with an `oci://` reference
    /// publish it to that registry and print the reference pinned to its digest.
    Push {
        file: PathBuf,
        /// `oci://REGISTRY/REPOSITORY:TAG`.
        destination: Option<shoal_api::model::oci::OciRef>,
    },
    /// List devices, workloads, secrets (names and keys, never values), configs or recent
    /// events.
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
    /// Show one workload, secret, config (with each device's values) or device in detail.
    Describe {
        #[arg(value_enum)]
        kind: DescribeKind,
        name: String,
    },
    /// Delete a workload, a secret or config no workload uses, or an offline device the hub
    /// should forget (revoke it first to keep it out).
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
        #[arg(long, default_value = "10m", value_parser = shoal_api::model::quantity::duration_arg)]
        timeout: Duration,
        /// `undo`: the revision to go back to (from `rollout history`; a unique prefix does).
        #[arg(long, value_name = "REVISION")]
        to_revision: Option<String>,
    },
    /// Show (`get`) or set (`set --allow …`, admins) what containers may ask for beyond the
    /// confined defaults: `privileged`, `host-devices`. Devices must allow it too
    /// (`shoal-agent run --allow`).
    Policy {
        #[arg(value_enum)]
        action: PolicyCmd,
        /// `set`: the privileges allowed, comma-separated (`none`: none).
        #[arg(long, value_delimiter = ',', value_name = "PRIVILEGE")]
        allow: Vec<String>,
    },
    /// Run a job again (`spec.completion`): a new run from no results, the same revision.
    Rerun { workload: String },
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
    /// Set or remove a device's annotations: the operators' free-text notes (who owns it,
    /// where it hangs, what was replaced). They steer nothing; `describe device` shows them.
    #[command(after_help = "Examples:
  shoal annotate device edge-1 owner='plant 7, line 2'   add a note
  shoal annotate device edge-1 owner='line 3' --overwrite change one
  shoal annotate device edge-1 owner-                     remove one")]
    Annotate {
        /// What to annotate.
        kind: LabelKind,
        device: String,
        /// KEY=TEXT to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=TEXT|KEY-")]
        changes: Vec<String>,
        /// Allow changing an annotation that has another value.
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
        #[arg(long, value_parser = shoal_api::model::quantity::duration_arg, value_name = "DURATION")]
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyCmd {
    Get,
    Set,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    #[value(alias = "device")]
    Devices,
    #[value(alias = "workload")]
    Workloads,
    /// Workloads that run to completion: each one's current run, its counts and status.
    #[value(alias = "job")]
    Jobs,
    /// Names, keys and versions only: values are never shown.
    #[value(alias = "secret")]
    Secrets,
    /// Names, keys, overrides and users (`describe config` shows the values).
    #[value(alias = "config")]
    Configs,
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
    #[value(alias = "configs")]
    Config,
    /// A device gone for good (refused while it is online).
    #[value(alias = "devices")]
    Device,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DescribeKind {
    #[value(alias = "workloads")]
    Workload,
    #[value(alias = "secrets")]
    Secret,
    #[value(alias = "devices")]
    Device,
    #[value(alias = "configs")]
    Config,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completion { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "shoal", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Get {
        kind: Kind::Devices | Kind::Workloads | Kind::Jobs | Kind::Secrets | Kind::Configs,
        object: Some(_),
        ..
    }
    | Command::Get {
        kind: Kind::Devices | Kind::Workloads | Kind::Jobs | Kind::Secrets | Kind::Configs,
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
            kind: Kind::Jobs, ..
        } => {
            let workloads: Vec<WorkloadView> = hub.get("/v1/workloads").await?;
            let jobs: Vec<&WorkloadView> = workloads.iter().filter(|w| w.job.is_some()).collect();
            emit(&jobs, cli.output, |wide| jobs_table(&workloads, wide))
        }
        Command::Get {
            kind: Kind::Secrets,
            ..
        } => {
            let secrets: Vec<SecretView> = hub.get("/v1/secrets").await?;
            print_secrets(&secrets, cli.output)
        }
        Command::Get {
            kind: Kind::Configs,
            ..
        } => {
            let configs: Vec<ConfigView> = hub.get("/v1/configs").await?;
            emit(&configs, cli.output, |_| configs_table(&configs))
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
            kind: DescribeKind::Device,
            name,
        } => describe_device(&hub, &name, cli.output).await,
        Command::Describe {
            kind: DescribeKind::Config,
            name,
        } => describe_config(&hub, &name, cli.output).await,
        Command::Describe {
            kind: DescribeKind::Secret,
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
        Command::Delete {
            kind: OneKind::Device,
            name,
        } => {
            hub.delete(&format!("/v1/devices/{name}")).await?;
            println!("device/{name} deleted");
            Ok(())
        }
        Command::Delete {
            kind: OneKind::Config,
            name,
        } => {
            hub.delete(&format!("/v1/configs/{name}")).await?;
            println!("config/{name} deleted");
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
        Command::Policy { action, allow } => policy(&hub, action, &allow, cli.output).await,
        Command::Rerun { workload } => {
            hub.post_json(
                &format!("/v1/workloads/{workload}/rerun"),
                &serde_json::json!({}),
            )
            .await?;
            println!("job/{workload} runs again");
            Ok(())
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
            let change = shoal_api::model::labels::LabelChange::parse(&changes, overwrite)?;
            let labels: shoal_api::model::labels::Labels = hub
                .post_for(
                    &format!("/v1/devices/{device}/labels"),
                    &serde_json::to_value(&change)?,
                )
                .await?;
            let now: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("device/{device} labelled: {}", now.join(","));
            Ok(())
        }
        Command::Annotate {
            kind: LabelKind::Device,
            device,
            changes,
            overwrite,
        } => {
            use shoal_api::model::labels::{LabelChange, Meta};
            let change = LabelChange::parse_as(Meta::Annotation, &changes, overwrite)?;
            let now: shoal_api::model::labels::Labels = hub
                .post_for(
                    &format!("/v1/devices/{device}/annotations"),
                    &serde_json::to_value(&change)?,
                )
                .await?;
            let keys: Vec<&str> = now.keys().map(String::as_str).collect();
            println!("device/{device} annotated: {}", keys.join(","));
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

//! `shoal-hub`: the fleet hub binary.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "shoal-hub",
    version,
    about = "Shoal hub: schedules WASM workloads onto edge devices"
)]
struct Cli {
    #[command(flatten)]
    log: shoal_daemon::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (with its embedded MQTT broker unless --broker is given).
    ///
    /// Settings come from built-in defaults, then `--config FILE` (TOML, see
    /// examples/hub.toml), then environment variables, then flags: each later source wins.
    Serve(Box<shoal_hub::config::Settings>),
    /// Join tokens for new devices.
    #[command(subcommand)]
    Token(Box<TokenCommand>),
    /// Certificates from the fleet CA for an external broker.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Named operators and their roles (works while the hub runs).
    #[command(subcommand)]
    Operator(Box<OperatorCommand>),
    /// Devices: revocation (works while the hub runs).
    #[command(subcommand)]
    Device(Box<DeviceCommand>),
}

/// Where the enrollment book is: the hub's data directory (files), or its etcd store.
#[derive(clap::Args)]
struct BookArgs {
    /// The hub's data directory (its fleet CA; the book too unless --store is etcd).
    #[arg(long, env = "SHOAL_HUB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The hub's store, as given to `serve` (`sled`, or `etcds://…`).
    #[arg(long, env = "SHOAL_HUB_STORE", value_name = "URL")]
    store: Option<shoal_hub::backend::StoreChoice>,
    /// Allow a plaintext `etcd://` store (for local experiments only).
    #[arg(long)]
    insecure: bool,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Create operator NAME with a role and write its bundle (ca.pem, operator.pem,
    /// operator.key) to --out, for `shoal --credentials DIR`.
    Create {
        name: shoal_api::model::ids::OperatorName,
        /// viewer (reads), deployer (and changes workloads), admin (and manages devices,
        /// reads the audit log).
        #[arg(long)]
        role: shoal_api::policy::operator::Role,
        /// Where to write the bundle (created owner-only).
        #[arg(long)]
        out: PathBuf,
        /// How long its certificate is valid (renew before with `operator renew`).
        #[arg(long, default_value = "2160h", value_parser = shoal_api::model::quantity::duration_arg)]
        ttl: std::time::Duration,
        #[command(flatten)]
        book: BookArgs,
    },
    /// Issue operator NAME a new certificate (same name and role) into --out; the one it
    /// replaces keeps working until it expires.
    Renew {
        name: shoal_api::model::ids::OperatorName,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "2160h", value_parser = shoal_api::model::quantity::duration_arg)]
        ttl: std::time::Duration,
        #[command(flatten)]
        book: BookArgs,
    },
    /// Revoke operator NAME: its certificates are refused from its next connection on.
    Revoke {
        name: shoal_api::model::ids::OperatorName,
        #[command(flatten)]
        book: BookArgs,
    },
    /// List operators: name, role, expiry, revoked.
    List {
        #[command(flatten)]
        book: BookArgs,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Revoke device ID for good: its certificates are refused from its next connection on
    /// (MQTT and HTTPS), it cannot renew, and no join token enrolls that id again.
    Revoke {
        id: shoal_api::model::ids::DeviceId,
        #[command(flatten)]
        book: BookArgs,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue a server certificate for an external MQTT broker (e.g. mosquitto, see
    /// examples/mosquitto/): writes ca.pem, broker.pem and broker.key to --out. Creates the
    /// fleet CA (and the operator bundle) if the hub has not run yet.
    Broker {
        /// The hub's data directory.
        #[arg(long, env = "SHOAL_HUB_DATA_DIR")]
        data_dir: PathBuf,
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// A DNS name or IP address clients reach the broker at (repeatable; `shoal-broker`,
        /// `localhost` and the loopback addresses are always included; never `shoal-hub`:
        /// a broker's key must not pass as the hub over HTTPS).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a one-time join token and print it (works while the hub runs).
    ///
    /// Give it to one device: `shoal-agent run --join-token TOKEN …`. It pins the fleet CA
    /// and can be used once, before it expires. With `--store etcd://…` the token goes to
    /// etcd and enrolls through any hub replica.
    Create {
        /// The hub's data directory (needed unless --store is etcd).
        #[arg(long, env = "SHOAL_HUB_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The hub's store, as given to `serve` (`sled`, or `etcd://HOST:PORT[,…][/PREFIX]`).
        #[arg(long, env = "SHOAL_HUB_STORE", value_name = "URL")]
        store: Option<shoal_hub::backend::StoreChoice>,
        /// How long the token stays valid (e.g. 30m, 24h).
        #[arg(long, default_value = "24h", value_parser = shoal_api::model::quantity::duration_arg)]
        ttl: std::time::Duration,
        /// Bind the token to this device id: it enrolls that device only, and may enroll it
        /// again (a wiped or replaced board), which an unbound token may not.
        #[arg(long, value_name = "ID")]
        device: Option<shoal_api::model::ids::DeviceId>,
        /// Labels the enrolled device gets (`k=v,k=v`; placement selects on them). A
        /// device's own `--labels` steer nothing: labels are the operator's word, given here
        /// or later with `shoal label device ID k=v`.
        #[arg(long, value_name = "K=V,…", value_parser = token_labels, default_value = "")]
        labels: shoal_api::model::labels::Labels,
        /// Allow a plaintext `etcd://` store (for local experiments only).
        #[arg(long)]
        insecure: bool,
    },
}

/// Why a token's `--labels` are refused.
#[derive(Debug, thiserror::Error)]
enum BadTokenLabels {
    #[error(transparent)]
    Syntax(#[from] shoal_api::model::ids::IdError),
    #[error(transparent)]
    Grant(#[from] shoal_api::model::labels::LabelError),
}

fn token_labels(s: &str) -> Result<shoal_api::model::labels::Labels, BadTokenLabels> {
    let l = shoal_api::model::ids::parse_label_list(s)?;
    shoal_api::model::labels::check_grant(&l)?;
    Ok(l)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    // Parsed by hand, not `Cli::parse()`: the settings' merge asks where each value came
    // from (flag, environment or default), to put the config file in between.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    shoal_daemon::init_tracing("info,rumqttd=warn,rustls=error", &cli.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(_) => rt.block_on(async {
            let shutdown = shoal_daemon::shutdown_on_signal();
            let serve = matches
                .subcommand_matches("serve")
                .context("no settings for serve")?;
            let config = shoal_hub::config::resolve(serve)?;
            shoal_hub::run(config, shutdown).await.context("hub failed")
        }),
        Command::Cert(CertCommand::Broker {
            data_dir,
            out,
            names,
        }) => {
            let pki = shoal_hub::security::pki_dir(&data_dir);
            let ca = shoal_pki::ca::FleetCa::load_or_create(&pki)
                .with_context(|| format!("cannot load the fleet CA of {}", data_dir.display()))?;
            ca.write_operator_bundle(&shoal_hub::security::operator_dir(&data_dir))?;
            let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
            all.extend(names);
            // Its own name, never the hub's: a broker carries MQTT, and its key must not pass
            // as the hub over HTTPS (enrollment, module downloads).
            let (cert, key) = ca.issue(
                shoal_pki::ca::BROKER_NAME,
                &shoal_pki::ca::Usage::Broker { names: all },
            )?;
            // The key is owner-only from its creation (mosquitto reads it after dropping
            // root: chown it to the broker's user).
            for (file, text, mode) in [
                ("ca.pem", ca.pem(), 0o644),
                ("broker.pem", cert.as_str(), 0o644),
                ("broker.key", key.as_str(), 0o600),
            ] {
                shoal_pki::write_atomic(&out.join(file), text.as_bytes(), mode)?;
            }
            println!("{}", out.display());
            return Ok(());
        }
        Command::Operator(op) => return operator_command(*op),
        Command::Device(d) => {
            let DeviceCommand::Revoke { id, book } = *d;
            let (book, _) = open_book(&book)?;
            let now = shoal_daemon::clock::now_ms();
            if shoal_hub::access::revoke_device(book.as_ref(), &id, now)? {
                println!("device/{id} revoked");
            } else {
                println!("device/{id} was already revoked");
            }
            return Ok(());
        }
        Command::Token(token) => {
            let TokenCommand::Create {
                data_dir,
                store,
                ttl,
                device,
                labels,
                insecure,
            } = *token;
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let now = shoal_daemon::clock::now_ms();
            let token = match (store, data_dir) {
                (Some(shoal_hub::backend::StoreChoice::Etcd(url)), _) => {
                    if url.plaintext() && !insecure {
                        anyhow::bail!("{}", shoal_hub::etcd::PLAINTEXT_REFUSED);
                    }
                    let etcd = shoal_hub::etcd::EtcdStore::connect(&url)?;
                    let (pem, key) = etcd.fleet_ca()?.with_context(|| {
                        format!("{url} holds no fleet CA: start a hub on it first")
                    })?;
                    let hash = shoal_pki::ca::hash_of_pem(&pem, &key)?;
                    shoal_hub::enrollment::issue(&etcd, &hash, now, ttl_ms, device.as_ref(), labels)
                }
                (_, Some(data_dir)) => {
                    let pki = shoal_hub::security::pki_dir(&data_dir);
                    let ca = shoal_pki::ca::FleetCa::load_or_create(&pki).with_context(|| {
                        format!("cannot load the fleet CA of {}", data_dir.display())
                    })?;
                    if !data_dir.join("hub.db").exists() {
                        eprintln!(
                            "warning: {} holds no sled store (hub.db): a hub keeping its state in etcd reads tokens from there; use --store etcd://…",
                            data_dir.display()
                        );
                    }
                    let files = shoal_hub::enrollment::Files::new(&pki);
                    shoal_hub::enrollment::issue(&files, &ca.hash(), now, ttl_ms, device.as_ref(), labels)
                }
                (_, None) => anyhow::bail!(
                    "token create needs --data-dir (or SHOAL_HUB_DATA_DIR), or --store etcd://…"
                ),
            }
            .context("cannot issue a join token")?;
            println!("{token}");
            return Ok(());
        }
    }?;
    // rumqttd's threads have no shutdown API; leave without waiting for them.
    std::process::exit(0)
}

/// The enrollment book `args` name, and the hub's data directory if given.
fn open_book(
    args: &BookArgs,
) -> anyhow::Result<(Box<dyn shoal_hub::enrollment::Enrollments>, Option<PathBuf>)> {
    match (&args.store, &args.data_dir) {
        (Some(shoal_hub::backend::StoreChoice::Etcd(url)), dir) => {
            if url.plaintext() && !args.insecure {
                anyhow::bail!("{}", shoal_hub::etcd::PLAINTEXT_REFUSED);
            }
            Ok((
                Box::new(shoal_hub::etcd::EtcdStore::connect(url)?),
                dir.clone(),
            ))
        }
        (_, Some(dir)) => {
            let pki = shoal_hub::security::pki_dir(dir);
            Ok((
                Box::new(shoal_hub::enrollment::Files::new(&pki)),
                Some(dir.clone()),
            ))
        }
        (_, None) => {
            anyhow::bail!("this needs --data-dir (or SHOAL_HUB_DATA_DIR), or --store etcds://…")
        }
    }
}

fn operator_command(cmd: OperatorCommand) -> anyhow::Result<()> {
    use shoal_api::policy::operator::OperatorRecord;
    let now = shoal_daemon::clock::now_ms();
    // Issues `name` a certificate into `out`: (its fingerprint, when it expires).
    let issue = |data_dir: Option<PathBuf>,
                 name: &shoal_api::model::ids::OperatorName,
                 out: &std::path::Path,
                 ttl: std::time::Duration|
     -> anyhow::Result<(String, u64)> {
        let dir =
            data_dir.context("issuing a certificate needs the hub's --data-dir (its fleet CA)")?;
        let ca = shoal_pki::ca::FleetCa::load(&shoal_hub::security::pki_dir(&dir))?;
        let cn = shoal_api::policy::operator::common_name(name);
        let (cert, key) = ca.issue_for(&cn, &shoal_pki::ca::Usage::Client, ttl)?;
        // Owner-only when created here; an existing directory keeps its mode (the key file
        // is owner-only whatever the directory).
        if !out.exists() {
            shoal_pki::private_dir(out)?;
        }
        // The key first: a bundle is never a certificate without its key.
        shoal_pki::write_atomic(&out.join("operator.key"), key.as_bytes(), 0o600)?;
        shoal_pki::write_atomic(&out.join("operator.pem"), cert.as_bytes(), 0o644)?;
        shoal_pki::write_atomic(&out.join("ca.pem"), ca.pem().as_bytes(), 0o644)?;
        Ok(shoal_pki::tls::pin_of_pem(&cert)?)
    };
    match cmd {
        OperatorCommand::Create {
            name,
            role,
            out,
            ttl,
            book,
        } => {
            if name.as_str() == shoal_api::policy::operator::BOOTSTRAP {
                anyhow::bail!(
                    "operator name {:?} is the hub's own bootstrap bundle: pick another",
                    name.as_str()
                );
            }
            let (b, dir) = open_book(&book)?;
            if let Some(r) = shoal_hub::access::operator(b.as_ref(), &name)? {
                if r.revoked_ms.is_none() {
                    anyhow::bail!(
                        "operator {:?} exists (role {}): renew it, or revoke it first",
                        name.as_str(),
                        r.role
                    );
                }
            }
            let (fingerprint, expires_ms) = issue(dir, &name, &out, ttl)?;
            let record = OperatorRecord {
                name: name.clone(),
                role,
                certificates: vec![fingerprint],
                created_ms: now,
                expires_ms,
                revoked_ms: None,
                retired: Vec::new(),
            };
            shoal_hub::access::put_operator(b.as_ref(), &record)?;
            println!(
                "operator/{name} created ({role}): bundle in {}",
                out.display()
            );
        }
        OperatorCommand::Renew {
            name,
            out,
            ttl,
            book,
        } => {
            if name.as_str() == shoal_api::policy::operator::BOOTSTRAP {
                anyhow::bail!(
                    "operator {:?} is the hub's own bundle: the hub renews it at start",
                    name.as_str()
                );
            }
            let (b, dir) = open_book(&book)?;
            let known =
                |b: &dyn shoal_hub::enrollment::Enrollments| -> anyhow::Result<OperatorRecord> {
                    let r = shoal_hub::access::operator(b, &name)?
                        .with_context(|| format!("operator {:?} is unknown", name.as_str()))?;
                    if r.revoked_ms.is_some() {
                        anyhow::bail!("operator {:?} was revoked: create it anew", name.as_str());
                    }
                    Ok(r)
                };
            known(b.as_ref())?;
            let (fingerprint, expires_ms) = issue(dir, &name, &out, ttl)?;
            // Read again: a revocation made while the certificate was issued stands.
            let record = known(b.as_ref())?;
            let role = record.role;
            shoal_hub::access::put_operator(b.as_ref(), &record.renewed(fingerprint, expires_ms))?;
            println!(
                "operator/{name} renewed ({role}): bundle in {}",
                out.display()
            );
        }
        OperatorCommand::Revoke { name, book } => {
            let (b, _) = open_book(&book)?;
            let mut record = shoal_hub::access::operator(b.as_ref(), &name)?
                .with_context(|| format!("operator {:?} is unknown", name.as_str()))?;
            if record.revoked_ms.is_some() {
                println!("operator/{name} was already revoked");
                return Ok(());
            }
            record.revoked_ms = Some(now);
            shoal_hub::access::put_operator(b.as_ref(), &record)?;
            println!("operator/{name} revoked");
            if name.as_str() == shoal_api::policy::operator::BOOTSTRAP {
                println!("restart the hub (each replica) to rotate its DATA_DIR/operator bundle");
            }
        }
        OperatorCommand::List { book } => {
            let (b, _) = open_book(&book)?;
            let mut t =
                shoal_api::present::table::Table::new(&["NAME", "ROLE", "EXPIRES", "REVOKED"]);
            for r in shoal_hub::access::operators(b.as_ref())? {
                let day = |ms: u64| {
                    time::OffsetDateTime::from_unix_timestamp(i64::try_from(ms / 1000).unwrap_or(0))
                        .map(|t| t.date().to_string())
                        .unwrap_or_default()
                };
                t.row(vec![
                    r.name.to_string(),
                    r.role.to_string(),
                    day(r.expires_ms),
                    r.revoked_ms.map(day).unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{t}");
        }
    }
    Ok(())
}

//! The agent's settings: each declared once in [`Settings`] (its flag, environment variable
//! and help in the `#[arg]` attribute, its config-file key from the field's name in kebab
//! case, its default, if it has a value, in `default_value`, which the help shows), and
//! merged once ([`resolve`]): flags > environment > file > default. Clap reads flags,
//! environment and defaults; the file comes between the last two because [`resolve`] asks
//! clap where each value came from. The result is [`AgentConfig`], what `app::run` takes.

use clap::{ArgMatches, FromArgMatches};
use serde::{Deserialize, Deserializer};
use shoal_api::model::ids::{DeviceClass, DeviceId};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_daemon::config::{parsed, parsed_with, ConfigFileError};
use shoal_daemon::mdns::{MdnsArgs, MdnsFile, MdnsOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Agent settings, merged ([`resolve`]).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub device_id: DeviceId,
    pub labels: BTreeMap<String, String>,
    /// The broker; `None`: find the hub of `fleet` over mDNS.
    pub broker: Option<BrokerUrl>,
    /// Memory offered to workloads; default: the machine's total memory.
    pub memory: Option<u64>,
    /// Most replicas this device takes; `None`: no limit.
    pub max_replicas: Option<u32>,
    /// What containers may ask for here beyond the confined defaults (see
    /// `shoal_api::policy::fleet`); the fleet's policy must allow it too.
    pub allow: std::collections::BTreeSet<shoal_api::policy::fleet::Privilege>,
    /// The fleet this device belongs to; hubs of other fleets are ignored.
    pub fleet: String,
    /// mDNS interfaces; `None`: mDNS off (then `broker` is required).
    pub mdns: Option<MdnsOptions>,
    /// The local API's Unix socket; `None`: no local API.
    pub socket: Option<LocalSocket>,
    /// Where Prometheus scrapes `/metrics` over TCP; `None`: only on the local socket.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach the OCI registries `oci://` modules and images come from.
    pub registries: shoal_registry::RegistryConfig,
    /// containerd to run container workloads with; `None`: no container runtime.
    pub containerd: Option<ContainerdOptions>,
    /// Whether the device offers the WASM runtime (`--no-wasm` turns it off).
    pub wasm: bool,
    /// How long a workload's volumes outlive its leaving this device.
    pub volume_retention: Duration,
    /// Plain MQTT and HTTP, no device certificate, desired state not verified (local
    /// development with a hub run `--insecure`).
    pub insecure: bool,
    /// A join token for enrolling (used only while the device has no certificate).
    pub join_token: Option<shoal_pki::token::JoinToken>,
    /// The hub's HTTP API for enrollment, e.g. `https://hub.local:8080`.
    pub hub_url: Option<String>,
    /// Hardware offered to workloads, per class: the nodes listed and the globs to look
    /// for more with (see [`crate::hardware`]).
    pub devices: BTreeMap<DeviceClass, DevicesFile>,
}

/// Where containerd listens, and the namespace the agent keeps its containers in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdOptions {
    pub socket: PathBuf,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSocket {
    pub path: PathBuf,
    /// Given by the user: failing to serve it is an error. The default path is only tried
    /// (it needs root), with a warning if it cannot be used.
    pub explicit: bool,
}

/// Why the settings do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or parsed (the message names the file and the key).
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("config file {file:?}: {key}: {reason}")]
    Bad {
        file: String,
        key: String,
        reason: String,
    },
    #[error("no device id: give --device-id, SHOAL_AGENT_DEVICE_ID or device-id in a config file")]
    NoDeviceId,
    #[error(
        "no data directory: give --data-dir, SHOAL_AGENT_DATA_DIR or data-dir in a config file"
    )]
    NoDataDir,
    #[error("broker {0} is plain MQTT: use mqtts://{host}:{port} (the hub's TLS port), or --insecure with a hub run --insecure", host = .0.host, port = .0.port)]
    PlainBroker(BrokerUrl),
    #[error("hub URL {0:?} is invalid: expected https://HOST:PORT")]
    HubUrl(String),
    #[error("{0}")]
    Fleet(String),
    #[error("no broker and mDNS is off: give --broker (or SHOAL_BROKER, or broker in a config file), or drop --no-mdns to find the hub")]
    NoBroker,
    #[error("cannot read the join token file {path}: {source}")]
    JoinTokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    JoinToken(#[from] shoal_pki::token::TokenError),
}

/// `shoal-agent run`'s settings, each declared once: flag, environment variable and help in
/// `#[arg]`, config-file key (the field's name in kebab case; `#[serde(skip)]`: no key,
/// `#[arg(skip)]`: a key only), default in `default_value`. Every value is optional here:
/// [`resolve`] merges and checks.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Settings {
    /// TOML config file (keys as in examples/agent.toml).
    #[arg(long, env = "SHOAL_AGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory for the agent database, module cache and workload logs.
    #[arg(long, env = "SHOAL_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This device's id (lowercase letters, digits and '-').
    #[arg(long, env = "SHOAL_AGENT_DEVICE_ID")]
    #[serde(deserialize_with = "parsed")]
    pub device_id: Option<DeviceId>,
    /// Labels this device asks for, k=v,k2=v2: shown to operators, but placement selects
    /// only on the labels they grant (join token `--labels`, `shoal label device`).
    #[arg(long, env = "SHOAL_AGENT_LABELS", value_parser = shoal_api::model::ids::parse_label_list)]
    #[serde(deserialize_with = "labels")]
    pub labels: Option<BTreeMap<String, String>>,
    /// MQTT broker, mqtt://HOST:PORT [default: find the fleet's hub over mDNS].
    #[arg(long, env = "SHOAL_BROKER")]
    #[serde(deserialize_with = "parsed")]
    pub broker: Option<BrokerUrl>,
    /// The fleet this device joins; hubs of other fleets are ignored.
    #[arg(long, env = "SHOAL_FLEET", default_value = shoal_api::wire::discovery::DEFAULT_FLEET)]
    pub fleet: Option<String>,
    /// Unix socket of the local API (`shoal-agent ps`, …).
    #[arg(long, env = "SHOAL_AGENT_SOCKET", default_value = crate::local::DEFAULT_SOCKET)]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus `/metrics` over plain HTTP at this address (e.g. 127.0.0.1:9465)
    /// [default: only on the local socket].
    #[arg(long, env = "SHOAL_AGENT_METRICS_LISTEN")]
    #[serde(deserialize_with = "parsed")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    #[serde(skip)]
    pub mdns_flags: MdnsArgs,
    /// The `[mdns]` table (its flags are `mdns_flags`).
    #[arg(skip)]
    pub mdns: MdnsFile,
    /// Memory offered to workloads (e.g. 512Mi) [default: all of the machine's memory].
    #[arg(long, env = "SHOAL_AGENT_MEMORY", value_parser = shoal_api::model::quantity::parse_memory)]
    #[serde(deserialize_with = "memory")]
    pub memory: Option<u64>,
    /// Most replicas this device takes [default: no limit].
    #[arg(long, env = "SHOAL_AGENT_MAX_REPLICAS")]
    pub max_replicas: Option<u32>,
    /// What containers may ask for on this device beyond the confined defaults,
    /// comma-separated: privileged, host-devices. Each is root on the device: the fleet's
    /// policy must allow it too [default: none].
    #[arg(
        long,
        env = "SHOAL_AGENT_ALLOW",
        value_delimiter = ',',
        value_name = "PRIVILEGE"
    )]
    pub allow: Option<Vec<shoal_api::policy::fleet::Privilege>>,
    /// A registry (`HOST:PORT`) that may be reached over plain HTTP; loopback ones always
    /// may. Repeat for several; adds to `[registries]` in the config file.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    #[serde(skip)]
    pub insecure_registries: Vec<String>,
    /// The `[registries."HOST:PORT"]` tables.
    #[arg(skip)]
    pub registries: BTreeMap<String, RegistryFile>,
    #[command(flatten)]
    pub containerd: ContainerdSettings,
    /// Hardware this device offers to workloads, CLASS=PATH (e.g. serial=/dev/ttyUSB0);
    /// repeat for several. Adds to the `[devices.CLASS]` tables of the config file.
    #[arg(long = "device", value_name = "CLASS=PATH", value_parser = device_arg)]
    #[serde(skip)]
    pub device_flags: Vec<(DeviceClass, PathBuf)>,
    /// The `[devices.CLASS]` tables: `paths` and `glob`.
    #[arg(skip)]
    pub devices: BTreeMap<DeviceClass, DevicesFile>,
    /// Do not offer the WASM runtime (workloads with a container variant run that here).
    #[arg(long, env = "SHOAL_AGENT_NO_WASM")]
    #[serde(skip)]
    pub no_wasm: bool,
    /// How long a workload's volumes are kept after it left this device, in case it comes
    /// back (e.g. 0s, 30m, 24h).
    #[arg(long, env = "SHOAL_AGENT_VOLUME_RETENTION", value_parser = shoal_api::model::quantity::duration_arg, default_value = "24h")]
    #[serde(deserialize_with = "duration")]
    pub volume_retention: Option<Duration>,
    /// A one-time join token from `shoal-hub token create`, to enroll this device (only
    /// needed until it holds a certificate, in DATA_DIR/pki). Prefer the environment
    /// variable or --join-token-file: a command line is visible to every local user.
    #[arg(long, env = "SHOAL_AGENT_JOIN_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub join_token: Option<String>,
    /// A file holding the join token (e.g. written by provisioning, then removed).
    #[arg(
        long,
        env = "SHOAL_AGENT_JOIN_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "join_token"
    )]
    #[serde(skip)]
    pub join_token_file: Option<PathBuf>,
    /// The hub's HTTP API, https://HOST:PORT (for enrollment and module downloads)
    /// [default: found over mDNS].
    #[arg(long, env = "SHOAL_HUB")]
    pub hub: Option<String>,
    /// Plain MQTT and HTTP, no device certificate, desired state not verified: only with a
    /// hub run --insecure, for local development.
    #[arg(long, env = "SHOAL_AGENT_INSECURE")]
    pub insecure: bool,
}

/// The container runtime's settings (the `[containerd]` table).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ContainerdSettings {
    /// containerd's socket; the device offers the `container` runtime only if it answers.
    #[arg(
        id = "containerd_socket",
        long = "containerd-socket",
        value_name = "PATH",
        env = "SHOAL_AGENT_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub socket: Option<PathBuf>,
    /// containerd namespace for this agent's containers.
    #[arg(
        id = "containerd_namespace",
        long = "containerd-namespace",
        value_name = "NAMESPACE",
        env = "SHOAL_AGENT_CONTAINERD_NAMESPACE",
        default_value = "shoal"
    )]
    pub namespace: Option<String>,
    /// Do not look for containerd: run WASM workloads only.
    #[arg(long = "no-containerd", env = "SHOAL_AGENT_NO_CONTAINERD")]
    #[serde(skip)]
    pub no_containerd: bool,
    /// `false` turns the container runtime off (the file's `--no-containerd`).
    #[arg(skip)]
    pub enabled: Option<bool>,
}

/// One `[devices.CLASS]` table of the config file: device nodes offered to workloads that
/// ask for `resources.devices: { CLASS: N }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DevicesFile {
    /// Device nodes, e.g. `["/dev/ttyUSB0", "/dev/serial/by-id/usb-FTDI-if00"]`.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Patterns looked up at start, e.g. `"/dev/ttyACM*"` (matches in name order).
    #[serde(default)]
    pub glob: Vec<String>,
}

/// `--device CLASS=PATH`.
fn device_arg(s: &str) -> Result<(DeviceClass, PathBuf), String> {
    let (class, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not CLASS=PATH (e.g. serial=/dev/ttyUSB0)"))?;
    let class = DeviceClass::try_from(class).map_err(|e| e.to_string())?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!("{:?} is not an absolute path", path.display()));
    }
    Ok((class, path))
}

/// One `[registries."HOST:PORT"]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegistryFile {
    /// Plain HTTP allowed (loopback registries always are).
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The agent's configuration from `run`'s parsed command line `m` (flags, environment and
/// defaults, as clap took them) and the config file it names: flags > environment > file >
/// default.
pub fn resolve(m: &ArgMatches) -> Result<AgentConfig, ConfigError> {
    let cli = Settings::from_arg_matches(m).map_err(ConfigFileError::from)?;
    let file: Settings = shoal_daemon::config::read(cli.config.as_deref())?;
    macro_rules! merged {
        ($($field:ident).+, $id:literal) => {
            shoal_daemon::merged!(m, cli, file, $($field).+; $id)
        };
    }
    let name = cli
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let bad = |key: &str, reason: String| ConfigError::Bad {
        file: name.clone(),
        key: key.to_string(),
        reason,
    };

    let device_id = merged!(device_id, "device_id").ok_or(ConfigError::NoDeviceId)?;
    let insecure = cli.insecure || file.insecure;
    let broker = merged!(broker, "broker");
    if let Some(b) = broker.as_ref().filter(|b| !b.tls && !insecure) {
        return Err(ConfigError::PlainBroker(b.clone()));
    }
    let hub_url = merged!(hub, "hub");
    if let Some(h) = &hub_url {
        let plain = h.starts_with("http://");
        if !(h.starts_with("https://") || plain) || (plain && !insecure) {
            return Err(ConfigError::HubUrl(h.clone()));
        }
    }
    let fleet = shoal_api::wire::discovery::fleet_or_default(merged!(fleet, "fleet"))
        .map_err(ConfigError::Fleet)?;
    let mdns = cli.mdns_flags.options(&file.mdns);
    if broker.is_none() && mdns.is_none() {
        return Err(ConfigError::NoBroker);
    }
    let data_dir = merged!(data_dir, "data_dir").ok_or(ConfigError::NoDataDir)?;
    let mut registries = shoal_registry::RegistryConfig {
        insecure: cli.insecure_registries.clone(),
        ..Default::default()
    };
    for (host, r) in file.registries.clone() {
        if r.insecure {
            registries.insecure.push(host.clone());
        }
        match (r.username, r.password) {
            (Some(username), Some(password)) => {
                registries
                    .credentials
                    .insert(host, shoal_registry::Credentials { username, password });
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    &format!("registries.{host:?}"),
                    "give both username and password, or neither".into(),
                ))
            }
        }
    }
    let containerd_on = !cli.containerd.no_containerd && file.containerd.enabled.unwrap_or(true);
    let containerd = match (
        containerd_on,
        merged!(containerd.socket, "containerd_socket"),
        merged!(containerd.namespace, "containerd_namespace"),
    ) {
        (true, Some(socket), Some(namespace)) => Some(ContainerdOptions { socket, namespace }),
        _ => None,
    };
    // Only a socket the user named must be served; the default one is tried.
    let explicit = shoal_daemon::config::given(m, "socket") || file.socket.is_some();
    let socket = merged!(socket, "socket").map(|path| LocalSocket { path, explicit });
    let mut devices = file.devices.clone();
    for (class, path) in &cli.device_flags {
        devices
            .entry(class.clone())
            .or_default()
            .paths
            .push(path.clone());
    }
    for (class, d) in &devices {
        let relative = d.paths.iter().map(|p| p.display().to_string());
        let relative = relative
            .chain(d.glob.iter().cloned())
            .find(|p| !p.starts_with('/'));
        if let Some(p) = relative {
            return Err(bad(
                &format!("devices.{class}"),
                format!("{p:?} is not an absolute path"),
            ));
        }
    }
    Ok(AgentConfig {
        devices,
        metrics_listen: merged!(metrics_listen, "metrics_listen"),
        insecure,
        // Parsed here, not by clap, whose error would echo the secret.
        join_token: join_token(cli.join_token.as_deref(), cli.join_token_file.as_deref())?,
        hub_url,
        registries,
        containerd,
        wasm: !cli.no_wasm,
        volume_retention: merged!(volume_retention, "volume_retention")
            .unwrap_or(DEFAULT_VOLUME_RETENTION),
        data_dir,
        device_id,
        labels: merged!(labels, "labels").unwrap_or_default(),
        broker,
        memory: merged!(memory, "memory"),
        max_replicas: merged!(max_replicas, "max_replicas"),
        allow: merged!(allow, "allow")
            .unwrap_or_default()
            .into_iter()
            .collect(),
        fleet,
        mdns,
        socket,
    })
}

/// `--volume-retention`'s default (a device offline overnight keeps its data), should clap
/// not have set it.
const DEFAULT_VOLUME_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The join token from `--join-token` or the file `--join-token-file` names.
fn join_token(
    token: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<shoal_pki::token::JoinToken>, ConfigError> {
    let text = match (token, file) {
        (Some(t), _) => t.to_string(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|source| ConfigError::JoinTokenFile {
                path: f.display().to_string(),
                source,
            })?
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(text.parse()?))
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    parsed_with(d, shoal_api::model::quantity::parse_memory)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    parsed_with(d, shoal_api::model::quantity::duration_arg)
}

/// A table of labels, each key and value checked.
fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    let l = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &l {
        shoal_api::model::ids::check_label_key(k).map_err(serde::de::Error::custom)?;
        shoal_api::model::ids::check_label_value(v).map_err(serde::de::Error::custom)?;
    }
    Ok(Some(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    /// `run`'s settings from `args` (no environment: the variables' names are unlikely set).
    fn resolved(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let cmd = Settings::augment_args(Command::new("run").no_binary_name(true));
        let m = cmd.try_get_matches_from(args).unwrap();
        resolve(&m)
    }

    #[test]
    fn example_config_parses() {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let c = resolved(&["--config", example.to_str().unwrap()]).unwrap();
        assert_eq!((c.fleet.as_str(), c.broker), ("greenhouse", None));
        assert_eq!(c.mdns, Some(shoal_daemon::mdns::MdnsOptions::default()));
        assert_eq!(c.registries.insecure, ["lab-registry.lan:5000"]);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9465".parse().unwrap()));
        assert_eq!(c.memory, Some(512 << 20));
        assert_eq!(
            c.registries.credentials["registry.example.com"].username,
            "greenhouse"
        );
        assert_eq!(
            c.containerd,
            Some(ContainerdOptions {
                socket: "/run/containerd/containerd.sock".into(),
                namespace: "shoal".into()
            })
        );
        assert_eq!(c.volume_retention, Duration::from_secs(24 * 3600));
        let e = resolved(&["--device-id", "d", "--data-dir", "/d", "--no-mdns"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no broker and mDNS is off"), "{e}");
    }

    #[test]
    fn device_tables_and_flags_add_up_and_paths_must_be_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"d\"\nbroker = \"mqtts://h:8883\"\n[devices.serial]\npaths = [\"/dev/ttyUSB0\"]\nglob = [\"/dev/ttyACM*\"]\n",
        )
        .unwrap();
        let c = resolved(&[
            "--config",
            file.to_str().unwrap(),
            "--device",
            "serial=/dev/ttyUSB1",
            "--device",
            "camera=/dev/video0",
        ])
        .unwrap();
        let serial = &c.devices[&DeviceClass::try_from("serial").unwrap()];
        assert_eq!(
            serial.paths,
            [PathBuf::from("/dev/ttyUSB0"), "/dev/ttyUSB1".into()]
        );
        assert_eq!(serial.glob, ["/dev/ttyACM*"]);
        assert_eq!(c.devices.len(), 2);
        assert_eq!(
            device_arg("serial=ttyUSB1").unwrap_err(),
            "\"ttyUSB1\" is not an absolute path"
        );
        assert!(device_arg("Serial=/dev/x")
            .unwrap_err()
            .contains("\"Serial\""));
        assert!(device_arg("/dev/x").unwrap_err().contains("CLASS=PATH"));
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"d\"\nbroker = \"mqtts://h:8883\"\n[devices.serial]\nglob = [\"ttyACM*\"]\n",
        )
        .unwrap();
        let e = resolved(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("devices.serial") && e.contains("\"ttyACM*\" is not an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn registry_tables_need_both_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"d\"\n[registries.\"r.lan:5000\"]\nusername = \"u\"\n",
        )
        .unwrap();
        let e = resolved(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registries.\"r.lan:5000\""), "{e}");
        assert!(e.contains("both username and password"), "{e}");
    }

    #[test]
    fn precedence_defaults_file_then_env_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-id = \"from-file\"\nlabels = { zone = \"a\" }\nmemory = \"64Mi\"\nvolume-retention = \"1h\"\n[containerd]\nnamespace = \"ns\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = resolved(&["--config", path]).unwrap();
        assert_eq!(c.device_id.as_str(), "from-file");
        assert_eq!(c.memory, Some(64 << 20));
        assert_eq!(c.broker, None, "default: discover over mDNS");
        assert_eq!(c.fleet, "default");
        assert_eq!(c.volume_retention, Duration::from_secs(3600));
        assert_eq!(c.containerd.map(|c| c.namespace), Some("ns".into()));
        assert_eq!(
            c.socket,
            Some(LocalSocket {
                path: "/run/shoal/agent.sock".into(),
                explicit: false
            })
        );
        assert!(c.mdns.is_some());
        let c = resolved(&[
            "--config",
            path,
            "--device-id",
            "from-flag",
            "--memory",
            "1",
            "--volume-retention",
            "0s",
            "--containerd-namespace",
            "flag",
            "--socket",
            "/s",
        ])
        .unwrap();
        assert_eq!(c.device_id.as_str(), "from-flag");
        assert_eq!(c.memory, Some(1));
        assert_eq!(c.volume_retention, Duration::ZERO);
        assert_eq!(c.containerd.map(|c| c.namespace), Some("flag".into()));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(
            c.socket,
            Some(LocalSocket {
                path: "/s".into(),
                explicit: true
            })
        );
        let c = resolved(&["--config", path, "--no-containerd"]).unwrap();
        assert_eq!(c.containerd, None);

        std::fs::write(&file, "device-id = \"Bad_Id\"\ndata-dir = \"/d\"\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("device-id") && e.contains("\"Bad_Id\""), "{e}");
        std::fs::write(&file, "data-dir = \"/d\"\nmemory = \"lots\"\n").unwrap();
        let e = resolved(&["--config", path, "--device-id", "d"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory") && e.contains("\"lots\""), "{e}");
        std::fs::write(&file, "data-dir = \"/d\"\nsurprise = 1\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("surprise"), "unknown keys are errors: {e}");
        let e = resolved(&[]).unwrap_err().to_string();
        assert!(e.contains("no device id"), "{e}");
    }
}

//! The hub's settings: each declared once in [`Settings`] (its flag, environment variable
//! and help in the `#[arg]` attribute, its config-file key from the field's name in kebab
//! case, its default, if it is a constant, in `default_value`, which the help shows), and
//! merged once ([`resolve`]): flags > environment > file > default. Clap reads flags,
//! environment and defaults; the file comes between the last two because [`resolve`] asks
//! clap where each value came from. The result is [`HubConfig`], what `app::run` takes.

use crate::backend::StoreChoice;
use clap::{ArgMatches, FromArgMatches};
use serde::{Deserialize, Deserializer};
use shoal_api::wire::endpoint::BrokerUrl;
use shoal_daemon::config::{parsed, parsed_with, ConfigFileError};
use shoal_daemon::mdns::{MdnsArgs, MdnsFile, MdnsOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Hub settings, merged ([`resolve`]; see `shoal-hub serve --help`).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    /// Where the embedded broker listens (ignored with `broker`).
    pub mqtt_listen: SocketAddr,
    /// External broker; `None` runs the embedded one.
    pub broker: Option<BrokerUrl>,
    pub http_listen: SocketAddr,
    /// URL agents use to fetch blobs; default `http://{http_listen}` (empty when that is a
    /// wildcard address: agents then use the address they reached the hub at).
    pub public_url: Option<String>,
    /// The fleet this hub serves (agents of other fleets ignore it).
    pub fleet: String,
    /// This hub's name on the LAN (its mDNS instance is `{fleet}-{name}`).
    pub name: String,
    /// mDNS interfaces; `None`: mDNS off.
    pub mdns: Option<MdnsOptions>,
    /// How long a device may be offline or silent before it is lost and its replicas move.
    pub device_grace: Duration,
    /// Plain MQTT and HTTP, no client certificates, no ACL (local development only).
    pub insecure: bool,
    /// Extra names (DNS names or IP addresses) for the hub's server certificate, besides
    /// `shoal-hub`, `localhost`, the loopback addresses, the host name and the listen addresses.
    pub tls_names: Vec<String>,
    /// How long a device certificate is valid (agents renew after two thirds of it).
    pub device_cert_lifetime: Duration,
    /// Where the hub's state lives: sled in `data_dir` (default), or etcd.
    pub store: StoreChoice,
    /// With etcd: the TTL of the lease leadership is held with (a dead leader is replaced
    /// about this long after it died; see [`crate::ha`]).
    pub leader_lease: Duration,
}

/// Why the settings do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line or the file cannot be read or parsed (the message names the file
    /// and the key).
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error("no data directory: give --data-dir, SHOAL_HUB_DATA_DIR or data-dir in a config file")]
    NoDataDir,
    #[error("{0}")]
    Fleet(String),
    #[error("device certificate lifetime {0:?} is too short: at least {min:?}", min = MIN_DEVICE_CERT_LIFETIME)]
    DeviceCertLifetime(Duration),
    #[error("leader lease {0:?} is too short: etcd grants at least {min:?}", min = crate::ha::MIN_LEASE)]
    LeaderLease(Duration),
}

/// The shortest device certificate lifetime `--device-cert-lifetime` accepts.
const MIN_DEVICE_CERT_LIFETIME: Duration = Duration::from_secs(10);

/// `shoal-hub serve`'s settings, each declared once: flag, environment variable and help in
/// `#[arg]`, config-file key (the field's name in kebab case; `#[serde(skip)]`: no key,
/// `#[arg(skip)]`: a key only), default in `default_value` when it is a constant (the
/// others are computed by [`resolve`] and named in the help). Every value is optional
/// here: [`resolve`] merges and checks.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Settings {
    /// TOML config file (keys as in examples/hub.toml).
    #[arg(long, env = "SHOAL_HUB_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory for the hub database and blobs.
    #[arg(long, env = "SHOAL_HUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the embedded MQTT broker (MQTT 3.1.1 and 5 on one port) [default:
    /// 127.0.0.1:8883, or 127.0.0.1:1883 with --insecure].
    #[arg(long, env = "SHOAL_HUB_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Use this external broker (mqtts://HOST:PORT) instead of the embedded one.
    #[arg(long, env = "SHOAL_HUB_BROKER")]
    #[serde(deserialize_with = "parsed")]
    pub broker: Option<BrokerUrl>,
    /// Address of the HTTP API.
    #[arg(long, env = "SHOAL_HUB_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: Option<SocketAddr>,
    /// URL agents fetch blobs from [default: http://<http-listen>; with a wildcard
    /// --http-listen, the hub address each agent knows].
    #[arg(long, env = "SHOAL_HUB_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The fleet this hub serves; agents configured for another fleet ignore it.
    #[arg(long, env = "SHOAL_FLEET", default_value = shoal_api::wire::discovery::DEFAULT_FLEET)]
    pub fleet: Option<String>,
    /// This hub's name on the LAN [default: the host name].
    #[arg(long, env = "SHOAL_HUB_NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    #[serde(skip)]
    pub mdns_flags: MdnsArgs,
    /// The `[mdns]` table (its flags are `mdns_flags`).
    #[arg(skip)]
    pub mdns: MdnsFile,
    /// How long a device may be offline or silent before it is lost and its replicas are
    /// rescheduled (`placement: every` ones stay), e.g. 500ms, 30s, 2m.
    #[arg(long, env = "SHOAL_HUB_DEVICE_GRACE", value_parser = shoal_api::model::quantity::duration_arg, default_value = "30s")]
    #[serde(deserialize_with = "duration")]
    pub device_grace: Option<Duration>,
    /// Serve MQTT and HTTP in the clear, without client certificates or topic ACLs. For
    /// local development only: anyone who reaches the ports controls the fleet.
    #[arg(long, env = "SHOAL_HUB_INSECURE")]
    pub insecure: bool,
    /// How long device certificates are valid; agents renew them after two thirds
    /// (e.g. 90d is 2160h; at least 10s).
    #[arg(long, env = "SHOAL_HUB_DEVICE_CERT_LIFETIME", value_parser = shoal_api::model::quantity::duration_arg, default_value = "2160h")]
    #[serde(deserialize_with = "duration")]
    pub device_cert_lifetime: Option<Duration>,
    /// Another name (DNS name or IP address) for the hub's server certificate, e.g. the
    /// address devices and `mosquitto_pub` use (repeatable; adds to `tls-names` in the
    /// config file).
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// Where the hub keeps its state: `sled` (DATA_DIR/hub.db) or
    /// `etcds://HOST:PORT[,HOST:PORT…][/PREFIX]?ca=FILE[&cert=FILE&key=FILE][&user=NAME&password-file=FILE][&kek=FILE]`
    /// (keys under PREFIX, default /shoal; TLS checked against `ca`, a client certificate
    /// and/or etcd user; private keys wrapped with the key-encryption key `kek`, default
    /// DATA_DIR/pki/etcd.kek, which every replica needs a copy of); plaintext `etcd://`
    /// only with --insecure.
    #[arg(
        long,
        env = "SHOAL_HUB_STORE",
        value_name = "URL",
        default_value = "sled"
    )]
    #[serde(deserialize_with = "parsed")]
    pub store: Option<StoreChoice>,
    /// With an etcd store: the TTL of the lease the leader holds its leadership with; a dead
    /// leader is replaced about this long after (at least 2s).
    #[arg(long, env = "SHOAL_HUB_LEADER_LEASE", value_parser = shoal_api::model::quantity::duration_arg, default_value = "3s")]
    #[serde(deserialize_with = "duration")]
    pub leader_lease: Option<Duration>,
}

/// The hub's configuration from `serve`'s parsed command line `m` (flags, environment and
/// defaults, as clap took them) and the config file it names: flags > environment > file >
/// default.
pub fn resolve(m: &ArgMatches) -> Result<HubConfig, ConfigError> {
    let cli = Settings::from_arg_matches(m).map_err(ConfigFileError::from)?;
    let file: Settings = shoal_daemon::config::read(cli.config.as_deref())?;
    macro_rules! merged {
        ($field:ident) => {
            shoal_daemon::merged!(m, cli, file, $field; stringify!($field))
        };
    }
    let insecure = cli.insecure || file.insecure;
    let fleet =
        shoal_api::wire::discovery::fleet_or_default(merged!(fleet)).map_err(ConfigError::Fleet)?;
    let device_cert_lifetime =
        merged!(device_cert_lifetime).unwrap_or(shoal_pki::ca::DEVICE_CERT_LIFETIME);
    if device_cert_lifetime < MIN_DEVICE_CERT_LIFETIME {
        return Err(ConfigError::DeviceCertLifetime(device_cert_lifetime));
    }
    let leader_lease = merged!(leader_lease).unwrap_or(DEFAULT_LEADER_LEASE);
    if leader_lease < crate::ha::MIN_LEASE {
        return Err(ConfigError::LeaderLease(leader_lease));
    }
    let mut tls_names = file.tls_names.clone();
    tls_names.extend(cli.tls_names.iter().cloned());
    // The embedded broker's port depends on TLS, so its default is computed here.
    let mqtt_port = if insecure { 1883 } else { 8883 };
    Ok(HubConfig {
        data_dir: merged!(data_dir).ok_or(ConfigError::NoDataDir)?,
        mqtt_listen: merged!(mqtt_listen).unwrap_or(SocketAddr::from(([127, 0, 0, 1], mqtt_port))),
        broker: merged!(broker),
        http_listen: merged!(http_listen).unwrap_or(DEFAULT_HTTP_LISTEN),
        public_url: merged!(public_url),
        fleet,
        name: merged!(name).unwrap_or_else(shoal_daemon::host_name),
        mdns: cli.mdns_flags.options(&file.mdns),
        device_grace: merged!(device_grace).unwrap_or(DEFAULT_DEVICE_GRACE),
        insecure,
        tls_names,
        device_cert_lifetime,
        store: merged!(store).unwrap_or_default(),
        leader_lease,
    })
}

/// The defaults clap gives (`default_value` above), should it not have set them (a
/// `Settings` built without clap).
const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_DEVICE_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(3);

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    parsed_with(d, shoal_api::model::quantity::duration_arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    /// `serve`'s settings from `args` (no environment: the variables' names are unlikely set).
    fn resolved(args: &[&str]) -> Result<HubConfig, ConfigError> {
        let cmd = Settings::augment_args(Command::new("serve").no_binary_name(true));
        let m = cmd.try_get_matches_from(args).unwrap();
        resolve(&m)
    }

    #[test]
    fn example_config_parses_and_flags_win() {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/hub.toml");
        let example = example.to_str().unwrap();
        let c = resolved(&["--config", example]).unwrap();
        assert_eq!(c.fleet, "greenhouse");
        assert_eq!(c.mdns, Some(shoal_daemon::mdns::MdnsOptions::default()));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/shoal-hub"));
        let c = resolved(&["--config", example, "--fleet", "lab", "--no-mdns"]).unwrap();
        assert_eq!((c.fleet.as_str(), c.mdns), ("lab", None));
        let e = resolved(&["--data-dir", "/d", "--fleet", "Bad Fleet"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"Bad Fleet\""), "{e}");
    }

    #[test]
    fn defaults() {
        let c = resolved(&["--data-dir", "/d"]).unwrap();
        assert_eq!(c.mqtt_listen, "127.0.0.1:8883".parse().unwrap());
        assert_eq!(c.http_listen, DEFAULT_HTTP_LISTEN);
        assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.fleet, "default");
        assert_eq!(c.name, shoal_daemon::host_name());
        assert_eq!(c.device_grace, DEFAULT_DEVICE_GRACE);
        assert_eq!(c.device_cert_lifetime, shoal_pki::ca::DEVICE_CERT_LIFETIME);
        assert_eq!(c.leader_lease, DEFAULT_LEADER_LEASE);
        assert_eq!(c.store, StoreChoice::Sled);
        assert_eq!((c.broker, c.public_url, c.insecure), (None, None, false));
        let c = resolved(&["--data-dir", "/d", "--insecure"]).unwrap();
        assert_eq!(c.mqtt_listen, "127.0.0.1:1883".parse().unwrap());
        let e = resolved(&[]).unwrap_err().to_string();
        assert!(e.contains("no data directory"), "{e}");
    }

    #[test]
    fn precedence_defaults_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ndevice-grace = \"5s\"\nleader-lease = \"4s\"\nhttp-listen = \"0.0.0.0:9000\"\ninsecure = true\ntls-names = [\"a\"]\nbroker = \"mqtt://127.0.0.1:1883\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = resolved(&["--config", path]).unwrap();
        assert_eq!(c.device_grace, Duration::from_secs(5));
        assert_eq!(c.leader_lease, Duration::from_secs(4));
        assert_eq!(c.http_listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.mqtt_listen, "127.0.0.1:1883".parse().unwrap());
        assert!(c.insecure);
        assert_eq!(c.broker.map(|b| b.port), Some(1883));
        let c = resolved(&[
            "--config",
            path,
            "--device-grace",
            "1s",
            "--http-listen",
            "127.0.0.1:1",
            "--tls-name",
            "b",
            "--data-dir",
            "/flag",
        ])
        .unwrap();
        assert_eq!(c.device_grace, Duration::from_secs(1));
        assert_eq!(c.http_listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.tls_names, ["a", "b"]);
        assert_eq!(c.data_dir, PathBuf::from("/flag"));

        std::fs::write(&file, "data-dir = \"/d\"\ndevice-grace = \"soon\"\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("device-grace") && e.contains("\"soon\""), "{e}");
        std::fs::write(&file, "data-dir = \"/d\"\nstore = \"mysql://x\"\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("store") && e.contains("mysql://x"), "{e}");
        std::fs::write(&file, "data-dir = \"/d\"\nsurprise = 1\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("surprise"), "unknown keys are errors: {e}");
        std::fs::write(&file, "data-dir = \"/d\"\nleader-lease = \"1s\"\n").unwrap();
        let e = resolved(&["--config", path]).unwrap_err().to_string();
        assert!(e.contains("leader lease 1s is too short"), "{e}");
        let e = resolved(&["--data-dir", "/d", "--device-cert-lifetime", "1s"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device certificate lifetime 1s is too short"),
            "{e}"
        );
    }
}

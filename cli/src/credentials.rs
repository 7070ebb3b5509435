//! The operator's credential bundle: the TLS client it makes, and the MQTT client ids it may
//! use.

use super::*;

/// The operator's TLS client configuration, from the credential bundle.
/// The operator's TLS client: for HTTPS to the hub (`mqtt` false: the hub only), or for
/// MQTT (the hub's embedded broker, or an external broker of the fleet).
pub(crate) fn operator_tls(
    dir: Option<&Path>,
    mqtt: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
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
pub(crate) fn client_id_prefix(dir: Option<&Path>) -> String {
    credentials_dir(dir)
        .ok()
        .and_then(|d| std::fs::read_to_string(d.join("operator.pem")).ok())
        .and_then(|pem| shoal_pki::tls::first_cert(&pem).ok())
        .and_then(|der| shoal_pki::tls::common_name(&der))
        .and_then(|cn| shoal_api::policy::operator::named_in(&cn))
        .map(|name| format!("{name}."))
        .unwrap_or_default()
}

/// Where the operator's credential bundle is.
pub(crate) fn credentials_dir(dir: Option<&Path>) -> Result<PathBuf, String> {
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

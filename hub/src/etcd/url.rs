//! `--store etcd://…` and `etcds://…` URLs: endpoints, prefix, and the TLS and user
//! authentication they name; bad ones say why.

use super::CALL_TIMEOUT;
use crate::store::StoreError;
use etcd_client::ConnectOptions;
use std::time::Duration;

/// Where an etcd store lives and how to reach it:
/// `etcds://HOST:PORT[,HOST:PORT…][/PREFIX][?ca=FILE&cert=FILE&key=FILE&user=NAME&password-file=FILE&kek=FILE]`
/// (TLS, the server checked against `ca`, with a client certificate and/or etcd's user
/// authentication), or `etcd://…` (plaintext, which the hub refuses unless `--insecure`).
/// `kek` is the key-encryption key the fleet's private keys are wrapped with in etcd
/// (default `DATA_DIR/pki/etcd.kek`; see [`crate::ha`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// `etcds://`: the CA to check etcd with, and the client certificate and key, if any.
    pub tls: Option<EtcdTls>,
    /// etcd user and the file holding its password.
    pub user: Option<(String, std::path::PathBuf)>,
    /// The key-encryption key's file, if not the default.
    pub kek: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A `--store` value that names no store, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {url:?} is invalid: {reason}")]
pub struct BadStoreUrl {
    /// `store` or `etcd store`.
    pub what: &'static str,
    pub url: String,
    pub reason: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = BadStoreUrl;

    fn from_str(s: &str) -> Result<Self, BadStoreUrl> {
        let bad = |why: &str| BadStoreUrl {
            what: "etcd store",
            url: s.to_string(),
            reason: why.to_string(),
        };
        let (scheme_tls, rest) = match (s.strip_prefix("etcds://"), s.strip_prefix("etcd://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => {
                return Err(bad(
                    "expected etcds://HOST:PORT[,HOST:PORT…][/PREFIX][?ca=FILE…] (or etcd:// with --insecure)",
                ))
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, "/shoal".to_string()),
        };
        if prefix == "/" {
            return Err(bad("the prefix must not be empty"));
        }
        let mut endpoints = Vec::new();
        let scheme = if scheme_tls { "https" } else { "http" };
        for h in hosts.split(',') {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("{h:?} has no port")))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("{h:?} is not HOST:PORT")));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        let mut q: std::collections::BTreeMap<&str, std::path::PathBuf> = Default::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("option {pair:?} is not KEY=VALUE")))?;
            if !["ca", "cert", "key", "user", "password-file", "kek"].contains(&k) {
                return Err(bad(&format!(
                    "option {k:?} is unknown: expected ca, cert, key, user, password-file or kek"
                )));
            }
            if v.is_empty() || q.insert(k, v.into()).is_some() {
                return Err(bad(&format!("option {k:?} is empty or given twice")));
            }
        }
        let tls = match (scheme_tls, q.remove("ca")) {
            (true, Some(ca)) => Some(EtcdTls {
                ca,
                identity: match (q.remove("cert"), q.remove("key")) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => return Err(bad("cert and key go together")),
                },
            }),
            (true, None) => {
                return Err(bad(
                    "etcds:// needs ca=FILE (the CA that signed etcd's certificate)",
                ))
            }
            (false, Some(_)) => return Err(bad("ca, cert and key need etcds://")),
            (false, None) => None,
        };
        if !scheme_tls && (q.contains_key("cert") || q.contains_key("key")) {
            return Err(bad("ca, cert and key need etcds://"));
        }
        let user = match (q.remove("user"), q.remove("password-file")) {
            (Some(u), Some(p)) => Some((u.display().to_string(), p)),
            (None, None) => None,
            _ => return Err(bad("user and password-file go together")),
        };
        Ok(EtcdUrl {
            endpoints,
            prefix,
            tls,
            user,
            kek: q.remove("kek"),
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    /// The endpoints and prefix (file options are left out).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", hosts.join(","), self.prefix)
    }
}

impl EtcdUrl {
    /// Whether hub and etcd talk in the clear, unauthenticated.
    pub fn plaintext(&self) -> bool {
        self.tls.is_none()
    }

    /// Client options: TLS and credentials as the URL says, read from their files now.
    pub fn options(&self, timeout: Option<Duration>) -> Result<ConnectOptions, StoreError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StoreError::Etcd {
                url: self.to_string(),
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        let mut o = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT);
        if let Some(t) = timeout {
            o = o.with_timeout(t);
        }
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(t);
        }
        if let Some((user, file)) = &self.user {
            let password = String::from_utf8_lossy(&read(file)?).trim_end().to_string();
            o = o.with_user(user.clone(), password);
        }
        Ok(o)
    }
}

/// Why a plaintext etcd is refused.
pub const PLAINTEXT_REFUSED: &str = "etcd:// is plaintext without authentication: anyone who reaches etcd or the path to it reads and writes the fleet's state; use etcds://HOST:PORT?ca=FILE&cert=FILE&key=FILE (or user=NAME&password-file=FILE), or --insecure for local experiments";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(u.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(u.prefix, "/shoal");
        let u: EtcdUrl = "etcd://a:1,b:2/fleets/prod/".parse().unwrap();
        assert_eq!(u.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(u.prefix, "/fleets/prod");
        assert_eq!(u.to_string(), "etcd://a:1,b:2/fleets/prod");
        let u: EtcdUrl =
            "etcds://a:1,b:2/p?ca=/c.pem&cert=/h.pem&key=/h.key&user=hub&password-file=/pw&kek=/k"
                .parse()
                .unwrap();
        assert_eq!(u.endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(u.to_string(), "etcds://a:1,b:2/p");
        assert!(!u.plaintext());
        assert_eq!(u.user.as_ref().map(|u| u.0.as_str()), Some("hub"));
        assert_eq!(u.kek.as_deref(), Some(std::path::Path::new("/k")));
        for (bad, why) in [
            ("etcds://a:1?cert=/c", "needs ca=FILE"),
            ("etcds://a:1?ca=/c&cert=/c", "cert and key go together"),
            ("etcd://a:1?ca=/c", "need etcds://"),
            ("etcds://a:1?ca=/c&color=red", "\"color\" is unknown"),
            ("etcds://a:1?ca=/c&ca=/d", "given twice"),
            (
                "etcds://a:1?ca=/c&user=u",
                "user and password-file go together",
            ),
            ("http://a:1", "expected etcds://"),
            ("etcd://a", "\"a\" has no port"),
            ("etcd://a:x", "\"a:x\" is not HOST:PORT"),
            ("etcd://:1", "\":1\" is not HOST:PORT"),
            ("etcd://a:1/", "prefix must not be empty"),
        ] {
            let e = bad.parse::<EtcdUrl>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}

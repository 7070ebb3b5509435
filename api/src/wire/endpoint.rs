//! Endpoint URLs given on command lines: the MQTT broker (`mqtts://HOST:PORT` over TLS, or
//! `mqtt://HOST:PORT` in the clear) and the hub's HTTP API (`https://HOST:PORT`).

use std::fmt;
use std::str::FromStr;

/// An MQTT broker address: `mqtts://HOST[:PORT]` (TLS, port 8883 by default; `ssl://` is a
/// synonym) or `mqtt://HOST[:PORT]` (plain TCP, port 1883 by default; `tcp://` is a
/// synonym, as many MQTT tools use it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// Over TLS (`mqtts://`).
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker address {value:?} is invalid: {reason}")]
pub struct EndpointError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = |reason| EndpointError {
            value: s.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(r) = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("ssl://"))
        {
            (true, r)
        } else if let Some(r) = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
        {
            (false, r)
        } else {
            return Err(err(
                "expected mqtts://HOST:PORT (or mqtt://HOST:PORT in the clear)",
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(err("expected mqtt://HOST:PORT without a path"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // `[::1]:1883` or `host:1883`; a bare IPv6 address needs brackets.
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.starts_with('[')) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| err("port must be a number 1-65535"))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(err("host is empty"));
        }
        if port == 0 {
            return Err(err("port must be a number 1-65535"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// Checks the hub's `--public-url`, where devices download modules: `https://HOST[:PORT]`
/// (`http://` only for a hub without TLS), no user, path, query or fragment, so the address
/// in a signed desired state names a host and nothing that could redirect or confuse a
/// client. Returns it without a trailing `/`.
pub fn check_public_url(s: &str, tls: bool) -> Result<String, PublicUrlError> {
    let err = |reason| PublicUrlError {
        value: s.to_string(),
        reason,
    };
    let rest = match (s.strip_prefix("https://"), s.strip_prefix("http://")) {
        (Some(r), _) => r,
        (None, Some(_)) if tls => {
            return Err(err("must be https:// (agents verify the hub over TLS)"))
        }
        (None, Some(r)) => r,
        _ => return Err(err("expected https://HOST[:PORT]")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(err("host is empty"));
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`; the host a DNS name or IPv4 address
    // (letters, digits, `.`, `-`), or bracketed IPv6: nothing a URL parser could read as a
    // user, a path or another host (`\`, `@`, `%`…).
    let name_ok = |h: &str| {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    let v6_ok = |h: &str| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
    let (host_ok, port) = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (v6_ok(h), None),
            Some((h, p)) => (v6_ok(h), Some(p.strip_prefix(':').unwrap_or("x"))),
            None => return Err(err("unclosed [")),
        },
        None => match rest.split_once(':') {
            Some((h, p)) => (name_ok(h), Some(p)),
            None => (name_ok(rest), None),
        },
    };
    if !host_ok {
        return Err(err(
            "expected only HOST[:PORT]: no user, path, query or fragment",
        ));
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(err("port must be a number 1-65535"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("public URL {value:?} is invalid: {reason}")]
pub struct PublicUrlError {
    pub value: String,
    pub reason: &'static str,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_name_a_host_and_nothing_else() {
        for (url, tls, ok) in [
            ("https://hub.example.net", true, true),
            ("https://hub.example.net:8443/", true, true),
            ("https://[::1]:8080", true, true),
            ("https://10.0.0.1", true, true),
            ("http://hub:8080", false, true),
            ("http://hub:8080", true, false),
            ("https://evil@hub", true, false),
            ("https://hub/redirect?to=x", true, false),
            ("https://hub#x", true, false),
            ("https://hub:99999", true, false),
            ("https://evil.example\\.hub", true, false),
            ("https://hub%2fx", true, false),
            ("https://[::1", true, false),
            ("ftp://hub", true, false),
            ("https://", true, false),
        ] {
            assert_eq!(check_public_url(url, tls).is_ok(), ok, "{url} tls={tls}");
        }
        let e = check_public_url("https://hub/x", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"https://hub/x\""), "{e}");
    }

    #[test]
    fn broker_urls() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        assert_eq!("mqtt://hub.local".parse::<BrokerUrl>().unwrap().port, 1883);
        assert_eq!("tcp://h:1/".parse::<BrokerUrl>().unwrap().port, 1);
        assert_eq!(
            "mqtt://[::1]:1883".parse::<BrokerUrl>().unwrap().host,
            "::1"
        );
        for bad in [
            "127.0.0.1:1883",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://h:0",
            "http://h:1",
            "mqtt://h:1/a",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
        assert_eq!(u.to_string(), "mqtt://127.0.0.1:1884");
        let t: BrokerUrl = "mqtts://hub.local".parse().unwrap();
        assert_eq!(
            (t.port, t.tls, t.to_string().as_str()),
            (8883, true, "mqtts://hub.local:8883")
        );
        assert!("ssl://h:1".parse::<BrokerUrl>().unwrap().tls);
        assert!(!u.tls);
    }
}

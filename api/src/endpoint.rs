//! Endpoint URLs given on command lines: the MQTT broker (`mqtt://HOST:PORT`) and the hub's
//! HTTP API (`http://HOST:PORT`).

use std::fmt;
use std::str::FromStr;

/// An MQTT broker address, `mqtt://HOST[:PORT]` (port 1883 by default). `tcp://` is accepted
/// as a synonym, as many MQTT tools use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
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
        let rest = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
            .ok_or_else(|| err("expected mqtt://HOST:PORT"))?;
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
            _ => (rest, 1883),
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
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

//! The embedded broker's authorization filter: a pure inspector of the packets a client
//! sends (MQTT 3.1, 3.1.1 and 5), run by the hub's TLS front listener between the client and
//! rumqttd (`hub/src/broker.rs`); here, next to [`acl`], so the fuzz targets reach it. It knows the client's [`Identity`] from its certificate, and
//! - checks CONNECT's client id and will topic, and rewrites the login to the broker's
//!   private one (rumqttd listens on loopback with a random password, so only the front
//!   listener reaches it);
//! - checks every PUBLISH topic and SUBSCRIBE filter with [`acl::allowed`], and clears the
//!   retain flag of publishes (and wills) whose topic is no retained kind ([`acl::may_retain`]);
//! - refuses MQTT 5 topic aliases (an empty topic) and anything before CONNECT.
//!
//! Written by hand: it is a filter inside a byte proxy. The MQTT crates decode into their own
//! connection state machines and would have to own the connection; this needs a few header
//! fields of three packet types, read in place.

use crate::policy::acl::{self, Access, Identity};
use crate::wire::topics::{self, Inbound};

/// Largest packet a client may send: the broker's 4 MiB payload limit plus headers.
pub const MAX_PACKET: usize = (4 << 20) + 64 * 1024;

/// Why a client was disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{0}")]
    Denied(#[from] acl::Denied),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

/// Largest packet a device may send: its status (the biggest thing it publishes, some
/// hundred bytes per replica) and its log chunks (64 KiB of lines, escaped) fit many times
/// over. Judged from the fixed header, before the rest is read: a device cannot make the
/// broker buffer megabytes.
pub const MAX_DEVICE_PACKET: usize = 1 << 20;

/// The total length of the first packet in `buf`, if it is complete.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, Violation> {
    packet_len_max(buf, MAX_PACKET)
}

/// [`packet_len`] for a client that may send at most `max` bytes in one packet: a longer
/// one is refused as soon as its length is known.
pub fn packet_len_max(buf: &[u8], max: usize) -> Result<Option<usize>, Violation> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 1 + i + 1 + len;
            if total > max.min(MAX_PACKET) {
                return Err(Violation::Malformed(
                    "packet larger than the broker accepts from this client",
                ));
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(Violation::Malformed("remaining length longer than 4 bytes"))
}

/// A cursor over a packet's bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Violation> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or(Violation::Malformed("truncated packet"))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Violation> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, Violation> {
        let s = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([s[0], s[1]])))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Violation> {
        let n = self.u16()?;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, Violation> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Violation::Malformed("string is not UTF-8"))
    }
    fn varint(&mut self) -> Result<usize, Violation> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Violation::Malformed("variable integer longer than 4 bytes"))
    }
    /// Skips MQTT 5 properties.
    fn properties(&mut self) -> Result<(), Violation> {
        let n = self.varint()?;
        self.take(n).map(|_| ())
    }
}

fn encode_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    // Callers pass the broker's short login strings.
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&b[..usize::from(n)]);
}

/// The per-connection filter.
#[derive(Debug)]
pub struct Guard {
    who: Identity,
    /// The broker's private login, written into CONNECT.
    login: (String, String),
    /// Protocol level once CONNECT was seen (4: 3.1.1, 5: MQTT 5).
    level: Option<u8>,
}

/// What to do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// Forward the packet as it is.
    AsIs,
    /// Forward these bytes instead (a CONNECT with the broker's login, an operator's apply
    /// under the topic that names it).
    Rewritten(Vec<u8>),
    /// Forward the packet with its retain flag (bit 0 of the first byte) cleared: a
    /// PUBLISH on a topic that keeps nothing retained.
    StripRetain,
}

impl Guard {
    pub fn new(who: Identity, login: (String, String)) -> Self {
        Self {
            who,
            login,
            level: None,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.who
    }

    /// The largest packet this client may send (see [`packet_len_max`]).
    pub fn max_packet(&self) -> usize {
        match self.who {
            Identity::Device(_) => MAX_DEVICE_PACKET,
            _ => MAX_PACKET,
        }
    }

    /// MQTT 5 or not, once connected (for the shape of a refusal).
    pub fn level(&self) -> Option<u8> {
        self.level
    }

    /// Checks one complete packet.
    pub fn check(&mut self, packet: &[u8]) -> Result<Pass, Violation> {
        let kind = packet.first().map(|b| b >> 4).unwrap_or(0);
        // Position after the fixed header.
        let mut start = 1;
        while packet.get(start).is_some_and(|b| b & 0x80 != 0) {
            start += 1;
        }
        start += 1;
        let mut r = Reader {
            b: packet,
            at: start,
        };
        match (kind, self.level) {
            (1, None) => self.connect(packet[0], &mut r).map(Pass::Rewritten),
            (1, Some(_)) => Err(Violation::Malformed("a second CONNECT")),
            (_, None) => Err(Violation::Malformed("first packet is not CONNECT")),
            (3, Some(_)) => {
                let topic = r.str()?;
                if topic.is_empty() {
                    return Err(Violation::Malformed(
                        "empty topic (MQTT 5 topic aliases are not accepted)",
                    ));
                }
                acl::allowed(&self.who, Access::Publish, topic)?;
                // An operator's apply goes on to the hub under a topic that names the
                // operator (`apply-as/{name}`), which only this guard writes: so the hub's
                // audit log knows who applied.
                if let Identity::Operator(o) = &self.who {
                    if let Some(Inbound::Apply { req, by: None }) = topics::classify(topic) {
                        let tagged = topics::apply_as(o.name.as_str(), req.as_deref());
                        if tagged.len() > usize::from(u16::MAX) {
                            return Err(Violation::Malformed("apply topic too long"));
                        }
                        return Ok(Pass::Rewritten(with_topic(packet, r.at, &tagged)));
                    }
                }
                if packet[0] & 0x01 != 0 && !acl::may_retain(topic) {
                    return Ok(Pass::StripRetain);
                }
                Ok(Pass::AsIs)
            }
            (8, Some(level)) => {
                r.u16()?; // packet id
                if level == 5 {
                    r.properties()?;
                }
                let mut any = false;
                while r.at < packet.len() {
                    let filter = r.str()?;
                    r.u8()?; // options
                    acl::allowed(&self.who, Access::Subscribe, filter)?;
                    any = true;
                }
                if !any {
                    return Err(Violation::Malformed("SUBSCRIBE without a filter"));
                }
                Ok(Pass::AsIs)
            }
            _ => Ok(Pass::AsIs),
        }
    }

    fn connect(&mut self, first: u8, r: &mut Reader<'_>) -> Result<Vec<u8>, Violation> {
        if first != 0x10 {
            return Err(Violation::Malformed("CONNECT with reserved flags set"));
        }
        let name = r.bytes()?;
        let level = r.u8()?;
        // What the broker behind speaks: MQTT 3.1.1 and 5 (not 3.1's MQIsdp).
        if !matches!((name, level), (b"MQTT", 4 | 5)) {
            return Err(Violation::Malformed("unsupported protocol name or level"));
        }
        let flags_at = r.at;
        let flags = r.u8()?;
        r.u16()?; // keep alive
        if level == 5 {
            r.properties()?;
        }
        let client_id = r.str()?;
        acl::client_id_allowed(&self.who, client_id)?;
        let mut flags = flags;
        if flags & 0x04 != 0 {
            if level == 5 {
                r.properties()?;
            }
            let will = r.str()?;
            acl::allowed(&self.who, Access::Publish, will)?;
            // A will is published by the broker, past this guard: an apply as a will would
            // reach the hub without the operator's name (see the PUBLISH rewrite below).
            if matches!(topics::classify(will), Some(Inbound::Apply { .. })) {
                return Err(Violation::Malformed("a will may not be an apply"));
            }
            if !acl::may_retain(will) {
                flags &= !0x20; // will retain
            }
            r.bytes()?; // will payload
        }
        // Everything up to the login stays; the client's own login (if any) is dropped.
        let keep = r.at;
        if flags & 0x80 != 0 {
            r.bytes()?;
        }
        if flags & 0x40 != 0 {
            r.bytes()?;
        }
        if r.at != r.b.len() {
            return Err(Violation::Malformed("trailing bytes after CONNECT"));
        }
        let start = flags_at - 2 - name.len() - 1;
        let mut body = r.b[start..keep].to_vec();
        body[flags_at - start] = flags | 0xc0;
        put_bytes(self.login.0.as_bytes(), &mut body);
        put_bytes(self.login.1.as_bytes(), &mut body);
        let mut out = vec![first];
        encode_len(body.len(), &mut out);
        out.extend_from_slice(&body);
        self.level = Some(level);
        Ok(out)
    }
}

/// A refusal the client understands before the connection closes: CONNACK "not
/// authorized" during CONNECT, DISCONNECT "not authorized" (MQTT 5) after; 3.1.1 has no
/// way to say it after CONNECT, so the connection just closes.
/// `packet` (a PUBLISH whose topic, length prefix included, ends at `topic_end`) with
/// `topic` instead and its retain flag cleared; the rest (packet id, MQTT 5 properties,
/// payload) as it was.
fn with_topic(packet: &[u8], topic_end: usize, topic: &str) -> Vec<u8> {
    let rest = packet.get(topic_end..).unwrap_or_default();
    let mut body = Vec::with_capacity(2 + topic.len() + rest.len());
    put_bytes(topic.as_bytes(), &mut body);
    body.extend_from_slice(rest);
    let mut out = vec![packet.first().copied().unwrap_or(0x30) & !0x01];
    encode_len(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

pub fn refusal(level: Option<u8>, during_connect: bool, client_level: u8) -> Option<Vec<u8>> {
    match (during_connect, level.unwrap_or(client_level)) {
        (true, 5) => Some(vec![0x20, 0x03, 0x00, 0x87, 0x00]),
        (true, _) => Some(vec![0x20, 0x02, 0x00, 0x05]),
        (false, 5) => Some(vec![0xe0, 0x01, 0x87]),
        (false, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ids::DeviceId;

    fn dev(s: &str) -> Identity {
        Identity::Device(DeviceId::try_from(s).unwrap())
    }

    fn str_(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(s.as_bytes(), &mut v);
        v
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        encode_len(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    fn connect(
        level: u8,
        client: &str,
        will: Option<&str>,
        login: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let mut b = str_(if level == 3 { "MQIsdp" } else { "MQTT" });
        b.push(level);
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04 | 0x20;
        }
        if login.is_some() {
            flags |= 0xc0;
        }
        b.push(flags);
        b.extend_from_slice(&[0, 10]);
        if level == 5 {
            b.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]); // properties: session expiry 60 s
        }
        b.extend(str_(client));
        if let Some(w) = will {
            if level == 5 {
                b.push(0);
            }
            b.extend(str_(w));
            b.extend(str_("offline"));
        }
        if let Some((u, p)) = login {
            b.extend(str_(u));
            b.extend(str_(p));
        }
        packet(0x10, &b)
    }

    fn login() -> (String, String) {
        ("broker".into(), "s3cret".into())
    }

    #[test]
    fn an_apply_cannot_be_a_will() {
        for topic in ["shoal/v1/apply", "shoal/v1/apply/r1"] {
            let mut g = Guard::new(
                Identity::Operator(crate::policy::acl::Operator::bootstrap()),
                login(),
            );
            assert!(
                g.check(&connect(4, "shoal-cli-1", Some(topic), None))
                    .is_err(),
                "{topic}"
            );
        }
    }

    #[test]
    fn connect_is_checked_and_gets_the_broker_login() {
        let mut g = Guard::new(dev("edge-a"), login());
        assert!(
            g.check(&connect(3, "shoal-agent-edge-a", None, None))
                .is_err(),
            "MQTT 3.1"
        );
        let mut bad_flags = connect(4, "shoal-agent-edge-a", None, None);
        bad_flags[0] = 0x12;
        assert!(g.check(&bad_flags).is_err());
        for level in [4, 5] {
            let will = "shoal/v1/devices/edge-a/presence";
            let mut g = Guard::new(dev("edge-a"), login());
            let p = connect(level, "shoal-agent-edge-a", Some(will), Some(("x", "y")));
            let Pass::Rewritten(out) = g.check(&p).unwrap() else {
                panic!()
            };
            // The rewritten CONNECT carries the broker login and still the will.
            assert_eq!(packet_len(&out).unwrap(), Some(out.len()));
            let tail = [str_("broker"), str_("s3cret")].concat();
            assert!(out.ends_with(&tail), "level {level}: {out:?}");
            assert!(out.windows(will.len()).any(|w| w == will.as_bytes()));
            assert_eq!(g.level(), Some(level));

            let mut g = Guard::new(dev("edge-a"), login());
            let e = g
                .check(&connect(level, "shoal-agent-edge-b", None, None))
                .unwrap_err();
            assert!(e.to_string().contains("shoal-agent-edge-b"), "{e}");
            let mut g = Guard::new(dev("edge-a"), login());
            let e = g
                .check(&connect(
                    level,
                    "shoal-agent-edge-a",
                    Some("shoal/v1/devices/edge-b/presence"),
                    None,
                ))
                .unwrap_err();
            assert!(e.to_string().contains("edge-b/presence"), "{e}");
        }
    }

    #[test]
    fn publishes_and_subscriptions_follow_the_acl() {
        let mut g = Guard::new(dev("edge-a"), login());
        assert!(
            g.check(&packet(0x30, &str_("shoal/v1/devices/edge-a/status")))
                .is_err(),
            "before CONNECT"
        );
        g.check(&connect(4, "shoal-agent-edge-a", None, None))
            .unwrap();
        let publish = |t: &str| packet(0x32, &[str_(t), vec![0, 1], b"{}".to_vec()].concat());
        assert_eq!(
            g.check(&publish("shoal/v1/devices/edge-a/status")),
            Ok(Pass::AsIs)
        );
        assert!(g.check(&publish("shoal/v1/devices/edge-b/status")).is_err());
        assert!(g.check(&publish("shoal/v1/apply")).is_err());
        let sub = |f: &str| packet(0x82, &[vec![0, 7], str_(f), vec![1]].concat());
        assert_eq!(
            g.check(&sub("shoal/v1/devices/edge-a/desired")),
            Ok(Pass::AsIs)
        );
        assert!(g.check(&sub("shoal/v1/devices/+/desired")).is_err());
        assert!(
            g.check(&connect(4, "shoal-agent-edge-a", None, None))
                .is_err(),
            "second CONNECT"
        );
        assert_eq!(g.check(&[0xc0, 0]), Ok(Pass::AsIs), "PINGREQ");

        let mut g = Guard::new(
            Identity::Operator(crate::policy::acl::Operator::bootstrap()),
            login(),
        );
        g.check(&connect(5, "shoal-cli-1", None, None)).unwrap();
        // MQTT 5 PUBLISH: topic, packet id, properties.
        let p5 = |t: &str| packet(0x32, &[str_(t), vec![0, 1, 0], b"{}".to_vec()].concat());
        // An operator's apply is passed on under a topic naming the operator; packet id,
        // properties and payload as they were; retain cleared.
        assert_eq!(
            g.check(&p5("shoal/v1/apply/r1")),
            Ok(Pass::Rewritten(packet(
                0x32,
                &[
                    str_("shoal/v1/apply-as/shoal-operator/r1"),
                    vec![0, 1, 0],
                    b"{}".to_vec()
                ]
                .concat()
            )))
        );
        let retained = packet(
            0x33,
            &[str_("shoal/v1/apply"), vec![0, 1, 0], b"{}".to_vec()].concat(),
        );
        assert_eq!(
            g.check(&retained),
            Ok(Pass::Rewritten(packet(
                0x32,
                &[
                    str_("shoal/v1/apply-as/shoal-operator"),
                    vec![0, 1, 0],
                    b"{}".to_vec()
                ]
                .concat()
            )))
        );
        assert!(
            g.check(&p5("shoal/v1/apply-as/mallory/r1")).is_err(),
            "nobody writes the attributed topic but the guard"
        );
        assert!(g.check(&p5("shoal/v1/devices/edge-a/desired")).is_err());
        assert!(g.check(&p5("")).is_err(), "topic alias");
        let sub5 = |f: &str| packet(0x82, &[vec![0, 7, 0], str_(f), vec![1]].concat());
        assert_eq!(g.check(&sub5("shoal/v1/results/r1")), Ok(Pass::AsIs));
        assert_eq!(
            g.check(&sub5("ops/replies/42")),
            Ok(Pass::AsIs),
            "a response topic"
        );
    }

    #[test]
    fn only_device_state_is_retained() {
        let mut g = Guard::new(dev("edge-a"), login());
        g.check(&connect(4, "shoal-agent-edge-a", None, None))
            .unwrap();
        // QoS 1 + retain (0x33) and QoS 1 (0x32).
        let publish =
            |first: u8, t: &str| packet(first, &[str_(t), vec![0, 1], b"{}".to_vec()].concat());
        for t in ["hello", "presence", "status"] {
            let topic = format!("shoal/v1/devices/edge-a/{t}");
            assert_eq!(g.check(&publish(0x33, &topic)), Ok(Pass::AsIs), "{t}");
        }
        let logs = "shoal/v1/devices/edge-a/logs/r1";
        assert_eq!(g.check(&publish(0x33, logs)), Ok(Pass::StripRetain));
        assert_eq!(g.check(&publish(0x32, logs)), Ok(Pass::AsIs));
        // A will that is no presence keeps no retain flag either (the hub's own clients).
        let mut hub = Guard::new(Identity::Hub, login());
        let c = connect(4, "shoal-hub-x", Some("shoal/v1/hubs/x/ingest"), None);
        let Pass::Rewritten(out) = hub.check(&c).unwrap() else {
            panic!()
        };
        // The flags byte: after the fixed header (2 bytes, a short packet), the protocol
        // name (2 + 4 bytes) and the level.
        let flags_at = 2 + 2 + 4 + 1;
        assert_eq!(out[flags_at] & 0x24, 0x04, "will kept, its retain cleared");
        let mut dev_a = Guard::new(dev("edge-a"), login());
        let c = connect(
            4,
            "shoal-agent-edge-a",
            Some("shoal/v1/devices/edge-a/presence"),
            None,
        );
        let Pass::Rewritten(out) = dev_a.check(&c).unwrap() else {
            panic!()
        };
        assert_eq!(out[flags_at] & 0x24, 0x24, "a presence will stays retained");
        assert!(acl::may_retain("shoal/v1/devices/d/desired"));
        assert!(!acl::may_retain("shoal/v1/devices//status"));
        assert!(!acl::may_retain("shoal/v1/results/r1"));
    }

    #[test]
    fn lengths() {
        // A device's packet is judged by its fixed header alone.
        let g = Guard::new(dev("edge-a"), login());
        let big = [0x30, 0x80, 0x80, 0x80, 0x02]; // remaining length 4 MiB, nothing more
        assert!(packet_len_max(&big, g.max_packet()).is_err());
        assert_eq!(packet_len_max(&big, MAX_PACKET).unwrap(), None);
        assert_eq!(packet_len(&[0x30]).unwrap(), None);
        assert_eq!(packet_len(&[0x30, 2, 0]).unwrap(), None);
        assert_eq!(packet_len(&[0x30, 2, 0, 0, 9]).unwrap(), Some(4));
        assert!(packet_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert!(
            packet_len(&[0x30, 0xff, 0xff, 0xff, 0x7f]).is_err(),
            "too large"
        );
    }
}

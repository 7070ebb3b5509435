//! MQTT keep-alive as the embedded broker's front listener (`hub/src/broker.rs`) keeps it,
//! in place of rumqttd (MQTT 3.1.1 and 5, §3.1.2.10): keep-alive 0 turns the mechanism off,
//! and a client that sends nothing for one and a half times its keep-alive is disconnected
//! as if its network had failed, so the broker publishes its will.
//!
//! rumqttd gets neither right: it refuses keep-alive 0 outright, and its timer restarts
//! whenever it sends the client anything, so a silent client subscribed to a busy topic is
//! never cut and its will never published. So the front reads the client's keep-alive from
//! CONNECT, writes [`BROKER_KEEP_ALIVE`] in its place for rumqttd, and times the client's
//! silence itself ([`silence_limit`]); when that runs out it closes rumqttd's side without a
//! DISCONNECT (rumqttd then publishes the will), and the client's.

use crate::policy::mqtt_guard::Violation;
use std::time::Duration;

/// The keep-alive rumqttd sees for every client: the largest there is, so its own timer
/// (1.5 × this, some 27 hours without a byte either way) never cuts a client the front
/// still counts as alive. A client that asked for no keep-alive (0) and exchanges nothing
/// at all for that long is the only one it ever cuts.
pub const BROKER_KEEP_ALIVE: u16 = u16::MAX;

/// How long a client with keep-alive `secs` may stay silent before it is disconnected: one
/// and a half times it, and for 0 (no keep-alive) for ever.
pub fn silence_limit(secs: u16) -> Option<Duration> {
    (secs != 0).then(|| Duration::from_millis(u64::from(secs) * 1500))
}

/// Reads the keep-alive of `connect` (a whole CONNECT packet, MQTT 3.1, 3.1.1 or 5: the
/// field sits at the same place in all three) and writes [`BROKER_KEEP_ALIVE`] in its place;
/// the packet keeps its length.
pub fn take_keep_alive(connect: &mut [u8]) -> Result<u16, Violation> {
    if connect.first().map(|b| b >> 4) != Some(1) {
        return Err(Violation::Malformed("first packet is not CONNECT"));
    }
    // The fixed header: the type byte and 1 to 4 bytes of remaining length.
    let header = 1
        + connect
            .iter()
            .skip(1)
            .take(4)
            .position(|b| b & 0x80 == 0)
            .ok_or(Violation::Malformed("remaining length longer than 4 bytes"))?
        + 1;
    let name_len = connect
        .get(header..header + 2)
        .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
        .ok_or(Violation::Malformed("truncated packet"))?;
    // Protocol name, then the level and the flags bytes.
    let at = header + 2 + name_len + 2;
    let field = connect
        .get_mut(at..at + 2)
        .ok_or(Violation::Malformed("truncated packet"))?;
    let secs = u16::from_be_bytes([field[0], field[1]]);
    field.copy_from_slice(&BROKER_KEEP_ALIVE.to_be_bytes());
    Ok(secs)
}

/// What a client cut for its silence is told before the connection closes: MQTT 5's
/// DISCONNECT "keep alive timeout" (0x8D); MQTT 3.1.1 has no word for it.
pub fn timed_out(level: u8) -> Option<Vec<u8>> {
    (level == 5).then(|| vec![0xe0, 0x01, 0x8d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_limits() {
        let s = Duration::from_secs_f64;
        for (keep_alive, limit) in [
            (0, None),
            (1, Some(s(1.5))),
            (2, Some(s(3.0))),
            (60, Some(s(90.0))),
            (u16::MAX, Some(s(98_302.5))),
        ] {
            assert_eq!(silence_limit(keep_alive), limit, "{keep_alive}");
        }
    }

    /// A CONNECT with protocol `name`, `level` and keep-alive `secs`, client id "c".
    fn connect(name: &str, level: u8, secs: u16, pad: usize) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[level, 0x02]);
        body.extend_from_slice(&secs.to_be_bytes());
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&[0, 1, b'c']);
        body.resize(body.len() + pad, 0);
        let mut out = vec![0x10];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        out.extend(body);
        out
    }

    #[test]
    fn the_keep_alive_is_taken_and_replaced() {
        for (name, level, secs, pad) in [
            ("MQTT", 4, 0, 0),
            ("MQTT", 4, 60, 0),
            ("MQTT", 5, 2, 0),
            ("MQIsdp", 3, 10, 0),
            // Two bytes of remaining length.
            ("MQTT", 4, 30, 300),
        ] {
            let mut p = connect(name, level, secs, pad);
            let len = p.len();
            assert_eq!(take_keep_alive(&mut p), Ok(secs), "{name} {level}");
            assert_eq!(p.len(), len);
            assert_eq!(p, connect(name, level, BROKER_KEEP_ALIVE, pad));
        }
        for bad in [
            vec![],
            vec![0x30, 0x02, 0, 0],
            vec![0x10, 0x80, 0x80, 0x80, 0x80, 0x01],
            connect("MQTT", 4, 9, 0)[..10].to_vec(),
        ] {
            assert!(take_keep_alive(&mut bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_mqtt_5_hears_why() {
        assert_eq!(timed_out(5), Some(vec![0xe0, 0x01, 0x8d]));
        assert_eq!(timed_out(4), None);
        assert_eq!(timed_out(3), None);
    }
}

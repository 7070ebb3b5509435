//! The embedded broker's packet filter (`shoal_api::policy::mqtt_guard`) on arbitrary client bytes,
//! as a device: it must never panic, never pass a PUBLISH or SUBSCRIBE the ACL forbids, never
//! let a retained PUBLISH through on a topic that keeps nothing retained, and a CONNECT it
//! rewrites must be one well-framed packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::model::ids::DeviceId;
use shoal_api::policy::acl::{self, Access, Identity};
use shoal_api::policy::mqtt_guard::{packet_len, Guard, Pass};

fuzz_target!(|data: &[u8]| {
    let who = Identity::Device(DeviceId::try_from("edge-a").expect("a valid id"));
    let mut guard = Guard::new(who.clone(), ("broker".into(), "secret".into()));
    let mut rest = data;
    while let Ok(Some(n)) = packet_len(rest) {
        let (packet, tail) = rest.split_at(n);
        rest = tail;
        match guard.check(packet) {
            Ok(Pass::Rewritten(out)) => {
                assert_eq!(packet_len(&out).ok().flatten(), Some(out.len()), "{out:?}");
            }
            Ok(pass @ (Pass::AsIs | Pass::StripRetain)) => {
                // A forwarded PUBLISH's topic must be one the device may publish to.
                if packet[0] >> 4 == 3 {
                    let mut at = 1;
                    while packet[at] & 0x80 != 0 {
                        at += 1;
                    }
                    at += 1;
                    let len = usize::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
                    let topic = std::str::from_utf8(&packet[at + 2..at + 2 + len]).expect("utf-8");
                    assert!(
                        acl::allowed(&who, Access::Publish, topic).is_ok(),
                        "{topic}"
                    );
                    let retained = packet[0] & 1 != 0 && pass == Pass::AsIs;
                    assert!(!retained || acl::may_retain(topic), "{topic} retained");
                } else {
                    assert_eq!(pass, Pass::AsIs, "only a PUBLISH is stripped");
                }
            }
            Err(_) => break,
        }
    }
});

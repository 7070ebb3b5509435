//! The agent's check of a desired-state message (`shoal_pki::sign::verify_desired`) on
//! arbitrary payloads: it must never panic, and must accept nothing the hub did not sign.
//! Inputs are also wrapped in a genuine envelope, so the parser behind the signature check is
//! reached too: what it accepts must be newer and for this device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_api::model::ids::DeviceId;
use shoal_pki::sign::{verify_desired, HubKey, HubSigner};
use std::sync::OnceLock;

fn hub() -> &'static (HubSigner, HubKey) {
    static HUB: OnceLock<(HubSigner, HubKey)> = OnceLock::new();
    HUB.get_or_init(|| {
        let dir = std::env::temp_dir().join("shoal-fuzz-key");
        let signer = HubSigner::load_or_create(&dir.join("signing.key")).expect("a key");
        let key = HubKey::from_b64(&signer.public_key_b64()).expect("its public key");
        (signer, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let (signer, key) = hub();
    let me = DeviceId::try_from("edge-a").expect("a valid id");
    // Raw bytes: nobody signed them, so nothing may pass.
    assert!(verify_desired(Some(key), &me, 0, data).is_err());
    // Signed by the hub: whatever passes is for this device and newer.
    if let Ok(d) = verify_desired(Some(key), &me, 5, &signer.seal(data)) {
        assert_eq!(d.device_id, me);
        assert!(d.generation > 5);
    }
});

//! The one-way use of tokens, on an in-memory book and on [`Files`].
#![allow(clippy::unwrap_used)]

use super::*;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Token records by id, certificates by device, grants by device, shelved records.
type Books = (
    BTreeMap<String, (TokenRecord, Version)>,
    BTreeMap<DeviceId, String>,
    BTreeMap<DeviceId, Grant>,
    BTreeMap<(&'static str, String), Vec<u8>>,
);

/// An in-memory [`Enrollments`]: one lock makes each call atomic.
#[derive(Default)]
struct Fake {
    state: Mutex<Books>,
}

impl Enrollments for Fake {
    fn token(&self, id: &str) -> Result<Option<(TokenRecord, Version)>, EnrollError> {
        Ok(self.state.lock().unwrap().0.get(id).cloned())
    }
    fn create_token(&self, id: &str, record: &TokenRecord) -> Result<bool, EnrollError> {
        let mut s = self.state.lock().unwrap();
        if s.0.contains_key(id) {
            return Ok(false);
        }
        s.0.insert(id.to_string(), (record.clone(), 1));
        Ok(true)
    }
    fn claim_token(
        &self,
        id: &str,
        expected: Version,
        used: &TokenRecord,
        device: &DeviceId,
        cert_pem: &str,
        grant: &Grant,
    ) -> Result<bool, EnrollError> {
        let mut s = self.state.lock().unwrap();
        let version = s.0.get(id).map_or(0, |(_, v)| *v);
        if version != expected || (grant.fresh && s.1.contains_key(device)) {
            return Ok(false);
        }
        s.0.insert(id.to_string(), (used.clone(), version + 1));
        s.1.insert(device.clone(), cert_pem.to_string());
        s.2.insert(device.clone(), grant.clone());
        Ok(true)
    }
    fn grant(&self, device: &DeviceId) -> Result<Option<Grant>, EnrollError> {
        Ok(self.state.lock().unwrap().2.get(device).cloned())
    }
    fn grants(&self) -> Result<Vec<(DeviceId, Grant)>, EnrollError> {
        Ok(self.state.lock().unwrap().2.clone().into_iter().collect())
    }
    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        let mut s = self.state.lock().unwrap();
        s.1.insert(device.clone(), cert_pem.to_string());
        Ok(())
    }
    fn renew_record(
        &self,
        device: &DeviceId,
        expected: &str,
        cert_pem: &str,
    ) -> Result<bool, EnrollError> {
        let mut s = self.state.lock().unwrap();
        if s.1.get(device).map(String::as_str) != Some(expected) {
            return Ok(false);
        }
        s.1.insert(device.clone(), cert_pem.to_string());
        Ok(true)
    }
    fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError> {
        let mut s = self.state.lock().unwrap();
        if s.1.contains_key(device) {
            return Ok(false);
        }
        s.1.insert(device.clone(), cert_pem.to_string());
        Ok(true)
    }
    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        Ok(self.state.lock().unwrap().1.get(device).cloned())
    }
    fn entry(&self, shelf: Shelf, name: &str) -> Result<Option<Vec<u8>>, EnrollError> {
        let s = self.state.lock().unwrap();
        Ok(s.3.get(&(shelf.dir(), name.to_string())).cloned())
    }
    fn put_entry(&self, shelf: Shelf, name: &str, bytes: &[u8]) -> Result<(), EnrollError> {
        let mut s = self.state.lock().unwrap();
        s.3.insert((shelf.dir(), name.to_string()), bytes.to_vec());
        Ok(())
    }
    fn entries_on(&self, shelf: Shelf) -> Result<Vec<(String, Vec<u8>)>, EnrollError> {
        let s = self.state.lock().unwrap();
        Ok(s.3
            .iter()
            .filter(|((d, _), _)| *d == shelf.dir())
            .map(|((_, n), b)| (n.clone(), b.clone()))
            .collect())
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::try_from(s).unwrap()
}

/// The same story on every implementation: a token enrolls once and records the device,
/// a refused one stays usable and records nothing, a bound one re-enrolls its device,
/// a stale version claims nothing, nonsense ids name no file.
fn tokens_are_used_once(book: &dyn Enrollments) {
    let ca = "a".repeat(64);
    let t = issue(book, &ca, 1000, 500, None, Labels::new()).unwrap();
    let e = claim(book, &t.id, &"0".repeat(32), &id("d"), "C0", 1001).unwrap_err();
    assert!(matches!(e, EnrollError::Refused(_)), "{e}");
    assert!(e.to_string().contains("wrong secret"), "{e}");
    assert_eq!(book.enrolled_cert(&id("d")).unwrap(), None);
    claim(book, &t.id, t.secret(), &id("d"), "C1", 1001).unwrap();
    assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C1"));
    assert_eq!(book.enrolled_cert(&id("e")).unwrap(), None);
    let e = claim(book, &t.id, t.secret(), &id("x"), "C", 1002).unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");
    let e = claim(book, "0123456789abcdef", t.secret(), &id("x"), "C", 1002).unwrap_err();
    assert!(e.to_string().contains("no such token"), "{e}");
    // An unbound token cannot take over an enrolled id; one bound to it can.
    let u = issue(book, &ca, 1000, 500, None, Labels::new()).unwrap();
    let e = claim(book, &u.id, u.secret(), &id("d"), "C", 1001).unwrap_err();
    assert!(e.to_string().contains("enrolled already"), "{e}");
    let labels: Labels = [("role".to_string(), "vault".to_string())].into();
    let b = issue(book, &ca, 1000, 500, Some(&id("d")), labels.clone()).unwrap();
    let grant = claim(book, &b.id, b.secret(), &id("d"), "C2", 1001).unwrap();
    assert_eq!(
        (&grant.token, &grant.labels, grant.fresh),
        (&b.id, &labels, false)
    );
    // The book keeps what it granted, with the claim; the used record does too.
    assert_eq!(book.grant(&id("d")).unwrap(), Some(grant.clone()));
    assert!(book.grants().unwrap().contains(&(id("d"), grant)));
    assert_eq!(book.token(&b.id).unwrap().unwrap().0.labels(), &labels);
    assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C2"));
    // A renewal replaces the record; adopting does not.
    book.record(&id("d"), "C3").unwrap();
    assert!(!book.adopt_record(&id("d"), "C4").unwrap());
    assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C3"));
    // A claim against a version read before another one changed nothing; neither does
    // a fresh claim for an id that got enrolled meanwhile.
    let (rec, v) = book.token(&u.id).unwrap().unwrap();
    let used = rec.clone().used("e", 1001);
    let fresh = Grant {
        token: u.id.clone(),
        labels: Labels::new(),
        fresh: true,
    };
    assert!(!book
        .claim_token(&u.id, v, &used, &id("d"), "C", &fresh)
        .unwrap());
    assert!(book
        .claim_token(&u.id, v, &used, &id("e"), "C5", &fresh)
        .unwrap());
    assert!(!book
        .claim_token(&u.id, v, &used, &id("f"), "C", &fresh)
        .unwrap());
    assert_eq!(book.enrolled_cert(&id("f")).unwrap(), None);
    let e = claim(book, "../../etc/passwd", t.secret(), &id("d"), "C", 1000).unwrap_err();
    assert!(e.to_string().contains("no such token"), "{e}");
}

#[test]
fn files_use_a_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path());
    tokens_are_used_once(&files);
    // Used tokens stay as records of who used them; no temporary files are left.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("tokens"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".used")), "{names:?}");
    assert_eq!(names.len(), 3, "{names:?}");
    let devices = std::fs::read_dir(dir.path().join("devices"))
        .unwrap()
        .count();
    assert_eq!(devices, 2, "d and e, no temporary files");
}

#[test]
fn the_fake_uses_a_token_once() {
    tokens_are_used_once(&Fake::default());
}

#[test]
fn a_hub_moving_to_another_store_keeps_its_devices_and_unused_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path());
    let t = issue(&files, &"a".repeat(64), 1000, 500, None, Labels::new()).unwrap();
    let used = issue(&files, &"a".repeat(64), 1000, 500, None, Labels::new()).unwrap();
    claim(&files, &used.id, used.secret(), &id("d"), "C1", 1001).unwrap();
    let book = Fake::default();
    book.record(&id("e"), "theirs").unwrap();
    files.record(&id("e"), "ours").unwrap();
    assert_eq!(adopt_files(&files, &book).unwrap(), 2, "d's record and t");
    assert_eq!(adopt_files(&files, &book).unwrap(), 0, "once");
    assert_eq!(book.enrolled_cert(&id("d")).unwrap().as_deref(), Some("C1"));
    assert_eq!(
        book.enrolled_cert(&id("e")).unwrap().as_deref(),
        Some("theirs")
    );
    claim(&book, &t.id, t.secret(), &id("f"), "C2", 1001).unwrap();
    assert!(book.token(&used.id).unwrap().is_none());
}

/// Four threads, one token (or four unbound tokens, one new id): one enrollment wins.
fn one_of_racing_claims_wins(book: &(dyn Enrollments + Sync), rounds: usize) {
    for round in 0..rounds {
        let same_token = round % 2 == 0;
        let tokens: Vec<JoinToken> = (0..4)
            .map(|_| issue(book, &"a".repeat(64), 1000, 60_000, None, Labels::new()).unwrap())
            .collect();
        let start = std::sync::Barrier::new(4);
        let wins: Vec<bool> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..4)
                .map(|i| {
                    let (t, start) = (&tokens[if same_token { 0 } else { i }], &start);
                    let device = if same_token {
                        id(&format!("r{round}-d{i}"))
                    } else {
                        id(&format!("r{round}"))
                    };
                    s.spawn(move || {
                        start.wait();
                        match claim(book, &t.id, t.secret(), &device, "C", 1001) {
                            Ok(_) => true,
                            Err(EnrollError::Refused(_)) => false,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won = wins.iter().filter(|w| **w).count();
        assert_eq!(won, 1, "round {round} (same token: {same_token}): {wins:?}");
    }
}

#[test]
fn of_claims_racing_on_files_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    one_of_racing_claims_wins(&Files::new(dir.path()), 20);
}

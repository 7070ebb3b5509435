//! Join tokens and enrollment records in etcd, shared by hub replicas.

use super::client::Op;
use super::EtcdStore;
use crate::enrollment::EnrollError;
use shoal_api::model::ids::DeviceId;

/// Join tokens and enrollment records shared by hub replicas (see [`crate::enrollment`]):
/// `{prefix}.enroll/tokens/{id}` and `{prefix}.enroll/devices/{id}`, beside the state (not
/// under it: the state's loads and the standbys' watch leave them alone). Written by any
/// replica, unfenced; a claim is one transaction guarded by the token's modification
/// revision and, for an unbound token, the device record's absence. Use a connection of
/// its own.
impl crate::enrollment::Enrollments for EtcdStore {
    fn token(
        &self,
        id: &str,
    ) -> Result<Option<(shoal_pki::token::TokenRecord, crate::enrollment::Version)>, EnrollError>
    {
        let key = self.enroll_key("tokens", id);
        match self.get(&key)? {
            None => Ok(None),
            Some((bytes, rev)) => Ok(Some((
                shoal_pki::token::TokenRecord::from_json(&bytes, &key)?,
                rev,
            ))),
        }
    }

    fn create_token(
        &self,
        id: &str,
        record: &shoal_pki::token::TokenRecord,
    ) -> Result<bool, EnrollError> {
        let key = self.enroll_key("tokens", id);
        Ok(self.cas(vec![(key.clone(), 0)], vec![(key, record.to_json())])?)
    }

    fn claim_token(
        &self,
        id: &str,
        expected: crate::enrollment::Version,
        used: &shoal_pki::token::TokenRecord,
        device: &DeviceId,
        cert_pem: &str,
        grant: &shoal_api::model::labels::Grant,
    ) -> Result<bool, EnrollError> {
        let (token, record) = (
            self.enroll_key("tokens", id),
            self.enroll_key("devices", device.as_str()),
        );
        let mut guards = vec![(token.clone(), expected)];
        if grant.fresh {
            guards.push((record.clone(), 0));
        }
        let puts = vec![
            (token, used.to_json()),
            (record, cert_pem.into()),
            (
                self.enroll_key("grants", device.as_str()),
                crate::enrollment::grant_json(grant),
            ),
        ];
        Ok(self.cas(guards, puts)?)
    }

    fn grant(
        &self,
        device: &DeviceId,
    ) -> Result<Option<shoal_api::model::labels::Grant>, EnrollError> {
        let key = self.enroll_key("grants", device.as_str());
        match self.get(&key)? {
            Some((bytes, _)) => crate::enrollment::parse_grant(&bytes, &key).map(Some),
            None => Ok(None),
        }
    }

    fn grants(&self) -> Result<Vec<(DeviceId, shoal_api::model::labels::Grant)>, EnrollError> {
        let under = self.enroll_key("grants", "");
        let mut out = Vec::new();
        for (key, bytes) in self.entries(&under)? {
            let Some(device) = key
                .strip_prefix(&under)
                .and_then(|d| DeviceId::try_from(d).ok())
            else {
                continue;
            };
            out.push((device, crate::enrollment::parse_grant(&bytes, &key)?));
        }
        Ok(out)
    }

    fn record(&self, device: &DeviceId, cert_pem: &str) -> Result<(), EnrollError> {
        let op = Op::Put(self.enroll_key("devices", device.as_str()), cert_pem.into());
        self.put_now(op)
            .map_err(|e| EnrollError::Store(self.fail(e)))
    }

    fn renew_record(
        &self,
        device: &DeviceId,
        expected: &str,
        cert_pem: &str,
    ) -> Result<bool, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        match self.get(&key)? {
            Some((bytes, rev)) if bytes == expected.as_bytes() => {
                Ok(self.cas(vec![(key.clone(), rev)], vec![(key, cert_pem.into())])?)
            }
            _ => Ok(false),
        }
    }

    fn adopt_record(&self, device: &DeviceId, cert_pem: &str) -> Result<bool, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        Ok(self.cas(vec![(key.clone(), 0)], vec![(key, cert_pem.into())])?)
    }

    fn enrolled_cert(&self, device: &DeviceId) -> Result<Option<String>, EnrollError> {
        let key = self.enroll_key("devices", device.as_str());
        Ok(self
            .get(&key)?
            .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn entry(
        &self,
        shelf: crate::enrollment::Shelf,
        name: &str,
    ) -> Result<Option<Vec<u8>>, EnrollError> {
        Ok(self
            .get(&self.enroll_key(shelf.dir(), name))?
            .map(|(b, _)| b))
    }

    fn put_entry(
        &self,
        shelf: crate::enrollment::Shelf,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), EnrollError> {
        let op = Op::Put(self.enroll_key(shelf.dir(), name), bytes.to_vec());
        self.put_now(op)
            .map_err(|e| EnrollError::Store(self.fail(e)))
    }

    fn entries_on(
        &self,
        shelf: crate::enrollment::Shelf,
    ) -> Result<Vec<(String, Vec<u8>)>, EnrollError> {
        let under = self.enroll_key(shelf.dir(), "");
        Ok(self
            .entries(&under)?
            .into_iter()
            .filter_map(|(k, b)| k.strip_prefix(&under).map(|n| (n.to_string(), b)))
            .collect())
    }
}

impl EtcdStore {
    fn enroll_key(&self, kind: &str, name: &str) -> String {
        format!("{}.enroll/{kind}/{name}", self.url.prefix)
    }
}

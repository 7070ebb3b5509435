//! Modules shared by hub replicas, chunked beside the state.

use super::client::{Cmd, EtcdFault, Op};
use super::EtcdStore;
use crate::blobs::SharedBlobError;

/// Bytes per blob chunk: etcd takes requests of up to 1.5 MiB by default.
const BLOB_CHUNK: usize = 1 << 20;

/// Blobs shared by hub replicas, beside the state (not under it: loading the state must not
/// read every module): `{prefix}.blobs/{hex}/{chunk}` (zero-padded, in order) and, written
/// last, `{prefix}.blobs/{hex}` holding the number of chunks. Use a connection of its own,
/// so that large uploads do not hold up the state's flushes.
impl crate::blobs::SharedBlobs for EtcdStore {
    fn put(&self, d: &shoal_api::model::ids::Digest, bytes: &[u8]) -> Result<(), SharedBlobError> {
        let marker = format!("{}.blobs/{}", self.url.prefix, d.hex());
        if self.get_blob(&marker)?.is_some() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = bytes.chunks(BLOB_CHUNK).collect();
        for (i, c) in chunks.iter().enumerate() {
            self.put_now(Op::Put(format!("{marker}/{i:05}"), c.to_vec()))?;
        }
        Ok(self.put_now(Op::Put(marker, chunks.len().to_string().into_bytes()))?)
    }

    fn get(&self, d: &shoal_api::model::ids::Digest) -> Result<Option<Vec<u8>>, SharedBlobError> {
        Ok(self.get_blob(&format!("{}.blobs/{}", self.url.prefix, d.hex()))?)
    }
}

impl EtcdStore {
    /// The blob whose marker key is `marker`, if it was completely written.
    fn get_blob(&self, marker: &str) -> Result<Option<Vec<u8>>, EtcdFault> {
        let entries = self
            .ask(|reply| Cmd::Load(marker.to_string(), reply))
            .map_err(|_| EtcdFault::Stopped)??;
        let Some(count) = entries
            .iter()
            .find(|(k, _)| k == marker)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        let chunk_prefix = format!("{marker}/");
        let chunks: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(k, _)| k.starts_with(&chunk_prefix))
            .map(|(_, v)| v)
            .collect();
        if chunks.len() != count {
            return Err(EtcdFault::Incomplete {
                marker: marker.to_string(),
                have: chunks.len(),
                count,
            });
        }
        Ok(Some(chunks.into_iter().flatten().copied().collect()))
    }
}

//! Which store the hub keeps its state in (`--store`): sled, or etcd for hub replicas. Here,
//! not in `store/`: choosing names the adapters, and the etcd adapter implements the store's
//! port (so the port does not name its adapter).

use crate::store::{SledStore, Store, StoreError};
use std::path::Path;

/// Where the hub keeps its state (`--store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreChoice {
    /// sled in `DATA_DIR/hub.db`.
    #[default]
    Sled,
    Etcd(crate::etcd::EtcdUrl),
}

impl std::str::FromStr for StoreChoice {
    type Err = crate::etcd::BadStoreUrl;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "sled" {
            return Ok(StoreChoice::Sled);
        }
        if s.starts_with("etcd://") || s.starts_with("etcds://") {
            return s.parse().map(StoreChoice::Etcd);
        }
        Err(crate::etcd::BadStoreUrl {
            what: "store",
            url: s.to_string(),
            reason: "expected sled or etcds://HOST:PORT[,HOST:PORT…][/PREFIX]?ca=FILE…".into(),
        })
    }
}

impl StoreChoice {
    /// Opens the store (`data_dir` holds sled's database).
    pub fn open(&self, data_dir: &Path) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreChoice::Sled => Box::new(SledStore::open(data_dir)?),
            StoreChoice::Etcd(url) => Box::new(crate::etcd::EtcdStore::connect(url)?),
        })
    }
}

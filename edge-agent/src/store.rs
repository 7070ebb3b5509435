//! Durable agent state behind the [`Store`] trait: the last accepted desired state, which
//! hardware node each replica holds (a container keeps its nodes across an agent restart),
//! and the results of job runs (a finished run is never run again, whatever restarts).
//!
//! The agent saves (and flushes) a desired state *before* acting on it, so that after a crash
//! or a reboot with no hub in sight it restarts exactly the workloads it was told to run.
//! [`SledStore`] is the real implementation; [`MemStore`] is a fake for tests.

use shoal_api::wire::messages::DesiredState;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open agent database at {path:?}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("agent database error: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt desired state in agent database: {0}")]
    Corrupt(serde_json::Error),
    #[error("cannot encode desired state: {0}")]
    Encode(serde_json::Error),
}

pub trait Store: Send + 'static {
    fn load_desired(&self) -> Result<Option<DesiredState>, StoreError>;
    /// Saves durably: when this returns `Ok`, the state survives a crash.
    fn save_desired(&self, d: &DesiredState) -> Result<(), StoreError>;
    /// The hardware nodes each replica holds (by instance), as last saved.
    fn load_hardware(&self) -> Result<Holdings, StoreError>;
    /// Saves durably, before a replica is started with what it was given.
    fn save_hardware(&self, h: &Holdings) -> Result<(), StoreError>;
    /// The results of the job runs that finished here, as last saved.
    fn load_runs(&self) -> Result<Runs, StoreError>;
    /// Saves durably, before a run's result is reported.
    fn save_runs(&self, r: &Runs) -> Result<(), StoreError>;
    /// Each scheduled replica's state (`spec.schedule`), as last saved.
    fn load_schedules(&self) -> Result<Schedules, StoreError>;
    /// Saves durably, before a scheduled run starts.
    fn save_schedules(&self, s: &Schedules) -> Result<(), StoreError>;
}

/// What [`Store::save_schedules`] keeps: instance → its schedule's state.
pub type Schedules = BTreeMap<String, crate::core::schedule::ScheduleState>;

/// What [`Store::save_runs`] keeps: instance → the final status of its run (which names the
/// revision and run number it is the result of).
pub type Runs = BTreeMap<String, shoal_api::wire::messages::InstanceStatus>;

/// What [`Store::save_hardware`] keeps: instance → its nodes per class.
pub type Holdings = BTreeMap<String, crate::core::hardware::Grant>;

const DESIRED_KEY: &[u8] = b"desired";
const HARDWARE_KEY: &[u8] = b"hardware";
const RUNS_KEY: &[u8] = b"runs";
const SCHEDULES_KEY: &[u8] = b"schedules";

pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("agent.db");
        // One small key lives here: a small page cache keeps the agent's footprint down.
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(1 << 20)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self { db })
    }
}

impl Store for SledStore {
    fn load_desired(&self) -> Result<Option<DesiredState>, StoreError> {
        match self.db.get(DESIRED_KEY)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(StoreError::Corrupt),
        }
    }
    fn save_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        let v = serde_json::to_vec(d).map_err(StoreError::Encode)?;
        self.db.insert(DESIRED_KEY, v)?;
        self.db.flush()?;
        Ok(())
    }
    fn load_hardware(&self) -> Result<Holdings, StoreError> {
        match self.db.get(HARDWARE_KEY)? {
            None => Ok(Holdings::new()),
            Some(v) => serde_json::from_slice(&v).map_err(StoreError::Corrupt),
        }
    }
    fn save_hardware(&self, h: &Holdings) -> Result<(), StoreError> {
        let v = serde_json::to_vec(h).map_err(StoreError::Encode)?;
        self.db.insert(HARDWARE_KEY, v)?;
        self.db.flush()?;
        Ok(())
    }
    fn load_runs(&self) -> Result<Runs, StoreError> {
        match self.db.get(RUNS_KEY)? {
            None => Ok(Runs::new()),
            Some(v) => serde_json::from_slice(&v).map_err(StoreError::Corrupt),
        }
    }
    fn save_runs(&self, r: &Runs) -> Result<(), StoreError> {
        let v = serde_json::to_vec(r).map_err(StoreError::Encode)?;
        self.db.insert(RUNS_KEY, v)?;
        self.db.flush()?;
        Ok(())
    }
    fn load_schedules(&self) -> Result<Schedules, StoreError> {
        match self.db.get(SCHEDULES_KEY)? {
            None => Ok(Schedules::new()),
            Some(v) => serde_json::from_slice(&v).map_err(StoreError::Corrupt),
        }
    }
    fn save_schedules(&self, s: &Schedules) -> Result<(), StoreError> {
        let v = serde_json::to_vec(s).map_err(StoreError::Encode)?;
        self.db.insert(SCHEDULES_KEY, v)?;
        self.db.flush()?;
        Ok(())
    }
}

/// A store shared (a test keeps a handle on the one it hands over).
impl<S: Store + Sync> Store for std::sync::Arc<S> {
    fn load_desired(&self) -> Result<Option<DesiredState>, StoreError> {
        self.as_ref().load_desired()
    }
    fn save_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        self.as_ref().save_desired(d)
    }
    fn load_hardware(&self) -> Result<Holdings, StoreError> {
        self.as_ref().load_hardware()
    }
    fn save_hardware(&self, h: &Holdings) -> Result<(), StoreError> {
        self.as_ref().save_hardware(h)
    }
    fn load_runs(&self) -> Result<Runs, StoreError> {
        self.as_ref().load_runs()
    }
    fn save_runs(&self, r: &Runs) -> Result<(), StoreError> {
        self.as_ref().save_runs(r)
    }
    fn load_schedules(&self) -> Result<Schedules, StoreError> {
        self.as_ref().load_schedules()
    }
    fn save_schedules(&self, s: &Schedules) -> Result<(), StoreError> {
        self.as_ref().save_schedules(s)
    }
}

#[derive(Default)]
pub struct MemStore {
    desired: Mutex<Option<DesiredState>>,
    hardware: Mutex<Holdings>,
    runs: Mutex<Runs>,
    schedules: Mutex<Schedules>,
}

impl Store for MemStore {
    fn load_desired(&self) -> Result<Option<DesiredState>, StoreError> {
        Ok(self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    fn save_desired(&self, d: &DesiredState) -> Result<(), StoreError> {
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        Ok(())
    }
    fn load_hardware(&self) -> Result<Holdings, StoreError> {
        Ok(self
            .hardware
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    fn save_hardware(&self, h: &Holdings) -> Result<(), StoreError> {
        *self.hardware.lock().unwrap_or_else(|p| p.into_inner()) = h.clone();
        Ok(())
    }
    fn load_runs(&self) -> Result<Runs, StoreError> {
        Ok(self.runs.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save_runs(&self, r: &Runs) -> Result<(), StoreError> {
        *self.runs.lock().unwrap_or_else(|p| p.into_inner()) = r.clone();
        Ok(())
    }
    fn load_schedules(&self) -> Result<Schedules, StoreError> {
        Ok(self
            .schedules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    fn save_schedules(&self, s: &Schedules) -> Result<(), StoreError> {
        *self.schedules.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let d = DesiredState {
            protocol: 1,
            device_id: "e1".parse().unwrap(),
            generation: 3,
            artifact_base: "http://h".into(),
            artifact_port: None,
            workloads: vec![],
            secrets: vec![],
        };
        SledStore::open(dir.path())
            .unwrap()
            .save_desired(&d)
            .unwrap();
        // sled's flusher thread may hold the file lock a moment after the drop.
        let again = (0..100)
            .find_map(|_| {
                SledStore::open(dir.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .unwrap();
        assert_eq!(again.load_desired().unwrap(), Some(d));
    }
}

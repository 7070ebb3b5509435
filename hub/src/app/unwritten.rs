//! The fleet's writes on their way into the store. A write the store refuses stays queued,
//! with every later one, until a later commit gets them all in, in order: the fleet's
//! memory is then ahead of the store, and `MainLoop::commit` publishes nothing until the
//! store has caught up.

use crate::fleet::changes::Write;
use crate::store::{Store, StoreError};
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub(super) struct Unwritten(VecDeque<Write>);

impl Unwritten {
    /// Queues `writes` behind those still waiting and writes the queue to `store`, oldest
    /// first; stops at the first write the store refuses.
    pub(super) fn write(
        &mut self,
        writes: Vec<Write>,
        store: &impl Store,
    ) -> Result<(), StoreError> {
        self.0.extend(writes);
        while let Some(w) = self.0.front() {
            store.write(w)?;
            self.0.pop_front();
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::store::{MemStore, Snapshot};
    use shoal_api::ids::SecretName;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A `MemStore` that refuses its `fail_at`-th write (counting from 0), once.
    struct Flaky {
        inner: MemStore,
        seen: AtomicUsize,
        fail_at: usize,
    }

    impl Store for Flaky {
        fn load(&self) -> Result<Snapshot, StoreError> {
            self.inner.load()
        }
        fn write(&self, w: &Write) -> Result<(), StoreError> {
            if self.seen.fetch_add(1, Ordering::SeqCst) == self.fail_at {
                return Err(StoreError::Db("disk full".into()));
            }
            self.inner.write(w)
        }
        fn put_workload(&self, w: &shoal_api::workload::Workload) -> Result<(), StoreError> {
            self.inner.put_workload(w)
        }
        fn delete_workload(&self, n: &shoal_api::ids::WorkloadName) -> Result<(), StoreError> {
            self.inner.delete_workload(n)
        }
        fn put_device(&self, d: &crate::store::DeviceRecord) -> Result<(), StoreError> {
            self.inner.put_device(d)
        }
        fn put_assignments(
            &self,
            a: &crate::fleet::scheduler::Assignments,
        ) -> Result<(), StoreError> {
            self.inner.put_assignments(a)
        }
        fn put_desired(&self, d: &shoal_api::messages::DesiredState) -> Result<(), StoreError> {
            self.inner.put_desired(d)
        }
        fn put_rollout(
            &self,
            n: &shoal_api::ids::WorkloadName,
            r: Option<&crate::fleet::rollout::Record>,
        ) -> Result<(), StoreError> {
            self.inner.put_rollout(n, r)
        }
        fn put_secret(
            &self,
            n: &SecretName,
            s: Option<&crate::store::StoredSecret>,
        ) -> Result<(), StoreError> {
            self.inner.put_secret(n, s)
        }
        fn put_labels_owned(&self) -> Result<(), StoreError> {
            self.inner.put_labels_owned()
        }
        fn put_audit(&self, e: &shoal_api::operator::AuditEntry) -> Result<(), StoreError> {
            self.inner.put_audit(e)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn secret(name: &str, version: &str) -> Write {
        let name = SecretName::try_from(name).unwrap();
        Write::Secret(
            name.clone(),
            Some(crate::store::StoredSecret {
                name,
                keys: vec!["k".into()],
                version: version.into(),
                encrypted: String::new(),
                updated_ms: 0,
            }),
        )
    }

    fn versions(store: &Flaky) -> Vec<(String, String)> {
        store
            .load()
            .unwrap()
            .secrets
            .values()
            .map(|s| (s.name.to_string(), s.version.clone()))
            .collect()
    }

    #[test]
    fn a_refused_write_is_kept_with_every_later_one_and_written_in_order() {
        let store = Flaky {
            inner: MemStore::default(),
            seen: AtomicUsize::new(0),
            fail_at: 1,
        };
        let mut q = Unwritten::default();
        // The second write is refused: the first is in, the second and third wait.
        let first = vec![secret("a", "1"), secret("b", "1"), secret("a", "2")];
        assert!(q.write(first, &store).is_err());
        assert_eq!(q.0.len(), 2);
        assert_eq!(versions(&store), [("a".into(), "1".into())]);
        // The next commit writes what waited before what is new, so "a" ends at 3, not 2.
        q.write(vec![secret("a", "3")], &store).unwrap();
        assert!(q.0.is_empty());
        assert_eq!(
            versions(&store),
            [("a".into(), "3".into()), ("b".into(), "1".into())]
        );
    }
}

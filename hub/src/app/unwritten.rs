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
    use crate::app::tests::TestStore;
    use shoal_api::model::ids::SecretName;

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
                earlier: Vec::new(),
            }),
        )
    }

    fn versions(store: &TestStore) -> Vec<(String, String)> {
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
        let store = TestStore::refusing_write(1);
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

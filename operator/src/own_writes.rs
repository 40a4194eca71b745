//! The plans this replica wrote that its cache has not seen yet.
//!
//! A reflector lags its own writes: by milliseconds, and under load by
//! hundreds of them. A pass in that gap sees no plan where one was just
//! created and computes a creation again, and a creation is the one write
//! server-side apply cannot fence with a resourceVersion. Delivered late (a
//! stalled network, a new leader meanwhile), it would overwrite the new
//! leader's plan. So each written plan is kept, with the version the cache
//! held when it was written, and overlays the cache until the cache moves
//! past that version.

use std::collections::BTreeMap;
use std::sync::Arc;

use egressguard_crds::NodeShaping;
use kube::ResourceExt;

/// Plans written by this replica, by node, with the cache's version of each
/// at the time of the write (`None`: the cache had none).
#[derive(Debug, Default)]
pub struct OwnWrites(BTreeMap<String, (Option<String>, Arc<NodeShaping>)>);

impl OwnWrites {
    /// Records a plan the API server stored, as it returned it.
    pub fn wrote(&mut self, cached: Option<String>, stored: NodeShaping) {
        self.0.insert(stored.name_any(), (cached, Arc::new(stored)));
    }

    /// Forgets a node's plan: deleted, or a write was refused (this view was stale).
    pub fn forget(&mut self, node: &str) {
        self.0.remove(node);
    }

    /// Puts the writes the cache has not caught up with over `cache`, and
    /// forgets those it has: once the cache's version of a plan differs from
    /// the one it had at the write, it holds that write or something newer
    /// (events of one object arrive in order, and the write was fenced).
    pub fn overlay(&mut self, cache: &mut BTreeMap<String, Arc<NodeShaping>>) {
        self.0.retain(|node, (cached, stored)| {
            let now = cache.get(node).and_then(|s| s.resource_version());
            if now != *cached {
                return false;
            }
            cache.insert(node.clone(), stored.clone());
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::removal;

    fn plan(node: &str, rv: &str, enforce: bool) -> NodeShaping {
        let mut ns = NodeShaping::new(
            node,
            egressguard_crds::node_shaping::NodeShapingSpec {
                enforce,
                ..removal(node)
            },
        );
        ns.metadata.resource_version = Some(rv.into());
        ns
    }

    fn view(cache: &[NodeShaping], own: &mut OwnWrites) -> Vec<(String, String, bool)> {
        let mut m: BTreeMap<String, Arc<NodeShaping>> = cache
            .iter()
            .map(|s| (s.name_any(), Arc::new(s.clone())))
            .collect();
        own.overlay(&mut m);
        m.values()
            .map(|s| {
                (
                    s.name_any(),
                    s.resource_version().unwrap_or_default(),
                    s.spec.enforce,
                )
            })
            .collect()
    }

    #[test]
    fn own_writes_cover_the_caches_lag_and_no_longer() {
        let mut own = OwnWrites::default();
        // Created; the cache has not seen it: the pass sees the plan, not a gap
        // (which would make it compute an unfenced creation again).
        own.wrote(None, plan("a", "10", true));
        assert_eq!(view(&[], &mut own), [("a".into(), "10".into(), true)]);
        // The cache caught up: it is the cache's again.
        assert_eq!(
            view(&[plan("a", "10", true)], &mut own),
            [("a".into(), "10".into(), true)]
        );
        assert!(own.0.is_empty());
        // Updated from version 10 while the cache still shows 10: ours (11) wins.
        own.wrote(Some("10".into()), plan("a", "11", false));
        assert_eq!(
            view(&[plan("a", "10", true)], &mut own),
            [("a".into(), "11".into(), false)]
        );
        // The cache moved past 10 (the agent's status write, say, at 12): the
        // cache is newer than anything we hold.
        assert_eq!(
            view(&[plan("a", "12", false)], &mut own),
            [("a".into(), "12".into(), false)]
        );
        assert!(own.0.is_empty());
        // A refused write forgets: the next pass trusts the cache.
        own.wrote(Some("12".into()), plan("a", "13", true));
        own.forget("a");
        assert_eq!(
            view(&[plan("a", "12", false)], &mut own),
            [("a".into(), "12".into(), false)]
        );
    }
}

//! Guards and CIDRGroups parsed once per change, not once per pass. A pass
//! reads the index; only an object whose generation moved (or that is new)
//! is validated again, so a 50,000-entry group is parsed when someone edits
//! it, not every few seconds, the way linkerd2's policy controller indexes
//! resources as they change.

use std::collections::BTreeMap;
use std::sync::Arc;

use egressguard_crds::quarantine::{rules, QuarantineRules};
use egressguard_crds::validate::{validate, ValidSpec, ValidationErrors};
use egressguard_crds::{CIDRGroup, EgressGuard};
use kube::ResourceExt;

/// What the operator knows about one CIDRGroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFacts {
    /// Its labels (selectors match them).
    pub labels: BTreeMap<String, String>,
    /// Its content digest, or why its content is invalid.
    pub digest: Result<String, ValidationErrors>,
    /// Its entries, parsed once (empty when invalid): a group matched by
    /// label must not widen the guards that select the label.
    pub entries: Arc<[ipnet::IpNet]>,
}

impl GroupFacts {
    /// Facts of a group object.
    pub fn of(g: &egressguard_crds::CIDRGroup) -> GroupFacts {
        let (digest, entries) = match g.spec.validate() {
            Ok(nets) => (Ok(g.spec.digest()), nets.into()),
            Err(e) => (Err(e), Vec::new().into()),
        };
        GroupFacts {
            labels: g.metadata.labels.clone().unwrap_or_default(),
            digest,
            entries,
        }
    }
}

/// A guard as the shared validation found it.
#[derive(Clone, Debug)]
pub struct ParsedGuard {
    /// The validated spec, or every problem in words.
    pub valid: Arc<Result<ValidSpec, ValidationErrors>>,
    /// Its quarantine rules, when it is valid and has a policy.
    pub rules: Option<QuarantineRules>,
}

impl ParsedGuard {
    /// Parses `g` (what the index does once per generation).
    pub fn of(g: &EgressGuard) -> ParsedGuard {
        let valid = validate(&g.spec);
        let rules = valid.as_ref().ok().and_then(|_| {
            rules(g.spec.quarantine.as_ref(), g.spec.mode)
                .ok()
                .flatten()
        });
        ParsedGuard {
            valid: Arc::new(valid),
            rules,
        }
    }
}

/// What an object's parse depends on: its identity and generation.
type Key = (String, Option<i64>);

fn key<K: kube::Resource>(o: &K) -> Key {
    (
        o.meta().uid.clone().unwrap_or_default(),
        o.meta().generation,
    )
}

/// The parsed guards and groups, by name.
#[derive(Debug, Default)]
pub struct Index {
    guards: BTreeMap<String, (Key, ParsedGuard)>,
    groups: BTreeMap<String, (Key, GroupFacts)>,
    /// Objects parsed since the start (a metric: it grows with edits, not
    /// with passes).
    pub parses: u64,
}

impl Index {
    /// Brings the guards up to `guards` (parsing the new and changed ones,
    /// forgetting the gone) and returns them by name.
    pub fn guards(&mut self, guards: &[Arc<EgressGuard>]) -> BTreeMap<String, ParsedGuard> {
        let mut fresh = BTreeMap::new();
        for g in guards {
            let (name, k) = (g.name_any(), key(&**g));
            let parsed = match self.guards.remove(&name) {
                Some((was, p)) if was == k => p,
                _ => {
                    self.parses += 1;
                    ParsedGuard::of(g)
                }
            };
            fresh.insert(name, (k, parsed));
        }
        self.guards = fresh;
        self.guards
            .iter()
            .map(|(n, (_, p))| (n.clone(), p.clone()))
            .collect()
    }

    /// Brings the groups up to `groups` and returns their facts by name.
    /// Labels are read every time (a relabel does not move the generation);
    /// the list is parsed only when the generation moves.
    pub fn groups(&mut self, groups: &[Arc<CIDRGroup>]) -> BTreeMap<String, GroupFacts> {
        let mut fresh = BTreeMap::new();
        for g in groups {
            let (name, k) = (g.name_any(), key(&**g));
            let mut facts = match self.groups.remove(&name) {
                Some((was, f)) if was == k => f,
                _ => {
                    self.parses += 1;
                    GroupFacts::of(g)
                }
            };
            facts.labels = g.metadata.labels.clone().unwrap_or_default();
            fresh.insert(name, (k, facts));
        }
        self.groups = fresh;
        self.groups
            .iter()
            .map(|(n, (_, f))| (n.clone(), f.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::CidrGroupSpec;

    fn guard(generation: i64, rate: &str) -> Arc<EgressGuard> {
        let mut g = egressguard_crds::load::parse_str(&format!(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: idc}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: {rate}, destinations: [{{port: 443}}]}}\n"
        ))
        .expect("guard")
        .remove(0);
        g.metadata.uid = Some("u1".into());
        g.metadata.generation = Some(generation);
        Arc::new(g)
    }

    fn group(generation: i64, cidrs: &[&str], label: &str) -> Arc<CIDRGroup> {
        let mut g = CIDRGroup::new(
            "partners",
            CidrGroupSpec {
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            },
        );
        g.metadata.uid = Some("g1".into());
        g.metadata.generation = Some(generation);
        g.metadata.labels = Some([("tier".to_string(), label.to_string())].into());
        Arc::new(g)
    }

    #[test]
    fn objects_are_parsed_once_per_generation_and_labels_read_every_time() {
        let mut ix = Index::default();
        let g1 = guard(1, "1Mbit");
        assert!(ix.guards(std::slice::from_ref(&g1))["idc"].valid.is_ok());
        ix.guards(std::slice::from_ref(&g1));
        assert_eq!(ix.parses, 1, "an unchanged guard is not parsed again");
        // An edit the validation refuses: parsed, and the verdict changes.
        let bad = guard(2, "30Mbit");
        assert!(ix.guards(&[bad])["idc"].valid.is_err());
        assert_eq!(ix.parses, 2);
        // Deleted: forgotten.
        assert!(ix.guards(&[]).is_empty());

        let a = group(1, &["198.51.100.0/24"], "gold");
        let facts = ix.groups(std::slice::from_ref(&a));
        assert_eq!(facts["partners"].entries.len(), 1);
        assert_eq!(ix.parses, 3);
        // Relabelled (same generation): the new labels, no new parse.
        let relabelled = group(1, &["198.51.100.0/24"], "silver");
        let facts = ix.groups(&[relabelled]);
        assert_eq!(facts["partners"].labels["tier"], "silver");
        assert_eq!(ix.parses, 3);
        let edited = group(2, &["198.51.100.0/24", "192.0.2.0/24"], "silver");
        assert_eq!(ix.groups(&[edited])["partners"].entries.len(), 2);
        assert_eq!(ix.parses, 4);
    }
}

//! A CIDRGroup's status: whether its list is valid, as the operator's
//! validation (the same the agents run) found it. Pure; `run.rs` writes it.

use egressguard_crds::conditions::{condition, group, types, Progress};
use egressguard_crds::{CIDRGroup, CidrGroupStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::decide::GroupFacts;

/// Longest message of a group's conditions: an invalid 50,000-entry list
/// names its problems, and the first ones are enough to find the rest.
const MAX_MESSAGE: usize = 1024;

/// The status `g` should have, when it differs from the stored one.
pub fn group_status(g: &CIDRGroup, facts: &GroupFacts, now: Timestamp) -> Option<CidrGroupStatus> {
    let gen = g.metadata.generation;
    let before = g.status.clone().unwrap_or_default();
    let previous = before.conditions.as_slice();
    let at = || Time(now);
    let cond = |type_: &str, ok: bool, reason: &str, message: &str| -> Condition {
        let message = egressguard_crds::conditions::bounded(message, MAX_MESSAGE);
        condition(type_, ok, reason, message, gen, previous, at)
    };
    let status = match &facts.digest {
        Ok(digest) => CidrGroupStatus {
            observed_generation: gen,
            entries: facts.entries.len() as i64,
            digest: Some(digest.clone()),
            conditions: vec![cond(
                types::READY,
                true,
                group::VALID,
                &format!("{} entries", facts.entries.len()),
            )],
        },
        Err(why) => {
            let why = why.to_string();
            let mut conditions = vec![cond(types::READY, false, group::INVALID_ENTRIES, &why)];
            conditions.extend(Progress::Stalled.condition(
                group::INVALID_ENTRIES,
                egressguard_crds::conditions::bounded(&why, MAX_MESSAGE),
                gen,
                previous,
                at,
            ));
            CidrGroupStatus {
                observed_generation: gen,
                entries: 0,
                digest: None,
                conditions,
            }
        }
    };
    (status != before).then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::CidrGroupSpec;

    fn group(cidrs: &[&str], generation: i64) -> CIDRGroup {
        let mut g = CIDRGroup::new(
            "partners",
            CidrGroupSpec {
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            },
        );
        g.metadata.generation = Some(generation);
        g
    }

    fn of(type_: &str, s: &CidrGroupStatus) -> Option<(String, String)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    #[test]
    fn a_valid_list_is_ready_an_invalid_one_stalled_and_an_unchanged_one_not_rewritten() {
        let now = Timestamp::from_second(1_000_000).expect("time");
        let mut g = group(&["198.51.100.0/24", "2001:db8::/32"], 1);
        let s = group_status(&g, &GroupFacts::of(&g), now).expect("first status");
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(s.entries, 2);
        assert_eq!(
            of(types::READY, &s),
            Some(("True".into(), group::VALID.into()))
        );
        assert_eq!(of(types::STALLED, &s), None);
        g.status = Some(s);
        assert_eq!(
            group_status(&g, &GroupFacts::of(&g), now),
            None,
            "unchanged"
        );

        let mut bad = group(&["198.51.100.0/24", "not-a-cidr"], 2);
        bad.status = g.status.clone();
        let s = group_status(&bad, &GroupFacts::of(&bad), now).expect("changed");
        assert_eq!(s.observed_generation, Some(2));
        let stalled = s.conditions.iter().find(|c| c.type_ == types::STALLED);
        assert_eq!(
            stalled.map(|c| (c.status.as_str(), c.reason.as_str())),
            Some(("True", group::INVALID_ENTRIES))
        );
        assert!(
            stalled.is_some_and(|c| c.message.contains("spec.cidrs[1]")),
            "{stalled:?}"
        );
        assert_eq!(
            of(types::READY, &s),
            Some(("False".into(), group::INVALID_ENTRIES.into()))
        );
    }
}

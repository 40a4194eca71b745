//! The guard and CIDRGroups this node's plan names, held by watches scoped
//! to exactly those names (one field-selected watch each): an agent reads
//! what its node enforces and nothing else, and a group edit reaches it as
//! one watch event.
//!
//! [`input_for`] turns the plan and what is held into what to do, purely:
//! a plan is enforced only with the guard generation and the group digests
//! it names, so a node never runs a half-updated whitelist.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};

use egressguard_crds::node_shaping::{GuardRef, ProtectedEntry, ResolvedGroup};
use egressguard_crds::{CIDRGroup, EgressGuard, NodeShaping, NodeShapingSpec, ValidationErrors};
use futures::StreamExt;
use ipnet::IpNet;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::target::{GroupEntries, Target};

/// A CIDRGroup as the agent keeps it: parsed on arrival, so the object's
/// strings are not kept alongside the networks.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldGroup {
    /// [`egressguard_crds::CidrGroupSpec::digest`] of what arrived.
    pub digest: String,
    /// The networks, or why the group is invalid.
    pub entries: Result<Vec<IpNet>, String>,
}

impl HeldGroup {
    /// Parses a group object.
    pub fn of(g: &CIDRGroup) -> HeldGroup {
        HeldGroup {
            digest: g.spec.digest(),
            entries: g.spec.validate().map_err(|e| e.to_string()),
        }
    }
}

/// What the watches hold. A name is absent until its watch has listed;
/// `None` means listed and not found.
#[derive(Debug, Default)]
pub struct Held {
    /// Guards by name.
    pub guards: BTreeMap<String, Option<EgressGuard>>,
    /// CIDRGroups by name.
    pub groups: BTreeMap<String, Option<HeldGroup>>,
}

/// What one reconcile pass must do.
#[derive(Debug, Clone)]
pub enum Input {
    /// No plan, or a plan asking for removal: remove our shaping.
    Remove,
    /// The plan's inputs are not at the versions it names: leave the kernel.
    Waiting(String),
    /// The plan cannot be enforced as written: leave the kernel.
    Invalid(String),
    /// Shape (or, `enforce` false, report what would be shaped).
    Shape {
        /// Guard the plan comes from.
        guard: Option<String>,
        /// What to program.
        target: Box<Target>,
        /// Program it (false: DryRun, or Auto while not quarantined).
        enforce: bool,
    },
}

/// The input for a pass: plan `ns` with what is `held`. Pure.
pub fn input_for(ns: Option<&NodeShaping>, held: &Held, own: &[ProtectedEntry]) -> Input {
    let Some(ns) = ns.filter(|n| !n.spec.is_removal()) else {
        return Input::Remove;
    };
    let spec = &ns.spec;
    let node = spec.node_name.as_str();
    let protected = [spec.protected.as_slice(), own].concat();
    let built = match (&spec.guard, &spec.shaping) {
        // A plan that carries its spec: hand-written, or the operator's copy
        // for an agent that has not reported `byReference` yet (the copy is
        // the guard's spec, so both readings agree; the operator drops it
        // once this agent's status says it reads references).
        (_, Some(sh)) if !spec.groups.is_empty() || !sh.whitelist_groups.is_empty() => {
            return Input::Invalid(
                "invalid plan, kernel left unchanged:\nspec.groups: a plan that carries its spec (spec.shaping) cannot name CIDRGroups; apply the guard and its groups from a file instead".into(),
            )
        }
        (_, Some(shaping)) => Target::new(node, shaping, &protected),
        // A plan that names its guard: the guard and groups are read.
        (Some(want), None) => match by_reference(spec, want, held, &protected) {
            Ok(built) => built,
            Err(hold) => return hold.into(),
        },
        (None, None) => return Input::Remove,
    };
    match built {
        Ok(t) => Input::Shape {
            guard: spec.guard.as_ref().map(|g| g.name.clone()),
            target: Box::new(t),
            enforce: spec.enforce,
        },
        Err(e) => Input::Invalid(format!("invalid plan, kernel left unchanged:\n{e}")),
    }
}

/// Why a plan that names its guard is not enforced now; the kernel is
/// left as it is either way.
#[derive(Debug)]
enum Hold {
    /// An input is not at the version the plan names yet (or not at all).
    Waiting(String),
    /// The plan cannot be enforced with what it names.
    Invalid(String),
}

impl From<Hold> for Input {
    fn from(h: Hold) -> Input {
        match h {
            Hold::Waiting(why) => Input::Waiting(why),
            Hold::Invalid(why) => Input::Invalid(why),
        }
    }
}

/// The target of a plan that names its guard (`want`), built from the
/// guard and groups held, at exactly the versions the plan names. The
/// inner result is the target's own validation.
fn by_reference(
    spec: &NodeShapingSpec,
    want: &GuardRef,
    held: &Held,
    protected: &[ProtectedEntry],
) -> Result<Result<Target, ValidationErrors>, Hold> {
    let guard = held_guard(want, held)?;
    groups_not_lost(spec, want, guard)?;
    let entries = group_entries(spec, want, guard, held)?;
    Ok(Target::with_groups(
        &spec.node_name,
        &guard.spec,
        protected,
        &entries,
    ))
}

/// The guard the plan names, at the uid and generation it names.
fn held_guard<'h>(want: &GuardRef, held: &'h Held) -> Result<&'h EgressGuard, Hold> {
    let guard = match held.guards.get(&want.name) {
        None => return Err(Hold::Waiting(format!("reading EgressGuard {}", want.name))),
        Some(None) => {
            return Err(Hold::Waiting(format!(
                "EgressGuard {} named by the plan does not exist",
                want.name
            )))
        }
        Some(Some(g)) => g,
    };
    let (uid, gen) = (
        guard.metadata.uid.as_deref().unwrap_or_default(),
        guard.metadata.generation.unwrap_or_default(),
    );
    if uid != want.uid || gen != want.generation {
        return Err(Hold::Waiting(format!(
            "EgressGuard {} is at generation {gen}; the plan was made from generation {}",
            want.name, want.generation
        )));
    }
    Ok(guard)
}

/// A guard with whitelistGroups always has its plans name at least one
/// group (the operator holds the guard otherwise). A plan that names none
/// lost them on the way (written under an older NodeShaping schema, which
/// prunes the field): enforced, it would throttle the whitelisted
/// destinations.
fn groups_not_lost(
    spec: &NodeShapingSpec,
    want: &GuardRef,
    guard: &EgressGuard,
) -> Result<(), Hold> {
    if spec.groups.is_empty() && !guard.spec.whitelist_groups.is_empty() {
        return Err(Hold::Invalid(format!(
            "invalid plan, kernel left unchanged:\nspec.groups: names no CIDRGroup, but EgressGuard {} has spec.whitelistGroups; enforcing it would throttle the groups' destinations. A NodeShaping CRD from before CIDRGroups prunes the field: upgrade the CRDs (helm upgrade installs them)",
            want.name
        )));
    }
    Ok(())
}

/// The networks of every group the plan names, each held at the digest
/// the plan names (or, left out, the guard's status names).
fn group_entries<'a>(
    spec: &'a NodeShapingSpec,
    want: &GuardRef,
    guard: &'a EgressGuard,
    held: &'a Held,
) -> Result<Vec<GroupEntries<'a>>, Hold> {
    let mut entries: Vec<GroupEntries<'_>> = Vec::with_capacity(spec.groups.len());
    for r in &spec.groups {
        let digest = wanted_digest(r, want, guard)?;
        let nets = held_group(&r.name, digest, held)?;
        entries.push((r.name.as_str(), nets));
    }
    Ok(entries)
}

/// The digest the plan wants for group `r`: its own, or when it leaves it
/// out, the guard's status's, which must describe this generation (the
/// groups of this spec).
fn wanted_digest<'a>(
    r: &'a ResolvedGroup,
    want: &GuardRef,
    guard: &'a EgressGuard,
) -> Result<&'a str, Hold> {
    if !r.digest.is_empty() {
        return Ok(r.digest.as_str());
    }
    let gen = guard.metadata.generation.unwrap_or_default();
    guard
        .status
        .as_ref()
        .filter(|s| s.observed_generation == Some(gen))
        .and_then(|s| s.groups.iter().find(|g| g.name == r.name))
        .map(|g| g.digest.as_str())
        .ok_or_else(|| {
            Hold::Waiting(format!(
                "EgressGuard {}'s status does not name CIDRGroup {} for generation {gen} yet",
                want.name, r.name
            ))
        })
}

/// Group `name`'s networks, held at `digest`.
fn held_group<'h>(name: &str, digest: &str, held: &'h Held) -> Result<&'h [IpNet], Hold> {
    let g = match held.groups.get(name) {
        None => return Err(Hold::Waiting(format!("reading CIDRGroup {name}"))),
        Some(None) => {
            return Err(Hold::Waiting(format!(
                "CIDRGroup {name} named by the plan does not exist"
            )))
        }
        Some(Some(g)) => g,
    };
    if g.digest != digest {
        return Err(Hold::Waiting(format!(
            "CIDRGroup {name} holds {}; the plan was made from {digest}",
            g.digest
        )));
    }
    match &g.entries {
        Ok(nets) => Ok(nets.as_slice()),
        Err(e) => Err(Hold::Invalid(format!(
            "invalid plan, kernel left unchanged:\nCIDRGroup {name}: {e}"
        ))),
    }
}

/// Keeps one watch per guard and group name the current plan names.
pub struct Inputs {
    client: kube::Client,
    held: Arc<Mutex<Held>>,
    changed: Arc<Notify>,
    guards: BTreeMap<String, JoinHandle<()>>,
    groups: BTreeMap<String, JoinHandle<()>>,
}

impl Inputs {
    /// No watches yet.
    pub fn new(client: kube::Client) -> Inputs {
        Inputs {
            client,
            held: Arc::default(),
            changed: Arc::new(Notify::new()),
            guards: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }

    /// Woken whenever a watched object arrives, changes or goes.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// What the watches hold now.
    pub fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches exactly the inputs `ns` names: starts the missing watches,
    /// stops (and forgets) the ones no longer named.
    pub fn follow(&mut self, ns: Option<&NodeShaping>) {
        // Only a plan that names its guard and carries no copy reads anything.
        let spec = ns
            .map(|n| &n.spec)
            .filter(|s| s.guard.is_some() && s.shaping.is_none());
        let guards: Vec<String> = spec
            .and_then(|s| s.guard.as_ref())
            .map(|g| g.name.clone())
            .into_iter()
            .collect();
        let groups: Vec<String> = spec
            .map(|s| s.groups.iter().map(|g| g.name.clone()).collect())
            .unwrap_or_default();
        let (client, held, changed) = (&self.client, &self.held, &self.changed);
        sync(
            &mut self.guards,
            &guards,
            held,
            |h| &mut h.guards,
            |name| {
                let held = held.clone();
                let key = name.to_string();
                spawn_watch(
                    Api::<EgressGuard>::all(client.clone()),
                    name,
                    changed.clone(),
                    move |g: Option<EgressGuard>| {
                        // The operator's status writes (as nodes confirm) change
                        // nothing an agent enforces: only uid, generation and
                        // the group digests the status names count.
                        let id = |g: &Option<EgressGuard>| {
                            g.as_ref().map(|g| {
                                let st = g.status.as_ref();
                                (
                                    g.metadata.uid.clone(),
                                    g.metadata.generation,
                                    st.and_then(|s| s.observed_generation),
                                    st.map(|s| s.groups.clone()).unwrap_or_default(),
                                )
                            })
                        };
                        let mut h = lock(&held);
                        let same = h.guards.get(&key).is_some_and(|b| id(b) == id(&g));
                        h.guards.insert(key.clone(), g);
                        !same
                    },
                )
            },
        );
        sync(
            &mut self.groups,
            &groups,
            held,
            |h| &mut h.groups,
            |name| {
                let held = held.clone();
                let key = name.to_string();
                spawn_watch(
                    Api::<CIDRGroup>::all(client.clone()),
                    name,
                    changed.clone(),
                    move |g: Option<CIDRGroup>| {
                        let parsed = g.as_ref().map(HeldGroup::of);
                        let digest = |g: &Option<HeldGroup>| g.as_ref().map(|g| g.digest.clone());
                        let mut h = lock(&held);
                        let same = h
                            .groups
                            .get(&key)
                            .is_some_and(|b| digest(b) == digest(&parsed));
                        h.groups.insert(key.clone(), parsed);
                        !same
                    },
                )
            },
        );
    }
}

impl Drop for Inputs {
    fn drop(&mut self) {
        for t in self.guards.values().chain(self.groups.values()) {
            t.abort();
        }
    }
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes `tasks` watch exactly `want`; a stopped watch's object is forgotten.
fn sync<V>(
    tasks: &mut BTreeMap<String, JoinHandle<()>>,
    want: &[String],
    held: &Mutex<Held>,
    slot: impl Fn(&mut Held) -> &mut BTreeMap<String, Option<V>>,
    start: impl Fn(&str) -> JoinHandle<()>,
) {
    let stale: Vec<String> = tasks
        .keys()
        .filter(|k| !want.contains(k))
        .cloned()
        .collect();
    for k in stale {
        if let Some(t) = tasks.remove(&k) {
            t.abort();
        }
        slot(&mut lock(held)).remove(&k);
    }
    for w in want {
        if !tasks.contains_key(w) {
            tasks.insert(w.clone(), start(w));
        }
    }
}

/// Watches one object by name; `store` gets it (or `None` when it is absent)
/// after every complete list and every change, and says whether anything an
/// agent enforces changed: only then is a pass woken.
fn spawn_watch<K>(
    api: Api<K>,
    name: &str,
    changed: Arc<Notify>,
    store: impl Fn(Option<K>) -> bool + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let what = format!("{} {name}", K::kind(&K::DynamicType::default()));
    tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<K> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => {
                    listing = None;
                    continue;
                }
                Ok(Event::InitApply(o)) => {
                    listing = Some(o);
                    continue;
                }
                Ok(Event::InitDone) => {
                    if store(listing.take()) {
                        changed.notify_one();
                    }
                }
                Ok(Event::Apply(o)) => {
                    if store(Some(o)) {
                        changed.notify_one();
                    }
                }
                Ok(Event::Delete(_)) => {
                    if store(None) {
                        changed.notify_one();
                    }
                }
                Err(e) => warn!(watch = %what, error = %e, "watch failed; retrying with backoff"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressguard_crds::node_shaping::{GuardRef, NodeShapingSpec, ResolvedGroup};
    use egressguard_crds::CidrGroupSpec;

    fn guard(generation: i64) -> EgressGuard {
        let mut g = egressguard_crds::load::parse_str(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: idc}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n  whitelist: [203.0.113.10/32]\n  whitelistGroups: [{name: partners}]\n",
        )
        .expect("guard")
        .remove(0);
        g.metadata.uid = Some("u1".into());
        g.metadata.generation = Some(generation);
        g
    }

    fn group(cidrs: &[&str]) -> CIDRGroup {
        CIDRGroup::new(
            "partners",
            CidrGroupSpec {
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            },
        )
    }

    fn plan(generation: i64, digest: &str) -> NodeShaping {
        NodeShaping::new(
            "node-1",
            NodeShapingSpec {
                node_name: "node-1".into(),
                guard: Some(GuardRef {
                    name: "idc".into(),
                    uid: "u1".into(),
                    generation,
                }),
                shaping: None,
                groups: vec![ResolvedGroup {
                    name: "partners".into(),
                    digest: digest.into(),
                }],
                protected: vec![],
                enforce: true,
            },
        )
    }

    fn held(generation: Option<i64>, g: Option<&CIDRGroup>) -> Held {
        let mut h = Held::default();
        if let Some(gen) = generation {
            h.guards.insert("idc".into(), Some(guard(gen)));
        }
        if let Some(g) = g {
            h.groups.insert("partners".into(), Some(HeldGroup::of(g)));
        }
        h
    }

    fn waiting(i: Input) -> String {
        match i {
            Input::Waiting(w) => w,
            other => panic!("expected Waiting, got {other:?}"),
        }
    }

    /// A plan that leaves the digests out takes them from the guard's status,
    /// and only from a status of the guard's current generation: a group
    /// edit is then one status write per guard, and a node still never runs
    /// a version the operator has not resolved.
    #[test]
    fn digests_left_out_of_a_plan_come_from_the_guards_status() {
        use egressguard_crds::EgressGuardStatus;
        let v1 = group(&["198.51.100.0/24"]);
        let v2 = group(&["198.51.100.0/24", "192.0.2.0/24"]);
        let p = plan(3, "");
        let with_status = |observed: i64, digest: &str, g: &CIDRGroup| {
            let mut h = held(Some(3), Some(g));
            if let Some(Some(guard)) = h.guards.get_mut("idc") {
                guard.status = Some(EgressGuardStatus {
                    observed_generation: Some(observed),
                    groups: vec![ResolvedGroup {
                        name: "partners".into(),
                        digest: digest.into(),
                    }],
                    ..Default::default()
                });
            }
            h
        };
        let w = waiting(input_for(Some(&p), &held(Some(3), Some(&v1)), &[]));
        assert!(w.contains("status does not name CIDRGroup partners"), "{w}");
        // A status from the previous generation names nothing for this one.
        let w = waiting(input_for(
            Some(&p),
            &with_status(2, &v1.spec.digest(), &v1),
            &[],
        ));
        assert!(w.contains("for generation 3 yet"), "{w}");
        // The status names v1, the node holds v2 (the edit arrived first): wait.
        let w = waiting(input_for(
            Some(&p),
            &with_status(3, &v1.spec.digest(), &v2),
            &[],
        ));
        assert!(w.starts_with("CIDRGroup partners holds"), "{w}");
        assert!(matches!(
            input_for(Some(&p), &with_status(3, &v2.spec.digest(), &v2), &[]),
            Input::Shape { .. }
        ));
    }

    /// A plan is enforced only with exactly the guard generation and group
    /// digests it names; anything else waits (kernel untouched).
    #[test]
    fn plans_are_enforced_only_with_the_versions_they_name() {
        let v1 = group(&["198.51.100.0/24"]);
        let v2 = group(&["198.51.100.0/24", "192.0.2.0/24"]);
        let p = plan(3, &v1.spec.digest());
        assert_eq!(
            waiting(input_for(Some(&p), &Held::default(), &[])),
            "reading EgressGuard idc"
        );
        assert_eq!(
            waiting(input_for(Some(&p), &held(Some(4), Some(&v1)), &[])),
            "EgressGuard idc is at generation 4; the plan was made from generation 3"
        );
        assert_eq!(
            waiting(input_for(Some(&p), &held(Some(3), None), &[])),
            "reading CIDRGroup partners"
        );
        let w = waiting(input_for(Some(&p), &held(Some(3), Some(&v2)), &[]));
        assert!(w.starts_with("CIDRGroup partners holds fnv1a64:"), "{w}");
        match input_for(Some(&p), &held(Some(3), Some(&v1)), &[]) {
            Input::Shape {
                target, enforce, ..
            } => {
                assert!(enforce);
                let wl: Vec<(String, Option<u32>)> = target
                    .valid
                    .whitelist
                    .iter()
                    .map(|e| (e.net.to_string(), e.group))
                    .collect();
                assert_eq!(
                    wl,
                    [
                        ("203.0.113.10/32".to_string(), None),
                        ("198.51.100.0/24".to_string(), Some(0))
                    ]
                );
                assert_eq!(target.valid.groups, ["partners"]);
            }
            other => panic!("expected Shape, got {other:?}"),
        }
        // An invalid group at the named digest is refused, not half-applied.
        let bad = group(&["198.51.100.1/24"]);
        let p = plan(3, &bad.spec.digest());
        match input_for(Some(&p), &held(Some(3), Some(&bad)), &[]) {
            Input::Invalid(e) => assert!(
                e.ends_with("CIDRGroup partners: spec.cidrs[0]: 198.51.100.1/24 has host bits set; the network is 198.51.100.0/24"),
                "{e}"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(matches!(
            input_for(None, &Held::default(), &[]),
            Input::Remove
        ));
    }

    /// A guard or group listed and not found waits, and says which.
    #[test]
    fn a_named_input_that_does_not_exist_waits() {
        let v1 = group(&["198.51.100.0/24"]);
        let p = plan(3, &v1.spec.digest());
        let mut h = Held::default();
        h.guards.insert("idc".into(), None);
        assert_eq!(
            waiting(input_for(Some(&p), &h, &[])),
            "EgressGuard idc named by the plan does not exist"
        );
        let mut h = held(Some(3), None);
        h.groups.insert("partners".into(), None);
        assert_eq!(
            waiting(input_for(Some(&p), &h, &[])),
            "CIDRGroup partners named by the plan does not exist"
        );
    }

    /// A plan without groups for a guard that has them lost them on the way
    /// (an older schema pruned the field): refused, never enforced without
    /// the whitelist.
    #[test]
    fn a_plan_naming_no_groups_for_a_guard_with_groups_is_refused() {
        let v1 = group(&["198.51.100.0/24"]);
        let mut p = plan(3, &v1.spec.digest());
        p.spec.groups.clear();
        match input_for(Some(&p), &held(Some(3), Some(&v1)), &[]) {
            Input::Invalid(e) => assert!(
                e.contains(
                    "spec.groups: names no CIDRGroup, but EgressGuard idc has spec.whitelistGroups"
                ),
                "{e}"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// A plan that carries its spec is enforced from it (the operator's copy
    /// for an agent it has not seen read references yet), but cannot also
    /// name groups: it would be enforced without them.
    #[test]
    fn a_copy_is_enforced_as_written_and_cannot_name_groups() {
        let mut p = plan(3, "fnv1a64:0");
        p.spec.groups.clear();
        let mut copy = guard(3).spec;
        copy.whitelist_groups.clear();
        p.spec.shaping = Some(copy);
        assert!(matches!(
            input_for(Some(&p), &Held::default(), &[]),
            Input::Shape { .. }
        ));
        let v1 = group(&["198.51.100.0/24"]);
        let mut p = plan(3, &v1.spec.digest());
        p.spec.shaping = Some(guard(3).spec);
        match input_for(Some(&p), &Held::default(), &[]) {
            Input::Invalid(e) => assert!(
                e.contains("spec.groups: a plan that carries its spec"),
                "{e}"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
}

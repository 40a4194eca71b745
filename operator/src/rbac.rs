//! The API calls each component makes, as RBAC rules. The Helm chart must
//! grant exactly these (tests/tests/chart.rs renders it with real Helm and
//! compares); change this table together with the code that calls the API.

/// One rule: API group, resource, verbs.
pub type Rule = (&'static str, &'static str, &'static [&'static str]);

/// Cluster-wide calls of `egressguard-operator run` (`run.rs`).
pub const OPERATOR_CLUSTER: &[Rule] = &[
    // reflector (list, watch); finalizer add/remove (patch).
    (
        "egressguard.io",
        "egressguards",
        &["list", "watch", "patch"],
    ),
    ("egressguard.io", "egressguards/status", &["patch"]),
    // reflector; server-side apply of plans (patch, and create: an apply that
    // creates the object is authorized as create); delete after confirmed removal.
    (
        "egressguard.io",
        "nodeshapings",
        &["list", "watch", "create", "patch", "delete"],
    ),
    // reflector; a quarantine's escalation cordons or taints its node
    // (patch; get reads the taints a merge patch replaces).
    ("", "nodes", &["get", "list", "watch", "patch"]),
    // reflector: the guards' whitelistGroups resolve against it.
    ("egressguard.io", "cidrgroups", &["list", "watch"]),
    // Each group's validity (observedGeneration, Ready, Stalled).
    ("egressguard.io", "cidrgroups/status", &["patch"]),
    // reflector; the receiver stores alerts as Pending objects (create) and
    // reads them (get); the leader starts them (create), adds and removes the
    // release finalizer (patch) and deletes records past their retention.
    (
        "egressguard.io",
        "quarantines",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("egressguard.io", "quarantines/status", &["patch"]),
    // kube-runtime's event Recorder creates events and patches their series.
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Calls of the operator in the `default` namespace: the API server's EndpointSlices.
pub const OPERATOR_DEFAULT_NS: &[Rule] =
    &[("discovery.k8s.io", "endpointslices", &["list", "watch"])];

/// Calls of the operator in its own namespace: the leader-election Lease
/// (`leader.rs`), and a reflector of the agents' heartbeat Leases.
pub const OPERATOR_OWN_NS: &[Rule] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update", "list", "watch"],
)];

/// Cluster-wide calls of `node-shaper run`: a field-selected watch of its
/// own NodeShaping and status patches, and field-selected watches of the
/// guard and the CIDRGroups its plan names (read-only).
pub const AGENT_CLUSTER: &[Rule] = &[
    ("egressguard.io", "nodeshapings", &["list", "watch"]),
    ("egressguard.io", "egressguards", &["list", "watch"]),
    ("egressguard.io", "cidrgroups", &["list", "watch"]),
    ("egressguard.io", "nodeshapings/status", &["patch"]),
    // Tamper evidence: a Warning Event on the Node (kube-runtime's Recorder).
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Calls of `node-shaper run` in its own namespace: a field-selected watch
/// of its own DaemonSet for as long as it runs, and a read on SIGTERM —
/// seen deleted or being deleted, the chart was uninstalled and shaping
/// must go too.
pub const AGENT_OWN_NS: &[Rule] = &[
    ("apps", "daemonsets", &["get", "list", "watch"]),
    // Its heartbeat Lease (`heartbeat.rs`), read by the operator.
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
];

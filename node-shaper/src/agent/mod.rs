//! `node-shaper run`: the DaemonSet agent.
//!
//! It watches only its own node's `NodeShaping` (field selector on the name)
//! and the guard and CIDRGroups that plan names ([`inputs`]), reconciles the
//! kernel on every change and every resync period (repairing drift such as
//! a hand-typed `tc qdisc del`), writes what it did to the object's status,
//! and serves `/metrics` (with `/healthz` and `/readyz`) on the metrics
//! address and the probes alone on a probe address, a thread and a runtime
//! of their own (`http`). The kernel work runs on a thread of its own
//! ([`kernel`]), so a long pass never holds up the runtime.
//!
//! # Guarantees
//! - Shaping is removed only when the plan says so: the object asks for
//!   removal, is gone after a successful list, or stops enforcing. An
//!   unreachable API server changes nothing in the kernel.
//! - SIGTERM leaves enforcement in place, so a rolling update opens no gap —
//!   unless the agent's own DaemonSet was seen gone or being deleted with
//!   valid credentials (the chart was uninstalled; [`uninstall`]): then
//!   nothing would ever remove the shaping, so it does. Refused credentials
//!   (401/403) are no such proof and keep the shaping.

pub mod heartbeat;
mod http;
pub mod inputs;
pub mod kernel;
mod metrics;
mod reconcile;
pub mod status;
mod tamper;
pub mod uninstall;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egressguard_crds::node_shaping::{NodeShapingStatus, ProtectedEntry};
use egressguard_crds::{NodeShaping, NodeShapingSpec};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use inputs::Input;
pub use metrics::Metrics;
pub use reconcile::{
    reconcile, reconcile_with, record_applied, Memory, Outcome, PassReport, Trigger,
};
pub use status::status_for;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (the NodeShaping's name), usually from the downward API.
    pub node: String,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` alone listen, for the kubelet.
    pub probe_addr: SocketAddr,
    /// Reconcile at least this often, to repair drift.
    pub resync: Duration,
    /// `namespace/name` of the DaemonSet running this agent, watched while
    /// the agent runs; on SIGTERM, if it was seen gone or being deleted, the
    /// agent removes its shaping.
    pub daemonset: Option<(String, String)>,
    /// Renew the heartbeat Lease this often (`None`: no heartbeat).
    pub heartbeat: Option<Duration>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No usable kubeconfig / in-cluster config.
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    /// The metrics port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// The kernel or the probe thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The kernel thread stopped.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelGone),
}

/// Shared between the reconcile loop and the HTTP endpoints.
#[derive(Debug, Default)]
pub struct Shared {
    /// The first list of our NodeShaping completed.
    pub synced: bool,
    /// Current metrics.
    pub metrics: Metrics,
}

/// The API server's addresses as protected entries: an IP literal as is, a
/// host name resolved now (a name that does not resolve protects nothing,
/// and says so in the log).
pub fn api_server_entries(host: &str, port: u16) -> Vec<ProtectedEntry> {
    use std::net::ToSocketAddrs;
    // An IPv6 literal comes bracketed from a URL's authority.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return vec![];
    }
    let addrs: Vec<std::net::IpAddr> = match host.parse() {
        Ok(ip) => vec![ip],
        Err(_) => match (host, port).to_socket_addrs() {
            Ok(a) => a.map(|s| s.ip()).collect(),
            Err(e) => {
                warn!(host, error = %e, "cannot resolve the API server's name; it is not protected by the agent");
                vec![]
            }
        },
    };
    let mut out: Vec<_> = addrs
        .into_iter()
        .map(|ip| ProtectedEntry {
            cidr: match ip {
                std::net::IpAddr::V4(_) => format!("{ip}/32"),
                std::net::IpAddr::V6(_) => format!("{ip}/128"),
            },
            reason: format!("API server of this agent ({host})"),
        })
        .collect();
    out.sort_by(|a, b| a.cidr.cmp(&b.cidr));
    out.dedup();
    out
}

/// The agent's name as the status's field manager and as the reporter of
/// its Events.
const AGENT: &str = "egressguard-node-shaper";

/// What the NodeShaping watch last delivered: `None` until the first list
/// completed, then the object (`None` when absent).
type PlanWatch = watch::Receiver<Option<Option<NodeShaping>>>;

/// Runs until SIGTERM/SIGINT.
///
/// # Errors
/// Before the first pass: no client, a port that cannot be bound, no
/// signal handlers or threads. After: only the kernel thread stopping.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let (client, own_protected) = connect().await?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    serve_http(&cfg, shared.clone()).await?;
    let daemonset = cfg
        .daemonset
        .as_ref()
        .map(|(ns, name)| uninstall::watch(client.clone(), ns, name));
    let api: Api<NodeShaping> = Api::all(client.clone());
    let plan = watch_plan(api.clone(), &cfg.node);
    let inputs = inputs::Inputs::new(client.clone());
    let mut wake = Wake::install(cfg.resync, plan, inputs.changed())?;
    let kernel = kernel::Kernel::start(Memory {
        own_protected: own_protected.clone(),
        watch: Some(wake.tc_watch.clone()),
        ..Memory::default()
    })
    .map_err(AgentError::Thread)?;
    let progress = heartbeat::Progress::default();
    if let Some(period) = cfg.heartbeat {
        spawn_heartbeat(&client, &cfg, period, progress.clone());
    }
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: AGENT.into(),
            instance: Some(cfg.node.clone()),
        },
    );
    let mut agent = Agent {
        node: cfg.node.clone(),
        api,
        kernel,
        inputs,
        own_protected,
        shared,
        progress,
        recorder,
        last_enforced: None,
        status: StatusWrites::default(),
    };
    info!(node = %cfg.node, "node-shaper agent started");
    loop {
        match wake.next().await {
            Woken::Pass(trigger) => {
                // The watch's read guard must go before the pass awaits: held
                // across it (an `if let` keeps its scrutinee's temporaries
                // for the whole block), the plan watcher's next send blocks
                // this runtime's only thread on the channel's lock.
                let current = wake.plan.borrow().clone();
                // Nothing is decided before the first complete list.
                if let Some(current) = current {
                    agent.pass(current, trigger).await?;
                }
            }
            Woken::Sigterm => {
                let watched = daemonset.as_ref().map(|w| *w.borrow()).unwrap_or_default();
                let verdict = uninstall::on_sigterm(&client, cfg.daemonset.as_ref(), watched).await;
                agent.on_sigterm(verdict).await?;
                break;
            }
            Woken::Sigint => {
                info!("SIGINT: leaving enforcement in place; exiting");
                break;
            }
            Woken::PlanWatchGone => break,
        }
    }
    Ok(())
}

/// A client from the kubeconfig or the in-cluster config, and the API
/// server it talks to as protected entries (logged).
async fn connect() -> Result<(kube::Client, Vec<ProtectedEntry>), AgentError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| AgentError::Client(kube::Error::InferConfig(e)))?;
    let own_protected = api_server_entries(
        config.cluster_url.host().unwrap_or_default(),
        config.cluster_url.port_u16().unwrap_or(443),
    );
    info!(api = %config.cluster_url, protected = ?own_protected, "protecting the API server this agent talks to");
    let client = kube::Client::try_from(config).map_err(AgentError::Client)?;
    Ok((client, own_protected))
}

/// Binds the probe listener (served on a thread of its own, with a task
/// on this runtime marking it alive every second) and the metrics
/// listener (served on this runtime).
async fn serve_http(cfg: &AgentConfig, shared: Arc<Mutex<Shared>>) -> Result<(), AgentError> {
    let listen = |addr: SocketAddr| move |source| AgentError::Listen { addr, source };
    let alive = Arc::new(http::Liveness::new());
    let probes = std::net::TcpListener::bind(cfg.probe_addr).map_err(listen(cfg.probe_addr))?;
    http::spawn_probes(probes, shared.clone(), alive.clone()).map_err(AgentError::Thread)?;
    tokio::spawn(async move {
        loop {
            alive.mark();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let metrics = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(listen(cfg.metrics_addr))?;
    tokio::spawn(http::serve(metrics, shared));
    info!(metrics = %cfg.metrics_addr, probes = %cfg.probe_addr, "serving /metrics, and the probes on their own listener");
    Ok(())
}

/// Watches this node's NodeShaping (field-selected by name) and keeps the
/// latest version in the returned receiver, from the first complete list
/// on; a failing watch retries with backoff.
fn watch_plan(api: Api<NodeShaping>, node: &str) -> PlanWatch {
    let (tx, rx) = watch::channel::<Option<Option<NodeShaping>>>(None);
    let wc = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher::watcher(api, wc).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<NodeShaping> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => listing = None,
                Ok(Event::InitApply(o)) => listing = Some(o),
                Ok(Event::InitDone) => {
                    let _ = tx.send(Some(listing.take()));
                }
                Ok(Event::Apply(o)) => {
                    let _ = tx.send(Some(Some(o)));
                }
                Ok(Event::Delete(_)) => {
                    let _ = tx.send(Some(None));
                }
                Err(e) => warn!(error = %e, "watch of NodeShaping failed; retrying with backoff"),
            }
        }
    });
    rx
}

/// Renews this node's heartbeat Lease every `period` in the client's
/// namespace while passes keep finishing.
fn spawn_heartbeat(
    client: &kube::Client,
    cfg: &AgentConfig,
    period: Duration,
    progress: heartbeat::Progress,
) {
    let ns = client.default_namespace().to_string();
    // Passes run at least every resync: two missed ones mean a hang.
    let silence = 2 * cfg.resync + period;
    tokio::spawn(heartbeat::run(
        client.clone(),
        ns,
        cfg.node.clone(),
        period,
        progress,
        silence,
    ));
}

/// What woke the agent's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    /// A pass is due, for this reason.
    Pass(Trigger),
    /// SIGTERM: remove the shaping if the chart was uninstalled, then exit.
    Sigterm,
    /// SIGINT: exit, leaving enforcement in place.
    Sigint,
    /// The NodeShaping watch ended (the runtime is going away).
    PlanWatchGone,
}

/// Everything that wakes the loop: the plan, its inputs, the resync
/// ticker, the kernel's tc notifications and the signals.
struct Wake {
    plan: PlanWatch,
    inputs_changed: Arc<tokio::sync::Notify>,
    ticker: tokio::time::Interval,
    /// Shared with the tc monitor and the kernel thread's passes, which
    /// record their own sockets, whose changes are not tampering.
    tc_watch: crate::netlink::monitor::Watch,
    tc: tokio::sync::mpsc::UnboundedReceiver<crate::netlink::monitor::TcChange>,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Wake {
    /// Installs the signal handlers, the resync ticker and the tc monitor.
    fn install(
        resync: Duration,
        plan: PlanWatch,
        inputs_changed: Arc<tokio::sync::Notify>,
    ) -> Result<Wake, AgentError> {
        use tokio::signal::unix::{signal, SignalKind};
        let sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let ticker = tokio::time::interval(resync);
        // Tampering: the kernel's tc notifications wake a pass at once.
        let tc_watch = crate::netlink::monitor::Watch::default();
        let (tc_tx, tc) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) =
            crate::netlink::monitor::spawn(tc_watch.clone(), move |c| tc_tx.send(c).is_ok())
        {
            warn!(error = %e, "cannot listen to tc notifications; drift is repaired at the resync only");
        }
        Ok(Wake {
            plan,
            inputs_changed,
            ticker,
            tc_watch,
            tc,
            sigterm,
            sigint,
        })
    }

    /// Waits for the next reason to act. A pass for a plan change may
    /// trust the tree the agent last wrote; the resync and a foreign tc
    /// change read it back.
    async fn next(&mut self) -> Woken {
        tokio::select! {
            changed = self.plan.changed() => match changed {
                Ok(()) => Woken::Pass(Trigger::Plan),
                Err(_) => Woken::PlanWatchGone,
            },
            _ = self.inputs_changed.notified() => Woken::Pass(Trigger::Plan),
            _ = self.ticker.tick() => Woken::Pass(Trigger::Resync),
            Some(change) = self.tc.recv() => {
                // One pass answers a burst: what arrived meanwhile is covered.
                while self.tc.try_recv().is_ok() {}
                info!(?change, "tc changed under this agent; repairing now");
                Woken::Pass(Trigger::Tamper)
            }
            _ = self.sigterm.recv() => Woken::Sigterm,
            _ = self.sigint.recv() => Woken::Sigint,
        }
    }
}

/// The reconcile loop's state between passes.
struct Agent {
    node: String,
    api: Api<NodeShaping>,
    kernel: kernel::Kernel,
    inputs: inputs::Inputs,
    own_protected: Vec<ProtectedEntry>,
    shared: Arc<Mutex<Shared>>,
    progress: heartbeat::Progress,
    recorder: kube::runtime::events::Recorder,
    /// The last plan enforced and what it was enforced with.
    last_enforced: Option<(NodeShapingSpec, inputs::Input)>,
    status: StatusWrites,
}

impl Agent {
    /// One pass over `current` (the plan as the watch holds it; `None`:
    /// absent) for `trigger`, in its [`pass_span`].
    async fn pass(
        &mut self,
        current: Option<NodeShaping>,
        trigger: Trigger,
    ) -> Result<(), AgentError> {
        let span = pass_span(&self.node, current.as_ref(), trigger);
        self.pass_in_span(current, trigger).instrument(span).await
    }

    /// [`Agent::pass`]: decides the input, runs it on the kernel thread,
    /// records it (metrics, tamper Events) and writes the status.
    async fn pass_in_span(
        &mut self,
        current: Option<NodeShaping>,
        trigger: Trigger,
    ) -> Result<(), AgentError> {
        self.inputs.follow(current.as_ref());
        let spec = current.as_ref().map(|n| &n.spec);
        let input = inputs::input_for(current.as_ref(), &self.inputs.held(), &self.own_protected);
        let input = keep_enforced_version(input, spec, self.last_enforced.as_ref());
        // Netlink is blocking: the pass runs on the kernel thread while this
        // runtime goes on answering probes and scrapes.
        let (input, outcome) = self.kernel.pass(input, trigger).await?;
        self.progress.mark();
        self.last_enforced = enforced_after(input, spec, &outcome, self.last_enforced.take());
        self.record(&outcome).await;
        // The status describes the object this pass acted on (its generation),
        // not a newer one that may have arrived meanwhile: that one gets its own pass.
        if let Some(obj) = current {
            self.status
                .write(&self.api, &self.node, &obj, &outcome)
                .await;
        }
        // What this iteration decoded and built on the runtime (watch events of
        // big groups, the input, the status) is freed by now; the kernel thread
        // trimmed after its pass, while the runtime still held it.
        crate::alloc::release_free_memory();
        Ok(())
    }

    /// Folds a pass into the metrics and reports its new tamper evidence.
    async fn record(&self, outcome: &PassReport) {
        {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            s.synced = true;
            s.metrics.record(outcome);
        }
        if !outcome.tamper.is_empty() {
            heartbeat::report_tampering(&self.recorder, &self.node, &outcome.tamper).await;
        }
    }

    /// Acts on SIGTERM's `verdict`: removes the shaping when the chart was
    /// uninstalled, keeps it otherwise (a rolling update must not open a gap).
    async fn on_sigterm(&self, verdict: uninstall::Verdict) -> Result<(), AgentError> {
        match verdict {
            uninstall::Verdict::Remove(why) => {
                info!(%why, "SIGTERM: the chart was uninstalled; removing shaping so no node stays shaped with nothing to manage it");
                let span = pass_span(&self.node, None, Trigger::Resync);
                let (_, out) = self
                    .kernel
                    .pass(inputs::Input::Remove, Trigger::Resync)
                    .instrument(span.clone())
                    .await?;
                let _in_pass = span.enter();
                for i in &out.interfaces {
                    info!(interface = %i.name, error = ?i.error, "shaping removed on uninstall");
                }
            }
            uninstall::Verdict::Keep(why) => {
                info!(%why, "SIGTERM: leaving enforcement in place (a rolling update must not open a gap); exiting");
            }
        }
        Ok(())
    }
}

/// The span of one pass: this `node`, the guard `plan` names (left out when
/// it names none: no plan, or one that carries its spec) and why it runs.
/// The pass's log lines carry it, on this runtime and on the kernel thread
/// ([`kernel::Kernel::pass`] takes the caller's span along).
fn pass_span(node: &str, plan: Option<&NodeShaping>, trigger: Trigger) -> tracing::Span {
    let guard = plan
        .and_then(|n| n.spec.guard.as_ref())
        .map(|g| g.name.as_str());
    // At WARN: the agent's default filter is `warn`, and a span below the
    // filter's level is off, so its warnings would lose node and guard.
    tracing::warn_span!("pass", node = %node, guard, trigger = ?trigger)
}

/// The input to enforce when `input` waits for the plan's guard or groups
/// but the plan itself has not changed since `last` was enforced (an edit
/// the operator holds back, a group gone): keep enforcing, and repairing,
/// what this same plan was enforced with. When only `enforce` moved (a
/// quarantine began or ended while its guard is held), the same version,
/// enforced or not as asked. Anything else: `input` as it is. Pure but
/// for the log line.
fn keep_enforced_version(
    input: Input,
    spec: Option<&NodeShapingSpec>,
    last: Option<&(NodeShapingSpec, Input)>,
) -> Input {
    let (Input::Waiting(why), Some((plan, last))) = (&input, last) else {
        return input;
    };
    if spec == Some(plan) {
        info!(waiting = %why, "the plan is unchanged; keeping the version it was enforced with");
        return last.clone();
    }
    if let (Some(s), Input::Shape { guard, target, .. }) = (spec, last) {
        let mut same = s.clone();
        same.enforce = plan.enforce;
        if &same == plan {
            info!(waiting = %why, enforce = s.enforce, "only enforcement changed; keeping the version it was enforced with");
            return Input::Shape {
                guard: guard.clone(),
                target: target.clone(),
                enforce: s.enforce,
            };
        }
    }
    input
}

/// What is remembered as enforced after a pass of `input` for plan `spec`:
/// the plan and its input when it shaped (or dry-ran) without an error,
/// what was remembered before while waiting, nothing otherwise. Pure.
fn enforced_after(
    input: Input,
    spec: Option<&NodeShapingSpec>,
    outcome: &PassReport,
    last: Option<(NodeShapingSpec, Input)>,
) -> Option<(NodeShapingSpec, Input)> {
    match (input, spec) {
        (i @ Input::Shape { .. }, Some(plan)) if outcome.outcome.error().is_none() => {
            Some((plan.clone(), i))
        }
        (Input::Waiting(_), _) => last,
        _ => None,
    }
}

/// The status last written, and when.
#[derive(Debug, Default)]
struct StatusWrites(Option<(NodeShapingStatus, std::time::Instant)>);

impl StatusWrites {
    /// Writes `obj`'s status after `outcome` when it is due
    /// ([`status::due`]); a failed write is logged and retried after the
    /// next pass.
    async fn write(
        &mut self,
        api: &Api<NodeShaping>,
        node: &str,
        obj: &NodeShaping,
        outcome: &PassReport,
    ) {
        let last = self.0.as_ref().map(|(s, at)| (s, *at));
        let status = status_for(obj, outcome, last.map(|(s, _)| s));
        if !status::due(last, &status, outcome.wrote) {
            return;
        }
        let patch = serde_json::json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(AGENT.into()),
            ..PatchParams::default()
        };
        match api.patch_status(node, &params, &Patch::Merge(&patch)).await {
            Ok(_) => self.0 = Some((status, std::time::Instant::now())),
            Err(e) => warn!(error = %e, "cannot write NodeShaping status; will retry"),
        }
    }
}

#[cfg(test)]
mod api_server_tests {
    use super::api_server_entries;

    #[test]
    fn the_agents_own_api_server_is_protected() {
        let cidrs = |h: &str| -> Vec<String> {
            api_server_entries(h, 443)
                .into_iter()
                .map(|e| e.cidr)
                .collect()
        };
        assert_eq!(cidrs("10.0.0.1"), ["10.0.0.1/32"]);
        assert_eq!(cidrs("[fd00::1]"), ["fd00::1/128"]);
        assert!(cidrs("localhost")
            .iter()
            .any(|c| c == "127.0.0.1/32" || c == "::1/128"));
        assert!(cidrs("no-such-host.invalid").is_empty());
        assert!(cidrs("").is_empty());
        let e = api_server_entries("10.0.0.1", 6443).remove(0);
        assert_eq!(e.reason, "API server of this agent (10.0.0.1)");
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;
    use egressguard_crds::node_shaping::GuardRef;

    fn spec(generation: i64, enforce: bool) -> NodeShapingSpec {
        NodeShapingSpec {
            node_name: "n1".into(),
            guard: Some(GuardRef {
                name: "idc".into(),
                uid: "u1".into(),
                generation,
            }),
            shaping: None,
            groups: vec![],
            protected: vec![],
            enforce,
        }
    }

    fn shape(enforce: bool) -> Input {
        let g = egressguard_crds::load::parse_str(
            "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {name: idc}\nspec:\n  uplink: {rate: 20Mbit}\n  throttle: {rate: 1Mbit, destinations: [{port: 443}]}\n",
        )
        .expect("guard")
        .remove(0);
        Input::Shape {
            guard: Some("idc".into()),
            target: Box::new(crate::target::Target::new("n1", &g.spec, &[]).expect("valid")),
            enforce,
        }
    }

    fn enforce_of(i: &Input) -> Option<bool> {
        match i {
            Input::Shape { enforce, .. } => Some(*enforce),
            Input::Remove | Input::Waiting(_) | Input::Invalid(_) => None,
        }
    }

    /// While the guard is held back, an unchanged plan keeps the version it
    /// was enforced with; a plan that only flips `enforce` keeps it too,
    /// enforced as now asked; any other change waits.
    #[test]
    fn a_held_guard_keeps_the_version_the_plan_was_enforced_with() {
        let last = (spec(3, true), shape(true));
        let waiting = || Input::Waiting("EgressGuard idc is at generation 4".into());
        let kept = keep_enforced_version(waiting(), Some(&spec(3, true)), Some(&last));
        assert_eq!(enforce_of(&kept), Some(true), "unchanged plan");
        let kept = keep_enforced_version(waiting(), Some(&spec(3, false)), Some(&last));
        assert_eq!(enforce_of(&kept), Some(false), "only enforce moved");
        let kept = keep_enforced_version(waiting(), Some(&spec(4, true)), Some(&last));
        assert!(matches!(kept, Input::Waiting(_)), "a new generation waits");
        let kept = keep_enforced_version(waiting(), Some(&spec(3, true)), None);
        assert!(matches!(kept, Input::Waiting(_)), "nothing enforced yet");
        let kept = keep_enforced_version(Input::Remove, None, Some(&last));
        assert!(matches!(kept, Input::Remove), "only waiting is replaced");
    }

    /// A shape that went through is remembered; waiting keeps the memory;
    /// an error, an invalid plan or a removal forgets it.
    #[test]
    fn what_is_remembered_as_enforced() {
        let ok = PassReport::default();
        let failed = PassReport {
            outcome: Outcome::Failed("cannot open rtnetlink".into()),
            ..PassReport::default()
        };
        let plan = spec(3, true);
        let last = || Some((spec(2, true), shape(true)));
        let after = enforced_after(shape(true), Some(&plan), &ok, last());
        assert_eq!(after.map(|(p, _)| p), Some(plan.clone()));
        let after = enforced_after(shape(true), Some(&plan), &failed, last());
        assert!(after.is_none(), "failed");
        let after = enforced_after(Input::Waiting("w".into()), Some(&plan), &ok, last());
        assert_eq!(after.map(|(p, _)| p), Some(spec(2, true)), "waiting");
        let after = enforced_after(Input::Invalid("bad".into()), Some(&plan), &ok, last());
        assert!(after.is_none(), "invalid");
        let after = enforced_after(Input::Remove, None, &ok, last());
        assert!(after.is_none(), "removed");
    }
}

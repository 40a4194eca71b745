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
pub mod uninstall;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egressguard_crds::NodeShaping;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

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
pub fn api_server_entries(
    host: &str,
    port: u16,
) -> Vec<egressguard_crds::node_shaping::ProtectedEntry> {
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
        .map(|ip| egressguard_crds::node_shaping::ProtectedEntry {
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

/// Runs until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| AgentError::Client(kube::Error::InferConfig(e)))?;
    let own_protected = api_server_entries(
        config.cluster_url.host().unwrap_or_default(),
        config.cluster_url.port_u16().unwrap_or(443),
    );
    info!(api = %config.cluster_url, protected = ?own_protected, "protecting the API server this agent talks to");
    let client = kube::Client::try_from(config).map_err(AgentError::Client)?;
    let api: Api<NodeShaping> = Api::all(client.clone());
    let shared = Arc::new(Mutex::new(Shared::default()));
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
    tokio::spawn(http::serve(metrics, shared.clone()));
    info!(metrics = %cfg.metrics_addr, probes = %cfg.probe_addr, "serving /metrics, and the probes on their own listener");
    let daemonset = cfg
        .daemonset
        .as_ref()
        .map(|(ns, name)| uninstall::watch(client.clone(), ns, name));

    // The watcher feeds the latest version of our object (None = absent).
    let (tx, mut rx) = watch::channel::<Option<Option<NodeShaping>>>(None);
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", cfg.node));
    let stream = watcher::watcher(api.clone(), wc).default_backoff();
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

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut ticker = tokio::time::interval(cfg.resync);
    let mut inputs = inputs::Inputs::new(client.clone());
    // The last plan enforced and what it was enforced with.
    let mut last_enforced: Option<(egressguard_crds::NodeShapingSpec, inputs::Input)> = None;
    let inputs_changed = inputs.changed();
    // Tampering: the kernel's tc notifications wake a pass at once (the
    // passes record their own sockets, whose changes are not tampering).
    let tc_watch = crate::netlink::monitor::Watch::default();
    let (tc_tx, mut tc_rx) = tokio::sync::mpsc::unbounded_channel();
    if let Err(e) = crate::netlink::monitor::spawn(tc_watch.clone(), move |c| tc_tx.send(c).is_ok())
    {
        warn!(error = %e, "cannot listen to tc notifications; drift is repaired at the resync only");
    }
    let kernel = kernel::Kernel::start(Memory {
        own_protected: own_protected.clone(),
        watch: Some(tc_watch),
        ..Memory::default()
    })
    .map_err(AgentError::Thread)?;
    let progress = heartbeat::Progress::default();
    if let Some(period) = cfg.heartbeat {
        let ns = client.default_namespace().to_string();
        // Passes run at least every resync: two missed ones mean a hang.
        let silence = 2 * cfg.resync + period;
        tokio::spawn(heartbeat::run(
            client.clone(),
            ns,
            cfg.node.clone(),
            period,
            progress.clone(),
            silence,
        ));
    }
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "egressguard-node-shaper".into(),
            instance: Some(cfg.node.clone()),
        },
    );
    let mut last_status = None;
    let mut last_write: Option<std::time::Instant> = None;
    info!(node = %cfg.node, "node-shaper agent started");
    loop {
        // A pass for a plan change may trust the tree the agent last wrote;
        // the resync and a foreign tc change read it back.
        let trigger;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { break }
                trigger = Trigger::Plan;
            }
            _ = inputs_changed.notified() => trigger = Trigger::Plan,
            _ = ticker.tick() => trigger = Trigger::Resync,
            Some(change) = tc_rx.recv() => {
                // One pass answers a burst: what arrived meanwhile is covered.
                while tc_rx.try_recv().is_ok() {}
                info!(?change, "tc changed under this agent; repairing now");
                trigger = Trigger::Tamper;
            }
            _ = sigterm.recv() => {
                let watched = daemonset.as_ref().map(|w| *w.borrow()).unwrap_or_default();
                match uninstall::on_sigterm(&client, cfg.daemonset.as_ref(), watched).await {
                    uninstall::Verdict::Remove(why) => {
                        info!(%why, "SIGTERM: the chart was uninstalled; removing shaping so no node stays shaped with nothing to manage it");
                        let (_, out) = kernel.pass(inputs::Input::Remove, Trigger::Resync).await?;
                        for i in &out.interfaces {
                            info!(interface = %i.name, error = ?i.error, "shaping removed on uninstall");
                        }
                    }
                    uninstall::Verdict::Keep(why) => {
                        info!(%why, "SIGTERM: leaving enforcement in place (a rolling update must not open a gap); exiting");
                    }
                }
                break;
            }
            _ = sigint.recv() => {
                info!("SIGINT: leaving enforcement in place; exiting");
                break;
            }
        }
        // Nothing is decided before the first complete list.
        let Some(current) = rx.borrow().clone() else {
            continue;
        };
        inputs.follow(current.as_ref());
        let mut input = inputs::input_for(current.as_ref(), &inputs.held(), &own_protected);
        let spec = current.as_ref().map(|n| &n.spec);
        // The plan has not changed but its guard or groups moved on (an
        // edit the operator holds back, a group gone): keep enforcing, and
        // repairing, what this same plan was enforced with.
        if let (inputs::Input::Waiting(why), Some((plan, last))) = (&input, &last_enforced) {
            if spec == Some(plan) {
                info!(waiting = %why, "the plan is unchanged; keeping the version it was enforced with");
                input = last.clone();
            } else if let (Some(s), inputs::Input::Shape { guard, target, .. }) = (spec, last) {
                // Only `enforce` moved (a quarantine began or ended while its
                // guard is held): the same version, enforced or not as asked.
                let mut same = s.clone();
                same.enforce = plan.enforce;
                if &same == plan {
                    info!(waiting = %why, enforce = s.enforce, "only enforcement changed; keeping the version it was enforced with");
                    input = inputs::Input::Shape {
                        guard: guard.clone(),
                        target: target.clone(),
                        enforce: s.enforce,
                    };
                }
            }
        }
        // Netlink is blocking: the pass runs on the kernel thread while this
        // runtime goes on answering probes and scrapes.
        let (input, outcome) = kernel.pass(input, trigger).await?;
        progress.mark();
        last_enforced = match (input, spec) {
            (i @ inputs::Input::Shape { .. }, Some(plan)) if outcome.outcome.error().is_none() => {
                Some((plan.clone(), i))
            }
            (inputs::Input::Waiting(_), _) => last_enforced,
            _ => None,
        };
        let reconciled = current;
        {
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            s.synced = true;
            s.metrics.record(&outcome);
        }
        if !outcome.tamper.is_empty() {
            heartbeat::report_tampering(&recorder, &cfg.node, &outcome.tamper).await;
        }
        // The status describes the object this pass acted on (its generation),
        // not a newer one that may have arrived meanwhile: that one gets its own pass.
        if let Some(obj) = reconciled {
            let status = status_for(&obj, &outcome, last_status.as_ref());
            // Counters and timestamps change every pass; write for them at most
            // every five minutes, and at once for anything else.
            let stale = last_write
                .is_none_or(|t: std::time::Instant| t.elapsed() > Duration::from_secs(300));
            if stale
                || outcome.wrote
                || last_status.as_ref().map(status::essence) != Some(status::essence(&status))
            {
                let patch = serde_json::json!({ "status": status });
                match api
                    .patch_status(
                        &cfg.node,
                        &PatchParams {
                            field_manager: Some("egressguard-node-shaper".into()),
                            ..PatchParams::default()
                        },
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        last_status = Some(status);
                        last_write = Some(std::time::Instant::now());
                    }
                    Err(e) => warn!(error = %e, "cannot write NodeShaping status; will retry"),
                }
            }
        }
        // What this iteration decoded and built on the runtime (watch events of
        // big groups, the input, the status) is freed by now; the kernel thread
        // trimmed after its pass, while the runtime still held it.
        crate::alloc::release_free_memory();
    }
    Ok(())
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

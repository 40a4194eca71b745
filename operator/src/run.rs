//! The operator process: its listeners, the watches behind its caches,
//! leader election, and the loop that runs a pass ([`crate::pass`]) on every
//! change while this replica leads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard_crds::serve;
use egressguard_crds::serve::prometheus_client::registry::Registry;
use egressguard_crds::{EgressGuard, NodeShaping, Quarantine};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::context::{any_active, Caches, Ctx, OpMetrics, API_SLICE, HEARTBEAT_CHECK};
use crate::kinds::Served;
use crate::leader::Leader;
use crate::own_writes::OwnWrites;
use crate::pass::{reconcile, Pass, PassError};

pub use crate::intent::FINALIZER;
pub use crate::writes::MANAGER;
/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Namespace of the leader-election Lease.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// `/healthz` and `/readyz` alone, for the kubelet: a listener with
    /// connection slots of its own, which no scrape can take.
    pub probe_addr: SocketAddr,
    /// How long a deleted guard waits for its nodes before giving up.
    pub cleanup_timeout: Duration,
    /// Recompute at least this often.
    pub resync: Duration,
    /// Which node addresses may be protected.
    pub node_addresses: crate::decide::NodeAddressPolicy,
    /// Automatic quarantine.
    pub quarantine: crate::remediate::QuarantineConfig,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No usable kubeconfig / in-cluster config.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The metrics port could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

fn spawn_reflector<K>(api: Api<K>, cfg: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    spawn_served_reflector(api, cfg, notify, Served::default())
}

/// A reflector whose watch steps also tell `served` whether the kind exists.
fn spawn_served_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    notify: Arc<Notify>,
    served: Served,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            served.observe(&ev);
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    reader
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(cfg: OperatorConfig) -> Result<(), OperatorError> {
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    let metrics = Arc::new(Mutex::new(OpMetrics::default()));
    let q_metrics = Arc::new(Mutex::new(crate::remediate::QuarantineMetrics::default()));
    serve_metrics_and_probes(&cfg, &metrics, &q_metrics).await?;
    let notify = Arc::new(Notify::new());
    let caches = watch_caches(&client, &cfg.namespace, &notify);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(cfg.identity.clone()),
        },
    );
    serve_receiver(&cfg, &client, &caches, &recorder, &q_metrics).await?;
    let ctx = Ctx {
        client: client.clone(),
        caches,
        recorder,
        cleanup_timeout: cfg.cleanup_timeout,
        node_addresses: cfg.node_addresses.clone(),
        reported: Mutex::new(Default::default()),
        metrics: metrics.clone(),
        quarantine: cfg.quarantine.clone(),
        q_metrics,
        eval: Mutex::new(Default::default()),
        noticed: Mutex::new(Default::default()),
        own: Mutex::new(OwnWrites::default()),
        index: Mutex::default(),
        heartbeat_seen: Mutex::default(),
    };
    let leader = Leader::new(
        client,
        &cfg.namespace,
        "egressguard-operator",
        &cfg.identity,
    );
    let (stop_renewing, stop_rx) = tokio::sync::oneshot::channel();
    let (leadership, renewals) = crate::leader::spawn(leader, notify.clone(), stop_rx);
    info!(identity = %cfg.identity, "egressguard-operator started");
    lead(&cfg, &ctx, &leadership, &notify).await?;
    // The renewal task releases the lease, so a successor need not wait for it to expire.
    let _ = stop_renewing.send(());
    let _ = renewals.await;
    info!("egressguard-operator stopped");
    Ok(())
}

/// `/metrics` with the probes on `--metrics-addr`, and the probes alone on
/// `--probe-addr` (connection slots of their own, which no scrape can take).
async fn serve_metrics_and_probes(
    cfg: &OperatorConfig,
    metrics: &Arc<Mutex<OpMetrics>>,
    q_metrics: &Arc<Mutex<crate::remediate::QuarantineMetrics>>,
) -> Result<(), OperatorError> {
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| OperatorError::Listen(cfg.metrics_addr, e))?;
    let mut registry = Registry::default();
    serve::register(&mut registry, metrics.clone());
    serve::register(&mut registry, q_metrics.clone());
    let probes = tokio::net::TcpListener::bind(cfg.probe_addr)
        .await
        .map_err(|e| OperatorError::Listen(cfg.probe_addr, e))?;
    let ready = |m: &Mutex<OpMetrics>| match m.lock().unwrap_or_else(|p| p.into_inner()).ready {
        true => Ok(()),
        false => Err("caches not synced yet".to_string()),
    };
    let (registry, m) = (Arc::new(registry), metrics.clone());
    tokio::spawn(serve::serve(listener, move |req| {
        // Read (and unlock) before `probes`: its collector locks the same mutex.
        let ready = ready(&m);
        let reply = serve::probes(&req, &registry, ready)
            .unwrap_or_else(|| serve::text(serve::StatusCode::NOT_FOUND, "not found\n"));
        async move { reply }
    }));
    let m = metrics.clone();
    tokio::spawn(serve::serve_with(
        probes,
        move |req| {
            let reply = serve::health(&req, Ok(()), ready(&m));
            async move { reply }
        },
        serve::Limits::probes(),
    ));
    Ok(())
}

/// One watch per kind a pass reads, each waking the loop on a change.
fn watch_caches(client: &Client, namespace: &str, notify: &Arc<Notify>) -> Caches {
    let all = watcher::Config::default;
    let (quarantines_served, groups_served) = (Served::default(), Served::default());
    Caches {
        guards: spawn_reflector(
            Api::<EgressGuard>::all(client.clone()),
            all(),
            notify.clone(),
        ),
        nodes: spawn_reflector(Api::<Node>::all(client.clone()), all(), notify.clone()),
        shapings: spawn_reflector(
            Api::<NodeShaping>::all(client.clone()),
            all(),
            notify.clone(),
        ),
        slices: spawn_reflector(
            Api::<EndpointSlice>::namespaced(client.clone(), "default"),
            all()
                .labels("kubernetes.io/service-name=kubernetes")
                .fields(&format!("metadata.name={API_SLICE}")),
            notify.clone(),
        ),
        quarantines: spawn_served_reflector(
            Api::<Quarantine>::all(client.clone()),
            all(),
            notify.clone(),
            quarantines_served.clone(),
        ),
        groups: spawn_served_reflector(
            Api::<egressguard_crds::CIDRGroup>::all(client.clone()),
            all(),
            notify.clone(),
            groups_served.clone(),
        ),
        heartbeats: spawn_reflector(
            Api::<Lease>::namespaced(client.clone(), namespace),
            all().labels(&format!(
                "{}=node-shaper",
                crate::enforcement::HEARTBEAT_LABEL
            )),
            // Every agent renews every few seconds: a pass per renewal would
            // be a pass per node per period. Staleness is a matter of time,
            // read by the passes the loop's tick schedules.
            Arc::new(Notify::new()),
        ),
        quarantines_served,
        groups_served,
    }
}

/// The Alertmanager receiver, when it has an address and a token.
async fn serve_receiver(
    cfg: &OperatorConfig,
    client: &Client,
    caches: &Caches,
    recorder: &Recorder,
    q_metrics: &Arc<Mutex<crate::remediate::QuarantineMetrics>>,
) -> Result<(), OperatorError> {
    match (&cfg.quarantine.webhook_addr, &cfg.quarantine.webhook_token) {
        (Some(addr), Some(token)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| OperatorError::Listen(*addr, e))?;
            let receiver = Arc::new(crate::receiver::Receiver {
                client: client.clone(),
                guards: caches.guards.clone(),
                nodes: caches.nodes.clone(),
                shapings: caches.shapings.clone(),
                quarantines: caches.quarantines.clone(),
                node_addresses: cfg.node_addresses.clone(),
                prometheus: cfg.quarantine.prometheus.clone(),
                token: crate::receiver::TokenFile::new(token.0.clone(), token.1.clone()),
                recorder: recorder.clone(),
                metrics: q_metrics.clone(),
            });
            info!(%addr, "Alertmanager receiver listening on /alertmanager");
            tokio::spawn(serve::serve(l, move |req| receiver.clone().handle(req)));
        }
        (Some(_), None) => warn!(
            "no --webhook-token-file: the Alertmanager receiver stays off (an unauthenticated receiver would let anyone quarantine nodes)"
        ),
        _ => {}
    }
    Ok(())
}

/// The loop: a pass on every change (and at least every tick) while this
/// replica leads, until SIGTERM or SIGINT.
async fn lead(
    cfg: &OperatorConfig,
    ctx: &Ctx,
    leadership: &crate::leader::Leadership,
    notify: &Notify,
) -> Result<(), OperatorError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(OperatorError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(OperatorError::Signal)?;
    let mut backoff = Duration::from_millis(200);
    let mut leading = false;
    loop {
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(cfg.resync.min(tick(cfg, ctx, leading))) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
        let leads = leadership.is_leading();
        if leading && !leads {
            warn!(
                deadline_seconds = crate::leader::RENEW_DEADLINE.as_secs(),
                "this replica no longer leads (another holds the Lease, or the renew deadline passed without a renewal); it stops acting"
            );
        }
        leading = leads;
        ctx.metrics.lock().unwrap_or_else(|p| p.into_inner()).leader = leads;
        if !leads {
            continue;
        }
        // Let a burst of events settle before recomputing.
        tokio::time::sleep(Duration::from_millis(150)).await;
        if !ctx.caches.ready().await {
            // A kind still listing: its watch wakes this loop when it has.
            continue;
        }
        // A pass may not outlive this replica's leadership: it is cut at the
        // renew deadline, which comes before the lease can expire and another
        // replica take over. A write a stalled network still delivers later is
        // refused by its resourceVersion (see crate::pass).
        let Some(bound) = leadership.remaining() else {
            continue;
        };
        match bounded_pass(ctx, bound).await {
            Ok(Pass::Done) => backoff = Duration::from_millis(200),
            Ok(Pass::More) => {
                backoff = Duration::from_millis(200);
                notify.notify_one();
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconcile failed; retrying");
                tokio::time::sleep(backoff).await;
                // Capped well below the lease duration, so the lease is renewed in time.
                backoff = (backoff * 2).min(Duration::from_secs(5));
                notify.notify_one();
            }
        }
    }
}

/// How long the loop may sleep without a change: the renewal task wakes it
/// when leadership changes; a leader also wakes for each Prometheus
/// evaluation, and twice a second while a quarantine is Active (its
/// heartbeat can go stale at any moment).
fn tick(cfg: &OperatorConfig, ctx: &Ctx, leading: bool) -> Duration {
    let mut tick = Duration::from_secs(if leading { 5 } else { 2 });
    if leading && cfg.quarantine.prometheus.is_some() {
        tick = tick.min(cfg.quarantine.evaluation_interval);
    }
    if leading && any_active(ctx) {
        tick = tick.min(HEARTBEAT_CHECK);
    }
    tick
}

/// One pass, abandoned at `bound`; new plan writes stop well before the
/// cut, and the next pass goes on. Counted in the metrics.
async fn bounded_pass(ctx: &Ctx, bound: Duration) -> Result<Pass, PassError> {
    let t = Instant::now();
    let stop_writing = t + bound.mul_f64(0.6);
    let res = match tokio::time::timeout(bound, reconcile(ctx, stop_writing)).await {
        Ok(r) => r,
        Err(_) => {
            warn!(
                seconds = bound.as_secs_f64(),
                "reconcile pass abandoned: it would outlive the renew deadline"
            );
            Err(PassError::Timeout(bound.as_secs_f64()))
        }
    };
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        ok = res.is_ok(),
        "reconcile pass"
    );
    let mut m = ctx.metrics.lock().unwrap_or_else(|p| p.into_inner());
    m.ready = true;
    m.reconciles += 1;
    m.seconds += t.elapsed().as_secs_f64();
    m.errors += u64::from(res.is_err());
    res
}

//! The agent's `/metrics`, `/healthz` and `/readyz`, on the HTTP server the
//! operator uses too ([`egressguard_crds::serve`]), and its probe listener:
//! `/healthz` and `/readyz` alone, with connection slots, a thread and a
//! runtime of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egressguard_crds::serve::prometheus_client::encoding::DescriptorEncoder;
use egressguard_crds::serve::prometheus_client::registry::Registry;
use egressguard_crds::serve::{self, Limits, Scrape, StatusCode};
use tokio::net::TcpListener;

use super::Shared;

impl Scrape for Shared {
    fn scrape(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        self.metrics.scrape(e)
    }
}

/// Why a probe fails: the body of its 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// `/readyz`: the first list of this node's NodeShaping has not completed.
    #[error("waiting for the first NodeShaping list")]
    NotSynced,
    /// `/healthz`: the agent's runtime has not run for this long.
    #[error("the agent's runtime has not run for {} s", .0.as_secs())]
    Stalled(Duration),
}

/// A probe's answer as [`egressguard_crds::serve`] takes it (its reason in
/// words; that signature is shared with the operator and kept).
fn answer(probe: Result<(), ProbeError>) -> Result<(), String> {
    probe.map_err(|e| e.to_string())
}

/// `/readyz`'s answer.
fn ready(shared: &Mutex<Shared>) -> Result<(), ProbeError> {
    match shared.lock().unwrap_or_else(|p| p.into_inner()).synced {
        true => Ok(()),
        false => Err(ProbeError::NotSynced),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process exits.
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    let mut registry = Registry::default();
    serve::register(&mut registry, shared.clone());
    let registry = Arc::new(registry);
    serve::serve(listener, move |req| {
        // Read (and unlock) before `probes`: its collector locks the same mutex.
        let ready = ready(&shared);
        let reply = serve::probes(&req, &registry, answer(ready))
            .unwrap_or_else(|| serve::text(StatusCode::NOT_FOUND, "not found\n"));
        async move { reply }
    })
    .await
}

/// How long the agent's runtime may go without running before `/healthz`
/// fails: far above any stall a pass or a big watch event causes, well
/// inside the kubelet's three failed probes.
pub const STALLED_AFTER: Duration = Duration::from_secs(10);

/// When the agent's runtime last ran: marked every second by a task on
/// that runtime, read by the probe thread for `/healthz`. (Not the
/// heartbeat Lease, which tells the operator the agent runs.)
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    /// Milliseconds after `start` of the last mark.
    last: AtomicU64,
}

impl Liveness {
    /// Marked now.
    pub fn new() -> Liveness {
        Liveness {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records that the runtime runs.
    pub fn mark(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Time since the last mark.
    pub fn age(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

/// `/healthz`'s answer: the runtime ran within `limit`.
pub fn live(age: Duration, limit: Duration) -> Result<(), ProbeError> {
    match age > limit {
        true => Err(ProbeError::Stalled(age)),
        false => Ok(()),
    }
}

/// Serves `/healthz` and `/readyz` alone, within [`Limits::probes`], on a
/// thread and a single-threaded runtime of their own until the process
/// exits: nothing the agent's runtime does (a scrape, a big watch event
/// being decoded, a status write) delays a probe. `/healthz` fails when the
/// agent's runtime stopped marking `alive` for [`STALLED_AFTER`].
pub fn spawn_probes(
    listener: std::net::TcpListener,
    shared: Arc<Mutex<Shared>>,
    alive: Arc<Liveness>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve the probes");
                        return;
                    }
                };
                serve::serve_with(
                    listener,
                    move |req| {
                        let live = answer(live(alive.age(), STALLED_AFTER));
                        let reply = serve::health(&req, live, answer(ready(&shared)));
                        async move { reply }
                    },
                    Limits::probes(),
                )
                .await
            })
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_only_when_the_runtime_stopped_for_the_limit() {
        let limit = Duration::from_secs(10);
        assert!(live(Duration::ZERO, limit).is_ok());
        assert!(live(Duration::from_millis(9_999), limit).is_ok());
        let e = live(Duration::from_millis(11_500), limit).expect_err("stalled");
        assert_eq!(e, ProbeError::Stalled(Duration::from_millis(11_500)));
        assert_eq!(e.to_string(), "the agent's runtime has not run for 11 s");
        assert_eq!(
            answer(Err(ProbeError::NotSynced)),
            Err("waiting for the first NodeShaping list".to_string())
        );
        let h = Liveness::new();
        h.mark();
        assert!(h.age() < Duration::from_secs(1));
    }
}

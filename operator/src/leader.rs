//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas are
//! safe: only the holder reconciles; a holder that stops renewing for
//! `LEASE_SECONDS` is replaced.
//!
//! Renewal runs in its own task ([`spawn`]), so a long pass never starves it,
//! and a holder that has not renewed for [`RENEW_DEADLINE`] stops acting
//! before its lease can expire and another replica take over (client-go's
//! leaderelection does the same with RenewDeadline < LeaseDuration).

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tracing::{info, warn};

/// Seconds a lease stays valid without renewal.
pub const LEASE_SECONDS: i32 = 15;
/// A holder that could not renew for this long stops acting (well inside the lease).
pub const RENEW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the holder renews and a follower tries to acquire.
pub const RETRY_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this replica may act now, shared with the renewal task.
#[derive(Clone, Debug, Default)]
pub struct Leadership {
    renewed: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Leadership {
    /// How long this replica may still act: the renew deadline counted from
    /// the start of its last successful renewal; `None` when it does not lead.
    pub fn remaining(&self) -> Option<std::time::Duration> {
        let at = (*self.renewed.lock().unwrap_or_else(|p| p.into_inner()))?;
        RENEW_DEADLINE
            .checked_sub(at.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// Does this replica lead now?
    pub fn is_leading(&self) -> bool {
        self.remaining().is_some()
    }

    fn set(&self, at: Option<std::time::Instant>) {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

/// Runs `leader`'s renewals every [`RETRY_PERIOD`] until `stop` fires, then
/// releases the lease. `changed` is notified when leadership starts or ends.
pub fn spawn(
    mut leader: Leader,
    changed: std::sync::Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let state = Leadership::default();
    let shared = state.clone();
    let task = tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            // A renewal stuck on a stalled API server must not hold leadership:
            // give up on it at the deadline.
            let outcome = tokio::time::timeout(RENEW_DEADLINE, leader.renew())
                .await
                .ok()
                .flatten();
            let was = shared.is_leading();
            match outcome {
                Some(true) => shared.set(Some(started)),
                // Definitely not the holder: stop at once.
                Some(false) => shared.set(None),
                // Unknown (error, timeout): the deadline decides.
                None => {}
            }
            if was != shared.is_leading() {
                changed.notify_one();
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_PERIOD.saturating_sub(started.elapsed())) => {}
                _ = &mut stop => break,
            }
        }
        shared.set(None);
        leader.release().await;
    });
    (state, task)
}

/// One replica's view of the lease.
pub struct Leader {
    api: Api<Lease>,
    name: String,
    identity: String,
    leading: bool,
    failed: bool,
}

impl Leader {
    /// A contender for `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Leader {
        Leader {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            leading: false,
            failed: false,
        }
    }

    /// Acquires or renews the lease; true while this replica leads.
    pub async fn try_lead(&mut self) -> bool {
        let now = MicroTime(Timestamp::now());
        let mine = |l: &mut Lease, acquire: bool| {
            let spec = l.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = Some(self.identity.clone());
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            spec.renew_time = Some(now.clone());
            if acquire {
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        };
        let result = match self.api.get_opt(&self.name).await {
            Ok(None) => {
                let mut l = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: None,
                };
                mine(&mut l, true);
                self.api
                    .create(&PostParams::default(), &l)
                    .await
                    .map(|_| true)
            }
            Ok(Some(mut l)) => {
                let spec = l.spec.clone().unwrap_or_default();
                let held_by_me = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = spec.renew_time.as_ref().is_none_or(|t| {
                    Timestamp::now().duration_since(t.0).as_secs()
                        > i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
                });
                if held_by_me || expired {
                    mine(&mut l, !held_by_me);
                    // The resourceVersion in `l` makes a racing replica's write a 409.
                    self.api
                        .replace(&self.name, &PostParams::default(), &l)
                        .await
                        .map(|_| true)
                } else {
                    Ok(false)
                }
            }
            Err(e) => Err(e),
        };
        let leading = match result {
            Ok(b) => b,
            Err(kube::Error::Api(e)) if e.code == 409 => false,
            Err(e) => {
                warn!(error = %e, "lease update failed");
                self.failed = true;
                false
            }
        };
        if leading != self.leading {
            info!(identity = %self.identity, leading, "leadership changed");
        }
        self.leading = leading;
        leading
    }

    /// One renewal: `Some(true)` leads, `Some(false)` another replica holds
    /// the lease (or took it over), `None` the API could not be asked.
    pub async fn renew(&mut self) -> Option<bool> {
        self.failed = false;
        let leading = self.try_lead().await;
        (leading || !self.failed).then_some(leading)
    }

    /// Gives the lease up on shutdown so another replica takes over at once.
    pub async fn release(&mut self) {
        if !self.leading {
            return;
        }
        if let Ok(Some(mut l)) = self.api.get_opt(&self.name).await {
            // Only give up what is still ours.
            let ours = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str());
            if !ours {
                self.leading = false;
                return;
            }
            if let Some(spec) = l.spec.as_mut() {
                spec.holder_identity = None;
                spec.renew_time = None;
            }
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &l)
                .await;
        }
        self.leading = false;
    }
}
/// `<hostname>-<8 random hex digits>`: two replicas never share an identity,
/// even in containers where both are pid 1 on hosts with the same name.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "egressguard-operator".into());
    let mut bytes = [0u8; 4];
    let suffix = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_or_else(
            // No urandom: time and pid still differ between replicas.
            |_| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                t ^ std::process::id()
            },
            |()| u32::from_le_bytes(bytes),
        );
    format!("{host}-{suffix:08x}")
}

#[cfg(test)]
mod identity_tests {
    #[test]
    fn default_identities_are_unique_and_name_the_host() {
        let (a, b) = (super::default_identity(), super::default_identity());
        assert_ne!(a, b);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        assert!(a.starts_with(host.trim()), "{a}");
    }
}

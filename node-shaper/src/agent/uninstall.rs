//! Whether a SIGTERM means "the chart was uninstalled" (remove the shaping)
//! or anything else (keep it).
//!
//! `helm uninstall` deletes the DaemonSet and, a moment later, the Role, the
//! bindings and the ServiceAccount: by the time the kubelet stops the pod,
//! the agent's credentials are usually refused. So the agent watches its own
//! DaemonSet for its whole life ([`watch`]) and remembers what it saw; on
//! SIGTERM that memory decides, and a GET is the fallback.
//!
//! # Guarantees
//! - Shaping is removed only on evidence read with valid credentials: the
//!   watch saw the DaemonSet deleted or being deleted, or a GET answered 404
//!   or showed a deletionTimestamp.
//! - A refused request (401, 403), a timeout or any other error keeps the
//!   shaping: an RBAC mistake during an upgrade must not unshape the fleet.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, ObjectMeta, PartialObjectMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch as latest;
use tracing::{info, warn};

/// What the agent's watch of its own DaemonSet saw last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Watched {
    /// Nothing yet: the watch has not listed (or is not allowed to).
    #[default]
    Nothing,
    /// Present, not being deleted.
    Present,
    /// Present with a deletionTimestamp.
    Deleting,
    /// Deleted: a Delete event, or a successful list without it.
    Deleted,
}

/// What a GET of the DaemonSet answered on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Not asked: the watch had already seen the DaemonSet go.
    NotAsked,
    /// Present, not being deleted.
    Present,
    /// Present with a deletionTimestamp.
    Deleting,
    /// 404 with credentials the API server accepted.
    NotFound,
    /// The credentials were refused (401) or not allowed (403).
    Refused(u16),
    /// Any other error.
    Failed(String),
    /// No answer within the deadline.
    TimedOut,
}

/// What SIGTERM does to the shaping, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The chart was uninstalled: remove the shaping.
    Remove(String),
    /// A restart, an update, or no proof of an uninstall: keep the shaping.
    Keep(String),
}

/// Decides from what the watch saw and what the GET answered. Pure.
pub fn uninstall_verdict(watched: Watched, fetched: &Fetched) -> Verdict {
    match (watched, fetched) {
        (Watched::Deleted, _) => Verdict::Remove("the watch saw this agent's DaemonSet deleted".into()),
        (Watched::Deleting, _) => {
            Verdict::Remove("the watch saw this agent's DaemonSet being deleted".into())
        }
        (_, Fetched::NotFound) => Verdict::Remove("this agent's DaemonSet is gone (404)".into()),
        (_, Fetched::Deleting) => {
            Verdict::Remove("this agent's DaemonSet has a deletionTimestamp".into())
        }
        (_, Fetched::Present) => {
            Verdict::Keep("this agent's DaemonSet is present (a restart or an update)".into())
        }
        (_, Fetched::Refused(code)) => Verdict::Keep(format!(
            "the API server refused this agent's credentials ({code}) and its watch never saw the DaemonSet go: a broken Role or binding is no proof of an uninstall"
        )),
        (_, Fetched::Failed(e)) => {
            Verdict::Keep(format!("cannot tell whether the DaemonSet is being deleted: {e}"))
        }
        (_, Fetched::TimedOut) => Verdict::Keep("the API server did not answer in time".into()),
        (_, Fetched::NotAsked) => Verdict::Keep("nothing says the DaemonSet is going".into()),
    }
}

fn state_of(meta: &ObjectMeta) -> Watched {
    match meta.deletion_timestamp {
        Some(_) => Watched::Deleting,
        None => Watched::Present,
    }
}

/// Watches DaemonSet `ns/name` (a field-selected, namespaced watch of its
/// metadata only: a deletionTimestamp is all it needs) for as long as the
/// runtime runs; the receiver holds what it saw last. A failing watch
/// (refused, unreachable) leaves the last observation as it was.
pub fn watch(client: kube::Client, ns: &str, name: &str) -> latest::Receiver<Watched> {
    let (tx, rx) = latest::channel(Watched::Nothing);
    let api: Api<PartialObjectMeta<DaemonSet>> = Api::namespaced(client, ns);
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, wc).default_backoff();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut listing = None;
        while let Some(ev) = stream.next().await {
            let seen = match ev {
                Ok(Event::Init) => {
                    listing = None;
                    continue;
                }
                Ok(Event::InitApply(d)) => {
                    listing = Some(state_of(&d.metadata));
                    continue;
                }
                // Listed with valid credentials and not found: gone.
                Ok(Event::InitDone) => listing.take().unwrap_or(Watched::Deleted),
                Ok(Event::Apply(d)) => state_of(&d.metadata),
                Ok(Event::Delete(_)) => Watched::Deleted,
                Err(e) => {
                    warn!(daemonset = %name, error = %e, "watch of this agent's DaemonSet failed; keeping what it saw last, retrying with backoff");
                    continue;
                }
            };
            if *tx.borrow() != seen && seen != Watched::Present {
                info!(daemonset = %name, state = ?seen, "this agent's DaemonSet is going: a SIGTERM will remove the shaping");
            }
            tx.send_replace(seen);
        }
    });
    rx
}

/// Reads the DaemonSet's metadata once, within `deadline`.
pub async fn fetch(client: kube::Client, ns: &str, name: &str, deadline: Duration) -> Fetched {
    let api: Api<PartialObjectMeta<DaemonSet>> = Api::namespaced(client, ns);
    match tokio::time::timeout(deadline, api.get_opt(name)).await {
        Ok(Ok(None)) => Fetched::NotFound,
        Ok(Ok(Some(d))) => match state_of(&d.metadata) {
            Watched::Deleting => Fetched::Deleting,
            _ => Fetched::Present,
        },
        Ok(Err(kube::Error::Api(e))) if e.code == 401 || e.code == 403 => Fetched::Refused(e.code),
        Ok(Err(e)) => Fetched::Failed(e.to_string()),
        Err(_) => Fetched::TimedOut,
    }
}

/// The verdict on SIGTERM for DaemonSet `ds` (`None`: not configured, keep),
/// given what the watch saw; asks the API server only when the watch did
/// not already see the DaemonSet go.
pub async fn on_sigterm(
    client: &kube::Client,
    ds: Option<&(String, String)>,
    watched: Watched,
) -> Verdict {
    let Some((ns, name)) = ds else {
        return Verdict::Keep("no --daemonset configured".into());
    };
    let fetched = match watched {
        Watched::Deleted | Watched::Deleting => Fetched::NotAsked,
        Watched::Nothing | Watched::Present => {
            fetch(client.clone(), ns, name, Duration::from_secs(5)).await
        }
    };
    let verdict = uninstall_verdict(watched, &fetched);
    if let (Fetched::Refused(code), Verdict::Keep(why)) = (&fetched, &verdict) {
        warn!(code, daemonset = %format!("{ns}/{name}"), %why, "SIGTERM with refused credentials: keeping the shaping (fix the Role or its binding; `helm uninstall` is seen by the watch)");
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_daemonset_seen_going_with_valid_credentials_means_uninstall() {
        use Fetched as F;
        use Watched as W;
        let remove = true;
        let keep = false;
        let table: &[(&str, W, F, bool)] = &[
            ("404", W::Present, F::NotFound, remove),
            ("404, never watched", W::Nothing, F::NotFound, remove),
            ("deletionTimestamp", W::Present, F::Deleting, remove),
            ("watch saw Delete", W::Deleted, F::NotAsked, remove),
            (
                "watch saw Delete, RBAC gone since",
                W::Deleted,
                F::Refused(401),
                remove,
            ),
            (
                "watch saw deletionTimestamp",
                W::Deleting,
                F::NotAsked,
                remove,
            ),
            ("401", W::Present, F::Refused(401), keep),
            ("403", W::Present, F::Refused(403), keep),
            ("403, never watched", W::Nothing, F::Refused(403), keep),
            ("timeout", W::Present, F::TimedOut, keep),
            ("timeout, never watched", W::Nothing, F::TimedOut, keep),
            ("other error", W::Present, F::Failed("500".into()), keep),
            ("DaemonSet present", W::Present, F::Present, keep),
            ("present, never watched", W::Nothing, F::Present, keep),
            ("no evidence at all", W::Nothing, F::NotAsked, keep),
        ];
        for (case, watched, fetched, want) in table {
            let got = uninstall_verdict(*watched, fetched);
            assert_eq!(matches!(got, Verdict::Remove(_)), *want, "{case}: {got:?}");
        }
        // The reason names the cause.
        let Verdict::Keep(why) = uninstall_verdict(W::Present, &F::Refused(403)) else {
            panic!("403 removed the shaping");
        };
        assert!(why.contains("(403)"), "{why}");
    }
}

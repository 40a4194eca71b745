//! Which of the API's kinds this cluster serves. An upgrade that did not
//! install every CRD (Helm never upgrades a chart's `crds/` folder; a manual
//! install of only some files) must not stop the operator from reconciling
//! the kinds that are there: each kind's watch runs on its own, and a kind
//! the API server does not know is reported instead of waited for.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use kube::runtime::watcher;

/// The CRDs a later release added, which an upgrade may have left out.
pub const QUARANTINES: &str = "quarantines.egressguard.io";
/// See [`QUARANTINES`].
pub const CIDR_GROUPS: &str = "cidrgroups.egressguard.io";

/// What a kind's watch found, shared between its task and the passes.
#[derive(Clone, Debug, Default)]
pub struct Served(Arc<AtomicU8>);

// 0: not known yet (no watch step so far).
const SERVED: u8 = 1;
const MISSING: u8 = 2;

impl Served {
    /// Records the outcome of one watch step.
    pub fn observe<T>(&self, step: &Result<T, watcher::Error>) {
        let state = match step {
            Ok(_) => SERVED,
            Err(e) if not_served(e) => MISSING,
            // Other errors (a timeout, a 500) say nothing about the CRD.
            Err(_) => return,
        };
        self.0.store(state, Ordering::Relaxed);
    }

    /// The API server answered 404 to the kind's list or watch: its CRD is
    /// not installed (or not established yet).
    pub fn missing(&self) -> bool {
        self.0.load(Ordering::Relaxed) == MISSING
    }
}

fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// The CRDs a pass found missing, in words for a condition's message.
pub fn missing_message(missing: &[&str]) -> String {
    format!(
        "not served by the API server: {}. Guards that name CIDRGroups keep the plans they had and Auto guards cannot quarantine until the CRDs are installed: `helm upgrade` installs them with the chart (or `kubectl apply -f crds/`)",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn a_404_marks_the_kind_missing_until_a_watch_step_succeeds() {
        let s = Served::default();
        assert!(!s.missing());
        s.observe::<()>(&Err(watcher::Error::InitialListFailed(api(404))));
        assert!(s.missing());
        // A timeout or a 500 says nothing about the CRD.
        s.observe::<()>(&Err(watcher::Error::InitialListFailed(api(500))));
        assert!(s.missing());
        s.observe(&Ok(()));
        assert!(!s.missing());
        s.observe::<()>(&Err(watcher::Error::WatchFailed(api(403))));
        assert!(!s.missing());
    }
}

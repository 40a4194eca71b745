//! What was last applied to each interface, kept under `/run/egressguard`
//! (tmpfs: it goes away with the kernel state at reboot) so `explain` and
//! `show` can name spec fields and protected entries. Best effort: the
//! kernel stays the source of truth.

use std::path::PathBuf;

use crate::iface::Interface;
use crate::target::Target;

/// The state directory (`EGRESSGUARD_STATE_DIR` overrides it).
pub fn dir() -> PathBuf {
    std::env::var_os("EGRESSGUARD_STATE_DIR")
        .map_or_else(|| PathBuf::from("/run/egressguard"), PathBuf::from)
}

/// Path of an interface's record.
pub fn path(iface: &str) -> PathBuf {
    dir().join(format!("{iface}.yaml"))
}

/// Records what was applied to `iface`.
pub fn remember(iface: &Interface, target: &Target) {
    let write = || -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir())?;
        let mut text = serde_yaml::to_string(&target.to_node_shaping(&iface.name))?;
        for g in target.group_objects() {
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(&g)?);
        }
        std::fs::write(path(&iface.name), text)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, "could not record the applied plan; explain will show kernel handles only");
    }
}

/// Forgets an interface's record.
pub fn forget(iface: &str) {
    let _ = std::fs::remove_file(path(iface));
}

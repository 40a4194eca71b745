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
    remember_name(&iface.name, target);
}

/// Records what was applied to the interface named `iface`: streamed to a
/// temporary file, one document at a time, then renamed over the record
/// (a 100,000-entry record is a few MiB of YAML; it is never held whole).
pub fn remember_name(iface: &str, target: &Target) {
    use std::io::Write as _;
    let write = || -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir())?;
        let tmp = dir().join(format!(".{iface}.yaml.tmp"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_yaml::to_writer(&mut out, &target.to_node_shaping(iface))?;
        for g in target.group_objects() {
            out.write_all(b"---\n")?;
            serde_yaml::to_writer(&mut out, &g)?;
        }
        out.into_inner()
            .map_err(|e| e.into_error())?
            .sync_data()
            .ok();
        std::fs::rename(&tmp, path(iface))?;
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

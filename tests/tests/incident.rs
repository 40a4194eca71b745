//! The incident lab (`scripts/incident-lab.sh`, the README's main command),
//! with shorter settings and every expectation a hard assertion.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use egressguard_e2e::cluster::{self, TempDir};
use egressguard_e2e::lab::{self, Settings};
use egressguard_e2e::site::available;

#[test]
fn e2e_the_incident_lab_ends_the_outage() {
    if !available() {
        return;
    }
    let root = cluster::root();
    let out = std::env::temp_dir().join(format!("eglab-{}", cluster::unique()));
    std::fs::create_dir_all(&out).expect("out");
    let _cleanup = TempDir(out.clone());
    // The example guard with a shorter calm window.
    let text = std::fs::read_to_string(root.join("examples/incident/guard.yaml")).expect("example");
    assert!(
        text.contains("after: 15s"),
        "the example's release window moved; update this test"
    );
    let guard = out.join("guard.yaml");
    std::fs::write(&guard, text.replace("after: 15s", "after: 6s")).expect("guard");
    let settings = Settings {
        baseline: Duration::from_secs(6),
        hold: Duration::from_secs(10),
        guard,
        ..Settings::defaults(&root)
    };
    let stop = AtomicBool::new(false);
    let report = lab::run_lab(&settings, &out, &stop, &mut |line| eprintln!("{line}"))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", lab::render_table(&report));
    for (what, ok) in &report.checks {
        assert!(
            ok,
            "{what}\n{}\nnode-1 while quarantined:\n{}\nnode-1's classes at the end of the capped flood:\n{}",
            lab::render_table(&report),
            report.show_quarantined,
            report.classes_capped
        );
    }
    let t = &report.timeline;
    assert!(t.quarantined > t.flood_start && t.throttled >= t.quarantined);
    assert!(report.get_egq.contains("Released"), "{}", report.get_egq);
    assert!(
        report.show_quarantined.contains("throttled"),
        "{}",
        report.show_quarantined
    );
    assert!(
        lab::leftovers().is_empty(),
        "the lab left namespaces: {:?}",
        lab::leftovers()
    );
    eprintln!(
        "LAB detection {:.1}s, enforcement {:.1}s, flows back {:.1}s after the throttle, release {:.1}s after the flood stopped",
        t.quarantined - t.flood_start,
        t.throttled - t.quarantined,
        t.recovered - t.throttled,
        t.released - t.flood_stop
    );
}

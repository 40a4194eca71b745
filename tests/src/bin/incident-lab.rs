//! `incident-lab [--out DIR] [--clean]`: replays the incident on this
//! machine and shows the system ending it (see `egressguard_e2e::lab`).
//! Run through `scripts/incident-lab.sh`, which installs and builds first.
//!
//! Exit codes: 0 every expectation held; 1 one failed (named); 2 bad usage
//! or leftovers of a previous run.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use egressguard_e2e::lab::{self, LabError, Report, Settings};
use egressguard_e2e::plot::{self, Line, Marker};
use plotters::style::RGBColor;

const USAGE: &str = "usage: incident-lab [--out DIR] [--clean]\n  --out DIR  where the table, the chart and the logs go (default: ./incident-lab-<time>)\n  --clean    remove what an interrupted run left behind, then exit";

fn main() -> ExitCode {
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => match args.next() {
                Some(d) => out = Some(PathBuf::from(d)),
                None => return usage("--out needs a directory"),
            },
            "--clean" => {
                lab::clean();
                eprintln!("removed the lab's network namespaces and their processes");
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let out = out.unwrap_or_else(|| {
        let stamp = std::process::Command::new("date")
            .arg("+%Y%m%d-%H%M%S")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| std::process::id().to_string());
        PathBuf::from(format!("incident-lab-{stamp}"))
    });
    let left = lab::leftovers();
    if !left.is_empty() {
        eprintln!("error: {}", LabError::Leftovers(left));
        return ExitCode::from(2);
    }
    if out.exists() && std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_some()) {
        return usage(&format!(
            "{} exists and is not empty; pick another --out",
            out.display()
        ));
    }
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("error: cannot create {}: {e}", out.display());
        return ExitCode::from(2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone());
    let root = egressguard_e2e::cluster::root();
    let settings = Settings::defaults(&root);
    let tty = std::io::stderr().is_terminal();
    let mut progress = |line: &str| {
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    };
    eprintln!("incident lab: output in {}", out.display());
    // A panic inside (a setup command that failed) still unwinds through the
    // lab's drop guards, which remove everything it created.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab::run_lab(&settings, &out, &stop, &mut progress)
    }));
    if tty {
        eprintln!();
    }
    match result {
        Ok(Ok(report)) => finish(&report, &settings, &out),
        Ok(Err(e @ LabError::Leftovers(_))) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Ok(Err(e)) => {
            eprintln!("FAILED: {e}\n(logs: {})", out.join("logs").display());
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("FAILED: the lab's setup failed (see the message above); everything it created was removed");
            ExitCode::from(1)
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("error: {why}\n{USAGE}");
    ExitCode::from(2)
}

/// Ctrl-C and SIGTERM set `stop`; the lab notices within 200 ms and unwinds.
fn watch_signals(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
}

fn finish(r: &Report, s: &Settings, out: &std::path::Path) -> ExitCode {
    let t = &r.timeline;
    let mut text = String::new();
    text.push_str("# The incident, replayed\n\n");
    text.push_str(&format!(
        "Site uplink {} Mbit/s (TBF). node-1: business flow to 198.51.100.10 (whitelisted) at {} Mbit/s, then the flood: \
         iperf3, {} TCP connections each to 203.0.113.80:80 and 203.0.113.81:443. node-2: ordinary traffic at {} Mbit/s.\n\n",
        s.uplink_mbit, s.business_mbit, s.flood_streams, s.other_mbit
    ));
    text.push_str("## Timeline (seconds since the flows started)\n\n");
    let breach = t
        .breach
        .map_or("not seen".to_string(), |b| format!("{b:.1}"));
    text.push_str(&format!(
        "| moment | t |\n|---|---|\n| guard applied (`kubectl apply -f examples/incident/guard.yaml`) | {:.1} |\n| flood starts on node-1 | {:.1} |\n| Prometheus sees node-1 above 20 Mbit/s | {breach} |\n| Quarantine of node-1 Active | {:.1} |\n| node-1's kernel throttles 80/443 | {:.1} |\n| business and other node's TCP flows back (their retransmission timers) | {:.1} |\n| flood stops | {:.1} |\n| node-1 released, kernel back to normal | {:.1} |\n\n",
        t.guard_applied, t.flood_start, t.quarantined, t.throttled, t.recovered, t.flood_stop, t.released
    ));
    let enforcement = t.throttled - t.quarantined;
    let enforcement = if enforcement < 0.3 {
        "under 0.3 s (the kernel was throttled by the time the lab, polling every 0.2 s, saw the quarantine)".to_string()
    } else {
        format!("{enforcement:.1} s")
    };
    text.push_str(&format!(
        "Detection: {:.1} s from the flood's start to the quarantine{}. Enforcement: {} from the quarantine to the throttle in the kernel. \
         Release: {:.1} s after the flood stopped: the queued flood drains at the throttled rate, then the 5 s rate window and the guard's 15 s calm window pass.\n\n",
        t.quarantined - t.flood_start,
        t.breach.map_or(String::new(), |b| format!(" ({:.1} s after Prometheus first saw the breach)", t.quarantined - b)),
        enforcement,
        t.released - t.flood_stop
    ));
    text.push_str("## Measured rates (Mbit/s, iperf3 goodput, mean over each phase)\n\n");
    text.push_str(&lab::render_table(r));
    text.push_str("\n## Expectations\n\n");
    for (what, ok) in &r.checks {
        text.push_str(&format!("- [{}] {what}\n", if *ok { "x" } else { " " }));
    }
    text.push_str("\n## The chart's PromQL against the lab's Prometheus\n\n");
    text.push_str(&lab::render_queries(r));
    text.push_str(&format!(
        "\n## kubectl get eg\n\n```text\n{}```\n\n## kubectl get egq\n\n```text\n{}```\n\n## node-shaper show on node-1, while quarantined\n\n```text\n{}```\n\n## node-shaper show on node-1, at the end\n\n```text\n{}```\n",
        r.get_eg, r.get_egq, r.show_quarantined, r.show_end
    ));
    let chart = out.join("chart.png");
    let points = |i: usize| -> Vec<(f64, f64)> {
        r.series.iter().map(|p| (p.0, [p.1, p.2, p.3][i])).collect()
    };
    let (b, f, o) = (points(0), points(1), points(2));
    let drawn = plot::draw(
        &chart,
        "The incident, replayed: node-1 floods 80/443, EgressGuard quarantines it",
        &[
            Line {
                label: "business (node-1, whitelisted)",
                points: &b,
                color: RGBColor(31, 119, 180),
            },
            Line {
                label: "flood 80/443 (node-1)",
                points: &f,
                color: RGBColor(214, 39, 40),
            },
            Line {
                label: "other node (node-2)",
                points: &o,
                color: RGBColor(44, 160, 44),
            },
        ],
        &[
            Marker {
                at: t.flood_start,
                label: "flood",
            },
            Marker {
                at: t.breach.unwrap_or(t.flood_start),
                label: "breach",
            },
            Marker {
                at: t.throttled,
                label: "quarantined",
            },
            Marker {
                at: t.flood_stop,
                label: "flood stops",
            },
            Marker {
                at: t.released,
                label: "released",
            },
        ],
    );
    let mut csv = String::from("t,business_mbit,flood_mbit,other_mbit\n");
    for p in &r.series {
        csv.push_str(&format!("{:.1},{:.3},{:.3},{:.3}\n", p.0, p.1, p.2, p.3));
    }
    let writes = [
        std::fs::write(out.join("report.md"), &text),
        std::fs::write(out.join("series.csv"), csv),
    ];
    println!("{text}");
    match drawn {
        Ok(()) => println!("chart: {}", chart.display()),
        Err(e) => eprintln!("warning: no chart: {e}"),
    }
    println!(
        "report: {}  (logs in {})",
        out.join("report.md").display(),
        out.join("logs").display()
    );
    if let Some(Err(e)) = writes.into_iter().find(Result::is_err) {
        eprintln!("error: cannot write to {}: {e}", out.display());
        return ExitCode::from(1);
    }
    match r.checks.iter().find(|(_, ok)| !ok) {
        None => {
            println!("PASSED: every expectation held");
            ExitCode::SUCCESS
        }
        Some((what, _)) => {
            println!("FAILED: {what}");
            ExitCode::from(1)
        }
    }
}

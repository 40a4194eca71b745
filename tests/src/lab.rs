//! The incident, replayed on one machine: a site of two nodes behind one
//! shaped uplink, a real control plane, the operator, an agent per node,
//! node-exporter, Prometheus with the chart's alert rule, and Alertmanager
//! routed to the operator's authenticated receiver. One node is compromised
//! and floods TCP 80/443; the lab measures every flow each second and checks
//! that the system ends the outage on its own.
//!
//! Topology (network namespaces, all created and removed by the lab):
//!
//! ```text
//!  node-1 ─eg0┐                          ┌ 198.51.100.10:5201 business (whitelisted)
//!             ├─ api (router, control    │ 203.0.113.80:80, .81:443 flood targets
//!  node-2 ─eg0┘   plane, operator,  wan0 ┤ 203.0.113.20:8080 other node's server
//!                 Prometheus, AM) ──TBF──┘ inet
//!                           site uplink (the bottleneck)
//! ```
//!
//! The flood is iperf3 with many parallel TCP connections per port: like
//! the incident's malware it opens many connections to 80/443 and takes the
//! uplink by sheer numbers, and unlike a raw SYN generator each connection's
//! throughput is measured exactly and costs little CPU, so the two cores
//! stay free for the control plane. (A SYN flood is classified by the same
//! u32 port match; its tiny packets only change how fast the uplink fills.)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster;
use crate::monitoring::{self, Ports};
use crate::site::{Cluster, Names};

/// Namespace names of the lab (fixed, so leftovers are recognisable).
pub const NAMESPACES: [&str; 4] = ["eglab-api", "eglab-node1", "eglab-node2", "eglab-inet"];
const INET: &str = "eglab-inet";
const BUSINESS: &str = "198.51.100.10";
const FLOOD_80: &str = "203.0.113.80";
const FLOOD_443: &str = "203.0.113.81";
const OTHER: &str = "203.0.113.20";
const PORTS: Ports = Ports {
    exporter: 0,
    prometheus: 9090,
    alertmanager: 9093,
    receiver: 9466,
};

/// How long each part of the story lasts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Site uplink (TBF), Mbit/s.
    pub uplink_mbit: u32,
    /// The business flow's rate, Mbit/s (iperf3 -b).
    pub business_mbit: f64,
    /// The other node's flow, Mbit/s.
    pub other_mbit: f64,
    /// TCP connections per flood port.
    pub flood_streams: u32,
    /// Calm before the flood.
    pub baseline: Duration,
    /// How long the flood goes on after the node is throttled.
    pub hold: Duration,
    /// The guard to apply (`kubectl apply -f`).
    pub guard: PathBuf,
    /// Give up waiting for any one step after this long.
    pub step_timeout: Duration,
}

impl Settings {
    /// The README's defaults: the whole story in under three minutes.
    pub fn defaults(root: &Path) -> Settings {
        Settings {
            uplink_mbit: 40,
            business_mbit: 4.0,
            other_mbit: 4.0,
            flood_streams: 16,
            baseline: Duration::from_secs(10),
            hold: Duration::from_secs(15),
            guard: root.join("examples/incident/guard.yaml"),
            step_timeout: Duration::from_secs(90),
        }
    }
}

/// Why the lab stopped early, or which expectation failed.
#[derive(Debug)]
pub enum LabError {
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// A previous run left namespaces behind.
    Leftovers(Vec<String>),
    /// Something the lab needs did not happen in time.
    Timeout(String),
    /// An expectation about the outcome failed.
    Expectation(String),
    /// Any other failure.
    Other(String),
}

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabError::Interrupted => write!(f, "interrupted; everything the lab created was removed"),
            LabError::Leftovers(l) => write!(
                f,
                "a previous run left network namespaces behind ({}); remove them with `bash scripts/incident-lab.sh --clean`",
                l.join(", ")
            ),
            LabError::Timeout(what) => write!(f, "timed out waiting for: {what}"),
            LabError::Expectation(what) => write!(f, "expectation failed: {what}"),
            LabError::Other(what) => f.write_str(what),
        }
    }
}

/// One measured flow: (seconds since start, Mbit/s) per iperf3 interval.
type Samples = Arc<Mutex<Vec<(f64, f64)>>>;

/// The moments of the story, in seconds since the lab's clock started.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// `kubectl apply -f` of the guard.
    pub guard_applied: f64,
    /// The compromised node starts flooding.
    pub flood_start: f64,
    /// Prometheus first sees node-1 above the trigger threshold.
    pub breach: Option<f64>,
    /// A Quarantine for node-1 is Active.
    pub quarantined: f64,
    /// node-1's kernel holds the throttle.
    pub throttled: f64,
    /// Both TCP flows are back near their rates (their retransmission
    /// timers, backed off during the flood, decide when).
    pub recovered: f64,
    /// The flood stops.
    pub flood_stop: f64,
    /// The Quarantine is Released and node-1's kernel is back to normal.
    pub released: f64,
    /// The end.
    pub end: f64,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The moments.
    pub timeline: Timeline,
    /// Mean Mbit/s per (phase, flow).
    pub table: Vec<(String, f64, [f64; 3])>,
    /// Per-second rates: (t, business, flood, other).
    pub series: Vec<(f64, f64, f64, f64)>,
    /// `kubectl get eg` at the end.
    pub get_eg: String,
    /// `kubectl get egq` at the end.
    pub get_egq: String,
    /// `node-shaper show` on node-1 while it was quarantined.
    pub show_quarantined: String,
    /// `node-shaper show` on node-1 at the end.
    pub show_end: String,
    /// node-1's classes with their counters (`tc -s class show`) at the end of
    /// the capped flood: which class each flow's bytes went through.
    pub classes_capped: String,
    /// Expectations checked, each with whether it held.
    pub checks: Vec<(String, bool)>,
}

/// Lists lab namespaces that exist now.
pub fn leftovers() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    NAMESPACES
        .iter()
        .filter(|n| {
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(**n))
        })
        .map(|n| n.to_string())
        .collect()
}

/// Kills what runs in the lab's namespaces and deletes them.
pub fn clean() {
    for ns in leftovers() {
        let ns = ns.as_str();
        if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

fn run(args: &[&str]) -> Result<String, LabError> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| LabError::Other(format!("{}: {e}", args.join(" "))))?;
    if !o.status.success() {
        return Err(LabError::Other(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The internet namespace and the site uplink, removed on drop.
struct Internet;

impl Drop for Internet {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", INET]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", INET]).status();
    }
}

fn build_internet(api: &str, nodes: &[String], uplink_mbit: u32) -> Result<Internet, LabError> {
    run(&["ip", "netns", "add", INET])?;
    let guard = Internet;
    run(&["ip", "-n", INET, "link", "set", "lo", "up"])?;
    run(&[
        "ip", "-n", api, "link", "add", "wan0", "type", "veth", "peer", "name", "inet0", "netns",
        INET,
    ])?;
    run(&["ip", "-n", api, "link", "set", "wan0", "up"])?;
    run(&["ip", "-n", INET, "link", "set", "inet0", "up"])?;
    run(&[
        "ip",
        "-n",
        api,
        "addr",
        "add",
        "192.0.2.1/24",
        "dev",
        "wan0",
    ])?;
    run(&[
        "ip",
        "-n",
        INET,
        "addr",
        "add",
        "192.0.2.2/24",
        "dev",
        "inet0",
    ])?;
    for a in [BUSINESS, FLOOD_80, FLOOD_443, OTHER] {
        run(&[
            "ip",
            "-n",
            INET,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "inet0",
        ])?;
    }
    run(&[
        "ip",
        "-n",
        INET,
        "route",
        "add",
        "10.230.0.0/16",
        "via",
        "192.0.2.1",
    ])?;
    for net in ["198.51.100.0/24", "203.0.113.0/24"] {
        run(&["ip", "-n", api, "route", "add", net, "via", "192.0.2.2"])?;
    }
    run(&[
        "ip",
        "netns",
        "exec",
        api,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    for (i, ns) in nodes.iter().enumerate() {
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.230.{}.1", i + 1),
        ])?;
    }
    // The site's uplink: the one link every node's internet traffic shares.
    // (The lab's own plumbing; EgressGuard itself never runs tc.)
    run(&[
        "ip",
        "netns",
        "exec",
        api,
        "tc",
        "qdisc",
        "replace",
        "dev",
        "wan0",
        "root",
        "tbf",
        "rate",
        &format!("{uplink_mbit}mbit"),
        "burst",
        "64kb",
        "latency",
        "100ms",
    ])?;
    Ok(guard)
}

/// Parses one iperf3 interval line; `sum` selects the `[SUM]` lines of a
/// multi-stream client.
fn parse_interval(line: &str, sum: bool) -> Option<f64> {
    if sum != line.starts_with("[SUM]")
        || !line.contains("sec")
        || line.contains("sender")
        || line.contains("receiver")
    {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| w.ends_with("bits/sec"))?;
    let v: f64 = words.get(i.checked_sub(1)?)?.parse().ok()?;
    Some(match words[i] {
        "Gbits/sec" => v * 1e3,
        "Mbits/sec" => v,
        "Kbits/sec" => v / 1e3,
        _ => v / 1e6,
    })
}

/// Starts an iperf3 client in `ns` (measured at its server).
fn flow(ns: &str, dst: &str, port: u16, extra: &[&str]) -> Result<Child, LabError> {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "iperf3",
            "-c",
            dst,
            "-p",
            &port.to_string(),
            "-t",
            "900",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| LabError::Other(format!("iperf3: {e}")))
}

/// Starts an iperf3 server on the internet; a thread records the rate it
/// receives each second. Measured here, at the receiver, a rate is what
/// crossed the uplink (a sender's count includes what its socket buffers
/// absorbed, which overstates a throttled flood for seconds).
fn server(
    addr: &str,
    port: u16,
    sum: bool,
    clock: Instant,
    into: Samples,
) -> Result<Child, LabError> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            INET,
            "iperf3",
            "-s",
            "-B",
            addr,
            "-p",
            &port.to_string(),
        ])
        .args(["-i", "1", "--forceflush"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| LabError::Other(format!("iperf3 -s: {e}")))?;
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(v) = parse_interval(&line, sum) {
                    into.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((clock.elapsed().as_secs_f64(), v));
                }
            }
        });
    }
    Ok(child)
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Children killed on drop (the flows).
struct Flows(Vec<Child>);

impl Drop for Flows {
    fn drop(&mut self) {
        for c in &mut self.0 {
            stop(c);
        }
    }
}

/// Mean of one flow's per-second rates over `[from, to)`.
fn mean(samples: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let v: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|s| s.1)
        .collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Mean rate of flows that may stop (the flood: several servers' samples
/// together): everything received in `[from, to)` over the window's length,
/// so seconds after the flows stopped count as 0.
fn mean_over_window(samples: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let sum: f64 = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|s| s.1)
        .fold(0.0, |a, b| a + b);
    sum / (to - from).max(1.0)
}

/// Per whole second: the sum of every sample in that second.
fn per_second(samples: &[(f64, f64)]) -> BTreeMap<u64, f64> {
    let mut m = BTreeMap::new();
    for (t, v) in samples {
        *m.entry(t.floor() as u64).or_insert(0.0) += v;
    }
    m
}

/// Runs the whole story. `progress` receives a one-line status about once a second.
pub fn run_lab(
    settings: &Settings,
    out: &Path,
    stop_flag: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, LabError> {
    let left = leftovers();
    if !left.is_empty() {
        return Err(LabError::Leftovers(left));
    }
    let check_stop = || {
        if stop_flag.load(Ordering::SeqCst) {
            Err(LabError::Interrupted)
        } else {
            Ok(())
        }
    };
    progress("starting the control plane (etcd, kube-apiserver, kube-controller-manager) and installing the chart");
    let mut c = Cluster::create(Names {
        api: NAMESPACES[0].into(),
        nodes: vec![NAMESPACES[1].into(), NAMESPACES[2].into()],
        dir: out.join("logs"),
        keep_dir: true,
    });
    // Dropped before the cluster: the internet namespace and its servers.
    let internet = build_internet(&c.api, &c.nodes, settings.uplink_mbit)?;
    check_stop()?;
    c.cp.add_node("node-1", "site: idc-a", Some("10.230.1.2"));
    c.cp.add_node("node-2", "site: idc-a", Some("10.230.2.2"));
    // Servers on the internet, each measuring what it receives.
    let business: Samples = Default::default();
    let flood: Samples = Default::default();
    let other: Samples = Default::default();
    let t0 = Instant::now();
    for (addr, port, sum, into) in [
        (BUSINESS, 5201, false, &business),
        (FLOOD_80, 80, true, &flood),
        (FLOOD_443, 443, true, &flood),
        (OTHER, 8080, false, &other),
    ] {
        c.others.push(server(addr, port, sum, t0, into.clone())?);
    }
    // node-exporter on each node, scraped by Prometheus across the node's uplink.
    for (i, ns) in c.nodes.clone().iter().enumerate() {
        let log = std::fs::File::create(c.dir.join(format!("node-exporter-{}.log", i + 1)))
            .map_err(|e| LabError::Other(e.to_string()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus-node-exporter"])
            .arg(format!("--web.listen-address=10.230.{}.2:9100", i + 1))
            .args(["--collector.disable-defaults", "--collector.netdev"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| LabError::Other(format!("prometheus-node-exporter: {e}")))?;
        c.others.push(child);
    }
    // Prometheus with the chart's own alert rule, rendered by Helm.
    write_prometheus_config(&c.dir)?;
    c.others
        .push(monitoring::start_prometheus(&c.api, &c.dir, PORTS));
    let token_file = c.dir.join("webhook-token");
    std::fs::write(&token_file, random_token()).map_err(|e| LabError::Other(e.to_string()))?;
    c.others.push(monitoring::start_alertmanager(
        &c.api,
        &c.dir,
        PORTS,
        &token_file,
    ));
    let flags = monitoring::operator_flags(PORTS, &token_file);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.start_operator_with("lab", &flags);
    c.start_agent(1);
    c.start_agent(2);
    check_stop()?;

    // The story starts: business traffic on node-1, ordinary traffic on node-2.
    let at = || t0.elapsed().as_secs_f64();
    let b = format!("{}M", settings.business_mbit);
    let o = format!("{}M", settings.other_mbit);
    let mut flows = Flows(vec![
        flow(&c.nodes[0], BUSINESS, 5201, &["-b", &b])?,
        flow(&c.nodes[1], OTHER, 8080, &["-b", &o])?,
    ]);
    let mut tl = Timeline::default();
    let guard = settings.guard.display().to_string();
    progress(&format!("kubectl apply -f {guard}"));
    c.cp.kubectl_ok(&["apply", "-f", &guard]);
    tl.guard_applied = at();
    let status = |phase: &str| {
        // The latest second with samples, or 0 when nothing arrived lately
        // (a stopped flow reads 0, not its last rate).
        let recent = at() - 2.5;
        let last = |s: &Samples| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .last()
                .filter(|x| x.0 >= recent)
                .map_or(0.0, |x| x.1)
        };
        let f = per_second(&flood.lock().unwrap_or_else(|p| p.into_inner()))
            .range(recent.max(0.0) as u64..)
            .next_back()
            .map_or(0.0, |(_, v)| *v);
        format!(
            "[{:>5.1}s] {phase:<34} business {:>6.2}  flood {:>6.2}  other node {:>6.2}  Mbit/s",
            at(),
            last(&business),
            f,
            last(&other)
        )
    };
    let wait = |what: &str,
                phase: &str,
                f: &mut dyn FnMut() -> bool,
                progress: &mut dyn FnMut(&str)|
     -> Result<f64, LabError> {
        let start = Instant::now();
        let mut last_print = Instant::now() - Duration::from_secs(1);
        loop {
            check_stop()?;
            if f() {
                return Ok(at());
            }
            if start.elapsed() > settings.step_timeout {
                return Err(LabError::Timeout(what.to_string()));
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                progress(&status(phase));
                last_print = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait(
        "the guard to watch both nodes",
        "baseline",
        &mut || {
            c.get("eg", "incident")
                .is_some_and(|g| cluster::condition(&g, "Ready").1 == "Watching")
        },
        progress,
    )?;
    let until = at() + settings.baseline.as_secs_f64();
    wait(
        "baseline",
        "baseline: business flows",
        &mut || at() >= until,
        progress,
    )?;

    // node-1 is compromised.
    tl.flood_start = at();
    let streams = settings.flood_streams.to_string();
    flows
        .0
        .push(flow(&c.nodes[0], FLOOD_80, 80, &["-P", &streams])?);
    flows
        .0
        .push(flow(&c.nodes[0], FLOOD_443, 443, &["-P", &streams])?);
    let prom_q =
        "sum by (instance) (rate(node_network_transmit_bytes_total{device=\"eg0\"}[5s])) * 8";
    let mut last_q = Instant::now() - Duration::from_secs(5);
    let mut breach = None;
    let q_active = |c: &Cluster, phase: &str| -> bool {
        egq(c)
            .iter()
            .any(|q| q["spec"]["nodeName"] == "node-1" && q["status"]["phase"] == phase)
    };
    tl.quarantined = wait(
        "node-1 quarantined",
        "flood: uplink saturated",
        &mut || {
            if breach.is_none() && last_q.elapsed() >= Duration::from_secs(1) {
                last_q = Instant::now();
                if node1_rate(&c, prom_q).is_some_and(|v| v > 20e6) {
                    breach = Some(at());
                }
            }
            q_active(&c, "Active")
        },
        progress,
    )?;
    tl.breach = breach;
    tl.throttled = wait(
        "node-1's kernel throttled",
        "quarantined: enforcing",
        &mut || c.shaped(1),
        progress,
    )?;
    let show_quarantined = show(&c, 0);
    // The uplink is free once the kernel throttles, but a TCP flow that
    // lost packets throughout the flood retransmits only when its backed-off
    // timer fires (up to ~13 s after a 6 s flood, a property of TCP and not
    // of the shaping). The capped phase is measured from when both flows
    // are back, and the wait is reported.
    let throttled = tl.throttled;
    let back = |s: &Samples, rate: f64| {
        let s = s.lock().unwrap_or_else(|p| p.into_inner());
        s.len() >= 2
            && s[s.len() - 2..]
                .iter()
                .all(|x| x.0 > throttled && x.1 >= 0.85 * rate)
    };
    tl.recovered = wait(
        "the business and other node's flows to recover",
        "quarantined: flows recovering",
        &mut || back(&business, settings.business_mbit) && back(&other, settings.other_mbit),
        progress,
    )?;
    let until = at() + settings.hold.as_secs_f64();
    wait(
        "the flood to run capped",
        "quarantined: flood capped",
        &mut || at() >= until,
        progress,
    )?;
    let classes_capped = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0],
            "tc",
            "-s",
            "class",
            "show",
            "dev",
            "eg0",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();

    // The flood stops; calm returns; the policy releases the node.
    // The malware is stopped the way a responder would: its connections
    // aborted (ss -K), then the process killed. Killing alone leaves the
    // kernel draining megabytes of socket buffers at the throttled rate.
    abort_flood(&c.nodes[0]);
    let mut flood_children: Vec<Child> = flows.0.drain(2..).collect();
    for ch in &mut flood_children {
        stop(ch);
    }
    abort_flood(&c.nodes[0]);
    tl.flood_stop = at();
    tl.released = wait(
        "node-1 released",
        "flood stopped: calm window",
        &mut || q_active(&c, "Released") && !c.shaped(1),
        progress,
    )?;
    let until = at() + 5.0;
    wait(
        "after the release",
        "released",
        &mut || at() >= until,
        progress,
    )?;
    tl.end = at();
    let show_end = show(&c, 0);
    let get_eg = c.cp.kubectl_ok(&["get", "eg"]);
    let get_egq = c.cp.kubectl_ok(&["get", "egq"]);
    let node2_quarantined = egq(&c).iter().any(|q| q["spec"]["nodeName"] == "node-2");
    drop(flows);
    drop(internet);

    // The numbers.
    let (b, f, o) = {
        let g = |s: &Samples| s.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (g(&business), g(&flood), g(&other))
    };
    // Each phase without its first and last seconds (transitions).
    let phases = [
        ("before the flood", tl.guard_applied + 2.0, tl.flood_start),
        (
            "flood, before quarantine",
            tl.flood_start + 2.0,
            tl.quarantined,
        ),
        (
            "quarantined, flood capped",
            tl.recovered + 1.0,
            tl.flood_stop,
        ),
        ("flood over, calm window", tl.flood_stop + 2.0, tl.released),
        ("released", tl.released + 1.0, tl.end),
    ];
    let table: Vec<(String, f64, [f64; 3])> = phases
        .iter()
        .map(|(name, from, to)| {
            (
                name.to_string(),
                to - from,
                [
                    mean(&b, *from, *to),
                    mean_over_window(&f, *from, *to),
                    mean(&o, *from, *to),
                ],
            )
        })
        .collect();
    let row = |i: usize| table[i].2;
    let biz = settings.business_mbit;
    let oth = settings.other_mbit;
    let throttle_mbit = 2.0;
    // The guard's calm window: no release may come sooner after the flood.
    let after = egressguard_crds::load::load_file(&settings.guard)
        .ok()
        .and_then(|g| g.into_iter().next())
        .and_then(|g| g.spec.quarantine)
        .and_then(|q| egressguard_crds::quarantine::parse_duration(&q.release.after).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let checks = vec![
        (format!("before the flood, the business flow gets >= 85% of its {biz} Mbit/s"), row(0)[0] >= 0.85 * biz),
        (format!("the flood saturates the {} Mbit/s site uplink (flood >= 60% of it)", settings.uplink_mbit), row(1)[1] >= 0.6 * settings.uplink_mbit as f64),
        ("the business flow suffers during the flood (< 70% of its rate)".to_string(), row(1)[0] < 0.7 * biz),
        ("only the compromised node is quarantined (no Quarantine names node-2)".to_string(), !node2_quarantined),
        (format!("quarantined, the flood is capped near the {throttle_mbit} Mbit/s throttle (<= 1.2x)"), row(2)[1] <= 1.2 * throttle_mbit),
        (format!("quarantined, the business flow recovers (>= 85% of {biz} Mbit/s)"), row(2)[0] >= 0.85 * biz),
        (format!("quarantined, the other node's flow recovers (>= 85% of {oth} Mbit/s)"), row(2)[2] >= 0.85 * oth),
        (
            format!("the node stays quarantined for the {after:.0} s calm window after the flood stops, then is released"),
            tl.released - tl.flood_stop >= after,
        ),
    ];
    let series: Vec<(f64, f64, f64, f64)> = {
        let bs = per_second(&b);
        let os = per_second(&o);
        let fsm = per_second(&f);
        let last = tl.end.ceil() as u64;
        (0..last)
            .map(|s| {
                (
                    s as f64 + 0.5,
                    bs.get(&s).copied().unwrap_or(0.0),
                    fsm.get(&s).copied().unwrap_or(0.0),
                    os.get(&s).copied().unwrap_or(0.0),
                )
            })
            .collect()
    };
    Ok(Report {
        timeline: tl,
        table,
        series,
        get_eg,
        get_egq,
        show_quarantined,
        show_end,
        classes_capped,
        checks,
    })
}

/// Aborts node-1's flood connections (RST), so nothing of them lingers.
fn abort_flood(ns: &str) {
    let _ = Command::new("ip")
        .args([
            "netns", "exec", ns, "ss", "-K", "dst", FLOOD_80, "or", "dst", FLOOD_443,
        ])
        .output();
}

fn egq(c: &Cluster) -> Vec<Value> {
    let out = c.cp.kubectl(&["get", "quarantines", "-o", "json"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

fn show(c: &Cluster, node: usize) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &c.nodes[node]])
        .arg(crate::site::target_bin("node-shaper"))
        .args(["show", "--interface", "eg0"])
        .env(
            "EGRESSGUARD_STATE_DIR",
            c.dir.join(format!("state-{}", node + 1)),
        )
        .output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
        .unwrap_or_default()
}

/// node-1's transmit rate as Prometheus sees it (bit/s).
fn node1_rate(c: &Cluster, q: &str) -> Option<f64> {
    let o = Command::new("ip")
        .args(["netns", "exec", &c.api, "curl", "-sS", "--max-time", "2"])
        .arg(format!(
            "http://127.0.0.1:{}/api/v1/query",
            PORTS.prometheus
        ))
        .args(["--data-urlencode", &format!("query={q}")])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["data"]["result"].as_array()?.iter().find_map(|s| {
        (s["metric"]["instance"] == "10.230.1.2:9100")
            .then(|| s["value"][1].as_str()?.parse().ok())?
    })
}

fn random_token() -> String {
    let mut buf = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prometheus scrapes both nodes' node-exporter every second and evaluates
/// the chart's `NodeEgressSaturated` rule (rendered by real Helm with the
/// lab's threshold) every second.
fn write_prometheus_config(dir: &Path) -> Result<(), LabError> {
    // Rendered without a cluster: the chart then insists on a named token Secret.
    let values = serde_json::json!({"prometheusRule": {"enabled": true, "thresholdBitsPerSecond": "20e6", "for": "3s", "rateWindow": "5s"}, "operator": {"quarantine": {"webhook": {"existingSecret": "unused"}}}});
    crate::tools::try_helm().map_err(|e| LabError::Other(format!("helm: {e}")))?;
    let manifests = crate::tools::helm_template(
        &cluster::root().join("charts/egressguard"),
        &values,
        &["--show-only", "templates/prometheusrule.yaml"],
    )
    .map_err(|e| LabError::Other(format!("helm render: {e}")))?;
    let rule = crate::tools::documents(&manifests)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .ok_or_else(|| LabError::Other("the chart rendered no PrometheusRule".into()))?;
    let rules = serde_json::json!({"groups": rule["spec"]["groups"]});
    let rules_path = dir.join("rules.yml");
    std::fs::write(&rules_path, rules.to_string()).map_err(|e| LabError::Other(e.to_string()))?;
    let cfg = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nalerting:\n  alertmanagers:\n  - static_configs: [{{targets: ['127.0.0.1:{}']}}]\nscrape_configs:\n- job_name: node\n  static_configs: [{{targets: ['10.230.1.2:9100', '10.230.2.2:9100']}}]\n",
        rules_path.display(),
        PORTS.alertmanager
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).map_err(|e| LabError::Other(e.to_string()))
}

/// The table as Markdown.
pub fn render_table(r: &Report) -> String {
    let mut s = String::from("| phase | seconds | business (whitelisted) | flood 80/443 (node-1) | other node |\n|---|---|---|---|---|\n");
    for (name, secs, v) in &r.table {
        s.push_str(&format!(
            "| {name} | {secs:.0} | {:.2} | {:.2} | {:.2} |\n",
            v[0], v[1], v[2]
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_interval_lines_parse() {
        let single =
            "[  5]   3.00-4.00   sec   512 KBytes  4.19 Mbits/sec    0    100 KBytes       ";
        assert_eq!(parse_interval(single, false), Some(4.19));
        assert_eq!(parse_interval(single, true), None);
        let sum = "[SUM]   3.00-4.00   sec  4.50 MBytes  37.7 Mbits/sec  120             ";
        assert_eq!(parse_interval(sum, true), Some(37.7));
        assert_eq!(
            parse_interval(
                "[SUM]   0.00-9.00   sec  40 MBytes  37.2 Mbits/sec  1  sender",
                true
            ),
            None
        );
        assert_eq!(
            parse_interval("[  5]   1.00-2.00   sec  60 KBytes   492 Kbits/sec", false),
            Some(0.492)
        );
    }
}

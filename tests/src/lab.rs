//! The incident, replayed on one machine: a site of two kubelet nodes
//! behind one shaped uplink, a real control plane, the chart installed with
//! Helm (its operator and agent pods run by the kubelets, from images built
//! here), node-exporter, Prometheus with the chart's alert rule, and
//! Alertmanager routed to the operator pods' authenticated receiver. One node is compromised
//! and floods TCP 80/443; the lab measures every flow each second and checks
//! that the system ends the outage on its own.
//!
//! Topology (network namespaces, all created and removed by the lab):
//!
//! ```text
//!  eg-node-1 ─eth0┐                         ┌ 198.51.100.10:5201 business (whitelisted)
//!  (eglab-n1)     ├ bridge ─ api (router,   │ 203.0.113.80:80, .81:443 flood targets
//!  eg-node-2 ─eth0┘  control plane,   wan0 ┤ 203.0.113.20:8080 other node's server
//!  (eglab-n2)        Prometheus, AM) ─TBF──┘ inet
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
use crate::kubelet::Nodes;
use crate::monitoring::{self, Ports};

/// Namespace names of the lab (fixed, so leftovers are recognisable).
pub const NAMESPACES: [&str; 4] = ["eglab-api", "eglab-n1", "eglab-n2", "eglab-inet"];
/// The nodes' names prefix (`dev-cluster.sh`'s `EG_NODES_PREFIX`).
const PREFIX: &str = "eglab";
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
    /// Every alert-rule and dashboard expression of the chart, queried from
    /// the lab's Prometheus while node-1 was quarantined and at the end.
    pub queries: Vec<QueryCount>,
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

/// Kills what runs in the lab's namespaces and deletes them; first, if an
/// interrupted run left its kubelet nodes, `dev-cluster.sh down` (shims,
/// pods' cgroups, mounts, the bridge).
pub fn clean() {
    if let Ok(dir) = std::fs::read_to_string(format!("/run/egressguard/{PREFIX}/dir")) {
        let mut down = Command::new("nsenter");
        down.arg(format!("--net=/run/netns/{}", NAMESPACES[0]));
        if !Path::new(&format!("/run/netns/{}", NAMESPACES[0])).exists() {
            down = Command::new("env");
        }
        let _ = down
            .arg("bash")
            .arg(cluster::root().join("scripts/dev-cluster.sh"))
            .arg("down")
            .arg(dir.trim())
            .output();
    }
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

fn build_internet(api: &str, uplink_mbit: u32) -> Result<Internet, LabError> {
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
        // The nodes (10.231.x.0/24) and their pods (10.232-10.251.x.0/24).
        "10.224.0.0/11",
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
    progress("starting the control plane and two kubelet nodes (containerd, runc, CNI), pushing the images");
    let dir = out.join("logs");
    let c = Nodes::create(NAMESPACES[0], &dir, Some(PREFIX), 2);
    // Dropped before the cluster, last declared first: the internet
    // namespace, the processes the lab started, then the pods' logs copied out.
    let _logs = KeepLogs(&c, dir.clone());
    let mut others = Children(vec![]);
    let internet = build_internet(&c.api, settings.uplink_mbit)?;
    check_stop()?;
    c.cp.kubectl_ok(&["label", "node", "eg-node-1", "eg-node-2", "site=idc-a"]);
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
        others.0.push(server(addr, port, sum, t0, into.clone())?);
    }
    // node-exporter on each node, scraped by Prometheus across the node's uplink.
    for k in 1..=2 {
        let log = std::fs::File::create(dir.join(format!("node-exporter-{k}.log")))
            .map_err(|e| LabError::Other(e.to_string()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &c.node_ns(k), "prometheus-node-exporter"])
            .arg(format!("--web.listen-address={}:9100", c.node_ip(k)))
            .args(["--collector.disable-defaults", "--collector.netdev"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| LabError::Other(format!("prometheus-node-exporter: {e}")))?;
        others.0.push(child);
    }
    // The chart, as a user installs it: the operator asks the lab's
    // Prometheus (on the bridge's address) and receives Alertmanager's
    // webhooks with the lab's token; agents resync every 2 s.
    progress("helm install --wait (operator and agent pods)");
    let token = random_token();
    let mut values = c.values(crate::kubelet::APP_VERSION);
    values["operator"]["quarantine"] = serde_json::json!({
        "prometheusUrl": format!("http://{}:{}", c.net.gateway, PORTS.prometheus),
        "evaluationInterval": "1s",
        "webhook": {"token": token},
    });
    values["nodeShaper"]["resyncSeconds"] = serde_json::json!(2);
    let installed = c.install(&values);
    if !installed.status.success() {
        return Err(LabError::Other(format!(
            "helm install --wait: {}\n{}",
            String::from_utf8_lossy(&installed.stderr),
            c.context()
        )));
    }
    let operators: Vec<String> = c
        .pods("operator")
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect();
    // Prometheus with the chart's own alert rule, rendered by Helm.
    let promql = write_prometheus_config(&dir, &c, &operators)?;
    let queries = lab_queries(&promql, &c.node_ip(1))?;
    others.0.push(monitoring::start_prometheus_at(
        &c.api,
        &dir,
        &format!("0.0.0.0:{}", PORTS.prometheus),
    ));
    let token_file = dir.join("webhook-token");
    std::fs::write(&token_file, &token).map_err(|e| LabError::Other(e.to_string()))?;
    let receivers: Vec<String> = operators
        .iter()
        .map(|ip| format!("http://{ip}:{}/alertmanager", PORTS.receiver))
        .collect();
    others.0.push(monitoring::start_alertmanager_to(
        &c.api,
        &dir,
        PORTS,
        &receivers,
        &token_file,
    ));
    check_stop()?;

    // The story starts: business traffic on node-1, ordinary traffic on node-2.
    let at = || t0.elapsed().as_secs_f64();
    let b = format!("{}M", settings.business_mbit);
    let o = format!("{}M", settings.other_mbit);
    let mut flows = Flows(vec![
        flow(&c.node_ns(1), BUSINESS, 5201, &["-b", &b])?,
        flow(&c.node_ns(2), OTHER, 8080, &["-b", &o])?,
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
            c.cp.get("eg", "incident")
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
        .push(flow(&c.node_ns(1), FLOOD_80, 80, &["-P", &streams])?);
    flows
        .0
        .push(flow(&c.node_ns(1), FLOOD_443, 443, &["-P", &streams])?);
    let prom_q =
        "sum by (instance) (rate(node_network_transmit_bytes_total{device=\"eth0\"}[5s])) * 8";
    let mut last_q = Instant::now() - Duration::from_secs(5);
    let mut breach = None;
    let q_active = |c: &Nodes, phase: &str| -> bool {
        egq(c)
            .iter()
            .any(|q| q["spec"]["nodeName"] == "eg-node-1" && q["status"]["phase"] == phase)
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
        &mut || c.shaped("eg-node-1"),
        progress,
    )?;
    let show_quarantined = show(&c, 1);
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
    // node-1 quarantined, throttled for the whole hold: every series of the
    // quarantine exists now (its classes, the operator's counts).
    progress(&status("quarantined: querying PromQL"));
    let while_quarantined: Vec<Result<usize, String>> =
        queries.iter().map(|(_, q)| prom_series(&c, q)).collect();
    let classes_capped = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node_ns(1),
            "tc",
            "-s",
            "class",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();

    // The flood stops; calm returns; the policy releases the node.
    // The malware is stopped the way a responder would: its connections
    // aborted (ss -K), then the process killed. Killing alone leaves the
    // kernel draining megabytes of socket buffers at the throttled rate.
    abort_flood(&c.node_ns(1));
    let mut flood_children: Vec<Child> = flows.0.drain(2..).collect();
    for ch in &mut flood_children {
        stop(ch);
    }
    abort_flood(&c.node_ns(1));
    tl.flood_stop = at();
    tl.released = wait(
        "node-1 released",
        "flood stopped: calm window",
        &mut || q_active(&c, "Released") && !c.shaped("eg-node-1"),
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
    let show_end = show(&c, 1);
    let get_eg = c.cp.kubectl_ok(&["get", "eg"]);
    let get_egq = c.cp.kubectl_ok(&["get", "egq"]);
    let node2_quarantined = egq(&c).iter().any(|q| q["spec"]["nodeName"] == "eg-node-2");
    // After the release: what only a release writes.
    let queries: Vec<QueryCount> = queries
        .into_iter()
        .zip(while_quarantined)
        .map(|((e, query), quarantined)| QueryCount {
            required: required(&query),
            end: prom_series(&c, &query),
            source: e.source,
            query,
            quarantined,
        })
        .collect();
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
        queries_check(&queries),
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
        queries,
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

fn egq(c: &Nodes) -> Vec<Value> {
    let out = c.cp.kubectl(&["get", "quarantines", "-o", "json"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// `node-shaper show` in node `k`'s agent pod (`kubectl exec`).
fn show(c: &Nodes, k: usize) -> String {
    let Some(pod) = c.agent_pod(&format!("eg-node-{k}")) else {
        return format!("(no agent pod on eg-node-{k})");
    };
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let o = c.cp.kubectl(&[
        "exec",
        "-n",
        cluster::NAMESPACE,
        name,
        "--",
        "node-shaper",
        "show",
        "--interface",
        "eth0",
    ]);
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// node-1's transmit rate as Prometheus sees it (bit/s).
fn node1_rate(c: &Nodes, q: &str) -> Option<f64> {
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
        (s["metric"]["instance"] == format!("{}:9100", c.node_ip(1)).as_str())
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

/// The operator pods' /metrics port (the chart's `operator.metricsPort`).
const OPERATOR_METRICS_PORT: u16 = 9465;
/// The agents' /metrics port, on each node's address (the chart's
/// `nodeShaper.metricsPort`, served on the host's IP).
const AGENT_METRICS_PORT: u16 = 9464;
/// The scrape jobs, named like the chart's ServiceMonitor names them (after
/// the Services of release `eg`), which the dashboard's job variables list.
const OPERATOR_JOB: &str = "eg-operator-metrics";
const AGENT_JOB: &str = "eg-node-shaper-metrics";

/// Prometheus scrapes both nodes' node-exporter and agent pod, and the
/// operator pods (at `operators`, their pod IPs), every second, and evaluates
/// the chart's alert rules (rendered by real Helm with the lab's threshold)
/// every second. Returns what the chart renders for monitoring (its rules and
/// its dashboard), for `lab_queries`.
fn write_prometheus_config(
    dir: &Path,
    c: &Nodes,
    operators: &[String],
) -> Result<ChartPromql, LabError> {
    let values = serde_json::json!({"prometheusRule": {"thresholdBitsPerSecond": "20e6", "for": "3s", "rateWindow": "5s"}});
    let promql = chart_promql(&values).map_err(|e| LabError::Other(format!("helm render: {e}")))?;
    let rules = serde_json::json!({"groups": promql.rule_groups});
    let rules_path = dir.join("rules.yml");
    std::fs::write(&rules_path, rules.to_string()).map_err(|e| LabError::Other(e.to_string()))?;
    let targets = |addrs: Vec<String>, port: u16| {
        addrs
            .iter()
            .map(|a| format!("'{a}:{port}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let nodes = vec![c.node_ip(1), c.node_ip(2)];
    let cfg = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nalerting:\n  alertmanagers:\n  - static_configs: [{{targets: ['127.0.0.1:{}']}}]\nscrape_configs:\n- job_name: node\n  static_configs: [{{targets: [{}]}}]\n- job_name: {AGENT_JOB}\n  static_configs: [{{targets: [{}]}}]\n- job_name: {OPERATOR_JOB}\n  static_configs: [{{targets: [{}]}}]\n",
        rules_path.display(),
        PORTS.alertmanager,
        targets(nodes.clone(), 9100),
        targets(nodes, AGENT_METRICS_PORT),
        targets(operators.to_vec(), OPERATOR_METRICS_PORT),
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).map_err(|e| LabError::Other(e.to_string()))?;
    Ok(promql)
}

/// Child processes killed and reaped on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// On drop, before the cluster goes: the chart's pods' logs and the nodes'
/// kubelet and containerd logs copied into the lab's log folder.
struct KeepLogs<'a>(&'a Nodes, PathBuf);

impl Drop for KeepLogs<'_> {
    fn drop(&mut self) {
        let (c, dir) = (self.0, &self.1);
        for component in ["operator", "node-shaper"] {
            for p in c.pods(component) {
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                let o = c.cp.kubectl(&["logs", "-n", cluster::NAMESPACE, name]);
                let _ = std::fs::write(dir.join(format!("{name}.log")), &o.stdout);
            }
        }
        for name in &c.names {
            for what in ["kubelet", "containerd"] {
                let _ = std::fs::copy(
                    c.cp.dir.join(format!("nodes/{name}/{what}.log")),
                    dir.join(format!("{name}-{what}.log")),
                );
            }
        }
    }
}

/// When a query of the chart must return data in the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Required {
    /// While node-1 is quarantined (the end of the capped flood).
    Quarantined,
    /// After node-1's release.
    Released,
    /// Never: it may be empty all along, for this reason.
    No(&'static str),
}

/// One chart expression as the lab queried it.
#[derive(Debug, Clone)]
pub struct QueryCount {
    /// Where the expression is (`alert NAME`, `panel "TITLE" REFID`).
    pub source: String,
    /// The query sent.
    pub query: String,
    /// When it must return data.
    pub required: Required,
    /// Series returned while node-1 was quarantined, or the error.
    pub quarantined: Result<usize, String>,
    /// Series returned at the end, after the release, or the error.
    pub end: Result<usize, String>,
}

/// The lab's values for the dashboard's variables: node-1, as Grafana
/// interpolates a multi-value variable into a PromQL regex (escaped, and
/// escaped again for the PromQL string); the lab's scrape jobs; rate windows
/// for its 1 s scrapes (Grafana's `$__rate_interval` is at least 4 scrape
/// intervals). Variables with a default (`exclude_devices`) keep it.
fn lab_variables(dashboard: &Value, node1: &str) -> Vec<(String, String)> {
    let mut vars = dashboard_defaults(dashboard);
    let node = node1.replace('.', r"\\.");
    vars.extend(
        [
            ("node", node.as_str()),
            ("operator_job", OPERATOR_JOB),
            ("agent_job", AGENT_JOB),
            ("__rate_interval", "10s"),
            ("__interval", "2s"),
            ("__range", "5m"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    vars
}

/// The values of a dashboard's variables that carry their own (textbox,
/// constant and custom variables: the current value, else the query).
pub fn dashboard_defaults(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| matches!(v["type"].as_str(), Some("textbox" | "constant" | "custom")))
        .filter_map(|v| {
            let value = v["current"]["value"]
                .as_str()
                .or_else(|| v["query"].as_str())?;
            Some((v["name"].as_str()?.to_string(), value.to_string()))
        })
        .collect()
}

/// What the lab queries: every dashboard expression with node-1's values,
/// and every alert rule's expression without its threshold. An alert's
/// condition (`... > 20e6`) is empty whenever it does not fire, and in the
/// lab nothing fires at the moments it looks (the throttle ended the breach;
/// nothing tampers): the left side of the comparison is what the rule reads
/// every evaluation, and it must exist for the rule to ever fire. An alert
/// that does not end in a comparison with a number is queried whole.
fn lab_queries(promql: &ChartPromql, node1: &str) -> Result<Vec<(Expr, String)>, LabError> {
    let vars = lab_variables(&promql.dashboard, node1);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = vec![];
    for e in rule_exprs(&promql.rule_groups) {
        let q = without_threshold(&e.expr).unwrap_or_else(|| e.expr.clone());
        out.push((e, q));
    }
    for e in dashboard_exprs(&promql.dashboard) {
        let q = substitute(&e.expr, &vars)
            .map_err(|why| LabError::Other(format!("dashboard {}: {why}", e.source)))?;
        out.push((e, q));
    }
    if out.is_empty() {
        return Err(LabError::Other("the chart rendered no PromQL".into()));
    }
    Ok(out)
}

/// When a query must have data: series only some moments of the story have.
fn required(query: &str) -> Required {
    if query.contains("egressguard_quarantines_released_total") {
        // The operator writes a guard and trigger's row at its first release.
        Required::Released
    } else if query.contains("egressguard_tamper_events_total") {
        Required::No(
            "nothing tampers in the lab; an agent writes a kind's row once it finds such evidence",
        )
    } else {
        Required::Quarantined
    }
}

/// The expectation: every query returned data when it must.
fn queries_check(queries: &[QueryCount]) -> (String, bool) {
    let missing: Vec<String> = queries
        .iter()
        .filter_map(|q| {
            let (when, got) = match q.required {
                Required::Quarantined => ("while node-1 was quarantined", &q.quarantined),
                Required::Released => ("after the release", &q.end),
                Required::No(_) => return None,
            };
            match got {
                Ok(n) if *n > 0 => None,
                Ok(_) => Some(format!(
                    "{} returned no series {when}: {}",
                    q.source, q.query
                )),
                Err(e) => Some(format!("{} failed {when}: {e}: {}", q.source, q.query)),
            }
        })
        .collect();
    let n = queries.len();
    if missing.is_empty() {
        (
            format!("every alert-rule and dashboard expression of the chart ({n}) returns data from the lab's Prometheus when it must"),
            true,
        )
    } else {
        (
            format!(
                "every alert-rule and dashboard expression of the chart ({n}) returns data from the lab's Prometheus when it must; not: {}",
                missing.join("; ")
            ),
            false,
        )
    }
}

/// How many series `query` returns from the lab's Prometheus now.
fn prom_series(c: &Nodes, query: &str) -> Result<usize, String> {
    let o = Command::new("ip")
        .args(["netns", "exec", &c.api, "curl", "-sS", "--max-time", "5"])
        .arg(format!(
            "http://127.0.0.1:{}/api/v1/query",
            PORTS.prometheus
        ))
        .args(["--data-urlencode", &format!("query={query}")])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| {
        format!(
            "no JSON from Prometheus ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    if v["status"] != "success" {
        return Err(format!(
            "{}: {}",
            v["errorType"].as_str().unwrap_or("error"),
            v["error"].as_str().unwrap_or_default()
        ));
    }
    match &v["data"]["result"] {
        Value::Array(series) => Ok(series.len()),
        // A scalar or a string: one value.
        _ => Ok(1),
    }
}

/// The chart's PromQL against the lab's Prometheus, as Markdown.
pub fn render_queries(r: &Report) -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let count = |c: &Result<usize, String>| match c {
        Ok(n) => n.to_string(),
        Err(e) => format!("error: {}", cell(e)),
    };
    let mut s = String::from(
        "Every alert rule (its expression without the threshold) and every dashboard query (variables for node-1) \
         of the chart, queried from the lab's Prometheus: series returned.\n\n\
         | expression | query | while quarantined | at the end | must return data |\n|---|---|---|---|---|\n",
    );
    for q in &r.queries {
        let must = match q.required {
            Required::Quarantined => "while quarantined".to_string(),
            Required::Released => "after the release".to_string(),
            Required::No(why) => format!("no: {why}"),
        };
        s.push_str(&format!(
            "| {} | `{}` | {} | {} | {must} |\n",
            cell(&q.source),
            cell(&q.query),
            count(&q.quarantined),
            count(&q.end)
        ));
    }
    s
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

// ---------------------------------------------------------------------------
// The chart's PromQL (its alert rules and its Grafana dashboard), extracted
// from a Helm render; `tests/tests/promql.rs` checks that it parses, the lab
// that it returns data from a real Prometheus.

/// One PromQL expression of the chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    /// Where it is: `alert NAME`, or `panel "TITLE" REFID`.
    pub source: String,
    /// The expression as written there.
    pub expr: String,
}

/// What the chart renders for monitoring.
#[derive(Debug, Clone)]
pub struct ChartPromql {
    /// The PrometheusRule's `spec.groups`: a Prometheus rules file's `groups`.
    pub rule_groups: Value,
    /// The dashboard, parsed from the ConfigMap's `egressguard.json`.
    pub dashboard: Value,
}

/// Renders the chart (`helm template`, no cluster) with `values` plus
/// `prometheusRule.enabled` and `grafanaDashboard.enabled`, and returns its
/// alert rules and its dashboard as shipped.
pub fn chart_promql(values: &Value) -> Result<ChartPromql, String> {
    let mut values = values.clone();
    values["prometheusRule"]["enabled"] = true.into();
    values["grafanaDashboard"]["enabled"] = true.into();
    // Rendered without a cluster, the chart insists on a webhook token.
    let webhook = &values["operator"]["quarantine"]["webhook"];
    if webhook["token"].is_null() && webhook["existingSecret"].is_null() {
        values["operator"]["quarantine"]["webhook"]["existingSecret"] = "unused".into();
    }
    crate::tools::try_helm()?;
    let manifests = crate::tools::helm_template(
        &cluster::root().join("charts/egressguard"),
        &values,
        &[
            "--show-only",
            "templates/prometheusrule.yaml",
            "--show-only",
            "templates/grafana-dashboard.yaml",
        ],
    )?;
    let docs = crate::tools::documents(&manifests);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .ok_or("the chart rendered no PrometheusRule")?;
    let text = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["egressguard.json"].is_string())
        .and_then(|d| d["data"]["egressguard.json"].as_str())
        .ok_or("the chart rendered no dashboard ConfigMap with egressguard.json")?;
    let dashboard =
        serde_json::from_str(text).map_err(|e| format!("the dashboard is not JSON: {e}"))?;
    Ok(ChartPromql {
        rule_groups: rule["spec"]["groups"].clone(),
        dashboard,
    })
}

/// Every rule's expression: `alert NAME` or `record NAME`.
pub fn rule_exprs(groups: &Value) -> Vec<Expr> {
    let rules = groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten());
    rules
        .map(|r| {
            let source = match (r["alert"].as_str(), r["record"].as_str()) {
                (Some(a), _) => format!("alert {a}"),
                (None, Some(rec)) => format!("record {rec}"),
                (None, None) => "rule without a name".to_string(),
            };
            Expr {
                source,
                expr: r["expr"].as_str().unwrap_or_default().trim().to_string(),
            }
        })
        .collect()
}

/// Every `targets[].expr` of a dashboard's panels (and of panels nested in
/// collapsed rows): `panel "TITLE" REFID`.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<Expr> {
    fn walk(panels: &Value, out: &mut Vec<Expr>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(Expr {
                        source: format!(
                            "panel {:?} {}",
                            p["title"].as_str().unwrap_or_default(),
                            t["refId"].as_str().unwrap_or_default()
                        ),
                        expr: e.to_string(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = vec![];
    walk(&dashboard["panels"], &mut out);
    out
}

/// Replaces Grafana's template variables (`$name`, `${name}`, `[[name]]`)
/// by `vars` (name without `$`, value as Grafana would interpolate it).
/// Err names a variable left without a value.
pub fn substitute(expr: &str, vars: &[(&str, &str)]) -> Result<String, String> {
    let mut vars = vars.to_vec();
    // `$node_job` before `$node`.
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut s = expr.to_string();
    for (name, value) in &vars {
        for pattern in [
            format!("${{{name}}}"),
            format!("[[{name}]]"),
            format!("${name}"),
        ] {
            s = s.replace(&pattern, value);
        }
    }
    let left = s.char_indices().find(|(i, c)| {
        *c == '$'
            && s[i + 1..]
                .chars()
                .next()
                .is_some_and(|n| n == '{' || n == '_' || n.is_ascii_alphabetic())
    });
    match left {
        Some((i, _)) => Err(format!(
            "a variable has no value: {}",
            s[i..]
                .split(|c: char| !(c.is_alphanumeric() || "${_".contains(c)))
                .next()
                .unwrap_or_default()
        )),
        None if s.contains("[[") => Err(format!("a variable has no value in {s}")),
        None => Ok(s),
    }
}

/// An alert expression without its final comparison with a number
/// (`sum(...) * 8 > 20e6` → `sum(...) * 8`): what the condition compares,
/// which has data whenever the alert could be evaluated. None if the
/// expression does not end in such a comparison.
pub fn without_threshold(expr: &str) -> Option<String> {
    let e = expr.trim();
    ["==", "!=", ">=", "<=", ">", "<"]
        .iter()
        .filter_map(|op| {
            let at = e.rfind(op)?;
            let number = e[at + op.len()..].trim();
            let number = number.strip_prefix("bool ").unwrap_or(number).trim();
            number.parse::<f64>().ok()?;
            Some(at)
        })
        .max()
        .map(|at| e[..at].trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promql_check_names_what_returned_nothing_when_it_had_to() {
        let q = |source: &str, query: &str, quarantined: Result<usize, String>, end| QueryCount {
            source: source.into(),
            required: required(query),
            query: query.into(),
            quarantined,
            end,
        };
        let fine = [
            q("panel \"a\" A", "up", Ok(1), Ok(1)),
            q(
                "panel \"b\" A",
                "egressguard_quarantines_released_total",
                Ok(0),
                Ok(1),
            ),
            q(
                "panel \"c\" A",
                "egressguard_tamper_events_total",
                Ok(0),
                Ok(0),
            ),
        ];
        assert!(queries_check(&fine).1);
        let (what, ok) = queries_check(&[
            fine[0].clone(),
            q("alert X", "x", Ok(0), Ok(3)),
            q(
                "panel \"d\" B",
                "egressguard_quarantines_released_total",
                Ok(2),
                Ok(0),
            ),
            q(
                "panel \"e\" C",
                "y",
                Err("bad_data: parse error".into()),
                Ok(1),
            ),
        ]);
        assert!(!ok);
        assert!(
            what.contains("alert X returned no series while node-1 was quarantined: x"),
            "{what}"
        );
        assert!(
            what.contains("panel \"d\" B returned no series after the release"),
            "{what}"
        );
        assert!(
            what.contains("panel \"e\" C failed while node-1 was quarantined: bad_data"),
            "{what}"
        );
        assert!(!what.contains("panel \"a\""), "{what}");
    }

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

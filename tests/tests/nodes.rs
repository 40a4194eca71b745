//! The chart on real kubelet nodes: `dev-cluster.sh up --nodes 2` (kubelet,
//! containerd, runc, a CNI bridge per node namespace), the images built here
//! and pulled from the cluster's registry, the real Helm CLI. Everything a
//! user checks: pods Ready, the kernel state on each node's eth0, rates
//! measured with iperf3, restarts, `kubectl exec`/`logs`, helm's exit codes.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressguard_e2e::cluster::{self, NAMESPACE};
use egressguard_e2e::kubelet::{ready, restarts, Nodes};
use egressguard_e2e::site::available;

/// The throttled destination port (iperf3's) and its rate.
const THROTTLED: u16 = 5201;
const THROTTLE_MBIT: f64 = 8.0;
/// A port the guard does not throttle.
const OPEN: u16 = 5301;

fn guard(extra_spec: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "uplink": {"rate": "40Mbit"},
        "throttle": {"rate": format!("{THROTTLE_MBIT}Mbit"), "ceil": format!("{THROTTLE_MBIT}Mbit"),
                     "destinations": [{"protocol": "TCP", "port": THROTTLED}]},
        "mode": "Enforce",
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    serde_json::json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard",
                       "metadata": {"name": "uplink"}, "spec": spec})
}

/// Polls every node's root qdisc every 100 ms from a thread until stopped;
/// returns (polls, polls that found a node unshaped, the longest unshaped run).
struct ShapingWatch {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u32, u32, Duration)>>,
}

impl ShapingWatch {
    fn start(c: &Nodes) -> ShapingWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let namespaces: Vec<String> = (1..=c.names.len()).map(|k| c.node_ns(k)).collect();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut polls, mut bad, mut worst) = (0, 0, Duration::ZERO);
            let mut since: Option<Instant> = None;
            while !flag.load(Ordering::SeqCst) {
                let mut all = true;
                for ns in &namespaces {
                    let o = Command::new("nsenter")
                        .arg(format!("--net=/run/netns/{ns}"))
                        .args(["tc", "qdisc", "show", "dev", "eth0"])
                        .output()
                        .expect("tc");
                    all &= String::from_utf8_lossy(&o.stdout).contains("qdisc htb e9: root");
                }
                polls += 1;
                if all {
                    since = None;
                } else {
                    bad += 1;
                    let s = *since.get_or_insert_with(Instant::now);
                    worst = worst.max(s.elapsed());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (polls, bad, worst)
        });
        ShapingWatch {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> (u32, u32, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("watch thread")
    }
}

/// A test that panics mid-way stops the polling too.
impl Drop for ShapingWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// iperf3 from node `name` to the receiver for `secs` seconds; the
/// receiver's per-second rates in Mbit/s (the sender's count its socket
/// buffer filling, not what crossed the uplink).
fn iperf3(c: &Nodes, name: &str, to: &str, port: u16, secs: u32) -> Vec<f64> {
    let o = c.exec(
        name,
        &[
            "iperf3",
            "-c",
            to,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
            "--get-server-output",
        ],
    );
    received(&o.stdout).unwrap_or_else(|| {
        panic!(
            "iperf3 from {name} to {to}:{port}:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// The receiver's per-second rates (Mbit/s) in `iperf3 -J --get-server-output`.
fn received(json: &[u8]) -> Option<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let rates: Vec<f64> = v["server_output_json"]["intervals"]
        .as_array()?
        .iter()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .map(|b| b / 1e6)
        .collect();
    (!rates.is_empty()).then_some(rates)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The agent's process on node `name` (its pid in this machine's pid space).
fn agent_pid(c: &Nodes, name: &str) -> Option<u32> {
    let k: usize = name.trim_start_matches("eg-node-").parse().ok()?;
    let ns = c.node_ns(k);
    let o = Command::new("pgrep")
        .args(["-x", "node-shaper"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            Command::new("ip")
                .args(["netns", "identify", &pid.to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == ns)
                .unwrap_or(false)
        })
}

/// Resident memory of every process of the cluster, by component, in MiB.
fn rss_report(c: &Nodes) -> String {
    let mut rows: Vec<(String, f64)> = vec![];
    let pids = std::fs::read_to_string(c.cp.dir.join("pids")).unwrap_or_default();
    for (pid, name) in pids.lines().filter_map(|l| l.split_once(' ')) {
        if let Ok(pid) = pid.parse::<u32>() {
            rows.push((
                name.trim_start_matches("nodes/").to_string(),
                cluster::rss_mib(pid),
            ));
        }
    }
    let rundir = format!("/run/egressguard/{}/", c.net.prefix);
    let by_comm = |comm: &str| -> Vec<u32> {
        let o = Command::new("pgrep")
            .args(["-x", comm])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let shims: Vec<u32> = by_comm("containerd-shim")
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&rundir))
        })
        .collect();
    let total: f64 = shims.iter().map(|p| cluster::rss_mib(*p)).sum();
    rows.push((format!("containerd-shim-runc-v2 x{}", shims.len()), total));
    for name in &c.names {
        if let Some(pid) = agent_pid(c, name) {
            rows.push((format!("node-shaper pod on {name}"), cluster::rss_mib(pid)));
        }
    }
    // Operators of this cluster: in its nodes' pod cgroups (other tests run
    // operators as plain processes).
    let ours = format!("/{}-n", c.net.prefix);
    for pid in by_comm("egressguard-ope").into_iter().filter(|p| {
        std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|g| g.contains(&ours))
    }) {
        rows.push(("operator pod".into(), cluster::rss_mib(pid)));
    }
    rows.iter()
        .map(|(n, m)| format!("{n} {m:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn helm_ok(what: &str, o: std::process::Output) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// `helm install --wait` to `helm uninstall --wait` on two kubelet nodes:
/// pods, securityContext, shaping measured, exec and logs, an agent pod
/// deleted, its container killed, a node restarted — shaping polled every
/// 100 ms never disappears — and nothing left after the uninstall.
#[test]
fn e2e_chart_on_kubelet_nodes_install_survive_uninstall() {
    if !available() {
        return;
    }
    let started = Instant::now();
    let c = Nodes::up(2);
    eprintln!(
        "cluster with 2 Ready nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    helm_ok("helm install --wait", c.install(&c.values("0.1.0")));
    eprintln!("helm install --wait: {:.1} s", t.elapsed().as_secs_f64());
    eprintln!("resident memory (MiB): {}", rss_report(&c));

    // The DaemonSet on every node, two operator replicas, one leader.
    let ds: serde_json::Value = serde_json::from_str(&c.cp.kubectl_ok(&[
        "get",
        "ds",
        "-n",
        NAMESPACE,
        &format!("{}-node-shaper", cluster::RELEASE),
        "-o",
        "json",
    ]))
    .expect("the DaemonSet as JSON");
    assert_eq!(ds["status"]["numberReady"], 2, "{}", c.context());
    let operators = c.pods("operator");
    assert_eq!(
        operators.iter().filter(|p| ready(p)).count(),
        2,
        "{}",
        c.context()
    );
    let lease = c.cp.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        NAMESPACE,
        "egressguard-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert!(
        operators
            .iter()
            .any(|p| p["metadata"]["name"] == lease.trim()),
        "Lease holder {lease:?} is not one of the operator pods"
    );
    // Exactly the chart's securityContext, and what the kernel gave the agent:
    // CAP_NET_ADMIN (bit 12) and nothing else.
    let want = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    for p in c.pods("node-shaper") {
        assert_eq!(&p["spec"]["containers"][0]["securityContext"], want);
    }
    assert_eq!(
        want["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    let pid = agent_pid(&c, "eg-node-1").expect("agent process on eg-node-1");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim);
    assert_eq!(
        cap_eff,
        Some("0000000000001000"),
        "the agent's effective capabilities"
    );

    // A guard: every node's eth0 shaped, and the rates hold.
    c.cp.apply(&guard(serde_json::json!({})).to_string());
    c.wait_for("every node's eth0 shaped", 60, || {
        c.names.iter().all(|n| c.shaped(n))
    });
    let rx = c.receiver();
    rx.iperf3_server(THROTTLED);
    rx.iperf3_server(OPEN);
    for name in &c.names {
        let throttled = mean(&iperf3(&c, name, &rx.addr, THROTTLED, 5)[1..]);
        let open = mean(&iperf3(&c, name, &rx.addr, OPEN, 3)[1..]);
        eprintln!(
            "{name}: to the throttled port {throttled:.2} Mbit/s, to an open port {open:.2} Mbit/s"
        );
        assert!(
            throttled < THROTTLE_MBIT * 1.2 && throttled > THROTTLE_MBIT * 0.5,
            "{name}: {throttled} Mbit/s to the throttled port"
        );
        assert!(
            open > 20.0 && open < 40.0 * 1.1,
            "{name}: {open} Mbit/s to an open port (uplink 40)"
        );
    }

    // kubectl exec and logs through the API server to the kubelets.
    let agent = c.agent_pod("eg-node-1").expect("agent pod");
    let pod = agent["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let show =
        c.cp.kubectl_ok(&["exec", "-n", NAMESPACE, &pod, "--", "node-shaper", "show"]);
    assert!(
        show.contains("eth0") && show.contains("e9:"),
        "node-shaper show:\n{show}"
    );
    let logs = c.cp.kubectl_ok(&["logs", "-n", NAMESPACE, lease.trim()]);
    assert!(
        logs.contains("lead"),
        "the leader's log names its leadership:\n{logs}"
    );

    // An agent pod deleted: the DaemonSet brings a new one; shaping stays.
    let watch = ShapingWatch::start(&c);
    let t = Instant::now();
    c.cp.kubectl_ok(&["delete", "pod", "-n", NAMESPACE, &pod, "--wait=false"]);
    c.wait_for("a new agent pod Ready on eg-node-1", 90, || {
        c.agent_pod("eg-node-1")
            .is_some_and(|p| p["metadata"]["name"] != pod.as_str() && ready(&p))
    });
    let back = t.elapsed();
    // Its container killed: the kubelet restarts it.
    let before = restarts(&c.agent_pod("eg-node-1").expect("agent"));
    let pid = agent_pid(&c, "eg-node-1").expect("agent process");
    cluster::signal(pid, "KILL");
    let t = Instant::now();
    c.wait_for("the killed agent container restarted and Ready", 90, || {
        c.agent_pod("eg-node-1")
            .is_some_and(|p| restarts(&p) > before && ready(&p))
    });
    let restarted = t.elapsed();
    // The node's kubelet and containerd stopped and started again.
    c.node("stop", "eg-node-1");
    std::thread::sleep(Duration::from_secs(5));
    let t = Instant::now();
    c.node("start", "eg-node-1");
    c.wait_for(
        "eg-node-1's kubelet healthy and Ready again, its agent Ready",
        90,
        || {
            let healthz = c.exec(
                "eg-node-1",
                &["curl", "-sf", "http://127.0.0.1:10248/healthz"],
            );
            let node = c.cp.get("node", "eg-node-1");
            healthz.status.success()
                && node.is_some_and(|n| cluster::condition(&n, "Ready").0 == "True")
                && c.agent_pod("eg-node-1").is_some_and(|p| ready(&p))
        },
    );
    let node_back = t.elapsed();
    let (polls, bad, worst) = watch.stop();
    eprintln!(
        "agent pod deleted: new pod Ready in {:.1} s; container killed: Ready again in {:.1} s; \
         node stopped 5 s: kubelet healthy, node and agent Ready {:.1} s after its start; {polls} polls of 2 nodes every 100 ms, \
         {bad} found a node unshaped (longest {:.0} ms)",
        back.as_secs_f64(),
        restarted.as_secs_f64(),
        node_back.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );
    assert_eq!(bad, 0, "a node was unshaped for {worst:?}");

    // helm uninstall --wait: every node unshaped, nothing of the chart left
    // but what it keeps on purpose (the CRDs and the webhook token Secret,
    // `helm.sh/resource-policy: keep`) and the Leases its pods wrote at run
    // time (the leader's and the heartbeats: records, not chart objects).
    helm_ok("helm uninstall --wait", c.cp.helm_uninstall());
    c.wait_for("every node unshaped", 30, || {
        c.names.iter().all(|n| !c.shaped(n))
    });
    c.wait_for("the chart's pods gone", 60, || {
        c.pods("node-shaper").is_empty() && c.pods("operator").is_empty()
    });
    let left = c.cp.kubectl_ok(&[
        "get",
        "all,sa,role,rolebinding,cm,secret,lease,pdb",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ]);
    let left: Vec<&str> = left
        .lines()
        .filter(|l| {
            !matches!(
                *l,
                "serviceaccount/default"
                    | "configmap/kube-root-ca.crt"
                    | "secret/eg-operator-webhook-token"
                    | "lease.coordination.k8s.io/egressguard-operator"
            )
        })
        .filter(|l| !l.starts_with("lease.coordination.k8s.io/node-shaper-eg-node-"))
        .collect();
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
    let cluster_wide = c.cp.kubectl_ok(&[
        "get",
        "clusterrole,clusterrolebinding,validatingadmissionpolicy,validatingadmissionpolicybinding",
        "-l",
        &format!("app.kubernetes.io/instance={}", cluster::RELEASE),
        "-o",
        "name",
    ]);
    assert!(
        cluster_wide.trim().is_empty(),
        "left after helm uninstall: {cluster_wide}"
    );
    drop(rx);
}

/// `helm upgrade` to a new image tag rolls the DaemonSet while a flow to a
/// throttled port, measured every second, never exceeds 1.2x the throttle;
/// then the kubelet's probes during a 100,000-entry apply and with 300 idle
/// connections held on the agent's metrics port: no container restarted.
#[test]
fn e2e_chart_on_kubelet_nodes_upgrade_roll_and_probes() {
    if !available() {
        return;
    }
    let c = Nodes::up(2);
    helm_ok("helm install --wait", c.install(&c.values("0.1.0")));
    c.cp.apply(&guard(serde_json::json!({})).to_string());
    c.wait_for("every node's eth0 shaped", 60, || {
        c.names.iter().all(|n| c.shaped(n))
    });
    let rx = c.receiver();
    rx.iperf3_server(THROTTLED);

    // The same images under a new tag: the pod template changes, the DaemonSet rolls.
    // In the cluster's namespace, where the registry listens.
    let o =
        c.cp.command("bash")
            .arg(cluster::root().join("scripts/build-images.sh"))
            .args(["--push", &c.net.registry, "--tag", "0.1.0-next"])
            .output()
            .expect("build-images.sh");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let old: Vec<String> = c
        .pods("node-shaper")
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
        .collect();
    let flow = {
        let (c_dir, ns, addr) = (c.cp.dir.clone(), "eg-node-1".to_string(), rx.addr.clone());
        std::thread::spawn(move || {
            let o = Command::new("bash")
                .arg(cluster::root().join("scripts/dev-cluster.sh"))
                .arg("exec")
                .arg(&c_dir)
                .args([
                    &ns,
                    "--",
                    "iperf3",
                    "-c",
                    &addr,
                    "-p",
                    &THROTTLED.to_string(),
                    "-t",
                    "45",
                    "-J",
                    "--get-server-output",
                ])
                .stderr(Stdio::null())
                .output()
                .expect("iperf3");
            o.stdout
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    helm_ok(
        "helm upgrade --wait",
        c.cp.helm(
            &["upgrade", cluster::RELEASE, "--wait"],
            Some((
                &cluster::root().join("charts/egressguard"),
                &c.values("0.1.0-next"),
            )),
        ),
    );
    c.wait_for(
        "the DaemonSet rolled: new agent pods Ready on every node",
        120,
        || {
            let pods = c.pods("node-shaper");
            pods.len() == 2
                && pods.iter().all(|p| {
                    ready(p)
                        && !old.iter().any(|u| p["metadata"]["uid"] == u.as_str())
                        && p["spec"]["containers"][0]["image"]
                            .as_str()
                            .is_some_and(|i| i.ends_with(":0.1.0-next"))
                })
        },
    );
    let rolled = t.elapsed();
    let out = flow.join().expect("iperf3 thread");
    let per_second = received(&out)
        .unwrap_or_else(|| panic!("iperf3 during the roll:\n{}", String::from_utf8_lossy(&out)));
    let max = per_second.iter().skip(1).copied().fold(0.0, f64::max);
    eprintln!(
        "helm upgrade rolled both agents in {:.1} s; the throttled flow ({THROTTLE_MBIT} Mbit) every second: max {max:.2} Mbit/s over {} s: {per_second:.2?}",
        rolled.as_secs_f64(),
        per_second.len()
    );
    assert!(
        rolled < Duration::from_secs(40),
        "the roll outlasted the measured flow"
    );
    assert!(
        max <= THROTTLE_MBIT * 1.2,
        "the throttled flow reached {max} Mbit/s during the roll"
    );

    // The kubelet's probes: 300 idle connections on the agent's metrics port
    // of eg-node-1, then a 100,000-entry whitelist applied on every node.
    let mut holder = rx.hold_idle(&c.node_ip(1), 9464, 300);
    eprintln!(
        "{} idle connections open to eg-node-1's metrics port",
        holder.held()
    );
    let entries: usize = std::env::var("EG_BIG_APPLY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let per_group = 25_000;
    let mut groups = vec![];
    for g in 0..entries.div_ceil(per_group) {
        let cidrs: Vec<String> = (g * per_group..((g + 1) * per_group).min(entries))
            .map(|i| format!("100.{}.{}.{}/32", 64 + (i >> 16), (i >> 8) & 255, i & 255))
            .collect();
        groups.push(serde_json::json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "CIDRGroup",
            "metadata": {"name": format!("big-{g}"), "labels": {"test": "big"}}, "spec": {"cidrs": cidrs}}));
    }
    let f = c.cp.dir.join("groups.json");
    std::fs::write(
        &f,
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": groups}).to_string(),
    )
    .expect("groups");
    c.cp.kubectl_ok(&["create", "-f", &f.to_string_lossy()]);
    let t = Instant::now();
    c.cp.apply(&guard(serde_json::json!({"whitelistGroups": [{"selector": {"matchLabels": {"test": "big"}}}]})).to_string());
    c.wait_for(
        &format!("{entries} entries enforced on every node"),
        300,
        || {
            c.names.iter().all(|n| {
                c.cp.get("nodeshaping", n).is_some_and(|s| {
                    s["status"]["interfaces"][0]["enforced"] == true
                        && s["status"]["interfaces"][0]["filters"].as_u64() >= Some(entries as u64)
                })
            })
        },
    );
    let applied = t.elapsed();
    // Probes run every 10 s: give them two more rounds after the apply.
    std::thread::sleep(Duration::from_secs(20));
    let held = holder.held();
    let pods = c.pods("node-shaper");
    assert_eq!(pods.len(), 2, "agent pods: {}", c.context());
    let counts: Vec<u64> = pods.iter().map(restarts).collect();
    eprintln!(
        "{entries} entries enforced on both nodes in {:.1} s; {held} idle connections held on eg-node-1's metrics port; agent restartCounts {counts:?}, all Ready: {}",
        applied.as_secs_f64(),
        pods.iter().all(ready)
    );
    assert!(held >= 250, "only {held} idle connections were held open");
    assert!(
        counts.iter().all(|n| *n == 0),
        "agent containers restarted: {counts:?}\n{}",
        c.context()
    );
    assert!(pods.iter().all(ready), "{}", c.context());
    drop(holder);
    drop(rx);
}

//! Footprint and fleet-scale benchmark, against a real control plane
//! (`scripts/dev-cluster.sh`), components authenticated as the chart's
//! ServiceAccounts:
//! - `node-shaper run` idle RSS with a 10,000- and a 100,000-entry whitelist
//!   enforced, read by reference from CIDRGroups (< 20 and < 40 MiB);
//! - `egressguard-operator run` with a fleet (full: 5,000 nodes and 100
//!   guards; `--nodes N --guards G` to see how each figure grows), 5 guards
//!   referencing their own 10,000-entry CIDRGroup and all of them a shared
//!   one of as many: time from process start to every plan and guard status
//!   written (< 10 s), RSS (< 256 MiB), bytes the NodeShapings occupy in
//!   storage (< 10 MB); one group edit: the time until every node's agent,
//!   watching its guard, sees the guard's status name the new version
//!   (< 15 s), and the bytes written to the API (< 5 MB); one Node's label
//!   change to its new plan (< 1 s); a Prometheus breach (a stand-in for
//!   Prometheus's query API) to the node's plan enforcing, after `for` (< 1 s).
//!
//! `cargo build --release --workspace --bins && cargo bench -p egressguard-e2e --bench footprint`
//! (`-- --smoke` uses 200 nodes, 10 guards and 1,000-entry lists and enforces nothing but function).

#[path = "../../node-shaper/tests/lab/mod.rs"]
mod lab;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egressguard_crds::CidrGroupSpec;
use egressguard_e2e::cluster::{self, rss_mib, ControlPlane, Options};
use lab::*;
use serde_json::{json, Value};

fn release_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("bench binary");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    if !bin.exists() {
        eprintln!(
            "{} missing: run `cargo build --release --workspace --bins` first",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates many objects with one kubectl call (a List manifest).
fn create_all(cp: &ControlPlane, items: Vec<Value>) {
    let f = cp.dir.join(format!("list-{}.json", cluster::unique()));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&f, list.to_string()).expect("write list");
    let o = cp.kubectl(&["create", "-f", &f.to_string_lossy(), "-o", "name"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// CIDRGroup objects holding `cidrs` in chunks of at most `chunk`, labelled
/// `label`; with each one's name and digest, sorted by name.
fn groups(
    prefix: &str,
    label: &str,
    cidrs: &[String],
    chunk: usize,
) -> (Vec<Value>, Vec<(String, String)>) {
    let mut objs = Vec::new();
    let mut refs = Vec::new();
    for (i, c) in cidrs.chunks(chunk).enumerate() {
        let name = format!("{prefix}-{i}");
        refs.push((name.clone(), CidrGroupSpec { cidrs: c.to_vec() }.digest()));
        objs.push(
            json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "CIDRGroup",
            "metadata": {"name": name, "labels": {"bench": label}}, "spec": {"cidrs": c}}),
        );
    }
    refs.sort();
    (objs, refs)
}

/// Idle RSS of `node-shaper run` enforcing a guard whose whitelist is
/// `entries` networks (the benchmark's mix of /32, /24, /16 and IPv6 /48,
/// /64, /128) held in CIDRGroups, as the operator would plan it.
/// The agent's resident memory with `entries` enforced: (idle, peak). The
/// peak is the process's high-water mark (VmHWM), its first pass from
/// scratch included: what decides whether the kubelet OOM-kills it.
fn agent_rss(entries: usize) -> (f64, f64) {
    let lab = Lab::new("fp");
    let cp = ControlPlane::start(
        &lab.dir.join("cp"),
        Options {
            netns: Some(lab.cli.clone()),
            ..Options::default()
        },
    );
    cp.helm_install(&json!({}));
    cp.add_node("node-a", "", None);
    let kc = cp.agent_kubeconfig("node-a", &cp.server);
    let v6 = entries * 3 / 100;
    let wl = whitelist(entries - v6, v6);
    // 25,000 entries per group keeps each object far below etcd's 1.5 MiB.
    let (objs, refs) = groups("partners", "agent", &wl, 25_000);
    create_all(&cp, objs);
    create_all(
        &cp,
        vec![json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": "bench"},
        "spec": {"interfaces": [DEV], "uplink": {"rate": "1gbit"}, "throttle": {"rate": "10mbit", "destinations": [{"port": 443}]},
                 "whitelistGroups": [{"selector": {"matchLabels": {"bench": "agent"}}}]}})],
    );
    let g = cp.get("eg", "bench").expect("guard");
    let plan = json!({
        "apiVersion": "egressguard.io/v1alpha1", "kind": "NodeShaping", "metadata": {"name": "node-a"},
        "spec": {"nodeName": "node-a", "enforce": true,
                 "guard": {"name": "bench", "uid": g["metadata"]["uid"], "generation": g["metadata"]["generation"]},
                 "groups": refs.iter().map(|(name, digest)| json!({"name": name, "digest": digest})).collect::<Vec<_>>()}
    });
    create_all(&cp, vec![plan]);
    let agent = Command::new("ip")
        .args(["netns", "exec", &lab.cli])
        .arg(release_bin("node-shaper"))
        .args([
            "run",
            "--node-name",
            "node-a",
            "--metrics-addr",
            "127.0.0.1:9464",
        ])
        .env("KUBECONFIG", &kc)
        .env("EGRESSGUARD_STATE_DIR", &lab.dir)
        // As the chart runs it: the kernel thread and the runtime share one
        // extra malloc arena (without: 23.1 MiB idle at 100,000 entries, 19.5 with).
        .env("MALLOC_ARENA_MAX", "2")
        .stderr(
            std::fs::File::create(lab.dir.join("agent.log"))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        )
        .spawn()
        .expect("agent");
    let pid = agent.id();
    let _procs = Kill(vec![agent]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = cp.kubectl(&[
            "get",
            "nodeshapings.egressguard.io",
            "node-a",
            "-o",
            "jsonpath={.status.interfaces[0].enforced}",
        ]);
        if String::from_utf8_lossy(&o.stdout) == "true" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent never enforced the plan:\n{}",
            std::fs::read_to_string(lab.dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let filters = cp.kubectl_ok(&[
        "get",
        "nodeshapings.egressguard.io",
        "node-a",
        "-o",
        "jsonpath={.status.interfaces[0].filters}",
    ]);
    assert!(
        filters.trim().parse::<usize>().unwrap_or(0) >= entries,
        "only {filters} filters for {entries} entries"
    );
    // Idle: let a resync pass and allocator caches settle.
    std::thread::sleep(Duration::from_secs(5));
    let peak = cluster::status_mib(pid, "VmHWM");
    (rss_mib(pid), peak)
}

/// What the fleet run measured.
struct Fleet {
    resync_secs: f64,
    rss: f64,
    cp_rss: f64,
    stored_bytes: usize,
    /// (group, plans that use it, seconds to the last plan, bytes written)
    edits: Vec<(String, usize, f64, u64)>,
    /// One Node's label change to its new plan, as its agent's watch sees it (s).
    relabel_secs: f64,
    /// A Prometheus breach to the node's plan enforcing, after the trigger's
    /// `for` window (s).
    breach_secs: f64,
}

/// A stand-in for Prometheus's query API: every query answers one series,
/// `instance="NODE"`, with the value the bench sets (0 calm, 5 a breach),
/// stamped now. It is the operator's latency that is measured, not Prometheus's.
struct FakePrometheus {
    value: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// When a query was first answered with a breach: the operator's streak
    /// (and so its `for` window) starts at that evaluation.
    first_breach: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    port: u16,
}

impl FakePrometheus {
    fn start(node: &str) -> FakePrometheus {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let value = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let first_breach = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (v, node, first) = (value.clone(), node.to_string(), first_breach.clone());
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let answer = v.load(Ordering::SeqCst);
                if answer > 1 {
                    if let Ok(mut f) = first.lock() {
                        f.get_or_insert_with(Instant::now);
                    }
                }
                let body = format!(
                    r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"instance":"{node}"}},"value":[{now},"{answer}"]}}]}}}}"#
                );
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakePrometheus {
            value,
            first_breach,
            port,
        }
    }

    fn set(&self, v: u32) {
        self.value.store(v, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Seconds from `t0` until `node`'s plan satisfies `done`, as a
/// field-selected watch (an agent's) sees it.
fn plan_watch(cp: &ControlPlane, node: &str, t0: Instant, done: impl Fn(&Value) -> bool) -> f64 {
    use futures::StreamExt;
    use kube::api::{Api, WatchEvent, WatchParams};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kc = cp.kubeconfig.clone();
    rt.block_on(async move {
        let k = kube::config::Kubeconfig::read_from(&kc).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(k, &Default::default())
            .await
            .expect("config");
        let api: Api<egressguard_crds::NodeShaping> =
            Api::all(kube::Client::try_from(cfg).expect("client"));
        let is_done =
            |o: &egressguard_crds::NodeShaping| serde_json::to_value(o).is_ok_and(|v| done(&v));
        let current = api.get(node).await.expect("plan");
        if is_done(&current) {
            return t0.elapsed().as_secs_f64();
        }
        let rv = current.metadata.resource_version.unwrap_or_default();
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={node}"))
            .timeout(120);
        let stream = api.watch(&wp, &rv).await.expect("watch");
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Modified(o) | WatchEvent::Added(o) = ev {
                if is_done(&o) {
                    return t0.elapsed().as_secs_f64();
                }
            }
        }
        panic!("the plan of {node} never changed");
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn plan_write_bytes(port: u16) -> u64 {
    let o = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("egressguard_operator_plan_write_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One field-selected watch per node on its guard, as each agent keeps one
/// (the guard's status names the digests its plans' groups are enforced at);
/// the time each first names `digest` for `group`.
struct Watchers {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    want: std::sync::Arc<std::sync::Mutex<(String, String)>>,
    _rt: tokio::runtime::Runtime,
}

impl Watchers {
    fn start(cp: &ControlPlane, nodes: usize, guards: usize) -> Watchers {
        use futures::StreamExt;
        use kube::api::{Api, WatchEvent, WatchParams};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![None; nodes]));
        let want = std::sync::Arc::new(std::sync::Mutex::new((String::new(), String::new())));
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let kc = cp.kubeconfig.clone();
        let client = rt.block_on(async move {
            let k = kube::config::Kubeconfig::read_from(&kc).expect("kubeconfig");
            let cfg = kube::Config::from_custom_kubeconfig(k, &Default::default())
                .await
                .expect("config");
            kube::Client::try_from(cfg).expect("client")
        });
        for i in 0..nodes {
            let api: Api<egressguard_crds::EgressGuard> = Api::all(client.clone());
            let (seen, want, ready) = (seen.clone(), want.clone(), ready.clone());
            rt.spawn(async move {
                let name = format!("guard-{}", i % guards);
                let rv = api
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|o| o.metadata.resource_version)
                    .unwrap_or_default();
                let wp = WatchParams::default()
                    .fields(&format!("metadata.name={name}"))
                    .timeout(290);
                let Ok(stream) = api.watch(&wp, &rv).await else {
                    return;
                };
                ready.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(ev)) = stream.next().await {
                    if let WatchEvent::Modified(o) | WatchEvent::Added(o) = ev {
                        let (g, d) = want.lock().map(|w| w.clone()).unwrap_or_default();
                        let named = o.status.as_ref().is_some_and(|st| {
                            st.groups.iter().any(|r| r.name == g && r.digest == d)
                        });
                        if named {
                            if let Ok(mut s) = seen.lock() {
                                s[i].get_or_insert_with(Instant::now);
                            }
                        }
                    }
                }
            });
        }
        let t = Instant::now();
        while ready.load(std::sync::atomic::Ordering::SeqCst) < nodes {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "watches never all started"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Watchers {
            seen,
            want,
            _rt: rt,
        }
    }

    /// Waits until `count` watches saw `group` at `digest`; seconds from `t0` to the last.
    fn wait(&self, group: &str, digest: &str, count: usize, t0: Instant) -> f64 {
        loop {
            let last = self.seen.lock().ok().and_then(|s| {
                let hits: Vec<Instant> = s.iter().flatten().copied().collect();
                (hits.len() >= count).then(|| hits.into_iter().max())
            });
            if let Some(Some(last)) = last {
                return last.duration_since(t0).as_secs_f64();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "plans never reflected the edit of {group} ({digest})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn expect(&self, group: &str, digest: &str) {
        if let Ok(mut w) = self.want.lock() {
            *w = (group.into(), digest.into());
        }
        if let Ok(mut s) = self.seen.lock() {
            s.iter_mut().for_each(|x| *x = None);
        }
    }
}

/// Nodes labelled for the Auto guard whose breach is timed (outside every
/// other guard's selector).
const AUTO_NODES: usize = 10;

fn operator_fleet(nodes: usize, guards: usize, entries: usize) -> Fleet {
    let dir = std::env::temp_dir().join(format!("egfp-{}", cluster::unique()));
    // The Nodes here have no kubelet: the node lifecycle controller would
    // mark thousands of them unreachable and taint them in the middle of the
    // measurement, a storm a real fleet (kubelets heartbeating) does not see.
    let cp = ControlPlane::start(
        &dir,
        Options {
            controllers: Some("*,-node-lifecycle-controller".into()),
            ..Options::default()
        },
    );
    cp.helm_install(&json!({}));
    let kc = cp.service_account_kubeconfig(&format!("{}-operator", cluster::RELEASE), &cp.server);
    // Nodes as kubelets register them: status (addresses) included on create.
    let items = (0..nodes)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a64_0000u32 + 10 + i as u32);
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": format!("node-{i}"), "labels": {"group": format!("g{}", i % guards)}},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}})
        })
        .collect();
    create_all(&cp, items);
    let auto_nodes: Vec<Value> = (0..AUTO_NODES)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a65_0000u32 + 10 + i as u32);
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": format!("auto-{i}"), "labels": {"group": "auto"}},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}})
        })
        .collect();
    create_all(&cp, auto_nodes);
    // Five partner lists of `entries` each (one per grouped guard), and a
    // shared list of as many that every guard uses: its edit reaches every plan.
    let all = whitelist(6 * entries, 0);
    let mut big = Vec::new();
    for g in 0..5 {
        let (objs, _) = groups(
            &format!("partners{g}"),
            "partners",
            &all[g * entries..(g + 1) * entries],
            entries,
        );
        big.extend(objs);
    }
    create_all(&cp, big);
    let shared: Vec<String> = all[5 * entries..].to_vec();
    let (objs, _) = groups("shared", "shared", &shared, entries);
    create_all(&cp, objs);
    let items = (0..guards)
        .map(|g| {
            let mut refs = vec![json!({"name": "shared-0"})];
            if g < 5 {
                refs.push(json!({"name": format!("partners{g}-0")}));
            }
            json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": format!("guard-{g}")},
            "spec": {"nodeSelector": {"matchLabels": {"group": format!("g{g}")}}, "uplink": {"rate": "1gbit"},
                     "throttle": {"rate": "10mbit", "destinations": [{"port": 443}, {"port": 80}]}, "whitelist": ["203.0.113.0/24"],
                     "whitelistGroups": refs}})
        })
        .collect();
    create_all(&cp, items);
    let prom = FakePrometheus::start("auto-3");
    create_all(
        &cp,
        vec![
            json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "EgressGuard", "metadata": {"name": "auto"},
            "spec": {"nodeSelector": {"matchLabels": {"group": "auto"}}, "uplink": {"rate": "1gbit"}, "mode": "Auto",
                     "throttle": {"rate": "10mbit", "destinations": [{"port": 443}]},
                     "quarantine": {"triggers": [{"name": "uplink", "prometheus": {"query": "q", "above": 1, "for": "2s"}}],
                                    "release": {"after": "manual"}}}}),
        ],
    );
    let metrics = free_port();
    let start = Instant::now();
    let op = Command::new(release_bin("egressguard-operator"))
        .args([
            "run",
            "--namespace",
            cluster::NAMESPACE,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--probe-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--prometheus-url",
            &format!("http://127.0.0.1:{}", prom.port),
            "--evaluation-interval",
            "1s",
        ])
        .env("KUBECONFIG", &kc)
        .env(
            "RUST_LOG",
            std::env::var("EG_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(
            std::fs::File::create(dir.join("operator.log"))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        )
        .spawn()
        .expect("operator");
    let pid = op.id();
    let _procs = Kill(vec![op]);
    let per_guard = (nodes / guards) as u64;
    loop {
        let plans = cp
            .kubectl_ok(&["get", "egns", "-o", "name"])
            .lines()
            .count();
        let gs: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "eg", "-o", "json"])).unwrap_or_default();
        let done = gs["items"].as_array().is_some_and(|a| {
            a.iter().all(|g| {
                let want = if g["metadata"]["name"] == "auto" {
                    AUTO_NODES as u64
                } else {
                    per_guard
                };
                g["status"]["selectedNodes"].as_u64() == Some(want)
            })
        });
        if plans == nodes + AUTO_NODES && done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "operator did not converge: {plans} plans\n{}",
            std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let resync_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    // What the plans occupy: each object as the API server stores it (JSON,
    // managed fields included).
    let list: Value = serde_json::from_str(&cp.kubectl_ok(&[
        "get",
        "egns",
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .unwrap_or_default();
    let stored_bytes = list["items"].as_array().map_or(0, |a| {
        a.iter()
            .map(|o| serde_json::to_vec(o).map_or(0, |v| v.len()))
            .sum()
    });
    let watchers = Watchers::start(&cp, nodes, guards);
    let mut edits = Vec::new();
    for (name, body, users) in [
        ("shared-0", shared.clone(), nodes),
        ("partners0-0", all[..entries].to_vec(), nodes / guards),
    ] {
        let mut cidrs = body;
        cidrs[7] = "198.51.100.0/24".into();
        let obj = json!({"apiVersion": "egressguard.io/v1alpha1", "kind": "CIDRGroup",
            "metadata": {"name": name}, "spec": {"cidrs": cidrs}});
        let file = dir.join(format!("{name}.json"));
        let text = obj.to_string();
        std::fs::write(&file, &text).expect("write group");
        let digest = CidrGroupSpec { cidrs }.digest();
        watchers.expect(name, &digest);
        let before = plan_write_bytes(metrics);
        let t0 = Instant::now();
        cp.kubectl_ok(&["replace", "-f", &file.to_string_lossy()]);
        let secs = watchers.wait(name, &digest, users, t0);
        std::thread::sleep(Duration::from_secs(2));
        let written = plan_write_bytes(metrics) - before + text.len() as u64;
        edits.push((name.to_string(), users, secs, written));
    }
    // One Node changes guard: node-7 moves from group g7 to g8.
    let t0 = Instant::now();
    let moved = format!("g{}", (7 + 1) % guards);
    let want_guard = format!("guard-{}", (7 + 1) % guards);
    cp.kubectl_ok(&[
        "label",
        "node",
        "node-7",
        &format!("group={moved}"),
        "--overwrite",
    ]);
    let relabel_secs = plan_watch(&cp, "node-7", t0, |p| {
        p["spec"]["guard"]["name"] == want_guard.as_str()
    });
    // A breach of auto-3: the stand-in answers 5 from now; the trigger's
    // `for` is 2 s, the evaluation interval 1 s.
    // Timed from the end of the `for` window (2 s after the first
    // evaluation that saw the breach, when the operator's streak starts) to
    // the plan enforcing, as the node's watch sees it.
    let t0 = Instant::now();
    prom.set(5);
    let seen = plan_watch(&cp, "auto-3", t0, |p| p["spec"]["enforce"] == true);
    let first = prom
        .first_breach
        .lock()
        .ok()
        .and_then(|f| *f)
        .expect("the operator asked");
    let breach_secs = seen - first.duration_since(t0).as_secs_f64() - 2.0;
    let rss = rss_mib(pid);
    let cp_rss = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|c| cp.rss_mib(c))
        .sum();
    if std::env::var("EG_OPERATOR_LOG").is_ok() {
        let _ = std::fs::copy(
            dir.join("operator.log"),
            "/tmp/egressguard-operator-bench.log",
        );
    }
    Fleet {
        resync_secs,
        rss,
        cp_rss,
        stored_bytes,
        edits,
        relabel_secs,
        breach_secs,
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    if !available() {
        std::process::exit(2);
    }
    let (agent_sizes, nodes, guards, entries): (&[(usize, f64)], usize, usize, usize) = if smoke {
        (&[(1_000, 20.0)], 200, 10, 1_000)
    } else {
        (&[(10_000, 20.0), (100_000, 40.0)], 5_000, 100, 10_000)
    };
    // `--nodes N --guards G` size the fleet (to see how each figure grows).
    let arg = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let nodes = arg("--nodes").unwrap_or(nodes);
    let guards = arg("--guards").unwrap_or(guards);
    println!(
        "footprint benchmark ({}) against a real control plane",
        if smoke { "smoke" } else { "full" }
    );
    let mut missed = 0;
    let mut check = |what: &str, value: String, target: &str, ok: bool| {
        println!(
            "{what:<72} {value:>12}  target {target:<10} {}",
            if ok { "met" } else { "MISSED" }
        );
        missed += usize::from(!ok);
    };
    // EG_BENCH_ONLY=agent or =fleet runs one half (while working on it).
    let only = std::env::var("EG_BENCH_ONLY").unwrap_or_default();
    for &(n, target) in agent_sizes.iter().filter(|_| only != "fleet") {
        let (a, peak) = agent_rss(n);
        check(
            &format!("node-shaper run idle RSS, {n}-entry whitelist from CIDRGroups (MiB)"),
            format!("{a:.1}"),
            &format!("< {target}"),
            smoke || a < target,
        );
        check(
            &format!(
                "node-shaper run peak RSS (its passes, from scratch included), {n} entries (MiB)"
            ),
            format!("{peak:.1}"),
            "<= 48",
            smoke || peak <= 48.0,
        );
    }
    if only == "agent" {
        std::process::exit(i32::from(missed > 0));
    }
    let f = operator_fleet(nodes, guards, entries);
    println!(
        "{:<72} {:>12.1}",
        "control plane RSS (etcd + apiserver + controller-manager, MiB)", f.cp_rss
    );
    check(
        &format!("operator full resync, {nodes} nodes / {guards} guards (s)"),
        format!("{:.2}", f.resync_secs),
        "< 10",
        smoke || f.resync_secs < 10.0,
    );
    check(
        &format!("operator RSS, {nodes} nodes / {guards} guards, 6 x {entries}-entry groups (MiB)"),
        format!("{:.1}", f.rss),
        "< 256",
        smoke || f.rss < 256.0,
    );
    check(
        &format!("one Node relabelled -> its plan names the new guard, {nodes} nodes (s)"),
        format!("{:.2}", f.relabel_secs),
        "< 1",
        smoke || f.relabel_secs < 1.0,
    );
    check(
        &format!("Prometheus breach -> the node's plan enforces, after `for`, {nodes} nodes (s)"),
        format!("{:.2}", f.breach_secs),
        "< 1",
        smoke || f.breach_secs < 1.0,
    );
    check(
        &format!("NodeShapings stored, {nodes} plans (MB)"),
        format!("{:.2}", f.stored_bytes as f64 / 1e6),
        "< 10",
        smoke || f.stored_bytes < 10_000_000,
    );
    for (group, users, secs, bytes) in &f.edits {
        check(
            &format!("edit of CIDRGroup {group} -> the guards of all {users} nodes name it, as their agents watch (s)"),
            format!("{secs:.2}"),
            "< 15",
            smoke || *secs < 15.0,
        );
        check(
            &format!("edit of CIDRGroup {group}: bytes written to the API (MB)"),
            format!("{:.2}", *bytes as f64 / 1e6),
            "< 5",
            smoke || *bytes < 5_000_000,
        );
    }
    if missed > 0 {
        std::process::exit(1);
    }
}

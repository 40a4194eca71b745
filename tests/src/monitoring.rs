//! Real Prometheus, Alertmanager and a test-controlled exporter, started in
//! a test's network namespace (Debian's packages; `scripts/install-deps.sh`
//! installs them). The exporter serves a file the test rewrites, so the test
//! decides each node's value and when it changes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The metric the exporter serves, one series per node.
pub const METRIC: &str = "egressguard_test_transmit_bits";

/// A file-backed exporter: `set` changes what Prometheus scrapes next.
pub struct Exporter {
    dir: PathBuf,
}

impl Exporter {
    /// Serves `dir/metrics` on `127.0.0.1:port` inside `netns`.
    pub fn start(netns: &str, dir: &Path, port: u16) -> (Exporter, Child) {
        let dir = dir.join("exporter");
        std::fs::create_dir_all(&dir).expect("exporter dir");
        let e = Exporter { dir: dir.clone() };
        e.set(&[]);
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-m", "http.server"])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(&dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        (e, child)
    }

    /// Sets each node's value (replaced atomically: a scrape never sees half a file).
    pub fn set(&self, values: &[(&str, f64)]) {
        let mut body = format!("# TYPE {METRIC} gauge\n");
        for (node, v) in values {
            body.push_str(&format!("{METRIC}{{node=\"{node}\"}} {v}\n"));
        }
        let tmp = self.dir.join("metrics.tmp");
        std::fs::write(&tmp, body).expect("write metrics");
        std::fs::rename(&tmp, self.dir.join("metrics")).expect("rename metrics");
    }
}

/// Where the monitoring processes listen (all on the namespace's loopback).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The exporter.
    pub exporter: u16,
    /// Prometheus.
    pub prometheus: u16,
    /// Alertmanager.
    pub alertmanager: u16,
    /// The operator's receiver.
    pub receiver: u16,
}

/// Writes Prometheus's config: scrape the exporter every second, evaluate
/// `rule` (an alert on [`METRIC`]) every second, alert to Alertmanager.
pub fn prometheus_config(dir: &Path, ports: Ports, alert_above: f64) -> PathBuf {
    let rules = dir.join("rules.yml");
    std::fs::write(
        &rules,
        format!(
            "groups:\n- name: egressguard\n  interval: 1s\n  rules:\n  - alert: NodeEgressSaturated\n    expr: {METRIC} > {alert_above}\n    labels: {{egressguard: quarantine}}\n"
        ),
    )
    .expect("rules");
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nalerting:\n  alertmanagers:\n  - static_configs: [{{targets: ['127.0.0.1:{}']}}]\nscrape_configs:\n- job_name: nodes\n  static_configs: [{{targets: ['127.0.0.1:{}']}}]\n",
            rules.display(),
            ports.alertmanager,
            ports.exporter
        ),
    )
    .expect("prometheus.yml");
    cfg
}

/// Starts Prometheus in `netns`; its data stays in `dir` across restarts.
pub fn start_prometheus(netns: &str, dir: &Path, ports: Ports) -> Child {
    start_prometheus_at(netns, dir, &format!("127.0.0.1:{}", ports.prometheus))
}

/// Starts Prometheus in `netns` listening on `listen` (`HOST:PORT`).
pub fn start_prometheus_at(netns: &str, dir: &Path, listen: &str) -> Child {
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    Command::new("ip")
        .args(["netns", "exec", netns, "prometheus"])
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus")
}

/// Starts Alertmanager in `netns`, routing every alert to the operator's
/// receiver with the bearer token in `token_file`.
pub fn start_alertmanager(netns: &str, dir: &Path, ports: Ports, token_file: &Path) -> Child {
    let url = format!("http://127.0.0.1:{}/alertmanager", ports.receiver);
    start_alertmanager_to(netns, dir, ports, &[url], token_file)
}

/// Starts Alertmanager in `netns`, routing every alert to each of `urls`
/// (every operator replica: any one receives, the leader decides).
pub fn start_alertmanager_to(
    netns: &str,
    dir: &Path,
    ports: Ports,
    urls: &[String],
    token_file: &Path,
) -> Child {
    let cfg = dir.join("alertmanager.yml");
    let hooks: String = urls
        .iter()
        .map(|u| {
            format!(
                "  - url: {u}\n    send_resolved: true\n    max_alerts: 1000\n    http_config:\n      authorization: {{credentials_file: {}}}\n",
                token_file.display()
            )
        })
        .collect();
    std::fs::write(
        &cfg,
        format!(
            "route:\n  receiver: egressguard\n  group_by: [alertname, node]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n- name: egressguard\n  webhook_configs:\n{hooks}"
        ),
    )
    .expect("alertmanager.yml");
    let log = std::fs::File::create(dir.join("alertmanager.log")).expect("log");
    Command::new("ip")
        .args(["netns", "exec", netns, "prometheus-alertmanager"])
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.path={}", dir.join("am").display()))
        .arg(format!(
            "--web.listen-address=127.0.0.1:{}",
            ports.alertmanager
        ))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("alertmanager")
}

/// The operator's quarantine flags for a test or lab: Prometheus on
/// `ports.prometheus`, evaluations every second, the receiver on
/// `ports.receiver` with the token in `token_file`.
pub fn operator_flags(ports: Ports, token_file: &Path) -> Vec<String> {
    vec![
        "--prometheus-url".into(),
        format!("http://127.0.0.1:{}", ports.prometheus),
        "--evaluation-interval".into(),
        "1s".into(),
        "--webhook-addr".into(),
        format!("127.0.0.1:{}", ports.receiver),
        "--webhook-token-file".into(),
        token_file.display().to_string(),
    ]
}

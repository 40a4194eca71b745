//! A real Kubernetes control plane for one test: etcd, kube-apiserver and
//! kube-controller-manager started by `scripts/dev-cluster.sh` (built from
//! their Go modules in `tests/control-plane`), optionally inside the test's own
//! network namespace, and stopped on drop, also when the test panics.
//!
//! Components run as the chart's ServiceAccounts with tokens from the
//! TokenRequest API, so the chart's RBAC authorizes every call they make.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The release name and namespace the tests install the chart as.
pub const RELEASE: &str = "eg";
/// Namespace of the chart's objects.
pub const NAMESPACE: &str = "egressguard-system";

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where to reach the API server from outside its namespace, and what the
/// serving certificate must name.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Network namespace to run the control plane in (none: this one).
    pub netns: Option<String>,
    /// kube-apiserver bind address (default 127.0.0.1).
    pub bind: Option<String>,
    /// Address published in the `kubernetes` EndpointSlice.
    pub advertise: Option<String>,
    /// Extra IP SANs of the serving certificate.
    pub sans: Vec<String>,
    /// kube-controller-manager's `--controllers` (default `*`).
    pub controllers: Option<String>,
    /// Kubelet nodes to start (`dev-cluster.sh up --nodes N`; 0: none).
    pub nodes: usize,
    /// Their names' prefix (`EG_NODES_PREFIX`; default from the directory).
    pub nodes_prefix: Option<String>,
}

/// A running control plane; dropped, it stops exactly its processes and
/// removes its directory.
pub struct ControlPlane {
    /// Its directory (certificates, logs, pids, kubeconfig).
    pub dir: PathBuf,
    /// The admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT` as seen inside its namespace (with nodes,
    /// `https://BRIDGE:PORT`).
    pub server: String,
    /// The API server's port.
    pub port: u16,
    opts: Options,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // In its namespace (the nodes' bridge and routes live there), or
        // here if that namespace is already gone: the processes must stop.
        let netns = self
            .opts
            .netns
            .as_deref()
            .filter(|ns| Path::new(&format!("/run/netns/{ns}")).exists());
        let _ = in_netns(netns, "bash")
            .arg(root().join("scripts/dev-cluster.sh"))
            .arg("down")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A command in `netns`'s network namespace only: unlike `ip netns exec`,
/// nsenter leaves the mount namespace (and /sys, with its cgroups) alone,
/// which the kubelet and containerd need.
fn in_netns(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl ControlPlane {
    /// Starts a control plane in `dir` (which must not exist yet).
    pub fn start(dir: &Path, opts: Options) -> ControlPlane {
        let up = || {
            let mut cmd = in_netns(opts.netns.as_deref(), "bash");
            cmd.arg(root().join("scripts/dev-cluster.sh")).arg("up");
            if opts.nodes > 0 {
                cmd.args(["--nodes", &opts.nodes.to_string()]);
            }
            cmd.arg(dir);
            if let Some(b) = &opts.bind {
                cmd.env("EG_CP_BIND", b);
            }
            if let Some(a) = &opts.advertise {
                cmd.env("EG_CP_ADVERTISE", a);
            }
            if !opts.sans.is_empty() {
                cmd.env("EG_CP_SANS", opts.sans.join(","));
            }
            if let Some(c) = &opts.controllers {
                cmd.env("EG_CP_CONTROLLERS", c);
            }
            if let Some(p) = &opts.nodes_prefix {
                cmd.env("EG_NODES_PREFIX", p);
            }
            cmd.output().expect("run scripts/dev-cluster.sh")
        };
        let mut out = up();
        // A port the script found free can be taken by another test's
        // process before etcd or kube-apiserver binds it (tests start control
        // planes in parallel): that start is stopped and tried again with new
        // ports; any other failure fails at once.
        for _ in 0..2 {
            if out.status.success()
                || !String::from_utf8_lossy(&out.stderr).contains("address already in use")
            {
                break;
            }
            let _ = in_netns(opts.netns.as_deref(), "bash")
                .arg(root().join("scripts/dev-cluster.sh"))
                .arg("down")
                .arg(dir)
                .output();
            out = up();
        }
        let mut cp = ControlPlane {
            dir: dir.to_path_buf(),
            kubeconfig: dir.join("kubeconfig"),
            server: String::new(),
            port: 0,
            opts,
        };
        assert!(
            out.status.success(),
            "dev-cluster.sh up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoints = std::fs::read_to_string(dir.join("endpoints")).expect("endpoints");
        cp.server = endpoints
            .lines()
            .find_map(|l| l.strip_prefix("server="))
            .expect("server")
            .to_string();
        cp.port = cp
            .server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        cp
    }

    /// A command run in the control plane's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(self.opts.netns.as_deref(), program)
    }

    /// kubectl as cluster-admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// kubectl with another kubeconfig (a ServiceAccount's).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.command("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kube-cache"))
            .arg("--request-timeout=10s")
            .args(args)
            .output()
            .expect("kubectl")
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `kubectl apply -f` of a manifest text; returns the command's output.
    pub fn apply_output(&self, yaml: &str) -> Output {
        let f = self.dir.join(format!("obj-{}.yaml", unique()));
        std::fs::write(&f, yaml).expect("write manifest");
        self.kubectl(&["apply", "-f", &f.to_string_lossy()])
    }

    /// `kubectl apply -f` that must succeed.
    pub fn apply(&self, yaml: &str) {
        let o = self.apply_output(yaml);
        assert!(
            o.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// An object as JSON, or None when it does not exist.
    pub fn get(&self, what: &str, name: &str) -> Option<serde_json::Value> {
        let o = self.kubectl(&["get", what, name, "-o", "json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    }

    /// Installs charts/egressguard with the real Helm CLI (CRDs, namespace,
    /// ServiceAccounts, roles, bindings, Services, Deployment and DaemonSet
    /// objects); returns what `helm install` printed.
    pub fn helm_install(&self, values: &serde_json::Value) -> String {
        let out = self.helm(
            &["install", RELEASE, "--create-namespace"],
            Some((&root().join("charts/egressguard"), values)),
        );
        assert!(
            out.status.success(),
            "helm install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Custom resources are served once their CRDs are Established.
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/egressguards.egressguard.io",
            "crd/nodeshapings.egressguard.io",
            "--timeout=60s",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm upgrade` of the release to `chart` with `values`.
    pub fn helm_upgrade(&self, chart: &Path, values: &serde_json::Value) -> Output {
        self.helm(&["upgrade", RELEASE], Some((chart, values)))
    }

    /// `helm rollback` of the release to `revision`.
    pub fn helm_rollback(&self, revision: u32) -> Output {
        self.helm(&["rollback", RELEASE, &revision.to_string()], None)
    }

    /// `helm uninstall` of the release, waiting until its objects are gone.
    pub fn helm_uninstall(&self) -> Output {
        self.helm(&["uninstall", RELEASE, "--wait"], None)
    }

    /// The Helm CLI against this control plane, in the release's namespace;
    /// with a chart, its values go in a file in the control plane's directory.
    pub fn helm(&self, args: &[&str], chart: Option<(&Path, &serde_json::Value)>) -> Output {
        let mut cmd = self.command(crate::tools::helm());
        cmd.args(args);
        if let Some((chart, values)) = chart {
            let file = self.dir.join(format!("values-{}.json", unique()));
            std::fs::write(&file, values.to_string()).expect("write helm values");
            cmd.arg(chart).arg("-f").arg(file);
        }
        cmd.args(["--namespace", NAMESPACE, "--timeout", "120s"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output()
            .expect("run helm")
    }

    /// A token for a ServiceAccount of the chart, from the TokenRequest API;
    /// with `node`, bound to that Node object, so the API server names the
    /// node in the caller's identity as it does for a DaemonSet pod's token.
    pub fn token(&self, service_account: &str, node: Option<&str>) -> String {
        let mut args = vec![
            "create",
            "token",
            service_account,
            "-n",
            NAMESPACE,
            "--duration=2h",
        ];
        if let Some(n) = node {
            args.extend(["--bound-object-kind", "Node", "--bound-object-name", n]);
        }
        self.kubectl_ok(&args).trim().to_string()
    }

    /// Writes a kubeconfig authenticating as `service_account` against `server`
    /// (`https://IP:PORT` as seen from where the component runs).
    pub fn service_account_kubeconfig(&self, service_account: &str, server: &str) -> PathBuf {
        self.kubeconfig_with_token(&self.token(service_account, None), server)
    }

    /// The agent's kubeconfig: the chart's node-shaper ServiceAccount with a
    /// token bound to `node` (which must exist as a Node).
    pub fn agent_kubeconfig(&self, node: &str, server: &str) -> PathBuf {
        let sa = format!("{RELEASE}-node-shaper");
        self.kubeconfig_with_token(&self.token(&sa, Some(node)), server)
    }

    /// A kubeconfig holding `node`'s own kubelet credential: a client
    /// certificate for `system:node:NODE` in `system:nodes`, signed by the
    /// cluster's CA (the Node authorizer and NodeRestriction apply to it).
    /// The certificate and key sit next to it (`.crt`, `.key`), for requests
    /// kubectl cannot make the way a kubelet does (a status PATCH without a GET).
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        let pki = self.dir.join("pki");
        let id = unique();
        let path = self.dir.join(format!("kc-node-{id}"));
        let key = path.with_extension("key");
        let csr = path.with_extension("csr");
        let crt = path.with_extension("crt");
        let run = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let p = |x: &Path| x.display().to_string();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/O=system:nodes/CN=system:node:{node}"),
            "-keyout",
            &p(&key),
            "-out",
            &p(&csr),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&pki.join("ca.crt")),
            "-CAkey",
            &p(&pki.join("ca.key")),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &p(&crt),
        ]);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{client-certificate: \"{}\", client-key: \"{}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            self.server,
            pki.join("ca.crt").display(),
            crt.display(),
            key.display()
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// A request with `node`'s kubelet credential: `method` on `path` with a
    /// JSON merge patch `body`, no GET first. Returns the HTTP status.
    pub fn as_kubelet(&self, kubeconfig: &Path, method: &str, path: &str, body: &str) -> u16 {
        let o = self
            .command("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .arg("--cacert")
            .arg(self.dir.join("pki/ca.crt"))
            .arg("--cert")
            .arg(kubeconfig.with_extension("crt"))
            .arg("--key")
            .arg(kubeconfig.with_extension("key"))
            // A JSON merge patch replaces lists whole (a strategic one merges
            // node addresses by type, folding two InternalIPs into one).
            .args(["-H", "Content-Type: application/merge-patch+json"])
            .args(["--data", body])
            .arg(format!("{}{path}", self.server))
            .output()
            .expect("curl");
        let code = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if code == 0 {
            eprintln!("curl as kubelet: {}", String::from_utf8_lossy(&o.stderr));
        }
        code
    }

    fn kubeconfig_with_token(&self, token: &str, server: &str) -> PathBuf {
        let path = self.dir.join(format!("kc-{}", unique()));
        let ca = self.dir.join("pki/ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: {NAMESPACE}}}\ncurrent-context: c\n",
            ca.display()
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// Registers a Node as a kubelet would (object and status addresses).
    pub fn add_node(&self, name: &str, labels: &str, internal_ip: Option<&str>) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"
        ));
        if let Some(ip) = internal_ip {
            let status = format!(
                "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{ip}\"}}]}}}}"
            );
            self.kubectl_ok(&[
                "patch",
                "node",
                name,
                "--subresource",
                "status",
                "--type",
                "merge",
                "-p",
                &status,
            ]);
        }
    }

    /// The pid of a component this control plane started (`etcd`,
    /// `kube-apiserver`, `kube-controller-manager`).
    pub fn pid(&self, component: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pids"))
            .ok()?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, name)| *name == component)
            .filter_map(|(pid, _)| pid.parse().ok())
            .next_back()
    }

    /// Kills kube-apiserver (SIGKILL: watches end, requests fail), waits
    /// `down`, starts it again with the same arguments, and waits for /readyz.
    pub fn restart_apiserver(&self, down: Duration) {
        let pid = self.pid("kube-apiserver").expect("apiserver pid");
        let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .expect("apiserver cmdline")
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        signal(pid, "KILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(down);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("kube-apiserver.log"))
            .expect("apiserver log");
        // setsid: the new server must not die with this test's process group.
        let child = self
            .command("setsid")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restart kube-apiserver");
        // nsenter execs, and setsid execs when it need not fork, so the
        // child's pid is the server's.
        let mut pids = std::fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
        pids.push_str(&format!("{} kube-apiserver\n", child.id()));
        std::fs::write(self.dir.join("pids"), pids).expect("pids");
        std::mem::forget(child);
        self.wait_ready(Duration::from_secs(60));
    }

    /// Compacts etcd's history up to its current revision (what the API
    /// server's periodic compaction does), through etcd's JSON gateway.
    pub fn compact_etcd(&self) {
        let endpoints = std::fs::read_to_string(self.dir.join("endpoints")).expect("endpoints");
        let etcd = endpoints
            .lines()
            .find_map(|l| l.strip_prefix("etcd="))
            .expect("etcd endpoint")
            .to_string();
        let post = |path: &str, body: &str| -> serde_json::Value {
            let o = self
                .command("curl")
                .args(["-sSf", "-X", "POST", &format!("{etcd}{path}"), "-d", body])
                .output()
                .expect("curl");
            assert!(
                o.status.success(),
                "etcd {path}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            serde_json::from_slice(&o.stdout).expect("etcd json")
        };
        let rev = post("/v3/kv/range", "{\"key\":\"AA==\"}")["header"]["revision"]
            .as_str()
            .expect("revision")
            .to_string();
        post(
            "/v3/kv/compaction",
            &format!("{{\"revision\":\"{rev}\",\"physical\":true}}"),
        );
    }

    /// Waits until /readyz answers ok.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let o = self.kubectl(&["get", "--raw", "/readyz"]);
            if o.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("kube-apiserver not ready after {within:?}");
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`) to a component.
    pub fn signal(&self, component: &str, sig: &str) {
        signal(self.pid(component).expect("pid"), sig);
    }

    /// Resident set size of a component, in MiB.
    pub fn rss_mib(&self, component: &str) -> f64 {
        self.pid(component).map_or(0.0, rss_mib)
    }
}

/// A directory removed on drop (declare it after whatever lives in it).
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends a signal by name to a pid.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// VmRSS of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS")
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `VmHWM`: the peak), in
/// MiB; 0 when the process is gone.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A name part unique in this machine's run: pid plus a counter.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Polls `f` until it holds, or panics after `secs` naming `what` and `context()`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {secs}s waiting for: {what}\n{}", context());
}

/// A condition's (status, reason) on an object, empty strings when absent.
pub fn condition(v: &serde_json::Value, t: &str) -> (String, String) {
    let c = v["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
    )
}

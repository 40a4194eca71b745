//! `egressguard-operator`: the EgressGuard controller.
//!
//! `run` is the controller ([`egressguard_operator::run`]); `validate` (the
//! same validation node-shaper and the controller run) and `crd` (the
//! generated CRDs) are the offline pieces GitOps pipelines need.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use egressguard_crds::{load::load_file, validate};

#[derive(Parser)]
#[command(
    name = "egressguard-operator",
    version,
    about = "EgressGuard controller"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Validate EgressGuard manifests offline (a file, or every *.yaml/*.yml under a directory).
    Validate {
        /// File or directory.
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
    },
    /// Print the CustomResourceDefinitions (EgressGuard, NodeShaping, Quarantine) as YAML.
    Crd,
    /// Run the controller (in-cluster config or KUBECONFIG).
    Run {
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "egressguard-system")]
        namespace: String,
        /// This replica's identity (default: the host name plus a random suffix,
        /// unique even where every container's pid is 1).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9465")]
        metrics_addr: std::net::SocketAddr,
        /// Address for /healthz and /readyz alone (the kubelet's probes), with
        /// connection slots of their own.
        #[arg(long, default_value = "0.0.0.0:9467")]
        probe_addr: std::net::SocketAddr,
        /// Seconds a deleted guard waits for its nodes to confirm removal (1..=86400).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        cleanup_timeout_seconds: u64,
        /// Log JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Ranges a Node's self-reported InternalIPs must fall in to be protected
        /// on other nodes (comma separated CIDRs).
        #[arg(
            long,
            env = "EGRESSGUARD_NODE_ADDRESS_RANGES",
            value_delimiter = ',',
            default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
        )]
        node_address_ranges: Vec<ipnet::IpNet>,
        /// At most this many protected addresses per node (1..=16).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=16))]
        max_addresses_per_node: u64,
        /// Prometheus base URL for `prometheus` triggers, e.g. http://prometheus:9090
        /// (its address is protected on every node when it is an IP).
        #[arg(long, env = "EGRESSGUARD_PROMETHEUS_URL")]
        prometheus_url: Option<String>,
        /// File holding a bearer token for Prometheus.
        #[arg(long, env = "EGRESSGUARD_PROMETHEUS_TOKEN_FILE")]
        prometheus_token_file: Option<PathBuf>,
        /// CA bundle (PEM) for an https Prometheus.
        #[arg(long, env = "EGRESSGUARD_PROMETHEUS_CA_FILE")]
        prometheus_ca_file: Option<PathBuf>,
        /// How often Prometheus triggers are evaluated (at least 1s).
        #[arg(long, env = "EGRESSGUARD_EVALUATION_INTERVAL", default_value = "30s", value_parser = duration_arg)]
        evaluation_interval: std::time::Duration,
        /// Address of the Alertmanager receiver (path /alertmanager).
        #[arg(long, env = "EGRESSGUARD_WEBHOOK_ADDR", default_value = "0.0.0.0:9466")]
        webhook_addr: std::net::SocketAddr,
        /// File holding the receiver's bearer token; without it the receiver is off.
        #[arg(long, env = "EGRESSGUARD_WEBHOOK_TOKEN_FILE")]
        webhook_token_file: Option<PathBuf>,
        /// How long Released and Refused Quarantine records are kept.
        #[arg(long, default_value = "720h", value_parser = duration_arg)]
        quarantine_retention: std::time::Duration,
    },
}

fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    let d = egressguard_crds::quarantine::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than 1s"));
    }
    Ok(d)
}

fn read_token(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let t = std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let t = t.trim();
    if t.len() < 16 {
        return Err(format!(
            "{flag} {}: the token is {} bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32`)",
            path.display(),
            t.len()
        ));
    }
    Ok(t.as_bytes().to_vec())
}

fn manifests(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Validates every guard found; prints each problem; returns the number of invalid guards.
fn validate_path(path: &Path) -> Result<usize, String> {
    let files = manifests(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bad = 0;
    let mut seen = 0;
    for f in &files {
        let guards = match load_file(f) {
            Ok(g) => g,
            // In a directory, files without guards are other manifests.
            Err(egressguard_crds::load::LoadError::Empty { .. }) if path.is_dir() => continue,
            Err(e) => {
                eprintln!("{e}");
                bad += 1;
                continue;
            }
        };
        for g in guards {
            seen += 1;
            let name = g.metadata.name.clone().unwrap_or_default();
            match validate(&g.spec) {
                Ok(v) => {
                    println!("{}: EgressGuard {name}: valid", f.display());
                    for w in egressguard_crds::validate::whitelist_warnings(&v) {
                        eprintln!("{}: EgressGuard {name}: warning: {w}", f.display());
                    }
                }
                Err(errs) => {
                    bad += 1;
                    for e in errs.0 {
                        eprintln!("{}: EgressGuard {name}: {e}", f.display());
                    }
                }
            }
        }
    }
    if seen == 0 && bad == 0 {
        return Err(format!("{}: no EgressGuard found", path.display()));
    }
    Ok(bad)
}

/// Every CRD as one multi-document YAML stream.
fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let docs = egressguard_crds::definitions()
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Validate { path } => match validate_path(&path) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(n) => {
                eprintln!("{n} invalid EgressGuard manifest(s)");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run {
            namespace,
            identity,
            metrics_addr,
            probe_addr,
            cleanup_timeout_seconds,
            log_json,
            node_address_ranges,
            max_addresses_per_node,
            prometheus_url,
            prometheus_token_file,
            prometheus_ca_file,
            evaluation_interval,
            webhook_addr,
            webhook_token_file,
            quarantine_retention,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into());
            let b = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            if log_json {
                b.json().init();
            } else {
                b.with_ansi(false).init();
            }
            let identity = identity.unwrap_or_else(egressguard_operator::leader::default_identity);
            let prometheus = match prometheus_url
                .as_deref()
                .map(|u| {
                    egressguard_operator::prom::Prometheus::new(
                        u,
                        prometheus_token_file.as_deref(),
                        prometheus_ca_file.as_deref(),
                        // A query may take a third of an evaluation, at most 5 s
                        // (a pass must finish well within the lease).
                        (evaluation_interval / 3).clamp(
                            std::time::Duration::from_secs(1),
                            std::time::Duration::from_secs(5),
                        ),
                    )
                })
                .transpose()
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let webhook_token = match webhook_token_file
                .as_deref()
                .map(|p| read_token("--webhook-token-file", p).map(|t| (p.to_path_buf(), t)))
                .transpose()
            {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let cfg = egressguard_operator::run::OperatorConfig {
                namespace,
                identity,
                metrics_addr,
                probe_addr,
                cleanup_timeout: std::time::Duration::from_secs(cleanup_timeout_seconds),
                resync: std::time::Duration::from_secs(30),
                node_addresses: egressguard_operator::decide::NodeAddressPolicy {
                    ranges: node_address_ranges,
                    max_per_node: max_addresses_per_node as usize,
                },
                quarantine: egressguard_operator::remediate::QuarantineConfig {
                    prometheus,
                    evaluation_interval,
                    webhook_addr: Some(webhook_addr),
                    webhook_token,
                    retention: quarantine_retention,
                },
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(egressguard_operator::run::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Crd => match crds_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

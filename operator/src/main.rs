//! `egressguard-operator`: the EgressGuard controller.
//!
//! `run` is the controller ([`egressguard_operator::run`]); `validate` (the
//! same validation node-shaper and the controller run) and `crd` (the
//! generated CRDs) are the offline pieces GitOps pipelines need.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use egressguard_crds::duration::DurationError;
use egressguard_crds::{load::load_file, validate};
use egressguard_operator::prom::{Prometheus, QueryError};
use egressguard_operator::run::{OperatorConfig, OperatorError};

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
    Run(RunArgs),
}

/// The flags of `run`.
#[derive(Args)]
struct RunArgs {
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
    evaluation_interval: Duration,
    /// Address of the Alertmanager receiver (path /alertmanager).
    #[arg(long, env = "EGRESSGUARD_WEBHOOK_ADDR", default_value = "0.0.0.0:9466")]
    webhook_addr: std::net::SocketAddr,
    /// File holding the receiver's bearer token; without it the receiver is off.
    #[arg(long, env = "EGRESSGUARD_WEBHOOK_TOKEN_FILE")]
    webhook_token_file: Option<PathBuf>,
    /// How long Released and Refused Quarantine records are kept.
    #[arg(long, default_value = "720h", value_parser = duration_arg)]
    quarantine_retention: Duration,
}

/// A duration flag's value that is refused (clap prints it after the flag).
#[derive(Debug, thiserror::Error)]
enum DurationArgError {
    /// Not a duration, or longer than a year.
    #[error(transparent)]
    Unparsed(#[from] DurationError),
    /// Shorter than a second.
    #[error("{0:?} is shorter than 1s")]
    TooShort(String),
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// The file cannot be read.
    #[error("{flag} {}: {source}", .path.display())]
    Unreadable {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The token is too short to be a secret.
    #[error("{flag} {}: the token is {len} bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32`)", .path.display())]
    TooShort {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The token's length after trimming.
        len: usize,
    },
}

/// Why `validate` could not look at every guard.
#[derive(Debug, thiserror::Error)]
enum ValidateError {
    /// The directory cannot be walked.
    #[error("cannot read {}: {source}", .path.display())]
    Unreadable {
        /// The file or directory given.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// Nothing in it is an EgressGuard.
    #[error("{}: no EgressGuard found", .0.display())]
    NoGuard(PathBuf),
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// The Prometheus flags are wrong.
    #[error(transparent)]
    Prometheus(#[from] QueryError),
    /// The webhook token file cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// No async runtime could be built.
    #[error(transparent)]
    Runtime(std::io::Error),
    /// The controller failed.
    #[error(transparent)]
    Operator(#[from] OperatorError),
}

impl RunError {
    /// 2 for flags that are wrong (invalid input), 1 for a runtime failure.
    fn exit_code(&self) -> ExitCode {
        match self {
            RunError::Prometheus(_) | RunError::Token(_) => ExitCode::from(2),
            RunError::Runtime(_) | RunError::Operator(_) => ExitCode::from(1),
        }
    }
}

/// A duration flag's value: a duration of at least a second.
fn duration_arg(s: &str) -> Result<Duration, DurationArgError> {
    let d = egressguard_crds::quarantine::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(DurationArgError::TooShort(s.to_string()));
    }
    Ok(d)
}

/// The token in the file `path` (given as `flag`), trimmed: at least 16 bytes.
fn read_token(flag: &'static str, path: &Path) -> Result<Vec<u8>, TokenError> {
    let t = std::fs::read_to_string(path).map_err(|source| TokenError::Unreadable {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let t = t.trim();
    if t.len() < 16 {
        return Err(TokenError::TooShort {
            flag,
            path: path.to_path_buf(),
            len: t.len(),
        });
    }
    Ok(t.as_bytes().to_vec())
}

/// `path` itself, or every `*.yaml`/`*.yml` under the directory `path`, sorted.
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
fn validate_path(path: &Path) -> Result<usize, ValidateError> {
    let files = manifests(path).map_err(|source| ValidateError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
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
            if !validate_guard(f, &g) {
                bad += 1;
            }
        }
    }
    if seen == 0 && bad == 0 {
        return Err(ValidateError::NoGuard(path.to_path_buf()));
    }
    Ok(bad)
}

/// Validates one guard of file `f`, printing the verdict, its warnings or
/// every problem; is it valid?
fn validate_guard(f: &Path, g: &egressguard_crds::EgressGuard) -> bool {
    let name = g.metadata.name.clone().unwrap_or_default();
    match validate(&g.spec) {
        Ok(v) => {
            println!("{}: EgressGuard {name}: valid", f.display());
            for w in egressguard_crds::validate::whitelist_warnings(&v) {
                eprintln!("{}: EgressGuard {name}: warning: {w}", f.display());
            }
            true
        }
        Err(errs) => {
            for e in errs.0 {
                eprintln!("{}: EgressGuard {name}: {e}", f.display());
            }
            false
        }
    }
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
        Cmd::Validate { path } => validate_cmd(&path),
        Cmd::Crd => crd_cmd(),
        Cmd::Run(args) => match run_cmd(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
    }
}

/// `validate`: 0 when every guard is valid, 2 otherwise.
fn validate_cmd(path: &Path) -> ExitCode {
    match validate_path(path) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("{n} invalid EgressGuard manifest(s)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `crd`: the CRDs on stdout.
fn crd_cmd() -> ExitCode {
    match crds_yaml() {
        Ok(y) => {
            print!("{y}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `run`: logging, the configuration from the flags, then the controller on
/// a two-thread runtime until it stops.
fn run_cmd(args: RunArgs) -> Result<(), RunError> {
    init_tracing(args.log_json);
    let cfg = config(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    Ok(rt.block_on(egressguard_operator::run::run(cfg))?)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines
/// or plain text.
fn init_tracing(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.with_ansi(false).init();
    }
}

/// The controller's configuration from `run`'s flags; the files they name
/// are read here, so a wrong flag stops the start.
fn config(args: RunArgs) -> Result<OperatorConfig, RunError> {
    let prometheus = prometheus(&args)?;
    let webhook_token = args
        .webhook_token_file
        .as_deref()
        .map(|p| read_token("--webhook-token-file", p).map(|t| (p.to_path_buf(), t)))
        .transpose()?;
    Ok(OperatorConfig {
        namespace: args.namespace,
        identity: args
            .identity
            .unwrap_or_else(egressguard_operator::leader::default_identity),
        metrics_addr: args.metrics_addr,
        probe_addr: args.probe_addr,
        cleanup_timeout: Duration::from_secs(args.cleanup_timeout_seconds),
        resync: Duration::from_secs(30),
        node_addresses: egressguard_operator::decide::NodeAddressPolicy {
            ranges: args.node_address_ranges,
            max_per_node: args.max_addresses_per_node as usize,
        },
        quarantine: egressguard_operator::remediate::QuarantineConfig {
            prometheus,
            evaluation_interval: args.evaluation_interval,
            webhook_addr: Some(args.webhook_addr),
            webhook_token,
            retention: args.quarantine_retention,
        },
    })
}

/// The Prometheus client, when `--prometheus-url` is set. A query may take
/// a third of an evaluation, at most 5 s (a pass must finish well within
/// the lease).
fn prometheus(args: &RunArgs) -> Result<Option<Prometheus>, QueryError> {
    let timeout =
        (args.evaluation_interval / 3).clamp(Duration::from_secs(1), Duration::from_secs(5));
    args.prometheus_url
        .as_deref()
        .map(|u| {
            Prometheus::new(
                u,
                args.prometheus_token_file.as_deref(),
                args.prometheus_ca_file.as_deref(),
                timeout,
            )
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A fresh directory under the system's temporary one, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "egressguard-operator-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_flags_are_consistent_and_durations_are_checked() {
        Cli::command().debug_assert();
        let run = |flags: &[&str]| {
            Cli::try_parse_from([&["egressguard-operator", "run"], flags].concat())
        };
        let Ok(Cli {
            cmd: Cmd::Run(args),
        }) = run(&["--evaluation-interval", "2m"])
        else {
            panic!("run parses");
        };
        assert_eq!(args.evaluation_interval, Duration::from_secs(120));
        assert_eq!(args.quarantine_retention, Duration::from_secs(720 * 3600));
        let refused = |flags: &[&str]| match run(flags) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{flags:?} parsed"),
        };
        assert!(refused(&["--evaluation-interval", "500ms"])
            .contains("invalid value '500ms' for '--evaluation-interval <EVALUATION_INTERVAL>': \"500ms\" is shorter than 1s"));
        assert!(refused(&["--quarantine-retention", "10x"]).contains(
            "\"10x\" is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m"
        ));
    }

    #[test]
    fn duration_arg_says_why() {
        assert_eq!(duration_arg("1s").expect("ok"), Duration::from_secs(1));
        let e = duration_arg("999ms").expect_err("short");
        assert!(matches!(e, DurationArgError::TooShort(_)));
        assert_eq!(e.to_string(), "\"999ms\" is shorter than 1s");
        let e = duration_arg("9000h").expect_err("long");
        assert!(matches!(e, DurationArgError::Unparsed(_)));
        assert_eq!(e.to_string(), "\"9000h\" is longer than a year");
    }

    #[test]
    fn a_token_file_must_hold_a_secret() {
        let dir = TempDir::new("token");
        let short = dir.0.join("short");
        std::fs::write(&short, "short\n").expect("write");
        let e = read_token("--webhook-token-file", &short).expect_err("short");
        assert_eq!(
            e.to_string(),
            format!("--webhook-token-file {}: the token is 5 bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32`)", short.display())
        );
        let missing = dir.0.join("missing");
        let e = read_token("--webhook-token-file", &missing).expect_err("missing");
        assert!(matches!(e, TokenError::Unreadable { .. }));
        assert!(e
            .to_string()
            .starts_with(&format!("--webhook-token-file {}: ", missing.display())));
        let good = dir.0.join("good");
        std::fs::write(&good, " 0123456789abcdef\n").expect("write");
        assert_eq!(
            read_token("--webhook-token-file", &good).expect("good"),
            b"0123456789abcdef"
        );
        // A bad token is invalid input; a failing controller is a runtime failure.
        let code = |e: RunError| format!("{:?}", e.exit_code());
        assert_eq!(
            code(RunError::Token(
                read_token("--webhook-token-file", &short).expect_err("short")
            )),
            format!("{:?}", ExitCode::from(2))
        );
        assert_eq!(
            code(RunError::Runtime(std::io::Error::other("no threads"))),
            format!("{:?}", ExitCode::from(1))
        );
    }

    #[test]
    fn validate_counts_invalid_guards_and_refuses_a_directory_without_any() {
        let dir = TempDir::new("validate");
        let e = validate_path(&dir.0).expect_err("empty");
        assert_eq!(
            e.to_string(),
            format!("{}: no EgressGuard found", dir.0.display())
        );
        let guard = |name: &str, rate: &str| {
            format!("apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: {name}}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{rate: {rate}, destinations: [{{port: 443}}]}}\n")
        };
        std::fs::write(dir.0.join("good.yaml"), guard("good", "1Mbit")).expect("write");
        std::fs::write(
            dir.0.join("other.yml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )
        .expect("write");
        assert_eq!(validate_path(&dir.0).expect("valid"), 0);
        std::fs::create_dir(dir.0.join("sub")).expect("mkdir");
        std::fs::write(dir.0.join("sub/bad.yaml"), guard("bad", "1mbps")).expect("write");
        assert_eq!(validate_path(&dir.0).expect("one invalid"), 1);
    }
}

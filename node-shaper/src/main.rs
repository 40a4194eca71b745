//! `node-shaper`: the EgressGuard node agent and standalone CLI.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid input.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use egressguard_crds::load::load_manifests;
use node_shaper::engine::{self, EngineError};
use node_shaper::iface;
use node_shaper::netlink::{observe, Netlink};
use node_shaper::plan::{plan_protected, LeafChoice};
use node_shaper::sim::L4;
use node_shaper::target::Target;
use node_shaper::{diff, explain, render, show};

#[derive(Parser)]
#[command(
    name = "node-shaper",
    version,
    about = "Enforce EgressGuard egress shaping on this host (HTB + SFQ + u32 over netlink)"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    #[value(name = "TCP", alias = "tcp")]
    Tcp,
    #[value(name = "UDP", alias = "udp")]
    Udp,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enforce a guard's shaping on this host (spec.mode is ignored: mode is the operator's concern).
    Apply {
        /// EgressGuard YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Shape this interface instead of spec.interfaces / the default-route interfaces.
        #[arg(long)]
        interface: Option<String>,
        /// Replace a root qdisc node-shaper did not install.
        #[arg(long)]
        force: bool,
        /// Read the whole tree back afterwards and fail unless it matches the plan.
        #[arg(long)]
        verify: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Change nothing; print the equivalent tc commands for review.
    Plan {
        /// EgressGuard YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Interface name to print in the commands.
        #[arg(long)]
        interface: Option<String>,
    },
    /// What is enforced, with per-class counters labelled by role.
    Show {
        /// Interface (default: the default-route interfaces).
        #[arg(long)]
        interface: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Which class a destination lands in, and why.
    Explain {
        /// Interface.
        #[arg(long)]
        interface: String,
        /// Destination address.
        dest: String,
        /// Destination port.
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// Transport protocol.
        #[arg(long, value_enum, default_value = "TCP")]
        protocol: Proto,
        /// The guard, to name spec fields (default: the one last applied to the interface).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Run as the DaemonSet agent: enforce this node's NodeShaping from the API server.
    Run {
        /// This node's name (set NODE_NAME from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Address for /metrics, /healthz and /readyz (`HOST:PORT`; an IPv6
        /// host with or without brackets, as `$(HOST_IP):9464` gives it).
        #[arg(long, default_value = "0.0.0.0:9464", value_parser = listen_addr)]
        metrics_addr: std::net::SocketAddr,
        /// Address for /healthz and /readyz alone, with connection slots of
        /// their own: the kubelet's probes (loopback on the host network).
        #[arg(long, default_value = "127.0.0.1:9465", value_parser = listen_addr)]
        probe_addr: std::net::SocketAddr,
        /// Reconcile at least this often (seconds, 1..=86400), repairing drift.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        resync_seconds: u64,
        /// `namespace/name` of this agent's DaemonSet: on SIGTERM, shaping is
        /// removed if it is gone (the chart was uninstalled), kept otherwise.
        #[arg(long, env = "EGRESSGUARD_DAEMONSET")]
        daemonset: Option<String>,
        /// Renew this node's heartbeat Lease (in the client's namespace) this
        /// often, in seconds; the operator reports a quarantine whose agent
        /// stops renewing it. 0 turns the heartbeat off.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3_600))]
        heartbeat_seconds: u64,
    },
    /// (For the benchmark.) Runs the agent's kernel pass for each file in
    /// turn, as plan changes, in one process, and prints per pass (JSON
    /// lines) its time, writes, whether it trusted the tree it last wrote,
    /// and its peak resident memory (VmHWM, reset before each pass).
    #[command(hide = true)]
    AgentPasses {
        /// Interface to shape.
        #[arg(long)]
        interface: String,
        /// Guard files, one pass each.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Then one more pass over the last file, as the periodic resync
        /// (which reads the whole tree back).
        #[arg(long)]
        resync: bool,
    },
    /// Remove node-shaper's shaping and restore the device default qdisc.
    Reset {
        /// Interface (default: the default-route interfaces).
        #[arg(long)]
        interface: Option<String>,
        /// Also remove a root qdisc node-shaper did not install.
        #[arg(long)]
        force: bool,
    },
}

/// Prints to stdout; a closed pipe (`| head`) ends output quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Failures sorted by exit code.
enum Failure {
    Input(anyhow::Error),
    Runtime(anyhow::Error),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BucketFull { .. } => Failure::Input(e.into()),
            _ => Failure::Runtime(e.into()),
        }
    }
}

fn input<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::Input(e.into())
}

fn runtime<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::Runtime(e.into())
}

/// Says which whitelist entries change nothing (repeated, or inside another).
fn warn_whitelist(target: &Target) {
    const SHOWN: usize = 20;
    let w = egressguard_crds::validate::whitelist_warnings(&target.valid);
    for line in w.iter().take(SHOWN) {
        eprintln!("warning: {line}");
    }
    if w.len() > SHOWN {
        eprintln!(
            "warning: ... and {} more entries that change nothing",
            w.len() - SHOWN
        );
    }
}

/// Loads the one EgressGuard or NodeShaping in `file`, with the CIDRGroups
/// the same file holds, and validates it.
fn load_one(file: &Path) -> Result<Target, Failure> {
    let found = load_manifests(file).map_err(input)?;
    let (groups, plans): (Vec<_>, Vec<_>) = found
        .iter()
        .partition(|m| matches!(m, egressguard_crds::load::Manifest::Group(_)));
    let groups: Vec<&egressguard_crds::CIDRGroup> = groups
        .into_iter()
        .filter_map(|m| match m {
            egressguard_crds::load::Manifest::Group(g) => Some(g),
            _ => None,
        })
        .collect();
    match plans.as_slice() {
        [one] => Target::from_manifest(one, &groups)
            .map_err(|e| input(anyhow::anyhow!("{}: {e}", file.display()))),
        [] => Err(input(anyhow::anyhow!(
            "{}: holds no EgressGuard or NodeShaping, only {} CIDRGroup(s); add the guard that references them",
            file.display(),
            groups.len()
        ))),
        many => Err(input(anyhow::anyhow!(
            "{}: holds {} EgressGuard/NodeShaping documents; node-shaper applies one at a time (CIDRGroups may join it)",
            file.display(),
            many.len()
        ))),
    }
}

fn netlink() -> Result<Netlink, Failure> {
    Netlink::open()
        .context("cannot open an rtnetlink socket (node-shaper needs CAP_NET_ADMIN)")
        .map_err(runtime)
}

/// Runs the subcommand.
fn run(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Apply {
            file,
            interface,
            force,
            verify,
            output,
        } => apply_file(&file, interface.as_deref(), force, verify, output),
        Cmd::Plan { file, interface } => print_plan(&file, interface),
        Cmd::Show { interface, output } => show_interfaces(interface.as_deref(), output),
        Cmd::Explain {
            interface,
            dest,
            port,
            protocol,
            file,
            output,
        } => explain_destination(&interface, &dest, port, protocol, file, output),
        Cmd::Run {
            node_name,
            metrics_addr,
            probe_addr,
            resync_seconds,
            daemonset,
            heartbeat_seconds,
        } => {
            let cfg = node_shaper::agent::AgentConfig {
                node: node_name,
                metrics_addr,
                probe_addr,
                resync: std::time::Duration::from_secs(resync_seconds.max(1)),
                daemonset: daemonset.and_then(|d| {
                    d.split_once('/')
                        .map(|(ns, n)| (ns.to_string(), n.to_string()))
                }),
                heartbeat: (heartbeat_seconds > 0)
                    .then(|| std::time::Duration::from_secs(heartbeat_seconds)),
            };
            run_agent(cfg)
        }
        Cmd::AgentPasses {
            interface,
            files,
            resync,
        } => agent_passes(&interface, &files, resync),
        Cmd::Reset { interface, force } => reset_interfaces(interface.as_deref(), force),
    }
}

/// `node-shaper apply`: enforces the guard in `file` on each interface and
/// remembers it there for `show` and `explain`.
fn apply_file(
    file: &Path,
    interface: Option<&str>,
    force: bool,
    verify: bool,
    output: Output,
) -> Result<(), Failure> {
    let target = load_one(file)?;
    warn_whitelist(&target);
    let ifaces = iface::resolve(interface, target.valid.interfaces.as_deref()).map_err(input)?;
    let mut nl = netlink()?;
    let mut reports = Vec::new();
    for i in &ifaces {
        let opts = engine::ApplyOptions {
            force,
            verify,
            describe: true,
            remember: false,
        };
        let r = engine::apply(&mut nl, i, &target, opts)?;
        node_shaper::state::remember(i, &target);
        reports.push(r);
    }
    match output {
        Output::Json => json_out(&reports)?,
        Output::Text => reports.iter().for_each(print_applied),
    }
    Ok(())
}

/// One interface's apply, for people: the changes (the first 40), the
/// leaves and filters, and whatever is degraded.
fn print_applied(r: &engine::ApplyReport) {
    if r.writes == 0 {
        out!("{}: already enforced, no changes", r.interface);
    } else {
        out!(
            "{}: {} netlink writes in {:.1} ms",
            r.interface,
            r.writes,
            r.millis
        );
        const SHOWN: usize = 40;
        for c in r.changes.iter().take(SHOWN) {
            out!("  {c}");
        }
        let more = r.changes.len().saturating_sub(SHOWN) + r.changes_omitted;
        if more > 0 {
            out!("  ... and {more} more");
        }
    }
    out!(
        "  leaf qdisc: {}; {} u32 filters",
        r.leaves.kind(),
        r.filters
    );
    if let Some(f) = r.leaves.fallback() {
        out!("  DEGRADED: {f}");
    }
    if let Some(b) = &r.rebuilt {
        out!("  REBUILT: {b}");
    }
    for w in &r.warnings {
        out!("  kernel warning: {w}");
    }
}

/// `node-shaper plan`: the tc commands that build the guard in `file`
/// from nothing, per interface; changes nothing.
fn print_plan(file: &Path, interface: Option<String>) -> Result<(), Failure> {
    let target = load_one(file)?;
    warn_whitelist(&target);
    let spec = &target.valid;
    let devs: Vec<String> = match (interface, &spec.interfaces) {
        (Some(i), _) => vec![i],
        (None, Some(s)) => s.clone(),
        (None, None) => {
            let d = iface::default_route_interfaces();
            if d.is_empty() {
                vec!["DEV".into()]
            } else {
                d
            }
        }
    };
    let desired = plan_protected(spec, &target.protected, LeafChoice::Sfq);
    if !spec.throttle_portless {
        out!("# warning: spec.throttle.portless is Pass: later IPv4 fragments and IPv6 packets with extension headers ride the default class, so large datagrams to a throttled port evade the throttle");
    }
    for dev in devs {
        out!(
            "# node-shaper plan for {dev}: {} u32 filters",
            desired.filter_count()
        );
        for op in diff::diff(&Default::default(), &desired) {
            out!("{}", render::tc_command(&op, &dev));
        }
    }
    Ok(())
}

/// `node-shaper show`: what each interface holds, with the guard last
/// applied there.
fn show_interfaces(interface: Option<&str>, output: Output) -> Result<(), Failure> {
    let ifaces = iface::resolve(interface, None).map_err(input)?;
    let mut nl = netlink()?;
    let mut reports = Vec::new();
    for i in &ifaces {
        let obs = observe(&mut nl, i.index).map_err(runtime)?;
        let applied = load_one(&node_shaper::state::path(&i.name)).ok();
        reports.push(show::report(&i.name, &obs, applied.as_ref()));
    }
    match output {
        Output::Json => out!(
            "{}",
            serde_json::to_string_pretty(&reports).map_err(runtime)?
        ),
        Output::Text => reports
            .iter()
            .for_each(|r| out!("{}", show::render(r).trim_end())),
    }
    Ok(())
}

/// `node-shaper explain`: the class a packet to `dest`:`port` lands in on
/// `interface`, and why (spec fields from `file`, or the guard last
/// applied there).
fn explain_destination(
    interface: &str,
    dest: &str,
    port: u16,
    protocol: Proto,
    file: Option<PathBuf>,
    output: Output,
) -> Result<(), Failure> {
    let dst: IpAddr = dest
        .parse()
        .map_err(|_| input(anyhow::anyhow!("DEST: {dest:?} is not an IP address; give the destination as 203.0.113.10 or 2001:db8::1")))?;
    let i = iface::by_name(interface).map_err(input)?;
    let mut nl = netlink()?;
    let obs = observe(&mut nl, i.index).map_err(runtime)?;
    if obs.root != node_shaper::netlink::RootState::Owned {
        out!("{}", show::report(&i.name, &obs, None).state);
        return Ok(());
    }
    let path = file.unwrap_or_else(|| node_shaper::state::path(&i.name));
    let target = load_one(&path).ok();
    let l4 = match protocol {
        Proto::Tcp => L4::Tcp,
        Proto::Udp => L4::Udp,
    };
    let e = explain::explain(&obs.shape, target.as_ref(), dst, port, l4);
    match output {
        Output::Json => out!("{}", serde_json::to_string_pretty(&e).map_err(runtime)?),
        Output::Text => {
            out!("{} (class {})", e.reason, e.class);
            if let Some(f) = e.filter {
                out!("  kernel filter: {f}");
            }
        }
    }
    Ok(())
}

/// `node-shaper run`: the agent, on a single-threaded runtime.
fn run_agent(cfg: node_shaper::agent::AgentConfig) -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(runtime)?;
    rt.block_on(node_shaper::agent::run(cfg)).map_err(runtime)
}

/// `node-shaper reset`: removes node-shaper's root qdisc (and with
/// `force`, a foreign one) and the record of what was applied.
fn reset_interfaces(interface: Option<&str>, force: bool) -> Result<(), Failure> {
    let ifaces = iface::resolve(interface, None).map_err(input)?;
    let mut nl = netlink()?;
    for i in &ifaces {
        let r = engine::reset(&mut nl, i, force)?;
        match r.removed {
            Some(what) => out!(
                "{}: removed {what}; device default qdisc restored",
                r.interface
            ),
            None => out!("{}: nothing to reset (device default qdisc)", r.interface),
        }
        let _ = std::fs::remove_file(node_shaper::state::path(&i.name));
    }
    Ok(())
}

/// Writes JSON to stdout as it is serialised (a big report is never held
/// as one string); a closed pipe ends output quietly.
fn json_out<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
    match serde_json::to_writer_pretty(&mut w, v) {
        Err(e) if e.is_io() => return Ok(()),
        other => other.map_err(runtime)?,
    }
    let _ = writeln!(w);
    let _ = w.flush();
    Ok(())
}

/// A `VmHWM`/`VmRSS` line of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `node-shaper agent-passes`: the agent's passes without the API server.
/// Each file is one plan change (`Trigger::Plan`): the first pass reads the
/// tree back (nothing is remembered yet), later ones trust the tree the
/// previous pass wrote while the tc monitor reports no foreign change; with
/// `resync`, a last pass over the last file reads everything back, as the
/// periodic resync does. The previous input stays held during a pass, as the
/// agent holds it.
fn agent_passes(interface: &str, files: &[PathBuf], resync: bool) -> Result<(), Failure> {
    use node_shaper::agent::{inputs::Input, reconcile_with, record_applied, Memory, Trigger};
    let watch = node_shaper::netlink::monitor::Watch::default();
    node_shaper::netlink::monitor::spawn(watch.clone(), |_| true).map_err(runtime)?;
    let mut mem = Memory {
        watch: Some(watch),
        ..Memory::default()
    };
    let mut previous: Option<Input> = None;
    let last = files.last().map(|f| (f, Trigger::Resync));
    let passes = files
        .iter()
        .map(|f| (f, Trigger::Plan))
        .chain(last.filter(|_| resync));
    for (file, trigger) in passes {
        let mut target = load_one(file)?;
        target.valid.interfaces = Some(vec![interface.to_string()]);
        let input = Input::Shape {
            guard: Some(target.name.clone()),
            target: Box::new(target),
            enforce: true,
        };
        // Let the monitor catch up with the previous pass's notifications.
        std::thread::sleep(std::time::Duration::from_millis(200));
        node_shaper::alloc::release_free_memory();
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let rss_before = status_kib("VmRSS");
        let t = std::time::Instant::now();
        let report = reconcile_with(&input, trigger, &mut mem);
        let pass_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = std::time::Instant::now();
        record_applied(&input, &mut mem);
        let record_ms = t.elapsed().as_secs_f64() * 1000.0;
        let peak = status_kib("VmHWM");
        if let Some(e) = report
            .interfaces
            .iter()
            .find_map(|i| i.error.clone())
            .or(report.outcome.error().map(String::from))
        {
            return Err(runtime(anyhow::anyhow!("{}: {e}", file.display())));
        }
        out!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(),
                "trigger": format!("{trigger:?}"),
                "incremental": !report.incremental.is_empty(),
                "wrote": report.wrote,
                "filters": report.interfaces.first().map_or(0, |i| i.filters),
                "engineMs": report.engine_ms,
                "passMs": pass_ms,
                "recordMs": record_ms,
                "rssBeforeKib": rss_before,
                "peakKib": peak,
            })
        );
        previous = Some(input);
    }
    drop(previous);
    Ok(())
}

/// A `--metrics-addr`/`--probe-addr` that is none of the forms
/// [`listen_addr`] takes (clap prints it after the flag's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not IP:PORT")]
struct NotListenAddr(String);

/// A listen address: `IP:PORT`, `[IPv6]:PORT`, or `IPv6:PORT` unbracketed
/// (what `$(HOST_IP):PORT` expands to on an IPv6 node).
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, NotListenAddr> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.rsplit_once(':')
        .and_then(|(host, port)| Some((host.parse::<IpAddr>().ok()?, port.parse::<u16>().ok()?)))
        .map(std::net::SocketAddr::from)
        .ok_or_else(|| NotListenAddr(s.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::listen_addr;

    #[test]
    fn listen_addresses_take_host_ip_as_the_downward_api_gives_it() {
        let a = |s: &str| listen_addr(s).map(|a| a.to_string());
        assert_eq!(a("10.0.0.7:9464").as_deref(), Ok("10.0.0.7:9464"));
        assert_eq!(a("[fd00::7]:9464").as_deref(), Ok("[fd00::7]:9464"));
        assert_eq!(a("fd00::7:9464").as_deref(), Ok("[fd00::7]:9464"));
        assert_eq!(
            listen_addr("node-a:9464").map_err(|e| e.to_string()),
            Err(r#""node-a:9464" is not IP:PORT"#.to_string())
        );
        assert!(listen_addr(":9464").is_err());
        assert!(listen_addr("10.0.0.7").is_err());
    }
}

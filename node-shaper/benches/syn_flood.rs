//! The incident's attack, side by side (issue #21 item 1): a SYN flood from
//! two hping3 senders to random destinations on the throttled ports (TCP 80
//! and 443), 54-byte frames (64 on a real wire), while a whitelisted iperf3
//! business flow runs; uplink 20 Mbit, throttle 1 Mbit. Three
//! configurations, measured in interleaved rounds in one lab: no qdisc at
//! all, the seed's hand-typed tc commands, and EgressGuard (plus, for
//! reference, EgressGuard with the throttle's guarantee lowered, and the
//! same flood on unlisted ports against the seed and EgressGuard). For each: the
//! business flow's goodput, the flood on the wire (counted where it arrives,
//! in the server namespace) and everything on the wire (the server side of
//! the veth).
//!
//! A module of the `lab` bench (`cargo bench -p node-shaper --bench lab`).
//! Cargo also discovers this file as a bench target of its own; built that
//! way it holds no benchmark.

#![allow(dead_code)]

// Its own copy of the lab helpers: it must build as a crate root too, where
// there is no `super::lab` to share.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/lab/mod.rs"]
mod lab;

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::*;

const UPLINK: f64 = 20e6;
const THROTTLE: f64 = 1e6;
/// The business flow's port: not a throttled one, so the seed's filters
/// leave it in its normal class too.
const BUSINESS_PORT: u16 = 5201;
/// The flood's ports: the throttled ones.
const THROTTLED_PORTS: [u16; 2] = [80, 443];
/// The reference flood's ports: listed nowhere.
const UNLISTED_PORTS: [u16; 2] = [8080, 8443];

/// One configuration's figures, bit/s.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// iperf3 receiver goodput of the business flow.
    business: f64,
    /// The flood's Ethernet frames arriving in the server namespace.
    flood: f64,
    /// Every frame arriving in the server namespace.
    total: f64,
}

impl Sample {
    /// The business flow's frames on the wire: all but the flood (ARP and
    /// the odd ICMP error are noise).
    fn business_wire(&self) -> f64 {
        (self.total - self.flood).max(0.0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Config {
    None,
    Seed,
    EgressGuard,
    /// For reference, not a target: the same guard with the throttle's
    /// guarantee lowered to 8kbit (ceil still 1Mbit), so the throttled
    /// class only borrows, and last (prio 3).
    BorrowOnly,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::None => "none (no qdisc)",
            Config::Seed => "seed's tc commands",
            Config::EgressGuard => "EgressGuard",
            Config::BorrowOnly => "(EG, throttle 8k/1M)",
        }
    }
}

/// The incident's guard: `throttle` is `rate: 1Mbit` (ceil = rate) for the
/// scenario, `rate: 8kbit, ceil: 1Mbit` for the borrow-only reference.
fn guard_yaml(throttle: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: synflood}}\nspec:\n  uplink: {{rate: 20Mbit}}\n  throttle: {{{throttle}, destinations: [{{protocol: TCP, port: 80}}, {{protocol: TCP, port: 443}}]}}\n  whitelist: [{WHITE4}/32]\n"
    )
}

/// The incident's hand-typed commands, with `leaf` under both classes
/// (`sfq perturb 10` as typed, or `pfifo` where the kernel lacks sfq).
fn seed_batch(leaf: &str) -> String {
    let mut b = String::new();
    for line in [
        "qdisc add dev DEV root handle 1: htb default 20",
        "class add dev DEV parent 1: classid 1:1 htb rate 20mbit",
        "class add dev DEV parent 1:1 classid 1:10 htb rate 1mbit",
        "class add dev DEV parent 1:1 classid 1:20 htb rate 20mbit ceil 20mbit",
        "qdisc add dev DEV parent 1:10 handle 10: LEAF",
        "qdisc add dev DEV parent 1:20 handle 20: LEAF",
        "filter add dev DEV parent 1: protocol ip prio 1 u32 match ip dport 80 0xffff flowid 1:10",
        "filter add dev DEV parent 1: protocol ip prio 1 u32 match ip dport 443 0xffff flowid 1:10",
    ] {
        let _ = writeln!(b, "{}", line.replace("DEV", DEV).replace("LEAF", leaf));
    }
    b
}

/// Installs the seed, sfq leaves if the kernel has them; returns the leaf used.
fn install_seed(lab: &Lab) -> &'static str {
    for leaf in ["sfq perturb 10", "pfifo"] {
        let f = lab.write_guard("seed.tc", &seed_batch(leaf));
        if lab.in_cli(&["tc", "-batch", &f]).status.success() {
            return if leaf == "pfifo" {
                "pfifo (this kernel lacks sfq)"
            } else {
                "sfq perturb 10"
            };
        }
        lab.in_cli(&["tc", "qdisc", "del", "dev", DEV, "root"]);
    }
    panic!("the seed's tc commands were refused with both sfq and pfifo leaves");
}

fn install(lab: &Lab, c: Config, guards: &[String; 2]) -> String {
    match c {
        Config::None => "-".into(),
        Config::Seed => install_seed(lab).into(),
        Config::EgressGuard | Config::BorrowOnly => {
            let guard = &guards[usize::from(c == Config::BorrowOnly)];
            let o = ok(&lab.shaper(&["apply", "-f", guard, "--interface", DEV]));
            if o.contains("DEGRADED") {
                "pfifo (node-shaper's fallback: no sfq)".into()
            } else {
                "sfq perturb 10".into()
            }
        }
    }
}

fn uninstall(lab: &Lab, c: Config) {
    match c {
        Config::None => {}
        Config::Seed => {
            lab.in_cli(&["tc", "qdisc", "del", "dev", DEV, "root"]);
        }
        Config::EgressGuard | Config::BorrowOnly => {
            ok(&lab.shaper(&["reset", "--interface", DEV]));
        }
    }
}

/// One hping3 SYN sender to random addresses of [`FLOOD_NET4`] on `port`,
/// one packet every 20 µs (as fast as hping3 paces on this machine), for `secs`.
fn flood(lab: &Lab, port: u16, secs: u32) -> Child {
    let (secs, port) = (secs.to_string(), port.to_string());
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.cli,
            "timeout",
            &secs,
            "hping3",
            "-q",
            "-S",
            "-p",
            &port,
            "-i",
            "u20",
            "--rand-dest",
            "-I",
            DEV,
            "203.0.113.x",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3")
}

/// One configuration under the flood: counters are read over a window
/// inside the business flow's measured interval (after iperf3's omitted
/// first second).
fn run_once(lab: &Lab, secs: u32, ports: [u16; 2]) -> Sample {
    let mut senders = ports.map(|p| flood(lab, p, secs + 4));
    std::thread::sleep(Duration::from_secs(1));
    let window = Duration::from_secs_f64(f64::from(secs) - 1.0);
    let (business, flood_bytes, total_bytes, elapsed) = std::thread::scope(|s| {
        let flow = s.spawn(|| lab.measure(WHITE4, BUSINESS_PORT, secs, &[]));
        std::thread::sleep(Duration::from_millis(1500));
        let (f0, w0, t0) = (lab.counted_bytes(), lab.wire_bytes(), Instant::now());
        std::thread::sleep(window);
        let (f1, w1) = (lab.counted_bytes(), lab.wire_bytes());
        let elapsed = t0.elapsed().as_secs_f64();
        let r = flow.join().expect("business flow");
        (r.goodput, f1 - f0, w1 - w0, elapsed)
    });
    for s in &mut senders {
        // SIGTERM, which `timeout` passes on to hping3 (a SIGKILL would leave
        // hping3 running without its timer; the Lab guard kills whatever is
        // left in the namespaces on drop, panics included).
        let _ = Command::new("kill")
            .args(["-TERM", &s.id().to_string()])
            .status();
        let _ = s.wait();
    }
    // Let the throttled queue drain before the next configuration.
    std::thread::sleep(Duration::from_millis(1500));
    Sample {
        business,
        flood: flood_bytes as f64 * 8.0 / elapsed,
        total: total_bytes as f64 * 8.0 / elapsed,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mbit(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

/// Runs the scenario and reports its checks through `check(what, value,
/// target, ok)` (the bench's report; rate targets are enforced in full mode
/// only). Tears everything down on return and on panic (the `Lab` guard).
pub fn run(smoke: bool, check: &mut dyn FnMut(&str, String, &str, bool)) {
    let hping = Command::new("hping3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !hping {
        println!("  SYN flood scenario skipped: hping3 is missing");
        check(
            "SYN flood scenario ran",
            "hping3 missing".into(),
            "ran",
            false,
        );
        return;
    }
    let (secs, rounds) = if smoke { (2, 1) } else { (6, 3) };
    let mut lab = Lab::new("syn");
    if let Err(e) = lab.route_and_count(FLOOD_NET4) {
        println!("  SYN flood scenario skipped: {e}");
        check(
            "SYN flood scenario ran",
            "lab setup refused".into(),
            "ran",
            false,
        );
        return;
    }
    lab.serve_on(Some(WHITE4), BUSINESS_PORT);
    let guards = [
        lab.write_guard("synflood.yaml", &guard_yaml("rate: 1Mbit")),
        lab.write_guard("borrow.yaml", &guard_yaml("rate: 8kbit, ceil: 1Mbit")),
    ];
    let configs = [
        Config::None,
        Config::Seed,
        Config::EgressGuard,
        Config::BorrowOnly,
    ];
    let mut samples: [Vec<Sample>; 4] = Default::default();
    let mut leaves: [String; 4] = Default::default();
    // Interleaved rounds, so a slow phase of the machine hits all three.
    for _ in 0..rounds {
        for (i, c) in configs.into_iter().enumerate() {
            leaves[i] = install(&lab, c, &guards);
            samples[i].push(run_once(&lab, secs, THROTTLED_PORTS));
            uninstall(&lab, c);
        }
    }
    // The same flood on unlisted ports: EgressGuard's default class, the
    // seed's normal class (with the business flow). One round, for reference.
    let unlisted = [Config::Seed, Config::EgressGuard].map(|c| {
        install(&lab, c, &guards);
        let s = run_once(&lab, secs, UNLISTED_PORTS);
        uninstall(&lab, c);
        s
    });
    let [none, seed, eg, borrow] = samples.map(|v| Sample {
        business: median(v.iter().map(|s| s.business).collect()),
        flood: median(v.iter().map(|s| s.flood).collect()),
        total: median(v.iter().map(|s| s.total).collect()),
    });
    drop(lab);

    println!(
        "  SYN flood: 2 hping3 senders, 54-byte SYNs (64 on a real wire) to random 203.0.113.x on TCP 80 and 443; business: one iperf3 TCP flow to whitelisted {WHITE4}:{BUSINESS_PORT}; uplink 20 Mbit, throttle 1 Mbit; no TSO/GSO, so wire counters are exact frames; {rounds} interleaved round(s) of {secs} s, medians, Mbit/s:"
    );
    println!(
        "    {:<20} {:>9} {:>10} {:>10} {:>10}  leaves",
        "configuration", "business", "(on wire)", "flood", "total"
    );
    for ((c, s), leaf) in configs
        .iter()
        .zip([&none, &seed, &eg, &borrow])
        .zip(&leaves)
    {
        println!(
            "    {:<20} {:>9} {:>10} {:>10} {:>10}  {leaf}",
            c.name(),
            mbit(s.business),
            mbit(s.business_wire()),
            mbit(s.flood),
            mbit(s.total)
        );
    }
    let vs_seed = eg.business / seed.business;
    let vs_none = eg.business / none.business;
    println!(
        "    business goodput EgressGuard/seed {vs_seed:.3}, EgressGuard/none {vs_none:.4} (none: no qdisc, the veth runs at memory speed); total on the wire: seed {:.1}% of its 20 Mbit uplink, EgressGuard {:.1}%",
        100.0 * seed.total / UPLINK,
        100.0 * eg.total / UPLINK
    );
    // Within the cap the business can have at most what the flood leaves.
    let room = UPLINK - eg.flood;
    let over = seed.total > 1.02 * UPLINK;
    let beaten = eg.business >= seed.business;
    check(
        "SYN flood: business goodput, EgressGuard / seed's tc",
        format!("{vs_seed:.3}"),
        ">= 1.00",
        smoke || beaten,
    );
    if !beaten && over {
        println!(
            "    (the seed wins only by exceeding its own uplink: its classes' rates add up to 21 Mbit on 20, and HTB lets a class below its own rate send without asking the parent, so it put {} Mbit/s on the wire, business {} + flood {}; a real 20 Mbit link would drop the excess. Under the cap the business can have at most uplink - flood = {} Mbit/s of frames; EgressGuard gave it {} ({:.1}%) with the flood at {} and {} on the wire in all)",
            mbit(seed.total),
            mbit(seed.business_wire()),
            mbit(seed.flood),
            mbit(room),
            mbit(eg.business_wire()),
            100.0 * eg.business_wire() / room,
            mbit(eg.flood),
            mbit(eg.total)
        );
    }
    let [useed, ueg] = unlisted;
    println!(
        "    (for reference, not a target: the same flood to unlisted ports {UNLISTED_PORTS:?}, one round: seed's tc business {} Mbit/s with the flood at {} in its class, {} on the wire; EgressGuard business {} with the flood at {} in the default class, {} on the wire: {:.2}x the seed's)",
        mbit(useed.business),
        mbit(useed.flood),
        mbit(useed.total),
        mbit(ueg.business),
        mbit(ueg.flood),
        mbit(ueg.total),
        ueg.business / useed.business
    );
    println!(
        "    (for reference, not a target: spec.throttle.rate is a guarantee the flood keeps; a guard that lowers it, `throttle: {{rate: 8kbit, ceil: 1Mbit}}`, makes the throttled class borrow only, last: business {} Mbit/s, {:.3} of the seed's, flood {}, {} on the wire)",
        mbit(borrow.business),
        borrow.business / seed.business,
        mbit(borrow.flood),
        mbit(borrow.total)
    );
    check(
        "SYN flood: EgressGuard business frames / uplink - flood",
        format!("{:.1}%", 100.0 * eg.business_wire() / room),
        ">= 95%",
        smoke || eg.business_wire() >= 0.95 * room,
    );
    check(
        "SYN flood: flood on the wire under EgressGuard",
        format!("{} Mbit/s", mbit(eg.flood)),
        "<= 1.05",
        smoke || eg.flood <= 1.05 * THROTTLE,
    );
    check(
        "SYN flood: total on the wire under EgressGuard",
        format!("{} Mbit/s", mbit(eg.total)),
        "<= 20.4",
        smoke || eg.total <= 1.02 * UPLINK,
    );
}

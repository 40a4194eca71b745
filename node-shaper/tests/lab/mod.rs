//! A two-namespace lab: `cli` (the shaped host) and `srv` (iperf3 servers),
//! joined by a veth pair. Everything is named per test and torn down on drop,
//! also when the test panics. Traffic only ever flows between these two
//! namespaces.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub const CLIENT4: &str = "10.211.0.1";
pub const SERVER4: &str = "10.211.0.2";
/// A second server address, whitelisted in the tests' guards.
pub const WHITE4: &str = "10.211.0.3";
pub const CLIENT6: &str = "fd00:e9::1";
pub const SERVER6: &str = "fd00:e9::2";
pub const WHITE6: &str = "fd00:e9::3";
/// The shaped interface inside the client namespace.
pub const DEV: &str = "eg0";

pub struct Lab {
    pub cli: String,
    pub srv: String,
    servers: Vec<Child>,
    pub dir: std::path::PathBuf,
}

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The node-shaper binary: Cargo's path when this file is built inside the
/// node-shaper package, else the one next to this test binary (`target/debug`).
/// The stdout of a command that must succeed; on failure, both streams.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn shaper_bin() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_node-shaper") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("node-shaper");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// True when this process may create namespaces (root) and iperf3 exists.
pub fn available() -> bool {
    let root = sh(&["id", "-u"]).stdout.starts_with(b"0");
    let iperf = Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(root && iperf) {
        eprintln!(
            "skipping: datapath tests need root and iperf3 (the README's test command installs it)"
        );
    }
    root && iperf
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{}-{n}", tag, std::process::id());
        let dir = std::env::temp_dir().join(format!("eglab-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Built before anything is created, so Drop cleans up whatever follows.
        let lab = Lab {
            cli: format!("egc-{id}"),
            srv: format!("egs-{id}"),
            servers: vec![],
            dir,
        };
        must(&["ip", "netns", "add", &lab.cli]);
        must(&["ip", "netns", "add", &lab.srv]);
        must(&[
            "ip", "-n", &lab.cli, "link", "add", "name", DEV, "type", "veth", "peer", "name",
            "egpeer", "netns", &lab.srv,
        ]);
        for (ns, dev) in [(&lab.cli, DEV), (&lab.srv, "egpeer")] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        must(&[
            "ip",
            "-n",
            &lab.cli,
            "addr",
            "add",
            &format!("{CLIENT4}/24"),
            "dev",
            DEV,
        ]);
        must(&[
            "ip",
            "-n",
            &lab.cli,
            "addr",
            "add",
            &format!("{CLIENT6}/64"),
            "dev",
            DEV,
            "nodad",
        ]);
        for a in [SERVER4, WHITE4] {
            must(&[
                "ip",
                "-n",
                &lab.srv,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "egpeer",
            ]);
        }
        for a in [SERVER6, WHITE6] {
            must(&[
                "ip",
                "-n",
                &lab.srv,
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "egpeer",
                "nodad",
            ]);
        }
        lab
    }

    /// Starts an iperf3 server on `port` in the server namespace.
    pub fn serve(&mut self, port: u16) {
        self.serve_on(None, port);
    }

    /// Starts an iperf3 server bound to one address, so two can share a port.
    pub fn serve_on(&mut self, addr: Option<&str>, port: u16) {
        let mut args = vec!["netns", "exec", &self.srv, "iperf3", "-s"];
        if let Some(a) = addr {
            args.extend(["-B", a]);
        }
        let port = port.to_string();
        args.extend(["-p", &port]);
        let child = Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server");
        self.servers.push(child);
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn in_cli(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.cli];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs node-shaper in the client namespace.
    pub fn shaper(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.cli])
            .arg(shaper_bin())
            .args(args)
            .env("EGRESSGUARD_STATE_DIR", &self.dir)
            .output()
            .expect("node-shaper")
    }

    pub fn write_guard(&self, name: &str, body: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, body).expect("write guard");
        p.to_string_lossy().into_owned()
    }

    /// The kernel's tc state as iproute2 renders the netlink dumps, counters excluded.
    pub fn tc_dump(&self) -> String {
        let mut s = String::new();
        for what in ["qdisc", "class", "filter"] {
            let o = self.in_cli(&["tc", "-d", what, "show", "dev", DEV]);
            s.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        // HTB prints one counter even without -s; drop it.
        let mut words: Vec<&str> = Vec::new();
        let mut skip = false;
        let mut out = String::new();
        for line in s.lines() {
            words.clear();
            for w in line.split(' ') {
                if skip {
                    skip = false;
                    continue;
                }
                if w == "direct_packets_stat" {
                    skip = true;
                    continue;
                }
                words.push(w);
            }
            out.push_str(&words.join(" "));
            out.push('\n');
        }
        out
    }

    /// Root qdisc bytes counter, read with iproute2 (an independent reader).
    pub fn root_bytes(&self) -> (String, u64) {
        let o = self.in_cli(&["tc", "-s", "-j", "qdisc", "show", "dev", DEV, "root"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("tc json");
        let q = &v[0];
        (
            q["handle"].as_str().unwrap_or_default().to_string(),
            q["bytes"].as_u64().unwrap_or(0),
        )
    }

    /// Spawns an iperf3 client (JSON output) in the client namespace.
    pub fn client(&self, dst: &str, port: u16, secs: u32, extra: &[&str]) -> Child {
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.cli.clone(),
            "iperf3".into(),
            "-J".into(),
            "-c".into(),
            dst.into(),
        ];
        args.extend(["-p".into(), port.to_string(), "-t".into(), secs.to_string()]);
        // Omit TCP's slow-start second; UDP has none (and iperf3 3.12 can fail with -O there).
        if !extra.contains(&"-u") {
            args.extend(["-O".into(), "1".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new("ip")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iperf3 client")
    }

    /// Runs a client to completion (retrying while the server finishes a previous test).
    pub fn measure(&self, dst: &str, port: u16, secs: u32, extra: &[&str]) -> Iperf {
        for _ in 0..20 {
            let out = self
                .client(dst, port, secs, extra)
                .wait_with_output()
                .expect("iperf3");
            if String::from_utf8_lossy(&out.stdout).contains("the server is busy") {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            return Iperf::parse(out);
        }
        panic!("iperf3 server on {dst}:{port} stayed busy");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Kill anything still running inside the namespaces, then remove them.
        for ns in [&self.cli, &self.srv] {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What an iperf3 client reported.
#[derive(Debug)]
pub struct Iperf {
    /// Receiver goodput, bits/s.
    pub goodput: f64,
    /// TCP retransmissions (sender side).
    pub retransmits: u64,
    /// Per-interval goodput, bits/s.
    pub intervals: Vec<f64>,
    /// UDP datagrams lost (sequence-number gaps seen by the server).
    pub lost_packets: u64,
}

impl Iperf {
    pub fn parse(out: Output) -> Iperf {
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value =
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {raw}"));
        if let Some(err) = v.get("error") {
            panic!("iperf3 failed: {err}\n{raw}");
        }
        let end = &v["end"];
        let goodput = match end.get("sum_received") {
            Some(r) => r["bits_per_second"].as_f64().unwrap_or(0.0),
            // UDP: the server's view of what arrived.
            None => {
                let s = &end["sum"];
                s["bits_per_second"].as_f64().unwrap_or(0.0)
                    * (1.0 - s["lost_percent"].as_f64().unwrap_or(0.0) / 100.0)
            }
        };
        let intervals = v["intervals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                    .collect()
            })
            .unwrap_or_default();
        Iperf {
            goodput,
            retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            intervals,
            lost_packets: end["sum"]["lost_packets"].as_u64().unwrap_or(0),
        }
    }
}

/// Converts TCP goodput to the Ethernet-frame rate HTB shapes: each full
/// segment of `mss` payload bytes costs mss + 66 bytes on the wire (14
/// Ethernet + 20 IPv4 + 32 TCP with timestamps), mss + 86 for IPv6.
pub fn l2_rate(goodput: f64, v6: bool) -> f64 {
    let (mss, overhead) = if v6 { (1428.0, 86.0) } else { (1448.0, 66.0) };
    goodput * (mss + overhead) / mss
}

pub fn guard(whitelist: &str, dests: &str, throttle: &str) -> String {
    format!(
        "apiVersion: egressguard.io/v1alpha1\nkind: EgressGuard\nmetadata: {{name: lab}}\nspec:\n  uplink: {{rate: 20Mbit, burst: 32k}}\n  throttle: {{rate: {throttle}, ceil: {throttle}, burst: 4k, destinations: {dests}}}\n  whitelist: {whitelist}\n"
    )
}

/// xorshift64: deterministic lists without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A mixed whitelist: thirds of /32, /24 and /16 IPv4 networks plus `v6`
/// IPv6 prefixes (/48, /64, /128), deterministic, never covering the lab.
pub fn whitelist(n4: usize, v6: usize) -> Vec<String> {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < n4 {
        let a = 11 + (r.next() % 212) as u32; // 11.0.0.0 - 222.255.255.255: never the lab's 10.211/16
        let x = r.next() as u32;
        let net = match out.len() % 3 {
            0 => format!(
                "{a}.{}.{}.{}/32",
                x >> 24,
                (x >> 16) & 0xff,
                (x >> 8) & 0xff
            ),
            1 => format!("{a}.{}.{}.0/24", x >> 24, (x >> 16) & 0xff),
            _ => format!("{a}.{}.0.0/16", x >> 24),
        };
        if seen.insert(net.clone()) {
            out.push(net);
        }
    }
    let mut i = 0;
    while out.len() < n4 + v6 {
        let x = r.next();
        let net = match i % 3 {
            0 => format!("2001:db8:{:x}::/48", x & 0xffff),
            1 => format!("2001:db8:{:x}:{:x}::/64", x & 0xffff, (x >> 16) & 0xffff),
            _ => format!(
                "2001:db8:{:x}:{:x}::{:x}/128",
                x & 0xffff,
                (x >> 16) & 0xffff,
                (x >> 32) & 0xffff
            ),
        };
        i += 1;
        if seen.insert(net.clone()) {
            out.push(net);
        }
    }
    out
}

/// A network outside the lab's /24 (TEST-NET-3) for floods to random
/// destinations: see [`Lab::route_and_count`].
pub const FLOOD_NET4: &str = "203.0.113.0/24";
/// The ifb device in the server namespace whose counters are the flood's.
const FLOOD_IFB: &str = "egflood";

impl Lab {
    /// Routes `net` from the client namespace via the server address, so
    /// packets to random destinations in it leave through the shaped
    /// interface (destinations in the veth's own /24 would wait for ARP
    /// replies that never come and be dropped before the qdisc), and counts
    /// what arrives for `net` in the server namespace: an ingress u32 filter
    /// on the peer redirects those packets to an ifb device, whose counter
    /// ([`Lab::counted_bytes`]) is then their L2 bytes on the wire; the ifb
    /// hands them back to the peer's stack, which drops them (no forwarding).
    /// Also sets the shaped interface to one TCP segment per packet (no
    /// TSO/GSO), so the veth's counters ([`Lab::wire_bytes`]) are exact
    /// Ethernet-frame bytes (a GSO packet's counter misses the headers of
    /// all its segments but the first). An error names what the kernel refused.
    pub fn route_and_count(&self, net: &str) -> Result<(), String> {
        let (cli, srv) = (self.cli.as_str(), self.srv.as_str());
        let steps: [&[&str]; 7] = [
            &[
                "ip", "-n", cli, "route", "add", net, "via", SERVER4, "dev", DEV,
            ],
            &[
                "ip",
                "-n",
                cli,
                "link",
                "set",
                "dev",
                DEV,
                "gso_max_segs",
                "1",
            ],
            &["ip", "-n", srv, "link", "add", FLOOD_IFB, "type", "ifb"],
            &["ip", "-n", srv, "link", "set", FLOOD_IFB, "up"],
            &[
                "tc", "-n", srv, "qdisc", "add", "dev", "egpeer", "handle", "ffff:", "ingress",
            ],
            &[
                "tc", "-n", srv, "filter", "add", "dev", "egpeer", "parent", "ffff:", "protocol",
                "ip", "prio", "1", "u32", "match", "ip", "dst", net, "action", "mirred", "egress",
                "redirect", "dev", FLOOD_IFB,
            ],
            &["ip", "-n", srv, "link", "show", FLOOD_IFB],
        ];
        for s in steps {
            let o = sh(s);
            if !o.status.success() {
                return Err(format!(
                    "{}: {}",
                    s.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// L2 bytes that reached the server namespace for the network of
    /// [`Lab::route_and_count`].
    pub fn counted_bytes(&self) -> u64 {
        link_bytes(&self.srv, FLOOD_IFB, "tx")
    }

    /// L2 bytes the server namespace received on the veth: everything the
    /// shaped interface put on the wire.
    pub fn wire_bytes(&self) -> u64 {
        link_bytes(&self.srv, "egpeer", "rx")
    }
}

/// One byte counter of a device (`rx` or `tx`), read with iproute2.
fn link_bytes(ns: &str, dev: &str, dir: &str) -> u64 {
    let o = sh(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("ip -s -j link show {dev}: {e}"));
    v[0]["stats64"][dir]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {dir} bytes for {dev} in {v}"))
}

//! The kernel's tc notifications (`RTNLGRP_TC`): every qdisc, class and
//! filter change on the host, as it happens. The agent listens to them so a
//! deleted or altered tree is repaired at once, not at the next resync.
//!
//! Our own writes notify too. Each notification carries the netlink port id
//! of the socket whose request caused it, so the passes' own sockets are
//! recorded in [`Watch`] and their notifications are ignored.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tracing::warn;

/// `RTNLGRP_TC`, and the address groups (`RTNLGRP_IPV4_IFADDR`,
/// `RTNLGRP_IPV6_IFADDR`): an address change changes the SSH lane's sources.
const GROUPS: [u32; 3] = [4, 5, 9];
/// RTM_{NEW,DEL}{QDISC,TCLASS,TFILTER}, and RTM_{NEW,DEL}ADDR. Each message
/// starts with a struct whose interface index sits at the same offset.
const MESSAGES: [u16; 8] = [36, 37, 40, 41, 44, 45, 20, 21];
/// Port ids remembered: a pass opens one socket; notifications of the last
/// few passes may still be in flight.
const OWN_PORTS: usize = 8;

/// What the monitor ignores and what it reports: shared between the pass
/// (which records its socket and the interfaces it shapes) and the monitor.
#[derive(Debug, Clone, Default)]
pub struct Watch(Arc<Mutex<WatchState>>);

#[derive(Debug, Default)]
struct WatchState {
    own_ports: VecDeque<u32>,
    ifindexes: BTreeSet<i32>,
    /// The monitor thread is listening.
    live: bool,
    /// A foreign change (or lost notifications) since the last
    /// [`Watch::take_foreign`].
    foreign: bool,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A socket of ours: changes it makes are not tampering.
    pub fn own_port(&self, port: u32) {
        let mut s = self.lock();
        if s.own_ports.len() == OWN_PORTS {
            s.own_ports.pop_front();
        }
        s.own_ports.push_back(port);
    }

    /// The interfaces whose changes matter (the ones we shape).
    pub fn set_interfaces(&self, ifindexes: impl IntoIterator<Item = i32>) {
        self.lock().ifindexes = ifindexes.into_iter().collect();
    }

    /// Does a change on `ifindex` from port `from` concern us?
    fn concerns(&self, ifindex: i32, from: u32) -> bool {
        let s = self.lock();
        s.ifindexes.contains(&ifindex) && !s.own_ports.contains(&from)
    }

    /// Has anyone but us changed tc on a watched interface since the last
    /// call (or may have: notifications lost, or no monitor listening)?
    /// Clears the mark. A pass that may skip reading the tree back asks
    /// this first; a foreign change notified after the question marks the
    /// next pass (and wakes a repair pass, which reads back anyway).
    pub fn take_foreign(&self) -> bool {
        let mut s = self.lock();
        let foreign = std::mem::take(&mut s.foreign);
        foreign || !s.live
    }

    fn mark_foreign(&self) {
        self.lock().foreign = true;
    }

    /// Test hook: as if the monitor had seen a foreign change.
    #[doc(hidden)]
    pub fn mark_foreign_for_tests(&self) {
        self.mark_foreign();
    }

    fn set_live(&self, live: bool) {
        let mut s = self.lock();
        s.live = live;
        s.foreign = true;
    }
}

/// A tc change somebody else made on a watched interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcChange {
    /// On this interface index.
    On(i32),
    /// Notifications were lost (the socket's buffer overflowed): assume anything.
    Lost,
}

/// The (message type, ifindex, sender port) of each tc notification in a datagram.
fn notifications(data: &[u8]) -> Vec<(u16, i32, u32)> {
    let mut out = Vec::new();
    let mut off = 0;
    let rd32 = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    while let Some(len) = rd32(off) {
        let len = len as usize;
        if len < 16 || off + len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
        // struct tcmsg { u8 family, pad1; u16 pad2; i32 ifindex; ... } after the 16-byte header
        // (struct ifaddrmsg { u8 family, prefixlen, flags, scope; u32 index }: the same offset)
        if let (true, Some(pid), Some(ifindex)) =
            (MESSAGES.contains(&kind), rd32(off + 12), rd32(off + 20))
        {
            out.push((kind, ifindex as i32, pid));
        }
        off += (len + 3) & !3;
    }
    out
}

/// Starts a thread that reports every tc change on a watched interface made
/// by anyone but us, until `report` returns false.
pub fn spawn(
    watch: Watch,
    mut report: impl FnMut(TcChange) -> bool + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    for g in GROUPS {
        sock.add_membership(g)?;
    }
    // A big apply notifies once per filter; ours are dropped after a glance,
    // but the buffer must hold them while this thread catches up. The kernel
    // caps this at net.core.rmem_max: beyond it, an overflow (ENOBUFS) is
    // reported as `Lost` and costs one extra pass.
    let _ = sock.set_rx_buf_sz(8 << 20);
    watch.set_live(true);
    let alive = watch.clone();
    std::thread::Builder::new()
        .name("tc-monitor".into())
        .spawn(move || {
            let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
            // Whichever way the loop ends, nothing vouches for the tree any more.
            struct Stopped(Watch);
            impl Drop for Stopped {
                fn drop(&mut self) {
                    self.0.set_live(false);
                }
            }
            let _stopped = Stopped(watch.clone());
            loop {
                buf.clear();
                let change = match sock.recv(&mut buf, 0) {
                    Ok(_) => notifications(&buf)
                        .into_iter()
                        .find(|(_, ifindex, from)| watch.concerns(*ifindex, *from))
                        .map(|(_, ifindex, _)| TcChange::On(ifindex)),
                    Err(e) if e.raw_os_error() == Some(ENOBUFS) => Some(TcChange::Lost),
                    Err(e) => {
                        warn!(error = %e, "tc notifications stopped; drift is repaired at the resync only");
                        return;
                    }
                };
                if let Some(c) = change {
                    watch.mark_foreign();
                    if !report(c) {
                        return;
                    }
                }
            }
        })
        .inspect_err(|_| alive.set_live(false))
}

/// `ENOBUFS` (Linux): the kernel dropped notifications for this socket.
const ENOBUFS: i32 = 105;

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, pid: u32, ifindex: i32) -> Vec<u8> {
        let mut m = vec![0u8; 36];
        m[0..4].copy_from_slice(&36u32.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[12..16].copy_from_slice(&pid.to_ne_bytes());
        m[20..24].copy_from_slice(&ifindex.to_ne_bytes());
        m
    }

    #[test]
    fn notifications_name_the_interface_and_the_sender() {
        let mut d = message(37, 77, 4); // RTM_DELQDISC by port 77 on ifindex 4
        d.extend(message(18, 0, 9)); // RTM_GETLINK: not tc
        d.extend(message(44, 0, 5)); // RTM_NEWTFILTER by the kernel on 5
        assert_eq!(notifications(&d), vec![(37, 4, 77), (44, 5, 0)]);
        let w = Watch::default();
        w.set_interfaces([4]);
        w.own_port(77);
        assert!(!w.concerns(4, 77), "our own change");
        assert!(
            w.concerns(4, 1234),
            "someone else's change on a shaped interface"
        );
        assert!(!w.concerns(5, 1234), "an interface we do not shape");
        for p in 0..OWN_PORTS as u32 {
            w.own_port(1000 + p);
        }
        assert!(w.concerns(4, 77), "only the last few sockets are ours");
    }

    /// A pass may trust the tree it wrote only while a monitor listens and
    /// nobody else changed tc since it last asked.
    #[test]
    fn a_foreign_change_or_no_monitor_forces_a_read_back() {
        let w = Watch::default();
        assert!(w.take_foreign(), "no monitor: nothing vouches for the tree");
        w.set_live(true);
        assert!(
            w.take_foreign(),
            "the first pass after the monitor started reads back"
        );
        assert!(!w.take_foreign(), "nothing happened since");
        w.mark_foreign();
        assert!(w.take_foreign(), "a foreign change");
        assert!(!w.take_foreign(), "asked once, cleared");
        w.set_live(false);
        assert!(w.take_foreign(), "monitor stopped");
        assert!(w.take_foreign(), "and stays untrusted");
    }
}

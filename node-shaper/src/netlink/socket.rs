//! A blocking rtnetlink socket that pipelines requests and reads the kernel's
//! answers, extended-ACK text included.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::encode::Request;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Requests per write; keeps the ACKs of one batch well inside the receive buffer.
const BATCH_BYTES: usize = 48 * 1024;
/// Receive buffer per datagram (dump batches are at most 32 KiB).
const RECV_BYTES: usize = 128 * 1024;

/// A kernel refusal.
#[derive(Debug, Clone, thiserror::Error)]
#[error("kernel refused to {what}: {reason}")]
pub struct KernelError {
    /// The request, in words.
    pub what: String,
    /// errno (positive).
    pub errno: i32,
    /// strerror plus the extended ACK message when the kernel gave one.
    pub reason: String,
}

/// What the kernel said about one request.
#[derive(Debug, Clone)]
pub enum KernelReply {
    /// Done; with the kernel's warning, if any (e.g. HTB quantum warnings).
    Ok(Option<String>),
    /// Refused.
    Err(KernelError),
}

/// An rtnetlink socket.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    /// Writes sent since creation (requests, not dumps); for reports and tests.
    pub writes: usize,
    /// Crash simulation for tests: after this many writes the socket behaves
    /// as if the process died (nothing more is sent, every call fails).
    write_budget: Option<usize>,
    /// With a budget: fail once (a transient I/O error) instead of for good.
    transient: bool,
    /// Test hook: writes numbered in this range are refused without being sent.
    refuse: Option<std::ops::Range<usize>>,
}

fn io_err(context: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{context}: {e}"))
}

impl Netlink {
    /// Opens a socket with extended ACKs, so refusals come with the kernel's reason.
    pub fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        sock.set_ext_ack(true)?;
        sock.set_cap_ack(true)?;
        // A 10,000-entry dump arrives faster than we parse it.
        let _ = sock.set_rx_buf_sz(4 << 20);
        Ok(Netlink {
            sock,
            seq: 1,
            writes: 0,
            write_budget: None,
            transient: false,
            refuse: None,
        })
    }

    /// This socket's netlink port id: tc notifications of its changes carry it.
    pub fn port_id(&self) -> Option<u32> {
        let mut addr = SocketAddr::new(0, 0);
        self.sock.get_address(&mut addr).ok()?;
        Some(addr.port_number())
    }

    /// Test hook: send at most `budget` more writes, then fail every call as a
    /// process killed at that point would (used to prove that any prefix of
    /// any apply, rollbacks included, converges on the next apply).
    pub fn crash_after(&mut self, budget: usize) {
        self.write_budget = Some(self.writes + budget);
        self.transient = false;
    }

    /// Test hook: after `budget` more writes, fail one call with an I/O error,
    /// then work again (a transient socket error in the middle of an apply).
    pub fn io_error_after(&mut self, budget: usize) {
        self.write_budget = Some(self.writes + budget);
        self.transient = true;
    }

    fn budget_exhausted(&mut self) -> Option<io::Error> {
        let b = self.write_budget?;
        if self.writes < b {
            return None;
        }
        if self.transient {
            self.write_budget = None;
            return Some(io::Error::other("simulated netlink I/O error (test hook)"));
        }
        Some(io::Error::other(
            "simulated crash (test write budget exhausted)",
        ))
    }

    /// Reads one datagram. The buffer is large on purpose: the kernel sizes
    /// dump batches by the largest receive buffer it has seen (up to 32 KiB),
    /// and each batch of a u32 dump re-walks the filters already sent, so
    /// small reads make a 10,000-filter dump quadratic.
    fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::with_capacity(RECV_BYTES);
        self.sock.recv(&mut buf, 0)?;
        Ok(buf)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Test hook: the next `count` writes starting `after` writes from now
    /// are refused (EEXIST) without reaching the kernel; later ones go through.
    pub fn refuse_writes(&mut self, after: usize, count: usize) {
        self.refuse = Some(self.writes + after..self.writes + after + count);
    }

    /// Sends requests in pipelined batches; returns one kernel reply per request.
    /// Later requests are still sent when an earlier one fails: the caller
    /// decides what to undo from the full list.
    pub fn execute(&mut self, reqs: &[Request]) -> io::Result<Vec<KernelReply>> {
        let Some(refuse) = self.refuse.clone() else {
            return self.execute_batched(reqs);
        };
        // Test path: one request at a time, so refusals land on exact writes.
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            if refuse.contains(&self.writes) {
                self.writes += 1;
                out.push(KernelReply::Err(KernelError {
                    what: r.what.clone(),
                    errno: 17,
                    reason: "File exists (os error 17): refused by the test hook".into(),
                }));
            } else {
                out.extend(self.execute_batched(std::slice::from_ref(r))?);
            }
        }
        Ok(out)
    }

    fn execute_batched(&mut self, reqs: &[Request]) -> io::Result<Vec<KernelReply>> {
        let mut outcomes: Vec<Option<KernelReply>> = vec![None; reqs.len()];
        let mut i = 0;
        while i < reqs.len() {
            if let Some(e) = self.budget_exhausted() {
                return Err(e);
            }
            let limit = match self.write_budget {
                Some(b) => (i + b - self.writes).min(reqs.len()),
                None => reqs.len(),
            };
            let mut buf = Vec::with_capacity(BATCH_BYTES);
            let mut seqs = Vec::new();
            while i < limit && (buf.len() < BATCH_BYTES || seqs.is_empty()) {
                let mut m = reqs[i].message.clone();
                let seq = self.next_seq();
                m.header.sequence_number = seq;
                m.finalize();
                let start = buf.len();
                buf.resize(start + m.buffer_len(), 0);
                m.serialize(&mut buf[start..]);
                seqs.push((seq, i));
                i += 1;
            }
            self.sock.send(&buf, 0)?;
            self.writes += seqs.len();
            let mut pending = seqs.len();
            while pending > 0 {
                let data = self.recv()?;
                for (hdr, _, payload) in frames(&data) {
                    if hdr.message_type != NLMSG_ERROR {
                        continue;
                    }
                    let Some(&(_, idx)) = seqs.iter().find(|(s, _)| *s == hdr.sequence_number)
                    else {
                        continue;
                    };
                    if outcomes[idx].is_some() {
                        continue;
                    }
                    let (errno, msg) = parse_error(hdr.flags, payload);
                    outcomes[idx] = Some(if errno == 0 {
                        KernelReply::Ok(msg)
                    } else {
                        let base = io::Error::from_raw_os_error(-errno).to_string();
                        let reason = match msg {
                            Some(m) => format!("{base}: {m}"),
                            None => base,
                        };
                        KernelReply::Err(KernelError {
                            what: reqs[idx].what.clone(),
                            errno: -errno,
                            reason,
                        })
                    });
                    pending -= 1;
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(KernelReply::Ok(None)))
            .collect())
    }

    /// Runs a dump request and returns every message until NLMSG_DONE.
    pub fn dump(&mut self, inner: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        self.dump_with(inner, |raw| {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw)
                .map_err(|e| io_err("cannot parse netlink dump", e))?;
            if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                out.push(inner);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs a dump request, handing each raw message (header included) to `each`.
    pub fn dump_with(
        &mut self,
        inner: RouteNetlinkMessage,
        mut each: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if !self.transient {
            if let Some(e) = self.budget_exhausted() {
                return Err(e);
            }
        }
        let mut h = NetlinkHeader::default();
        h.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let seq = self.next_seq();
        h.sequence_number = seq;
        let mut m = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(inner));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        loop {
            let data = self.recv()?;
            for (hdr, raw, payload) in frames(&data) {
                if hdr.sequence_number != seq {
                    continue;
                }
                match hdr.message_type {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let (errno, msg) = parse_error(hdr.flags, payload);
                        if errno != 0 {
                            let e = io::Error::from_raw_os_error(-errno);
                            return Err(io_err(
                                "netlink dump failed",
                                msg.map_or(e.to_string(), |m| format!("{e}: {m}")),
                            ));
                        }
                    }
                    _ => each(raw)?,
                }
            }
        }
    }
}

/// Header fields we need from each message in a datagram.
struct Frame {
    message_type: u16,
    flags: u16,
    sequence_number: u32,
}

/// Splits a datagram into (header, whole message, payload) triples.
fn frames(data: &[u8]) -> Vec<(Frame, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= data.len() {
        let rd32 = |o: usize| u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let rd16 = |o: usize| u16::from_ne_bytes([data[o], data[o + 1]]);
        let len = rd32(off) as usize;
        if len < 16 || off + len > data.len() {
            break;
        }
        let f = Frame {
            message_type: rd16(off + 4),
            flags: rd16(off + 6),
            sequence_number: rd32(off + 8),
        };
        out.push((f, &data[off..off + len], &data[off + 16..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// errno and extended-ACK message of an NLMSG_ERROR payload.
fn parse_error(flags: u16, p: &[u8]) -> (i32, Option<String>) {
    if p.len() < 4 {
        return (0, None);
    }
    let errno = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    if flags & NLM_F_ACK_TLVS == 0 || p.len() < 20 {
        return (errno, None);
    }
    // The echoed request: header only when capped, else the whole message.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes([p[4], p[5], p[6], p[7]]) as usize
    };
    let mut off = 4 + ((echoed + 3) & !3);
    while off + 4 <= p.len() {
        let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([p[off + 2], p[off + 3]]) & 0x3fff;
        if len < 4 || off + len > p.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let s = &p[off + 4..off + len];
            let s = s.split(|b| *b == 0).next().unwrap_or_default();
            return (errno, Some(String::from_utf8_lossy(s).trim().to_string()));
        }
        off += (len + 3) & !3;
    }
    (errno, None)
}

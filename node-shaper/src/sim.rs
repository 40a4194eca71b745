//! A model of the kernel's u32 classifier (`net/sched/cls_u32.c`), run on a
//! synthetic packet. `explain` uses it on the state read back from the kernel,
//! and the tests use it to prove the hashed layout classifies exactly like a
//! flat list would.

use std::net::IpAddr;

use crate::model::*;

/// A packet as u32 sees it: the network header onwards.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Ethertype.
    pub protocol: u16,
    /// Bytes from the IP header on.
    pub bytes: Vec<u8>,
}

/// Transport protocol of a synthetic packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4) or ICMPv6 (IPv6) of this type; the port is ignored.
    Icmp(u8),
}

impl Packet {
    /// A TCP or UDP packet to `dst:port`; `ip_options` adds IPv4 option words.
    pub fn new(dst: IpAddr, l4: L4, port: u16, ip_options: usize) -> Packet {
        let proto = match (l4, dst) {
            (L4::Tcp, _) => 6u8,
            (L4::Udp, _) => 17u8,
            (L4::Icmp(_), IpAddr::V4(_)) => 1u8,
            (L4::Icmp(_), IpAddr::V6(_)) => 58u8,
        };
        let mut l4hdr = vec![0u8; 20];
        if let L4::Icmp(t) = l4 {
            l4hdr[0] = t;
        } else {
            l4hdr[0..2].copy_from_slice(&40000u16.to_be_bytes());
            l4hdr[2..4].copy_from_slice(&port.to_be_bytes());
        }
        match dst {
            IpAddr::V4(a) => {
                let ihl = 5 + ip_options.min(10);
                let mut h = vec![0u8; ihl * 4];
                h[0] = 0x40 | ihl as u8;
                h[6] = 0x40; // DF, fragment offset 0
                h[8] = 64;
                h[9] = proto;
                h[12..16].copy_from_slice(&[192, 0, 2, 1]);
                h[16..20].copy_from_slice(&a.octets());
                for b in h.iter_mut().skip(20) {
                    *b = 1; // NOP options
                }
                h.extend(l4hdr);
                Packet {
                    protocol: ETH_P_IP,
                    bytes: h,
                }
            }
            IpAddr::V6(a) => {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[6] = proto;
                h[7] = 64;
                h[8] = 0x20;
                h[24..40].copy_from_slice(&a.octets());
                h.extend(l4hdr);
                Packet {
                    protocol: ETH_P_IPV6,
                    bytes: h,
                }
            }
        }
    }

    /// The same TCP or UDP packet sent from local port `port` (40000 by default).
    pub fn from_port(mut self, port: u16) -> Packet {
        let l4 = match self.protocol {
            ETH_P_IP => usize::from(self.bytes[0] & 0x0f) * 4,
            _ => 40,
        };
        self.bytes[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
        self
    }

    fn word(&self, off: i64) -> Option<u32> {
        let off = usize::try_from(off).ok()?;
        let b = self.bytes.get(off..off + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The outcome of classifying a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// The prio whose filter matched.
    pub prio: u16,
    /// The terminal filter that matched.
    pub node: &'a Filter,
}

fn table_filters(p: &Prio, table: Table, bucket: u8) -> Vec<&Filter> {
    let mut v: Vec<&Filter> = p
        .filters
        .iter()
        .filter(|n| n.table == table && n.bucket == bucket)
        .collect();
    // The kernel keeps a bucket ordered by node id; planned nodes keep plan order.
    v.sort_by_key(|n| n.id.unwrap_or(0));
    v
}

fn table_of(p: &Prio, link: u32) -> (Table, u32) {
    let divisor = p
        .tables
        .iter()
        .find(|t| t.handle == link)
        .map_or(1, |t| t.divisor);
    (Table::User(link), divisor)
}

/// Runs one prio's u32 filter; returns the matching terminal filter.
fn run_prio<'a>(p: &'a Prio, pkt: &Packet) -> Option<&'a Filter> {
    // Explicit stack mirrors the kernel's (depth limit 8).
    struct Frame<'a> {
        filters: Vec<&'a Filter>,
        idx: usize,
        off: i64,
    }
    let mut stack: Vec<Frame<'a>> = vec![Frame {
        filters: table_filters(p, Table::Root, 0),
        idx: 0,
        off: 0,
    }];
    let mut off2: i64 = 0;
    loop {
        let depth = stack.len();
        let Some(top) = stack.last_mut() else { break };
        let Some(n) = top.filters.get(top.idx).copied() else {
            stack.pop();
            if let Some(parent) = stack.last_mut() {
                // POP: back at the link filter; it is not terminal, so move on.
                let link = parent.filters[parent.idx];
                if link.sel.flags & U32_TERMINAL != 0 {
                    return Some(link);
                }
                parent.idx += 1;
            }
            continue;
        };
        let off = top.off;
        if !keys_match(n, pkt, off, off2)? {
            top.idx += 1;
            continue;
        }
        let Some(link) = n.link else {
            if n.sel.flags & U32_TERMINAL != 0 {
                return Some(n);
            }
            top.idx += 1;
            continue;
        };
        if depth >= 8 {
            return None;
        }
        let (table, divisor) = table_of(p, link);
        let bucket = bucket_of(n, pkt, off, divisor)?;
        let new_off = next_offset(n, pkt, off, &mut off2)?;
        if new_off < pkt.bytes.len() as i64 {
            stack.push(Frame {
                filters: table_filters(p, table, bucket),
                idx: 0,
                off: new_off,
            });
        } else {
            top.idx += 1;
        }
    }
    None
}

/// Whether every key of `n` matches the packet at header offset `off`
/// (`off2`: the offset a previous node computed, for keys with an
/// `offmask`); `None` when a key reads past the packet.
fn keys_match(n: &Filter, pkt: &Packet, off: i64, off2: i64) -> Option<bool> {
    for k in &n.sel.keys {
        let toff = off + i64::from(k.off) + (off2 & i64::from(k.offmask));
        let w = pkt.word(toff)?;
        if (w ^ k.val) & k.mask != 0 {
            return Some(false);
        }
    }
    Some(true)
}

/// The bucket of a table with `divisor` buckets that link node `n` hashes
/// the packet into (the word at `hoff`, masked by `hmask` and shifted down).
fn bucket_of(n: &Filter, pkt: &Packet, off: i64, divisor: u32) -> Option<u8> {
    if divisor <= 1 {
        return Some(0);
    }
    let data = pkt.word(off + i64::from(n.sel.hoff))?;
    let fshift = if n.sel.hmask == 0 {
        0
    } else {
        n.sel.hmask.trailing_zeros()
    };
    Some((((data & n.sel.hmask) >> fshift) & (divisor - 1)) as u8)
}

/// The header offset the linked table starts at: `off`, moved by what link
/// node `n` computes into `off2` (`offset at ... mask ... shift ...`) when
/// it eats it (`eat`), as the kernel does.
fn next_offset(n: &Filter, pkt: &Packet, off: i64, off2: &mut i64) -> Option<i64> {
    let mut new_off = off;
    if n.sel.flags & (U32_OFFSET | U32_VAROFFSET) != 0 {
        *off2 = i64::from(n.sel.off) + 3;
        if n.sel.flags & U32_VAROFFSET != 0 {
            let w = pkt.word(off + i64::from(n.sel.offoff))?;
            let half = (w >> 16) as u16;
            *off2 += i64::from((half & n.sel.offmask) >> n.sel.offshift);
        }
        *off2 &= !3;
    }
    if n.sel.flags & U32_EAT != 0 {
        new_off += *off2;
        *off2 = 0;
    }
    Some(new_off)
}

/// Classifies a packet through every prio in order, as `tcf_classify` does.
pub fn classify<'a>(shape: &'a Shape, pkt: &Packet) -> Option<Verdict<'a>> {
    let mut prios: Vec<&Prio> = shape.prios.iter().collect();
    prios.sort_by_key(|p| p.prio);
    prios
        .into_iter()
        .filter(|p| p.protocol == pkt.protocol)
        .find_map(|p| run_prio(p, pkt).map(|node| Verdict { prio: p.prio, node }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(sel: Selector) -> Filter {
        Filter {
            table: Table::Root,
            bucket: 0,
            id: Some(1),
            sel,
            classid: None,
            link: Some(0x200 << 20),
            origin: Origin::Unknown,
        }
    }

    /// `offset at 0 mask 0x0f00 shift 6 eat` steps over the IPv4 header,
    /// options included; a hash link picks the bucket of the masked word.
    #[test]
    fn links_step_over_the_header_and_hash_into_buckets() {
        let dst: IpAddr = "198.51.100.9".parse().expect("ip");
        let ihl = link(Selector {
            flags: U32_OFFSET | U32_VAROFFSET | U32_EAT,
            offmask: 0x0f00,
            offshift: 6,
            ..Selector::default()
        });
        for (option_words, want) in [(0, 20), (2, 28), (10, 60)] {
            let pkt = Packet::new(dst, L4::Tcp, 443, option_words);
            let mut off2 = 0;
            assert_eq!(next_offset(&ihl, &pkt, 0, &mut off2), Some(want));
            assert_eq!(off2, 0, "eaten");
        }
        let hashed = link(Selector {
            hoff: 16,
            hmask: 0xff,
            ..Selector::default()
        });
        let pkt = Packet::new(dst, L4::Tcp, 443, 0);
        assert_eq!(bucket_of(&hashed, &pkt, 0, 256), Some(9));
        assert_eq!(bucket_of(&hashed, &pkt, 0, 1), Some(0), "one bucket");
        assert_eq!(bucket_of(&hashed, &pkt, 1000, 256), None, "past the end");
        let key = |val: u32| Key {
            mask: u32::MAX,
            val,
            off: 16,
            offmask: 0,
        };
        let entry = |val| {
            link(Selector {
                keys: vec![key(val)],
                ..Selector::default()
            })
        };
        assert_eq!(keys_match(&entry(0xc633_6409), &pkt, 0, 0), Some(true));
        assert_eq!(keys_match(&entry(0xc633_640a), &pkt, 0, 0), Some(false));
    }
}

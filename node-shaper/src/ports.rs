//! Port ranges as u32 value/mask blocks.

/// Splits the inclusive range `first..=last` into the fewest aligned blocks,
/// each matched by `(port & mask) == value`.
pub fn blocks(first: u16, last: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest power-of-two block aligned at `lo` that stays within `hi`.
        let mut size: u32 = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (!(size - 1) & 0xffff) as u16));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range over a small universe and a few large ones: the blocks
    /// cover exactly the range and never overlap.
    #[test]
    fn blocks_cover_exactly() {
        let check = |a: u16, b: u16| {
            let bl = blocks(a, b);
            let mut hits = vec![0u8; 65536];
            for &(v, m) in &bl {
                assert_eq!(v & m, v, "value not aligned for {a}-{b}");
                for p in 0..=65535u32 {
                    if (p as u16) & m == v {
                        hits[p as usize] += 1;
                    }
                }
            }
            for p in 0..=65535u32 {
                let want = u8::from(p >= u32::from(a) && p <= u32::from(b));
                assert_eq!(hits[p as usize], want, "port {p} for range {a}-{b}");
            }
            bl.len()
        };
        for a in 0..40u16 {
            for b in a..40u16 {
                check(a, b);
            }
        }
        assert_eq!(check(443, 443), 1);
        assert_eq!(check(8000, 8100), blocks(8000, 8100).len());
        assert_eq!(check(1, 65535), 16);
        assert_eq!(check(0, 65535), 1);
        assert_eq!(check(1024, 2047), 1);
    }

    #[test]
    fn known_decompositions() {
        assert_eq!(blocks(80, 80), vec![(80, 0xffff)]);
        assert_eq!(blocks(8000, 8007), vec![(8000, 0xfff8)]);
        // 8000 is 0x1f40: 64-aligned, so the first block spans 8000-8063.
        assert_eq!(
            blocks(8000, 8100),
            vec![
                (8000, 0xffc0),
                (8064, 0xffe0),
                (8096, 0xfffc),
                (8100, 0xffff)
            ]
        );
    }
}

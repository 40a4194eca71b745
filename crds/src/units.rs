//! tc's rate and size units, parsed the way iproute2 reads them.
//!
//! Rates are bits per second (`bit`, `kbit`, `mbit`, `gbit`, `tbit` with SI
//! multipliers, `kibit`, `mibit`, `gibit`, `tibit` with binary ones). Byte-rate
//! suffixes (`bps`, `kbps`, ...) are refused on purpose: tc reads them as bytes
//! per second, and people who write `mbps` almost always mean megabits.
//! Sizes are bytes with 1024-based multipliers (`b`, `k`/`kb`, `m`/`mb`, `g`/`gb`).

use std::fmt;

/// A rate in bits per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

impl Rate {
    /// A rate of `bits` bits per second.
    pub const fn from_bits_per_sec(bits: u64) -> Self {
        Rate(bits)
    }
    /// Bits per second.
    pub const fn bits_per_sec(self) -> u64 {
        self.0
    }
    /// Bytes per second, truncated like iproute2 does.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
}

impl fmt::Display for Rate {
    /// Prints the largest exact SI unit, as `tc` would accept it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (div, unit) in [
            (1_000_000_000_000, "tbit"),
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ] {
            if b >= div && b.is_multiple_of(div) {
                return write!(f, "{}{unit}", b / div);
            }
        }
        write!(f, "{b}bit")
    }
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    /// A size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Size(bytes)
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (div, unit) in [(1 << 30, "gb"), (1 << 20, "mb"), (1 << 10, "kb")] {
            if b >= div && b.is_multiple_of(div) {
                return write!(f, "{}{unit}", b / div);
            }
        }
        write!(f, "{b}b")
    }
}

/// Why a rate or size string was refused. The message completes the phrase
/// "`<field>: <value>` ...", so callers prefix the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing to parse.
    #[error("is empty; write a number with a unit, e.g. {example}")]
    Empty {
        /// An example of a valid value.
        example: &'static str,
    },
    /// The number part is missing or not a number.
    #[error("{value:?} does not start with a number; write e.g. {example}")]
    NotANumber {
        /// The rejected input.
        value: String,
        /// An example of a valid value.
        example: &'static str,
    },
    /// The unit is unknown.
    #[error("{value:?} has unknown unit {unit:?}; use one of {allowed}")]
    UnknownUnit {
        /// The rejected input.
        value: String,
        /// The unit as written.
        unit: String,
        /// The accepted units.
        allowed: &'static str,
    },
    /// A byte-per-second unit where tc users nearly always mean bits.
    #[error(
        "{value:?} uses {unit:?}, which tc reads as bytes per second ({bits} bit/s); \
         if you meant bits per second write {suggestion:?}"
    )]
    ByteRate {
        /// The rejected input.
        value: String,
        /// The unit as written.
        unit: String,
        /// What tc would have made of it, in bits per second.
        bits: u128,
        /// The same number with the bit unit.
        suggestion: String,
    },
    /// The value does not fit the kernel's fields.
    #[error("{value:?} is too large")]
    TooLarge {
        /// The rejected input.
        value: String,
    },
}

const RATE_UNITS: &str = "bit, kbit, mbit, gbit, tbit, kibit, mibit, gibit, tibit";
const SIZE_UNITS: &str = "b, k/kb, m/mb, g/gb";

/// Splits "12.5Mbit" into (12.5, "mbit").
fn split_number(s: &str) -> Option<(f64, String)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() {
        return None;
    }
    Some((n, unit.trim().to_ascii_lowercase()))
}

/// Parses a tc rate such as `20Mbit` or `1.5gbit`.
pub fn parse_rate(input: &str) -> Result<Rate, UnitError> {
    let s = input.trim();
    let example = "20Mbit";
    if s.is_empty() {
        return Err(UnitError::Empty { example });
    }
    let (n, unit) = split_number(s).ok_or_else(|| UnitError::NotANumber {
        value: input.to_string(),
        example,
    })?;
    let mult: f64 = match unit.as_str() {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        "kibit" => 1024.0,
        "mibit" => 1024.0 * 1024.0,
        "gibit" => 1024.0 * 1024.0 * 1024.0,
        "tibit" => 1024.0_f64.powi(4),
        "bps" | "kbps" | "mbps" | "gbps" | "tbps" | "kibps" | "mibps" | "gibps" | "tibps" => {
            let byte_mult = match unit.as_str() {
                "bps" => 1.0,
                "kbps" => 1e3,
                "mbps" => 1e6,
                "gbps" => 1e9,
                "tbps" => 1e12,
                "kibps" => 1024.0,
                "mibps" => 1024.0 * 1024.0,
                "gibps" => 1024.0 * 1024.0 * 1024.0,
                _ => 1024.0_f64.powi(4),
            };
            let num = &s[..s.len() - unit.len()].trim_end();
            let bit_unit = unit.replace("ps", "it");
            return Err(UnitError::ByteRate {
                value: input.to_string(),
                unit: s[s.len() - unit.len()..].to_string(),
                bits: (n * byte_mult * 8.0) as u128,
                suggestion: format!("{num}{bit_unit}"),
            });
        }
        _ => {
            return Err(UnitError::UnknownUnit {
                value: input.to_string(),
                unit: s[s.len() - unit.len()..].to_string(),
                allowed: RATE_UNITS,
            })
        }
    };
    let bits = (n * mult).round();
    if bits >= u64::MAX as f64 {
        return Err(UnitError::TooLarge {
            value: input.to_string(),
        });
    }
    Ok(Rate(bits as u64))
}

/// Parses a tc size such as `15k` or `1600b`.
pub fn parse_size(input: &str) -> Result<Size, UnitError> {
    let s = input.trim();
    let example = "15k";
    if s.is_empty() {
        return Err(UnitError::Empty { example });
    }
    let (n, unit) = split_number(s).ok_or_else(|| UnitError::NotANumber {
        value: input.to_string(),
        example,
    })?;
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1024.0,
        "m" | "mb" => 1024.0 * 1024.0,
        "g" | "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(UnitError::UnknownUnit {
                value: input.to_string(),
                unit: s[s.len() - unit.len()..].to_string(),
                allowed: SIZE_UNITS,
            })
        }
    };
    let bytes = (n * mult).round();
    if bytes >= u32::MAX as f64 {
        return Err(UnitError::TooLarge {
            value: input.to_string(),
        });
    }
    Ok(Size(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_tc() {
        for (s, bits) in [
            ("20Mbit", 20_000_000),
            ("20mbit", 20_000_000),
            ("1MBIT", 1_000_000),
            ("1kbit", 1_000),
            ("1.5gbit", 1_500_000_000),
            ("100", 100),
            ("100bit", 100),
            ("1Mibit", 1_048_576),
            ("2kibit", 2048),
            ("1gibit", 1_073_741_824),
            ("40Gbit", 40_000_000_000),
        ] {
            assert_eq!(parse_rate(s).map(Rate::bits_per_sec), Ok(bits), "{s}");
        }
        assert_eq!(parse_rate("20Mbit").map(Rate::bytes_per_sec), Ok(2_500_000));
    }

    #[test]
    fn byte_rates_are_refused_with_the_bit_unit_suggested() {
        let err = parse_rate("20mbps").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"20mbps\" uses \"mbps\", which tc reads as bytes per second (160000000 bit/s); \
             if you meant bits per second write \"20mbit\""
        );
        assert!(matches!(
            parse_rate("5Kbps"),
            Err(UnitError::ByteRate { .. })
        ));
        assert!(matches!(
            parse_rate("1bps"),
            Err(UnitError::ByteRate { .. })
        ));
    }

    #[test]
    fn bad_rates() {
        assert_eq!(
            parse_rate("fast").unwrap_err().to_string(),
            "\"fast\" does not start with a number; write e.g. 20Mbit"
        );
        assert!(matches!(
            parse_rate("10 furlongs"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_rate(""), Err(UnitError::Empty { .. })));
    }

    #[test]
    fn sizes_follow_tc() {
        for (s, bytes) in [
            ("15k", 15360),
            ("15kb", 15360),
            ("1600", 1600),
            ("1600b", 1600),
            ("1m", 1 << 20),
            ("2MB", 2 << 20),
        ] {
            assert_eq!(parse_size(s).map(Size::bytes), Ok(bytes), "{s}");
        }
        assert!(matches!(
            parse_size("1kbit"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for s in ["20mbit", "1kbit", "1500bit", "40gbit"] {
            assert_eq!(parse_rate(s).map(|r| r.to_string()), Ok(s.to_string()));
        }
        assert_eq!(Size::from_bytes(15360).to_string(), "15kb");
    }
}

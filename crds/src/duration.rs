//! Go-style durations as specs and flags write them (`30s`, `2m`, `1h30m`,
//! `500ms`): quarantine windows, cooldowns, the operator's retention.

use std::time::Duration;

/// Why a duration was refused. The message names the input as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not numbers each followed by a unit of ms, s, m or h.
    #[error("{input:?} is not a duration; write a number and a unit (ms, s, m, h), e.g. 30s, 2m or 1h30m")]
    NotADuration {
        /// The rejected input.
        input: String,
    },
    /// More than 366 days (or too large to compute).
    #[error("{input:?} is longer than a year")]
    TooLong {
        /// The rejected input.
        input: String,
    },
}

/// Parses a Go-style duration such as `30s`, `2m`, `1h30m` or `500ms`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    let bad = || DurationError::NotADuration {
        input: input.to_string(),
    };
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..end].parse().map_err(|_| bad())?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 366.0 * 86400.0 {
        return Err(DurationError::TooLong {
            input: input.to_string(),
        });
    }
    Ok(Duration::from_secs_f64(total))
}

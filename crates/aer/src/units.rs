//! Human units on the command line: sizes ("64M", "1GiB") and durations ("10s", "500ms").

use std::time::Duration;

/// Splits `s` (trimmed) into its leading whole number and the rest; `what` names the
/// expected form when there is no number.
fn number_and_unit<'a>(s: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n = num.parse().map_err(|_| format!("{s:?} is not {what}"))?;
    Ok((n, unit))
}

/// Parses a size in bytes: a number with an optional binary suffix K, M, G, T (also
/// written Ki/KiB/KB…, all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, suffix) = number_and_unit(s, "a size like 64M or 1G")?;
    let shift = match suffix
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches('B')
        .trim_end_matches('I')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration: a number with ms, s, m or h (plain numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s, "a duration like 10s")?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit (use ms, s, m or h)")),
    })
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2kb").unwrap(), 2048);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("1d").is_err());
        assert_eq!(parse_duration(" 7 ").unwrap(), Duration::from_secs(7));
        assert_eq!(
            parse_duration("s").unwrap_err(),
            r#""s" is not a duration like 10s"#
        );
        assert_eq!(
            parse_size("x").unwrap_err(),
            r#""x" is not a size like 64M or 1G"#
        );
    }
}

//! Times for people and scripts: RFC 3339 (UTC, milliseconds) in JSON, "3s ago" / "in 59m"
//! in tables. Our own few lines instead of a date crate: only UTC, only this one format.

use std::time::{SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction.
    (year, month as u32, day as u32)
}

/// (year, month, day) → days since 1970-01-01 (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `seconds.nanos` since the Unix epoch as `2026-12-02T00:45:41.123Z`.
pub fn rfc3339(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let ms = nanos.clamp(0, 999_999_999) / 1_000_000;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Reads back what [`rfc3339`] writes (and the same without fraction): seconds since the
/// epoch. Anything else is `None`.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let da: u32 = d.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let se: i64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: f64 = format!("0.{frac}").parse().ok()?;
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se;
    Some(secs as f64 + frac)
}

/// Seconds since the epoch, now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A span of `secs` seconds in its largest whole unit: `850ms`, `42s`, `5m`, `3h`, `2d`.
pub fn span(secs: f64) -> String {
    let s = secs.abs();
    if s < 1.0 {
        format!("{}ms", (s * 1000.0).round() as u64)
    } else if s < 120.0 {
        format!("{}s", s.floor() as u64)
    } else if s < 2.0 * 3600.0 {
        format!("{}m", (s / 60.0).floor() as u64)
    } else if s < 2.0 * 86_400.0 {
        format!("{}h", (s / 3600.0).floor() as u64)
    } else {
        format!("{}d", (s / 86_400.0).floor() as u64)
    }
}

/// `at` (seconds since the epoch) relative to `now`: `3s ago`, or `in 59m` for a time to
/// come (a certificate's expiry).
pub fn relative(at: f64, now: f64) -> String {
    if at <= now {
        format!("{} ago", span(now - at))
    } else {
        format!("in {}", span(at - now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_writes_utc_with_millis() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_796_140_602, 597_000_000),
            "2026-12-01T15:56:42.597Z"
        );
        // A leap day, and the last second of a century year that is not a leap year.
        assert_eq!(rfc3339(951_782_400, 5_000_000), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
        assert_eq!(rfc3339(-1, 0), "1969-12-31T23:59:59.000Z");
    }

    #[test]
    fn rfc3339_reads_back_what_it_writes() {
        for (s, n) in [
            (0, 0),
            (1_796_140_602, 597_000_000),
            (951_782_400, 5_000_000),
        ] {
            let text = rfc3339(s, n);
            let back = parse_rfc3339(&text).unwrap();
            assert!(
                (back - (s as f64 + f64::from(n) / 1e9)).abs() < 1e-6,
                "{text}"
            );
        }
        assert_eq!(parse_rfc3339("2026-12-01T15:56:42Z"), Some(1_796_140_602.0));
        for bad in [
            "",
            "12.005",
            "2026-12-01 16:36:42Z",
            "2026-13-01T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T00:00:00.Z",
            "2026-12-01T00:00:00+01:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn relative_times_pick_the_largest_unit() {
        assert_eq!(relative(100.0, 103.4), "3s ago");
        assert_eq!(relative(100.0, 100.25), "250ms ago");
        assert_eq!(relative(0.0, 600.0), "10m ago");
        assert_eq!(relative(0.0, 3.0 * 3600.0), "3h ago");
        assert_eq!(relative(0.0, 5.0 * 86_400.0), "5d ago");
        assert_eq!(relative(3600.0 + 59.0 * 60.0, 3600.0), "in 59m");
    }
}

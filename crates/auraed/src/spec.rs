//! Validated newtypes shared by every noun, and the error that names the bad field.
//!
//! Requests are parsed into these at the API edge (`TryFrom<proto>` in each noun's
//! `spec.rs`); domain code never sees raw proto strings or `Option`s.

use std::{fmt, time::Duration};

/// A request field that failed validation; becomes `INVALID_ARGUMENT` naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Longest label (RFC 1123).
pub const MAX_LABEL: usize = 63;
/// Deepest cell nesting.
pub const MAX_DEPTH: usize = 8;

/// One DNS label: `a-z0-9-`, 1..=63, not starting or ending with '-'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Label(String);

pub(crate) fn label_reason(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_LABEL {
        Some("is longer than 63 characters")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may contain only lowercase letters, digits and '-'")
    } else if s.starts_with('-') || s.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    }
}

impl Label {
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        match label_reason(s) {
            Some(r) => Err(FieldError::new(field, format!("{s:?} {r}"))),
            None => Ok(Self(s.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A label made from free text (a program's or an image's name): lowercase letters
    /// and digits kept, everything else '-', at most `max` characters (≤ 63), trimmed of
    /// '-'; `fallback` (a valid label) when nothing is left.
    pub fn sanitized(raw: &str, max: usize, fallback: &'static str) -> Self {
        let s: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(max.min(MAX_LABEL))
            .collect();
        let s = s.trim_matches('-');
        match label_reason(s) {
            None => Self(s.to_owned()),
            Some(_) => Self(fallback.to_owned()),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cell's path: labels joined by '/', e.g. `web` or `web/api`; at most 8 deep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CellName(String);

impl CellName {
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldError> {
        if s.is_empty() {
            return Err(FieldError::new(
                field,
                "is empty: name a cell such as \"web\" or \"web/api\"",
            ));
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(FieldError::new(
                field,
                format!("{s:?} is nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        for p in &parts {
            if let Some(r) = label_reason(p) {
                return Err(FieldError::new(
                    field,
                    format!("{s:?}: component {p:?} {r} (a cell path is DNS labels joined by '/')"),
                ));
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent cell, for a nested name.
    pub fn parent(&self) -> Option<CellName> {
        self.0.rsplit_once('/').map(|(p, _)| Self(p.to_owned()))
    }

    /// The cgroup path of executable `exe`'s own group below this cell (`web/_exe.api`):
    /// a path of the cgroup seam, not a cell any request can name ('_' is in no label, so
    /// it never clashes with a child cell or the cell's leaf).
    pub fn own_group(&self, exe: &Label) -> CellName {
        Self(format!("{}/{OWN_GROUP_PREFIX}{}", self.0, exe.as_str()))
    }
}

/// How an executable's own cgroup is named below its cell's (see [`CellName::own_group`]).
pub const OWN_GROUP_PREFIX: &str = "_exe.";

impl fmt::Display for CellName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An optional name prefix for lists and event filters: "" or a cell path, possibly
/// ending in a partial label (e.g. "team-a/ap").
pub fn name_prefix(field: &str, s: &str) -> Result<String, FieldError> {
    if s.is_empty() {
        return Ok(String::new());
    }
    if s.len() > MAX_DEPTH * (MAX_LABEL + 1)
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'/')
        || s.starts_with('/')
        || s.contains("//")
    {
        return Err(FieldError::new(
            field,
            format!("{s:?} is not a name prefix (lowercase letters, digits, '-' and '/')"),
        ));
    }
    Ok(s.to_owned())
}

/// Longest grace period or timeout a request may ask for.
pub const MAX_GRACE: Duration = Duration::from_secs(600);
/// Grace period when a request gives none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// A proto `Duration` that must be non-negative and at most `max`.
pub fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
    default: Duration,
    max: Duration,
) -> Result<Duration, FieldError> {
    let Some(d) = d else { return Ok(default) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(FieldError::new(field, "must be a non-negative duration"));
    }
    let v = Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs());
    if v > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {} s", max.as_secs()),
        ));
    }
    Ok(v)
}

/// A proto enum value that must be known to this auraed and, unless `allow_zero`, set.
pub fn known_enum<E: TryFrom<i32>>(field: &str, v: i32, allow_zero: bool) -> Result<E, FieldError> {
    if v == 0 && !allow_zero {
        return Err(FieldError::new(field, "must be set"));
    }
    E::try_from(v).map_err(|_| FieldError::new(field, format!("unknown value {v}")))
}

/// The largest uid or gid a workload may run as: no user namespace maps ids, so ids from
/// 2³¹ on are refused (negative to many kernel and libc paths), and `4294967295` is the
/// "-1" that set*id reads as "leave unchanged" (it would keep auraed's uid 0).
pub const MAX_ID: u32 = (1 << 31) - 1;

/// Most arguments or environment entries of a process (plain or a container's).
pub const MAX_ENTRIES: usize = 4096;
/// Most bytes of argv plus env together (the kernel's own limit is larger; this bounds memory).
pub const MAX_ARG_BYTES: usize = 256 * 1024;

/// The bytes [`MAX_ARG_BYTES`] bounds: each argument with its NUL, each variable as
/// `name=value` with its NUL.
pub fn arg_bytes<'a>(
    args: impl IntoIterator<Item = &'a String>,
    env: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> usize {
    args.into_iter().map(|a| a.len() + 1).sum::<usize>()
        + env
            .into_iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
}

/// A uid or gid as the kernel will use it: 0 to [`MAX_ID`].
pub fn id(field: &str, v: u32) -> Result<u32, FieldError> {
    if v > MAX_ID {
        return Err(FieldError::new(
            field,
            format!(
                "{v} is not a valid id: ids run from 0 to {MAX_ID} ({} is \"-1\", which set*id reads as \"unchanged\")",
                u32::MAX
            ),
        ));
    }
    Ok(v)
}

/// An absolute host or guest path from a request: no NUL, no `..` component.
pub fn abs_path(field: &str, s: &str) -> Result<std::path::PathBuf, FieldError> {
    if s.is_empty() {
        return Err(FieldError::new(field, "is empty: give an absolute path"));
    }
    if !s.starts_with('/') {
        return Err(FieldError::new(
            field,
            format!("{s:?} is not an absolute path"),
        ));
    }
    if s.contains('\0') || s.len() > 4096 {
        return Err(FieldError::new(
            field,
            "contains NUL or is longer than 4096 bytes",
        ));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(FieldError::new(
            field,
            format!("{s:?} contains a '..' component"),
        ));
    }
    Ok(std::path::PathBuf::from(s))
}

/// Names read back from a record are validated again, as if a client had sent them.
impl<'de> serde::Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Label::parse("label", &s).map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for CellName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CellName::parse("cell name", &s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_cell_names() {
        assert!(Label::parse("f", "web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a/b", &"a".repeat(64)] {
            assert!(Label::parse("f", bad).is_err(), "{bad:?}");
        }
        let n = CellName::parse("cell", "web/api").unwrap();
        assert_eq!(n.parent().unwrap().as_str(), "web");
        for bad in [
            "",
            "/web",
            "web/",
            "web//api",
            "web/../etc",
            "..",
            ".",
            "a/b/c/d/e/f/g/h/i",
        ] {
            let e = CellName::parse("cell", bad).unwrap_err();
            assert_eq!(e.field, "cell");
        }
    }

    #[test]
    fn durations_and_prefixes() {
        let d = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(duration("g", Some(&d), DEFAULT_GRACE, MAX_GRACE).is_err());
        let d = prost_types::Duration {
            seconds: 601,
            nanos: 0,
        };
        assert!(duration("g", Some(&d), DEFAULT_GRACE, MAX_GRACE).is_err());
        assert_eq!(
            duration("g", None, DEFAULT_GRACE, MAX_GRACE).unwrap(),
            DEFAULT_GRACE
        );
        assert!(name_prefix("p", "team-a/ap").is_ok());
        assert!(name_prefix("p", "../x").is_err());
    }
}

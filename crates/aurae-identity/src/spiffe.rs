//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), parsed per the SPIFFE ID specification.

use std::{fmt, str::FromStr};

/// The longest SPIFFE ID we accept, in bytes (the specification's limit).
pub const MAX_LEN: usize = 2048;

/// A validated SPIFFE ID with a non-empty path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte index where the path (starting with '/') begins.
    path_at: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    Scheme,
    #[error("a SPIFFE ID is at most {MAX_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "the trust domain {0:?} may contain only lowercase letters, digits, '.', '-' and '_' (no port, user or upper case)"
    )]
    TrustDomainChars(String),
    #[error("the path is empty: an identity needs a path such as /operator/admin")]
    EmptyPath,
    #[error(
        "path segment {0:?} is empty, '.' or '..', or has characters other than letters, digits, '.', '-', '_'"
    )]
    Segment(String),
}

fn trust_domain_ok(td: &str) -> bool {
    td.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// Builds `spiffe://<trust_domain><path>`; `path` starts with '/'.
    pub fn new(trust_domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}{path}").parse()
    }

    /// Checks that a trust domain name is valid on its own.
    pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if !trust_domain_ok(td) {
            return Err(SpiffeIdError::TrustDomainChars(td.to_owned()));
        }
        Ok(())
    }

    /// The trust domain, e.g. `aurae.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.path_at]
    }

    /// The path, starting with '/', e.g. `/operator/admin`.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Self::validate_trust_domain(td)?;
        if path.is_empty() || path == "/" {
            return Err(SpiffeIdError::EmptyPath);
        }
        // `path` starts with '/'; every segment after it must be valid (this also rejects
        // a trailing '/', '//' , '?query' and '#fragment').
        for seg in path[1..].split('/') {
            if !segment_ok(seg) {
                return Err(SpiffeIdError::Segment(seg.to_owned()));
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_at: "spiffe://".len() + td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id: SpiffeId = "spiffe://aurae.local/operator/admin".parse().unwrap();
        assert_eq!(id.trust_domain(), "aurae.local");
        assert_eq!(id.path(), "/operator/admin");
        assert_eq!(id.to_string(), "spiffe://aurae.local/operator/admin");
        assert!("spiffe://td/a.b-c_d/E9".parse::<SpiffeId>().is_ok());
    }

    #[test]
    fn rejects_invalid_ids() {
        let bad = [
            ("", SpiffeIdError::Scheme),
            ("https://aurae.local/x", SpiffeIdError::Scheme),
            ("SPIFFE://aurae.local/x", SpiffeIdError::Scheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://aurae.local", SpiffeIdError::EmptyPath),
            ("spiffe://aurae.local/", SpiffeIdError::EmptyPath),
        ];
        for (s, e) in bad {
            assert_eq!(s.parse::<SpiffeId>().unwrap_err(), e, "{s}");
        }
        for s in [
            "spiffe://Aurae.local/x",
            "spiffe://aurae.local:443/x",
            "spiffe://user@aurae.local/x",
            "spiffe://aurae.local/x/",
            "spiffe://aurae.local//x",
            "spiffe://aurae.local/./x",
            "spiffe://aurae.local/../x",
            "spiffe://aurae.local/x?y",
            "spiffe://aurae.local/x#y",
            "spiffe://aurae.local/x y",
        ] {
            assert!(s.parse::<SpiffeId>().is_err(), "{s} must be rejected");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        assert_eq!(
            long.parse::<SpiffeId>().unwrap_err(),
            SpiffeIdError::TooLong
        );
    }
}

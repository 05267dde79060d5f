//! Error chains printed for people: each cause once.
//!
//! `{:#}` on an error chain prints every source after its parent, but many errors already
//! put their source in their own message (`cannot reach auraed at X: {source}`), and some
//! wrap an error that says the same thing again (tonic's `transport error` around hyper's
//! around the io error), so the same words came out two or three times.

use std::error::Error;

/// `err` and its sources joined by `: `, leaving out a source whose text the line already
/// holds.
pub fn chain_text(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot reach auraed at {0}: {1}")]
        Connect(&'static str, #[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Outer::Connect("127.0.0.1:1", Middle(io));
        assert_eq!(
            chain_text(&e),
            "cannot reach auraed at 127.0.0.1:1: transport error: connection refused"
        );
        let plain = std::io::Error::other("disk full");
        assert_eq!(chain_text(&plain), "disk full");
    }
}

//! What upstream registries' HTTP answers say, read the same way
//! everywhere: headers (`Docker-Content-Digest`, `Retry-After`, `Link`,
//! `WWW-Authenticate` challenges), bodies read whole under a cap, and
//! transport errors with their causes; and what a request to upstream
//! can come to (`UpstreamError`).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue, RETRY_AFTER};

use crate::oci::Digest;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream rate limit reached")]
    RateLimited { retry_after: Option<u64> },
    #[error("upstream denied access: {0}")]
    Denied(String),
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    #[error("upstream unreachable: {0}")]
    Transport(String),
    #[error("upstream sent invalid data: {0}")]
    Invalid(String),
    /// (`blob_location` only) upstream redirected the blob here.
    #[error("upstream redirected to {0}")]
    Redirected(String),
}

pub type Result<T, E = UpstreamError> = std::result::Result<T, E>;

pub(super) fn accept_header(types: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&types.join(", ")) {
        h.insert(ACCEPT, v);
    }
    h
}

pub(super) fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

pub(super) fn header_digest(h: &HeaderMap) -> Result<Option<Digest>> {
    match header_str(h, "docker-content-digest") {
        None => Ok(None),
        Some(d) => Digest::parse(d.trim()).map(Some).map_err(|e| UpstreamError::Invalid(e.message.into_owned())),
    }
}

pub(super) fn retry_after(h: &HeaderMap) -> Option<u64> {
    header_str(h, RETRY_AFTER.as_str()).and_then(|v| v.trim().parse().ok())
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Parses `Bearer realm="...",service="...",scope="a,b"` (quoted values may
/// hold commas). The scheme is lowercased.
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        // RFC 9110 allows whitespace after the `=` (`realm = "..."`).
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        params.insert(key, value);
    }
    (scheme.to_ascii_lowercase(), params)
}

/// The `last` query parameter of a `Link: <...?last=x&n=y>; rel="next"` header.
pub(super) fn link_last(link: &str) -> Option<String> {
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let url = url::Url::parse("http://upstream").ok()?.join(target).ok()?;
    url.query_pairs().find(|(k, _)| k == "last").map(|(_, v)| v.into_owned())
}

/// A response body read whole, but never more than `cap` bytes: a larger
/// one (declared or sent) is upstream misbehaving, not the client's answer.
pub(super) async fn read_capped(resp: reqwest::Response, cap: usize, what: &str) -> Result<Bytes> {
    let too_large = || UpstreamError::Invalid(format!("{what} larger than {} KiB", cap / 1024));
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Transport(e.to_string()))?;
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_keep_quoted_commas() {
        let (scheme, p) =
            parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#);
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (scheme, p) = parse_challenge(r#"Basic realm=registry"#);
        assert_eq!(scheme, "basic");
        assert_eq!(p["realm"], "registry");
        let (_, p) = parse_challenge(r#"Bearer realm = "https://auth.example/token" , scope= "a,b""#);
        assert_eq!((p["realm"].as_str(), p["scope"].as_str()), ("https://auth.example/token", "a,b"), "whitespace around =");
    }

    #[test]
    fn link_headers_yield_the_next_page() {
        assert_eq!(link_last(r#"</v2/library/a/tags/list?last=v2&n=2>; rel="next""#), Some("v2".into()));
        assert_eq!(link_last("garbage"), None);
    }
}

//! `GET|HEAD /_hubcap/blobs/sha256/<hex>?expires=&sig=`: the blob bytes
//! behind the embedded backend's signed URLs (its stand-in for S3
//! presigned URLs), with `Range` support.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use tower::ServiceExt;

use super::{AppState, header_value, query_param};
use crate::oci::{Digest, ErrorCode, RegistryError};
use crate::storage::BlobStore;
use crate::storage::local::BLOB_URL_PREFIX;

/// Bytes read from a blob's file per chunk sent: fewer trips to the
/// blocking pool than the default 64 KiB, for that much memory per download.
const SERVE_CHUNK: usize = 256 << 10;

/// `GET|HEAD /_hubcap/blobs/sha256/<hex>?expires=&sig=`: the blob's bytes
/// (with `Range`) for a valid, unexpired signature; 403 `DENIED` otherwise;
/// 503 when the file has gone (it is then fetched again).
pub(super) async fn local_blob(State(state): State<AppState>, req: Request) -> Result<Response, RegistryError> {
    let store = state.local_blobs.as_ref().ok_or_else(|| RegistryError::code(ErrorCode::Unsupported))?;
    let hex = req.uri().path().strip_prefix(BLOB_URL_PREFIX).unwrap_or("");
    let digest = Digest::parse(&format!("sha256:{hex}"))?;
    let query = req.uri().query().unwrap_or("");
    let expires = query_param(query, "expires").and_then(|e| e.parse::<i64>().ok()).unwrap_or(0);
    let sig = query_param(query, "sig").unwrap_or_default();
    if !store.verify(&digest, expires, &sig) {
        return Err(RegistryError::new(ErrorCode::Denied, "blob URL signature invalid or expired"));
    }
    let path = store.path(&digest);
    if store.stored_here(&digest).await == Some(false) {
        // Gone since the redirect: fetched again; the client's retry of the
        // blob's /v2/ URL waits for it.
        state.mirror.blob_lost(&digest, None).await?;
        return Err(RegistryError::new(ErrorCode::Unavailable, "the blob is being fetched again").with_retry_after(Some(1)));
    }
    let mut req = req;
    let etag = format!("\"{digest}\"");
    // `If-Range` names the representation the client holds part of: a
    // range only of that one (our strong ETag); any other validator (or
    // date) gets the whole blob, as RFC 9110 says.
    if let Some(validator) = req.headers_mut().remove(header::IF_RANGE)
        && validator.as_bytes() != etag.as_bytes()
    {
        req.headers_mut().remove(header::RANGE);
    }
    if let Some(range) = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned) {
        let len = std::fs::metadata(&path).map(|m| m.len()).map_err(|_| RegistryError::code(ErrorCode::BlobUnknown))?;
        if !range_to_honour(&range, len) {
            req.headers_mut().remove(header::RANGE);
        }
    }
    let served = tower_http::services::ServeFile::new(path)
        .with_buf_chunk_size(SERVE_CHUNK)
        .oneshot(req)
        .await
        .map_err(|e| RegistryError::code(ErrorCode::Unknown).with_internal(e))?;
    if served.status() == StatusCode::NOT_FOUND {
        return Err(RegistryError::code(ErrorCode::BlobUnknown));
    }
    let mut resp = served.map(Body::new);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert("docker-content-digest", header_value(digest.as_str()));
    resp.headers_mut().insert(header::ETAG, header_value(&etag));
    Ok(resp)
}

/// Whether a `Range` header is one to answer with a part (206, or 416 when
/// it starts past the end): a single `bytes=` range, written as `ServeFile`
/// parses it (no spaces, no leading zeros; it answers 416 to anything else).
/// Anything else is ignored and the whole blob served, as RFC 9110 allows:
/// a header that does not parse, several ranges, a suffix longer than the
/// blob (which RFC 9110 says means all of it), or any range of an empty
/// blob (`ServeFile` would answer `bytes=0-` with a 206 `bytes 0-0/0`).
/// Public for the property tests (`tests/fuzz.rs`), which serve what it
/// decides.
pub fn range_to_honour(range: &str, len: u64) -> bool {
    if len == 0 {
        return false;
    }
    let Some(spec) = range.strip_prefix("bytes=") else { return false };
    if spec.contains(',') {
        return false;
    }
    let Some((first, last)) = spec.split_once('-') else { return false };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    let num = |s: &str| digits(s).then(|| s.parse::<u64>().ok()).flatten();
    match (first.is_empty(), num(first), num(last)) {
        // `-N`: the last N bytes; N at least the length is all of it.
        (true, _, Some(n)) => n < len,
        (false, Some(_), None) if last.is_empty() => true,
        (false, Some(a), Some(b)) => a <= b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::range_to_honour;

    #[test]
    fn only_a_single_satisfiable_byte_range_is_honoured() {
        assert!(range_to_honour("bytes=10-19", 100));
        assert!(range_to_honour("bytes=90-", 100));
        assert!(range_to_honour("bytes=-10", 100));
        assert!(range_to_honour("bytes=200-300", 100), "past the end: a 416, as the RFC says");
        assert!(!range_to_honour("bytes=-100", 100), "a suffix as long as the blob: all of it");
        assert!(!range_to_honour("bytes=-5000", 100));
        assert!(!range_to_honour("bytes=0-1,5-6", 100), "several ranges: ignored");
        assert!(!range_to_honour("bytes=abc", 100));
        assert!(!range_to_honour("items=0-1", 100));
        assert!(!range_to_honour("bytes=5-1", 100));
        assert!(!range_to_honour("bytes=-", 100));
        assert!(!range_to_honour("bytes=0-0", 0) && !range_to_honour("bytes=0-", 0), "an empty blob: all of it");
        for unparsed in ["bytes=01-2", "bytes=1-02", "bytes=-05", "bytes= 1-2", "bytes=1-2 ", " bytes=1-2"] {
            assert!(!range_to_honour(unparsed, 100), "{unparsed:?}: ServeFile would answer 416");
        }
    }
}

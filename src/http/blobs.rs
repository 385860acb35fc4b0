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
use crate::storage::local::BLOB_URL_PREFIX;

/// `GET|HEAD /_hubcap/blobs/sha256/<hex>?expires=&sig=`: the blob's bytes
/// (with `Range`) for a valid, unexpired signature; 403 `DENIED` otherwise.
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
    let served = tower_http::services::ServeFile::new(store.path(&digest))
        .oneshot(req)
        .await
        .map_err(|e| RegistryError::code(ErrorCode::Unknown).with_internal(e))?;
    if served.status() == StatusCode::NOT_FOUND {
        return Err(RegistryError::code(ErrorCode::BlobUnknown));
    }
    let mut resp = served.map(Body::new);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert("docker-content-digest", header_value(digest.as_str()));
    Ok(resp)
}

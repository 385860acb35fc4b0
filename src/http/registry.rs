//! The OCI pull routes under `/v2/<name>/...`: names have any depth, so
//! the path is parsed from the right (`.../manifests/<ref>`,
//! `.../blobs/<digest>`, `.../tags/list`); each handler calls the `Mirror`
//! and shapes its answer (headers, status, the blob wait's self-redirect).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;

use super::{AppState, header_value, query_param};
use crate::mirror::BlobAnswer;
use crate::observe::CacheStatus;
use crate::oci::{Accept, Digest, ErrorCode, Reference, RegistryError, RepoPath};

/// Query parameter counting self-redirects while a blob is still fetched.
const WAIT_PARAM: &str = "hubcap-wait";
/// Self-redirects before a still-pending blob gets a 503.
const MAX_WAIT_REDIRECTS: u32 = 5;

enum Route<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Upload,
    Tags,
}

/// Splits `<name>/<endpoint>` from the right, so names may have any depth.
fn parse_route(rest: &str) -> Result<(&str, Route<'_>), RegistryError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Route::Tags));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Ok((name, Route::Manifest(reference)));
    }
    if let Some((name, _)) = rest.split_once("/blobs/uploads") {
        return Ok((name, Route::Upload));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Ok((name, Route::Blob(digest)));
    }
    Err(RegistryError::new(ErrorCode::Unsupported, "a pull-through mirror serves only manifests, blobs and tag lists"))
}

/// Every `/v2/<name>/...` request.
pub(super) async fn dispatch(State(state): State<AppState>, req: Request) -> Result<Response, RegistryError> {
    let method = req.method().clone();
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let rest = path.strip_prefix("/v2/").unwrap_or(path);
    let (name, route) = parse_route(rest)?;
    let read_only = method == Method::GET || method == Method::HEAD;
    if matches!(route, Route::Upload) || !read_only {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            format!("{method} is not supported: this registry is a read-only pull-through mirror"),
        ));
    }
    let repo = RepoPath::resolve(name, query_param(query, "ns").as_deref())?;
    state.access.check_repo(&repo)?;
    let head = method == Method::HEAD;
    match route {
        Route::Manifest(reference) => manifest(&state, &repo, reference, req.headers(), head).await,
        Route::Blob(digest) => {
            let digest = Digest::parse(digest)?;
            if head {
                blob_head(&state, &repo, &digest).await
            } else {
                let retries = retries_layers(req.headers());
                blob_get(&state, &repo, &digest, path, query, retries).await
            }
        }
        Route::Tags => tags(&state, &repo, name, query, head).await,
        Route::Upload => unreachable!("refused above"),
    }
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`: 200 with the exact bytes,
/// `Docker-Content-Digest`, `Content-Type`, `Content-Length`; 404
/// `MANIFEST_UNKNOWN` when neither cache nor upstream has it in a type the
/// client accepts.
async fn manifest(state: &AppState, repo: &RepoPath, reference: &str, headers: &HeaderMap, head: bool) -> Result<Response, RegistryError> {
    // No manifest has a name that is not a tag: a pull of one is a manifest
    // that does not exist (404), as the spec says; `TAG_INVALID` is a push's.
    let reference = Reference::parse(reference).map_err(|e| match e.code {
        ErrorCode::TagInvalid => RegistryError::new(ErrorCode::ManifestUnknown, e.message),
        _ => e,
    })?;
    let accept = Accept::parse(headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()));
    let (m, cache) = state.mirror.manifest(repo, &reference, &accept).await?;
    let len = m.body.len();
    let body = if head { Body::empty() } else { Body::from(m.body) };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&m.media_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert("docker-content-digest", header_value(m.digest.as_str()));
    h.insert(header::ETAG, header_value(&format!("\"{}\"", m.digest)));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// `GET /v2/<name>/blobs/<digest>`: 307 to a short-lived URL of the stored
/// blob. While the blob is still being fetched after the bounded wait, a 307
/// back to this URL keeps the client waiting here instead of failing over.
async fn blob_get(
    state: &AppState,
    repo: &RepoPath,
    digest: &Digest,
    path: &str,
    query: &str,
    retries: bool,
) -> Result<Response, RegistryError> {
    let (answer, cache) = state.mirror.blob_for(repo, digest, retries).await?;
    let location = match answer {
        BlobAnswer::Ready(url) | BlobAnswer::Elsewhere(url) => url,
        // A cold blob copied by this process: its bytes as they come.
        BlobAnswer::Follow(follow) => {
            let size = follow.size;
            let mut resp = Response::new(Body::from_stream(follow.into_stream()));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            if let Some(size) = size {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            }
            h.insert("docker-content-digest", header_value(digest.as_str()));
            h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
            resp.extensions_mut().insert(cache);
            return Ok(resp);
        }
        // The client waits outside, in its own retry pause.
        BlobAnswer::Later(secs) => {
            return Err(RegistryError::new(ErrorCode::Unavailable, format!("{digest} is still being fetched from upstream"))
                .with_retry_after(Some(secs)));
        }
        BlobAnswer::Pending => {
            let waited: u32 = query_param(query, WAIT_PARAM).and_then(|w| w.parse().ok()).unwrap_or(0);
            if waited >= MAX_WAIT_REDIRECTS {
                return Err(RegistryError::new(ErrorCode::Unavailable, format!("{digest} is still being fetched from upstream"))
                    .with_retry_after(Some(10)));
            }
            let mut q: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| k != WAIT_PARAM)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            q.push((WAIT_PARAM.to_owned(), (waited + 1).to_string()));
            let q = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(q).finish();
            format!("{path}?{q}")
        }
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&location));
    h.insert("docker-content-digest", header_value(digest.as_str()));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// Whether the client tries a failed layer download again: Docker's daemon
/// does (6 tries, pauses of 5 to 25 s; its User-Agent starts `docker/`);
/// podman, skopeo and containerd do not (measured: `tests/docker.rs`).
fn retries_layers(headers: &HeaderMap) -> bool {
    headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).is_some_and(|ua| ua.starts_with("docker/"))
}

/// `HEAD /v2/<name>/blobs/<digest>`: 200 with `Content-Length` and
/// `Docker-Content-Digest`; 404 `BLOB_UNKNOWN`.
async fn blob_head(state: &AppState, repo: &RepoPath, digest: &Digest) -> Result<Response, RegistryError> {
    let (size, cache) = state.mirror.blob_size(repo, digest).await?;
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert("docker-content-digest", header_value(digest.as_str()));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// `GET /v2/<name>/tags/list?n=&last=`: upstream's list, with a `Link` to
/// the next page that points back at this mirror.
async fn tags(state: &AppState, repo: &RepoPath, name: &str, query: &str, head: bool) -> Result<Response, RegistryError> {
    let n = match query_param(query, "n") {
        None => None,
        Some(n) => Some(n.parse::<u32>().map_err(|_| RegistryError::code(ErrorCode::PaginationNumberInvalid))?),
    };
    let last = query_param(query, "last");
    let page = state.mirror.tags(repo, n, last.as_deref()).await?;
    let len = page.body.len();
    let mut resp = Response::new(if head { Body::empty() } else { Body::from(page.body) });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(next) = page.next_last {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = n {
            q.append_pair("n", &n.to_string());
        }
        q.append_pair("last", &next);
        if let Some(ns) = query_param(query, "ns") {
            q.append_pair("ns", &ns);
        }
        h.insert(header::LINK, header_value(&format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish())));
    }
    resp.extensions_mut().insert(CacheStatus::Pass);
    Ok(resp)
}

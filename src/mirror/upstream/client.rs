//! The HTTP client for upstream registries (reqwest with rustls).
//!
//! It owns the registry token flow (`WWW-Authenticate: Bearer realm,service,
//! scope`, anonymous or with credentials, tokens cached until they expire),
//! retries with backoff for idempotent requests, `429 Retry-After`, following
//! blob redirects to a CDN (and no other redirect: `limits`), time limits on
//! every request, and the last `ratelimit-remaining` seen. It verifies
//! nothing about content: the service and the fetcher do.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use super::Credentials;
use super::limits::{Destinations, PublicResolver, UpstreamLimits};
use super::wire::{
    Result, UpstreamError, accept_header, error_chain, header_digest, header_str, link_last, parse_challenge, read_capped, retry_after,
};
use crate::mirror::deadline;
use crate::oci::{Digest, MAX_MANIFEST_BYTES, RepoPath};

/// Most upstream tokens kept (one per repository scope).
const AUTH_SCOPES: usize = 1024;

/// Most tags asked of upstream per page.
pub const TAG_PAGE: u32 = 1000;
/// Largest tag list page read from upstream (a thousand tags of the longest
/// names the spec allows is about 130 KiB).
const MAX_TAG_LIST_BYTES: usize = 1024 * 1024;

/// Largest token response read (a registry's JWT is a few KiB).
const MAX_TOKEN_BYTES: usize = 256 * 1024;

/// Longest `Retry-After` the mirror waits out itself before giving up.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// How persistent a request is.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub attempts: u32,
    /// Wait out a 429's `Retry-After` (when short) instead of failing.
    pub wait_rate_limit: bool,
}

impl Retry {
    /// For fetches a client is waiting on: a few tries with backoff.
    pub const FETCH: Retry = Retry { attempts: 3, wait_rate_limit: true };
    /// For re-validation that has a cached answer to fall back on: one try.
    pub const ONCE: Retry = Retry { attempts: 1, wait_rate_limit: false };
}

/// A manifest as upstream sent it.
#[derive(Debug)]
pub struct UpstreamManifest {
    pub body: Bytes,
    pub content_type: Option<String>,
    /// Upstream's `Docker-Content-Digest`, when it sent one.
    pub digest: Option<Digest>,
}

/// A page of upstream's tag list.
#[derive(Debug)]
pub struct TagsPage {
    pub body: Bytes,
    /// The `last` parameter of upstream's next page, if there is one.
    pub next_last: Option<String>,
}

/// What a request fetches: a small answer read whole, or a blob streamed.
#[derive(Clone, Copy)]
enum Kind {
    Small(&'static str),
    Blob,
}

struct CachedAuth {
    header: HeaderValue,
    /// When it stops being sent, in `storage::now()` seconds: the clock tests
    /// move, so a token's expiry is tested without waiting for it.
    expires: i64,
}

/// One upstream registry.
pub struct Upstream {
    pub registry: String,
    base: String,
    /// Built on first use: loading TLS roots is the slowest part of a
    /// start-up, and a warm mirror may never need upstream. `http` follows no
    /// redirect; `blob_http` follows those `destinations` allow.
    http: std::sync::OnceLock<reqwest::Client>,
    blob_http: std::sync::OnceLock<reqwest::Client>,
    limits: Arc<UpstreamLimits>,
    destinations: Arc<Destinations>,
    credentials: Option<Credentials>,
    /// Authorization header per scope, until it expires; at most
    /// `AUTH_SCOPES` of them (least recently used go first), however many
    /// repositories clients ask for.
    auth: Mutex<lru::LruCache<String, CachedAuth>>,
    ratelimit_remaining: AtomicI64,
    /// When it was reported (Unix seconds).
    ratelimit_seen_at: AtomicI64,
    requests: AtomicU64,
    rate_limited: AtomicU64,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream").field("registry", &self.registry).field("base", &self.base).finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        registry: &str,
        base_url: &str,
        credentials: Option<Credentials>,
        limits: Arc<UpstreamLimits>,
        destinations: Arc<Destinations>,
    ) -> Result<Upstream, String> {
        let url = url::Url::parse(base_url).map_err(|e| format!("upstream {registry}: invalid URL {base_url:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("upstream {registry}: URL must be http or https"));
        }
        Ok(Upstream {
            registry: registry.to_owned(),
            base: base_url.trim_end_matches('/').to_owned(),
            http: std::sync::OnceLock::new(),
            blob_http: std::sync::OnceLock::new(),
            limits,
            destinations,
            credentials,
            auth: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(AUTH_SCOPES).expect("non-zero"))),
            ratelimit_remaining: AtomicI64::new(-1),
            ratelimit_seen_at: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        })
    }

    fn client(redirect: reqwest::redirect::Policy) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .user_agent(concat!("hubcap/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            // A redirect target (a CDN) learns nothing of the registry URL.
            .referer(false)
            .redirect(redirect)
    }

    /// Builds both HTTP clients now rather than on first use: each build
    /// loads the system's root certificates, tens of milliseconds that a
    /// cold pull's first requests would otherwise wait for.
    pub(super) fn prepare(&self) {
        self.http();
        self.blob_http();
    }

    /// For tokens, manifests, tag lists and `HEAD`s: no redirect is followed.
    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            Self::client(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(PublicResolver(self.destinations.clone())))
                .build()
                .expect("the HTTP client has a TLS backend")
        })
    }

    /// For blob downloads: Docker Hub answers them with a 307 to its CDN;
    /// reqwest drops our Authorization header when the host changes.
    fn blob_http(&self) -> &reqwest::Client {
        self.blob_http.get_or_init(|| {
            Self::client(self.destinations.redirect_policy())
                .dns_resolver(Arc::new(PublicResolver(self.destinations.clone())))
                .build()
                .expect("the HTTP client has a TLS backend")
        })
    }

    /// The registry's base URL (`https://registry-1.docker.io`).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn limits(&self) -> &UpstreamLimits {
        &self.limits
    }

    /// The last `ratelimit-remaining` upstream reported, if any.
    pub fn ratelimit_remaining(&self) -> Option<i64> {
        let v = self.ratelimit_remaining.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }

    /// The last `ratelimit-remaining` upstream reported and when (Unix seconds).
    pub fn ratelimit_seen(&self) -> Option<(i64, i64)> {
        self.ratelimit_remaining().map(|n| (n, self.ratelimit_seen_at.load(Ordering::Relaxed)))
    }

    /// `429 Too Many Requests` answers received so far.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Requests sent upstream so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn url(&self, repo: &RepoPath, tail: &str) -> String {
        format!("{}/v2/{}/{}", self.base, repo.name, tail)
    }

    pub async fn get_manifest(&self, repo: &RepoPath, reference: &str, accept: &[&str], retry: Retry) -> Result<UpstreamManifest> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let resp = self.send(Method::GET, &url, repo, accept_header(accept), retry, Kind::Small("manifest")).await?;
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str());
        let digest = header_digest(resp.headers())?;
        let body = read_capped(resp, MAX_MANIFEST_BYTES, "manifest").await?;
        Ok(UpstreamManifest { body, content_type, digest })
    }

    /// `HEAD` a manifest: its digest and media type, without a body (Docker
    /// Hub does not count HEADs against the pull limit). `None` when upstream
    /// has no such manifest.
    pub async fn head_manifest(&self, repo: &RepoPath, reference: &str, accept: &[&str], retry: Retry) -> Result<Option<(Digest, String)>> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        match self.send(Method::HEAD, &url, repo, accept_header(accept), retry, Kind::Small("manifest HEAD")).await {
            Ok(resp) => {
                let digest = header_digest(resp.headers())?
                    .ok_or_else(|| UpstreamError::Invalid("manifest HEAD without Docker-Content-Digest".into()))?;
                let media_type = header_str(resp.headers(), CONTENT_TYPE.as_str()).unwrap_or_default();
                Ok(Some((digest, media_type)))
            }
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `HEAD` a blob in `repo`: its size, or `None` when the repository does
    /// not contain it.
    /// `HEAD` a blob: `None` when upstream does not have it; otherwise the
    /// size upstream declared, if it did (unknown is not zero).
    pub async fn head_blob(&self, repo: &RepoPath, digest: &Digest, retry: Retry) -> Result<Option<Option<u64>>> {
        match self
            .send(Method::HEAD, &self.url(repo, &format!("blobs/{digest}")), repo, HeaderMap::new(), retry, Kind::Small("blob HEAD"))
            .await
        {
            Ok(resp) => Ok(Some(header_str(resp.headers(), CONTENT_LENGTH.as_str()).and_then(|l| l.parse().ok()))),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET` bytes `start..=end` of a blob, following redirects: `206` when
    /// upstream honours the range, `200` (the whole blob) when it does not.
    pub async fn get_blob_range(&self, repo: &RepoPath, digest: &Digest, start: u64, end: u64, retry: Retry) -> Result<reqwest::Response> {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RANGE, HeaderValue::from_str(&format!("bytes={start}-{end}")).expect("a valid header"));
        self.send(Method::GET, &self.url(repo, &format!("blobs/{digest}")), repo, h, retry, Kind::Blob).await
    }

    /// Where upstream sends a client for a blob: the `Location` of its blob
    /// redirect (Docker Hub's goes to its CDN), when it redirects to a place
    /// a redirect may lead (`Destinations`); `None` when it serves the
    /// bytes itself (its body is not read).
    pub async fn blob_location(&self, repo: &RepoPath, digest: &Digest) -> Result<Option<String>> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        match self.send(Method::GET, &url, repo, HeaderMap::new(), Retry::ONCE, Kind::Small("blob location")).await {
            Ok(_) => Ok(None),
            Err(UpstreamError::Redirected(location)) => {
                let target =
                    url::Url::parse(&url).and_then(|base| base.join(&location)).map_err(|e| UpstreamError::Invalid(e.to_string()))?;
                match self.destinations.check_redirect(&target) {
                    Ok(()) => Ok(Some(target.to_string())),
                    Err(_) => Ok(None),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// `GET` a blob, following redirects; the body is the caller's to stream.
    pub async fn get_blob(&self, repo: &RepoPath, digest: &Digest, retry: Retry) -> Result<reqwest::Response> {
        self.send(Method::GET, &self.url(repo, &format!("blobs/{digest}")), repo, HeaderMap::new(), retry, Kind::Blob).await
    }

    /// One page of a repository's tags: at most `TAG_PAGE` of them, however
    /// many the client asked for (the spec lets a registry answer fewer, with
    /// a `Link` to the rest), and at most `MAX_TAG_LIST_BYTES`.
    pub async fn tags(&self, repo: &RepoPath, n: Option<u32>, last: Option<&str>, retry: Retry) -> Result<TagsPage> {
        let mut url = url::Url::parse(&self.url(repo, "tags/list")).map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("n", &n.unwrap_or(TAG_PAGE).min(TAG_PAGE).to_string());
            if let Some(last) = last {
                q.append_pair("last", last);
            }
        }
        let url = url.to_string().trim_end_matches('?').to_owned();
        let resp = self.send(Method::GET, &url, repo, HeaderMap::new(), retry, Kind::Small("tag list")).await?;
        let next_last = header_str(resp.headers(), "link").and_then(|l| link_last(&l));
        let body = read_capped(resp, MAX_TAG_LIST_BYTES, "tag list").await?;
        Ok(TagsPage { body, next_last })
    }

    /// Sends a request with auth and retries; returns a 2xx response. A
    /// small answer must be complete within the window, retries included; a
    /// blob's headers must arrive within it (its body is timed by the reader).
    async fn send(
        &self,
        method: Method,
        url: &str,
        repo: &RepoPath,
        headers: HeaderMap,
        retry: Retry,
        kind: Kind,
    ) -> Result<reqwest::Response> {
        let scope = format!("repository:{}:pull", repo.name);
        // The window, or less when the client's request must be answered
        // sooner (a Lambda front end's limit: `deadline`).
        let deadline = deadline::by(self.limits.window);
        let limit = deadline.saturating_duration_since(Instant::now());
        let late = || UpstreamError::Transport(format!("no complete answer within {limit:.1?}"));
        let mut authenticated = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = if matches!(kind, Kind::Blob) { self.blob_http() } else { self.http() };
            let mut req = client.request(method.clone(), url).headers(headers.clone());
            if let Kind::Small(_) = kind {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(late());
                }
                req = req.timeout(left);
            }
            if let Some(auth) = self.cached_auth(&scope) {
                req = req.header(AUTHORIZATION, auth);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let sent = match tokio::time::timeout_at(deadline.into(), req.send()).await {
                Ok(sent) => sent,
                Err(_) => return Err(late()),
            };
            let failure = match sent {
                Ok(resp) => {
                    self.note_ratelimit(resp.headers());
                    let status = resp.status();
                    if status.is_success() {
                        return Ok(resp);
                    }
                    match status {
                        StatusCode::NOT_FOUND => return Err(UpstreamError::NotFound),
                        StatusCode::UNAUTHORIZED if !authenticated => {
                            let challenge = header_str(resp.headers(), WWW_AUTHENTICATE.as_str()).unwrap_or_default();
                            match tokio::time::timeout_at(deadline.into(), self.authenticate(&challenge, &scope, repo)).await {
                                Ok(done) => done?,
                                Err(_) => return Err(late()),
                            }
                            authenticated = true;
                            attempt -= 1; // the challenge round-trip is not a failure
                            continue;
                        }
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                            return Err(UpstreamError::Denied(format!("HTTP {}", status.as_u16())));
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            self.rate_limited.fetch_add(1, Ordering::Relaxed);
                            let after = retry_after(resp.headers());
                            let wait = Duration::from_secs(after.unwrap_or(1));
                            if !retry.wait_rate_limit
                                || attempt >= retry.attempts
                                || wait > MAX_RETRY_AFTER
                                || Instant::now() + wait >= deadline
                            {
                                return Err(UpstreamError::RateLimited { retry_after: after });
                            }
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        s if s.is_server_error() => UpstreamError::Status(s.as_u16()),
                        s if s.is_redirection() && matches!(kind, Kind::Small("blob location")) => {
                            let location = header_str(resp.headers(), reqwest::header::LOCATION.as_str()).unwrap_or_default();
                            return Err(UpstreamError::Redirected(location));
                        }
                        s if s.is_redirection() => {
                            let what = match kind {
                                Kind::Small(what) => what,
                                Kind::Blob => "blob",
                            };
                            return Err(UpstreamError::Invalid(format!(
                                "upstream redirected a {what} request (HTTP {}); only blob downloads may be redirected",
                                s.as_u16()
                            )));
                        }
                        s => return Err(UpstreamError::Status(s.as_u16())),
                    }
                }
                Err(e) if e.is_redirect() => return Err(UpstreamError::Invalid(error_chain(&e))),
                Err(e) => UpstreamError::Transport(error_chain(&e)),
            };
            let pause = Duration::from_millis(200 << (attempt - 1).min(4));
            if attempt >= retry.attempts || Instant::now() + pause >= deadline {
                return Err(failure);
            }
            tokio::time::sleep(pause).await;
        }
    }

    fn cached_auth(&self, scope: &str) -> Option<HeaderValue> {
        let mut map = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        map.get(scope).filter(|a| a.expires > crate::storage::now()).map(|a| a.header.clone())
    }

    /// Answers a 401 challenge: a bearer token from the realm, or basic auth.
    async fn authenticate(&self, challenge: &str, scope: &str, repo: &RepoPath) -> Result<()> {
        let (scheme, params) = parse_challenge(challenge);
        let header = match scheme.as_str() {
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| UpstreamError::Invalid("bearer challenge without realm".into()))?;
                let mut realm_url = url::Url::parse(realm).map_err(|e| UpstreamError::Invalid(format!("token realm: {e}")))?;
                // A token realm over plain http would expose credentials; only
                // an upstream that is itself configured over http may use one.
                if realm_url.scheme() != "https" && !(realm_url.scheme() == "http" && self.base.starts_with("http://")) {
                    return Err(UpstreamError::Invalid(format!("token realm must be https, got {realm_url}")));
                }
                // Nor may a 401 send the mirror (and its credentials) inside.
                self.destinations.check_redirect(&realm_url).map_err(|why| UpstreamError::Invalid(format!("token realm {why}")))?;
                {
                    let mut q = realm_url.query_pairs_mut();
                    if let Some(service) = params.get("service") {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", scope);
                }
                let mut req = self.http().get(realm_url).timeout(self.limits.window);
                if let Some(c) = &self.credentials {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                self.requests.fetch_add(1, Ordering::Relaxed);
                let resp = req.send().await.map_err(|e| UpstreamError::Transport(error_chain(&e)))?;
                self.note_ratelimit(resp.headers());
                match resp.status() {
                    s if s.is_success() => {}
                    StatusCode::TOO_MANY_REQUESTS => return Err(UpstreamError::RateLimited { retry_after: retry_after(resp.headers()) }),
                    s if s.is_server_error() => return Err(UpstreamError::Status(s.as_u16())),
                    s => return Err(UpstreamError::Denied(format!("token endpoint answered HTTP {} for {repo}", s.as_u16()))),
                }
                let raw = read_capped(resp, MAX_TOKEN_BYTES, "token response").await?;
                let token: TokenResponse =
                    serde_json::from_slice(&raw).map_err(|e| UpstreamError::Invalid(format!("token response: {e}")))?;
                let value =
                    token.token.or(token.access_token).ok_or_else(|| UpstreamError::Invalid("token response without token".into()))?;
                // (Bounded: an absurd `expires_in` must not overflow the clock.)
                let ttl = token.expires_in.unwrap_or(60).clamp(10, 24 * 3600);
                // Refresh a little before upstream's expiry.
                let expires = crate::storage::now() + (ttl - ttl / 10) as i64;
                (
                    HeaderValue::from_str(&format!("Bearer {value}"))
                        .map_err(|_| UpstreamError::Invalid("token is not a header value".into()))?,
                    expires,
                )
            }
            "basic" => {
                let c = self.credentials.as_ref().ok_or_else(|| UpstreamError::Denied("upstream wants credentials".into()))?;
                let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| UpstreamError::Invalid("credentials".into()))?;
                v.set_sensitive(true);
                (v, crate::storage::now() + 3600)
            }
            _ => return Err(UpstreamError::Denied(format!("unsupported auth challenge {scheme:?}"))),
        };
        let (mut value, expires) = header;
        value.set_sensitive(true);
        self.auth.lock().unwrap_or_else(|p| p.into_inner()).put(scope.to_owned(), CachedAuth { header: value, expires });
        Ok(())
    }

    fn note_ratelimit(&self, headers: &HeaderMap) {
        if let Some(v) = header_str(headers, "ratelimit-remaining")
            && let Ok(n) = v.split(';').next().unwrap_or("").trim().parse::<i64>()
        {
            self.ratelimit_seen_at.store(crate::storage::now(), Ordering::Relaxed);
            self.ratelimit_remaining.store(n, Ordering::Relaxed);
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn upstream_tokens_are_kept_for_a_bounded_number_of_scopes() {
        let u = Upstream::new("docker.io", "http://127.0.0.1:9", None, Arc::default(), Arc::default()).unwrap();
        for i in 0..(AUTH_SCOPES * 3) {
            let header = HeaderValue::from_static("Bearer t");
            let expires = crate::storage::now() + 3600;
            u.auth.lock().unwrap().put(format!("repository:r{i}:pull"), CachedAuth { header, expires });
        }
        assert_eq!(u.auth.lock().unwrap().len(), AUTH_SCOPES);
        assert!(u.cached_auth(&format!("repository:r{}:pull", AUTH_SCOPES * 3 - 1)).is_some(), "the newest stay");
        assert!(u.cached_auth("repository:r0:pull").is_none(), "the oldest went");
    }

    use super::*;

    /// A token realm on loopback that answers every request with `answer`,
    /// and counts them.
    async fn token_realm(answer: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        let app = axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { answer }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), asked)
    }

    #[tokio::test]
    async fn a_token_realm_over_plain_http_is_refused_for_an_https_upstream() {
        // No https upstream runs here (no certificate the client trusts):
        // the 401 challenge is answered directly, the same for an upstream
        // over https and one over http, with the same realm allowed as a
        // destination. Only the upstream's scheme differs.
        let (realm, asked) = token_realm(r#"{"token":"t","expires_in":300}"#).await;
        let destinations = Arc::new(Destinations::new([realm.as_str()], &[]).unwrap());
        let challenge = format!(r#"Bearer realm="{realm}/token",service="registry""#);
        let repo = RepoPath::resolve("alpine", None).unwrap();
        let scope = "repository:library/alpine:pull";
        let https = Upstream::new("docker.io", "https://127.0.0.1:9", None, Arc::default(), destinations.clone()).unwrap();
        let err = https.authenticate(&challenge, scope, &repo).await.unwrap_err();
        assert!(matches!(&err, UpstreamError::Invalid(why) if why.contains("token realm must be https")), "{err:?}");
        assert_eq!(asked.load(Ordering::SeqCst), 0, "the realm was never asked");
        assert!(https.cached_auth(scope).is_none());

        let http = Upstream::new("docker.io", "http://127.0.0.1:9", None, Arc::default(), destinations).unwrap();
        http.authenticate(&challenge, scope, &repo).await.unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 1, "an upstream configured over http may use an http realm");
        assert_eq!(http.cached_auth(scope).unwrap(), "Bearer t");
    }

    #[tokio::test]
    async fn a_token_that_claims_to_live_forever_is_kept_a_day_at_most() {
        let (realm, _) = token_realm(r#"{"token":"t","expires_in":18446744073709551615}"#).await;
        let destinations = Arc::new(Destinations::new([realm.as_str()], &[]).unwrap());
        let u = Upstream::new("docker.io", "http://127.0.0.1:9", None, Arc::default(), destinations).unwrap();
        let scope = "repository:library/alpine:pull";
        let challenge = format!(r#"Bearer realm="{realm}/token""#);
        u.authenticate(&challenge, scope, &RepoPath::resolve("alpine", None).unwrap()).await.unwrap();
        let expires = u.auth.lock().unwrap().get(scope).unwrap().expires - crate::storage::now();
        assert!((77_759..=77_760).contains(&expires), "kept {expires} s: nine tenths of a day");
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credentials { username: "me".into(), password: "s3cret".into() };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}

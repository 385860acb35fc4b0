//! `hubcap check URL`: verifies a deployed (or local) mirror end to end, the
//! way container clients use it, and diagnoses the front end in front of
//! it: the API base; the credentials challenge (does `WWW-Authenticate`
//! reach clients?); a manifest (and the platform manifest of an index) by
//! `GET` and by `HEAD` (does a `HEAD` keep its size, and does it carry a
//! digest that makes containerd trust that size?); a blob's `HEAD`; the
//! blob redirect followed to its target (S3), timed, and the bytes verified.
//! Each failure says which setting fixes it; the run goes on after a
//! diagnosis so that one run reports every problem. Exit status 1 on any
//! failure.

use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, HeaderMap, HeaderValue, LOCATION, WWW_AUTHENTICATE};

use crate::oci::{Digest, MANIFEST_TYPES, split_image};

pub struct CheckOptions {
    pub url: String,
    /// `repo:tag` or `repo@digest`.
    pub image: String,
    /// `user:password` for a mirror that requires client credentials.
    pub credentials: Option<String>,
    pub timeout: Duration,
}

/// The header a Lambda front end renames a function's `name` to.
fn remapped(name: &str) -> String {
    format!("x-amzn-remapped-{name}")
}

/// What fixes each problem, by the template parameter and the variable.
const FIX_HEAD: &str = "HeadAnswers=without-digest (HUBCAP_HEAD_ANSWERS=without-digest on the api function), so that clients GET instead";
const FIX_CHALLENGE: &str = "the challenge never reaches clients behind this front end, so no client can send credentials: remove ClientCredentialsSecretArn and admit \
     clients by network (AllowedClientCidrs), or use EndpointType=HttpApi, whose answers AWS documents as not rewritten, and check again";

struct Step(Instant);

impl Step {
    fn start() -> Step {
        Step(Instant::now())
    }
    fn ms(&self) -> String {
        format!("{:.0} ms", self.0.elapsed().as_secs_f64() * 1000.0)
    }
}

/// A run of the check: its clients and what it found wrong so far.
struct Checker {
    base: String,
    /// To the mirror: no redirects followed, credentials when given.
    mirror: reqwest::Client,
    /// To the mirror, with nothing added (the anonymous first request).
    anonymous: reqwest::Client,
    /// To redirect targets (S3): no mirror credentials there.
    plain: reqwest::Client,
    failures: Vec<String>,
}

/// A manifest as the mirror served it.
struct Served {
    body: bytes::Bytes,
    digest: Digest,
}

/// Runs the check, printing as it goes; true when the mirror works.
pub async fn check(opts: &CheckOptions) -> bool {
    let base = opts.url.trim_end_matches('/').to_owned();
    let total = Step::start();
    let mut checker = match Checker::new(opts, &base) {
        Ok(c) => c,
        Err(why) => {
            println!("FAIL  {base}: {why}");
            return false;
        }
    };
    let summary = checker.run(opts).await;
    match (summary, checker.failures.is_empty()) {
        (Ok(summary), true) => {
            println!("PASS  {base} serves {}: everything answered in {}{summary}", opts.image, total.ms());
            true
        }
        (result, _) => {
            if let Err(why) = result {
                checker.fail(why);
            }
            println!("FAIL  {base}: {} problem(s): {}", checker.failures.len(), checker.failures.join("; "));
            false
        }
    }
}

impl Checker {
    fn new(opts: &CheckOptions, base: &str) -> Result<Checker, String> {
        let url = reqwest::Url::parse(base).map_err(|_| {
            format!("{base:?} is not a URL: give the mirror's URL with its scheme, e.g. http://127.0.0.1:5000 or https://<id>.lambda-url.<region>.on.aws")
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{base:?}: the mirror's URL must start with http:// or https://"));
        }
        let mut headers = HeaderMap::new();
        if let Some(c) = &opts.credentials {
            use base64::Engine as _;
            let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c));
            let mut v = HeaderValue::from_str(&v).map_err(|_| "bad credentials")?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let client = |headers: HeaderMap, redirect: reqwest::redirect::Policy| {
            reqwest::Client::builder().redirect(redirect).timeout(opts.timeout).default_headers(headers).build().map_err(|e| e.to_string())
        };
        Ok(Checker {
            base: base.to_owned(),
            mirror: client(headers, reqwest::redirect::Policy::none())?,
            anonymous: client(HeaderMap::new(), reqwest::redirect::Policy::none())?,
            plain: client(HeaderMap::new(), reqwest::redirect::Policy::default())?,
            failures: Vec::new(),
        })
    }

    /// A problem found, with its fix; the check goes on.
    fn fail(&mut self, why: String) {
        println!("FAIL  {why}");
        self.failures.push(why.split_once("\n").map_or(why.clone(), |(first, _)| first.to_owned()));
    }

    async fn run(&mut self, opts: &CheckOptions) -> Result<String, String> {
        self.api_base().await?;
        self.challenge(opts.credentials.is_some()).await?;
        let (repo, reference) = split_image(&opts.image);
        let (repo, reference) = (repo.to_owned(), reference.to_owned());
        let mut served = self.manifest(&repo, &reference).await?;
        self.head_manifest(&repo, &reference, &served).await;
        let v: serde_json::Value = serde_json::from_slice(&served.body).map_err(|e| format!("manifest is not JSON: {e}"))?;
        if let Some(children) = v.get("manifests").and_then(|m| m.as_array()) {
            let child = children
                .iter()
                .find(|c| c["platform"]["os"] == "linux" && c["platform"]["architecture"] == "amd64")
                .or(children.first())
                .ok_or("the index lists no manifests")?;
            let d = child["digest"].as_str().ok_or("index entry without digest")?.to_owned();
            served = self.manifest(&repo, &d).await?;
        }
        let v: serde_json::Value = serde_json::from_slice(&served.body).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let config = v["config"]["digest"].as_str().ok_or("the image manifest has no config")?.to_owned();
        let size = v["config"]["size"].as_u64();
        self.head_blob(&repo, &config, size).await;
        self.blob(&repo, &config).await?;
        Ok(self.headroom().await)
    }

    async fn api_base(&mut self) -> Result<(), String> {
        let step = Step::start();
        let resp = self.mirror.get(format!("{}/v2/", self.base)).send().await.map_err(|e| format!("/v2/ unreachable: {e}"))?;
        if resp.status() == 401 {
            let renamed = resp.headers().contains_key(remapped("www-authenticate").as_str());
            return Err(match renamed {
                true => format!(
                    "/v2/ answered 401 and the front end renamed its challenge (x-amzn-Remapped-WWW-Authenticate)\n      fix: {FIX_CHALLENGE}"
                ),
                false => "/v2/ answered 401: the mirror requires client credentials (--credentials USER:PASSWORD)".to_owned(),
            });
        }
        if resp.status() != 200 {
            return Err(format!("/v2/ answered {}", resp.status()));
        }
        if resp.headers().get("docker-distribution-api-version").is_none() {
            return Err("/v2/ lacks Docker-Distribution-API-Version".into());
        }
        println!("ok    GET /v2/  {}", step.ms());
        Ok(())
    }

    /// With credentials: does an anonymous client get a challenge it can
    /// answer? Docker, containerd and podman send credentials only then.
    async fn challenge(&mut self, credentials: bool) -> Result<(), String> {
        if !credentials {
            return Ok(());
        }
        let resp = self.anonymous.get(format!("{}/v2/", self.base)).send().await.map_err(|e| format!("/v2/ unreachable: {e}"))?;
        let h = resp.headers();
        match (resp.status().as_u16(), h.get(WWW_AUTHENTICATE), h.get(remapped("www-authenticate").as_str())) {
            (401, Some(c), _) => println!("ok    challenge reaches clients: {}", c.to_str().unwrap_or("?")),
            (401, None, Some(_)) => self.fail(format!(
                "the front end renames the credentials challenge to x-amzn-Remapped-WWW-Authenticate\n      fix: {FIX_CHALLENGE}"
            )),
            (401, None, None) => {
                self.fail("an anonymous /v2/ is refused without a WWW-Authenticate challenge: clients never send credentials".into())
            }
            (status, _, _) => println!("info  the mirror answers /v2/ without credentials ({status}): it does not require them"),
        }
        Ok(())
    }

    async fn manifest(&mut self, repo: &str, reference: &str) -> Result<Served, String> {
        let step = Step::start();
        let resp = self
            .mirror
            .get(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header(ACCEPT, MANIFEST_TYPES.join(", "))
            .send()
            .await
            .map_err(|e| format!("manifest {repo}:{reference}: {e}"))?;
        let status = resp.status();
        let cache = resp.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let claimed = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| format!("manifest {repo}:{reference}: {e}"))?;
        if status != 200 {
            return Err(format!("manifest {repo}:{reference} answered {status}: {}", String::from_utf8_lossy(&body)));
        }
        let digest = Digest::of(&body);
        if claimed.as_deref() != Some(digest.as_str()) {
            return Err(format!("manifest {repo}:{reference}: Docker-Content-Digest {claimed:?} does not match its bytes ({digest})"));
        }
        println!("ok    manifest {repo}:{reference} -> {digest}  {}  (cache: {cache})", step.ms());
        Ok(Served { body, digest })
    }

    /// A manifest's `HEAD` against its `GET`: what containerd resolves with.
    async fn head_manifest(&mut self, repo: &str, reference: &str, served: &Served) {
        let head = self
            .mirror
            .head(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header(ACCEPT, MANIFEST_TYPES.join(", "))
            .send()
            .await;
        let what = format!("HEAD manifest {repo}:{reference}");
        match head {
            Ok(resp) if resp.status() == 200 => self.judge_head(&what, resp.headers(), served.body.len() as u64, Some(&served.digest)),
            Ok(resp) => self.fail(format!("{what} answered {} where GET answered 200", resp.status())),
            Err(e) => self.fail(format!("{what}: {e}")),
        }
    }

    async fn head_blob(&mut self, repo: &str, digest: &str, size: Option<u64>) {
        let what = format!("HEAD blob {digest}");
        match self.mirror.head(format!("{}/v2/{repo}/blobs/{digest}", self.base)).send().await {
            Ok(resp) if resp.status() == 200 => match size {
                Some(size) => self.judge_head(&what, resp.headers(), size, Digest::parse(digest).ok().as_ref()),
                None => println!("info  {what}: the manifest gives no size to compare with"),
            },
            Ok(resp) => self.fail(format!("{what} answered {}", resp.status())),
            Err(e) => self.fail(format!("{what}: {e}")),
        }
    }

    /// Whether a `HEAD` answer is safe for clients: a size that is not the
    /// content's, next to a digest, fails containerd's pulls ("reports
    /// content size of zero") and sends Docker to Docker Hub.
    fn judge_head(&mut self, what: &str, h: &HeaderMap, size: u64, digest: Option<&Digest>) {
        let length = h.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let renamed = h.get(remapped("content-length").as_str()).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let said = match (&length, &renamed) {
            (Some(l), Some(r)) => {
                format!("Content-Length {l}, the mirror's {r} renamed to x-amzn-Remapped-Content-Length by the front end")
            }
            (Some(l), None) => format!("Content-Length {l}"),
            (None, _) => "no Content-Length".to_owned(),
        };
        let kept = length == Some(size);
        match h.get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            Some(d) if digest.is_some_and(|want| want.as_str() != d) => {
                self.fail(format!("{what}: Docker-Content-Digest {d} is not the content's ({})", digest.map(|d| d.as_str()).unwrap_or("?")))
            }
            Some(_) if kept => println!("ok    {what}: {said}, with its digest"),
            Some(_) => self.fail(format!(
                "{what}: {said} for {size} bytes, next to Docker-Content-Digest: containerd (Kubernetes nodes, nerdctl, BuildKit) fails \
                 every pull (\"reports content size of zero\") and Docker falls back to Docker Hub\n      fix: {FIX_HEAD}"
            )),
            None if kept => println!(
                "ok    {what}: {said} without a digest (clients GET the content); this front end keeps a HEAD's size: HeadAnswers=full \
                 would save containerd one request per pull"
            ),
            None => println!("ok    {what}: {said} for {size} bytes, without a digest: clients GET the content instead of trusting it"),
        }
    }

    /// The blob redirect, followed (self-redirects while it is fetched) to
    /// its target, timed, the bytes verified.
    async fn blob(&mut self, repo: &str, digest: &str) -> Result<(), String> {
        let step = Step::start();
        let base = self.base.clone();
        let resp = self.mirror.get(format!("{base}/v2/{repo}/blobs/{digest}")).send().await.map_err(|e| format!("blob {digest}: {e}"))?;
        if resp.status() != 307 {
            return Err(format!("blob {digest} answered {}, expected a 307 redirect", resp.status()));
        }
        let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or("blob redirect without Location")?.to_owned();
        let target = if location.starts_with('/') { format!("{base}{location}") } else { location };
        let host = reqwest::Url::parse(&target).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        println!("ok    blob {digest} -> 307 to {host}  {}", step.ms());

        let step = Step::start();
        let client = if target.starts_with(&base) { &self.mirror } else { &self.plain };
        let mut resp = client.get(&target).send().await.map_err(|e| format!("redirect target unreachable: {e}"))?;
        let mut hops = 0;
        while resp.status() == 307 && hops < 10 {
            let next = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let next = if next.starts_with('/') { format!("{base}{next}") } else { next };
            let client = if next.starts_with(&base) { &self.mirror } else { &self.plain };
            resp = client.get(&next).send().await.map_err(|e| format!("redirect target unreachable: {e}"))?;
            hops += 1;
        }
        if !resp.status().is_success() {
            return Err(format!("the redirect target answered {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| format!("blob download: {e}"))?;
        if Digest::of(&bytes).as_str() != digest {
            return Err(format!("the blob downloaded from {host} does not match {digest}"));
        }
        println!("ok    blob download {} bytes from {host}, digest verified  {}", bytes.len(), step.ms());
        Ok(())
    }

    /// Docker Hub's headroom, when the mirror reports it.
    async fn headroom(&self) -> String {
        let mut headroom = String::new();
        if let Ok(resp) = self.mirror.get(format!("{}/_hubcap/stats", self.base)).send().await
            && let Ok(body) = resp.bytes().await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            for u in v["upstreams"].as_array().into_iter().flatten() {
                if let Some(n) = u["ratelimit_remaining"].as_i64() {
                    println!("info  upstream {}: {n} pulls left in its rate-limit window", u["registry"].as_str().unwrap_or("?"));
                    headroom = format!(", upstream headroom {n}");
                }
            }
        }
        headroom
    }
}

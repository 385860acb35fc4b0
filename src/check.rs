//! `hubcap check URL`: verifies a deployed (or local) mirror end to end, the
//! way a container client uses it: the API base, a manifest (and the
//! platform manifest of an index), the blob redirect, and that the redirect
//! target really serves the blob's bytes. Prints each step with its timing,
//! the upstream rate-limit headroom when the mirror reports it, and a
//! verdict line; fails with a non-zero exit.

use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, LOCATION};

use crate::oci::{Digest, MANIFEST_TYPES, split_image};

pub struct CheckOptions {
    pub url: String,
    /// `repo:tag` or `repo@digest`.
    pub image: String,
    /// `user:password` for a mirror that requires client credentials.
    pub credentials: Option<String>,
    pub timeout: Duration,
}

struct Step(Instant);

impl Step {
    fn start() -> Step {
        Step(Instant::now())
    }
    fn ms(&self) -> String {
        format!("{:.0} ms", self.0.elapsed().as_secs_f64() * 1000.0)
    }
}

/// Runs the check, printing as it goes; true when the mirror works.
pub async fn check(opts: &CheckOptions) -> bool {
    let base = opts.url.trim_end_matches('/').to_owned();
    match run(opts, &base).await {
        Ok(summary) => {
            println!("PASS  {base} serves {}: {summary}", opts.image);
            true
        }
        Err(why) => {
            println!("FAIL  {base}: {why}");
            false
        }
    }
}

async fn run(opts: &CheckOptions, base: &str) -> Result<String, String> {
    let mut headers = HeaderMap::new();
    if let Some(c) = &opts.credentials {
        use base64::Engine as _;
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c));
        let mut v = HeaderValue::from_str(&v).map_err(|_| "bad credentials")?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
    }
    let mirror = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(opts.timeout)
        .default_headers(headers)
        .build()
        .map_err(|e| e.to_string())?;
    // The redirect target is another host (S3): no mirror credentials there.
    let plain = reqwest::Client::builder().timeout(opts.timeout).build().map_err(|e| e.to_string())?;
    let total = Step::start();

    let step = Step::start();
    let resp = mirror.get(format!("{base}/v2/")).send().await.map_err(|e| format!("/v2/ unreachable: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("/v2/ answered {}", resp.status()));
    }
    if resp.headers().get("docker-distribution-api-version").is_none() {
        return Err("/v2/ lacks Docker-Distribution-API-Version".into());
    }
    println!("ok    GET /v2/  {}", step.ms());

    let (repo, reference) = split_image(&opts.image);
    let (repo, reference) = (repo.to_owned(), reference.to_owned());
    let get_manifest = |reference: String| {
        let (mirror, base, repo) = (mirror.clone(), base.to_owned(), repo.clone());
        async move {
            let step = Step::start();
            let resp = mirror
                .get(format!("{base}/v2/{repo}/manifests/{reference}"))
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
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("manifest is not JSON: {e}"))?;
            Ok::<_, String>(v)
        }
    };
    let mut manifest = get_manifest(reference.clone()).await?;
    if let Some(children) = manifest.get("manifests").and_then(|m| m.as_array()).cloned() {
        let child = children
            .iter()
            .find(|c| c["platform"]["os"] == "linux" && c["platform"]["architecture"] == "amd64")
            .or(children.first())
            .ok_or("the index lists no manifests")?;
        let d = child["digest"].as_str().ok_or("index entry without digest")?.to_owned();
        manifest = get_manifest(d).await?;
    }
    let config = manifest["config"]["digest"].as_str().ok_or("the image manifest has no config")?.to_owned();

    let step = Step::start();
    let resp = mirror.get(format!("{base}/v2/{repo}/blobs/{config}")).send().await.map_err(|e| format!("blob {config}: {e}"))?;
    if resp.status() != 307 {
        return Err(format!("blob {config} answered {}, expected a 307 redirect", resp.status()));
    }
    let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or("blob redirect without Location")?.to_owned();
    let target = if location.starts_with('/') { format!("{base}{location}") } else { location };
    let host = reqwest::Url::parse(&target).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    println!("ok    blob {config} -> 307 to {host}  {}", step.ms());

    let step = Step::start();
    // Self-redirects mean the blob is still being fetched: follow them.
    let client = if target.starts_with(base) { &mirror } else { &plain };
    let mut resp = client.get(&target).send().await.map_err(|e| format!("redirect target unreachable: {e}"))?;
    let mut hops = 0;
    while resp.status() == 307 && hops < 10 {
        let next = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let next = if next.starts_with('/') { format!("{base}{next}") } else { next };
        resp = mirror.get(&next).send().await.map_err(|e| format!("redirect target unreachable: {e}"))?;
        hops += 1;
    }
    if !resp.status().is_success() {
        return Err(format!("the redirect target answered {}", resp.status()));
    }
    let bytes = resp.bytes().await.map_err(|e| format!("blob download: {e}"))?;
    if Digest::of(&bytes).as_str() != config {
        return Err(format!("the blob downloaded from {host} does not match {config}"));
    }
    println!("ok    blob download {} bytes, digest verified  {}", bytes.len(), step.ms());

    let mut headroom = String::new();
    if let Ok(resp) = mirror.get(format!("{base}/_hubcap/stats")).send().await
        && let Ok(body) = resp.bytes().await
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        {
            for u in v["upstreams"].as_array().into_iter().flatten() {
                if let Some(n) = u["ratelimit_remaining"].as_i64() {
                    println!("info  upstream {}: {n} pulls left in its rate-limit window", u["registry"].as_str().unwrap_or("?"));
                    headroom = format!(", upstream headroom {n}");
                }
            }
        }
    }
    Ok(format!("everything answered in {}{headroom}", total.ms()))
}

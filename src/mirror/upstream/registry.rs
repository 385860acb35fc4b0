//! The configured upstream registries, built from `--upstream` values, and
//! the back-off that keeps the mirror from asking one that just failed.
//! Anything not configured is refused: the mirror is never an open proxy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::limits::{Destinations, UpstreamLimits};
use super::{Credentials, Upstream};
use crate::observe::UpstreamTally;
use crate::observe::prometheus::UpstreamStat;
use crate::oci::{DOCKER_HUB, ErrorCode, RegistryError, canonical_registry};

/// Docker Hub's registry endpoint, the default upstream.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

/// The configured upstream registries. Anything else is refused: the mirror
/// is never an open proxy.
#[derive(Debug, Default)]
pub struct Upstreams {
    by_registry: HashMap<String, Arc<Upstream>>,
    /// Registries that failed recently, until when.
    backoff: Mutex<HashMap<String, Instant>>,
}

impl Upstreams {
    pub fn new(list: impl IntoIterator<Item = Upstream>) -> Upstreams {
        Upstreams { by_registry: list.into_iter().map(|u| (u.registry.clone(), Arc::new(u))).collect(), backoff: Mutex::default() }
    }

    /// [`Upstream::prepare`] for each, on the blocking pool: called at
    /// start, off the first request's path.
    pub fn prepare(self: &Arc<Self>) {
        let all = self.clone();
        tokio::task::spawn_blocking(move || all.by_registry.values().for_each(|u| u.prepare()));
    }

    pub fn get(&self, registry: &str) -> Result<&Arc<Upstream>, RegistryError> {
        self.by_registry
            .get(registry)
            .ok_or_else(|| RegistryError::new(ErrorCode::Denied, format!("registry {registry} is not configured on this mirror")))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_registry.values()
    }

    /// What all upstream clients did since start-up, for the statistics.
    pub fn tally(&self) -> UpstreamTally {
        UpstreamTally {
            requests: self.iter().map(|u| u.requests()).sum(),
            rate_limited: self.iter().map(|u| u.rate_limited()).sum(),
            // The latest report of any upstream (Docker Hub is the one that limits).
            ratelimit_seen: self.iter().filter_map(|u| u.ratelimit_seen()).max_by_key(|(_, at)| *at),
        }
    }

    /// Each upstream's numbers, for `/metrics` and `/_hubcap/stats`.
    pub fn each(&self) -> Vec<UpstreamStat> {
        let mut out: Vec<UpstreamStat> = self
            .iter()
            .map(|u| UpstreamStat {
                registry: u.registry.clone(),
                requests: u.requests(),
                rate_limited: u.rate_limited(),
                ratelimit_remaining: u.ratelimit_remaining(),
            })
            .collect();
        out.sort_by(|a, b| a.registry.cmp(&b.registry));
        out
    }

    pub(crate) fn backing_off(&self, registry: &str) -> bool {
        let map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        map.get(registry).is_some_and(|until| *until > Instant::now())
    }

    pub(crate) fn back_off(&self, registry: &str, for_: Duration) {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner()).insert(registry.to_owned(), Instant::now() + for_);
    }
}

/// Parses one `--upstream` value, `REGISTRY[=URL]`, into a registry name
/// and base URL. Refused, with what to write instead: a name clients would
/// never send here (one without a dot, a port or `localhost` means Docker
/// Hub to every client: `ghcr/x` is `docker.io/ghcr/x`), a URL without an
/// `http://` or `https://` scheme, and a URL with a path, query or fragment
/// (the mirror adds `/v2/...` itself: `.../v2` would ask `/v2/v2/`).
pub fn parse_upstream(spec: &str) -> Result<(String, String), String> {
    let (registry, url) = match spec.split_once('=') {
        Some((r, u)) => (r.trim(), u.trim().to_owned()),
        None => (spec.trim(), format!("https://{}", spec.trim())),
    };
    let named = canonical_registry(registry).map_err(|e| e.message.into_owned())?;
    if !(named.contains('.') || named.contains(':') || named == "localhost") {
        return Err(format!(
            "upstream {registry:?}: clients read a first name without a dot, a port or \"localhost\" as a Docker Hub repository \
             ({registry}/app is docker.io/{registry}/app), so no pull would name this registry; give its host name (e.g. ghcr.io, \
             registry.example.com:5000)"
        ));
    }
    let bad = |why: &str, fix: String| format!("upstream {named}: {url:?} {why}; write {fix}");
    let parsed = match url::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
        _ => return Err(bad("is not an http:// or https:// URL", format!("{named}=https://{}", url.trim_start_matches("//")))),
    };
    let root = format!("{}://{}", parsed.scheme(), &parsed[url::Position::BeforeHost..url::Position::AfterPort]);
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("has a path, query or fragment (the mirror adds /v2/ itself)", format!("{named}={root}")));
    }
    Ok((named, url.trim_end_matches('/').to_owned()))
}

/// Builds the upstream clients from `--upstream` values, the limits they
/// work within, and credentials.
pub fn build_upstreams(
    specs: &[String],
    limits: &UpstreamLimits,
    credentials: &HashMap<String, Credentials>,
) -> Result<Upstreams, Box<dyn std::error::Error + Send + Sync>> {
    let mut map: Vec<(String, String)> = vec![(DOCKER_HUB.to_owned(), DOCKER_HUB_URL.to_owned())];
    for spec in specs.iter().filter(|s| !s.trim().is_empty()) {
        let (registry, url) = parse_upstream(spec)?;
        map.retain(|(r, _)| *r != registry);
        map.push((registry, url));
    }
    let destinations = Arc::new(Destinations::new(map.iter().map(|(_, url)| url.as_str()), &limits.redirect_allow)?);
    let limits = Arc::new(limits.clone());
    let list = map
        .into_iter()
        .map(|(registry, url)| Upstream::new(&registry, &url, credentials.get(&registry).cloned(), limits.clone(), destinations.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Upstreams::new(list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_that_cannot_work_are_refused_with_what_to_write() {
        let ok = |s: &str| parse_upstream(s).unwrap();
        assert_eq!(ok("ghcr.io"), ("ghcr.io".into(), "https://ghcr.io".into()));
        assert_eq!(ok("docker.io=http://127.0.0.1:5100/"), ("docker.io".into(), "http://127.0.0.1:5100".into()));
        assert_eq!(ok("localhost:5000=http://127.0.0.1:5000").0, "localhost:5000");
        assert_eq!(ok("registry-1.docker.io").0, "docker.io");
        for (spec, says) in [
            ("ghcr", "give its host name"),
            ("quay=https://quay.io", "give its host name"),
            ("docker.io=http://127.0.0.1:5100/v2", "write docker.io=http://127.0.0.1:5100"),
            ("docker.io=http://127.0.0.1:5100/?x=1", "write docker.io=http://127.0.0.1:5100"),
            ("docker.io=127.0.0.1:5100", "write docker.io=https://127.0.0.1:5100"),
            ("docker.io=ftp://127.0.0.1", "not an http:// or https:// URL"),
        ] {
            let e = parse_upstream(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }
}

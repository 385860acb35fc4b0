//! What the mirror lets an upstream do to it: how long a transfer may take
//! and how slow it may run, how large a blob may be, and where a redirect may
//! lead. Only blob downloads follow redirects (registries send them to a
//! CDN); a redirect, a token realm, or a DNS answer that points at a
//! loopback, private or link-local address is refused unless that exact
//! `host:port` is a configured upstream or listed in `--redirect-allow`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

/// Most redirects a blob download follows.
const MAX_REDIRECTS: usize = 5;

#[derive(Clone, Debug)]
pub struct UpstreamLimits {
    /// Private or loopback `host:port`s a blob redirect may lead to besides
    /// the configured upstreams (an internal registry's object store).
    pub redirect_allow: Vec<String>,
    /// A request with a small answer (token, manifest, tag list, `HEAD`) is
    /// given this long in all, retries included; a blob download must start
    /// within it and then bring `min_rate` × `window` bytes in every window.
    pub window: Duration,
    /// Bytes per second below which a blob download is cut off.
    pub min_rate: u64,
    /// Largest blob copied, whether upstream declares its size or not.
    pub max_blob: u64,
    /// A blob of at least `ranged_from` bytes is fetched in `range_part`
    /// parts, this many at once (1: one stream), when upstream honours
    /// `Range`.
    pub parallel_ranges: usize,
    pub ranged_from: u64,
    pub range_part: u64,
    /// A ranged copy whose first connection would bring the whole blob
    /// within this (judged by its latency and first MiB) reads it as one stream
    /// instead: on a fast link parallel parts only cost (zero: never).
    pub one_stream_within: Duration,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            redirect_allow: Vec::new(),
            window: Duration::from_secs(30),
            min_rate: 32 * 1024,
            max_blob: 64 << 30,
            parallel_ranges: 4,
            ranged_from: 32 << 20,
            range_part: 8 << 20,
            one_stream_within: Duration::from_millis(500),
        }
    }
}

impl UpstreamLimits {
    /// Bytes a blob download must bring in each window.
    pub fn bytes_per_window(&self) -> u64 {
        (self.min_rate as f64 * self.window.as_secs_f64()) as u64
    }
}

/// Where redirects and DNS answers may point: `host:port`s (lowercase, IPv6
/// in brackets, port explicit) and the bare hosts among them.
#[derive(Debug, Default)]
pub struct Destinations {
    endpoints: HashSet<String>,
    hosts: HashSet<String>,
}

impl Destinations {
    /// The configured upstream base URLs plus `--redirect-allow` entries.
    pub fn new<'a>(upstream_urls: impl IntoIterator<Item = &'a str>, allow: &[String]) -> Result<Destinations, String> {
        let mut d = Destinations::default();
        let urls = upstream_urls.into_iter().map(str::to_owned).chain(allow.iter().map(|a| format!("http://{}", a.trim())));
        for u in urls {
            let url = Url::parse(&u).map_err(|e| format!("{u:?} is not a host:port or URL: {e}"))?;
            let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
                return Err(format!("{u:?} names no host"));
            };
            d.endpoints.insert(format!("{}:{port}", host.to_ascii_lowercase()));
            d.hosts.insert(host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase());
        }
        Ok(d)
    }

    fn allows_endpoint(&self, url: &Url) -> bool {
        match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(p)) => self.endpoints.contains(&format!("{}:{p}", h.to_ascii_lowercase())),
            _ => false,
        }
    }

    /// Whether a redirect to `url` may be followed (or a token fetched
    /// from it: a 401 names the realm).
    pub fn check_redirect(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{} URL refused", url.scheme()));
        }
        if self.allows_endpoint(url) {
            return Ok(());
        }
        let internal = match url.host() {
            Some(Host::Ipv4(ip)) => !is_public(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => !is_public(IpAddr::V6(ip)),
            Some(Host::Domain(d)) => {
                let d = d.to_ascii_lowercase();
                // A configured upstream's name resolves inside if it likes
                // (the resolver trusts it): only on its configured port.
                d == "localhost" || d.ends_with(".localhost") || self.hosts.contains(&d)
            }
            None => true,
        };
        if internal {
            return Err(format!(
                "{} refused: a loopback, private or link-local address that is not a configured upstream",
                url.host_str().unwrap_or("")
            ));
        }
        Ok(())
    }

    /// The redirect policy of blob downloads.
    pub fn redirect_policy(self: &Arc<Self>) -> reqwest::redirect::Policy {
        let rules = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match rules.check_redirect(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        })
    }
}

/// Whether traffic to `ip` leaves the host and its private networks. An
/// IPv6 address that carries an IPv4 one (mapped, compatible, translated,
/// 6to4, NAT64, Teredo) is judged by every IPv4 address in it too.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6) && embedded_v4(v6).into_iter().all(is_public_v4),
    }
}

/// The IPv4 addresses an IPv6 address carries, by the transition
/// mechanisms that route to them.
fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // ::a.b.c.d (compatible), ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (translated)
        [0, 0, 0, 0, 0, 0, _, _] | [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => vec![last],
        // 6to4: 2002:aabb:ccdd::/16
        [0x2002, ..] => vec![Ipv4Addr::new(o[2], o[3], o[4], o[5])],
        // NAT64, well-known and local-use prefixes: the last 32 bits
        [0x0064, 0xff9b, ..] => vec![last],
        // Teredo: the server's address, and the client's (inverted)
        [0x2001, 0, ..] => vec![Ipv4Addr::new(o[4], o[5], o[6], o[7]), Ipv4Addr::from(!u32::from(last))],
        _ => vec![],
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (RFC 6598)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b)) // NAT64 to any IPv4 address
}

/// The DNS resolver of blob downloads: a name that is not a configured
/// upstream (or allowed) host may only resolve to public addresses, so a
/// redirect to a public-looking name cannot reach inside either.
pub struct PublicResolver(pub Arc<Destinations>);

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_ascii_lowercase();
        let trusted = self.0.hosts.contains(&name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| trusted || is_public(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!("{name} resolves only to loopback, private or link-local addresses").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest() -> Destinations {
        Destinations::new(["http://127.0.0.1:5000", "https://registry-1.docker.io"], &["10.0.0.5:9000".into(), "[::1]:7000".into()])
            .unwrap()
    }

    #[test]
    fn redirects_inside_need_an_exact_configured_endpoint() {
        let d = dest();
        let ok = |u: &str| d.check_redirect(&Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://127.0.0.1:5000/blobs/x"), "the configured upstream itself");
        assert!(ok("http://10.0.0.5:9000/bucket/x"), "an allowed object store");
        assert!(ok("http://[::1]:7000/x"));
        assert!(ok("https://production.cloudflare.docker.com/registry-v2/x"), "a public CDN");
        assert!(ok("https://8.8.8.8/x"));
        for bad in [
            "http://127.0.0.1:5001/x",
            "http://127.0.0.2:5000/x",
            "http://localhost:5000/x",
            "http://api.localhost/x",
            "http://10.0.0.5:9001/x",
            "http://192.168.1.1/x",
            "http://172.16.0.1/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:5000/x",
            "http://[fe80::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:127.0.0.1]:80/x",
            "http://[::127.0.0.1]:5000/x",
            "http://[::ffff:0:127.0.0.1]:5000/x",
            "http://[2002:7f00:1::]:5000/x",
            "http://0.0.0.0:5000/x",
            "http://100.64.0.1/x",
            "file:///etc/passwd",
        ] {
            assert!(!ok(bad), "{bad} must be refused");
        }
    }

    #[test]
    fn an_upstream_named_by_host_is_trusted_on_its_own_port_only() {
        let d = Destinations::new(["http://registry.internal:5000"], &[]).unwrap();
        let ok = |u: &str| d.check_redirect(&Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://registry.internal:5000/blobs/x"));
        assert!(!ok("http://registry.internal:5001/x"), "its name resolves inside: not another port of it");
        assert!(!ok("http://REGISTRY.internal:22/x"));
    }

    #[test]
    fn public_addresses() {
        for (ip, public) in [
            ("1.1.1.1", true),
            ("52.1.2.3", true),
            ("2600:1f18::1", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("::ffff:10.0.0.1", false),
            ("::", false),
            ("fe80::1", false),
            ("64:ff9b::7f00:1", false),
            ("::127.0.0.1", false),
            ("::ffff:0:127.0.0.1", false),
            ("2002:7f00:1::", false),
            ("2002:a00:1::1", false),
            ("2001:0:7f00:1::1", false),
            ("2001:0:808:808:0:0:80f7:fefe", false),
            ("2002:808:808::1", true),
            ("255.255.255.255", false),
        ] {
            assert_eq!(is_public(ip.parse().unwrap()), public, "{ip}");
        }
    }

    #[tokio::test]
    async fn names_that_are_not_upstreams_resolve_only_to_public_addresses() {
        use reqwest::dns::Resolve;
        let d = Arc::new(Destinations::new(["http://localhost:5000"], &[]).unwrap());
        let r = PublicResolver(d);
        let trusted = r.resolve("localhost".parse().unwrap()).await.expect("a configured upstream's name resolves");
        assert!(trusted.into_iter().all(|a| a.ip().is_loopback()));
        let r = PublicResolver(Arc::new(Destinations::new(["http://127.0.0.1:5000"], &[]).unwrap()));
        assert!(r.resolve("localhost".parse().unwrap()).await.is_err(), "localhost is not an upstream's name here");
    }
}

//! Who may use the mirror: allowed client networks (CIDRs), allowed and
//! denied repository patterns, and optional client credentials (HTTP basic
//! `user:password` pairs or static bearer tokens) for clients that can send
//! them (containerd, podman, skopeo). Docker's daemon sends none to a mirror,
//! so networks are its control. Refusals are OCI `DENIED` / `UNAUTHORIZED`.
//!
//! Pure policy: the router supplies the client address, the Authorization
//! header and the resolved repository.

use std::net::IpAddr;

use base64::Engine as _;
use ipnet::IpNet;
use sha2::{Digest as _, Sha256};

use crate::oci::{ErrorCode, RegistryError, RepoPath, RepoPattern};

#[derive(Clone, Default)]
pub struct AccessPolicy {
    networks: Vec<IpNet>,
    allow: Vec<RepoPattern>,
    deny: Vec<RepoPattern>,
    /// sha256 of accepted `user:password` and token strings: the secrets
    /// themselves are not kept (and so never printed).
    basic: Vec<[u8; 32]>,
    tokens: Vec<[u8; 32]>,
}

impl AccessPolicy {
    /// True when only some networks may connect (`--allow-cidr`).
    pub fn limits_networks(&self) -> bool {
        !self.networks.is_empty()
    }
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("networks", &self.networks)
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .field("credentials", &(self.basic.len() + self.tokens.len()))
            .finish()
    }
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl AccessPolicy {
    /// Builds a policy; an empty list means "no restriction" for networks and
    /// allowed repositories, and "no credentials needed" for clients.
    pub fn new(
        networks: &[String],
        allow: &[String],
        deny: &[String],
        users: &[String],
        tokens: &[String],
    ) -> Result<AccessPolicy, String> {
        let networks = networks
            .iter()
            .filter(|n| !n.trim().is_empty())
            .map(|n| {
                let n = n.trim();
                n.parse::<IpNet>().or_else(|_| n.parse::<IpAddr>().map(IpNet::from)).map_err(|_| format!("invalid client network {n:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let list = |v: &[String]| v.iter().filter(|p| !p.trim().is_empty()).map(|p| RepoPattern::parse(p)).collect::<Result<Vec<_>, _>>();
        for u in users.iter().filter(|u| !u.is_empty()) {
            if !u.contains(':') {
                return Err("client users are USER:PASSWORD".into());
            }
        }
        Ok(AccessPolicy {
            networks,
            allow: list(allow)?,
            deny: list(deny)?,
            basic: users.iter().filter(|u| !u.is_empty()).map(|u| hash(u)).collect(),
            tokens: tokens.iter().filter(|t| !t.is_empty()).map(|t| hash(t)).collect(),
        })
    }

    pub fn needs_credentials(&self) -> bool {
        !self.basic.is_empty() || !self.tokens.is_empty()
    }

    /// The client's network must be allowed.
    pub fn check_network(&self, client: Option<IpAddr>) -> Result<(), RegistryError> {
        if self.networks.is_empty() {
            return Ok(());
        }
        match client {
            Some(ip) if self.networks.iter().any(|n| n.contains(&ip)) => Ok(()),
            _ => Err(RegistryError::new(ErrorCode::Denied, "this mirror does not serve your network")),
        }
    }

    /// The client must present accepted credentials, when any are configured.
    pub fn check_credentials(&self, authorization: Option<&str>) -> Result<(), RegistryError> {
        if !self.needs_credentials() {
            return Ok(());
        }
        let ok = match authorization.map(str::trim) {
            Some(a) if a.len() > 6 && a[..6].eq_ignore_ascii_case("basic ") => base64::engine::general_purpose::STANDARD
                .decode(a[6..].trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .is_some_and(|pair| self.basic.contains(&hash(&pair))),
            Some(a) if a.len() > 7 && a[..7].eq_ignore_ascii_case("bearer ") => self.tokens.contains(&hash(a[7..].trim())),
            _ => false,
        };
        if ok { Ok(()) } else { Err(RegistryError::new(ErrorCode::Unauthorized, "authentication required")) }
    }

    /// The repository must be allowed and not denied.
    pub fn check_repo(&self, repo: &RepoPath) -> Result<(), RegistryError> {
        let key = repo.key();
        let denied = self.deny.iter().any(|p| p.matches(&key));
        let allowed = self.allow.is_empty() || self.allow.iter().any(|p| p.matches(&key));
        if denied || !allowed {
            return Err(RegistryError::new(ErrorCode::Denied, format!("{key} is not served by this mirror")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoPath {
        RepoPath::resolve(s, None).unwrap()
    }

    #[test]
    fn repositories_are_allowed_and_denied_by_pattern() {
        let p = AccessPolicy::new(&[], &["library/*".into(), "ghcr.io/acme/*".into()], &["library/secret*".into()], &[], &[]).unwrap();
        assert!(p.check_repo(&repo("alpine")).is_ok());
        assert!(p.check_repo(&repo("ghcr.io/acme/tool")).is_ok());
        assert_eq!(p.check_repo(&repo("bitnami/redis")).unwrap_err().code, ErrorCode::Denied);
        assert_eq!(p.check_repo(&repo("library/secret-thing")).unwrap_err().code, ErrorCode::Denied);
        assert!(AccessPolicy::default().check_repo(&repo("any/thing")).is_ok());
    }

    #[test]
    fn networks_and_credentials_are_checked() {
        let p = AccessPolicy::new(&["10.0.0.0/8".into(), "127.0.0.1".into()], &[], &[], &["ci:s3cret".into()], &["tok".into()]).unwrap();
        assert!(p.check_network(Some("10.1.2.3".parse().unwrap())).is_ok());
        assert!(p.check_network(Some("127.0.0.1".parse().unwrap())).is_ok());
        assert_eq!(p.check_network(Some("192.0.2.1".parse().unwrap())).unwrap_err().code, ErrorCode::Denied);
        assert!(p.check_network(None).is_err());
        assert!(p.check_credentials(Some("Basic Y2k6czNjcmV0")).is_ok());
        assert!(p.check_credentials(Some("Bearer tok")).is_ok());
        assert_eq!(p.check_credentials(Some("Basic Y2k6bm8=")).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(p.check_credentials(None).is_err());
        assert!(!format!("{p:?}").contains("s3cret"));
        assert!(AccessPolicy::new(&["nonsense".into()], &[], &[], &[], &[]).is_err());
    }
}

//! Upstream credentials: the type (whose `Debug` never prints the secret)
//! and the two shapes they are written in, docker's `config.json` and a
//! single `{username, password, registry}` object (a Secrets Manager secret).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use crate::oci::{DOCKER_HUB, canonical_registry};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Upstream credentials. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Reads a credentials file: see `parse_credentials`.
pub fn load_credentials(path: &Path) -> Result<HashMap<String, Credentials>, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    parse_credentials(&text).map_err(|e| format!("credentials file {}: {e}", path.display()).into())
}

/// Parses docker's `config.json` shape,
/// `{"auths": {"docker.io": {"username": .., "password": ..} | {"auth": base64}}}`,
/// or a single `{"username": .., "password": .., "registry": "docker.io"}`
/// (registry optional), as a Secrets Manager secret is usually written.
pub fn parse_credentials(text: &str) -> Result<HashMap<String, Credentials>, BoxError> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Single {
        username: String,
        password: String,
        registry: Option<String>,
    }
    if let Ok(one) = serde_json::from_str::<Single>(text) {
        let registry = canonical_registry(one.registry.as_deref().unwrap_or(DOCKER_HUB)).map_err(|e| e.message.into_owned())?;
        return Ok(HashMap::from([(registry, Credentials { username: one.username, password: one.password })]));
    }
    #[derive(serde::Deserialize)]
    struct File {
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        username: Option<String>,
        password: Option<String>,
        auth: Option<String>,
    }
    let file: File = serde_json::from_str(text).map_err(|_| "not a docker config.json (auths) nor {username, password}".to_owned())?;
    let mut out = HashMap::new();
    for (host, e) in file.auths {
        let host = host.trim_start_matches("https://").trim_start_matches("http://").split('/').next().unwrap_or("").to_owned();
        let creds = match (e.username, e.password, e.auth) {
            (Some(u), Some(p), _) => Credentials { username: u, password: p },
            (_, _, Some(a)) => {
                let decoded =
                    base64::engine::general_purpose::STANDARD.decode(a.trim()).map_err(|_| format!("credentials for {host}: bad auth"))?;
                let decoded = String::from_utf8(decoded).map_err(|_| format!("credentials for {host}: bad auth"))?;
                let (u, p) = decoded.split_once(':').ok_or_else(|| format!("credentials for {host}: auth is not user:password"))?;
                Credentials { username: u.to_owned(), password: p.to_owned() }
            }
            _ => return Err(format!("credentials for {host}: need username and password, or auth").into()),
        };
        out.insert(canonical_registry(&host).map_err(|e| e.message.into_owned())?, creds);
    }
    Ok(out)
}

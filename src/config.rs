//! Settings shared by the `hubcap` CLI and the Lambda binaries: each is a
//! flag and a `HUBCAP_*` environment variable (the Lambdas read only the
//! variables), parsed once by clap.

use std::path::PathBuf;
use std::time::Duration;

use crate::assemble::{Backend, MEMORY_CACHE_ENTRIES, Options};
use crate::mirror::MirrorConfig;
use crate::mirror::upstream::UpstreamLimits;
use crate::storage::aws::{AwsStorage, Encryption};

#[derive(clap::Args, Clone, Debug)]
pub struct MirrorArgs {
    /// An upstream registry: REGISTRY=URL, or REGISTRY for https://REGISTRY.
    /// Repeatable (comma-separated in the variable). docker.io is always
    /// configured (default https://registry-1.docker.io).
    #[arg(long = "upstream", env = "HUBCAP_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Upstream credentials, in docker's config.json format ({"auths": {...}}).
    #[arg(long, env = "HUBCAP_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// An AWS Secrets Manager secret (name or ARN) holding upstream
    /// credentials, read once at start-up.
    #[arg(long, env = "HUBCAP_CREDENTIALS_SECRET")]
    pub credentials_secret: Option<String>,
    /// Seconds a tag is trusted before it is re-validated upstream (0: every time).
    #[arg(long, env = "HUBCAP_TAG_TTL", default_value_t = 600.0, value_parser = seconds)]
    pub tag_ttl: f64,
    /// Seconds a blob request waits for an in-flight fetch before redirecting back.
    #[arg(long, env = "HUBCAP_BLOB_WAIT", default_value_t = 20.0, value_parser = seconds)]
    pub blob_wait: f64,
    /// How a request for a large blob (8 MiB or more) still being copied
    /// waits: `hold` (inside the request, up to --blob-wait, then a
    /// redirect back) or `retry` (answered at once with 503 and
    /// Retry-After unless the copy is about to end, so the client waits
    /// outside: Docker pauses 5 to 25 s between its 6 tries). Default: hold
    /// for `serve`, retry for the api Lambda (SCALING.md).
    #[arg(long, env = "HUBCAP_BLOB_WAIT_MODE", value_enum)]
    pub blob_wait_mode: Option<crate::mirror::BlobWaitMode>,
    /// Where a client asking for a large blob (8 MiB or more) not stored
    /// yet is sent: `upstream` (where the upstream serves it, e.g. Docker
    /// Hub's CDN, while the mirror copies it) or `wait` (held, for clients
    /// that cannot reach the upstream). Default: wait for `serve` (it
    /// streams the copy), upstream for the api Lambda.
    #[arg(long, env = "HUBCAP_COLD_BLOBS", value_enum)]
    pub cold_blobs: Option<crate::mirror::ColdBlobs>,
    /// Seconds a signed blob URL stays valid.
    #[arg(long, env = "HUBCAP_URL_TTL", default_value_t = 900.0, value_parser = positive_seconds)]
    pub url_ttl: f64,
    /// Seconds a tag re-validation may take before the cached tag is served.
    #[arg(long, env = "HUBCAP_REVALIDATE_TIMEOUT", default_value_t = 3.0, value_parser = seconds)]
    pub revalidate_timeout: f64,
    /// Blob copies from upstream running at once (the in-process fetcher, or
    /// one fetcher Lambda working through a batch of stream records).
    #[arg(long, env = "HUBCAP_FETCH_CONCURRENCY", default_value_t = 8, value_parser = at_least_one)]
    pub fetch_concurrency: usize,
    /// Loopback or private HOST:PORTs that upstream blob redirects may lead
    /// to (an internal registry's object store). Configured upstreams are
    /// always allowed; other internal addresses never are.
    #[arg(long = "redirect-allow", env = "HUBCAP_REDIRECT_ALLOW", value_delimiter = ',')]
    pub redirect_allow: Vec<String>,
    /// Seconds an upstream request with a small answer (token, manifest, tag
    /// list, HEAD) may take in all; a blob download must start within it and
    /// keep up --min-transfer-rate over every such window.
    #[arg(long, env = "HUBCAP_TRANSFER_WINDOW", default_value_t = 30.0, value_parser = seconds)]
    pub transfer_window: f64,
    /// Slowest blob download kept going (bytes per second, e.g. 32KiB).
    #[arg(long, env = "HUBCAP_MIN_TRANSFER_RATE", default_value = "32KiB", value_parser = crate::lifecycle::parse_size)]
    pub min_transfer_rate: u64,
    /// Largest blob copied from upstream (e.g. 64GiB), declared or not.
    #[arg(long, env = "HUBCAP_MAX_BLOB_SIZE", default_value = "64GiB", value_parser = crate::lifecycle::parse_size)]
    pub max_blob_size: u64,
    /// Ranged requests in flight for one blob of 32 MiB or more (8 MiB
    /// parts), when upstream honours Range; 1 fetches every blob as one
    /// stream.
    #[arg(long, env = "HUBCAP_PARALLEL_RANGES", default_value_t = 4)]
    pub parallel_ranges: usize,
}

/// Longest a setting in seconds may be: a year.
const MAX_SECONDS: f64 = 365.0 * 86400.0;

/// A number of seconds (`900`, `0.25`): finite, not negative, at most a
/// year. `inf`, `nan`, `-5` and `1e300` are errors, never a panic or 0.
fn seconds(s: &str) -> Result<f64, String> {
    let n: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !n.is_finite() || !(0.0..=MAX_SECONDS).contains(&n) {
        return Err(format!("{s:?}: seconds must be between 0 and {MAX_SECONDS} (a year)"));
    }
    Ok(n)
}

/// `seconds`, more than zero: for settings where zero cannot work.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match seconds(s)? {
        n if n > 0.0 => Ok(n),
        _ => Err(format!("{s:?}: must be more than 0 (zero cannot work here)")),
    }
}

/// A count of at least one: for settings where zero would stop everything
/// (no copies, no connections).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!("{s:?}: must be at least 1 (0 would serve nothing)")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A duration (`parse_duration`) more than zero.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match crate::lifecycle::parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be more than 0 (zero cannot work here)")),
        d => Ok(d),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl MirrorArgs {
    /// What a mirror on `backend` is assembled from.
    pub fn options(&self, backend: Backend, access: crate::http::access::AccessPolicy) -> Options {
        Options {
            backend,
            upstreams: self.upstreams.clone(),
            credentials: self.credentials.clone(),
            credentials_secret: self.credentials_secret.clone(),
            mirror: self.mirror_config(),
            fetch_concurrency: self.fetch_concurrency,
            access,
            memory_cache_entries: MEMORY_CACHE_ENTRIES,
            upstream_limits: self.upstream_limits(),
        }
    }

    pub fn upstream_limits(&self) -> UpstreamLimits {
        UpstreamLimits {
            redirect_allow: self.redirect_allow.iter().filter(|a| !a.trim().is_empty()).cloned().collect(),
            // A zero window would refuse every request: at least a second.
            window: secs(self.transfer_window).max(Duration::from_secs(1)),
            min_rate: self.min_transfer_rate,
            max_blob: self.max_blob_size,
            parallel_ranges: self.parallel_ranges.max(1),
            ..UpstreamLimits::default()
        }
    }

    pub fn mirror_config(&self) -> MirrorConfig {
        MirrorConfig {
            tag_ttl: secs(self.tag_ttl),
            blob_wait: secs(self.blob_wait),
            url_ttl: secs(self.url_ttl),
            revalidate_timeout: secs(self.revalidate_timeout),
            blob_wait_mode: self.blob_wait_mode.unwrap_or_default(),
            cold_blobs: self.cold_blobs.unwrap_or_default(),
            ..MirrorConfig::default()
        }
    }
}

/// Lifecycle: what GC keeps (`hubcap gc`, the `gc` Lambda, and the sweeps
/// `hubcap serve` runs itself).
#[derive(clap::Args, Clone, Debug)]
pub struct GcArgs {
    /// Images not pulled for this long expire (e.g. 30d, 12h).
    #[arg(long, env = "HUBCAP_UNUSED_FOR", default_value = "30d", value_parser = crate::lifecycle::parse_duration)]
    pub unused_for: Duration,
    /// Blobs nothing references any more are deleted once unused this long
    /// (protects pulls in flight; keep it above 30m).
    #[arg(long, env = "HUBCAP_GRACE", default_value = "1d", value_parser = crate::lifecycle::parse_duration)]
    pub grace: Duration,
    /// Images that never expire: REPO[:TAG] patterns with `*` and `?` (library/* means
    /// docker.io/library/*; without a tag, the whole repository).
    #[arg(long = "pin", env = "HUBCAP_PINS", value_delimiter = ',')]
    pub pins: Vec<String>,
    /// Size cap: evict the least recently pulled images until the cache
    /// fits (e.g. 500G).
    #[arg(long, env = "HUBCAP_MAX_SIZE", value_parser = crate::lifecycle::parse_size)]
    pub max_size: Option<u64>,
}

impl GcArgs {
    pub fn options(&self) -> Result<crate::lifecycle::GcOptions, String> {
        Ok(crate::lifecycle::GcOptions {
            unused_for: self.unused_for,
            grace: self.grace,
            pins: self.pins.iter().filter(|p| !p.trim().is_empty()).map(|p| crate::lifecycle::Pin::parse(p)).collect::<Result<_, _>>()?,
            max_bytes: self.max_size,
            ..crate::lifecycle::GcOptions::default()
        })
    }
}

/// Access control. Not `Debug`: it holds client secrets.
#[derive(clap::Args, Clone)]
pub struct AccessArgs {
    /// Client networks allowed to use the mirror (CIDR or address); default: any.
    #[arg(long = "allow-cidr", env = "HUBCAP_ALLOW_CIDRS", value_delimiter = ',')]
    pub allow_cidrs: Vec<String>,
    /// Repositories served (patterns with `*` and `?`; `library/*` means docker.io/library/*); default: all.
    #[arg(long = "allow-repo", env = "HUBCAP_ALLOW_REPOS", value_delimiter = ',')]
    pub allow_repos: Vec<String>,
    /// Repositories refused, even when allowed above.
    #[arg(long = "deny-repo", env = "HUBCAP_DENY_REPOS", value_delimiter = ',')]
    pub deny_repos: Vec<String>,
    /// Client credentials USER:PASSWORD (HTTP basic); when any are set,
    /// clients must authenticate. Repeat the flag for more; the variable
    /// holds one per line. Never split on commas: a secret may hold one.
    #[arg(long = "client-user", env = "HUBCAP_CLIENT_USERS", value_delimiter = '\n', hide_env_values = true)]
    pub client_users: Vec<String>,
    /// Static bearer tokens clients may send instead (repeat the flag; one
    /// per line in the variable).
    #[arg(long = "client-token", env = "HUBCAP_CLIENT_TOKENS", value_delimiter = '\n', hide_env_values = true)]
    pub client_tokens: Vec<String>,
    /// An AWS Secrets Manager secret (name or ARN) with more client
    /// credentials, read once at start-up: {"users": ["USER:PASSWORD", ...]}
    /// or {"username": "...", "password": "..."}. The api Lambda's way
    /// (template parameter ClientCredentialsSecretArn): no secret in its
    /// environment.
    #[arg(long = "client-users-secret", env = "HUBCAP_CLIENT_USERS_SECRET")]
    pub client_users_secret: Option<String>,
}

impl AccessArgs {
    /// The policy from flags and variables alone.
    pub fn policy(&self) -> Result<crate::http::access::AccessPolicy, String> {
        self.policy_with(&[])
    }

    /// The policy, with the client credentials `--client-users-secret`
    /// holds (one Secrets Manager call when it is set).
    pub async fn resolve(&self) -> Result<crate::http::access::AccessPolicy, String> {
        let users = match self.client_users_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(id) => client_users_from(&crate::secrets::secret_string(id).await?).map_err(|e| format!("secret {id}: {e}"))?,
            None => Vec::new(),
        };
        self.policy_with(&users)
    }

    fn policy_with(&self, more_users: &[String]) -> Result<crate::http::access::AccessPolicy, String> {
        crate::http::access::AccessPolicy::new(
            &self.allow_cidrs,
            &self.allow_repos,
            &self.deny_repos,
            &[&self.client_users[..], more_users].concat(),
            &self.client_tokens,
        )
    }
}

/// Client credentials from a secret's value: `{"users": ["USER:PASSWORD",
/// ...]}` or `{"username": "...", "password": "..."}`. The error never
/// quotes the value.
pub fn client_users_from(value: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Secret {
        users: Option<Vec<String>>,
        username: Option<String>,
        password: Option<String>,
    }
    let secret: Secret = serde_json::from_str(value)
        .map_err(|_| "not JSON of the form {\"users\": [\"USER:PASSWORD\", ...]} or {\"username\": ..., \"password\": ...}".to_owned())?;
    let mut users = secret.users.unwrap_or_default();
    if let (Some(u), Some(p)) = (secret.username, secret.password) {
        users.push(format!("{u}:{p}"));
    }
    if users.is_empty() || users.iter().any(|u| !u.contains(':') || u.starts_with(':')) {
        return Err("no client credentials of the form USER:PASSWORD in it".into());
    }
    Ok(users)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// Files and SQLite under --data.
    Local,
    /// S3 (--bucket) and DynamoDB (--table).
    Aws,
}

impl StorageKind {
    /// The backend this kind of storage means, in `data` or `aws`.
    pub fn backend(self, data: &std::path::Path, aws: &AwsArgs) -> Result<Backend, String> {
        Ok(match self {
            StorageKind::Local => Backend::Local(data.to_owned()),
            StorageKind::Aws => Backend::Aws(Box::new(aws.storage()?)),
        })
    }
}

impl StorageArgs {
    pub fn backend(&self) -> Result<Backend, String> {
        self.storage.backend(&self.data, &self.aws)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct StorageArgs {
    /// Where the cache lives.
    #[arg(long, env = "HUBCAP_STORAGE", value_enum, default_value_t = StorageKind::Local)]
    pub storage: StorageKind,
    /// Cache directory for --storage local (blobs, index, signing key).
    #[arg(long, env = "HUBCAP_DATA", default_value = "hubcap-data")]
    pub data: PathBuf,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(clap::Args, Clone, Debug)]
pub struct AwsArgs {
    /// S3 bucket for blobs (--storage aws).
    #[arg(long, env = "HUBCAP_BUCKET")]
    pub bucket: Option<String>,
    /// DynamoDB table for the index (--storage aws).
    #[arg(long, env = "HUBCAP_TABLE")]
    pub table: Option<String>,
    /// Server-side encryption of stored objects: AES256 or aws:kms (default: the bucket's).
    #[arg(long, env = "HUBCAP_SSE", default_value = "")]
    pub sse: String,
    /// KMS key for --sse aws:kms (default: the AWS managed key).
    #[arg(long, env = "HUBCAP_SSE_KMS_KEY_ID")]
    pub sse_kms_key_id: Option<String>,
}

impl AwsArgs {
    pub fn storage(&self) -> Result<AwsStorage, String> {
        let bucket = self.bucket.clone().filter(|b| !b.is_empty()).ok_or("the AWS backend needs --bucket (HUBCAP_BUCKET)")?;
        let table = self.table.clone().filter(|t| !t.is_empty()).ok_or("the AWS backend needs --table (HUBCAP_TABLE)")?;
        Ok(AwsStorage { bucket, table, encryption: Encryption::parse(&self.sse, self.sse_kms_key_id.clone())?, sdk: None })
    }
}

/// Settings of a Lambda function, from its environment variables only.
#[derive(clap::Parser, Clone)]
pub struct LambdaSettings {
    #[command(flatten)]
    pub mirror: MirrorArgs,
    #[command(flatten)]
    pub access: AccessArgs,
    /// A Lambda runs on AWS storage unless told `local` (cargo lambda watch
    /// with no AWS at all).
    #[arg(long, env = "HUBCAP_STORAGE", value_enum, default_value_t = StorageKind::Aws)]
    pub storage: StorageKind,
    /// Cache directory when `HUBCAP_STORAGE=local`.
    #[arg(long, env = "HUBCAP_DATA", default_value = "/tmp/hubcap-data")]
    pub data: PathBuf,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Facts kept in the warm instance's in-memory cache, per kind.
    #[arg(long, env = "HUBCAP_MEMORY_CACHE_ENTRIES", default_value_t = 10_000)]
    pub memory_cache_entries: usize,
    #[command(flatten)]
    pub gc: GcArgs,
    /// Images the `gc` function's warm schedule caches (comma-separated).
    #[arg(long, env = "HUBCAP_WARM_IMAGES", value_delimiter = ',')]
    pub warm_images: Vec<String>,
    /// Platforms those images are warmed for (os/arch, comma-separated; default all).
    #[arg(long, env = "HUBCAP_WARM_PLATFORMS", value_delimiter = ',')]
    pub warm_platforms: Vec<String>,
    /// What the `api`'s `HEAD` of a manifest or blob carries: without
    /// `Docker-Content-Digest` (default: Lambda's front ends rewrite a HEAD
    /// answer's Content-Length, and containerd trusts it only with a
    /// digest), or `full` where `hubcap check` found the size kept.
    #[arg(long, env = "HUBCAP_HEAD_ANSWERS", value_enum, default_value_t = crate::lambda::HeadAnswers::WithoutDigest)]
    pub head_answers: crate::lambda::HeadAnswers,
    /// Seconds the front end waits for the `api` (API Gateway: 29 for a REST
    /// API, 30 for an HTTP API); it answers 2 s before that, or before the
    /// invocation's deadline when sooner. Unset: the invocation's deadline.
    #[arg(long, env = "HUBCAP_REQUEST_TIMEOUT", value_parser = seconds)]
    pub request_timeout: Option<f64>,
}

impl LambdaSettings {
    pub fn from_env() -> Result<LambdaSettings, clap::Error> {
        <LambdaSettings as clap::Parser>::try_parse_from(["hubcap-lambda"])
    }

    pub fn backend(&self) -> Result<Backend, String> {
        self.storage.backend(&self.data, &self.aws)
    }

    /// How the `api` fits its front end.
    pub fn front_end(&self) -> crate::lambda::FrontEndFit {
        crate::lambda::FrontEndFit { head: self.head_answers, timeout: self.request_timeout.filter(|t| *t > 0.0).map(secs) }
    }

    /// What the function's mirror is assembled from.
    pub fn options(&self) -> Result<Options, String> {
        let mut opts = self.mirror.options(self.backend()?, self.access.policy()?);
        opts.memory_cache_entries = self.memory_cache_entries;
        // A waiting request holds a whole execution: on Lambda, clients
        // wait outside unless told otherwise.
        opts.mirror.blob_wait_mode = self.mirror.blob_wait_mode.unwrap_or(crate::mirror::BlobWaitMode::Retry);
        // A Lambda cannot stream a large body: the first clients of a cold
        // layer get it from the upstream's CDN.
        opts.mirror.cold_blobs = self.mirror.cold_blobs.unwrap_or(crate::mirror::ColdBlobs::Upstream);
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mirror: super::MirrorArgs,
    }

    #[derive(Parser)]
    struct Access {
        #[command(flatten)]
        access: super::AccessArgs,
    }

    #[test]
    fn client_secrets_are_never_split_on_commas() {
        let a = Access::try_parse_from(["hubcap", "--client-token", "Zq9,x", "--client-user", "ci:long,password", "--client-user", "b:c"])
            .unwrap();
        assert_eq!(a.access.client_tokens, ["Zq9,x"]);
        assert_eq!(a.access.client_users, ["ci:long,password", "b:c"]);
        let p = a.access.policy().unwrap();
        assert!(p.check_credentials(Some("Bearer Zq9,x")).is_ok());
        assert!(p.check_credentials(Some("Bearer x")).is_err(), "a piece of a token is no token");
    }

    #[test]
    fn client_credentials_come_from_a_secret_in_either_shape_and_errors_never_quote_it() {
        assert_eq!(super::client_users_from(r#"{"users": ["ci:pw", "b:x:y"]}"#).unwrap(), ["ci:pw", "b:x:y"]);
        assert_eq!(super::client_users_from(r#"{"username": "ci", "password": "s3cret,with,commas"}"#).unwrap(), ["ci:s3cret,with,commas"]);
        for bad in ["ci:s3cret", r#"{"users": ["nocolon"]}"#, r#"{"users": []}"#, r#"{"username": "ci"}"#] {
            let e = super::client_users_from(bad).unwrap_err();
            assert!(!e.contains("s3cret") && !e.contains("nocolon"), "{e}");
        }
    }

    #[test]
    fn seconds_settings_refuse_what_is_not_a_time() {
        for bad in ["inf", "nan", "-5", "1e300", "soon", ""] {
            let parsed = Cli::try_parse_from(["hubcap", "--url-ttl", bad]);
            assert!(parsed.is_err(), "--url-ttl {bad:?} is refused");
        }
        for (flag, zero) in [("--url-ttl", "0"), ("--fetch-concurrency", "0")] {
            let e = Cli::try_parse_from(["hubcap", flag, zero]).err().unwrap().to_string();
            assert!(e.contains("must be"), "{flag} {zero} is refused, saying why: {e}");
        }
        let ok = Cli::try_parse_from(["hubcap", "--url-ttl", "0.5", "--blob-wait", "0"]).unwrap();
        assert_eq!(ok.mirror.mirror_config().url_ttl, std::time::Duration::from_millis(500));
    }
}

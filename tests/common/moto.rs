//! AWS on loopback: a `moto_server` per test (S3, DynamoDB and DynamoDB
//! Streams), a counting proxy to measure the AWS calls a request costs (and
//! to inject the faults real AWS has and moto never shows), and a stream
//! pump that reads real records from moto's DynamoDB Stream and
//! hands them to the fetcher as Lambda's event source mapping would.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use hubcap::storage::aws::{AwsStorage, Encryption};

pub struct Moto {
    pub url: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto_server with S3's XML roots for the multipart listings
/// (tests/tools/moto_server.py says why).
pub fn launcher() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/moto_server.py")
}

/// The port the launcher, started with `-p 0`, bound and wrote on its first
/// line of stdout: listening by then. A port picked here and freed before
/// moto's second of start-up could be taken by any other test meanwhile.
pub fn announced_port(stdout: impl std::io::Read) -> Result<u16, String> {
    use std::io::BufRead;
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    line.trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("moto_server did not start (pip install 'moto[server]'; tests/run.sh does): it said {line:?}"))
}

impl Moto {
    pub async fn start() -> Moto {
        let mut child = std::process::Command::new("python3")
            .arg(launcher())
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (tests/run.sh installs it)");
        let stdout = child.stdout.take().unwrap();
        let port = match tokio::task::spawn_blocking(move || announced_port(stdout)).await.unwrap() {
            Ok(port) => port,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}")
            }
        };
        Moto { url: format!("http://127.0.0.1:{port}"), child }
    }

    /// Environment for child processes that use the AWS SDK against moto.
    /// Instance metadata is switched off: nothing may leave loopback.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        env_for(&self.url)
    }

    /// The backend description for a bucket and table in this moto.
    pub async fn storage(&self, bucket: &str, table: &str) -> AwsStorage {
        storage_at(&self.url, bucket, table).await
    }

    /// Creates a bucket and table with `hubcap aws-setup`'s code.
    pub async fn setup(&self, bucket: &str, table: &str) -> AwsStorage {
        let storage = self.storage(bucket, table).await;
        hubcap::storage::aws::setup(&storage).await.unwrap();
        storage
    }
}

pub fn env_for(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", url.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// An SDK configuration pointing at `url`, with static credentials.
pub async fn sdk_at(url: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "static"))
        .load()
        .await
}

/// The backend description for a bucket and table behind `url`.
pub async fn storage_at(url: &str, bucket: &str, table: &str) -> AwsStorage {
    AwsStorage { bucket: bucket.to_owned(), table: table.to_owned(), encryption: Encryption::BucketDefault, sdk: Some(sdk_at(url).await) }
}

/// Forwards everything to moto and counts each call by operation:
/// `DynamoDB.GetItem`, `S3.GET`, ... It also records each call as an
/// [`AwsCall`]: who signed it, the IAM actions and resources it needs, and
/// moto's answer (`records`, `take_records`), for the IAM test.
pub struct CountingProxy {
    pub url: String,
    pub calls: Arc<Mutex<BTreeMap<String, usize>>>,
    pub records: Arc<Mutex<Vec<AwsCall>>>,
    /// DynamoDB GetItems by (item key `pk|sk`, Unix second), for the herd
    /// simulation's reads per key per second.
    pub reads: Arc<Mutex<HashMap<(String, u64), usize>>>,
    /// The faults to inject (none until `inject`), and those injected.
    pub faults: Arc<Faults>,
}

/// What real AWS does now and then, and moto never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AwsFault {
    /// DynamoDB's `ThrottlingException` or `ProvisionedThroughputExceededException`
    /// (alternately, 400); S3's `503 SlowDown`.
    Throttle,
    /// DynamoDB's `500 InternalServerError`; S3's `500 InternalError`.
    ServerError,
    /// The call never reaches the service; the connection is reset before
    /// the answer's body.
    ResetUnsent,
    /// The call is made; the connection is reset half-way through its
    /// answer (a write that happened, reported as failed).
    ResetMidAnswer,
    /// The call is made after `FaultPlan::delay` (past the SDK's attempt
    /// timeouts: a late write).
    Delay,
}

/// Which calls get a fault: `per_mille` of the SDK's signed calls
/// (presigned URLs, which clients fetch themselves, and DynamoDB Streams
/// are left alone), spread over `kinds` by a seeded generator.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    pub per_mille: u64,
    pub kinds: Vec<AwsFault>,
    pub delay: std::time::Duration,
    pub seed: u64,
}

impl FaultPlan {
    /// Every kind, at `per_mille`.
    pub fn all(per_mille: u64, seed: u64) -> FaultPlan {
        use AwsFault::*;
        FaultPlan {
            per_mille,
            kinds: vec![Throttle, ServerError, ResetUnsent, ResetMidAnswer, Delay],
            delay: std::time::Duration::from_secs(4),
            seed,
        }
    }
}

#[derive(Default)]
pub struct Faults {
    plan: Mutex<Option<FaultPlan>>,
    calls: std::sync::atomic::AtomicU64,
    /// Faults injected, by (operation, kind).
    injected: Mutex<BTreeMap<(String, AwsFault), usize>>,
    /// Signed calls seen while a plan was set.
    pub eligible: std::sync::atomic::AtomicU64,
}

impl Faults {
    pub fn inject(&self, plan: Option<FaultPlan>) {
        *self.plan.lock().unwrap() = plan;
    }

    pub fn injected(&self) -> BTreeMap<(String, AwsFault), usize> {
        self.injected.lock().unwrap().clone()
    }

    pub fn total(&self) -> usize {
        self.injected.lock().unwrap().values().sum()
    }

    /// The fault for the next signed call of `op`, if any.
    fn pick(&self, op: &str) -> Option<AwsFault> {
        let plan = self.plan.lock().unwrap().clone()?;
        if op.starts_with("DynamoDBStreams") || plan.kinds.is_empty() {
            return None;
        }
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.eligible.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // splitmix64 of (seed, call number).
        let mut z = plan.seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if z % 1000 >= plan.per_mille {
            return None;
        }
        let kind = plan.kinds[((z >> 20) % plan.kinds.len() as u64) as usize];
        *self.injected.lock().unwrap().entry((op.to_owned(), kind)).or_default() += 1;
        if std::env::var_os("HUBCAP_FAULT_LOG").is_some() {
            eprintln!("fault: {kind:?} on {op}");
        }
        Some(kind)
    }

    fn delay(&self) -> std::time::Duration {
        self.plan.lock().unwrap().as_ref().map_or_else(Default::default, |p| p.delay)
    }
}

/// The answer AWS gives for a throttled or failed call.
fn fault_answer(fault: AwsFault, dynamodb: bool, n: usize) -> Response {
    let (status, body, content_type) = match (fault, dynamodb) {
        (AwsFault::Throttle, true) => {
            let kind = if n.is_multiple_of(2) { "ThrottlingException" } else { "ProvisionedThroughputExceededException" };
            (400, format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}","message":"Rate of requests exceeds the allowed throughput."}}"#), "application/x-amz-json-1.0")
        }
        (AwsFault::Throttle, false) => {
            (503, "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>".to_owned(), "application/xml")
        }
        (_, true) => (500, r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"Internal server error"}"#.to_owned(), "application/x-amz-json-1.0"),
        (_, false) => {
            (500, "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>".to_owned(), "application/xml")
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-amzn-requestid", "fault")
        .body(Body::from(body))
        .unwrap()
}

/// An answer whose connection is reset after its headers and `sent` of
/// `total` body bytes.
fn cut_answer(mut out: axum::http::response::Builder, sent: bytes::Bytes, total: usize) -> Response {
    out = out.header("content-length", total.max(sent.len() + 1));
    let stream = futures_util::stream::iter(vec![Ok(sent), Err(std::io::Error::other("fault: connection reset"))]);
    out.body(Body::from_stream(stream)).unwrap()
}

/// One AWS call that went through a [`CountingProxy`].
#[derive(Clone, Debug)]
pub struct AwsCall {
    /// The access key id that signed it (the header's or a presigned URL's
    /// credential), `anonymous` when unsigned.
    pub principal: String,
    /// `DynamoDB.GetItem`, `S3.HEAD /bucket/key`, `secretsmanager.GetSecretValue`, ...
    pub operation: String,
    /// The IAM (action, resource ARN) pairs the call needs, as AWS
    /// authorizes it: e.g. a HeadObject needs `s3:GetObject` on the object, a
    /// DeleteObjects `s3:DeleteObject` on each key, a TransactWriteItems the
    /// item action of each of its items.
    pub needs: Vec<(String, String)>,
    /// moto's HTTP status.
    pub status: u16,
}

/// The account moto puts everything in.
pub const MOTO_ACCOUNT: &str = "123456789012";

struct Proxy {
    upstream: String,
    calls: Arc<Mutex<BTreeMap<String, usize>>>,
    records: Arc<Mutex<Vec<AwsCall>>>,
    reads: Arc<Mutex<HashMap<(String, u64), usize>>>,
    faults: Arc<Faults>,
    http: reqwest::Client,
    /// DynamoDB Streams shard iterator -> its stream's ARN (GetRecords names only the iterator).
    iterators: Mutex<HashMap<String, String>>,
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> CountingProxy {
        let calls: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let records: Arc<Mutex<Vec<AwsCall>>> = Arc::default();
        let reads: Arc<Mutex<HashMap<(String, u64), usize>>> = Arc::default();
        let faults: Arc<Faults> = Arc::default();
        let state = Proxy {
            upstream: upstream.to_owned(),
            calls: calls.clone(),
            records: records.clone(),
            reads: reads.clone(),
            faults: faults.clone(),
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            iterators: Mutex::default(),
        };
        let app = Router::new().fallback(forward).with_state(Arc::new(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        CountingProxy { url, calls, records, reads, faults }
    }

    pub fn take(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// The calls recorded since the last `take_records`, in order.
    pub fn take_records(&self) -> Vec<AwsCall> {
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

async fn forward(State(state): State<Arc<Proxy>>, req: Request) -> Response {
    let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let op = match &target {
        Some(t) => format!("DynamoDB.{}", t.rsplit('.').next().unwrap_or(t)),
        None => format!("S3.{}", req.method()),
    };
    *state.calls.lock().unwrap().entry(op.clone()).or_default() += 1;
    let fault = if req.headers().contains_key("authorization") { state.faults.pick(&op) } else { None };
    let head = req.method() == axum::http::Method::HEAD;
    match fault {
        Some(f @ (AwsFault::Throttle | AwsFault::ServerError)) => return fault_answer(f, target.is_some(), state.faults.total()),
        Some(AwsFault::ResetUnsent) if head => return fault_answer(AwsFault::ServerError, target.is_some(), 0),
        Some(AwsFault::ResetUnsent) => return cut_answer(Response::builder().status(200), bytes::Bytes::new(), 64),
        Some(AwsFault::Delay) => tokio::time::sleep(state.faults.delay()).await,
        _ => {}
    }
    let (principal, region, service) = signer(&req);
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let url = format!("{}{}", state.upstream, req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    headers.remove("host");
    let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap();
    let resp = state.http.request(method.clone(), url).headers(headers.clone()).body(body.clone()).send().await.unwrap();
    let status = resp.status();
    let resp_headers = resp.headers().clone();
    let resp_body = resp.bytes().await.unwrap();

    let (operation, needs) = match &target {
        Some(t) => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let answer: serde_json::Value = serde_json::from_slice(&resp_body).unwrap_or_default();
            if t.ends_with(".GetItem") {
                let key =
                    format!("{}|{}", request["Key"]["pk"]["S"].as_str().unwrap_or(""), request["Key"]["sk"]["S"].as_str().unwrap_or(""));
                let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                *state.reads.lock().unwrap().entry((key, second)).or_default() += 1;
            }
            (json_operation(&service, t), json_needs(&state, &service, t, &request, &answer, &region))
        }
        None if service == "s3" || service.is_empty() => {
            (format!("S3.{method} {path}"), s3_needs(method.as_str(), &path, &query, &headers, &body))
        }
        None => (format!("{service}.{method} {path}?{query}"), vec![(format!("{service}:unknown"), "*".to_owned())]),
    };
    state.records.lock().unwrap().push(AwsCall { principal, operation, needs, status: status.as_u16() });

    let mut out = Response::builder().status(status);
    for (k, v) in &resp_headers {
        if fault == Some(AwsFault::ResetMidAnswer) && k == "content-length" {
            continue;
        }
        out = out.header(k, v);
    }
    if fault == Some(AwsFault::ResetMidAnswer) {
        if head {
            return fault_answer(AwsFault::ServerError, target.is_some(), 0);
        }
        let total = resp_body.len();
        return cut_answer(out, resp_body.slice(..total / 2), total);
    }
    out.body(Body::from(resp_body)).unwrap()
}

/// (access key id, region, service) of a request's SigV4 credential scope,
/// from its `Authorization` header or a presigned URL's `X-Amz-Credential`.
fn signer(req: &Request) -> (String, String, String) {
    let from_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .map(|c| c.split([',', ' ']).next().unwrap_or("").to_owned());
    let from_query = || {
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-credential"))
            .map(|(_, v)| v.into_owned())
    };
    match from_header.or_else(from_query) {
        Some(scope) => {
            let parts: Vec<&str> = scope.split('/').collect();
            let get = |i: usize| parts.get(i).copied().unwrap_or("").to_owned();
            (get(0), get(2), get(3))
        }
        None => ("anonymous".to_owned(), "us-east-1".to_owned(), String::new()),
    }
}

fn json_operation(service: &str, target: &str) -> String {
    let op = target.rsplit('.').next().unwrap_or(target);
    match target.split_once('_').map(|(p, _)| p).unwrap_or(target) {
        "DynamoDB" => format!("DynamoDB.{op}"),
        "DynamoDBStreams" => format!("DynamoDBStreams.{op}"),
        _ => format!("{service}.{op}"),
    }
}

/// What a JSON-protocol call (DynamoDB, DynamoDB Streams, Secrets Manager,
/// SQS) needs: `service:Operation` on the resource its body names.
fn json_needs(
    state: &Proxy,
    service: &str,
    target: &str,
    request: &serde_json::Value,
    answer: &serde_json::Value,
    region: &str,
) -> Vec<(String, String)> {
    let op = target.rsplit('.').next().unwrap_or(target);
    let prefix = if service.is_empty() { "unknown" } else { service };
    let str_of = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let table_arn = |name: &str| format!("arn:aws:dynamodb:{region}:{MOTO_ACCOUNT}:table/{name}");
    match service {
        "dynamodb" if target.starts_with("DynamoDBStreams") => {
            let arn = match op {
                "GetRecords" => {
                    let it = str_of(request, "ShardIterator").unwrap_or_default();
                    state.iterators.lock().unwrap().get(&it).cloned()
                }
                "ListStreams" => None,
                _ => str_of(request, "StreamArn"),
            };
            let arn = arn.unwrap_or_else(|| "*".to_owned());
            let next = match op {
                "GetShardIterator" => str_of(answer, "ShardIterator"),
                "GetRecords" => str_of(answer, "NextShardIterator"),
                _ => None,
            };
            if let Some(next) = next {
                state.iterators.lock().unwrap().insert(next, arn.clone());
            }
            vec![(format!("dynamodb:{op}"), arn)]
        }
        "dynamodb" => match op {
            "TransactWriteItems" | "TransactGetItems" => request["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item.as_object()?.iter().next().map(|(kind, spec)| (kind.clone(), spec.clone())))
                .map(|(kind, spec)| {
                    let action = match kind.as_str() {
                        "Put" => "PutItem",
                        "Update" => "UpdateItem",
                        "Delete" => "DeleteItem",
                        "ConditionCheck" => "ConditionCheckItem",
                        "Get" => "GetItem",
                        other => other,
                    };
                    (format!("dynamodb:{action}"), table_arn(&str_of(&spec, "TableName").unwrap_or_default()))
                })
                .collect(),
            "BatchWriteItem" | "BatchGetItem" => request["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(table, _)| (format!("dynamodb:{op}"), table_arn(table)))
                .collect(),
            _ => {
                let resource = match (str_of(request, "TableName"), str_of(request, "IndexName")) {
                    (Some(t), Some(i)) => format!("{}/index/{i}", table_arn(&t)),
                    (Some(t), None) => table_arn(&t),
                    (None, _) => "*".to_owned(),
                };
                vec![(format!("dynamodb:{op}"), resource)]
            }
        },
        "secretsmanager" => {
            let id = str_of(request, "SecretId").or_else(|| str_of(request, "Name")).unwrap_or_default();
            let arn = if id.starts_with("arn:") { id } else { format!("arn:aws:secretsmanager:{region}:{MOTO_ACCOUNT}:secret:{id}") };
            vec![(format!("secretsmanager:{op}"), arn)]
        }
        "sqs" => {
            let name = str_of(request, "QueueUrl")
                .map(|u| u.trim_end_matches('/').rsplit('/').next().unwrap_or("").to_owned())
                .or_else(|| str_of(request, "QueueName"))
                .unwrap_or_default();
            vec![(format!("sqs:{op}"), format!("arn:aws:sqs:{region}:{MOTO_ACCOUNT}:{name}"))]
        }
        _ => vec![(format!("{prefix}:{op}"), "*".to_owned())],
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a path-style S3 request needs, as S3 authorizes it (the
/// "Actions, resources, and condition keys for Amazon S3" table): HeadObject
/// and GetObject `s3:GetObject`; PutObject, CreateMultipartUpload, UploadPart
/// and CompleteMultipartUpload `s3:PutObject`; ListParts
/// `s3:ListMultipartUploadParts`; AbortMultipartUpload
/// `s3:AbortMultipartUpload`; DeleteObject, and DeleteObjects for each key,
/// `s3:DeleteObject`; ListObjects(V2) and HeadBucket `s3:ListBucket` on the
/// bucket. (That a GetObject/HeadObject of a missing key also needs
/// `s3:ListBucket` is left to the caller: it depends on the answer.)
fn s3_needs(method: &str, path: &str, query: &str, headers: &axum::http::HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    let path = path.trim_start_matches('/');
    let (bucket, key) = match path.split_once('/') {
        Some((b, k)) if !k.is_empty() => (percent_decode(b), Some(percent_decode(k))),
        Some((b, _)) => (percent_decode(b), None),
        None => (percent_decode(path), None),
    };
    let params: Vec<String> = url::form_urlencoded::parse(query.as_bytes()).map(|(k, _)| k.into_owned()).collect();
    let has = |p: &str| params.iter().any(|k| k == p);
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let need = |action: &str, resource: &str| vec![(format!("s3:{action}"), resource.to_owned())];
    let Some(key) = key else {
        return match method {
            "GET" if has("uploads") => need("ListBucketMultipartUploads", &bucket_arn),
            "GET" if has("location") => need("GetBucketLocation", &bucket_arn),
            "GET" if has("versions") => need("ListBucketVersions", &bucket_arn),
            "GET" | "HEAD" => need("ListBucket", &bucket_arn),
            "PUT" if params.is_empty() => need("CreateBucket", &bucket_arn),
            "POST" if has("delete") => {
                let text = String::from_utf8_lossy(body);
                text.split("<Key>")
                    .skip(1)
                    .filter_map(|rest| rest.split("</Key>").next())
                    .map(|k| {
                        let k = k
                            .replace("&lt;", "<")
                            .replace("&gt;", ">")
                            .replace("&quot;", "\"")
                            .replace("&apos;", "'")
                            .replace("&amp;", "&");
                        ("s3:DeleteObject".to_owned(), format!("{bucket_arn}/{k}"))
                    })
                    .collect()
            }
            "DELETE" if params.is_empty() => need("DeleteBucket", &bucket_arn),
            _ => need(&format!("{method}Bucket?{query}"), &bucket_arn),
        };
    };
    let object = format!("{bucket_arn}/{key}");
    match method {
        "GET" if has("uploadId") => need("ListMultipartUploadParts", &object),
        "GET" if has("tagging") => need("GetObjectTagging", &object),
        "GET" if has("acl") => need("GetObjectAcl", &object),
        "GET" if has("attributes") => need("GetObjectAttributes", &object),
        "GET" | "HEAD" => need("GetObject", &object),
        "PUT" if has("tagging") => need("PutObjectTagging", &object),
        "PUT" if has("acl") => need("PutObjectAcl", &object),
        "PUT" => {
            let mut needs = need("PutObject", &object);
            if let Some(src) = headers.get("x-amz-copy-source").and_then(|v| v.to_str().ok()) {
                let src = percent_decode(src.split('?').next().unwrap_or(src));
                needs.push(("s3:GetObject".to_owned(), format!("arn:aws:s3:::{}", src.trim_start_matches('/'))));
            }
            needs
        }
        "POST" if has("uploads") || has("uploadId") => need("PutObject", &object),
        "DELETE" if has("uploadId") => need("AbortMultipartUpload", &object),
        "DELETE" => need("DeleteObject", &object),
        _ => need(&format!("{method}Object?{query}"), &object),
    }
}

/// One call of an AWS JSON-protocol API (DynamoDB, DynamoDB Streams,
/// Secrets Manager) straight to moto, which reads the service from the
/// credential scope and checks no signature. Panics unless it succeeds.
pub async fn aws_json(url: &str, service: &str, target: &str, body: &serde_json::Value) -> serde_json::Value {
    aws_json_as(url, "test", service, target, body).await
}

/// `aws_json` signed (in name: moto checks no signature) with `access_key`,
/// so a [`CountingProxy`] records it as that principal's call.
pub async fn aws_json_as(url: &str, access_key: &str, service: &str, target: &str, body: &serde_json::Value) -> serde_json::Value {
    let version = if service == "secretsmanager" { "1.1" } else { "1.0" };
    let resp = reqwest::Client::new()
        .post(url)
        .header("x-amz-target", target)
        .header("content-type", format!("application/x-amz-json-{version}"))
        .header(
            "authorization",
            format!("AWS4-HMAC-SHA256 Credential={access_key}/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    assert!(status.is_success(), "{target}: {status} {}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).unwrap_or_default()
}

/// Reads a table's DynamoDB Stream from moto, shard by shard, with the
/// reader `hubcap lambda-dev`'s pump uses.
pub struct StreamPump {
    url: String,
    table: String,
    reader: Option<hubcap::lambda::dev::StreamReader>,
}

impl StreamPump {
    pub fn new(moto_url: &str, table: &str) -> StreamPump {
        StreamPump { url: moto_url.to_owned(), table: table.to_owned(), reader: None }
    }

    /// The records written since the last call, as the Lambda event the
    /// event source mapping would deliver.
    pub async fn poll(&mut self) -> aws_lambda_events::event::dynamodb::Event {
        if self.reader.is_none() {
            let sdk = sdk_at(&self.url).await;
            self.reader = Some(hubcap::lambda::dev::StreamReader::new(&sdk, &self.table).await.expect("the table has a stream"));
        }
        let records = self.reader.as_mut().unwrap().read().await.expect("moto's stream reads");
        serde_json::from_value(serde_json::json!({ "Records": records })).expect("stream records parse as the Lambda event")
    }
}

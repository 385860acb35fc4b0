//! AWS on loopback: a `moto_server` per test (S3, DynamoDB and DynamoDB
//! Streams), a counting proxy to measure the AWS calls a request costs, and
//! a stream pump that reads real records from moto's DynamoDB Stream and
//! hands them to the fetcher as Lambda's event source mapping would.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; tests/run.sh does)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http.get(format!("{url}/moto-api/")).send().await.is_ok() {
                return Moto { url, child };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto_server did not start");
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
pub async fn storage_at(url: &str, bucket: &str, table: &str) -> AwsStorage {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "static"))
        .load()
        .await;
    AwsStorage { bucket: bucket.to_owned(), table: table.to_owned(), encryption: Encryption::BucketDefault, sdk: Some(sdk) }
}

/// Forwards everything to moto and counts each call by operation:
/// `DynamoDB.GetItem`, `S3.GET`, ...
pub struct CountingProxy {
    pub url: String,
    pub calls: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> CountingProxy {
        let calls: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let state =
            (upstream.to_owned(), calls.clone(), reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap());
        let app = Router::new().fallback(forward).with_state(Arc::new(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        CountingProxy { url, calls }
    }

    pub fn take(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

type ProxyState = Arc<(String, Arc<Mutex<BTreeMap<String, usize>>>, reqwest::Client)>;

async fn forward(State(state): State<ProxyState>, req: Request) -> Response {
    let (upstream, calls, http) = &*state;
    let op = match req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()) {
        Some(t) => format!("DynamoDB.{}", t.rsplit('.').next().unwrap_or(t)),
        None => format!("S3.{}", req.method()),
    };
    *calls.lock().unwrap().entry(op).or_default() += 1;
    let url = format!("{upstream}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    headers.remove("host");
    let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap();
    let resp = http.request(method, url).headers(headers).body(body).send().await.unwrap();
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    out.body(Body::from(resp.bytes().await.unwrap())).unwrap()
}

/// One call of an AWS JSON-protocol API (DynamoDB, DynamoDB Streams,
/// Secrets Manager) straight to moto, which reads the service from the
/// credential scope and checks no signature. Panics unless it succeeds.
pub async fn aws_json(url: &str, service: &str, target: &str, body: &serde_json::Value) -> serde_json::Value {
    let version = if service == "secretsmanager" { "1.1" } else { "1.0" };
    let resp = reqwest::Client::new()
        .post(url)
        .header("x-amz-target", target)
        .header("content-type", format!("application/x-amz-json-{version}"))
        .header(
            "authorization",
            format!("AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"),
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

/// Reads a table's DynamoDB Stream from moto, shard by shard.
pub struct StreamPump {
    url: String,
    table: String,
    iterators: HashMap<String, String>,
}

impl StreamPump {
    pub fn new(moto_url: &str, table: &str) -> StreamPump {
        StreamPump { url: moto_url.to_owned(), table: table.to_owned(), iterators: HashMap::new() }
    }

    async fn call(&self, target: &str, body: serde_json::Value) -> serde_json::Value {
        aws_json(&self.url, "dynamodb", target, &body).await
    }

    /// The records written since the last call, as the Lambda event the
    /// event source mapping would deliver.
    pub async fn poll(&mut self) -> aws_lambda_events::event::dynamodb::Event {
        let table = self.call("DynamoDB_20120810.DescribeTable", serde_json::json!({ "TableName": self.table })).await;
        let arn = table["Table"]["LatestStreamArn"].as_str().expect("the table has a stream").to_owned();
        let stream = self.call("DynamoDBStreams_20120810.DescribeStream", serde_json::json!({ "StreamArn": arn })).await;
        let mut records = Vec::new();
        for shard in stream["StreamDescription"]["Shards"].as_array().unwrap() {
            let id = shard["ShardId"].as_str().unwrap().to_owned();
            let iterator = match self.iterators.get(&id) {
                Some(it) => it.clone(),
                None => {
                    let it = self
                        .call(
                            "DynamoDBStreams_20120810.GetShardIterator",
                            serde_json::json!({ "StreamArn": arn, "ShardId": id, "ShardIteratorType": "TRIM_HORIZON" }),
                        )
                        .await;
                    it["ShardIterator"].as_str().unwrap().to_owned()
                }
            };
            let page = self.call("DynamoDBStreams_20120810.GetRecords", serde_json::json!({ "ShardIterator": iterator })).await;
            for mut r in page["Records"].as_array().cloned().unwrap_or_default() {
                r["eventSourceARN"] = serde_json::json!(arn);
                records.push(r);
            }
            if let Some(next) = page["NextShardIterator"].as_str() {
                self.iterators.insert(id, next.to_owned());
            }
        }
        serde_json::from_value(serde_json::json!({ "Records": records })).expect("stream records parse as the Lambda event")
    }
}

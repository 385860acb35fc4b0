//! `hubcap lambda-dev`: the two parts of AWS that a local Lambda setup
//! (`cargo lambda watch` + moto) lacks, so a real client can pull through
//! the `api` and `fetcher` binaries on a laptop. Development only: on AWS the
//! Function URL and the event source mapping do this.
//!
//! - A front that forwards each client request to the `api` function's URL
//!   with repeated headers joined by commas, as a Function URL or an HTTP API
//!   delivers them. `cargo lambda watch` passes on only the first of them,
//!   and Docker sends one `Accept` header per media type: without the join an
//!   OCI image (most of Docker Hub's official images) is not negotiated.
//! - A pump that reads the table's DynamoDB Stream and invokes the `fetcher`
//!   function with batches of the records the template's filter lets through
//!   (blob items left `pending`), retrying those it reports failed, as the
//!   event source mapping does.
//!
//! It knows HTTP and the stream's wire format; nothing of the mirror itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::assemble::BoxError;

/// Records per fetcher invocation (the template's `StreamBatchSize` default).
const BATCH_SIZE: usize = 10;
/// Deliveries of a record the fetcher keeps failing before it is dropped
/// (the template's `StreamMaximumRetryAttempts` default, plus the first).
const DELIVERIES: u32 = 4;
/// Largest request body forwarded (a pull sends none).
const MAX_REQUEST_BODY: usize = 1 << 20;

pub struct LambdaDevOptions {
    /// Where clients connect (the mirror URL for daemon.json).
    pub listen: SocketAddr,
    /// The `api` function's URL under `cargo lambda watch`.
    pub api_url: String,
    /// The table whose stream feeds the fetcher; `None`: no pump.
    pub table: Option<String>,
    /// The `fetcher` function's invoke URL under `cargo lambda watch`.
    pub fetcher_url: Option<String>,
    /// How often the stream is read.
    pub poll_every: Duration,
}

/// Runs the front and, with a table and a fetcher URL, the pump, until
/// `shutdown` resolves.
pub async fn run(opts: LambdaDevOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(opts.listen).await.map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let pump = match (&opts.table, &opts.fetcher_url) {
        (Some(table), Some(fetcher)) => {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let mut pump = Pump::new(&sdk, table, fetcher).await?;
            let every = opts.poll_every;
            tracing::info!(table, fetcher, stream = %pump.stream.arn, "pumping the table's stream into the fetcher");
            Some(tokio::spawn(async move {
                loop {
                    if let Err(e) = pump.step().await {
                        tracing::warn!(error = %e, "stream pump");
                    }
                    tokio::time::sleep(every).await;
                }
            }))
        }
        (None, None) => None,
        _ => return Err("--table and --fetcher-url go together".into()),
    };
    tracing::info!(listen = %listener.local_addr()?, api = %opts.api_url, "forwarding clients to the api function");
    let result = axum::serve(listener, front(&opts.api_url)).with_graceful_shutdown(shutdown).await;
    if let Some(p) = pump {
        p.abort();
    }
    Ok(result?)
}

/// The front: every request forwarded to `api_url`, repeated headers joined.
pub fn front(api_url: &str) -> Router {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("an HTTP client");
    Router::new().fallback(forward).with_state(Arc::new((api_url.trim_end_matches('/').to_owned(), http)))
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(name.as_str(), "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "proxy-connection")
}

/// One value per header name, repeated values joined with commas (RFC 9110
/// allows it for every list-valued field), as AWS's HTTP front ends deliver
/// them in payload 2.0.
pub fn join_repeated(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in headers.keys() {
        if hop_by_hop(name) {
            continue;
        }
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        if let Ok(v) = HeaderValue::from_bytes(&values.join(&b","[..])) {
            out.insert(name.clone(), v);
        }
    }
    out
}

async fn forward(State(state): State<Arc<(String, reqwest::Client)>>, req: Request) -> Response {
    let (api, http) = &*state;
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let target = format!("{api}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let sent = http.request(parts.method.clone(), target).headers(join_repeated(&parts.headers)).body(body).send().await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the api function did not answer");
            return (StatusCode::BAD_GATEWAY, format!("the api function did not answer: {e}\n")).into_response();
        }
    };
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    // A HEAD answer keeps the function's Content-Length with no body.
    *out.headers_mut() = headers;
    out
}

/// The table's stream and where its shards were read up to.
struct StreamCursor {
    arn: String,
    iterators: HashMap<String, String>,
}

/// Reads the stream and invokes the fetcher, as the event source mapping.
struct Pump {
    stream: StreamCursor,
    client: StreamsClient,
    http: reqwest::Client,
    fetcher_url: String,
    /// Records the fetcher reported failed, with their deliveries so far.
    retry: Vec<(Value, u32)>,
}

impl Pump {
    async fn new(sdk: &aws_config::SdkConfig, table: &str, fetcher_url: &str) -> Result<Pump, BoxError> {
        let described = aws_sdk_dynamodb::Client::new(sdk).describe_table().table_name(table).send().await?;
        let arn = described.table.and_then(|t| t.latest_stream_arn).ok_or_else(|| format!("table {table} has no stream"))?;
        Ok(Pump {
            stream: StreamCursor { arn, iterators: HashMap::new() },
            client: StreamsClient::new(sdk)?,
            http: reqwest::Client::new(),
            fetcher_url: fetcher_url.to_owned(),
            retry: Vec::new(),
        })
    }

    /// Reads what the stream has, then delivers it (and earlier failures)
    /// to the fetcher in batches.
    async fn step(&mut self) -> Result<(), BoxError> {
        let mut records: Vec<(Value, u32)> = std::mem::take(&mut self.retry);
        records.extend(self.read().await?.into_iter().filter(passes_filter).map(|r| (r, 0)));
        let mut failed = Vec::new();
        let mut rest = records.into_iter();
        loop {
            let batch: Vec<(Value, u32)> = rest.by_ref().take(BATCH_SIZE).collect();
            if batch.is_empty() {
                break;
            }
            failed.extend(self.deliver(batch).await);
        }
        for (record, deliveries) in failed {
            if deliveries >= DELIVERIES {
                tracing::warn!(record = %record["dynamodb"]["SequenceNumber"], "fetcher failed the record {deliveries} times; dropped (on AWS: the dead-letter queue)");
            } else {
                self.retry.push((record, deliveries));
            }
        }
        Ok(())
    }

    /// One invocation; returns the records to deliver again.
    async fn deliver(&self, batch: Vec<(Value, u32)>) -> Vec<(Value, u32)> {
        let event = json!({ "Records": batch.iter().map(|(r, _)| r).collect::<Vec<_>>() });
        let answer = async {
            let resp = self.http.post(&self.fetcher_url).body(event.to_string()).send().await?.error_for_status()?;
            Ok::<Value, BoxError>(serde_json::from_slice(&resp.bytes().await?)?)
        };
        let failed_ids: Option<Vec<String>> = match answer.await {
            Ok(v) => Some(
                v["batchItemFailures"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "fetcher invocation failed; the whole batch is delivered again");
                None
            }
        };
        batch
            .into_iter()
            .filter(|(r, _)| {
                let seq = r["dynamodb"]["SequenceNumber"].as_str().unwrap_or_default();
                failed_ids.as_ref().is_none_or(|ids| ids.iter().any(|id| id == seq))
            })
            .map(|(r, n)| (r, n + 1))
            .collect()
    }

    /// The records written since the last read, shard by shard, shaped as
    /// Lambda delivers them.
    async fn read(&mut self) -> Result<Vec<Value>, BoxError> {
        let arn = self.stream.arn.clone();
        let described = self.client.call("DescribeStream", json!({ "StreamArn": arn })).await?;
        let mut records = Vec::new();
        for shard in described["StreamDescription"]["Shards"].as_array().cloned().unwrap_or_default() {
            let Some(id) = shard["ShardId"].as_str() else { continue };
            let iterator = match self.stream.iterators.get(id) {
                Some(it) => it.clone(),
                None => {
                    let it = self
                        .client
                        .call("GetShardIterator", json!({ "StreamArn": arn, "ShardId": id, "ShardIteratorType": "TRIM_HORIZON" }))
                        .await?;
                    it["ShardIterator"].as_str().ok_or("no shard iterator")?.to_owned()
                }
            };
            let page = self.client.call("GetRecords", json!({ "ShardIterator": iterator })).await?;
            for mut r in page["Records"].as_array().cloned().unwrap_or_default() {
                r["eventSourceARN"] = json!(arn);
                records.push(r);
            }
            match page["NextShardIterator"].as_str() {
                Some(next) => self.stream.iterators.insert(id.to_owned(), next.to_owned()),
                None => self.stream.iterators.remove(id),
            };
        }
        Ok(records)
    }
}

/// The template's stream filter: records that leave a blob item `pending`.
fn passes_filter(record: &Value) -> bool {
    let image = &record["dynamodb"]["NewImage"];
    matches!(record["eventName"].as_str(), Some("INSERT" | "MODIFY")) && image["sk"]["S"] == "blob" && image["state"]["S"] == "pending"
}

/// The DynamoDB Streams JSON API, signed with the SDK's credentials. (The
/// stream is read only here, in development: four calls do not earn a
/// whole SDK crate in every Lambda build.)
struct StreamsClient {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    credentials: aws_credential_types::provider::SharedCredentialsProvider,
}

impl StreamsClient {
    fn new(sdk: &aws_config::SdkConfig) -> Result<StreamsClient, BoxError> {
        let region = sdk.region().map(|r| r.to_string()).ok_or("no AWS region configured")?;
        let endpoint = sdk.endpoint_url().map(str::to_owned).unwrap_or_else(|| format!("https://streams.dynamodb.{region}.amazonaws.com"));
        let credentials = sdk.credentials_provider().ok_or("no AWS credentials configured")?;
        Ok(StreamsClient { http: reqwest::Client::new(), endpoint, region, credentials })
    }

    async fn call(&self, operation: &str, body: Value) -> Result<Value, BoxError> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let body = body.to_string();
        let target = format!("DynamoDBStreams_20120810.{operation}");
        let headers = [("content-type", "application/x-amz-json-1.0"), ("x-amz-target", target.as_str())];
        let identity = self.credentials.provide_credentials().await?.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("dynamodb")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()?
            .into();
        let signable = SignableRequest::new("POST", &self.endpoint, headers.iter().copied(), SignableBody::Bytes(body.as_bytes()))?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let mut req = self.http.post(&self.endpoint).body(body.clone());
        for (k, v) in headers.iter().copied().chain(instructions.headers()) {
            req = req.header(k, v);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            return Err(format!("DynamoDB Streams {operation}: {status} {text}").into());
        }
        Ok(serde_json::from_str(&text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn repeated_headers_are_joined_and_connection_headers_dropped() {
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"));
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::HOST, HeaderValue::from_static("127.0.0.1:5000"));
        let joined = join_repeated(&h);
        let accept: Vec<&HeaderValue> = joined.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json"]);
        assert!(!joined.contains_key(header::CONNECTION));
        assert_eq!(joined[header::HOST], "127.0.0.1:5000");
    }

    #[test]
    fn the_pump_passes_what_the_templates_filter_passes() {
        let record = |event: &str, sk: &str, state: &str| json!({ "eventName": event, "dynamodb": { "NewImage": { "sk": { "S": sk }, "state": { "S": state } } } });
        assert!(passes_filter(&record("INSERT", "blob", "pending")));
        assert!(passes_filter(&record("MODIFY", "blob", "pending")));
        assert!(!passes_filter(&record("MODIFY", "blob", "fetching")));
        assert!(!passes_filter(&record("REMOVE", "blob", "pending")));
        assert!(!passes_filter(&record("INSERT", "manifest", "pending")));
    }
}

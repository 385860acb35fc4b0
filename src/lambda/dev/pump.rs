//! The event source mapping of the table's stream, played for `cargo lambda
//! watch`: the stream read with the DynamoDB Streams API (signed with the
//! SDK's credentials), the template's filter applied, the `fetcher` invoked
//! with batches, the records it reports failed delivered again.

use std::collections::HashMap;
use std::time::SystemTime;

use aws_credential_types::provider::ProvideCredentials;
use serde_json::{Value, json};

use crate::assemble::BoxError;

/// Records per fetcher invocation (the template's `StreamBatchSize` default).
const BATCH_SIZE: usize = 10;
/// Deliveries of a record the fetcher keeps failing before it is dropped
/// (the template's `StreamMaximumRetryAttempts` default, plus the first).
const DELIVERIES: u32 = 4;

/// A table's stream and where its shards were read up to (also the
/// tests' stream pump).
pub struct StreamReader {
    arn: String,
    iterators: HashMap<String, String>,
    client: StreamsClient,
}

/// Reads the stream and invokes the fetcher, as the event source mapping.
pub struct Pump {
    stream: StreamReader,
    http: reqwest::Client,
    fetcher_url: String,
    /// Records the fetcher reported failed, with their deliveries so far.
    retry: Vec<(Value, u32)>,
}

impl Pump {
    /// The stream it reads.
    pub fn stream_arn(&self) -> &str {
        &self.stream.arn
    }

    pub async fn new(sdk: &aws_config::SdkConfig, table: &str, fetcher_url: &str) -> Result<Pump, BoxError> {
        Ok(Pump {
            stream: StreamReader::new(sdk, table).await?,
            http: reqwest::Client::new(),
            fetcher_url: fetcher_url.to_owned(),
            retry: Vec::new(),
        })
    }

    /// Reads what the stream has, then delivers it (and earlier failures)
    /// to the fetcher in batches.
    pub async fn step(&mut self) -> Result<(), BoxError> {
        let mut records: Vec<(Value, u32)> = std::mem::take(&mut self.retry);
        records.extend(self.stream.read().await?.into_iter().filter(passes_filter).map(|r| (r, 0)));
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
}

impl StreamReader {
    /// The stream of `table`, to be read from its oldest record.
    pub async fn new(sdk: &aws_config::SdkConfig, table: &str) -> Result<StreamReader, BoxError> {
        let described = aws_sdk_dynamodb::Client::new(sdk).describe_table().table_name(table).send().await?;
        let arn = described.table.and_then(|t| t.latest_stream_arn).ok_or_else(|| format!("table {table} has no stream"))?;
        Ok(StreamReader { arn, iterators: HashMap::new(), client: StreamsClient::new(sdk)? })
    }

    /// The records written since the last read, shard by shard, shaped as
    /// Lambda delivers them.
    pub async fn read(&mut self) -> Result<Vec<Value>, BoxError> {
        let arn = self.arn.clone();
        let described = self.client.call("DescribeStream", json!({ "StreamArn": arn })).await?;
        let mut records = Vec::new();
        for shard in described["StreamDescription"]["Shards"].as_array().cloned().unwrap_or_default() {
            let Some(id) = shard["ShardId"].as_str() else { continue };
            let iterator = match self.iterators.get(id) {
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
                Some(next) => self.iterators.insert(id.to_owned(), next.to_owned()),
                None => self.iterators.remove(id),
            };
        }
        Ok(records)
    }
}

/// The template's stream filter: records that leave a blob item `pending`.
pub fn passes_filter(record: &Value) -> bool {
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

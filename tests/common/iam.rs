//! IAM for the AWS tests: each function signs its calls with its own access
//! key (named after its logical id in template.yaml), the [`CountingProxy`]
//! in front of moto records what every call needs (action, resource) and
//! moto's answer, and [`violations`] evaluates those needs against the
//! function's own policies from template.yaml after the SAM transform
//! (tests/tools/sam_policies.py, moto's IAM evaluator).
//!
//! moto does not enforce IAM here (its enforcement is action-only for
//! DynamoDB and checks signatures, which a recording proxy would break), so
//! the decisions are made on the recorded calls, after the fact, with the
//! rule moto lacks: a GetObject/HeadObject of a missing key needs
//! `s3:ListBucket` on the bucket (without it AWS answers 403, not 404).
//!
//! [`CountingProxy`]: super::moto::CountingProxy

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hubcap::mirror::fetch::Fetcher;

use super::moto::{AwsCall, aws_json_as};

/// The functions of template.yaml, by logical id: also their access key ids.
pub const API: &str = "ApiFunction";
pub const FETCHER: &str = "FetcherFunction";
pub const GC: &str = "GcFunction";
pub const FUNCTIONS: [&str; 3] = [API, FETCHER, GC];

/// Every function's secret access key (moto checks no signature).
pub const SECRET_KEY: &str = "hubcap-iam-test-secret";

/// The template the policies come from: `HUBCAP_TEMPLATE` (to show the test
/// failing on an edited copy), else the project's template.yaml.
pub fn template() -> PathBuf {
    match std::env::var_os("HUBCAP_TEMPLATE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("template.yaml"),
    }
}

/// An SDK configuration for `endpoint` signing as `function`.
pub async fn sdk_as(endpoint: &str, function: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(function, SECRET_KEY, None, None, "iam-test"))
        .load()
        .await
}

/// Points the process's default AWS configuration (what
/// `aws_config::load_defaults` reads: the Secrets Manager client of a cold
/// start uses it) at `endpoint`, signing as `function`.
///
/// Environment changes are process-wide: call it only where no other thread
/// of the test reads the environment (the test binary has one test; the
/// other tasks use explicit SDK configurations).
pub fn default_credentials(endpoint: &str, function: &str) {
    // No profile of this machine's user: empty configuration files.
    let nowhere = std::env::temp_dir().join("hubcap-iam-empty-aws-config");
    std::fs::write(&nowhere, "").unwrap();
    // SAFETY: see above; the test runs one test function, and no task of it
    // reads or writes the environment meanwhile.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", endpoint);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", &nowhere);
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &nowhere);
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::set_var("AWS_ACCESS_KEY_ID", function);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    }
}

/// The stack's physical resources in the test: what `Ref` and `Fn::GetAtt`
/// resolve to in the policies.
pub struct Stack {
    pub bucket: String,
    pub table: String,
    pub stream_arn: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub secret_arn: String,
}

impl Stack {
    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({
            "UpstreamCredentialsSecretArn": self.secret_arn,
            "AllowedClientCidrs": "127.0.0.0/8",
        })
    }

    fn resources(&self) -> serde_json::Value {
        let table_arn = format!("arn:aws:dynamodb:us-east-1:{}:table/{}", super::moto::MOTO_ACCOUNT, self.table);
        let queue_name = self.queue_arn.rsplit(':').next().unwrap_or_default();
        let mut r = serde_json::json!({
            "BlobBucket": { "Ref": self.bucket, "Arn": format!("arn:aws:s3:::{}", self.bucket) },
            "IndexTable": { "Ref": self.table, "Arn": table_arn, "StreamArn": self.stream_arn },
            "FetchDeadLetterQueue": { "Ref": self.queue_url, "Arn": self.queue_arn, "QueueName": queue_name },
        });
        for f in FUNCTIONS {
            let arn = format!("arn:aws:lambda:us-east-1:{}:function:hubcap-{f}", super::moto::MOTO_ACCOUNT);
            r[f] = serde_json::json!({ "Ref": format!("hubcap-{f}"), "Arn": arn });
            r[format!("{f}Role")] = serde_json::json!({
                "Ref": format!("hubcap-{f}Role"),
                "Arn": format!("arn:aws:iam::{}:role/hubcap-{f}Role", super::moto::MOTO_ACCOUNT),
            });
        }
        r
    }
}

/// One thing a function did that its policy must allow.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Check {
    pub function: String,
    pub action: String,
    pub resource: String,
    /// Why it is needed: the call, or for a need derived from a rule
    /// (`derived`), the rule.
    pub because: String,
    pub derived: bool,
}

/// What the recorded calls of the functions need, one check per
/// (function, action, resource, rule); calls by other principals (the test's
/// own setup) are not checked.
pub fn checks(calls: &[AwsCall]) -> Vec<Check> {
    let mut out: BTreeMap<(String, String, String, bool), Check> = BTreeMap::new();
    for call in calls.iter().filter(|c| FUNCTIONS.contains(&c.principal.as_str())) {
        for (action, resource) in &call.needs {
            let because = format!("{} (HTTP {})", call.operation, call.status);
            out.entry((call.principal.clone(), action.clone(), resource.clone(), false)).or_insert_with(|| Check {
                function: call.principal.clone(),
                action: action.clone(),
                resource: resource.clone(),
                because,
                derived: false,
            });
            // S3 answers a GetObject/HeadObject of a missing key with 404
            // only to a caller that may list the bucket; to others with 403.
            if action == "s3:GetObject" && call.status == 404 {
                let bucket = resource.split('/').next().unwrap_or(resource).to_owned();
                let head = if call.operation.starts_with("S3.HEAD") { "HeadObject" } else { "GetObject" };
                let because =
                    format!("{head} of a missing key needs s3:ListBucket on {bucket} (AWS answers 403 without it; {})", call.operation);
                out.entry((call.principal.clone(), "s3:ListBucket".into(), bucket.clone(), true)).or_insert_with(|| Check {
                    function: call.principal.clone(),
                    action: "s3:ListBucket".into(),
                    resource: bucket,
                    because,
                    derived: true,
                });
            }
        }
    }
    out.into_values().collect()
}

/// The checks the template's policies do not allow, as messages naming the
/// function, the action and the resource; and every check's decision.
pub fn violations(stack: &Stack, checks: &[Check]) -> (Vec<String>, Vec<(Check, String)>) {
    violations_in(&template(), stack, checks)
}

/// `violations` against the policies of the template at `template`.
pub fn violations_in(template: &std::path::Path, stack: &Stack, checks: &[Check]) -> (Vec<String>, Vec<(Check, String)>) {
    let input = serde_json::json!({
        "template": template,
        "parameters": stack.parameters(),
        "resources": stack.resources(),
        "checks": checks.iter().map(|c| serde_json::json!({
            "function": c.function, "action": c.action, "resource": c.resource,
        })).collect::<Vec<_>>(),
    });
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/sam_policies.py");
    let mut child = std::process::Command::new("python3")
        .arg(&tool)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with aws-sam-translator, cfn-lint and moto (tests/install-tools.sh)");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}: {}", tool.display(), String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let decisions = result["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), checks.len());
    let mut messages = Vec::new();
    let mut all = Vec::new();
    for (check, d) in checks.iter().zip(decisions) {
        let decision = d["decision"].as_str().unwrap().to_owned();
        if decision != "PERMITTED" {
            let how = if decision == "DENIED" { "is denied by" } else { "is not allowed by" };
            messages.push(if check.derived {
                format!("{}: {}, which its policy in {} does not allow", check.function, check.because, template.display())
            } else {
                format!(
                    "{}: {} on {} {how} its policy in {} (needed by {})",
                    check.function,
                    check.action,
                    check.resource,
                    template.display(),
                    check.because
                )
            });
        }
        all.push((check.clone(), decision));
    }
    (messages, all)
}

/// Lambda's DynamoDB event source mapping for the fetcher, with the
/// fetcher's role (its credentials): reads the stream, delivers the records
/// the template's FilterCriteria pass (blob items left `pending`), and sends
/// a batch whose records failed to the on-failure destination (the
/// dead-letter queue). Retries are not replayed: a failed batch is treated
/// as having exhausted them.
pub struct EventSourceMapping {
    stop: Arc<AtomicBool>,
    pub dead_lettered: Arc<AtomicUsize>,
    pub delivered: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EventSourceMapping {
    pub fn start(endpoint: &str, stream_arn: &str, fetcher: Arc<Fetcher>, queue_url: &str) -> EventSourceMapping {
        let stop = Arc::new(AtomicBool::new(false));
        let dead_lettered = Arc::new(AtomicUsize::new(0));
        let delivered = Arc::new(AtomicUsize::new(0));
        let (endpoint, stream_arn, queue_url) = (endpoint.to_owned(), stream_arn.to_owned(), queue_url.to_owned());
        let (flag, dead, count) = (stop.clone(), dead_lettered.clone(), delivered.clone());
        let task = tokio::spawn(async move {
            let call = |target: &'static str, body: serde_json::Value| {
                let endpoint = endpoint.clone();
                async move { aws_json_as(&endpoint, FETCHER, "dynamodb", target, &body).await }
            };
            let mut iterators: BTreeMap<String, String> = BTreeMap::new();
            while !flag.load(Ordering::SeqCst) {
                let stream = call("DynamoDBStreams_20120810.DescribeStream", serde_json::json!({ "StreamArn": stream_arn })).await;
                for shard in stream["StreamDescription"]["Shards"].as_array().cloned().unwrap_or_default() {
                    let id = shard["ShardId"].as_str().unwrap().to_owned();
                    let iterator = match iterators.get(&id) {
                        Some(it) => it.clone(),
                        None => call(
                            "DynamoDBStreams_20120810.GetShardIterator",
                            serde_json::json!({ "StreamArn": stream_arn, "ShardId": id, "ShardIteratorType": "TRIM_HORIZON" }),
                        )
                        .await["ShardIterator"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    };
                    let page = call("DynamoDBStreams_20120810.GetRecords", serde_json::json!({ "ShardIterator": iterator })).await;
                    if let Some(next) = page["NextShardIterator"].as_str() {
                        iterators.insert(id.clone(), next.to_owned());
                    }
                    let mut records = Vec::new();
                    for mut r in page["Records"].as_array().cloned().unwrap_or_default() {
                        r["eventSourceARN"] = serde_json::json!(stream_arn);
                        let record: aws_lambda_events::event::dynamodb::EventRecord = serde_json::from_value(r.clone()).unwrap();
                        // FilterCriteria: INSERT/MODIFY leaving a blob item pending.
                        if hubcap::lambda::job_from_record(&record).ok().flatten().is_some() {
                            records.push(r);
                        }
                    }
                    if records.is_empty() {
                        continue;
                    }
                    let n = records.len();
                    count.fetch_add(n, Ordering::SeqCst);
                    let first = records[0]["dynamodb"]["SequenceNumber"].clone();
                    let last = records[n - 1]["dynamodb"]["SequenceNumber"].clone();
                    let event: aws_lambda_events::event::dynamodb::Event =
                        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap();
                    let resp = hubcap::lambda::handle_stream(&fetcher, event).await;
                    if !resp.batch_item_failures.is_empty() {
                        // Lambda's on-failure record for a stream batch.
                        let message = serde_json::json!({
                            "requestContext": {
                                "condition": "RetryAttemptsExhausted",
                                "functionArn": format!("arn:aws:lambda:us-east-1:{}:function:hubcap-{FETCHER}", super::moto::MOTO_ACCOUNT),
                            },
                            "DDBStreamBatchInfo": {
                                "shardId": id, "startSequenceNumber": first, "endSequenceNumber": last,
                                "streamArn": stream_arn, "batchSize": n,
                            },
                        });
                        aws_json_as(
                            &endpoint,
                            FETCHER,
                            "sqs",
                            "AmazonSQS.SendMessage",
                            &serde_json::json!({ "QueueUrl": queue_url, "MessageBody": message.to_string() }),
                        )
                        .await;
                        dead.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        EventSourceMapping { stop, dead_lettered, delivered, task: Some(task) }
    }

    /// Stops polling after the current round.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

impl Drop for EventSourceMapping {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

//! `template.yaml` agrees with the code: every function builds a binary that
//! exists, every environment variable it sets is one the code reads, and the
//! table, stream filter and bucket layout are the ones the backends use.
//! The template is read with cfn-lint's own decoder (intrinsic functions
//! included), which the test command installs.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use serde_json::Value;

fn template(path: &str) -> Value {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sys\nfrom cfnlint.decode import decode\nt, m = decode(sys.argv[1])\nassert not m, m\nprint(json.dumps(t))",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .output()
        .expect("python3 with cfn-lint (tests/run.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn functions(t: &Value) -> Vec<(String, &Value)> {
    t["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
        .map(|(name, r)| (name.clone(), r))
        .collect()
}

/// Every `HUBCAP_*` variable the Lambda binaries read.
fn variables_the_code_reads() -> BTreeSet<String> {
    hubcap::config::LambdaSettings::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_function_builds_an_existing_binary_on_the_custom_runtime() {
    let t = template("template.yaml");
    let globals = &t["Globals"]["Function"];
    assert_eq!(globals["Runtime"], "provided.al2023");
    assert_eq!(globals["Handler"], "bootstrap");
    let fns = functions(&t);
    let binaries: BTreeSet<String> = fns
        .iter()
        .map(|(name, f)| {
            assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda", "{name}");
            assert_eq!(f["Properties"]["CodeUri"], ".", "{name}");
            let bin = f["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap().to_owned();
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/bin/{bin}.rs")).exists(), "{name}: binary {bin} exists");
            bin
        })
        .collect();
    assert_eq!(binaries, ["api", "fetcher", "gc"].iter().map(|s| s.to_string()).collect());
    assert_eq!(t["Parameters"]["Architecture"]["Default"], "arm64");
}

#[test]
fn every_environment_variable_is_one_the_code_reads() {
    let t = template("template.yaml");
    let read = variables_the_code_reads();
    let mut set = BTreeSet::new();
    let mut collect = |vars: &Value| {
        for k in vars.as_object().into_iter().flat_map(|o| o.keys()) {
            set.insert(k.clone());
        }
    };
    collect(&t["Globals"]["Function"]["Environment"]["Variables"]);
    for (_, f) in functions(&t) {
        collect(&f["Properties"]["Environment"]["Variables"]);
    }
    let unknown: Vec<&String> = set.iter().filter(|v| !read.contains(*v)).collect();
    assert!(unknown.is_empty(), "the template sets variables no code reads: {unknown:?}");
    for required in ["HUBCAP_BUCKET", "HUBCAP_TABLE", "HUBCAP_UPSTREAM", "HUBCAP_CREDENTIALS_SECRET", "HUBCAP_BLOB_WAIT"] {
        assert!(set.contains(required), "{required} is set");
    }
    // The blob wait stays under API Gateway's 30 s integration timeout.
    assert!(t["Parameters"]["BlobWaitSeconds"]["MaxValue"].as_u64().unwrap() < 30);
}

#[test]
fn the_table_and_stream_filter_match_the_dynamodb_backend() {
    let t = template("template.yaml");
    let table = &t["Resources"]["IndexTable"]["Properties"];
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(
        table["KeySchema"],
        serde_json::json!([{ "AttributeName": "pk", "KeyType": "HASH" }, { "AttributeName": "sk", "KeyType": "RANGE" }])
    );
    assert_eq!(table["StreamSpecification"]["StreamViewType"], "NEW_IMAGE");
    // No TTL: expiry is the lifecycle sweep's, which knows what is referenced.
    assert!(table.get("TimeToLiveSpecification").is_none(), "{table}");
    assert_eq!(table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"], true);

    let stream = &t["Resources"]["FetcherFunction"]["Properties"]["Events"]["PendingBlobs"]["Properties"];
    assert_eq!(stream["FunctionResponseTypes"], serde_json::json!(["ReportBatchItemFailures"]));
    assert_eq!(stream["BisectBatchOnFunctionError"], true);
    let pattern: Value = serde_json::from_str(stream["FilterCriteria"]["Filters"][0]["Pattern"].as_str().unwrap()).unwrap();
    // The filter lets through exactly what the fetcher acts on.
    let record = |state: &str| {
        let d = format!("sha256:{}", "a".repeat(64));
        serde_json::json!({
            "eventID": "1", "eventName": "INSERT", "awsRegion": "us-east-1",
            "dynamodb": { "NewImage": {
                "pk": { "S": format!("blob#{d}") }, "sk": { "S": "blob" }, "state": { "S": state }, "source": { "S": "docker.io/library/x" }
            }, "SequenceNumber": "1", "SizeBytes": 100, "StreamViewType": "NEW_IMAGE" }
        })
    };
    assert_eq!(pattern["dynamodb"]["NewImage"]["state"]["S"], serde_json::json!(["pending"]));
    assert_eq!(pattern["dynamodb"]["NewImage"]["sk"]["S"], serde_json::json!(["blob"]));
    for (state, wanted) in [("pending", true), ("fetching", false), ("ready", false)] {
        let event: aws_lambda_events::event::dynamodb::Event =
            serde_json::from_value(serde_json::json!({ "Records": [record(state)] })).unwrap();
        assert_eq!(hubcap::lambda::job_from_record(&event.records[0]).unwrap().is_some(), wanted, "{state}");
    }

    let bucket = &t["Resources"]["BlobBucket"]["Properties"];
    assert_eq!(bucket["PublicAccessBlockConfiguration"]["RestrictPublicBuckets"], true);
    assert_eq!(bucket["LifecycleConfiguration"]["Rules"][0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"], 1);
    let d = hubcap::oci::Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap();
    assert!(hubcap::storage::aws::blob_key(&d).starts_with("blobs/"), "the policies' blobs/* prefix is where blobs go");
}

#[test]
fn the_templates_pass_cfn_lint_and_sam_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut templates = vec![root.join("template.yaml")];
    templates.extend(
        std::fs::read_dir(root.join("infra")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")),
    );
    for t in &templates {
        let lint = std::process::Command::new("cfn-lint").arg(t).output().expect("cfn-lint (tests/run.sh installs it)");
        assert!(lint.status.success(), "cfn-lint {}:\n{}", t.display(), String::from_utf8_lossy(&lint.stdout));
        let sam = std::process::Command::new("sam")
            .args(["validate", "--lint", "--region", "us-east-1", "--template-file"])
            .arg(t)
            .env("SAM_CLI_TELEMETRY", "0")
            .output()
            .expect("sam (tests/run.sh installs aws-sam-cli)");
        assert!(
            sam.status.success(),
            "sam validate {}:\n{}{}",
            t.display(),
            String::from_utf8_lossy(&sam.stdout),
            String::from_utf8_lossy(&sam.stderr)
        );
    }
}

#[test]
fn cargo_run_starts_the_cli_as_the_readme_says() {
    // The README's first command is `cargo run --release -- serve`; with the
    // Lambda binaries beside it, cargo needs to be told which one to run.
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .output()
        .unwrap();
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["packages"][0]["default_run"], "hubcap");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve"));
}

#[test]
fn the_gc_function_runs_on_schedules_the_parameters_set() {
    let t = template("template.yaml");
    let gc = &t["Resources"]["GcFunction"]["Properties"];
    let events = &gc["Events"];
    assert_eq!(events["Schedule"]["Type"], "Schedule");
    assert_eq!(events["Schedule"]["Properties"]["Schedule"]["Ref"], "GcSchedule");
    assert_eq!(t["Parameters"]["GcSchedule"]["Default"], "rate(1 day)");
    // The warm schedule sends what `events/warm.json` holds, and runs only with a warm list.
    let warm = &events["Warm"]["Properties"];
    assert_eq!(warm["Schedule"]["Ref"], "WarmSchedule");
    let input: Value = serde_json::from_str(warm["Input"].as_str().unwrap()).unwrap();
    let sample: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("events/warm.json")).unwrap()).unwrap();
    assert_eq!(input, sample);
    assert_eq!(warm["State"]["Fn::If"][0], "HasWarmImages");
    // Lifecycle settings reach the function, with the CLI's defaults.
    let vars = &gc["Environment"]["Variables"];
    for (var, param, default) in
        [("HUBCAP_UNUSED_FOR", "UnusedFor", "30d"), ("HUBCAP_GRACE", "GracePeriod", "1d"), ("HUBCAP_PINS", "PinnedImages", "")]
    {
        assert_eq!(vars[var]["Ref"], param, "{var}");
        assert_eq!(t["Parameters"][param]["Default"], default, "{param}");
    }
    for d in ["30d", "1d", "12h", "90m", "0"] {
        hubcap::lifecycle::parse_duration(d).unwrap();
    }
    // It may read the table page by page and delete blobs.
    let actions: Vec<String> = gc["Policies"][0]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    for needed in ["dynamodb:Scan", "dynamodb:DeleteItem", "dynamodb:UpdateItem", "s3:DeleteObject", "s3:PutObject"] {
        assert!(actions.iter().any(|a| a == needed), "gc may {needed}: {actions:?}");
    }
}

// ------------------------------------------------------------------------
// What the emulators do not enforce, checked on the template itself: the
// template after the SAM transform (samtranslator, offline), with its
// conditions evaluated for a given set of parameter values.

/// The template after the SAM transform, as CloudFormation receives it.
fn transformed() -> Value {
    const SCRIPT: &str = r#"
import json, os, sys
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
from cfnlint.decode import decode
from samtranslator.translator.transform import transform
class Loader:
    def load(self):
        return {}
t, m = decode(sys.argv[1])
assert not m, m
for r in t["Resources"].values():
    if r.get("Type") == "AWS::Serverless::Function":
        r["Properties"]["CodeUri"] = "s3://bucket/key"
print(json.dumps(transform(t, {}, Loader())))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("template.yaml"))
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("SAM_CLI_TELEMETRY", "0")
        .output()
        .expect("python3 with aws-sam-cli's samtranslator (tests/run.sh installs it)");
    assert!(out.status.success(), "SAM transform: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One deployment's parameter values: the defaults, plus what is given.
struct Stack<'a> {
    t: &'a Value,
    params: serde_json::Map<String, Value>,
}

impl<'a> Stack<'a> {
    fn new(t: &'a Value, given: &[(&str, &str)]) -> Stack<'a> {
        let mut params = serde_json::Map::new();
        for (name, p) in t["Parameters"].as_object().unwrap() {
            let raw = given.iter().find(|(n, _)| n == name).map(|(_, v)| Value::from(*v)).or_else(|| p.get("Default").cloned());
            let Some(raw) = raw else { continue };
            let raw = scalar(&raw);
            let v = if p["Type"].as_str().unwrap().starts_with("CommaDelimitedList") || p["Type"] == "List<String>" {
                Value::from(raw.split(',').map(|s| Value::from(s.trim())).collect::<Vec<_>>())
            } else {
                Value::from(raw)
            };
            params.insert(name.clone(), v);
        }
        for (name, _) in given {
            assert!(params.contains_key(*name), "no parameter {name}");
        }
        Stack { t, params }
    }

    /// The minimum a deployment must give: the client networks.
    fn with(t: &'a Value, given: &[(&str, &str)]) -> Stack<'a> {
        let mut all = vec![("AllowedClientCidrs", "203.0.113.0/24")];
        all.extend_from_slice(given);
        Stack::new(t, &all)
    }

    fn condition(&self, name: &str) -> bool {
        self.eval(&self.t["Conditions"][name])
    }

    fn eval(&self, c: &Value) -> bool {
        let (f, args) = c.as_object().and_then(|o| o.iter().next()).unwrap_or_else(|| panic!("condition {c}"));
        match f.as_str() {
            "Fn::Equals" => self.value(&args[0]) == self.value(&args[1]),
            "Fn::Not" => !self.eval(&args[0]),
            "Fn::And" => args.as_array().unwrap().iter().all(|a| self.eval(a)),
            "Fn::Or" => args.as_array().unwrap().iter().any(|a| self.eval(a)),
            "Condition" => self.condition(args.as_str().unwrap()),
            // (Rules only.) A list parameter holds a value.
            "Fn::Contains" => self.value(&args[0]).as_array().unwrap().contains(&self.value(&args[1])),
            _ => panic!("condition function {f}"),
        }
    }

    /// A condition's operand: a literal, a parameter, or a join of one.
    fn value(&self, v: &Value) -> Value {
        if let Some(name) = v.get("Ref").and_then(Value::as_str) {
            return self.params.get(name).cloned().unwrap_or_else(|| panic!("parameter {name}"));
        }
        if let Some(j) = v.get("Fn::Join") {
            let list = self.value(&j[1]);
            let parts: Vec<String> = list.as_array().unwrap().iter().map(scalar).collect();
            return Value::from(parts.join(j[0].as_str().unwrap()));
        }
        Value::from(scalar(v))
    }

    /// A value as this deployment sees it: `Fn::If` decided, `AWS::NoValue`
    /// removed, parameters replaced by their values.
    fn resolve(&self, v: &Value) -> Option<Value> {
        match v {
            Value::Object(o) if o.len() == 1 && o.contains_key("Fn::If") => {
                let a = &o["Fn::If"];
                self.resolve(if self.condition(a[0].as_str().unwrap()) { &a[1] } else { &a[2] })
            }
            Value::Object(o) if o.len() == 1 && o.contains_key("Ref") => {
                let name = o["Ref"].as_str().unwrap();
                if name == "AWS::NoValue" { None } else { Some(self.params.get(name).cloned().unwrap_or_else(|| v.clone())) }
            }
            Value::Object(o) if o.len() == 1 && o.contains_key("Fn::Sub") => Some(self.sub(&o["Fn::Sub"])),
            Value::Object(o) => Some(Value::Object(o.iter().filter_map(|(k, v)| self.resolve(v).map(|v| (k.clone(), v))).collect())),
            Value::Array(a) => Some(Value::Array(a.iter().filter_map(|v| self.resolve(v)).collect())),
            _ => Some(v.clone()),
        }
    }

    /// `Fn::Sub` with the parameters (and its own variables, once resolved to
    /// strings) put in; a string when nothing is left to substitute.
    fn sub(&self, arg: &Value) -> Value {
        let (mut text, vars) = match arg {
            Value::String(s) => (s.clone(), serde_json::Map::new()),
            Value::Array(a) => (a[0].as_str().unwrap().to_owned(), self.resolve(&a[1]).unwrap().as_object().unwrap().clone()),
            _ => panic!("Fn::Sub {arg}"),
        };
        let mut rest = serde_json::Map::new();
        for (name, v) in vars {
            match v {
                Value::String(s) => text = text.replace(&format!("${{{name}}}"), &s),
                other => {
                    rest.insert(name, other);
                }
            }
        }
        for (name, v) in &self.params {
            if let Value::String(s) = v {
                text = text.replace(&format!("${{{name}}}"), s);
            }
        }
        if !text.contains("${") {
            Value::from(text)
        } else if rest.is_empty() {
            serde_json::json!({ "Fn::Sub": text })
        } else {
            serde_json::json!({ "Fn::Sub": [text, rest] })
        }
    }

    /// What CloudFormation's `Rules` refuse of this deployment: the
    /// description of every assertion that fails.
    fn refused(&self) -> Vec<String> {
        let mut refused = Vec::new();
        for (name, rule) in self.t["Rules"].as_object().unwrap() {
            if rule.get("RuleCondition").is_some_and(|c| !self.eval(c)) {
                continue;
            }
            for a in rule["Assertions"].as_array().unwrap() {
                if !self.eval(&a["Assert"]) {
                    refused.push(format!("{name}: {}", scalar(&a["AssertDescription"])));
                }
            }
        }
        refused
    }

    /// The resources this deployment creates, resolved.
    fn resources(&self) -> serde_json::Map<String, Value> {
        self.t["Resources"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.get("Condition").is_none_or(|c| self.condition(c.as_str().unwrap())))
            .map(|(name, r)| (name.clone(), self.resolve(r).unwrap()))
            .collect()
    }

    fn resources_of(&self, ty: &str) -> Vec<(String, Value)> {
        self.resources().into_iter().filter(|(_, r)| r["Type"] == ty).collect()
    }

    /// The outputs this deployment has, resolved.
    fn outputs(&self) -> serde_json::Map<String, Value> {
        self.t["Outputs"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, o)| o.get("Condition").is_none_or(|c| self.condition(c.as_str().unwrap())))
            .map(|(name, o)| (name.clone(), self.resolve(&o["Value"]).unwrap()))
            .collect()
    }
}

/// The text of a string or of an `Fn::Sub`.
fn text(v: &Value) -> String {
    match v.get("Fn::Sub") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => scalar(&a[0]),
        _ => scalar(v),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A role's policy statements as this deployment sees them.
fn statements(stack: &Stack, role: &str) -> Vec<Value> {
    let r = &stack.resources()[role];
    assert_eq!(r["Type"], "AWS::IAM::Role", "{role}");
    r["Properties"]["Policies"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a.iter().map(scalar).collect(),
        _ => vec![],
    }
}

#[test]
fn a_public_function_url_grants_both_invoke_permissions() {
    // Since October 2025 a new function URL with AuthType NONE answers 403
    // unless the function's policy allows both actions to everyone.
    let t = transformed();
    let stack = Stack::with(&t, &[]);
    assert_eq!(stack.params["EndpointType"], "FunctionUrl", "the Function URL is the default endpoint");
    let url = stack.resources_of("AWS::Lambda::Url");
    assert_eq!(url.len(), 1);
    assert_eq!(url[0].1["Properties"]["AuthType"], "NONE");
    assert_eq!(url[0].1["Properties"]["TargetFunctionArn"], serde_json::json!({ "Fn::GetAtt": ["ApiFunction", "Arn"] }));
    let public: Vec<Value> = stack
        .resources_of("AWS::Lambda::Permission")
        .into_iter()
        .map(|(_, p)| p["Properties"].clone())
        .filter(|p| p["Principal"] == "*")
        .collect();
    assert_eq!(public.len(), 2, "{public:#?}");
    for p in &public {
        assert_eq!(p["FunctionName"], serde_json::json!({ "Ref": "ApiFunction" }));
    }
    let url_invoke = public.iter().find(|p| p["Action"] == "lambda:InvokeFunctionUrl").expect("lambda:InvokeFunctionUrl");
    assert_eq!(url_invoke["FunctionUrlAuthType"], "NONE");
    let invoke = public.iter().find(|p| p["Action"] == "lambda:InvokeFunction").expect("lambda:InvokeFunction");
    assert_eq!(invoke["InvokedViaFunctionUrl"], true, "only invocations through the function URL");
    assert!(invoke.get("FunctionUrlAuthType").is_none());

    // No other endpoint leaves a public permission behind.
    for endpoint in ["HttpApi", "PrivateRestApi"] {
        let stack = Stack::with(&t, &[("EndpointType", endpoint), ("PrivateApiVpcEndpointId", "vpce-0123456789abcdef0")]);
        assert!(stack.resources_of("AWS::Lambda::Url").is_empty(), "{endpoint}");
        let principals: Vec<Value> =
            stack.resources_of("AWS::Lambda::Permission").into_iter().map(|(_, p)| p["Properties"]["Principal"].clone()).collect();
        assert!(!principals.contains(&Value::from("*")), "{endpoint}: {principals:?}");
    }
}

#[test]
fn every_role_that_reads_keys_may_list_the_bucket() {
    // GetObject/HeadObject of a missing key is a 403, not a 404, without
    // s3:ListBucket on the bucket; the fetcher HEADs every blob before
    // copying it, the api reads manifests/* bodies, the gc reads both.
    let t = transformed();
    let stack = Stack::with(&t, &[]);
    let bucket = serde_json::json!({ "Fn::GetAtt": ["BlobBucket", "Arn"] });
    let mut roles = 0;
    for (name, _) in stack.resources_of("AWS::IAM::Role") {
        let st = statements(&stack, &name);
        if !st.iter().any(|s| actions(s).iter().any(|a| a == "s3:GetObject")) {
            continue;
        }
        roles += 1;
        let list = st
            .iter()
            .find(|s| s["Effect"] == "Allow" && actions(s).iter().any(|a| a == "s3:ListBucket"))
            .unwrap_or_else(|| panic!("{name} reads objects but may not list the bucket"));
        assert_eq!(list["Resource"], bucket, "{name}: on the bucket itself");
        // s3:prefix is only in the context of list requests: a condition on
        // it would not apply to the check a missing key's GET makes.
        assert!(list.get("Condition").is_none(), "{name}: {list}");
    }
    assert_eq!(roles, 3, "api, fetcher and gc read objects");
}

#[test]
fn blob_reads_restricted_to_vpc_endpoints_still_let_the_functions_copy_blobs_in() {
    // With ConsumerVpcEndpointIds the bucket refuses blob reads from outside
    // those endpoints; the functions run outside any VPC, and every role that
    // writes blobs (the fetcher, gc's warm list) HEADs and reads them too.
    let t = transformed();
    let stack = Stack::with(&t, &[("ConsumerVpcEndpointIds", "vpce-0123456789abcdef1")]);
    let policy = &stack.resources()["BlobBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"];
    let deny = policy
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "BlobReadsOnlyThroughConsumerVpcEndpoints")
        .expect("the endpoint restriction is in force");
    let exempt = deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"].clone();
    let exempt: Vec<Value> = match exempt {
        Value::Array(a) => a,
        one => vec![one],
    };
    let mut writers = 0;
    for (name, _) in stack.resources_of("AWS::IAM::Role") {
        let writes_blobs = statements(&stack, &name).iter().any(|s| {
            s["Effect"] == "Allow"
                && actions(s).iter().any(|a| a == "s3:PutObject")
                && [text(&s["Resource"])].iter().any(|r| r.ends_with("/blobs/*") || r == "${BlobBucket.Arn}/*")
        });
        if writes_blobs {
            writers += 1;
            let arn = serde_json::json!({ "Fn::GetAtt": [name, "Arn"] });
            assert!(exempt.contains(&arn), "{name} writes blobs from outside the VPC but the bucket would deny its reads: {exempt:?}");
        }
    }
    assert_eq!(writers, 2, "the fetcher and gc write blobs");
}

#[test]
fn the_fetcher_reserves_no_concurrency_unless_asked() {
    // An account with the default concurrency quota of 10 rejects any
    // reservation; a reservation of 0 would stop the fetcher altogether.
    let t = transformed();
    let p = &t["Parameters"]["FetcherReservedConcurrency"];
    assert_eq!(scalar(&p["Default"]), "0");
    assert_eq!(scalar(&p["MinValue"]), "0");
    let fetcher = |given: &[(&str, &str)]| Stack::with(&t, given).resources()["FetcherFunction"]["Properties"].clone();
    assert!(fetcher(&[]).get("ReservedConcurrentExecutions").is_none(), "unreserved by default");
    assert_eq!(scalar(&fetcher(&[("FetcherReservedConcurrency", "5")])["ReservedConcurrentExecutions"]), "5");
    for (name, f) in Stack::with(&t, &[]).resources_of("AWS::Lambda::Function") {
        assert!(f["Properties"].get("ReservedConcurrentExecutions").is_none(), "{name} reserves concurrency by default");
    }
}

#[test]
fn the_client_networks_are_an_explicit_choice() {
    let t = template("template.yaml");
    let p = &t["Parameters"]["AllowedClientCidrs"];
    assert!(p.get("Default").is_none(), "no default: a deployment must choose who may pull");
    assert!(p["MinLength"].as_u64().unwrap() >= 1);
    let pattern = p["AllowedPattern"].as_str().unwrap();
    // CloudFormation matches the whole value against AllowedPattern.
    let matches = |value: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import re,sys\nprint(bool(re.fullmatch(sys.argv[1], sys.argv[2])))", pattern, value])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim() == "True"
    };
    for rejected in ["", " ", "any", "*", "10.0.0.0/8,", ",10.0.0.0/8", "10.0.0.0/8;192.168.0.0/16"] {
        assert!(!matches(rejected), "{rejected:?} is rejected");
    }
    for accepted in ["0.0.0.0/0,::/0", "0.0.0.0/0", "203.0.113.0/24, 198.51.100.7", "2001:db8::/32", "203.0.113.9"] {
        assert!(matches(accepted), "{accepted:?} is accepted");
        let networks: Vec<String> = accepted.split(',').map(str::to_owned).collect();
        hubcap::http::access::AccessPolicy::new(&networks, &[], &[], &[], &[]).unwrap_or_else(|e| panic!("{accepted:?}: {e}"));
    }
    // What the functions are given is exactly the parameter.
    assert_eq!(t["Globals"]["Function"]["Environment"]["Variables"]["HUBCAP_ALLOW_CIDRS"]["Ref"], "AllowedClientCidrs");
}

#[test]
fn the_private_rest_api_is_reached_only_through_its_vpc_endpoint() {
    let t = transformed();
    let created = Stack::with(
        &t,
        &[
            ("EndpointType", "PrivateRestApi"),
            ("VpcId", "vpc-0123456789abcdef0"),
            ("PrivateApiSubnetIds", "subnet-0123456789abcdef0,subnet-0123456789abcdef1"),
            ("PrivateApiIngressCidr", "10.0.0.0/16"),
        ],
    );
    let given = Stack::with(&t, &[("EndpointType", "PrivateRestApi"), ("PrivateApiVpcEndpointId", "vpce-0123456789abcdef0")]);
    for (stack, endpoint) in
        [(&created, serde_json::json!({ "Ref": "ExecuteApiEndpoint" })), (&given, Value::from("vpce-0123456789abcdef0"))]
    {
        let res = stack.resources();
        let apis = stack.resources_of("AWS::ApiGateway::RestApi");
        assert_eq!(apis.len(), 1);
        let (api_name, api) = &apis[0];
        let api_ref = serde_json::json!({ "Ref": api_name });
        let cfg = &api["Properties"]["EndpointConfiguration"];
        assert_eq!(cfg["Types"], serde_json::json!(["PRIVATE"]));
        assert_eq!(cfg["VpcEndpointIds"], serde_json::json!([endpoint]));
        // The resource policy lets in the endpoint's requests and nothing else.
        let policy = api["Properties"]["Policy"]["Statement"].as_array().unwrap();
        let allow = policy.iter().find(|s| s["Effect"] == "Allow").unwrap();
        assert_eq!(allow["Condition"]["StringEquals"]["aws:SourceVpce"], endpoint);
        assert!(
            policy.iter().all(|s| s["Effect"] == "Deny" || s["Condition"]["StringEquals"]["aws:SourceVpce"] == endpoint),
            "every Allow is limited to the endpoint"
        );
        let deny = policy.iter().find(|s| s["Effect"] == "Deny").unwrap();
        assert_eq!(deny["Condition"]["StringNotEquals"]["aws:SourceVpce"], endpoint);
        // ANY on the root and on a greedy {proxy+}, both a Lambda proxy integration of the api.
        let methods = stack.resources_of("AWS::ApiGateway::Method");
        assert_eq!(methods.len(), 2);
        let proxy = stack
            .resources_of("AWS::ApiGateway::Resource")
            .into_iter()
            .find(|(_, r)| r["Properties"]["PathPart"] == "{proxy+}")
            .expect("a greedy {proxy+} resource");
        assert_eq!(proxy.1["Properties"]["ParentId"], serde_json::json!({ "Fn::GetAtt": [api_name, "RootResourceId"] }));
        let on = |resource: &Value| methods.iter().find(|(_, m)| &m["Properties"]["ResourceId"] == resource).map(|(_, m)| m.clone());
        for m in [
            on(&serde_json::json!({ "Fn::GetAtt": [api_name, "RootResourceId"] })).expect("a method on the root"),
            on(&serde_json::json!({ "Ref": proxy.0 })).expect("a method on {proxy+}"),
        ] {
            let p = &m["Properties"];
            assert_eq!(p["RestApiId"], api_ref);
            assert_eq!(p["HttpMethod"], "ANY");
            assert_eq!(p["Integration"]["Type"], "AWS_PROXY");
            assert_eq!(p["Integration"]["IntegrationHttpMethod"], "POST");
            assert!(text(&p["Integration"]["Uri"]).contains("${ApiFunction.Arn}/invocations"), "{}", p["Integration"]["Uri"]);
        }
        // Deployed after its methods, to a stage.
        let (dep_name, dep) = stack.resources_of("AWS::ApiGateway::Deployment").pop().expect("a deployment");
        let depends: Vec<String> = dep["DependsOn"].as_array().unwrap().iter().map(scalar).collect();
        for (m, _) in &methods {
            assert!(depends.contains(m), "the deployment waits for {m}");
        }
        let (_, stage) = stack.resources_of("AWS::ApiGateway::Stage").pop().expect("a stage");
        assert_eq!(stage["Properties"]["DeploymentId"], serde_json::json!({ "Ref": dep_name }));
        // API Gateway may invoke the api, for this API only.
        let perm = stack
            .resources_of("AWS::Lambda::Permission")
            .into_iter()
            .map(|(_, p)| p["Properties"].clone())
            .find(|p| p["Principal"] == "apigateway.amazonaws.com")
            .expect("a permission for API Gateway");
        assert_eq!(perm["Action"], "lambda:InvokeFunction");
        assert_eq!(perm["FunctionName"], serde_json::json!({ "Ref": "ApiFunction" }));
        assert!(text(&perm["SourceArn"]).contains(&format!("${{{api_name}}}/*")), "{}", perm["SourceArn"]);
        // Either the stack's own endpoint or the given one, never both.
        assert_eq!(res.contains_key("ExecuteApiEndpoint"), endpoint.get("Ref").is_some());
        // Without a custom domain the URL carries the stage: no daemon.json, a hosts.toml with override_path.
        let out = stack.outputs();
        assert!(scalar(&out["DaemonJson"]).starts_with("none"), "{}", out["DaemonJson"]);
        let hosts = text(&out["ContainerdHostsToml"]);
        assert!(hosts.contains("override_path = true") && hosts.contains("/v2\"]"), "{hosts}");
    }
    let ep = &created.resources()["ExecuteApiEndpoint"]["Properties"];
    assert_eq!(ep["VpcEndpointType"], "Interface");
    assert_eq!(ep["ServiceName"], serde_json::json!({ "Fn::Sub": "com.amazonaws.${AWS::Region}.execute-api" }));
    assert_eq!(ep["PrivateDnsEnabled"], "false", "private DNS would break the VPC's calls to public APIs");

    // With a private custom domain: an empty base path, so a URL with no path that Docker accepts.
    let domain = Stack::with(
        &t,
        &[
            ("EndpointType", "PrivateRestApi"),
            ("PrivateApiVpcEndpointId", "vpce-0123456789abcdef0"),
            ("DomainName", "mirror.example.com"),
            ("CertificateArn", "arn:aws:acm:us-east-1:123456789012:certificate/abc"),
        ],
    );
    let (dn, d) = domain.resources_of("AWS::ApiGateway::DomainNameV2").pop().expect("a private custom domain");
    assert_eq!(d["Properties"]["EndpointConfiguration"]["Types"], serde_json::json!(["PRIVATE"]));
    let (_, mapping) = domain.resources_of("AWS::ApiGateway::BasePathMappingV2").pop().expect("a base path mapping");
    assert_eq!(mapping["Properties"]["DomainNameArn"], serde_json::json!({ "Ref": dn }));
    assert!(mapping["Properties"].get("BasePath").is_none_or(|b| b == ""), "an empty base path");
    let (_, access) = domain.resources_of("AWS::ApiGateway::DomainNameAccessAssociation").pop().expect("an access association");
    assert_eq!(access["Properties"]["AccessAssociationSource"], "vpce-0123456789abcdef0");
    assert_eq!(access["Properties"]["AccessAssociationSourceType"], "VPCE");
    let out = domain.outputs();
    assert_eq!(out["MirrorUrl"], "https://mirror.example.com/");
    assert_eq!(out["DaemonJson"], r#"{"registry-mirrors": ["https://mirror.example.com/"]}"#);
}

#[test]
fn the_fetcher_is_watched_for_falling_behind_and_failing() {
    let t = transformed();
    let alarms = Stack::with(&t, &[]).resources_of("AWS::CloudWatch::Alarm");
    let find = |ns: &str, metric: &str| {
        alarms
            .iter()
            .map(|(_, a)| a["Properties"].clone())
            .find(|a| a["Namespace"] == ns && a["MetricName"] == metric)
            .unwrap_or_else(|| panic!("an alarm on {ns}/{metric}"))
    };
    let age = find("AWS/Lambda", "IteratorAge");
    assert_eq!(age["Dimensions"], serde_json::json!([{ "Name": "FunctionName", "Value": { "Ref": "FetcherFunction" } }]));
    assert_eq!(age["Statistic"], "Maximum");
    let failures = find(hubcap::observe::emf::NAMESPACE, "FetchFailures");
    assert_eq!(failures["Dimensions"], serde_json::json!([{ "Name": "Function", "Value": "fetcher" }]));
    assert_eq!(failures["Statistic"], "Sum");
    // The metric and its dimension are the ones the fetcher emits.
    let line = hubcap::observe::emf::emf_line("fetcher", &[("FetchFailures", 1.0, "Count")]);
    let emf: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(emf["Function"], "fetcher");
    assert_eq!(emf["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["Function"]]));
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lambda/fetcher.rs")).unwrap();
    assert!(src.contains("(\"FetchFailures\"") && src.contains("emf_line(\"fetcher\""), "the fetcher emits FetchFailures");
}

#[test]
fn the_bucket_outlives_the_stack() {
    // CloudFormation cannot delete a bucket with objects in it: `sam delete`
    // would fail on any mirror that was used.
    let t = transformed();
    let bucket = &t["Resources"]["BlobBucket"];
    assert_eq!(bucket["DeletionPolicy"], "Retain");
    assert_eq!(bucket["UpdateReplacePolicy"], "Retain");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("aws s3 rm s3://") && readme.contains("aws s3 rb s3://"), "the README says how to empty and delete it");
}

#[test]
fn custom_domains_have_their_dns_target_in_the_outputs() {
    let t = transformed();
    let cert = ("CertificateArn", "arn:aws:acm:us-east-1:123456789012:certificate/abc");
    let http = Stack::with(&t, &[("EndpointType", "HttpApi"), ("DomainName", "mirror.example.com"), cert]).outputs();
    assert_eq!(http["CustomDomainDnsTarget"], serde_json::json!({ "Fn::GetAtt": ["HttpApiDomain", "RegionalDomainName"] }));
    assert_eq!(http["CustomDomainHostedZoneId"], serde_json::json!({ "Fn::GetAtt": ["HttpApiDomain", "RegionalHostedZoneId"] }));
    assert_eq!(http["MirrorUrl"], "https://mirror.example.com/");
    let private = Stack::with(
        &t,
        &[
            ("EndpointType", "PrivateRestApi"),
            ("DomainName", "mirror.example.com"),
            cert,
            ("VpcId", "vpc-0123456789abcdef0"),
            ("PrivateApiSubnetIds", "subnet-0123456789abcdef0"),
            ("PrivateApiIngressCidr", "10.0.0.0/16"),
        ],
    )
    .outputs();
    // The endpoint's regional DNS name: "<zone>:<name>" is its first DnsEntries entry.
    let entry = serde_json::json!({ "Fn::Select": [0, { "Fn::GetAtt": ["ExecuteApiEndpoint", "DnsEntries"] }] });
    assert_eq!(private["CustomDomainDnsTarget"], serde_json::json!({ "Fn::Select": [1, { "Fn::Split": [":", entry] }] }));
    assert_eq!(private["CustomDomainHostedZoneId"], serde_json::json!({ "Fn::Select": [0, { "Fn::Split": [":", entry] }] }));
    // Without a custom domain, no DNS outputs.
    let plain = Stack::with(&t, &[]).outputs();
    assert!(!plain.contains_key("CustomDomainDnsTarget") && !plain.contains_key("CustomDomainHostedZoneId"));
}

/// Runs checkov on a template with no network: no downloads from Prisma
/// Cloud, no update check, and inside a new network namespace when possible.
fn checkov(path: &Path) -> (bool, String) {
    let isolated = std::process::Command::new("unshare").args(["-n", "true"]).status().is_ok_and(|s| s.success());
    let mut cmd = if isolated {
        let mut c = std::process::Command::new("unshare");
        c.args(["-n", "checkov"]);
        c
    } else {
        std::process::Command::new("checkov")
    };
    let out = cmd
        .arg("-f")
        .arg(path)
        .args(["--framework", "cloudformation", "--compact", "--quiet", "--skip-download"])
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .expect("checkov (tests/install-tools.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("FAILED"), text)
}

#[test]
fn the_templates_pass_checkov() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("template.yaml")];
    files.extend(
        std::fs::read_dir(root.join("infra")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")),
    );
    // checkov drops the resources whose condition is false for the defaults:
    // check every endpoint type, with its options, too.
    let dir = tempfile::tempdir().unwrap();
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc";
    for (name, given) in [
        ("httpapi", vec![("EndpointType", "HttpApi"), ("DomainName", "mirror.example.com"), ("CertificateArn", cert)]),
        (
            "private",
            vec![
                ("EndpointType", "PrivateRestApi"),
                ("DomainName", "mirror.example.com"),
                ("CertificateArn", cert),
                ("VpcId", "vpc-0123456789abcdef0"),
                ("RouteTableIds", "rtb-0123456789abcdef0"),
                ("PrivateApiSubnetIds", "subnet-0123456789abcdef0"),
                ("PrivateApiIngressCidr", "10.0.0.0/16"),
                ("ConsumerVpcEndpointIds", "vpce-0123456789abcdef1"),
                ("FetcherReservedConcurrency", "5"),
                ("AlarmTopicArn", "arn:aws:sns:us-east-1:123456789012:alarms"),
            ],
        ),
    ] {
        let mut t = template("template.yaml");
        t["Parameters"]["AllowedClientCidrs"]["Default"] = Value::from("10.0.0.0/8");
        for (p, v) in given {
            t["Parameters"][p]["Default"] = Value::from(v);
        }
        let path = dir.path().join(format!("template-{name}.json"));
        std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
        files.push(path);
    }
    for f in &files {
        let (ok, text) = checkov(f);
        assert!(ok, "checkov {}:\n{text}", f.display());
        // (infra/vpc-endpoint.yaml has nothing checkov checks.)
        if f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("template")) {
            assert!(text.contains("Passed checks:") && text.contains("Failed checks: 0"), "checkov read {}:\n{text}", f.display());
        }
    }
    // Every suppression says why.
    for (name, r) in template("template.yaml")["Resources"].as_object().unwrap() {
        for skip in r["Metadata"]["checkov"]["skip"].as_array().into_iter().flatten() {
            assert!(skip["id"].as_str().is_some_and(|id| id.starts_with("CKV")), "{name}: {skip}");
            assert!(skip["comment"].as_str().is_some_and(|c| c.len() > 40), "{name}: {} needs a real reason", skip["id"]);
        }
    }
}

#[test]
fn the_template_refuses_what_cannot_work_and_says_why() {
    let t = template("template.yaml");
    assert!(Stack::with(&t, &[]).refused().is_empty(), "the defaults deploy: {:?}", Stack::with(&t, &[]).refused());
    let secret = ("ClientCredentialsSecretArn", "arn:aws:secretsmanager:us-east-1:123456789012:secret:hubcap-clients-AbCdEf");
    let endpoint = [("VpcId", "vpc-0123456789abcdef0"), ("RouteTableIds", "rtb-0123456789abcdef0")];
    let private = [
        ("EndpointType", "PrivateRestApi"),
        ("PrivateApiVpcEndpointId", "vpce-0123456789abcdef0"),
        ("VpcId", "vpc-0123456789abcdef0"),
        ("RouteTableIds", "rtb-0123456789abcdef0"),
    ];
    // Client credentials only where the challenge reaches clients.
    let refused = Stack::with(&t, &[secret]).refused();
    assert!(
        refused.len() == 1 && refused[0].contains("needs EndpointType=HttpApi") && refused[0].contains("x-amzn-Remapped"),
        "{refused:?}"
    );
    let refused = Stack::with(&t, &[&private[..], &[secret]].concat()).refused();
    assert!(refused.len() == 1 && refused[0].contains("needs EndpointType=HttpApi"), "{refused:?}");
    assert!(Stack::with(&t, &[secret, ("EndpointType", "HttpApi")]).refused().is_empty());
    // A private REST API's clients (no NAT) need an S3 gateway endpoint for every layer.
    let refused = Stack::with(&t, &[private[0], private[1]]).refused();
    assert!(refused.len() == 1 && refused[0].contains("every layer download fails"), "{refused:?}");
    for way in
        [&endpoint[..], &[("S3GatewayEndpointId", "vpce-0a1b2c3d4e5f60718")], &[("ConsumerVpcEndpointIds", "vpce-0a1b2c3d4e5f60719")]]
    {
        let given = [&[private[0], private[1]][..], way].concat();
        assert!(Stack::with(&t, &given).refused().is_empty(), "{given:?}: {:?}", Stack::with(&t, &given).refused());
    }
    // Restricted downloads need an endpoint to come through.
    let refused = Stack::with(&t, &[("RestrictBlobReadsToVpcEndpoints", "true")]).refused();
    assert!(refused.len() == 1 && refused[0].contains("refuse every layer download"), "{refused:?}");
    assert!(Stack::with(&t, &[&endpoint[..], &[("RestrictBlobReadsToVpcEndpoints", "true")]].concat()).refused().is_empty());
}

/// The `vpce-` ids and endpoint resources (`Ref`s) a resolved value names.
fn endpoints_in(v: &Value) -> Vec<Value> {
    match v {
        Value::String(s) => s.split(',').filter(|e| e.starts_with("vpce-")).map(Value::from).collect(),
        Value::Object(o) if o.len() == 1 && o.get("Ref").is_some_and(|r| r.as_str().unwrap().contains("Endpoint")) => vec![v.clone()],
        Value::Object(o) => o.values().flat_map(endpoints_in).collect(),
        Value::Array(a) => a.iter().flat_map(endpoints_in).collect(),
        _ => vec![],
    }
}

#[test]
fn an_s3_gateway_endpoint_is_created_or_named_and_admitted_in_one_deploy() {
    let t = transformed();
    let deny = |stack: &Stack| {
        let policy = stack.resources()["BlobBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"].clone();
        let deny = policy.as_array().unwrap().iter().find(|s| s["Sid"] == "BlobReadsOnlyThroughConsumerVpcEndpoints").cloned();
        deny.map(|d| endpoints_in(&d["Condition"]["StringNotEquals"]["aws:SourceVpce"]))
    };
    let net = [("VpcId", "vpc-0123456789abcdef0"), ("RouteTableIds", "rtb-0123456789abcdef0,rtb-0123456789abcdef1")];
    let restrict = ("RestrictBlobReadsToVpcEndpoints", "true");

    // Created: in the outputs, and admitted by the bucket in the same deploy.
    let created = Stack::with(&t, &[net[0], net[1], restrict]);
    let ep = &created.resources()["S3GatewayEndpoint"]["Properties"];
    assert_eq!(ep["VpcEndpointType"], "Gateway");
    let made = serde_json::json!({ "Ref": "S3GatewayEndpoint" });
    assert_eq!(created.outputs()["S3GatewayEndpointInUse"], made);
    assert_eq!(deny(&created), Some(vec![made.clone()]), "the created endpoint is the one admitted");

    // Named (the route tables have one already: creating another fails with
    // RouteAlreadyExists): nothing created, the named one admitted.
    let named = Stack::with(&t, &[net[0], net[1], restrict, ("S3GatewayEndpointId", "vpce-0a1b2c3d4e5f60718")]);
    assert!(!named.resources().contains_key("S3GatewayEndpoint"), "no second endpoint on the same route tables");
    assert_eq!(named.outputs()["S3GatewayEndpointInUse"], "vpce-0a1b2c3d4e5f60718");
    assert_eq!(deny(&named), Some(vec![Value::from("vpce-0a1b2c3d4e5f60718")]));

    // Consumer endpoints (other VPCs) with the created one.
    let both = Stack::with(&t, &[net[0], net[1], ("ConsumerVpcEndpointIds", "vpce-0a1b2c3d4e5f60719,vpce-0a1b2c3d4e5f6071a")]);
    let admitted = deny(&both).expect("consumer endpoints turn the restriction on");
    assert_eq!(admitted, vec![Value::from("vpce-0a1b2c3d4e5f60719"), Value::from("vpce-0a1b2c3d4e5f6071a"), made]);

    // Without a restriction, nothing is denied; without a VPC, nothing created.
    assert_eq!(deny(&Stack::with(&t, &net)), None);
    let none = Stack::with(&t, &[]);
    assert!(!none.resources().contains_key("S3GatewayEndpoint") && !none.outputs().contains_key("S3GatewayEndpointInUse"));
}

#[test]
fn customer_managed_keys_come_with_the_kms_permissions_they_need() {
    let t = transformed();
    let key = "arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d-0000-4000-8000-0123456789ab";
    let secrets_key = "arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d-0000-4000-8000-0123456789ac";
    let upstream = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hubcap-upstream-AbCdEf";
    let stack = Stack::with(&t, &[("BlobKmsKeyArn", key), ("SecretsKmsKeyArn", secrets_key), ("UpstreamCredentialsSecretArn", upstream)]);
    let enc = &stack.resources()["BlobBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0];
    assert_eq!(enc["ServerSideEncryptionByDefault"]["SSEAlgorithm"], "aws:kms");
    assert_eq!(enc["ServerSideEncryptionByDefault"]["KMSMasterKeyID"], key);
    assert_eq!(enc["BucketKeyEnabled"], true);
    for role in ["ApiFunctionRole", "FetcherFunctionRole", "GcFunctionRole"] {
        let st = statements(&stack, role);
        let grants = |action: &str, resource: &str, via: &str| {
            st.iter().any(|s| {
                s["Effect"] == "Allow"
                    && actions(s).iter().any(|a| a == action)
                    && scalar(&s["Resource"]) == resource
                    && text(&s["Condition"]["StringEquals"]["kms:ViaService"]).starts_with(via)
            })
        };
        // Writing an object or a part needs GenerateDataKey; reading one, a
        // presigned GET and completing a multipart upload need Decrypt.
        for action in ["kms:GenerateDataKey", "kms:Decrypt"] {
            assert!(grants(action, key, "s3."), "{role}: {action} on the bucket's key through S3");
        }
        assert!(grants("kms:Decrypt", secrets_key, "secretsmanager."), "{role}: the secret's key through Secrets Manager");
    }
    // Without keys, no KMS permission at all.
    let plain = Stack::with(&t, &[]);
    for role in ["ApiFunctionRole", "FetcherFunctionRole", "GcFunctionRole"] {
        assert!(statements(&plain, role).iter().all(|s| !actions(s).iter().any(|a| a.starts_with("kms:"))), "{role}");
    }
    let enc = &plain.resources()["BlobBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0];
    assert_eq!(enc["ServerSideEncryptionByDefault"]["SSEAlgorithm"], "AES256");
}

/// Whether CloudFormation's `AllowedPattern` (matched against the whole
/// value) accepts `value`.
fn pattern_accepts(pattern: &str, value: &str) -> bool {
    let out = std::process::Command::new("python3")
        .args(["-c", "import re,sys\nprint(bool(re.fullmatch(sys.argv[1], sys.argv[2])))", pattern, value])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "True"
}

#[test]
fn secrets_are_named_by_arn_and_read_only_by_the_functions_that_use_them() {
    let t = template("template.yaml");
    for name in ["UpstreamCredentialsSecretArn", "ClientCredentialsSecretArn"] {
        let p = &t["Parameters"][name];
        assert!(p.get("NoEcho").is_none(), "{name}: an ARN is no secret, and NoEcho makes `sam deploy --guided` loop on Enter");
        let pattern = p["AllowedPattern"].as_str().unwrap_or_else(|| panic!("{name} has an AllowedPattern"));
        for ok in [
            "",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hubcap/upstream-AbCdEf",
            "arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:x-AbCdEf",
        ] {
            assert!(pattern_accepts(pattern, ok), "{name}: {ok:?}");
        }
        for bad in ["hubcap-upstream", "arn:aws:secretsmanager:eu-west-1:123456789012:hubcap", "arn:aws:s3:::bucket", " "] {
            assert!(!pattern_accepts(pattern, bad), "{name}: {bad:?} refused");
        }
    }
    let t = transformed();
    let secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hubcap-clients-AbCdEf";
    let stack = Stack::with(&t, &[("ClientCredentialsSecretArn", secret), ("EndpointType", "HttpApi")]);
    let reads = |role: &str| {
        statements(&stack, role)
            .iter()
            .any(|s| actions(s).iter().any(|a| a == "secretsmanager:GetSecretValue") && scalar(&s["Resource"]) == secret)
    };
    assert!(reads("ApiFunctionRole"), "the api reads the client credentials");
    assert!(!reads("FetcherFunctionRole") && !reads("GcFunctionRole"), "nothing else does");
    let api = &stack.resources()["ApiFunction"]["Properties"]["Environment"]["Variables"];
    assert_eq!(api["HUBCAP_CLIENT_USERS_SECRET"], secret);
    assert!(stack.resources()["ApiFunction"]["Properties"]["Environment"]["Variables"].get("HUBCAP_CLIENT_USERS").is_none());
}

#[test]
fn the_api_answers_within_each_front_ends_limit() {
    let t = template("template.yaml");
    let api = &t["Resources"]["ApiFunction"]["Properties"];
    let timeout = api["Timeout"].as_u64().unwrap();
    let find = &api["Environment"]["Variables"]["HUBCAP_REQUEST_TIMEOUT"]["Fn::FindInMap"];
    assert_eq!(find[1], serde_json::json!({ "Ref": "EndpointType" }), "{find}");
    let blob_wait = t["Parameters"]["BlobWaitSeconds"]["MaxValue"].as_u64().unwrap();
    // What each front end waits (API Gateway quotas: 29 s REST, 30 s HTTP API; a Function URL the function's Timeout).
    for (endpoint, limit) in [("FunctionUrl", timeout), ("HttpApi", 30), ("PrivateRestApi", 29)] {
        let said: f64 = scalar(&t["Mappings"][find[0].as_str().unwrap()][endpoint][find[2].as_str().unwrap()]).parse().unwrap();
        assert!(said <= limit as f64 && said <= timeout as f64, "{endpoint}: {said} s within {limit} s and the function's {timeout} s");
        let answers_by = said - hubcap::lambda::DEADLINE_MARGIN.as_secs_f64();
        assert!(blob_wait as f64 <= answers_by, "{endpoint}: a blob is held at most {blob_wait} s, answered by {answers_by} s");
        // The variable parses as the api reads it.
        let settings =
            <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from(["api", "--request-timeout", &said.to_string()]).unwrap();
        assert_eq!(settings.front_end().timeout, Some(std::time::Duration::from_secs_f64(said)));
    }
    assert_eq!(api["Environment"]["Variables"]["HUBCAP_HEAD_ANSWERS"], serde_json::json!({ "Ref": "HeadAnswers" }));
    let values: Vec<String> = t["Parameters"]["HeadAnswers"]["AllowedValues"].as_array().unwrap().iter().map(scalar).collect();
    for v in &values {
        <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from(["api", "--head-answers", v])
            .unwrap_or_else(|e| panic!("{v}: {e}"));
    }
    assert_eq!(scalar(&t["Parameters"]["HeadAnswers"]["Default"]), "without-digest");
    // Cold large blobs: the upstream's CDN unless the fleet cannot reach it.
    assert_eq!(api["Environment"]["Variables"]["HUBCAP_COLD_BLOBS"], serde_json::json!({ "Ref": "ColdLargeBlobs" }));
    for v in t["Parameters"]["ColdLargeBlobs"]["AllowedValues"].as_array().unwrap().iter().map(scalar) {
        <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from(["api", "--cold-blobs", &v])
            .unwrap_or_else(|e| panic!("{v}: {e}"));
    }
    assert_eq!(scalar(&t["Parameters"]["ColdLargeBlobs"]["Default"]), "upstream");
}

/// `sam deploy --guided`'s own prompts (SAM CLI's code, offline) over the
/// template, answered as a new user would: a stack name, then Enter for
/// everything but the one required parameter.
#[test]
fn sam_deploy_guided_completes_with_only_the_required_answers() {
    let t = template("template.yaml");
    let params: Vec<&String> = t["Parameters"].as_object().unwrap().keys().collect();
    let required: Vec<&&String> = params.iter().filter(|p| t["Parameters"][p.as_str()].get("Default").is_none()).collect();
    assert_eq!(required, [&&"AllowedClientCidrs".to_owned()], "one required parameter");
    for p in &params {
        let d = t["Parameters"][p.as_str()]["Description"].as_str().unwrap_or("");
        assert!(d.len() > 20, "{p} is described");
    }
    // Stack name, region (Enter: the default), the required CIDRs, then
    // Enter for everything else; more Enters than prompts, so a prompt that
    // repeats on Enter would swallow them all and never finish.
    let mut answers = vec!["hubcap-mirror".to_owned(), String::new(), "203.0.113.0/24".to_owned()];
    answers.extend(std::iter::repeat_n(String::new(), params.len() + 20));
    let out = std::process::Command::new("timeout")
        .args(["-s", "KILL", "120", "python3", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/sam_guided.py")])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml"))
        .args(&answers)
        .env("SAM_CLI_TELEMETRY", "0")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("exit 0"),
        "guided deploy did not complete: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The required parameter is asked first, and every parameter once.
    let asked: Vec<&str> =
        text.lines().filter_map(|l| l.trim().strip_prefix("Parameter ")).map(|l| l.split([' ', ':']).next().unwrap()).collect();
    assert_eq!(asked.first(), Some(&"AllowedClientCidrs"), "{text}");
    assert_eq!(asked.len(), params.len(), "each parameter asked once: {asked:?}");
    let (_, config) = text.split_once("--- samconfig.toml ---").unwrap();
    assert!(config.contains("stack_name = \"hubcap-mirror\""), "{config}");
    let overrides = config.lines().find(|l| l.starts_with("parameter_overrides")).unwrap_or_else(|| panic!("{config}"));
    assert!(overrides.contains(r#"AllowedClientCidrs=\"203.0.113.0/24\""#), "{overrides}");
    for p in &params {
        assert!(overrides.contains(&format!("{p}=")), "{p} in samconfig.toml: {overrides}");
    }
}

#[test]
fn the_private_endpoint_samconfig_example_deploys() {
    // infra/samconfig.private.toml, as SAM reads it: its parameters exist,
    // the Rules accept them, and it is the endpoint type it says.
    let out = std::process::Command::new("python3")
        .args(["-c", "import json,sys,tomllib\nprint(json.dumps(tomllib.load(open(sys.argv[1],'rb'))))"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/samconfig.private.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let deploy = &config["default"]["deploy"]["parameters"];
    let overrides = scalar(&deploy["parameter_overrides"]);
    // Key="value" pairs, separated by spaces.
    let given: Vec<(String, String)> = overrides
        .split("\" ")
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p.trim().split_once('=').unwrap_or_else(|| panic!("{p}"));
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect();
    let given: Vec<(&str, &str)> = given.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert!(given.contains(&("EndpointType", "PrivateRestApi")), "{given:?}");
    let t = template("template.yaml");
    let stack = Stack::new(&t, &given);
    assert!(stack.refused().is_empty(), "{:?}", stack.refused());
    assert!(deploy["capabilities"].as_str().unwrap_or("").contains("CAPABILITY_IAM"));
}

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
    assert_eq!(table["TimeToLiveSpecification"]["AttributeName"], hubcap::storage::aws::TTL_ATTRIBUTE);
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
        hubcap::gc::parse_duration(d).unwrap();
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

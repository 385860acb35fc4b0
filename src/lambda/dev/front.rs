//! The `api` function's front ends, as `hubcap lambda-dev` plays them in
//! front of `cargo lambda watch`: each client request becomes the event
//! that front end would send (a Function URL's or an HTTP API's payload 2.0,
//! a REST API's payload 1.0 with its stage), the function is invoked with it
//! through the Lambda invoke API, and its answer is rewritten by that front
//! end's documented and reported rules before it reaches the client.
//!
//! What each front end does to a function's answer, and where it is said
//! (none of it can be checked from here: these are the rules to survive):
//! - REST API (API Gateway "Important notes", REST): `WWW-Authenticate`,
//!   `Authorization`, `Connection`, `Content-MD5`, `Max-Forwards`,
//!   `User-Agent` renamed to `x-amzn-Remapped-<name>`; `Date` and `Server`
//!   renamed and written anew; `Transfer-Encoding`, `TE`, `Trailer`,
//!   `Upgrade`, `Proxy-Authenticate`, `Expect` dropped. `Content-Length` is
//!   documented as passed through, but captured answers show the front end's
//!   own (the length of the body it carries) with the function's renamed.
//!   Gives up after 29 s: `504 {"message": "Endpoint request timed out"}`.
//! - Function URL (undocumented; reported by users and cargo-lambda issue
//!   862): `Content-Length` the front end's, the function's renamed;
//!   `WWW-Authenticate` renamed. Gives up when the function times out: 502.
//! - HTTP API (payload 2.0; AWS documents no rewrite of answers; one user
//!   reports `Content-Length` as on REST): `Content-Length` the front end's.
//!   Gives up after 30 s: `503 {"message":"Service Unavailable"}`.
//! - The worst case: every rule above at once, as a Function URL delivers
//!   requests, giving up after 29 s.
//!
//! So behind any of them a `HEAD` answer says `Content-Length: 0`.
//! `passthrough` changes nothing (what `cargo lambda watch`'s own Function
//! URL does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

/// Largest request body forwarded (a pull sends none).
const MAX_REQUEST_BODY: usize = 1 << 20;
/// The REST API's stage (the template's `StageName`).
const REST_STAGE: &str = "mirror";

/// Which front end `hubcap lambda-dev` plays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontEnd {
    /// A Lambda Function URL (payload 2.0).
    #[default]
    FunctionUrl,
    /// An API Gateway HTTP API (payload 2.0).
    HttpApi,
    /// An API Gateway REST API, Lambda proxy integration (payload 1.0),
    /// reached through a custom domain mapped with an empty base path.
    RestApi,
    /// Every rewrite reported of any of them, at once.
    WorstCase,
    /// No rewrite at all (as `cargo lambda watch` answers).
    Passthrough,
}

/// The shape of the event a front end sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Payload 2.0, from a Function URL (`true`) or an HTTP API.
    V2 { function_url: bool },
    /// Payload 1.0 (REST API), `headers` and `multiValueHeaders`.
    V1,
}

/// One front end's rules.
struct Rules {
    payload: Payload,
    /// The front end writes its own `Content-Length` (the body it carries)
    /// and renames the function's.
    own_length: bool,
    /// Answer headers renamed to `x-amzn-Remapped-<name>`.
    remapped: &'static [&'static str],
    /// Renamed, then written anew by the front end (hyper writes `date`).
    overwritten: &'static [&'static str],
    dropped: &'static [&'static str],
    /// Request headers the front end does not pass to the function.
    dropped_in: &'static [&'static str],
    /// The front end's own limit; `None`: the function's timeout.
    timeout: Option<Duration>,
    timed_out: (StatusCode, &'static str),
    failed: (StatusCode, &'static str),
}

const REST_REMAPPED: &[&str] = &["www-authenticate", "authorization", "connection", "content-md5", "max-forwards", "user-agent"];
const REST_OVERWRITTEN: &[&str] = &["date", "server"];
const REST_DROPPED: &[&str] = &["transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate", "expect"];
const REST_DROPPED_IN: &[&str] =
    &["connection", "expect", "te", "trailer", "upgrade", "content-md5", "max-forwards", "server", "www-authenticate", "proxy-connection"];
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"];
const REST_TIMED_OUT: (StatusCode, &str) = (StatusCode::GATEWAY_TIMEOUT, r#"{"message": "Endpoint request timed out"}"#);
const GATEWAY_FAILED: (StatusCode, &str) = (StatusCode::BAD_GATEWAY, r#"{"message":"Internal server error"}"#);

impl FrontEnd {
    fn rules(self) -> Rules {
        match self {
            FrontEnd::FunctionUrl => Rules {
                payload: Payload::V2 { function_url: true },
                own_length: true,
                remapped: &["www-authenticate"],
                overwritten: &[],
                dropped: &[],
                dropped_in: HOP_BY_HOP,
                timeout: None,
                timed_out: (StatusCode::BAD_GATEWAY, "Internal Server Error"),
                failed: (StatusCode::BAD_GATEWAY, "Internal Server Error"),
            },
            FrontEnd::HttpApi => Rules {
                payload: Payload::V2 { function_url: false },
                own_length: true,
                remapped: &[],
                overwritten: &[],
                dropped: &[],
                dropped_in: HOP_BY_HOP,
                timeout: Some(Duration::from_secs(30)),
                timed_out: (StatusCode::SERVICE_UNAVAILABLE, r#"{"message":"Service Unavailable"}"#),
                failed: GATEWAY_FAILED,
            },
            FrontEnd::RestApi => Rules {
                payload: Payload::V1,
                own_length: true,
                remapped: REST_REMAPPED,
                overwritten: REST_OVERWRITTEN,
                dropped: REST_DROPPED,
                dropped_in: REST_DROPPED_IN,
                timeout: Some(Duration::from_secs(29)),
                timed_out: REST_TIMED_OUT,
                failed: GATEWAY_FAILED,
            },
            FrontEnd::WorstCase => Rules {
                payload: Payload::V2 { function_url: true },
                own_length: true,
                remapped: REST_REMAPPED,
                overwritten: REST_OVERWRITTEN,
                dropped: REST_DROPPED,
                dropped_in: REST_DROPPED_IN,
                timeout: Some(Duration::from_secs(29)),
                timed_out: REST_TIMED_OUT,
                failed: GATEWAY_FAILED,
            },
            FrontEnd::Passthrough => Rules {
                payload: Payload::V2 { function_url: true },
                own_length: false,
                remapped: &[],
                overwritten: &[],
                dropped: &[],
                dropped_in: HOP_BY_HOP,
                timeout: None,
                timed_out: (StatusCode::BAD_GATEWAY, "Internal Server Error"),
                failed: (StatusCode::BAD_GATEWAY, "Internal Server Error"),
            },
        }
    }

    /// The longest this front end waits for the function, given the
    /// function's own timeout.
    pub fn gives_up_after(self, function_timeout: Duration) -> Duration {
        self.rules().timeout.unwrap_or(function_timeout).min(function_timeout)
    }
}

struct Front {
    front_end: FrontEnd,
    rules: Rules,
    invoke_url: String,
    function_timeout: Duration,
    http: reqwest::Client,
    requests: AtomicU64,
}

/// The front: every request turned into `front_end`'s event for the
/// function at `invoke_url` (the Lambda invoke API), its answer rewritten as
/// that front end would.
pub fn front(front_end: FrontEnd, invoke_url: &str, function_timeout: Duration) -> axum::Router {
    let http = reqwest::Client::builder().build().expect("an HTTP client");
    let front = Front {
        front_end,
        rules: front_end.rules(),
        invoke_url: invoke_url.to_owned(),
        function_timeout,
        http,
        requests: AtomicU64::new(0),
    };
    axum::Router::new().fallback(forward).with_state(Arc::new(front))
}

async fn forward(State(front): State<Arc<Front>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let id = front.requests.fetch_add(1, Ordering::Relaxed);
    let event = match front.rules.payload {
        Payload::V2 { function_url } => v2_event(&parts, &body, peer, function_url, front.rules.dropped_in, id),
        Payload::V1 => v1_event(&parts, &body, peer, front.rules.dropped_in, id),
    };
    let limit = front.front_end.gives_up_after(front.function_timeout);
    let invoked = tokio::time::timeout(limit, invoke(&front.http, &front.invoke_url, &event)).await;
    let answer = match invoked {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the api function failed");
            return plain(front.rules.failed);
        }
        Err(_) => {
            tracing::warn!(after = ?limit, front_end = ?front.front_end, "the api function did not answer in time");
            return plain(front.rules.timed_out);
        }
    };
    rewrite(&front.rules, parts.method == Method::HEAD, answer)
}

fn plain((status, body): (StatusCode, &'static str)) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The function's answer, as its payload says.
struct Answer {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: bytes::Bytes,
}

async fn invoke(http: &reqwest::Client, url: &str, event: &Value) -> Result<Answer, String> {
    let resp = http.post(url).body(event.to_string()).send().await.map_err(|e| e.to_string())?;
    let failed = resp.headers().contains_key("x-amz-function-error") || !resp.status().is_success();
    let payload: Value = serde_json::from_slice(&resp.bytes().await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    if failed || payload.get("errorType").is_some() {
        return Err(format!("function error: {payload}"));
    }
    let status = payload["statusCode"].as_u64().and_then(|s| StatusCode::from_u16(s as u16).ok()).ok_or("no statusCode in the answer")?;
    let mut headers = Vec::new();
    // API Gateway merges the two maps; a name in multiValueHeaders wins.
    let multi = payload["multiValueHeaders"].as_object().cloned().unwrap_or_default();
    for (name, values) in &multi {
        for v in values.as_array().into_iter().flatten().filter_map(Value::as_str) {
            headers.push((name.clone(), v.to_owned()));
        }
    }
    for (name, v) in payload["headers"].as_object().into_iter().flatten() {
        if !multi.keys().any(|m| m.eq_ignore_ascii_case(name))
            && let Some(v) = v.as_str()
        {
            headers.push((name.clone(), v.to_owned()));
        }
    }
    for cookie in payload["cookies"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        headers.push(("set-cookie".into(), cookie.to_owned()));
    }
    let body = match payload["body"].as_str() {
        None => bytes::Bytes::new(),
        Some(b) if payload["isBase64Encoded"] == true => {
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("body: {e}"))?.into()
        }
        Some(b) => bytes::Bytes::copy_from_slice(b.as_bytes()),
    };
    Ok(Answer { status, headers, body })
}

/// The answer as the front end passes it to the client.
fn rewrite(rules: &Rules, head: bool, answer: Answer) -> Response {
    let mut out = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            out.append(n, v);
        }
    };
    for (name, value) in &answer.headers {
        let lower = name.to_ascii_lowercase();
        let l = lower.as_str();
        let renamed = (l == "content-length" && rules.own_length) || rules.remapped.contains(&l) || rules.overwritten.contains(&l);
        if renamed {
            put(&format!("x-amzn-remapped-{l}"), value);
        } else if !rules.dropped.contains(&l) && !HOP_BY_HOP.contains(&l) {
            put(l, value);
        }
    }
    let body = if head { bytes::Bytes::new() } else { answer.body };
    if rules.own_length {
        out.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = out;
    resp
}

/// Milliseconds since the epoch.
fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn body_fields(body: &[u8]) -> (Value, bool) {
    if body.is_empty() { (Value::Null, false) } else { (json!(base64::engine::general_purpose::STANDARD.encode(body)), true) }
}

/// The request's headers, repeated ones joined with commas (payload 2.0).
fn joined_headers(headers: &HeaderMap, dropped: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    for name in headers.keys() {
        if dropped.contains(&name.as_str()) || name == header::COOKIE {
            continue;
        }
        let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        out.insert(name.as_str().to_owned(), json!(values.join(",")));
    }
    out
}

/// A Function URL's or HTTP API's event (payload 2.0).
fn v2_event(parts: &axum::http::request::Parts, body: &[u8], peer: SocketAddr, function_url: bool, dropped: &[&str], id: u64) -> Value {
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let mut headers = joined_headers(&parts.headers, dropped);
    let ip = peer.ip().to_string();
    headers.insert("x-forwarded-for".into(), json!(ip));
    headers.insert("x-forwarded-proto".into(), json!("https"));
    let host = headers.get("host").and_then(Value::as_str).unwrap_or("localhost").to_owned();
    let mut params: Map<String, Value> = Map::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let joined = match params.get(k.as_ref()).and_then(Value::as_str) {
            Some(prev) => format!("{prev},{v}"),
            None => v.into_owned(),
        };
        params.insert(k.into_owned(), json!(joined));
    }
    let cookies: Vec<&str> = parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
    let user_agent = headers.get("user-agent").cloned().unwrap_or(Value::Null);
    let (body, b64) = body_fields(body);
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": if function_url { "anonymous" } else { "123456789012" },
            "apiId": "hubcapdev",
            "domainName": host,
            "domainPrefix": "hubcapdev",
            "http": { "method": parts.method.as_str(), "path": path, "protocol": "HTTP/1.1", "sourceIp": ip, "userAgent": user_agent },
            "requestId": format!("lambda-dev-{id}"),
            "routeKey": "$default",
            "stage": "$default",
            "time": "07/Dec/2026:00:00:00 +0000",
            "timeEpoch": epoch_ms(),
        },
        "body": body,
        "isBase64Encoded": b64,
    });
    if !params.is_empty() {
        event["queryStringParameters"] = Value::Object(params);
    }
    if !cookies.is_empty() {
        event["cookies"] = json!(cookies.join("; ").split("; ").collect::<Vec<_>>());
    }
    event
}

/// A REST API's event (payload 1.0), stage `mirror`, reached through a
/// custom domain with an empty base path mapping (so the client's path has
/// no stage in it).
fn v1_event(parts: &axum::http::request::Parts, body: &[u8], peer: SocketAddr, dropped: &[&str], id: u64) -> Value {
    let path = parts.uri.path();
    let mut headers = Map::new();
    let mut multi = Map::new();
    for name in parts.headers.keys() {
        if dropped.contains(&name.as_str()) {
            continue;
        }
        let values: Vec<&str> = parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        if let Some(last) = values.last() {
            headers.insert(name.as_str().to_owned(), json!(last));
        }
        multi.insert(name.as_str().to_owned(), json!(values));
    }
    let ip = peer.ip().to_string();
    headers.insert("X-Forwarded-For".into(), json!(ip));
    multi.insert("X-Forwarded-For".into(), json!([ip]));
    let (mut query, mut multi_query) = (Map::new(), Map::new());
    for (k, v) in url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        query.insert(k.clone().into_owned(), json!(v));
        if let Some(values) = multi_query.entry(k.into_owned()).or_insert_with(|| json!([])).as_array_mut() {
            values.push(json!(v));
        }
    }
    let or_null = |m: Map<String, Value>| if m.is_empty() { Value::Null } else { Value::Object(m) };
    let host = headers.get("host").and_then(Value::as_str).unwrap_or("localhost").to_owned();
    let (body, b64) = body_fields(body);
    json!({
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": parts.method.as_str(),
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": or_null(query),
        "multiValueQueryStringParameters": or_null(multi_query),
        "pathParameters": { "proxy": path.trim_start_matches('/') },
        "stageVariables": null,
        "requestContext": {
            "resourceId": "hubcap",
            "resourcePath": "/{proxy+}",
            "httpMethod": parts.method.as_str(),
            "path": path,
            "accountId": "123456789012",
            "stage": REST_STAGE,
            "requestId": format!("lambda-dev-{id}"),
            "requestTimeEpoch": epoch_ms(),
            "identity": { "sourceIp": ip, "userAgent": parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()) },
            "apiId": "hubcapdev",
            "protocol": "HTTP/1.1",
            "domainName": host,
        },
        "body": body,
        "isBase64Encoded": b64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(headers: &[(&str, &str)], body: &'static str) -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: bytes::Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn a_head_answer_says_zero_behind_every_lambda_front_end_and_its_challenge_is_renamed_where_reported() {
        let sent = [("Content-Length", "1234"), ("Docker-Content-Digest", "sha256:x"), ("WWW-Authenticate", "Basic realm=\"hubcap\"")];
        for fe in [FrontEnd::FunctionUrl, FrontEnd::HttpApi, FrontEnd::RestApi, FrontEnd::WorstCase] {
            let resp = rewrite(&fe.rules(), true, answer(&sent, ""));
            let h = resp.headers();
            assert_eq!(h[header::CONTENT_LENGTH], "0", "{fe:?}");
            assert_eq!(h["x-amzn-remapped-content-length"], "1234", "{fe:?}");
            assert_eq!(h["docker-content-digest"], "sha256:x", "{fe:?}");
            let renamed = fe != FrontEnd::HttpApi;
            assert_eq!(h.contains_key(header::WWW_AUTHENTICATE), !renamed, "{fe:?}");
            assert_eq!(h.contains_key("x-amzn-remapped-www-authenticate"), renamed, "{fe:?}");
        }
        let resp = rewrite(&FrontEnd::Passthrough.rules(), true, answer(&sent, ""));
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "1234");
        // A GET's length is the body's, behind any of them.
        let resp = rewrite(&FrontEnd::RestApi.rules(), false, answer(&[("Content-Length", "5"), ("Date", "then")], "hello"));
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(resp.headers()["x-amzn-remapped-date"], "then");
    }

    #[test]
    fn repeated_request_headers_arrive_as_each_payload_carries_them() {
        let req = Request::builder()
            .method("GET")
            .uri("/v2/library/a/manifests/1?ns=docker.io")
            .header("accept", "application/vnd.oci.image.index.v1+json")
            .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
            .header("connection", "keep-alive")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let v2 = v2_event(&parts, b"", peer, true, HOP_BY_HOP, 1);
        assert_eq!(v2["headers"]["accept"], "application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json");
        assert!(v2["headers"].get("connection").is_none());
        assert_eq!(v2["queryStringParameters"]["ns"], "docker.io");
        let v1 = v1_event(&parts, b"", peer, REST_DROPPED_IN, 1);
        assert_eq!(v1["headers"]["accept"], "application/vnd.docker.distribution.manifest.v2+json", "the last value only");
        assert_eq!(v1["multiValueHeaders"]["accept"].as_array().unwrap().len(), 2);
        assert_eq!(v1["requestContext"]["stage"], REST_STAGE);
        // Both parse as the events lambda_http reads.
        for event in [v1, v2] {
            let parsed: lambda_http::request::LambdaRequest = serde_json::from_value(event).unwrap();
            let req = lambda_http::Request::from(parsed);
            assert!(req.uri().path().ends_with("/v2/library/a/manifests/1"), "{}", req.uri());
        }
    }
}

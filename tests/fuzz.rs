//! Property tests (proptest, stable Rust) over the parsers that take bytes
//! from the network: manifest and index parsing, the name/reference/digest
//! grammar, `WWW-Authenticate` challenges, the blob `Range` decision (served
//! through `ServeFile` as the embedded backend serves it) and the Lambda
//! event adapter. Each property draws a seed from `tests/corpus/<target>/`
//! and mutates it (byte flips, truncation, insertion of quotes, commas, NUL,
//! huge numbers, unicode, duplicated slices; for JSON also structural edits),
//! or generates input from the grammar, or takes random bytes; and asserts
//! what the parser promises, not only that it does not panic.
//!
//! Bounded: each property runs a fixed number of cases (`CASES` times a
//! per-property factor) from a fixed RNG seed, so a run is repeatable and
//! takes seconds. `PROPTEST_CASES=100000 cargo nextest run --test fuzz`
//! runs longer; `PROPTEST_RNG_SEED=<u64>` explores other inputs. Nothing is
//! written to disk: a failure prints the shrunk input (the bytes escaped, and
//! the corpus seed it came from); rerunning with the same seed and case count
//! reproduces it, and the printed input goes into a unit test as it is.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;

use hubcap::mirror::upstream::parse_challenge;
use hubcap::oci::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Digest, ErrorCode, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, Reference, RepoPath,
    canonical_registry, parse_manifest, split_image, validate_name,
};

// ---------------------------------------------------------------- running

/// Cases per property (times its factor) unless `PROPTEST_CASES` is set.
const CASES: u32 = 512;
/// The RNG seed unless `PROPTEST_RNG_SEED` is set.
const SEED: u64 = 0x6875_6263_6170;

fn config(factor: u32) -> Config {
    let set = |var: &str| std::env::var_os(var).is_some();
    let env = Config::default(); // PROPTEST_* variables applied
    Config {
        cases: if set("PROPTEST_CASES") { env.cases } else { CASES * factor },
        rng_seed: if set("PROPTEST_RNG_SEED") { env.rng_seed } else { RngSeed::Fixed(SEED) },
        failure_persistence: None,
        // A failure is reported within a minute, shrunk as far as it got.
        max_shrink_time: if set("PROPTEST_MAX_SHRINK_TIME") { env.max_shrink_time } else { 60_000 },
        ..env
    }
}

/// Runs `test` on `factor * CASES` values of `strategy`; a failure panics
/// with the shrunk input.
fn check<S: Strategy>(factor: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: fmt::Debug,
{
    let mut runner = TestRunner::new(config(factor));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------- corpus

/// One corpus entry: a file, or one line of a `seeds.txt`.
#[derive(Clone, Debug)]
struct Seed {
    name: String,
    bytes: Vec<u8>,
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target)
}

/// Every file of `tests/corpus/<target>/` (sorted), or with `lines`, every
/// non-empty line of them.
fn corpus(target: &str, lines: bool) -> Vec<Seed> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target)).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    let mut seeds = Vec::new();
    for path in paths {
        let bytes = std::fs::read(&path).unwrap();
        let file = format!("{target}/{}", path.file_name().unwrap().to_string_lossy());
        if lines {
            for (n, line) in bytes.split(|b| *b == b'\n').enumerate().filter(|(_, l)| !l.is_empty()) {
                seeds.push(Seed { name: format!("{file}:{}", n + 1), bytes: line.to_vec() });
            }
        } else {
            seeds.push(Seed { name: file, bytes });
        }
    }
    assert!(!seeds.is_empty(), "no seeds in tests/corpus/{target}");
    seeds
}

// ---------------------------------------------------------------- mutations

/// What a property is given: bytes, and where they came from.
#[derive(Clone)]
struct Input {
    from: String,
    bytes: Vec<u8>,
}

impl Input {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" (from {})", self.bytes.escape_ascii(), self.from)
    }
}

/// Bytes that parsers trip on.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b",",
    b"\0",
    b"\\",
    b"\\\"",
    b":",
    b";",
    b"/",
    b"=",
    b"{",
    b"}",
    b"[",
    b"]",
    b"-",
    b" ",
    b"\t",
    b"\r\n",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"00",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999999",
    b"1e309",
    b"-0",
    b"\xff",
    b"\xc3",
    "\u{e9}".as_bytes(),
    "\u{1f980}".as_bytes(),
    "\u{202e}".as_bytes(),
    "\u{feff}".as_bytes(),
    b"sha256:",
    b"bytes=",
    b"%00",
    b"%2F",
    b"..",
    b"@",
    b"\"digest\":\"sha256:\",",
    b"\"mediaType\":\"application/vnd.oci.image.index.v1+json\",",
];

fn interesting_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        5 => select(TOKENS).prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 1..8),
        1 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
        1 => any::<u64>().prop_map(|n| n.to_string().into_bytes()),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Overwrite(Index, Vec<u8>),
    Delete(Index, usize),
    /// Copies `len` bytes from the first index to the second (a repeated
    /// key, a second range, a doubled segment).
    Duplicate(Index, usize, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), 1..=u8::MAX).prop_map(|(i, mask)| Mutation::Flip(i, mask)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        4 => (any::<Index>(), interesting_bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), interesting_bytes()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        1 => (any::<Index>(), 1..16usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1..80usize, any::<Index>()).prop_map(|(i, n, j)| Mutation::Duplicate(i, n, j)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i, mask) if len > 0 => bytes[i.index(len)] ^= mask,
        Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Mutation::Insert(i, b) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Overwrite(i, b) => {
            let at = i.index(len + 1);
            bytes.splice(at..(at + b.len()).min(len), b.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let at = i.index(len);
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Duplicate(i, n, j) if len > 0 => {
            let at = i.index(len);
            let piece = bytes[at..(at + n).min(len)].to_vec();
            let to = j.index(len + 1);
            bytes.splice(to..to, piece);
        }
        _ => {}
    }
}

/// A seed as it is, a mutated seed, or random bytes.
fn fuzzed(seeds: Vec<Seed>) -> impl Strategy<Value = Input> {
    let mutated = (select(seeds.clone()), vec(mutation(), 1..6)).prop_map(|(seed, ms)| {
        let mut bytes = seed.bytes;
        ms.iter().for_each(|m| apply(&mut bytes, m));
        Input { from: format!("{} + {} mutations", seed.name, ms.len()), bytes }
    });
    prop_oneof![
        1 => select(seeds).prop_map(|s| Input { from: s.name, bytes: s.bytes }),
        8 => mutated,
        2 => vec(any::<u8>(), 0..160).prop_map(|bytes| Input { from: "random bytes".into(), bytes }),
    ]
}

/// Strings that mean something to one parser or another.
const STRINGS: &[&str] = &[
    "",
    " ",
    "\0",
    "\u{1f980}",
    "\u{e9}t\u{e9}",
    "a b",
    "\"",
    "\\",
    ",",
    "/",
    "//",
    "..",
    "/v2/",
    "/v2/library/hello/manifests/latest",
    "/v2/../../etc/passwd",
    "/v2/%2e%2e/x",
    "/prod",
    "/prod/v2/library/hello/blobs/sha256:523ae7b432b4615083a04aeaba76db12bdb84a2817da78e2a1b1b8a252a38217",
    "prod",
    "$default",
    "v2",
    "?a=b&n=1",
    "#frag",
    "GET",
    "HEAD",
    "get",
    "DELETE",
    "203.0.113.10",
    "::1",
    "2001:db8::1",
    "256.1.1.1",
    "1.2.3.4:80",
    "http",
    "https",
    "ftp",
    "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com",
    "localhost:99999",
    "[::1]",
    "@",
    ":",
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "sha256:44136FA355B3678A1146AD16F7E8649E94FB4FC21FE77E8310C060F61CAAFF8A",
    "sha256:44136fa355",
    "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/json",
    "text/plain",
    "bytes=0-1",
];

fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(STRINGS).prop_map(str::to_owned),
        2 => "\\PC{0,16}",
        1 => ".{0,6}",
        1 => (select(STRINGS), select(STRINGS)).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => interesting_string().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(json!({})),
        1 => vec(interesting_string(), 0..4).prop_map(|v| json!(v)),
    ]
}

/// A structural edit of a JSON document; the index picks the node.
#[derive(Clone, Debug)]
enum Edit {
    /// Another string where a string was (so typed documents still parse).
    Rewrite(Index, String),
    Replace(Index, Value),
    Remove(Index),
    Add(Index, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = prop_oneof![
        3 => select(&["digest", "mediaType", "manifests", "layers", "config", "size", "Accept", "accept", "Host", "host",
            "X-Forwarded-Proto", "x-forwarded-proto", "stage", "sourceIp", "path", "rawPath", "rawQueryString", "httpMethod",
            "method", "cookies", "body", "isBase64Encoded"][..])
        .prop_map(str::to_owned),
        1 => "\\PC{0,8}",
    ];
    prop_oneof![
        6 => (any::<Index>(), interesting_string()).prop_map(|(i, v)| Edit::Rewrite(i, v)),
        2 => (any::<Index>(), json_value()).prop_map(|(i, v)| Edit::Replace(i, v)),
        2 => any::<Index>().prop_map(Edit::Remove),
        2 => (any::<Index>(), key, json_value()).prop_map(|(i, k, v)| Edit::Add(i, k, v)),
    ]
}

/// JSON pointers to every node of `v`, root first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => m.iter().for_each(|(k, c)| pointers(c, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, c)| pointers(c, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn apply_edit(doc: &mut Value, e: &Edit) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    match e {
        Edit::Rewrite(i, v) => {
            let strings: Vec<&String> = all.iter().filter(|p| doc.pointer(p).unwrap().is_string()).collect();
            if !strings.is_empty() {
                let p = strings[i.index(strings.len())].clone();
                *doc.pointer_mut(&p).unwrap() = Value::String(v.clone());
            }
        }
        Edit::Replace(i, v) => *doc.pointer_mut(&all[i.index(all.len())]).unwrap() = v.clone(),
        Edit::Remove(i) if all.len() > 1 => {
            let p = &all[1 + i.index(all.len() - 1)];
            let (parent, last) = p.rsplit_once('/').unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent).unwrap() {
                Value::Object(m) => drop(m.remove(&last)),
                Value::Array(a) => drop(a.remove(last.parse::<usize>().unwrap())),
                _ => unreachable!("a parent is a container"),
            }
        }
        Edit::Add(i, key, v) => {
            let containers: Vec<&String> =
                all.iter().filter(|p| doc.pointer(p).unwrap().is_object() || doc.pointer(p).unwrap().is_array()).collect();
            if containers.is_empty() {
                return;
            }
            let p = containers[i.index(containers.len())].clone();
            match doc.pointer_mut(&p).unwrap() {
                Value::Object(m) => drop(m.insert(key.clone(), v.clone())),
                Value::Array(a) => a.push(v.clone()),
                _ => unreachable!(),
            }
        }
        _ => {}
    }
}

/// A JSON seed edited structurally (so it still parses as JSON), then
/// sometimes mutated as bytes too.
fn fuzzed_json(seeds: Vec<Seed>) -> impl Strategy<Value = Input> {
    let byte_mutations = prop_oneof![3 => Just(Vec::new()), 1 => vec(mutation(), 1..3)];
    let edited = (select(seeds.clone()), vec(edit(), 1..6), any::<bool>(), byte_mutations).prop_map(|(seed, edits, pretty, ms)| {
        let mut doc: Value = serde_json::from_slice(&seed.bytes).unwrap();
        edits.iter().for_each(|e| apply_edit(&mut doc, e));
        let mut bytes = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.unwrap();
        ms.iter().for_each(|m| apply(&mut bytes, m));
        Input { from: format!("{} + {} edits, {} mutations", seed.name, edits.len(), ms.len()), bytes }
    });
    prop_oneof![3 => edited, 1 => fuzzed(seeds)]
}

// ---------------------------------------------------------------- names

fn is_sha256(s: &str) -> bool {
    s.len() == 71 && s.starts_with("sha256:") && s[7..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[test]
fn digests_that_parse_are_sha256_and_lowercase_hex() {
    let generated = prop_oneof!["sha256:[0-9a-f]{64}", "[a-z0-9]{1,8}([+._-][a-z0-9]{1,4})?:[0-9a-fA-F]{0,70}", "sha256:[0-9a-f]{60,68}",]
        .prop_map(|s| Input { from: "grammar".into(), bytes: s.into_bytes() });
    check(2, prop_oneof![fuzzed(corpus("digest", true)), generated], |input| {
        let s = input.text();
        match Digest::parse(&s) {
            Ok(d) => {
                prop_assert!(is_sha256(&s), "accepted {s:?}");
                prop_assert_eq!(d.as_str(), s.as_str());
                prop_assert_eq!(d.hex(), &s[7..]);
                prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
            }
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::DigestInvalid);
                prop_assert!(!is_sha256(&s), "refused a good digest {s:?}: {}", e.message);
            }
        }
        // What the mirror computes itself always parses.
        let own = Digest::of(&input.bytes);
        prop_assert_eq!(Digest::parse(own.as_str()).unwrap(), own);
        Ok(())
    });
}

fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    (1..=128).contains(&b.len()) && word(b[0]) && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

#[test]
fn references_that_parse_render_back_to_themselves() {
    let generated = prop_oneof!["[A-Za-z0-9_][A-Za-z0-9_.-]{0,130}", "sha256:[0-9a-f]{64}", "[a-z]{1,6}:[ -~]{0,8}"]
        .prop_map(|s| Input { from: "grammar".into(), bytes: s.into_bytes() });
    check(2, prop_oneof![fuzzed(corpus("reference", true)), generated], |input| {
        let s = input.text();
        match Reference::parse(&s) {
            Ok(r) => {
                prop_assert_eq!(r.to_string(), s.clone());
                prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r.clone());
                match r {
                    Reference::Tag(t) => prop_assert!(is_tag(&t), "tag {t:?}"),
                    Reference::Digest(d) => prop_assert!(is_sha256(d.as_str())),
                }
            }
            Err(e) => {
                prop_assert!(matches!(e.code, ErrorCode::TagInvalid | ErrorCode::DigestInvalid), "{:?}", e.code);
                prop_assert!(!is_tag(&s) && !is_sha256(&s), "refused {s:?}: {}", e.message);
            }
        }
        Ok(())
    });
}

const COMPONENT: &str = "[a-z0-9]{1,6}(([.]|_|__|-{1,3})[a-z0-9]{1,6}){0,2}";

/// What the name grammar allows, with or without a registry.
fn grammar_name() -> impl Strategy<Value = String> {
    let name = vec(COMPONENT, 1..5).prop_map(|c| c.join("/"));
    let registry = prop_oneof![
        Just(String::new()),
        select(&["docker.io/", "index.docker.io/", "ghcr.io/", "localhost/", "localhost:5000/", "127.0.0.1:5001/", "[::1]:5000/"][..])
            .prop_map(str::to_owned),
        "[a-z0-9]{1,8}\\.[a-z]{2,4}(:[0-9]{1,5})?/",
    ];
    prop_oneof![
        4 => (registry, name).prop_map(|(r, n)| format!("{r}{n}")),
        // Long single components, around the 255-character limit.
        1 => "[a-z0-9]{240,256}",
    ]
}

#[test]
fn names_resolve_to_a_repository_that_resolves_to_itself() {
    let names = prop_oneof![
        2 => fuzzed(corpus("name", true)),
        1 => grammar_name().prop_map(|s| Input { from: "grammar".into(), bytes: s.into_bytes() }),
    ];
    let ns = prop_oneof![
        4 => Just(None),
        1 => select(&["docker.io", "ghcr.io", "localhost:5000", "Quay.IO", " index.docker.io ", "", "registry", "a b", "x/y"][..])
            .prop_map(|s| Some(s.to_owned())),
        1 => "[a-z0-9.:\\[\\]-]{0,12}".prop_map(Some),
    ];
    check(4, (names, ns), |(input, ns)| {
        let s = input.text();
        match RepoPath::resolve(&s, ns.as_deref()) {
            Ok(r) => {
                prop_assert!(validate_name(&r.name).is_ok(), "resolved to a name that does not validate: {r:?}");
                prop_assert_eq!(canonical_registry(&r.registry).unwrap(), r.registry.clone());
                prop_assert_eq!(RepoPath::from_key(&r.key()), Some(r.clone()));
                prop_assert_eq!(r.key(), r.to_string());
                prop_assert_eq!(RepoPath::resolve(&r.name, Some(&r.registry)).unwrap(), r.clone());
                if r.registry.contains(['.', ':']) || r.registry == "localhost" {
                    prop_assert_eq!(RepoPath::resolve(&r.key(), None).unwrap(), r);
                }
            }
            Err(e) => prop_assert_eq!(e.code, ErrorCode::NameInvalid),
        }
        Ok(())
    });
}

#[test]
fn grammar_names_always_resolve() {
    check(2, grammar_name(), |name| {
        let (registry, rest) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (Some(first), rest),
            _ => (None, name.as_str()),
        };
        let r = RepoPath::resolve(&name, None);
        let Ok(host) = registry.map(canonical_registry).transpose() else {
            // A first component with a `.` is a host, and `_` is no host's.
            prop_assert!(r.is_err(), "{name:?} resolved with an invalid registry: {r:?}");
            return Ok(());
        };
        let hub = host.is_none_or(|h| h == "docker.io");
        let full = if hub && !rest.contains('/') { format!("library/{rest}") } else { rest.to_owned() };
        if full.len() <= 255 {
            let r = r.map_err(|e| TestCaseError::fail(format!("{name:?}: {}", e.message)))?;
            prop_assert_eq!(r.name, full);
        } else {
            prop_assert!(r.is_err(), "{name:?} resolved to a name longer than 255: {r:?}");
        }
        Ok(())
    });
}

#[test]
fn images_split_into_the_name_and_reference_they_were_made_of() {
    let reference = prop_oneof![
        Just(None),
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}".prop_map(|t| Some(format!(":{t}"))),
        "[0-9a-f]{64}".prop_map(|h| Some(format!("@sha256:{h}"))),
    ];
    check(2, (grammar_name(), reference), |(name, reference)| {
        let image = format!("{name}{}", reference.as_deref().unwrap_or(""));
        let want = reference.as_deref().map_or("latest", |r| &r[1..]);
        prop_assert_eq!(split_image(&image), (name.as_str(), want));
        Ok(())
    });
    // Whatever the input, the split loses nothing.
    check(2, fuzzed(corpus("name", true)), |input| {
        let s = input.text();
        let (name, reference) = split_image(&s);
        let rebuilt = [format!("{name}@{reference}"), format!("{name}:{reference}")];
        prop_assert!((name == s && reference == "latest") || rebuilt.contains(&s), "{s:?} -> {name:?} {reference:?}");
        Ok(())
    });
}

// ---------------------------------------------------------------- manifests

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(OCI_INDEX),
    Some(OCI_MANIFEST),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_MANIFEST_LIST),
    Some("application/json"),
    Some("application/octet-stream"),
    Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    Some("APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON"),
    Some(""),
    Some(";"),
    Some("text/plain"),
    Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
];

/// `parse_manifest` against what the JSON holds: a clear error, or exactly
/// the digests and sizes the document lists, each a digest that parses.
fn check_manifest(body: &[u8], content_type: Option<&str>) -> Result<(), TestCaseError> {
    let info = match parse_manifest(body, content_type) {
        Err(e) => {
            prop_assert_eq!(e.code, ErrorCode::ManifestInvalid);
            prop_assert!(e.message.starts_with("upstream sent an invalid manifest: "), "{}", e.message);
            return Ok(());
        }
        Ok(info) => info,
    };
    prop_assert!(MANIFEST_TYPES.contains(&info.media_type.as_str()), "media type {:?}", info.media_type);
    let doc: Value = serde_json::from_slice(body).map_err(|e| TestCaseError::fail(format!("parsed non-JSON: {e}")))?;
    let listed = |field: &str| doc.get(field).and_then(Value::as_array).cloned().unwrap_or_default();
    let digest_of = |v: &Value| v.get("digest").and_then(Value::as_str).map(str::to_owned);
    for d in info.manifests.iter().chain(info.blobs.iter().map(|b| &b.digest)) {
        prop_assert_eq!(&Digest::parse(d.as_str()).unwrap(), d);
    }
    if info.is_index() {
        prop_assert!(info.blobs.is_empty());
        let want: Vec<Option<String>> = listed("manifests").iter().map(digest_of).collect();
        let got: Vec<Option<String>> = info.manifests.iter().map(|d| Some(d.to_string())).collect();
        prop_assert_eq!(got, want);
    } else {
        prop_assert!(info.manifests.is_empty());
        let mut want = vec![(digest_of(&doc["config"]), doc["config"].get("size").and_then(Value::as_u64))];
        want.extend(listed("layers").iter().map(|l| (digest_of(l), l.get("size").and_then(Value::as_u64))));
        let got: Vec<_> = info.blobs.iter().map(|b| (Some(b.digest.to_string()), b.size)).collect();
        prop_assert_eq!(got, want);
    }
    Ok(())
}

#[test]
fn manifests_parse_to_an_error_or_to_exactly_the_digests_they_list() {
    check(4, (fuzzed_json(corpus("manifest", false)), select(CONTENT_TYPES)), |(input, ct)| check_manifest(&input.bytes, ct));
}

/// A manifest or index as upstream might write it, and what it lists.
#[derive(Clone, Debug)]
struct Generated {
    kind: &'static str,
    with_media_type: bool,
    declared: Option<&'static str>,
    config: (String, Value),
    entries: Vec<(String, Value)>,
    extra: Vec<(&'static str, Value)>,
}

fn generated_manifest() -> impl Strategy<Value = Generated> {
    let size = prop_oneof![
        4 => any::<u64>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(json!("12")),
    ];
    let descriptor = ("sha256:[0-9a-f]{64}", size);
    let extra = vec((select(&["annotations", "artifactType", "subject", "schemaVersion", "x-vendor"][..]), json_value()), 0..3);
    (select(&MANIFEST_TYPES[..]), any::<bool>(), select(CONTENT_TYPES), descriptor.clone(), vec(descriptor, 0..12), extra).prop_map(
        |(kind, with_media_type, declared, config, entries, extra)| Generated { kind, with_media_type, declared, config, entries, extra },
    )
}

#[test]
fn generated_manifests_list_every_descriptor_in_order() {
    check(2, generated_manifest(), |g| {
        let index = g.kind == OCI_INDEX || g.kind == DOCKER_MANIFEST_LIST;
        let descriptor = |(d, size): &(String, Value)| {
            let mut o = json!({"mediaType": "application/octet-stream", "digest": d});
            if !size.is_null() {
                o["size"] = size.clone();
            }
            o
        };
        let mut doc = json!({});
        for (k, v) in &g.extra {
            doc[*k] = v.clone();
        }
        doc["schemaVersion"] = json!(2);
        if g.with_media_type {
            doc["mediaType"] = json!(g.kind);
        }
        if index {
            doc["manifests"] = g.entries.iter().map(descriptor).collect();
        } else {
            doc["config"] = descriptor(&g.config);
            doc["layers"] = g.entries.iter().map(descriptor).collect();
        }
        let body = serde_json::to_vec(&doc).unwrap();
        let declared = g.declared.map(|d| d.split(';').next().unwrap().trim().to_ascii_lowercase());
        let declared = declared.filter(|d| MANIFEST_TYPES.contains(&d.as_str()));
        let want_type = match declared {
            Some(d) => d,
            None if g.with_media_type => g.kind.to_owned(),
            None if index => OCI_INDEX.to_owned(),
            None => OCI_MANIFEST.to_owned(),
        };
        let result = parse_manifest(&body, g.declared);
        if index && !(want_type == OCI_INDEX || want_type == DOCKER_MANIFEST_LIST) {
            // An index declared as an image manifest: it has no config.
            prop_assert!(result.is_err_and(|e| e.message.contains("without config")));
            return Ok(());
        }
        let info = result.map_err(|e| TestCaseError::fail(e.message.into_owned()))?;
        prop_assert_eq!(&info.media_type, &want_type);
        check_manifest(&body, g.declared)?;
        if info.is_index() == index {
            let n = if index { info.manifests.len() } else { info.blobs.len() - 1 };
            prop_assert_eq!(n, g.entries.len());
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- challenges

#[test]
fn challenges_parse_to_a_lowercase_scheme_and_trimmed_lowercase_keys() {
    check(4, fuzzed(corpus("challenge", true)), |input| {
        let (scheme, params) = parse_challenge(&input.text());
        prop_assert_eq!(scheme.to_ascii_lowercase(), scheme.clone());
        prop_assert!(!scheme.contains(' '), "scheme {scheme:?}");
        for key in params.keys() {
            prop_assert!(!key.is_empty() && !key.contains('='), "key {key:?}");
            prop_assert_eq!(key.trim(), key.as_str());
            prop_assert_eq!(key.to_ascii_lowercase(), key.clone());
        }
        Ok(())
    });
}

/// One `auth-param` as RFC 9110 allows it: `token BWS "=" BWS (token /
/// quoted-string)`.
#[derive(Clone, Debug)]
struct Param {
    key: String,
    value: String,
    quoted: bool,
    escape_all: bool,
    before: &'static str,
    after: &'static str,
}

fn render(p: &Param) -> String {
    let value = if p.quoted {
        let mut q = String::from('"');
        for c in p.value.chars() {
            if p.escape_all || c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q + "\""
    } else {
        p.value.clone()
    };
    format!("{}{}={}{value}", p.key, p.before, p.after)
}

#[test]
fn generated_bearer_challenges_round_trip() {
    let bws = || select(&["", "", "", " ", "\t"][..]);
    let param = |key: &'static str| {
        let key = prop_oneof![
            Just(key.to_owned()),
            Just(key.to_ascii_uppercase()),
            Just(format!("{}{}", key[..1].to_ascii_uppercase(), &key[1..]))
        ];
        let value = prop_oneof![
            3 => ("\\PC{0,40}", any::<bool>()).prop_map(|(v, e)| (v, true, e)),
            1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}".prop_map(|v| (v, false, false)),
        ];
        (key, value, bws(), bws()).prop_map(|(key, (value, quoted, escape_all), before, after)| Param {
            key,
            value,
            quoted,
            escape_all,
            before,
            after,
        })
    };
    let params = (param("realm"), param("service"), param("scope"), proptest::option::of(param("error")))
        .prop_map(|(a, b, c, d)| [Some(a), Some(b), Some(c), d].into_iter().flatten().collect::<Vec<_>>())
        .prop_shuffle();
    let seps = vec(select(&[",", ", ", " ,", " , ", ",\t"][..]), 4);
    let scheme = select(&["Bearer", "bearer", "BEARER"][..]);
    check(4, (scheme, select(&[" ", "  "][..]), params, seps), |(scheme, gap, params, seps)| {
        let mut header = format!("{scheme}{gap}");
        for (i, p) in params.iter().enumerate() {
            if i > 0 {
                header.push_str(seps[i]);
            }
            header.push_str(&render(p));
        }
        let (got_scheme, got) = parse_challenge(&header);
        prop_assert_eq!(got_scheme, "bearer");
        let want: HashMap<String, String> = params.iter().map(|p| (p.key.to_ascii_lowercase(), p.value.clone())).collect();
        prop_assert_eq!(got, want, "header {:?}", header);
        Ok(())
    });
}

// ---------------------------------------------------------------- Range

/// Blobs of every length up to 40 bytes, in one temporary directory.
static BLOBS: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    for len in 0..=40u8 {
        std::fs::write(dir.path().join(len.to_string()), blob(len as usize)).unwrap();
    }
    dir
});

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn range_header() -> impl Strategy<Value = Input> {
    let number = prop_oneof![Just(String::new()), "[0-9]{1,2}", "0[0-9]{1,2}", "[0-9]{19,21}", any::<u64>().prop_map(|n| n.to_string())];
    let generated = (
        select(&["bytes=", "bytes=", "bytes=", "Bytes=", " bytes=", "bytes= ", "bytes =", "items="][..]),
        number.clone(),
        select(&["-", "-", "-", " -", "- ", "--", ""][..]),
        number,
        select(&["", "", "", ",0-1", ", 5-", " ", "\t"][..]),
    )
        .prop_map(|(unit, a, dash, b, tail)| Input { from: "grammar".into(), bytes: format!("{unit}{a}{dash}{b}{tail}").into_bytes() });
    prop_oneof![fuzzed(corpus("range", true)), generated]
}

#[test]
fn a_range_is_served_inside_the_blob_or_the_whole_blob_is() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let len = prop_oneof![1 => Just(0usize), 1 => 1..=3usize, 4 => 0..=40usize];
    check(4, (range_header(), len), |(input, len)| {
        let path = BLOBS.path().join(len.to_string());
        let Ok(value) = HeaderValue::from_bytes(&input.bytes) else {
            return Ok(()); // no HTTP server hands such a header on
        };
        let mut req = Request::get("/blob").header(header::RANGE, value).body(Body::empty()).unwrap();
        // As `local_blob` does.
        let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(range) = &range
            && !hubcap::http::range_to_honour(range, len as u64)
        {
            req.headers_mut().remove(header::RANGE);
        }
        let honoured = range.as_deref().is_some_and(|r| hubcap::http::range_to_honour(r, len as u64));
        let (status, headers, body) = rt.block_on(async {
            let resp = tower_http::services::ServeFile::new(path).oneshot(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            (parts.status, parts.headers, axum::body::to_bytes(Body::new(body), usize::MAX).await.unwrap())
        });
        let whole = blob(len);
        if !honoured {
            prop_assert_eq!(status, StatusCode::OK);
            prop_assert_eq!(&body[..], &whole[..]);
            return Ok(());
        }
        // Honoured: a single `bytes=first-last`, `bytes=first-` or `bytes=-suffix`.
        let spec = range.as_deref().unwrap().trim().strip_prefix("bytes=").unwrap().trim();
        prop_assert!(!spec.contains(','), "several ranges honoured: {spec:?}");
        let (first, last) = spec.split_once('-').unwrap();
        let len = len as u64;
        let want = if first.is_empty() {
            let n: u64 = last.parse().unwrap();
            (n > 0 && len > 0).then(|| (len - n.min(len), len - 1))
        } else {
            let a: u64 = first.parse().unwrap();
            let b = if last.is_empty() { len.saturating_sub(1) } else { last.parse::<u64>().unwrap().min(len.saturating_sub(1)) };
            (a < len).then_some((a, b))
        };
        let content_range = headers.get(header::CONTENT_RANGE).map(|v| v.to_str().unwrap().to_owned());
        match want {
            Some((a, b)) => {
                prop_assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{:?} of {} bytes", range, len);
                prop_assert!(a <= b && b < len);
                prop_assert_eq!(content_range, Some(format!("bytes {a}-{b}/{len}")));
                prop_assert_eq!(&body[..], &whole[a as usize..=b as usize]);
            }
            None => {
                prop_assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{:?} of {} bytes", range, len);
                prop_assert_eq!(content_range, Some(format!("bytes */{len}")));
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- Lambda events

fn plain(s: &str, extra: &[u8]) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// A path the URL parser leaves as it is: `/` and plain segments.
fn plain_path(p: &str) -> bool {
    p.starts_with('/') && p[1..].split('/').all(|seg| plain(seg, b"-_:.") && seg != "." && seg != "..")
}

/// What the adapter must keep, read from the event itself: the source IP,
/// the method, the stage, the path, and every value a URL is built from
/// (Host, X-Forwarded-Proto, the domain name).
type Kept = (Option<String>, axum::http::Method, Option<String>, Option<String>, Vec<String>);

fn kept(event: &lambda_http::request::LambdaRequest) -> Result<Kept, TestCaseError> {
    use lambda_http::request::LambdaRequest;
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    Ok(match event {
        LambdaRequest::ApiGatewayV1(e) => {
            let maps = [&e.headers, &e.multi_value_headers];
            let mut hosts: Vec<String> =
                maps.iter().flat_map(|m| m.get_all(header::HOST).iter().chain(m.get_all("x-forwarded-proto"))).map(text).collect();
            hosts.extend(e.request_context.domain_name.clone());
            let c = &e.request_context;
            (c.identity.source_ip.clone(), e.http_method.clone(), c.stage.clone(), e.path.clone(), hosts)
        }
        LambdaRequest::ApiGatewayV2(e) => {
            let mut hosts: Vec<String> =
                e.headers.get_all(header::HOST).iter().chain(e.headers.get_all("x-forwarded-proto")).map(text).collect();
            hosts.extend(e.request_context.domain_name.clone());
            let c = &e.request_context;
            (c.http.source_ip.clone(), c.http.method.clone(), c.stage.clone(), e.raw_path.clone(), hosts)
        }
        other => return Err(TestCaseError::fail(format!("an event of another kind: {other:?}"))),
    })
}

/// `request_from_event` is `keep_repeated_headers`, lambda_http's own
/// conversion (`From<LambdaRequest> for Request`), then `prepare_request`.
/// lambda_http's conversion panics (`unwrap`/`expect` on a URL or URI it
/// builds) on a Host, X-Forwarded-Proto or domain name that makes no URL, a
/// path without its leading `/`, a `rawQueryString` with characters a URI
/// may not hold, or a body flagged base64 that is not; the Lambda runtime
/// turns such a panic into a failed invocation (a 502). Those panics are
/// told apart, counted and printed here, not hidden: hubcap's own steps
/// must never panic, and wherever the conversion succeeds the adapter must
/// keep the source IP, the method and the path.
#[test]
fn lambda_events_adapt_without_panic_keeping_source_ip_method_and_path() {
    use lambda_http::request::LambdaRequest;
    use std::sync::Mutex;
    let (adapted, simple_paths) = (Mutex::new(0u32), Mutex::new(0u32));
    let upstream_panics: Mutex<Vec<(String, Input)>> = Mutex::new(Vec::new());
    check(4, fuzzed_json(corpus("event", false)), |input| {
        let event = || serde_json::from_slice::<LambdaRequest>(&input.bytes);
        let Ok(probe) = event() else { return Ok(()) };
        let probe = hubcap::lambda::keep_repeated_headers(probe);
        if let Err(panic) = std::panic::catch_unwind(move || drop(lambda_http::Request::from(probe))) {
            let why = panic.downcast_ref::<String>().cloned().or(panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            upstream_panics.lock().unwrap().push((why, input.clone()));
            return Ok(());
        }
        *adapted.lock().unwrap() += 1;
        let event = event().unwrap();
        let (ip, method, stage, path, hosts) = kept(&event)?;
        let req = hubcap::lambda::request_from_event(event);
        let client = req.extensions().get::<hubcap::http::ClientAddr>().map(|c| c.0);
        prop_assert_eq!(client, ip.as_deref().and_then(|ip| ip.parse().ok()), "the source IP");
        prop_assert_eq!(req.method(), &method);
        // The router sees the path the client asked for, without the stage,
        // wherever the URL parser has nothing to rewrite.
        let stage = stage.filter(|s| !s.is_empty() && s != "$default");
        let simple = hosts.iter().all(|h| plain(h, b"-.:") || h == "https" || h == "http")
            && stage.as_deref().is_none_or(|s| plain(s, b"-_"))
            && path.as_deref().is_some_and(plain_path);
        if simple {
            *simple_paths.lock().unwrap() += 1;
            let path = path.unwrap();
            let want = match stage.as_deref() {
                Some(s) => path.strip_prefix(&format!("/{s}")).filter(|r| r.starts_with('/')).unwrap_or(&path),
                None => &path,
            };
            prop_assert_eq!(req.uri().path(), want);
        }
        Ok(())
    });
    let (adapted, simple_paths) = (adapted.into_inner().unwrap(), simple_paths.into_inner().unwrap());
    let upstream_panics = upstream_panics.into_inner().unwrap();
    let mut kinds: Vec<&str> = upstream_panics.iter().map(|(why, _)| why.as_str()).collect();
    kinds.sort();
    kinds.dedup();
    eprintln!(
        "{adapted} mutated events adapted ({simple_paths} with the path checked); lambda_http's conversion panicked on {}",
        upstream_panics.len()
    );
    for kind in &kinds {
        let (_, example) = upstream_panics.iter().find(|(why, _)| why == kind).unwrap();
        eprintln!("  {kind}: {example:?}");
    }
    let cases = config(4).cases;
    assert!(adapted * 4 >= cases, "only {adapted} of {cases} events adapted: the mutations must keep more of them valid");
    assert!(simple_paths * 8 >= cases, "only {simple_paths} of {cases} events had their path checked");
}

// ---------------------------------------------------------------- the corpus itself

#[test]
fn the_corpus_seeds_are_what_they_claim() {
    // Manifests: all parse (with their own media type) but Docker schema 1.
    for seed in corpus("manifest", false) {
        let info = parse_manifest(&seed.bytes, None);
        if seed.name.contains("schema1") {
            assert!(info.is_err(), "{}", seed.name);
            continue;
        }
        let info = info.unwrap_or_else(|e| panic!("{}: {}", seed.name, e.message));
        let listed = info.blobs.len() + info.manifests.len();
        assert!(listed > 0 || seed.name.contains("empty"), "{}: lists nothing", seed.name);
    }
    // Events: each adapts to a /v2/ request from 203.0.113.10.
    for seed in corpus("event", false) {
        let event: lambda_http::request::LambdaRequest = serde_json::from_slice(&seed.bytes).unwrap();
        let req = hubcap::lambda::request_from_event(event);
        assert!(req.uri().path().starts_with("/v2/"), "{}: {}", seed.name, req.uri());
        assert_eq!(req.extensions().get::<hubcap::http::ClientAddr>().unwrap().0.to_string(), "203.0.113.10", "{}", seed.name);
    }
    // Challenges: each names its scheme, and bearer ones a realm.
    for seed in corpus("challenge", true) {
        let (scheme, params) = parse_challenge(&String::from_utf8(seed.bytes).unwrap());
        assert!(scheme == "bearer" || scheme == "basic", "{}", seed.name);
        assert!(params.contains_key("realm") || params.is_empty(), "{}: {params:?}", seed.name);
    }
}

/// Found by `lambda_events_adapt_without_panic_keeping_source_ip_method_and_path`:
/// an empty stage, to which lambda_http still adds `/` + stage (`//v2/`).
#[test]
fn an_empty_stage_is_removed_like_any_other() {
    for seed in ["event/function-url-base.json", "event/apigw-v1-base.json"] {
        let mut doc: Value = serde_json::from_slice(&std::fs::read(corpus_dir("").join(seed)).unwrap()).unwrap();
        doc["requestContext"]["stage"] = json!("");
        let event: lambda_http::request::LambdaRequest = serde_json::from_value(doc).unwrap();
        assert_eq!(hubcap::lambda::request_from_event(event).uri().path(), "/v2/", "{seed}");
    }
}

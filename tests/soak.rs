//! A bounded soak of the real `hubcap serve` binary: six clients pull a
//! dozen images (four at a time, the next four every 10 s) in a loop for
//! `HUBCAP_SOAK_SECS` (default 60) while the
//! upstream flaps (down, 429, 5xx, slow, trickling bodies) and the server's
//! own GC loop expires and deletes what they pull. Checked: every byte a
//! client received hashes to its digest, clients only ever see 429 or 503
//! as errors, a clean pull of every image succeeds afterwards, nothing is
//! left `pending` or `fetching`, and file descriptors and memory stay within
//! stated bounds. All traffic stays on 127.0.0.1. `SOAK_LOG=info` logs
//! every request and prints how they were answered.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::procs::{Proc, free_port, wait_ready};
use common::relay::Relay;
use hubcap::storage::FetchIndex;

/// Descriptors the server may hold at the end beyond what it held once
/// warmed up (idle upstream connections, SQLite's files).
const FD_SLACK: usize = 48;
/// Peak resident memory allowed, and growth from warm-up to the end.
const PEAK_RSS_MIB: u64 = 128;
const RSS_GROWTH_MIB: u64 = 32;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    pulls: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    /// Error answers by status.
    errors: Mutex<BTreeMap<u16, u64>>,
    /// Anything that must never happen, with what happened.
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

/// GETs `url`, following the mirror's redirects (to the blob, or back to
/// itself while a copy runs); the final body.
async fn follow(
    http: &reqwest::Client,
    base: &str,
    url: String,
    accept: Option<&str>,
) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), u16> {
    let mut url = url;
    for _ in 0..12 {
        let mut req = http.get(&url);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let resp = req.send().await.map_err(|_| 0u16)?;
        match resp.status().as_u16() {
            200 => {
                let headers = resp.headers().clone();
                // A blob's body cut short: `serve` following a copy that
                // failed (it cannot take a 200 back); anything else: 0.
                let cut = if accept.is_none() { 2 } else { 0 };
                return resp.bytes().await.map(|b| (headers, b)).map_err(|_| cut);
            }
            307 => {
                let loc = resp.headers()["location"].to_str().unwrap().to_owned();
                url = if loc.starts_with('/') { format!("{base}{loc}") } else { loc };
            }
            s => return Err(s),
        }
    }
    Err(1)
}

/// One pull, like a container client: manifest (the amd64 child of an
/// index), then every blob. Every 200 is verified; an error is returned as
/// its status (0: transport, 1: too many redirects, 2: a blob's body cut
/// short).
async fn pull_once(http: &reqwest::Client, base: &str, name: &str, tag: &str, tally: &Tally) -> Result<(), u16> {
    let manifest = |reference: String| {
        let url = format!("{base}/v2/{name}/manifests/{reference}");
        async move { follow(http, base, url, Some(common::ALL_MANIFESTS)).await }
    };
    let (headers, body) = manifest(tag.to_owned()).await?;
    let digest = headers.get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if digest != sha256(&body) {
        tally.violation(format!("{name}:{tag}: manifest bytes hash to {}, header said {digest:?}", sha256(&body)));
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(children) = v.get("manifests").and_then(|m| m.as_array()).cloned() {
        let child = children.iter().find(|c| c["platform"]["architecture"] == "amd64").unwrap_or(&children[0]);
        let want = child["digest"].as_str().unwrap_or("").to_owned();
        let (_, body) = manifest(want.clone()).await?;
        if sha256(&body) != want {
            tally.violation(format!("{name}@{want}: manifest bytes hash to {}", sha256(&body)));
        }
        v = serde_json::from_slice(&body).unwrap_or_default();
    }
    let mut blobs = vec![v["config"]["digest"].as_str().unwrap_or("").to_owned()];
    blobs.extend(v["layers"].as_array().into_iter().flatten().filter_map(|l| l["digest"].as_str().map(str::to_owned)));
    for b in blobs {
        let (_, bytes) = follow(http, base, format!("{base}/v2/{name}/blobs/{b}"), None).await?;
        if sha256(&bytes) != b {
            tally.violation(format!("{name}: blob {b} served with bytes hashing to {}", sha256(&bytes)));
        }
        tally.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_pulls_survive_a_flapping_upstream_and_a_running_gc() {
    let soak = Duration::from_secs(std::env::var("HUBCAP_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let hub = FakeHub::start().await;
    let mut names = Vec::new();
    for i in 0..12u64 {
        let name = format!("library/soak{i}");
        let published = match i % 3 {
            0 => Published::Image(images::small_image(Format::Docker, "amd64", 500 + i, 2)),
            1 => images::index(
                Format::Oci,
                vec![images::small_image(Format::Oci, "amd64", 600 + i, 2), images::small_image(Format::Oci, "arm64", 700 + i, 1)],
            ),
            // Layers large enough to trickle.
            _ => Published::Image(images::image(Format::Oci, "amd64", vec![vec![("big".into(), images::noise(24_000, 800 + i))]])),
        };
        hub.publish(&name, "1", &published);
        names.push(name.trim_start_matches("library/").to_owned());
    }
    let relay = Relay::start(hub.addr, None).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", relay.url)])
        // The hub's token realm and CDN are not the configured upstream (the relay is).
        .args(["--redirect-allow", &format!("{},{}", hub.cdn, hub.addr)])
        .args(["--tag-ttl", "2", "--blob-wait", "3", "--revalidate-timeout", "1"])
        .args(["--transfer-window", "3", "--min-transfer-rate", "4KiB"])
        // GC expires what was not pulled for 6 s and deletes it 2 s later:
        // far more aggressive than any real setting, so it races the pulls.
        .args(["--gc-interval", "2s", "--unused-for", "6s", "--grace", "2s"])
        .arg("--data")
        .arg(&data)
        .env("HUBCAP_LOG", std::env::var("SOAK_LOG").unwrap_or("warn,hubcap::serve=info".into()))
        .env("NO_COLOR", "1");
    let server = Proc::spawn(&mut cmd, dir.path().join("hubcap.log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{base}/v2/"), &server).await;
    let pid = server.child.id();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // Warm up: every image once, upstream healthy.
    let tally = Arc::new(Tally::default());
    for n in &names {
        pull_once(&http, &base, n, "1", &tally).await.unwrap_or_else(|s| panic!("warm-up pull of {n}: {s}\n{}", server.log()));
    }
    let (warm_fds, warm_rss) = (fds(pid), proc_status(pid, "VmRSS:"));

    // The upstream flaps while six clients pull.
    let stop = Arc::new(AtomicBool::new(false));
    let flapper = tokio::spawn({
        let (hub_state, stop) = (hub.state.clone(), stop.clone());
        let relay_up = relay.up.clone();
        async move {
            let phases = [
                ("ok", Fault::None, true),
                ("rate limited", Fault::RateLimit, true),
                ("ok", Fault::None, true),
                ("5xx", Fault::ServerError, true),
                ("ok", Fault::None, true),
                ("slow", Fault::Slow(Duration::from_millis(1500)), true),
                ("ok", Fault::None, true),
                ("down", Fault::None, false),
                ("ok", Fault::None, true),
                ("trickling", Fault::Trickle { every: Duration::from_millis(200), min_len: 10_000 }, true),
            ];
            let mut seen = Vec::new();
            for (name, fault, up) in phases.iter().cycle() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                *hub_state.fault.lock().unwrap() = fault.clone();
                let _ = relay_up.send(*up);
                seen.push(*name);
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            seen
        }
    });
    let started = Instant::now();
    let clients: Vec<_> = (0..6u64)
        .map(|c| {
            let (http, base, names, tally) = (http.clone(), base.clone(), names.clone(), tally.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c + 1));
                while started.elapsed() < soak {
                    // Four images at a time, the next four every 10 s: the
                    // rest go unpulled long enough for GC to delete them,
                    // and come back to be fetched again.
                    let epoch = (started.elapsed().as_secs() / 10) as usize;
                    let n = &names[(epoch * 4 + rng.below(4)) % names.len()];
                    tally.pulls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = pull_once(&http, &base, n, "1", &tally).await {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        *tally.errors.lock().unwrap().entry(status).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    let mut peak_fds = 0;
    while started.elapsed() < soak {
        peak_fds = peak_fds.max(fds(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let phases = flapper.await.unwrap();
    hub.set_fault(Fault::None);
    relay.set_up(true);

    // Afterwards, with upstream healthy: every image pulls cleanly.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in &names {
        let mut last = Ok(());
        for _ in 0..5 {
            last = pull_once(&http, &base, n, "1", &tally).await;
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(last.is_ok(), "a clean pull of {n} after the soak: {last:?}\n{}", server.log());
    }
    // Nothing left half-done in the index.
    let index = hubcap::storage::local::SqliteIndex::open(&data.join("index.db")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let unfinished = loop {
        let u = index.unfinished_blobs().await.unwrap();
        if u.is_empty() || Instant::now() > deadline {
            break u;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (end_fds, end_rss, peak_rss) = (fds(pid), proc_status(pid, "VmRSS:"), proc_status(pid, "VmHWM:"));
    let errors = tally.errors.lock().unwrap().clone();
    eprintln!(
        "upstream: {} manifest GETs, {} HEADs, {} blob GETs",
        hub.count(|c| &c.manifest_get),
        hub.count(|c| &c.manifest_head),
        hub.count(|c| &c.blob_get)
    );
    eprintln!(
        "soak {soak:?}: {} pulls, {} failed {errors:?}, {:.1} MB verified; phases {:?}; fds {warm_fds} warm, {peak_fds} peak, {end_fds} end; RSS {} MiB warm, {} MiB end, {} MiB peak",
        tally.pulls.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed) as f64 / 1e6,
        phases.len(),
        warm_rss / 1024,
        end_rss / 1024,
        peak_rss / 1024,
    );
    let violations = tally.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        errors.keys().all(|s| [2, 429, 503].contains(s)),
        "clients saw only 429, 503 and cut blobs as errors: {errors:?}\n{}",
        server.log()
    );
    // A followed blob is cut only when its copy failed for good.
    assert!(
        !errors.contains_key(&2) || server.log().contains("blob fetch failed"),
        "a blob was cut short though no copy failed: {errors:?}\n{}",
        server.log()
    );
    assert!(tally.pulls.load(Ordering::Relaxed) > tally.failed.load(Ordering::Relaxed) * 2, "most pulls succeed");
    assert!(phases.len() >= 10 || soak < Duration::from_secs(25), "every fault was tried: {phases:?}");
    assert!(unfinished.is_empty(), "left unfinished: {unfinished:?}");
    assert!(end_fds <= warm_fds + FD_SLACK, "descriptors {warm_fds} -> {end_fds}");
    assert!(peak_rss < PEAK_RSS_MIB * 1024, "peak RSS {peak_rss} KiB");
    assert!(end_rss < warm_rss + RSS_GROWTH_MIB * 1024, "RSS {warm_rss} -> {end_rss} KiB");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    if std::env::var("SOAK_LOG").is_ok() {
        for what in ["cache=\"miss\"", "cache=\"stale\"", "cache=\"revalidated\"", "status=503", "status=429"] {
            eprintln!("{what}: {}", log.matches(what).count());
        }
    }
    let sweeps: Vec<&str> = log.lines().filter(|l| l.contains(" gc") && l.contains("expired=")).collect();
    let deleting = sweeps.iter().filter(|l| !l.contains("deleted_blobs=0")).count();
    eprintln!("{} sweeps, {deleting} deleted blobs; last: {:?}", sweeps.len(), sweeps.last());
    assert!(deleting > 0 || soak < Duration::from_secs(25), "GC deleted blobs while clients pulled");
    let _ = relay.url;
}

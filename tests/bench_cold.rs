//! The benchmark's cold-layer figures: a single-layer image nobody has
//! pulled, its upstream's CDN giving each connection a capped rate, pulled
//! through `hubcap serve` (which streams the copy to the client), through
//! the `api` Lambda under `cargo lambda watch` on moto (which sends the
//! client to the upstream's CDN while its fetcher copies the layer), and
//! through `registry:2` (Debian's docker-registry 2.8 in proxy mode, which
//! streams what it fetches), by Docker's daemon, containerd's `ctr` and
//! podman, each pull of an image new to that mirror. Per client: the time
//! to the whole pull; per mirror: the time to the layer's first byte and
//! to its last as a plain HTTP client (following redirects) sees them.
//!
//! `bench/run.sh` runs it in full (`HUBCAP_BENCH=full`, a 40 MiB layer at
//! 1 MB/s per connection) and writes its table into BENCHMARKS.md between
//! the cold markers; the normal test run is a smoke run (9 MiB, 20 MB/s).
//! Docker's daemon falls back to Docker Hub when a mirror fails, so the
//! whole run is in a network namespace with only loopback (`run_isolated`).

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use common::containerd::Containerd;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::lambda::LambdaStack;
use common::netns::{Dockerd, inner, run_isolated};
use common::procs::{Proc, free_port, wait_ready};
use common::relay::{Relay, Tap};

#[test]
fn cold_layers_per_client() {
    run_isolated("netns::cold_layers_per_client_inner");
}

/// `registry:2` in proxy mode in front of `upstream`.
async fn registry2(dir: &Path, upstream: &str) -> (Proc, String) {
    let port = free_port();
    let yaml = format!(
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nproxy:\n  remoteurl: {upstream}\n",
        dir.join("registry2-data").display()
    );
    let cfg = dir.join("registry2.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let proc = Proc::spawn(std::process::Command::new("docker-registry").arg("serve").arg(&cfg), dir.join("registry2.log"));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/v2/"), &proc).await;
    (proc, url)
}

/// A plain client's GET of a blob, following redirects: seconds to its
/// first byte and to its last; the bytes must hash to `digest`.
async fn plain(mirror: &str, name: &str, digest: &str) -> (f64, f64) {
    use futures_util::StreamExt;
    let started = Instant::now();
    let resp = reqwest::get(format!("{mirror}/v2/{name}/blobs/{digest}")).await.unwrap();
    assert_eq!(resp.status(), 200, "{mirror}: {name} {digest}");
    let (mut first, mut got) = (None, Vec::new());
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        if !chunk.is_empty() {
            first.get_or_insert(started.elapsed().as_secs_f64());
        }
        got.extend_from_slice(&chunk);
    }
    assert_eq!(sha256(&got), digest, "{mirror}: the layer's bytes");
    (first.unwrap_or(0.0), started.elapsed().as_secs_f64())
}

/// podman with its storage in `dir` and docker.io mirrored by `mirror`.
fn podman(dir: &Path, mirror: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("podman");
    cmd.env("CONTAINERS_REGISTRIES_CONF", common::registries_conf(dir, mirror, &format!("p{}", free_port())));
    cmd.arg("--root").arg(dir.join("podman-root")).arg("--runroot").arg(dir.join("podman-run"));
    cmd.args(["--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]).args(args);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// One client's cold pull of `name:1` through `mirror`: seconds.
async fn pull(client: &str, dir: &Path, mirror: &str, name: &str, containerd: &Containerd, docker: Option<&Dockerd>) -> f64 {
    let started = Instant::now();
    let reference = format!("docker.io/{name}:1");
    let out = match client {
        "docker" => docker.unwrap().docker().args(["pull", &format!("{name}:1")]).output().await.unwrap(),
        "ctr" => {
            let hosts = containerd.hosts(mirror, &format!("h{}", free_port()));
            containerd.fetch(&hosts, &reference, Some("linux/amd64")).output().await.unwrap()
        }
        _ => {
            let policy = common::skopeo_policy(dir);
            let mut cmd = podman(dir, mirror, &["pull", "--arch", "amd64", "--os", "linux", "--signature-policy"]);
            cmd.arg(policy).arg(&reference).output().await.unwrap()
        }
    };
    let took = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{client} through {mirror}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Puts the table into BENCHMARKS.md between the cold markers.
fn write_section(section: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (start, end) = ("<!-- cold:start -->", "<!-- cold:end -->");
    let section = format!("{start}\n{section}{end}");
    let out = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(path, out).unwrap();
}

mod netns {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "run by its outer test, in its own namespaces"]
    async fn cold_layers_per_client_inner() {
        let Some((t0, dir)) = inner() else { return };
        let d = dir.path();
        let full = std::env::var("HUBCAP_BENCH").is_ok_and(|v| v == "full");
        let (size, rate) = if full { (40usize << 20, 1_000_000u64) } else { (9 << 20, 20_000_000) };
        let hub = FakeHub::start().await;
        // registry:2's proxy learns the token challenge from `/v2/`.
        hub.challenge_on_base();
        // Where each client's first byte of the layer is seen: on its way
        // from the mirror (a relay in front of each), or from the CDN (the
        // api's redirect; the fetcher's own copy is not counted).
        let (front_tap, cdn_tap) = (Tap::default(), Tap::default());
        let relay = Relay::start_tapped(hub.cdn.parse().unwrap(), Some(rate), cdn_tap.clone()).await;
        hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
        let relay_addr = relay.url.trim_start_matches("http://").to_owned();

        // The three mirrors, each in front of the same upstream.
        let hubcap_port = free_port();
        let serve = Proc::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
                .args(["serve", "--listen", &format!("127.0.0.1:{hubcap_port}"), "--upstream", &format!("docker.io={}", hub.url)])
                .args(["--redirect-allow", &format!("{},{relay_addr}", hub.cdn)])
                .arg("--data")
                .arg(d.join("hubcap-data"))
                .env("HUBCAP_LOG", "warn"),
            d.join("hubcap.log"),
        );
        let serve_url = format!("http://127.0.0.1:{hubcap_port}");
        wait_ready(&format!("{serve_url}/v2/"), &serve).await;
        let allow = [common::fakehub::cdns(), vec![relay_addr.clone()]].concat().join(",");
        let stack = LambdaStack::start(d, "benchcold", &hub.url, &[("HUBCAP_REDIRECT_ALLOW", allow)]).await;
        let (_reg, reg_url) = registry2(d, &hub.url).await;
        let mut mirrors = Vec::new();
        for (name, url) in [("hubcap serve", &serve_url), ("hubcap api Lambda", &stack.front), ("registry:2", &reg_url)] {
            let front = Relay::start_tapped(url.trim_start_matches("http://").parse().unwrap(), None, front_tap.clone()).await;
            mirrors.push((name, front));
        }
        let containerd = Containerd::start(d).await;
        println!("started in {:.1} s", t0.elapsed().as_secs_f64());

        let mut rows = Vec::new();
        for (mi, (mirror_name, front)) in mirrors.iter().enumerate() {
            let url = &front.url;
            // The client's first byte of the layer, counted from when it starts.
            let look = |prefix: &[u8]| {
                front_tap.look_for(prefix);
                cdn_tap.look_for(prefix);
            };
            let first_seen = || {
                let cdn = if mi == 1 { cdn_tap.seen() } else { None };
                [front_tap.seen(), cdn].into_iter().flatten().reduce(f64::min).unwrap_or(f64::NAN)
            };
            // The plain client first, then each container client, each on
            // an image new to this mirror.
            let img = images::image(Format::Oci, "amd64", vec![vec![("layer.bin".to_owned(), images::noise(size, 4000 + mi as u64))]]);
            let name = format!("library/cold-plain-{mi}");
            hub.publish(&name, "1", &Published::Image(img.clone()));
            let resp = reqwest::Client::new().get(format!("{url}/v2/{name}/manifests/1")).header("accept", images::ALL_MANIFESTS);
            let status = resp.send().await.unwrap().status();
            let log = || std::fs::read_to_string(d.join(if mi == 2 { "registry2.log" } else { "hubcap.log" })).unwrap_or_default();
            assert_eq!(status, 200, "{mirror_name}: {name}: {}", log());
            let (first, done) = plain(url, &name, &img.layers[0].0).await;
            let docker = Dockerd::start(&d.join(format!("docker-{mi}")), url).await;
            let mut times = Vec::new();
            for (ci, client) in ["docker", "ctr", "podman"].iter().enumerate() {
                let img = images::image(
                    Format::Oci,
                    "amd64",
                    vec![vec![("layer.bin".to_owned(), images::noise(size, 4100 + 10 * mi as u64 + ci as u64))]],
                );
                let name = format!("library/cold-{client}-{mi}");
                hub.publish(&name, "1", &Published::Image(img.clone()));
                look(&img.layers[0].1[..32]);
                let done = pull(client, d, url, &name, &containerd, Some(&docker)).await;
                times.push((first_seen(), done));
            }
            drop(docker);
            let shown: Vec<String> = times.iter().map(|(f, d)| format!("{f:.2} / {d:.2}")).collect();
            println!("{mirror_name}: plain {first:.2} / {done:.2} s, docker {} s, ctr {} s, podman {} s", shown[0], shown[1], shown[2]);
            let dones: Vec<f64> = [done].into_iter().chain(times.iter().map(|(_, d)| *d)).collect();
            rows.push((mirror_name.to_string(), first, done, shown, dones));
        }
        let mut table = String::from(
            "| mirror | plain client (first byte / whole layer), s | Docker's daemon (first byte / pull done), s | containerd `ctr` (first byte / pull done), s | podman (first byte / pull done), s |\n|---|---|---|---|---|\n",
        );
        for (name, first, done, t, _) in &rows {
            let _ = writeln!(table, "| {name} | {first:.2} / {done:.2} | {} | {} | {} |", t[0], t[1], t[2]);
        }
        // Time to done as a ratio to registry:2's, per client.
        let reference = &rows[2].4;
        for (name, _, _, _, dones) in &rows[..2] {
            let ratios: Vec<String> = dones.iter().zip(reference).map(|(d, r)| format!("{:.2}", d / r)).collect();
            let _ = writeln!(
                table,
                "\n{name}, time to done / registry:2's: plain {}, Docker's daemon {}, ctr {}, podman {}.",
                ratios[0], ratios[1], ratios[2], ratios[3]
            );
        }
        let section = format!(
            "## Cold layers, per client\n\n`HUBCAP_BENCH=full cargo test --release --test bench_cold -- --nocapture` (run by `bench/run.sh`), in a network namespace with only loopback: a single-layer image of {} MiB that the mirror has never seen, its upstream's CDN giving each connection {:.1} MB/s; each pull (and the plain client's) on an image new to that mirror; one run per figure. First byte: from the client's start to the layer's first bytes passing toward it (a relay in front of each mirror, and the CDN's for clients the api sends there, watch for them); pull done: the client command's whole run. `hubcap serve` streams its one upstream copy (four ranged connections) to the client; the `api` Lambda sends the client to the upstream's CDN (one connection at the capped rate) while its fetcher copies the layer; registry:2 streams its own single upstream connection.\n\n{table}\n",
            size >> 20,
            rate as f64 / 1e6
        );
        println!("{section}");
        if full {
            write_section(&section);
        }
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }
}

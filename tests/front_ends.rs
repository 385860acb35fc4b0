//! The `api` function behind each of AWS's front ends, as `hubcap
//! lambda-dev` plays them in front of `cargo lambda watch` on moto: a
//! Function URL, an HTTP API, a REST API, and the worst case (every rewrite
//! reported of any of them: a `HEAD` answer's `Content-Length` replaced by
//! the carried body's, 0; `WWW-Authenticate` renamed; 29 s to answer).
//!
//! - Every client (Docker's daemon, containerd's `ctr`, podman, skopeo)
//!   pulls every kind of image (an OCI index, an OCI image, a Docker
//!   manifest list, a Docker image, a deep name) through every front end,
//!   cold and warm, bytes verified, in a network namespace with only
//!   loopback; the requests each client makes per pull are counted.
//! - `hubcap check` reports each rewrite that breaks clients, with its fix,
//!   and passes where there is none.
//! - The api answers before the front end gives up, however slow upstream is.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::lambda::LambdaStack;
use common::netns::{Dockerd, access_lines, amd64, field, inner, pull_and_verify, run_isolated};
use common::procs::run;

/// The front ends, as `hubcap lambda-dev --front-end` names them.
const FRONT_ENDS: [&str; 4] = ["worst-case", "function-url", "http-api", "rest-api"];
const CLIENTS: [&str; 4] = ["docker", "ctr", "podman", "skopeo"];

/// The images each (front end, client) pulls, new to the mirror: every
/// kind a registry serves, and a name four segments deep.
fn images_for(seed: u64) -> Vec<(&'static str, Published)> {
    let small = images::small_image;
    vec![
        (
            "library/oci-index",
            images::index(Format::Oci, vec![small(Format::Oci, "amd64", seed, 2), small(Format::Oci, "arm64", seed + 1, 1)]),
        ),
        ("library/oci-image", Published::Image(small(Format::Oci, "amd64", seed + 2, 2))),
        (
            "library/docker-list",
            images::index(Format::Docker, vec![small(Format::Docker, "arm64", seed + 3, 1), small(Format::Docker, "amd64", seed + 4, 1)]),
        ),
        ("library/docker-plain", Published::Image(small(Format::Docker, "amd64", seed + 5, 2))),
        ("acme/team/tools/deep", Published::Image(small(Format::Docker, "amd64", seed + 6, 1))),
    ]
}

/// Files named by a digest under `dir` that hash to their name.
fn verified_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            assert_eq!(sha256(&std::fs::read(&p).unwrap()), format!("sha256:{name}"), "{}", p.display());
            out.push(format!("sha256:{name}"));
        }
    }
    out
}

/// What one pull of `name:tag` by `client` through `mirror` must end with,
/// checked on what the client stored: Docker's image (digest, ID, config
/// bytes, every layer's diff_id), podman's recorded digest, every blob in
/// containerd's content store, skopeo's files.
struct Clients {
    dir: PathBuf,
    policy: PathBuf,
    containerd: Containerd,
}

impl Clients {
    fn podman(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("podman");
        cmd.arg("--root").arg(self.dir.join("podman-root")).arg("--runroot").arg(self.dir.join("podman-run"));
        cmd.args(["--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]).args(args);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Pulls and verifies; `round` names the copy (cold 0, warm 1).
    async fn pull(&self, client: &str, docker: Option<&Dockerd>, mirror: &str, (name, tag, img): (&str, &str, &Published), round: u32) {
        let reference = format!("{name}:{tag}");
        let want = amd64(img);
        match client {
            "docker" => pull_and_verify(docker.unwrap(), &self.dir, &reference, img).await,
            "ctr" => {
                let hosts = self.containerd.hosts(mirror, tag);
                let out = self.containerd.fetch(&hosts, &format!("docker.io/{reference}"), Some("linux/amd64")).output().await.unwrap();
                assert!(out.status.success(), "ctr {reference}: {}", String::from_utf8_lossy(&out.stderr));
                let listed = self.containerd.listed().await;
                for d in [img.digest(), images::sha256(&want.manifest)].into_iter().chain(want.blobs().into_iter().map(|(d, _)| d)) {
                    assert!(listed.contains(&d), "ctr {reference}: {d} in the content store");
                }
            }
            "podman" => {
                let conf = common::registries_conf(&self.dir, mirror, tag);
                let mut pull = self.podman(&["pull", "--arch", "amd64", "--os", "linux", "--signature-policy"]);
                pull.arg(&self.policy).arg(format!("docker.io/{reference}")).env("CONTAINERS_REGISTRIES_CONF", conf);
                run(&mut pull).await;
                let digest =
                    run(&mut self.podman(&["image", "inspect", "--format", "{{.Digest}}", &format!("docker.io/{reference}")])).await;
                assert_eq!(digest.trim(), img.digest(), "podman {reference}: the digest it recorded");
            }
            "skopeo" => {
                let conf = common::registries_conf(&self.dir, mirror, tag);
                let out = self.dir.join(format!("skopeo-{tag}-{round}-{}", name.replace('/', "_")));
                let mut copy = tokio::process::Command::new("skopeo");
                copy.arg("--registries-conf").arg(&conf).arg("--policy").arg(&self.policy);
                copy.args(["--override-os", "linux", "--override-arch", "amd64", "copy", "--retry-times", "0"]);
                copy.arg(format!("docker://docker.io/{reference}")).arg(format!("dir:{}", out.display()));
                run(&mut copy).await;
                assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), want.manifest.to_vec(), "skopeo {reference}: the manifest");
                let files = verified_files(&out);
                for (d, _) in want.blobs() {
                    assert!(files.contains(&d), "skopeo {reference}: {d}");
                }
            }
            other => panic!("no client {other}"),
        }
    }

    /// Forgets what the client stored of `name:tag`, so the next pull asks
    /// for everything again.
    async fn forget(&self, client: &str, docker: Option<&Dockerd>, name: &str, tag: &str, img: &Published) {
        let reference = format!("{name}:{tag}");
        match client {
            "docker" => {
                docker.unwrap().run(&["rmi", "-f", &reference]).await;
            }
            "podman" => {
                run(&mut self.podman(&["rmi", "-f", &format!("docker.io/{reference}")])).await;
            }
            "ctr" => {
                let want = amd64(img);
                let mut rm = tokio::process::Command::new("ctr");
                rm.arg("--address").arg(&self.containerd.sock).args(["content", "rm", &img.digest(), &images::sha256(&want.manifest)]);
                rm.args(want.blobs().into_iter().map(|(d, _)| d));
                run(&mut rm).await;
                assert!(!self.containerd.listed().await.contains(&want.config.0), "ctr {reference}: forgotten");
            }
            _ => {}
        }
    }
}

/// Requests the api answered in `log`: (all, HEADs) for `/v2/<name>/...`.
fn requests(log: &str) -> (usize, usize, Vec<String>) {
    let lines: Vec<&str> = access_lines(log, "/v2/").into_iter().filter(|l| !l.contains("\"path\":\"/v2/\"")).collect();
    let heads = lines.iter().filter(|l| field(l, "method") == "HEAD").count();
    let not_hit = lines.iter().filter(|l| field(l, "cache") != "hit").map(|l| l.to_string()).collect();
    (lines.len(), heads, not_hit)
}

#[test]
fn every_client_pulls_every_image_through_every_front_end() {
    run_isolated("netns::every_client_every_front_end");
}

mod netns {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "run by its outer test, in its own namespaces"]
    async fn every_client_every_front_end() {
        let Some((t0, dir)) = inner() else { return };
        let d = dir.path();
        let hub = FakeHub::start().await;
        // A blob still on its way into S3 is waited for 0.5 s, then the
        // client is sent back to the api (up to 5 times): cold layers
        // arrive within that, and a held request holds the one api process.
        let wait = [("HUBCAP_BLOB_WAIT", "0.5".to_owned())];
        let stack = LambdaStack::start(d, "fronts", &hub.url, &wait).await;
        let mut fronts = vec![(FRONT_ENDS[0], stack.front.clone(), None, &stack.api)];
        for fe in &FRONT_ENDS[1..] {
            let (proc, url) = stack.another_front(d, fe, "api").await;
            fronts.push((fe, url, Some(proc), &stack.api));
        }
        // The baseline: HEADs answered in full where nothing rewrites them
        // (what the default costs containerd and Docker, in requests).
        let full = stack.variant(&d.join("full"), &[&wait[..], &[("HUBCAP_HEAD_ANSWERS", "full".to_owned())]].concat()).await;
        let (proc, url) = full.front(d, "passthrough").await;
        fronts.push(("passthrough, HeadAnswers=full", url, Some(proc), &full.api));
        let clients = Clients { dir: d.to_owned(), policy: common::skopeo_policy(d), containerd: Containerd::start(d).await };
        let http = reqwest::Client::new();
        let upstream = || ["manifest_get", "manifest_head", "blob_get", "token"].iter().map(|c| upstream_count(&hub, c)).sum::<usize>();
        let mut table = Vec::new();
        println!("started in {:.1} s", t0.elapsed().as_secs_f64());
        for (fi, (fe, url, _, api)) in fronts.iter().enumerate() {
            let docker = Dockerd::start(&d.join(format!("docker-{fi}")), url).await;
            let baseline = fe.starts_with("passthrough");
            for (ci, client) in CLIENTS.iter().enumerate() {
                if baseline && !matches!(*client, "docker" | "ctr") {
                    continue;
                }
                let started = Instant::now();
                let tag = format!("t{fi}{ci}");
                let pulled = images_for(1000 + 100 * fi as u64 + 10 * ci as u64);
                for (name, img) in &pulled {
                    hub.publish(name, &tag, img);
                }
                let docker = (*client == "docker").then_some(&docker);
                let mark = api.log().len();
                for (name, img) in &pulled {
                    clients.pull(client, docker, url, (name, &tag, img), 0).await;
                }
                let cold = requests(&api.log()[mark..]);
                // Warm: what the client stored forgotten, upstream not asked.
                let (mark, asked) = (api.log().len(), upstream());
                for (name, img) in &pulled {
                    clients.forget(client, docker, name, &tag, img).await;
                    clients.pull(client, docker, url, (name, &tag, img), 1).await;
                }
                let warm = requests(&api.log()[mark..]);
                assert_eq!(upstream(), asked, "{fe}/{client}: the warm pulls asked upstream nothing\n{}", stack.logs());
                assert!(warm.2.is_empty(), "{fe}/{client}: every warm request a hit:\n{}", warm.2.join("\n"));
                let n = pulled.len() as f64;
                table.push(format!(
                    "| {fe} | {client} | {:.1} ({:.1} HEAD) | {:.1} ({:.1} HEAD) | {:.1} s |",
                    cold.0 as f64 / n,
                    cold.1 as f64 / n,
                    warm.0 as f64 / n,
                    warm.1 as f64 / n,
                    started.elapsed().as_secs_f64()
                ));
            }
            let log = docker.proc.log();
            for bad in ["Attempting next endpoint", "registry-1.docker.io"] {
                assert!(!log.contains(bad), "{fe}: dockerd never left the mirror ({bad}):\n{}", docker.log_tail());
            }
            // What the front end did to a HEAD, seen by a client: the size
            // is the front end's (0 for all but passthrough), and no digest
            // asks the client to trust it.
            let (name, img) = &images_for(1000 + 100 * fi as u64)[0];
            let head = http.head(format!("{url}/v2/{name}/manifests/t{fi}0")).header("accept", images::ALL_MANIFESTS).send().await.unwrap();
            assert_eq!(head.status(), 200);
            let len = img.top().1.len().to_string();
            if baseline {
                assert_eq!(head.headers()["content-length"], len.as_str(), "{fe}");
                assert_eq!(head.headers()["docker-content-digest"], img.digest().as_str(), "{fe}");
                continue;
            }
            assert_eq!(head.headers()["content-length"], "0", "{fe}: the front end's own Content-Length");
            assert_eq!(head.headers()["x-amzn-remapped-content-length"], len.as_str(), "{fe}");
            assert!(!head.headers().contains_key("docker-content-digest"), "{fe}: no digest to trust a wrong size with");
        }
        println!("requests per pull (the api's access log; a pull also makes one GET /v2/ or more, not counted):");
        println!("| front end | client | cold | warm | 10 pulls took |\n|---|---|---|---|---|\n{}", table.join("\n"));
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }
}

fn upstream_count(hub: &FakeHub, which: &str) -> usize {
    hub.count(|c| match which {
        "manifest_get" => &c.manifest_get,
        "manifest_head" => &c.manifest_head,
        "blob_get" => &c.blob_get,
        _ => &c.token,
    })
}

/// `hubcap check URL` with `args`: its exit status and output.
async fn check(url: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
        .args(["check", url, "--timeout", "30"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubcap_check_reports_each_rewrite_that_breaks_clients_and_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = FakeHub::start().await;
    let img = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 2100, 2), images::small_image(Format::Oci, "arm64", 2101, 1)],
    );
    hub.publish("library/checked", "1", &img);
    let stack = LambdaStack::start(d, "check", &hub.url, &[]).await;
    // The same api, answering HEADs in full and requiring credentials.
    let full = [("HUBCAP_HEAD_ANSWERS", "full".to_owned()), ("HUBCAP_CLIENT_USERS", "ci:pa55word".to_owned())];
    let api_full = stack.variant(&d.join("full"), &full).await;
    let image = ["--image", "library/checked:1"];

    // The default api behind the worst case: sizes rewritten, no harm done.
    let (ok, out) = check(&stack.front, &image).await;
    assert!(ok, "{out}\n{}", stack.logs());
    assert!(out.contains("without a digest: clients GET the content"), "{out}");
    assert!(out.contains("the mirror's") && out.contains("renamed to x-amzn-Remapped-Content-Length"), "{out}");

    // Full HEAD answers and credentials behind the worst case: both
    // rewrites reported, each with its fix.
    let (worst_front, worst) = api_full.front(d, "worst-case").await;
    let (ok, out) = check(&worst, &[&image[..], &["--credentials", "ci:pa55word"]].concat()).await;
    assert!(!ok, "{out}");
    let logs = || format!("--- api-full ---\n{}\n--- its front ---\n{}", api_full.api.log(), worst_front.log());
    assert!(out.contains("renames the credentials challenge") && out.contains("remove ClientCredentialsSecretArn"), "{out}\n{}", logs());
    assert!(out.contains("HEAD manifest library/checked:1: Content-Length 0"), "{out}");
    assert!(out.contains("fix: HeadAnswers=without-digest"), "{out}");
    assert!(out.contains("HEAD blob"), "{out}");
    assert!(out.contains("digest verified"), "the blob is still checked after the problems: {out}");
    assert!(!out.contains("pa55word"), "{out}");

    // The same api where nothing is rewritten: it passes.
    let (_pass, pass) = api_full.front(d, "passthrough").await;
    let (ok, out) = check(&pass, &[&image[..], &["--credentials", "ci:pa55word"]].concat()).await;
    assert!(ok, "{out}");
    assert!(out.contains("challenge reaches clients: Basic"), "{out}");
    assert!(out.contains("with its digest"), "{out}");

    // An HTTP API passes the challenge (AWS documents no rewrite of
    // answers), but its reported Content-Length rewrite fails full HEADs.
    let (_http, http) = api_full.front(d, "http-api").await;
    let (ok, out) = check(&http, &[&image[..], &["--credentials", "ci:pa55word"]].concat()).await;
    assert!(!ok, "{out}");
    assert!(out.contains("challenge reaches clients") && out.contains("fix: HeadAnswers=without-digest"), "{out}");

    // Without credentials, a mirror that requires them says so.
    let (ok, out) = check(&pass, &image).await;
    assert!(!ok && out.contains("requires client credentials"), "{out}");
    let (ok, out) = check("127.0.0.1:5000", &image).await;
    assert!(!ok && out.contains("with its scheme"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_answers_before_the_front_end_gives_up_however_slow_upstream_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 2200, 1);
    hub.publish("library/slow", "1", &Published::Image(img.clone()));
    // A REST API gives up after 29 s; the api is told so (the template sets
    // it per endpoint type).
    let stack = LambdaStack::start(d, "deadline", &hub.url, &[("HUBCAP_REQUEST_TIMEOUT", "29".into())]).await;
    let (_rest, rest) = stack.another_front(d, "rest-api", "api").await;
    // A token after 25 s, then a manifest after 25 s more.
    hub.set_token_delay(Duration::from_secs(25));
    hub.set_fault(Fault::Slow(Duration::from_secs(25)));
    let http = reqwest::Client::new();
    let started = Instant::now();
    let resp = http.get(format!("{rest}/v2/library/slow/manifests/1")).send().await.unwrap();
    let took = started.elapsed();
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = resp.text().await.unwrap();
    assert_eq!(status, 503, "the api's own answer, not the front end's 504: {body}\n{}", stack.logs());
    assert!(body.contains("UNAVAILABLE"), "{body}");
    assert!(retry_after.is_some(), "with Retry-After");
    assert!(took < Duration::from_secs(29) && took > Duration::from_secs(20), "answered in {took:?}, before the REST API's 29 s");
    assert_eq!(hub.count(|c| &c.token), 1, "the token was asked for");

    // The same instance, still warm, serves as soon as upstream recovers.
    hub.set_token_delay(Duration::ZERO);
    hub.set_fault(Fault::None);
    let resp = http.get(format!("{rest}/v2/library/slow/manifests/1")).header("accept", images::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", stack.logs());
    assert_eq!(sha256(&resp.bytes().await.unwrap()), images::sha256(&img.manifest));
}

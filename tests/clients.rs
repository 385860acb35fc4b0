//! Real clients pull through the real `hubcap` binary, with Debian's
//! `docker-registry` (distribution 2.8) as the upstream standing in for
//! Docker Hub: skopeo through a registries.conf mirror (the code path of
//! daemon.json's `registry-mirrors`), podman, and containerd's `ctr` with a
//! hosts.toml (which sends `?ns=docker.io`). Every pulled byte is checked.
//!
//! Nothing here is skipped: the test command installs skopeo, podman,
//! containerd and docker-registry first.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::images::{self, Format, Published, sha256};
use common::procs::{Proc, free_port, run};
use common::registries::{hubcap_serve, upstream_registry};
use common::{registries_conf, skopeo_policy};
use std::process::Stdio;

/// The images every client pulls: several layers, a multi-arch OCI index, a
/// layer over 32 MiB in a Docker schema 2 image, and a 4-segment name.
fn test_images() -> Vec<(&'static str, &'static str, Published)> {
    let multi = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 100, 3), images::small_image(Format::Oci, "arm64", 101, 2)],
    );
    let big = Published::Image(images::image(
        Format::Docker,
        "amd64",
        vec![
            vec![("big/noise.bin".to_owned(), images::noise(33 << 20, 102))],
            vec![("etc/hello".to_owned(), b"hello from hubcap\n".to_vec())],
        ],
    ));
    let deep = Published::Image(images::small_image(Format::Oci, "amd64", 103, 2));
    vec![("library/multi", "1", multi), ("library/big", "1", big), ("org/team/sub/app", "v1", deep)]
}

struct World {
    dir: tempfile::TempDir,
    _registry: Proc,
    mirror: Proc,
    mirror_url: String,
    images: Vec<(&'static str, &'static str, Published)>,
}

async fn world() -> World {
    common::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (registry, registry_url) = upstream_registry(dir.path()).await;
    let images = test_images();
    for (repo, tag, img) in &images {
        images::push(&registry_url, repo, tag, img).await;
    }
    let (mirror, mirror_url) = hubcap_serve(dir.path(), &registry_url, 0, &[], "hubcap.log").await;
    World { dir, _registry: registry, mirror, mirror_url, images }
}

/// Every file named by a sha256 hex digest holds bytes that hash to it.
fn verify_dir(dir: &Path) -> usize {
    let mut n = 0;
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert_eq!(sha256(&bytes), format!("sha256:{name}"), "{}", entry.display());
            n += 1;
        }
    }
    n
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

fn all_blob_digests(images: &[(&str, &str, Published)]) -> Vec<String> {
    images.iter().flat_map(|(_, _, p)| p.all_blobs().into_iter().map(|(d, _)| d)).collect()
}

/// How the mirror has answered since it started (`/_hubcap/stats`): hits,
/// misses, and requests it sent upstream.
async fn answered(mirror_url: &str) -> (u64, u64, u64) {
    let body = reqwest::get(format!("{mirror_url}/_hubcap/stats")).await.unwrap().bytes().await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let count = |k: &str| stats["since_start"]["requests"][k].as_u64().unwrap_or_else(|| panic!("no {k} count: {stats}"));
    let upstream = stats["upstreams"].as_array().unwrap().iter().map(|u| u["requests"].as_u64().unwrap()).sum();
    (count("hit"), count("miss"), upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_through_a_registries_conf_mirror() {
    let w = world().await;
    let conf = registries_conf(w.dir.path(), &w.mirror_url, "mirror");
    let policy = skopeo_policy(w.dir.path());
    let mut after_first = (0, 0, 0);
    for round in 0..2 {
        if round == 1 {
            after_first = answered(&w.mirror_url).await;
        }
        for (repo, tag, img) in &w.images {
            let out = w.dir.path().join(format!("skopeo-{round}-{}", repo.replace('/', "_")));
            let mut cmd = tokio::process::Command::new("skopeo");
            cmd.arg("--registries-conf").arg(&conf).arg("--policy").arg(&policy);
            cmd.args(["--override-os", "linux", "--override-arch", "amd64", "copy", "--all", "--retry-times", "0"]);
            cmd.arg(format!("docker://docker.io/{repo}:{tag}")).arg(format!("dir:{}", out.display()));
            run(&mut cmd).await;
            let verified = verify_dir(&out);
            let blobs: usize = img.images().iter().map(|i| i.blobs().len()).sum();
            assert!(verified >= blobs, "{repo}: {verified} verified files, {blobs} blobs");
            let manifest = std::fs::read(out.join("manifest.json")).unwrap();
            assert_eq!(sha256(&manifest), img.digest(), "{repo}: the manifest is byte-for-byte upstream's");
        }
    }
    // The second round came from the cache alone: no miss, nothing asked
    // upstream, and hits.
    let (hits, misses, upstream) = answered(&w.mirror_url).await;
    assert_eq!((misses, upstream), (after_first.1, after_first.2), "misses and upstream requests before the second round: {after_first:?}");
    assert!(hits > after_first.0, "the second round was served as hits ({} before, {hits} after)", after_first.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_pulls_through_the_mirror() {
    let w = world().await;
    let conf = registries_conf(w.dir.path(), &w.mirror_url, "mirror");
    let policy = skopeo_policy(w.dir.path());
    let root = w.dir.path().join("podman-root");
    let runroot = w.dir.path().join("podman-run");
    for (repo, tag, img) in &w.images {
        let mut cmd = tokio::process::Command::new("podman");
        cmd.env("CONTAINERS_REGISTRIES_CONF", &conf);
        cmd.arg("--root").arg(&root).arg("--runroot").arg(&runroot);
        cmd.args(["--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]);
        cmd.args(["pull", "--arch", "amd64", "--os", "linux"]).arg("--signature-policy").arg(&policy);
        cmd.arg(format!("docker.io/{repo}:{tag}"));
        run(&mut cmd).await;
        let mut inspect = tokio::process::Command::new("podman");
        inspect.arg("--root").arg(&root).arg("--runroot").arg(&runroot);
        inspect.args(["--storage-driver", "vfs", "--events-backend", "none", "image", "inspect", "--format", "{{.Digest}}"]);
        inspect.arg(format!("docker.io/{repo}:{tag}"));
        let digest = run(&mut inspect).await;
        assert_eq!(digest.trim(), img.digest(), "{repo}: podman recorded upstream's digest");
    }
    // podman checked every layer's digest and diff_id while unpacking; the
    // big layer's file is there, whole.
    let found = walk(&root).into_iter().find(|p| p.ends_with("big/noise.bin")).expect("the 33 MiB layer was unpacked");
    assert_eq!(std::fs::read(found).unwrap(), images::noise(33 << 20, 102));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_through_hosts_toml_with_ns() {
    let w = world().await;
    let d = w.dir.path();
    let sock = d.join("containerd.sock");
    let config = d.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n",
            d.join("ctrd-root").display(),
            d.join("ctrd-state").display(),
            sock.display(),
            d.join("containerd-ttrpc.sock").display()
        ),
    )
    .unwrap();
    let containerd = Proc::spawn(std::process::Command::new("containerd").arg("--config").arg(&config), d.join("containerd.log"));
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sock.exists(), "containerd did not start:\n{}", containerd.log());
    let hosts = d.join("certs.d");
    std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
    std::fs::write(
        hosts.join("docker.io/hosts.toml"),
        format!("server = \"http://127.0.0.1:9\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", w.mirror_url),
    )
    .unwrap();
    for (repo, tag, _) in &w.images {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address").arg(&sock).args(["content", "fetch", "--all-platforms", "--hosts-dir"]).arg(&hosts);
        cmd.arg(format!("docker.io/{repo}:{tag}"));
        run(&mut cmd).await;
    }
    // Every blob, manifest and index is in containerd's content store, and
    // its bytes hash to its name.
    let verified = verify_dir(&d.join("ctrd-root/io.containerd.content.v1.content/blobs/sha256"));
    let mut want = all_blob_digests(&w.images);
    want.sort();
    want.dedup();
    assert!(verified >= want.len(), "{verified} verified, {} expected", want.len());
    for digest in want {
        let path = d.join("ctrd-root/io.containerd.content.v1.content/blobs/sha256").join(digest.trim_start_matches("sha256:"));
        assert!(path.exists(), "{digest} fetched");
    }
    let log = w.mirror.log();
    assert!(
        log.contains("ns=\"docker.io\"") || log.contains("ns=docker.io") || log.contains("ns=Some(\"docker.io\")"),
        "ctr sent ?ns=docker.io:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_shuts_down_gracefully_on_sigterm_and_keeps_its_cache() {
    let w = world().await;
    let http = common::client();
    let pulled = common::pull(&http, &w.mirror_url, "org/team/sub/app", "v1").await;
    let mut mirror = w.mirror;
    let pid = mirror.child.id();
    run(tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()])).await;
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = mirror.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status.expect("exits on SIGTERM").success(), "clean exit:\n{}", mirror.log());
    assert!(mirror.log().contains("shutting down"));
    // Restarted with upstream gone, the cache still serves the image.
    drop(w._registry);
    let (restarted, url) = hubcap_serve(w.dir.path(), "http://127.0.0.1:9", 0, &[], "hubcap.log").await;
    let again = common::pull(&http, &url, "org/team/sub/app", "v1").await;
    assert_eq!(again.digest, pulled.digest);
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_sends_credentials_to_a_mirror_that_requires_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, registry_url) = upstream_registry(dir.path()).await;
    let img = Published::Image(images::small_image(Format::Oci, "amd64", 110, 2));
    images::push(&registry_url, "library/locked", "1", &img).await;
    let (mirror, url) =
        hubcap_serve(dir.path(), &registry_url, 0, &["--client-user", "ci:pa55word", "--allow-repo", "library/*"], "hubcap.log").await;
    let conf = registries_conf(dir.path(), &url, "mirror");
    let policy = skopeo_policy(dir.path());
    let copy = |creds: Option<&str>, out: &str| {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.arg("--registries-conf").arg(&conf).arg("--policy").arg(&policy).args(["copy", "--retry-times", "0"]);
        if let Some(c) = creds {
            // Credentials for the mirror are looked up by its own host, as
            // `podman login 127.0.0.1:PORT` would store them.
            use base64::Engine as _;
            let host = url.trim_start_matches("http://");
            let auth = base64::engine::general_purpose::STANDARD.encode(c);
            let file = dir.path().join("auth.json");
            std::fs::write(&file, format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
            cmd.env("REGISTRY_AUTH_FILE", &file);
        }
        cmd.arg("docker://docker.io/library/locked:1").arg(format!("dir:{}", dir.path().join(out).display()));
        cmd
    };
    // Without credentials the mirror refuses (and the fallback is a closed port): no pull.
    let refused = copy(None, "anon").stdin(Stdio::null()).output().await.unwrap();
    assert!(!refused.status.success());
    run(&mut copy(Some("ci:pa55word"), "authed")).await;
    assert_eq!(sha256(&std::fs::read(dir.path().join("authed/manifest.json")).unwrap()), img.digest());
    assert!(verify_dir(&dir.path().join("authed")) >= 3);
    assert!(mirror.log().contains("status=401"), "the anonymous attempt was challenged:\n{}", mirror.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubcap_check_verifies_a_mirror_and_fails_clearly() {
    let w = world().await;
    let check = |url: String, image: &str| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcap"));
        cmd.args(["check", &url, "--image", image, "--timeout", "20"]).stdin(Stdio::null());
        cmd
    };
    let out = check(w.mirror_url.clone(), "library/multi:1").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    GET /v2/") && text.contains("digest verified") && text.contains("PASS"), "{text}");
    assert!(text.contains("-> 307 to 127.0.0.1"), "{text}");

    let out = check(w.mirror_url.clone(), "library/absent:1").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("FAIL") && text.contains("404"), "{text}");

    let out = check(format!("http://127.0.0.1:{}", free_port()), "library/multi:1").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("FAIL") && text.contains("unreachable"), "{text}");
}

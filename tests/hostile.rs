//! Hostile clients against the real `hubcap serve` binary: connections that
//! drip their headers (slowloris) are cut off, the server holds no more
//! connections than it is told, and a shutdown does not wait forever for a
//! client that never finishes. All traffic stays on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::fakehub::FakeHub;
use common::registries::hubcap_serve;

/// A client that sends a request line and then one header line every
/// 300 ms, never finishing; resolves with how long the server let it.
async fn drip(addr: String, for_at_most: Duration) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    while started.elapsed() < for_at_most {
        if s.write_all(b"X-Drip: 1\r\n").await.is_err() {
            return started.elapsed();
        }
        // Closed by the server: a read returns 0 bytes (or an error).
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    started.elapsed()
}

/// A complete `GET /v2/`; resolves with the status line.
async fn get_base(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &["--header-timeout", "1s", "--max-connections", "3"], "hubcap.log").await;
    let addr = url.trim_start_matches("http://").to_owned();

    // Three clients drip their headers and take every connection slot.
    let slow: Vec<_> = (0..3).map(|_| tokio::spawn(drip(addr.clone(), Duration::from_secs(8)))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fourth, complete request waits: it is not served while they hold.
    let started = Instant::now();
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move { get_base(&addr).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a fourth connection is not served while three are open");
    // The slow ones are cut off after the header timeout; then it is served.
    for s in slow {
        let held = s.await.unwrap();
        assert!(held < Duration::from_secs(4), "a dripping client was held {held:?}");
    }
    assert_eq!(waiting.await.unwrap(), "HTTP/1.1 200 OK");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_does_not_wait_forever_for_a_slow_client() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut mirror, url) =
        hubcap_serve(dir.path(), &hub.url, 0, &["--header-timeout", "60s", "--shutdown-grace", "1s"], "hubcap.log").await;
    let addr = url.trim_start_matches("http://").to_owned();
    let slow = tokio::spawn(drip(addr.clone(), Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = mirror.child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let exited = loop {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(6), "still running {:?} after SIGTERM:\n{}", started.elapsed(), mirror.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited:?}\n{}", mirror.log());
    assert!(mirror.log().contains("shutdown grace"), "it said it closed what was left:\n{}", mirror.log());
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_commands_beside_a_running_server_take_nothing_from_it() {
    use common::images::{self, Format, Published};
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 71, 2);
    hub.publish("library/busy", "1", &Published::Image(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hubcap-data");
    let (_mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &[], "hubcap.log").await;
    // The manifest miss queues its blobs; their copies stop half-way.
    hub.set_fault(common::fakehub::Fault::DripBody(Duration::from_secs(3)));
    let http = common::client();
    common::get_manifest(&http, &url, "busy", "1", common::ALL_MANIFESTS).await;
    let in_progress = || std::fs::read_dir(data.join("tmp")).unwrap().count();
    for _ in 0..50 {
        if in_progress() == img.blobs().len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_progress(), img.blobs().len(), "every copy is under way");
    // `hubcap stats` and `hubcap gc` on the same directory meanwhile.
    for args in [&["stats", "--json"][..], &["gc", "--dry-run"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap")).args(args).arg("--data").arg(&data).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(in_progress(), img.blobs().len(), "the server's copies in progress are untouched");
    // They finish, and are served, each copied once.
    hub.set_fault(common::fakehub::Fault::None);
    for (digest, bytes) in img.blobs() {
        assert_eq!(common::get_blob(&http, &url, "busy", &digest).await, bytes);
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once");
    }
}

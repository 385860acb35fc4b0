//! Hostile clients, round two, against the real `hubcap serve` binary: what
//! a connection may hold is bounded from the moment it is accepted. A
//! network the mirror does not serve is closed before a byte is read;
//! connections that never send a byte (HTTP/1, or an HTTP/2 preface or
//! SETTINGS frame alone) are closed at the header deadline; one address
//! holds no more than its share; a shutdown closes connections with no
//! request in flight at once. Also the settings a typo turns against their
//! owner: secrets split on commas, patterns that never match.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::fakehub::FakeHub;
use common::registries::hubcap_serve;

/// A connection to `addr` from the loopback address `from` (127.0.0.0/8 is
/// all this host's).
async fn connect_from(from: &str, addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse::<SocketAddr>().unwrap()).await.unwrap()
}

/// How long until the server closes `s` (a read returns 0 or fails), at
/// most `within`; `None` if it is still open then.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// A complete request from `from` with `headers`; the status line.
async fn status_from(from: &str, addr: &str, path: &str, headers: &str) -> String {
    let mut s = connect_from(from, addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n{headers}\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

const AUTH: &str = "Authorization: Basic Y2k6cHc=\r\n"; // ci:pw

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_from_a_network_not_served_are_closed_on_accept_and_take_no_slot() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Started by hand: the usual readiness probe comes from 127.0.0.1,
    // which this mirror does not even answer.
    let port = common::procs::free_port();
    let _mirror = common::procs::Proc::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
            .args(["--allow-cidr", "127.0.0.2/32", "--client-user", "ci:pw", "--max-connections", "20"])
            .arg("--data")
            .arg(dir.path().join("data"))
            .env("NO_COLOR", "1"),
        dir.path().join("hubcap.log"),
    );
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while TcpStream::connect(&addr).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the mirror never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Twenty idle sockets from a denied address, with no credentials.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect_from("127.0.0.1", &addr).await);
    }
    for s in &mut idle {
        let closed = closed_within(s, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "a denied network's connection is closed at once, before any byte");
    }
    // The allowed, authenticated client is served at once.
    let started = Instant::now();
    assert_eq!(status_from("127.0.0.2", &addr, "/v2/", AUTH).await, "HTTP/1.1 200 OK");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(status_from("127.0.0.2", &addr, "/v2/", "").await, "HTTP/1.1 401 Unauthorized", "credentials still needed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_that_never_send_a_request_are_closed_and_one_address_holds_its_share_only() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--header-timeout", "2s", "--max-connections", "60", "--max-connections-per-client", "20"];
    let (_mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &flags, "hubcap.log").await;
    let addr = url.trim_start_matches("http://").to_owned();
    // 100 idle sockets from one address: 20 held, the rest closed on accept.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(connect_from("127.0.0.3", &addr).await);
    }
    // HTTP/2 (h2c, prior knowledge): a preface alone, and a preface with
    // an empty SETTINGS frame, from other addresses.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut h2_preface = connect_from("127.0.0.4", &addr).await;
    h2_preface.write_all(preface).await.unwrap();
    let mut h2_settings = connect_from("127.0.0.5", &addr).await;
    h2_settings.write_all(preface).await.unwrap();
    h2_settings.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // Everyone else is served meanwhile.
    let started = Instant::now();
    assert_eq!(status_from("127.0.0.1", &addr, "/v2/", "").await, "HTTP/1.1 200 OK");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // Each watched at once: when was it closed, counted from now?
    let watched: Vec<_> =
        idle.into_iter().map(|mut s| tokio::spawn(async move { closed_within(&mut s, Duration::from_secs(5)).await })).collect();
    let (mut at_once, mut at_deadline) = (0, 0);
    for w in watched {
        match w.await.unwrap() {
            Some(t) if t < Duration::from_millis(500) => at_once += 1,
            Some(_) => at_deadline += 1,
            None => panic!("an idle connection outlived the header deadline"),
        }
    }
    assert_eq!((at_once, at_deadline), (80, 20), "over the share: closed on accept; the share: closed at the deadline");
    for (name, s) in [("preface", &mut h2_preface), ("SETTINGS", &mut h2_settings)] {
        assert!(closed_within(s, Duration::from_secs(4)).await.is_some(), "an h2c connection with a {name} only is closed");
    }
    assert_eq!(status_from("127.0.0.3", &addr, "/v2/", "").await, "HTTP/1.1 200 OK", "the address is served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_closes_a_client_still_dripping_its_headers_at_once() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut mirror, url) =
        hubcap_serve(dir.path(), &hub.url, 0, &["--header-timeout", "60s", "--shutdown-grace", "20s"], "hubcap.log").await;
    let addr = url.trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n").await.unwrap();
    let dripping = tokio::spawn(async move {
        loop {
            if s.write_all(b"X-Drip: 1\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &mirror.child.id().to_string()]).status().unwrap();
    loop {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            assert!(status.success(), "{}", mirror.log());
            break;
        }
        assert!(signalled.elapsed() < Duration::from_secs(3), "still waiting for a client with no request in flight:\n{}", mirror.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!mirror.log().contains("still open after the shutdown grace"), "{}", mirror.log());
    dripping.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_secrets_are_never_split_and_patterns_mean_what_they_say() {
    let hub = FakeHub::start().await;
    let img = common::images::small_image(common::images::Format::Oci, "amd64", 2300, 1);
    hub.publish("acme/secret", "1", &common::images::Published::Image(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    // A token with a comma in it, from the variable; Docker Hub denied whole.
    let port = common::procs::free_port();
    let mirror = common::procs::Proc::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
            .args(["--deny-repo", "docker.io/*"])
            .arg("--data")
            .arg(dir.path().join("data"))
            .env("HUBCAP_CLIENT_TOKENS", "Zq9,x")
            .env("NO_COLOR", "1"),
        dir.path().join("hubcap.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    common::procs::wait_ready(&format!("{url}/v2/"), &mirror).await;
    let http = common::client();
    let get = |path: &str, token: &str| http.get(format!("{url}{path}")).header("authorization", format!("Bearer {token}")).send();
    assert_eq!(get("/v2/", "x").await.unwrap().status(), 401, "a piece of the token is no token");
    assert_eq!(get("/v2/", "Zq9").await.unwrap().status(), 401);
    assert_eq!(get("/v2/", "Zq9,x").await.unwrap().status(), 200, "the whole token, comma and all");
    for name in ["acme/secret", "library/alpine", "alpine"] {
        let resp = get(&format!("/v2/{name}/manifests/1"), "Zq9,x").await.unwrap();
        assert_eq!(resp.status(), 403, "docker.io/* denies {name}");
    }
    assert_eq!(hub.count(|c| &c.manifest_get), 0, "nothing asked upstream");

    // A pattern that can never match (names are lowercase) refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
        .args(["serve", "--listen", "127.0.0.1:0", "--deny-repo", "Acme/Secret"])
        .arg("--data")
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("lowercase") && said.contains("acme/secret"), "{said}");
}

//! One `moto_server` per test process, started on first use and shared by
//! every test in it (`cargo test` runs a binary's tests as threads of one
//! process; nextest runs each test in a process of its own, so there it is
//! one per test that asks). Each caller uses its own bucket and table.
//!
//! A static is never dropped, so moto is not killed by a destructor: it runs
//! under a shell that waits on a pipe from this process and kills moto when
//! the pipe closes, which happens however this process ends.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static URL: OnceLock<String> = OnceLock::new();

/// The shared moto's URL (`http://127.0.0.1:<port>`), started on first call.
pub fn url() -> &'static str {
    // Starting blocks for about a second: off the async workers.
    tokio::task::block_in_place(|| URL.get_or_init(start))
}

fn start() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new("sh")
        .args(["-c", r#"python3 "$2" -H 127.0.0.1 -p "$1" >/dev/null 2>&1 & m=$!; cat >/dev/null; kill "$m"; wait "$m""#, "sh"])
        .arg(port.to_string())
        .arg(crate::common::moto::launcher())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh and moto_server (pip install 'moto[server]'; tests/run.sh does)");
    // Held open until this process exits: then moto goes too.
    std::mem::forget(child.stdin.take());
    std::mem::forget(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if answers(port) {
            return format!("http://127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto_server did not start on 127.0.0.1:{port}");
}

/// Whether moto answers HTTP on the port yet.
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

//! One `moto_server` per test process, started on first use and shared by
//! every test in it (`cargo test` runs a binary's tests as threads of one
//! process; nextest runs each test in a process of its own, so there it is
//! one per test that asks). Each caller uses its own bucket and table.
//!
//! A static is never dropped, so moto is not killed by a destructor: it runs
//! under a shell that waits on a pipe from this process and kills moto when
//! the pipe closes, which happens however this process ends.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;

static URL: OnceLock<String> = OnceLock::new();

/// The shared moto's URL (`http://127.0.0.1:<port>`), started on first call.
pub fn url() -> &'static str {
    // Starting blocks for about a second: off the async workers.
    tokio::task::block_in_place(|| URL.get_or_init(start))
}

fn start() -> String {
    let mut child = Command::new("sh")
        .args(["-c", r#"python3 "$1" -H 127.0.0.1 -p 0 2>/dev/null & m=$!; cat >/dev/null; kill "$m"; wait "$m""#, "sh"])
        .arg(crate::common::moto::launcher())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh and python3 (tests/run.sh installs it)");
    let port = crate::common::moto::announced_port(child.stdout.take().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    // Held open until this process exits: then moto goes too.
    std::mem::forget(child.stdin.take());
    std::mem::forget(child);
    format!("http://127.0.0.1:{port}")
}

//! Child processes for end-to-end tests: started on loopback ports, logged
//! to a file, killed when the test ends.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// A child process killed when the test ends.
pub struct Proc {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(cmd: &mut std::process::Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (the test command installs it)"));
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A free loopback port for a child process that binds it itself, picked
/// below the kernel's ephemeral range: the kernel hands ports in that range
/// to every `bind(0)` and outgoing connection of the tests running beside
/// this one, so a port freed there could be taken before the child binds
/// it (and the test would then talk to another test's server).
pub fn free_port() -> u16 {
    use std::hash::BuildHasher;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let low: u16 = ephemeral.and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(32768);
    const FLOOR: u16 = 10_000;
    if low > FLOOR + 1000 {
        for attempt in 0..1000u64 {
            let port = FLOOR + (std::collections::hash_map::RandomState::new().hash_one(attempt) % u64::from(low - FLOOR)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub async fn wait_ready(url: &str, what: &Proc) {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never came up:\n{}", what.log());
}

pub async fn run(cmd: &mut tokio::process::Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().await.unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A process's resident memory now (`VmRSS`), in KiB; 0 if it is gone.
#[allow(dead_code)]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

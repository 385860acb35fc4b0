//! Registries as child processes on loopback ports: Debian's
//! docker-registry (an upstream standing in for Docker Hub) and the `hubcap
//! serve` binary of this build (the mirror).

use std::path::Path;
use std::process::Command;

use super::procs::{Proc, free_port, wait_ready};

/// Debian's docker-registry on a loopback port, empty.
pub async fn upstream_registry(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry-data").display()
        ),
    )
    .unwrap();
    let proc = Proc::spawn(Command::new("docker-registry").arg("serve").arg(&config), dir.join("registry.log"));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/v2/"), &proc).await;
    (proc, url)
}

/// The `hubcap` binary of this build serving `docker.io=<upstream>` on
/// loopback `port` (0: a free one) with `extra` arguments, its data in
/// `dir/hubcap-data`, info lines without colour in `dir/<log>`. Returns it
/// and its URL once `/_hubcap/stats` answers.
pub async fn hubcap_serve(dir: &Path, upstream: &str, port: u16, extra: &[&str], log: &str) -> (Proc, String) {
    let port = if port == 0 { free_port() } else { port };
    let proc = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={upstream}")])
            .env("HUBCAP_REDIRECT_ALLOW", super::fakehub::cdns().join(","))
            .args(extra)
            .arg("--data")
            .arg(dir.join("hubcap-data"))
            .env("HUBCAP_LOG", "info")
            .env("NO_COLOR", "1"),
        dir.join(log),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/_hubcap/stats"), &proc).await;
    (proc, url)
}

//! containerd (Debian's, 1.6) for the tests, driven by `ctr`: a daemon of
//! its own (no CRI, sockets and state in a test directory), and a
//! `hosts.toml` per mirror whose fallback is a closed loopback port, so a
//! pull that fails over finds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::procs::Proc;

pub struct Containerd {
    pub proc: Proc,
    pub sock: PathBuf,
    /// Where the content store keeps blobs by digest.
    pub blobs: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    /// Starts containerd in `dir`, once its socket exists.
    pub async fn start(dir: &Path) -> Containerd {
        let sock = dir.join("ctrd.sock");
        let config = dir.join("containerd.toml");
        let toml = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n",
            dir.join("ctrd-root").display(),
            dir.join("ctrd-state").display(),
            sock.display(),
            dir.join("ctrd-ttrpc.sock").display()
        );
        std::fs::write(&config, toml).unwrap();
        let proc = Proc::spawn(Command::new("containerd").arg("--config").arg(&config), dir.join("containerd.log"));
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(sock.exists(), "containerd did not start:\n{}", proc.log());
        let blobs = dir.join("ctrd-root/io.containerd.content.v1.content/blobs/sha256");
        Containerd { proc, sock, blobs, dir: dir.to_owned() }
    }

    /// A hosts directory (`certs.d`) named `name` that sends docker.io to
    /// `mirror` (with `?ns=docker.io`), its fallback a closed port.
    pub fn hosts(&self, mirror: &str, name: &str) -> PathBuf {
        let hosts = self.dir.join(format!("certs.d-{name}"));
        std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
        let toml = format!("server = \"http://127.0.0.1:9\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
        std::fs::write(hosts.join("docker.io/hosts.toml"), toml).unwrap();
        hosts
    }

    /// `ctr content fetch` of `reference` through `hosts`, for `platform`
    /// (`None`: all of them): the command, ready to run.
    pub fn fetch(&self, hosts: &Path, reference: &str, platform: Option<&str>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address").arg(&self.sock).args(["content", "fetch"]);
        match platform {
            Some(p) => cmd.args(["--platform", p]),
            None => cmd.arg("--all-platforms"),
        };
        cmd.arg("--hosts-dir").arg(hosts).arg(reference).stdin(std::process::Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// The digests the content store lists (containerd checks a blob's
    /// digest before it commits it; a removed one is unlisted at once, its
    /// file gone at the next garbage collection).
    pub async fn listed(&self) -> Vec<String> {
        let out = tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["content", "ls", "-q"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "ctr content ls: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
    }
}

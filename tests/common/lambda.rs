//! Lambda on loopback: `cargo lambda watch` (the emulator of Lambda's
//! control plane and Function URLs), the Lambda binaries of this build run
//! under it, `hubcap lambda-dev` in front of them, and all of it on moto.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hubcap::storage::aws::AwsStorage;

use super::moto::Moto;
use super::procs::{Proc, free_port, wait_ready};

/// `cargo lambda watch --only-lambda-apis` on a free loopback port, once the
/// port accepts connections (a panic, with its log, if it does not within
/// a minute). Returns it and the port.
pub async fn watch(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let watch = Proc::spawn(
        Command::new("cargo")
            .args(["lambda", "watch", "--only-lambda-apis", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()]),
        dir.join("watch.log"),
    );
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (watch, port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cargo lambda watch did not listen on 127.0.0.1:{port} within a minute:\n{}", watch.log());
}

/// `bin` with the environment the Lambda runtime gives the function `name`,
/// its runtime API at `runtime_api`, and `env`.
fn runtime(bin: &str, name: &str, runtime_api: String, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_RUNTIME_API", runtime_api);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A Lambda binary of this build (`bin`) run by the emulator on `port` as
/// the function `name`, logging to `dir/<name>.log`.
pub fn function(dir: &Path, name: &str, bin: &str, port: u16, env: &[(&str, String)]) -> Proc {
    // The assertions read its info lines, whatever the caller's HUBCAP_LOG
    // (which `env` may still set).
    let info = [("HUBCAP_LOG", "info".to_owned())];
    let mut cmd = runtime(bin, name, format!("http://127.0.0.1:{port}/.rt/{name}"), &[&info[..], env].concat());
    Proc::spawn(&mut cmd, dir.join(format!("{name}.log")))
}

/// The `api` binary of this build as the emulator's default function (its
/// Function URL is the emulator's root), with the caller's HUBCAP_LOG,
/// logging to `dir/api.log`.
pub fn default_api(dir: &Path, port: u16, env: &[(&str, String)]) -> Proc {
    let mut cmd = runtime(env!("CARGO_BIN_EXE_api"), "_", format!("http://127.0.0.1:{port}/.rt"), env);
    Proc::spawn(&mut cmd, dir.join("api.log"))
}

/// The front end the tests put before the `api` function unless they say
/// otherwise: every rewrite reported of AWS's front ends at once.
pub const WORST_CASE: &str = "worst-case";

/// `hubcap lambda-dev` on a free loopback port in front of the emulator on
/// `port`, playing `front_end` (`function-url`, `http-api`, `rest-api`,
/// `worst-case`, `passthrough`) for the function named `function`; with a
/// table, the
/// table's stream fed to the `fetcher` function. Returns it and its URL
/// once `/v2/` answers.
pub async fn lambda_dev(
    dir: &Path,
    port: u16,
    table: Option<&str>,
    front_end: &str,
    function: &str,
    env: &[(&str, String)],
) -> (Proc, String) {
    let front_port = free_port();
    let mut dev = Command::new(env!("CARGO_BIN_EXE_hubcap"));
    dev.args(["lambda-dev", "--listen", &format!("127.0.0.1:{front_port}"), "--front-end", front_end])
        .args(["--api-url", &format!("http://127.0.0.1:{port}/2015-03-31/functions/{function}/invocations")])
        .env("NO_COLOR", "1");
    if let Some(table) = table {
        dev.args(["--table", table]);
        dev.args(["--fetcher-url", &format!("http://127.0.0.1:{port}/2015-03-31/functions/fetcher/invocations")]);
    }
    for (k, v) in env {
        dev.env(k, v);
    }
    let dev = Proc::spawn(&mut dev, dir.join(format!("lambda-dev-{front_end}-{front_port}.log")));
    let front = format!("http://127.0.0.1:{front_port}");
    wait_ready(&format!("{front}/v2/"), &dev).await;
    (dev, front)
}

/// moto with the bucket `<table>-bucket` and the table `table`, `cargo
/// lambda watch` running the `api` and `fetcher` binaries on them (upstream
/// `docker.io=<upstream>`, plus `extra` settings), and `hubcap lambda-dev`
/// in front (the worst case of AWS's front ends, and the table's stream fed
/// to the fetcher as the event source mapping).
pub struct LambdaStack {
    /// `hubcap lambda-dev`'s URL: where clients pull.
    pub front: String,
    /// The emulator's port.
    pub port: u16,
    pub dev: Proc,
    pub api: Proc,
    pub fetcher: Proc,
    pub watch: Proc,
    pub storage: AwsStorage,
    pub moto: Moto,
    /// The functions' settings (bucket, table, upstream, moto's endpoint).
    env: Vec<(&'static str, String)>,
}

impl LambdaStack {
    pub async fn start(dir: &Path, table: &str, upstream: &str, extra: &[(&'static str, String)]) -> LambdaStack {
        let moto = Moto::start().await;
        let bucket = format!("{table}-bucket");
        let storage = moto.setup(&bucket, table).await;
        let (watch, port) = watch(dir).await;
        let mut env: Vec<(&str, String)> = vec![
            ("HUBCAP_BUCKET", bucket),
            ("HUBCAP_TABLE", table.to_owned()),
            ("HUBCAP_UPSTREAM", format!("docker.io={upstream}")),
            ("HUBCAP_REDIRECT_ALLOW", super::fakehub::cdns().join(",")),
        ];
        env.extend_from_slice(extra);
        env.extend(moto.env());
        let api = function(dir, "api", env!("CARGO_BIN_EXE_api"), port, &env);
        let fetcher = function(dir, "fetcher", env!("CARGO_BIN_EXE_fetcher"), port, &env);
        let (dev, front) = lambda_dev(dir, port, Some(table), WORST_CASE, "api", &moto.env()).await;
        LambdaStack { front, port, dev, api, fetcher, watch, storage, moto, env }
    }

    /// Another Lambda binary of this build (`bin`) run by the emulator as
    /// the function `name`, on the stack's settings and `extra` (which win).
    pub fn function(&self, dir: &Path, name: &str, bin: &str, extra: &[(&str, String)]) -> Proc {
        function(dir, name, bin, self.port, &[&self.env[..], extra].concat())
    }

    /// Another `hubcap lambda-dev` in front of the function `function` (the
    /// stack's `api`, or one started with `function`), playing `front_end`,
    /// without a stream pump (the stack's own feeds the fetcher).
    pub async fn another_front(&self, dir: &Path, front_end: &str, function: &str) -> (Proc, String) {
        lambda_dev(dir, self.port, None, front_end, function, &self.moto.env()).await
    }

    /// The `api` binary again, on the stack's settings and `extra` (which
    /// win), under an emulator of its own (`cargo lambda watch` runs only
    /// functions named after the project's binaries), logging in `dir`.
    pub async fn variant(&self, dir: &Path, extra: &[(&str, String)]) -> ApiVariant {
        std::fs::create_dir_all(dir).unwrap();
        let (watch, port) = watch(dir).await;
        let api = function(dir, "api", env!("CARGO_BIN_EXE_api"), port, &[&self.env[..], extra].concat());
        ApiVariant { watch, api, port, moto_env: self.moto.env() }
    }

    /// The functions' and lambda-dev's logs, for a failure message.
    pub fn logs(&self) -> String {
        format!("--- api ---\n{}\n--- fetcher ---\n{}\n--- lambda-dev ---\n{}", self.api.log(), self.fetcher.log(), self.dev.log())
    }
}

/// An `api` function with settings of its own beside a `LambdaStack`'s, on
/// the same table and bucket.
pub struct ApiVariant {
    pub watch: Proc,
    pub api: Proc,
    pub port: u16,
    moto_env: Vec<(&'static str, String)>,
}

impl ApiVariant {
    /// `hubcap lambda-dev` playing `front_end` in front of it.
    pub async fn front(&self, dir: &Path, front_end: &str) -> (Proc, String) {
        lambda_dev(dir, self.port, None, front_end, "api", &self.moto_env).await
    }
}

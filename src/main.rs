//! The `hubcap` command line: parses flags (each also a `HUBCAP_*` variable),
//! sets up logging and runs a subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hubcap::proxy::MirrorConfig;
use hubcap::serve::{self, ServeOptions};

#[derive(Parser)]
#[command(name = "hubcap", version, about = "A pull-through mirror for Docker Hub and other OCI registries")]
struct Cli {
    /// Log format.
    #[arg(long, env = "HUBCAP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror on this host with the embedded backend.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HUBCAP_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Directory for the cache (blobs, index, signing key).
    #[arg(long, env = "HUBCAP_DATA", default_value = "hubcap-data")]
    data: PathBuf,
    /// An upstream registry: REGISTRY=URL, or REGISTRY for https://REGISTRY.
    /// Repeatable (comma-separated in the variable). docker.io is always
    /// configured (default https://registry-1.docker.io).
    #[arg(long = "upstream", env = "HUBCAP_UPSTREAM", value_delimiter = ',')]
    upstreams: Vec<String>,
    /// Seconds a tag is trusted before it is re-validated upstream (0: every time).
    #[arg(long, env = "HUBCAP_TAG_TTL", default_value_t = 600.0)]
    tag_ttl: f64,
    /// Seconds a blob request waits for an in-flight fetch before redirecting back.
    #[arg(long, env = "HUBCAP_BLOB_WAIT", default_value_t = 20.0)]
    blob_wait: f64,
    /// Seconds a signed blob URL stays valid.
    #[arg(long, env = "HUBCAP_URL_TTL", default_value_t = 900.0)]
    url_ttl: f64,
    /// Seconds a tag re-validation may take before the cached tag is served.
    #[arg(long, env = "HUBCAP_REVALIDATE_TIMEOUT", default_value_t = 3.0)]
    revalidate_timeout: f64,
    /// Blob copies from upstream running at once.
    #[arg(long, env = "HUBCAP_FETCH_CONCURRENCY", default_value_t = 8)]
    fetch_concurrency: usize,
    /// Upstream credentials, in docker's config.json format ({"auths": {...}}).
    #[arg(long, env = "HUBCAP_CREDENTIALS")]
    credentials: Option<PathBuf>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUBCAP_LOG").unwrap_or_else(|_| "info".into());
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve_cmd(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubcap: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_cmd(args: ServeArgs) -> Result<(), serve::BoxError> {
    let opts = ServeOptions {
        data_dir: args.data,
        upstreams: args.upstreams,
        credentials: args.credentials,
        mirror: MirrorConfig {
            tag_ttl: secs(args.tag_ttl),
            blob_wait: secs(args.blob_wait),
            url_ttl: secs(args.url_ttl),
            revalidate_timeout: secs(args.revalidate_timeout),
            ..MirrorConfig::default()
        },
        fetch_concurrency: args.fetch_concurrency,
    };
    let (router, mirror) = serve::build_local(&opts).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let upstreams: Vec<String> = mirror.upstreams().iter().map(|u| u.registry.clone()).collect();
    tracing::info!(
        listen = %listener.local_addr()?,
        data = %opts.data_dir.display(),
        upstreams = ?upstreams,
        "hubcap serving"
    );
    serve::run(listener, router, serve::shutdown_signal()).await?;
    Ok(())
}

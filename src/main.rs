//! The `hubcap` command line: parses flags (each also a `HUBCAP_*` variable),
//! sets up logging and runs a subcommand.

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};
use hubcap::assemble::{self, Assembled, Backend, BoxError, Fetching, MEMORY_CACHE_ENTRIES};
use hubcap::config::{AccessArgs, AwsArgs, GcArgs, MirrorArgs, StorageArgs};
use hubcap::serve;

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
    /// Run the mirror on this host (embedded backend by default).
    Serve(Box<ServeArgs>),
    /// Create the S3 bucket and the DynamoDB table (stream, TTL) the AWS
    /// backend uses; harmless when they exist.
    AwsSetup(AwsArgs),
    /// Verify a running mirror end to end (exit 1 on failure).
    Check(CheckArgs),
    /// Cache images (manifests and every layer) ahead of time, with no
    /// server running, through the same code path as a pull.
    Warm(Box<WarmArgs>),
    /// Expire images not pulled for a while and delete the blobs nothing
    /// references any more (after a grace period); safe while mirrors serve.
    Gc(Box<GcCmdArgs>),
    /// What the cache holds and how it served: images, bytes, hit ratio,
    /// upstream requests saved, the last ratelimit-remaining, the oldest and
    /// least recently pulled images.
    Stats(Box<StatsArgs>),
    /// Development: complete a `cargo lambda watch` setup on moto. Plays the
    /// `api` function's front end (a Function URL's, an HTTP API's or a REST
    /// API's events and rewrites of answers) and feeds the table's stream to
    /// the `fetcher`.
    LambdaDev(LambdaDevArgs),
}

#[derive(clap::Args)]
struct LambdaDevArgs {
    /// Where clients (daemon.json's registry-mirrors) connect.
    #[arg(long, default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// The api function's invoke URL under `cargo lambda watch`.
    #[arg(long, default_value = "http://127.0.0.1:9000/2015-03-31/functions/api/invocations")]
    api_url: String,
    /// The front end to play: its events, its rewrites of the function's
    /// answers (a HEAD's Content-Length, a renamed WWW-Authenticate) and its
    /// time limit.
    #[arg(long, value_enum, default_value_t = hubcap::lambda::dev::FrontEnd::FunctionUrl)]
    front_end: hubcap::lambda::dev::FrontEnd,
    /// The api function's timeout in seconds (the template's: 30), after
    /// which a Function URL gives up.
    #[arg(long, default_value_t = 30)]
    function_timeout: u64,
    /// The table whose stream feeds the fetcher (AWS_ENDPOINT_URL: moto).
    #[arg(long, env = "HUBCAP_TABLE")]
    table: Option<String>,
    /// The fetcher function's invoke URL under `cargo lambda watch`.
    #[arg(long)]
    fetcher_url: Option<String>,
    /// How often the stream is read, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

#[derive(clap::Args)]
struct GcCmdArgs {
    /// List what would go and the bytes it would reclaim; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Stop after this many writes (the next run finishes the sweep).
    #[arg(long)]
    max_writes: Option<u64>,
    /// Stop after this long (e.g. 10m); the next run finishes the sweep.
    #[arg(long, value_parser = hubcap::lifecycle::parse_duration)]
    max_time: Option<std::time::Duration>,
    #[command(flatten)]
    gc: GcArgs,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(clap::Args)]
struct StatsArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(clap::Args)]
struct WarmArgs {
    /// Images: [registry/]name[:tag|@digest].
    #[arg(required = true)]
    images: Vec<String>,
    /// Only these platforms of a multi-platform image (os/arch[/variant]); default: all.
    #[arg(long = "platform")]
    platforms: Vec<String>,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    mirror: MirrorArgs,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The mirror's URL, e.g. https://abc.lambda-url.eu-west-1.on.aws
    url: String,
    /// The image to pull through it.
    #[arg(long, default_value = "library/hello-world:latest")]
    image: String,
    /// USER:PASSWORD for a mirror that requires client credentials.
    #[arg(long, env = "HUBCAP_CHECK_CREDENTIALS", hide_env_values = true)]
    credentials: Option<String>,
    /// Seconds each request may take.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HUBCAP_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    mirror: MirrorArgs,
    #[command(flatten)]
    access: AccessArgs,
    /// How often the server runs GC itself (e.g. 1h; 0: never, leave it to
    /// `hubcap gc` or the gc Lambda).
    #[arg(long, env = "HUBCAP_GC_INTERVAL", default_value = "1h", value_parser = hubcap::lifecycle::parse_duration)]
    gc_interval: std::time::Duration,
    /// Longest a client may take to send a request's headers, from the
    /// moment its connection is accepted (e.g. 15s); a connection that sends
    /// nothing, or drips them, is closed.
    #[arg(long, env = "HUBCAP_HEADER_TIMEOUT", default_value = "15s", value_parser = hubcap::config::positive_duration)]
    header_timeout: std::time::Duration,
    /// Longest a kept-alive connection may sit idle between requests (e.g. 60s).
    #[arg(long, env = "HUBCAP_IDLE_TIMEOUT", default_value = "60s", value_parser = hubcap::config::positive_duration)]
    idle_timeout: std::time::Duration,
    /// Client connections served at once; more wait to be accepted.
    #[arg(long, env = "HUBCAP_MAX_CONNECTIONS", default_value_t = 1000, value_parser = hubcap::config::at_least_one)]
    max_connections: usize,
    /// Connections one client address may hold at once (a fleet behind one
    /// NAT address shares them); more are closed on accept.
    #[arg(long, env = "HUBCAP_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 250, value_parser = hubcap::config::at_least_one)]
    max_connections_per_client: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[arg(long, env = "HUBCAP_SHUTDOWN_GRACE", default_value = "20s", value_parser = hubcap::lifecycle::parse_duration)]
    shutdown_grace: std::time::Duration,
    #[command(flatten)]
    gc: GcArgs,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUBCAP_LOG").unwrap_or_else(|_| "info".into());
    // Logs on stderr; stdout is for what a command reports (`gc --json`).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour).with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hubcap::alloc::return_large_buffers();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve_cmd(*args).await,
        Command::AwsSetup(args) => aws_setup(args).await,
        Command::Warm(args) => warm_cmd(*args).await,
        Command::Gc(args) => gc_cmd(*args).await,
        Command::Stats(args) => stats_cmd(*args).await,
        Command::LambdaDev(args) => {
            let opts = hubcap::lambda::dev::LambdaDevOptions {
                listen: args.listen,
                api_url: args.api_url,
                front_end: args.front_end,
                function_timeout: std::time::Duration::from_secs(args.function_timeout),
                table: args.table,
                fetcher_url: args.fetcher_url,
                poll_every: std::time::Duration::from_millis(args.poll_ms),
            };
            hubcap::lambda::dev::run(opts, serve::shutdown_signal()).await
        }
        Command::Check(args) => {
            let opts = hubcap::check::CheckOptions {
                url: args.url,
                image: args.image,
                credentials: args.credentials,
                timeout: std::time::Duration::from_secs(args.timeout),
            };
            if hubcap::check::check(&opts).await {
                Ok(())
            } else {
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubcap: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_cmd(args: ServeArgs) -> Result<(), BoxError> {
    let opts = args.mirror.options(args.storage.backend()?, args.access.resolve().await?);
    let gc = args.gc.options()?;
    let Assembled { mirror, router } = assemble::mirror(&opts, Fetching::Owner).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    announce(listener.local_addr()?, &opts, &mirror);
    let background = serve::spawn_maintenance(mirror.clone(), gc, args.gc_interval);
    let limits = serve::Limits {
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        per_client: args.max_connections_per_client,
        shutdown_grace: args.shutdown_grace,
        admit: Some(std::sync::Arc::new(opts.access.clone())),
    };
    serve::run_with(listener, router, serve::shutdown_signal(), limits).await?;
    background.abort();
    mirror.flush_stats().await?;
    Ok(())
}

/// What a server says when it starts: where clients point (the URL, and
/// the lines for Docker's daemon.json and containerd's hosts.toml), where
/// the cache is, each upstream's URL; and a warning when it listens beyond
/// this host with no network allowed (an open mirror).
fn announce(addr: std::net::SocketAddr, opts: &assemble::Options, mirror: &hubcap::mirror::Mirror) {
    let host = if addr.ip().is_unspecified() { format!("<this host>:{}", addr.port()) } else { addr.to_string() };
    let url = format!("http://{host}");
    let cache = match &opts.backend {
        Backend::Local(dir) => std::path::absolute(dir).unwrap_or_else(|_| dir.clone()).display().to_string(),
        Backend::Aws(s) => format!("s3://{} + DynamoDB table {}", s.bucket, s.table),
    };
    let upstreams: Vec<String> = mirror.upstreams().iter().map(|u| format!("{}={}", u.registry, u.base())).collect();
    tracing::info!(%url, listen = %addr, %cache, upstreams = %upstreams.join(","), "hubcap serving");
    tracing::info!(
        "point clients at it: Docker's daemon.json {{\"registry-mirrors\": [\"{url}\"], \"insecure-registries\": [\"{host}\"]}}; \
         containerd's /etc/containerd/certs.d/docker.io/hosts.toml [host.\"{url}\"] capabilities = [\"pull\", \"resolve\"]"
    );
    if !addr.ip().is_loopback() && !opts.access.limits_networks() {
        tracing::warn!(listen = %addr, "listening beyond this host with no --allow-cidr: anyone who can reach it may pull through it (an open mirror)");
    }
}

async fn gc_cmd(args: GcCmdArgs) -> Result<(), BoxError> {
    let mut opts = args.gc.options()?;
    opts.dry_run = args.dry_run;
    opts.max_writes = args.max_writes;
    opts.deadline = args.max_time.map(|t| std::time::Instant::now() + t);
    warn_short_grace(&opts);
    let storage = assemble::open(&args.storage.backend()?, std::time::Duration::ZERO, MEMORY_CACHE_ENTRIES).await?;
    let report = hubcap::lifecycle::run(storage.index.as_ref(), storage.store.as_ref(), &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", hubcap::lifecycle::render(&report));
    }
    Ok(())
}

/// Pulls in flight hold blob URLs for up to --url-ttl (15m) and mark blobs
/// used at most every 10m: a shorter grace can fail them.
fn warn_short_grace(opts: &hubcap::lifecycle::GcOptions) {
    if opts.grace < std::time::Duration::from_secs(30 * 60) && !opts.dry_run {
        tracing::warn!(grace = ?opts.grace, "a grace period under 30m can delete blobs of pulls in flight");
    }
}

async fn stats_cmd(args: StatsArgs) -> Result<(), BoxError> {
    let index = assemble::open(&args.storage.backend()?, std::time::Duration::ZERO, MEMORY_CACHE_ENTRIES).await?.index;
    let inventory = hubcap::lifecycle::inventory(index.as_ref()).await?;
    let report = hubcap::observe::report(inventory, &index.stats().await?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", hubcap::observe::render(&report, hubcap::storage::now()));
    }
    Ok(())
}

async fn warm_cmd(args: WarmArgs) -> Result<(), BoxError> {
    let opts = args.mirror.options(args.storage.backend()?, Default::default());
    let Assembled { mirror, .. } = assemble::mirror(&opts, Fetching::InProcess).await?;
    let failed = warm_all(&mirror, &args.images, &args.platforms).await;
    mirror.flush_stats().await?;
    if failed > 0 { Err(format!("{failed} of {} images could not be warmed", args.images.len()).into()) } else { Ok(()) }
}

async fn warm_all(mirror: &hubcap::mirror::Mirror, images: &[String], platforms: &[String]) -> usize {
    let mut failed = 0;
    for image in images {
        match hubcap::warm::warm(mirror, image, platforms).await {
            Ok(w) => println!("warmed {image}: {} manifests, {} blobs, {:.1} MiB", w.manifests, w.blobs, w.bytes as f64 / 1048576.0),
            Err(e) => {
                failed += 1;
                println!("failed {image}: {e}");
            }
        }
    }
    failed
}

async fn aws_setup(args: AwsArgs) -> Result<(), BoxError> {
    let cfg = args.storage()?;
    let (bucket, table) = hubcap::storage::aws::setup(&cfg).await?;
    println!("bucket {}: {}", cfg.bucket, if bucket { "created" } else { "exists" });
    println!("table {}: {}", cfg.table, if table { "created (key pk + sk, stream)" } else { "exists" });
    Ok(())
}

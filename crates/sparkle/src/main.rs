//! `sparkle`: one binary for every role. This crate parses the command line and the
//! configuration and wires the library crates together; the behaviour lives in them.

mod admin;
mod audit;
mod cmd;
mod config;
mod control_plane;
mod keyring;
mod retention;
mod runtime;
mod secrets;
mod worker_listener;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "sparkle",
    version,
    about = "Self-hostable, elastic, hardened text-to-image service."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by every command that touches the configuration or the data.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Configuration file (sparkle.toml). Environment variables SPARKLE_* override it,
    /// flags override both.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory: database, images, generated certificates.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Flags of the server roles.
#[derive(Debug, Clone, Args)]
pub struct Serve {
    /// Public HTTPS listener, e.g. 0.0.0.0:8443 (port 0 picks a free port and prints it).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Admin listener (metrics), loopback by default.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
    /// A model to serve: a directory in the diffusers layout, a single-file .safetensors
    /// checkpoint, or a directory of such models. Repeat it to serve several; the first is
    /// the default for requests that name none.
    #[arg(long, value_name = "PATH")]
    model: Vec<PathBuf>,
    /// The GPUs local workers run on, one worker each: `all` (every GPU nvidia-smi lists),
    /// `none` (the CPU), or indexes such as `0,2` (`scaler.gpus`).
    #[arg(long, value_name = "GPUS")]
    gpus: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ScalerAction {
    /// A discrete-event simulation of a trace through a pool of GPU workers under Sparkle's
    /// policy or the reference deployment's: waits (p50/p95/p99), GPU-seconds per image,
    /// idle GPU-seconds and cold starts.
    Simulate(cmd::simulate::SimulateArgs),
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything on one machine: gateway, SQLite queue, local image store, and a scaler
    /// that starts local worker processes. Prints the URL, and the admin API key on first start.
    Up {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        serve: Serve,
    },
    /// The gateway alone (HTTPS API), for a multi-machine deployment.
    Gateway {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        serve: Serve,
    },
    /// One worker: leases jobs, generates, hands the images over. Opens no listening socket,
    /// speaks only the worker protocol (HTTPS) to --control-plane, and holds no database,
    /// store or master-key credentials: only its enrollment secret.
    Worker {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        serve: Serve,
        #[command(flatten)]
        remote: cmd::serve::RemoteWorker,
        /// Drain and exit when standard input closes (set by the scaler for its children).
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
    },
    /// The scaler alone: watches the backlog and runs local worker processes, which speak
    /// the worker protocol to the control plane named here. `sparkle scaler simulate` runs
    /// its policy over a trace instead.
    #[command(args_conflicts_with_subcommands = true)]
    Scaler {
        #[command(subcommand)]
        action: Option<ScalerAction>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        serve: Serve,
        #[command(flatten)]
        remote: cmd::serve::RemoteWorker,
    },
    /// Generate one image without any server.
    Generate(cmd::generate::GenerateArgs),
    /// Models: make a tiny test model, list installed models.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// API keys: create, list, revoke.
    #[command(subcommand)]
    Key(cmd::key::KeyCommand),
    /// Enrollments of remote workers: create (prints the secret once), list, revoke.
    #[command(subcommand)]
    Enrollment(cmd::enrollment::EnrollmentCommand),
    /// Discord: register the /sparkle command.
    #[command(subcommand)]
    Discord(cmd::discord::DiscordCommand),
    /// The keyring: list, rotate and retire the master keys that seal images and database
    /// fields at rest (not API keys: see `sparkle key`).
    #[command(subcommand, alias = "keys")]
    Keyring(cmd::keyring::KeyringCommand),
    /// Applies pending database migrations (on PostgreSQL, as the database's owner: the
    /// service's own role may only read and write rows).
    Migrate(cmd::migrate::MigrateArgs),
    /// The security posture, one line per check with pass, fail or n/a and the reason. Exits
    /// non-zero when a check fails under the production profile.
    Audit {
        #[command(flatten)]
        common: Common,
    },
    /// Benchmarks: numbers to report, not pass/fail checks.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// Keeps the GPU driver's compiled kernels in the data directory (`cuda-cache`), unless
/// `CUDA_CACHE_PATH` says otherwise: a worker's first start on a machine compiles candle's
/// kernels for its GPU (about half a minute on an H100); every later start on the same data
/// directory, including workers the scaler starts from zero, finds them compiled (about 3 s).
/// Runs before any thread exists, so setting the environment races with nothing.
#[cfg(feature = "cuda")]
fn keep_gpu_kernels(common: &Common, serve: &Serve) {
    if std::env::var_os("CUDA_CACHE_PATH").is_some() {
        return;
    }
    if let Ok(config) = cmd::load_config(common, Some(serve)) {
        let dir = config.data_dir.join("cuda-cache");
        if config.prepare_data_dir().is_ok() && std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("CUDA_CACHE_PATH", &dir);
            if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
                // The driver's default (256 MiB) holds less than one model's kernels.
                std::env::set_var("CUDA_CACHE_MAXSIZE", (2u64 << 30).to_string());
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    runtime::init_logging();
    #[cfg(feature = "cuda")]
    if let Command::Up { common, serve } | Command::Worker { common, serve, .. } = &cli.command {
        keep_gpu_kernels(common, serve);
    }
    let result = match cli.command {
        Command::Up { common, serve } => runtime::block_on(cmd::serve::up(common, serve)),
        Command::Gateway { common, serve } => runtime::block_on(cmd::serve::gateway(common, serve)),
        Command::Worker {
            common,
            serve,
            remote,
            stop_on_stdin_eof,
        } => runtime::block_on(cmd::serve::worker(common, serve, remote, stop_on_stdin_eof)),
        Command::Scaler {
            action: Some(ScalerAction::Simulate(args)),
            ..
        } => cmd::simulate::run(args),
        Command::Scaler {
            action: None,
            common,
            serve,
            remote,
        } => runtime::block_on(cmd::serve::scaler(common, serve, remote)),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Model(command) => cmd::model::run(command),
        Command::Key(command) => runtime::block_on(cmd::key::run(command)),
        Command::Enrollment(command) => runtime::block_on(cmd::enrollment::run(command)),
        Command::Discord(command) => runtime::block_on(cmd::discord::run(command)),
        Command::Keyring(command) => runtime::block_on(cmd::keyring::run(command)),
        Command::Migrate(args) => runtime::block_on(cmd::migrate::run(args)),
        Command::Audit { common } => runtime::block_on(cmd::audit::run(common)),
        Command::Bench(command) => cmd::bench::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

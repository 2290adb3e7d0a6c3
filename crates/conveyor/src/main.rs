//! `conveyor`: one binary, one subcommand per role.

mod cli;
mod failure;
mod otlp;
mod otlp_http;
mod pipelines;
mod roles;
mod shutdown;
mod sinks;
mod status;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

/// mimalloc instead of the system allocator: allocation was about a quarter of all instructions
/// in the batch ingest path under glibc malloc (callgrind; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(roles::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure::Failure::Config(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(failure::Failure::Runtime(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries the listening line and the stdout sink).
/// `CONVEYOR_LOG` (or `RUST_LOG`) sets the filter; `--log-format` / `LOG_FORMAT` (or
/// `CONVEYOR_LOG_FORMAT`) `json` switches format.
fn init_logging(format: Option<cli::LogFormat>) {
    let filter = std::env::var("CONVEYOR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|error| {
        eprintln!("warning: CONVEYOR_LOG '{filter}' is not a valid filter ({error}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let json = match format {
        Some(format) => format == cli::LogFormat::Json,
        None => std::env::var("CONVEYOR_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")),
    };
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

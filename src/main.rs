use std::process::ExitCode;

use ztunnel::config::{Cli, Config, parse_args, usage};
use ztunnel::{app, telemetry};

fn main() -> ExitCode {
    // Before any other thread exists: see `sys::tune_allocator`.
    let allocator = ztunnel::sys::tune_allocator();
    let overrides = match parse_args(std::env::args().skip(1)) {
        Ok(Cli::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Version) => {
            println!("ztunnel-tpc {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Run(o)) => o,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::from_env_and_flags(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztunnel: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init_logging(cfg.log_format) {
        eprintln!("ztunnel: {e:#}");
        return ExitCode::from(2);
    }
    match allocator {
        ztunnel::sys::AllocatorTuning::Set => {}
        ztunnel::sys::AllocatorTuning::LeftToOperator => tracing::info!("malloc left as GLIBC_TUNABLES sets it"),
        ztunnel::sys::AllocatorTuning::Refused => {
            tracing::warn!("glibc refused the malloc thresholds; its defaults stay")
        }
    }
    let proxy = match app::start(cfg, app::RunOptions { handle_signals: true }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("failed to start: {e:#}");
            telemetry::flush_logs();
            return ExitCode::FAILURE;
        }
    };
    let code = match proxy.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry::flush_logs();
    code
}

//! `containerd-shim-beaconbox-v1`: containerd's runtime v2 shim for beaconbox.
//!
//! `start` and `delete` are short actions ([`beacon_shim::lifecycle`]); without
//! an action the binary is the long-running server ([`beacon_shim::server`]).

use std::process::ExitCode;

use beacon_shim::invocation::{Action, Invocation};
use beacon_shim::{lifecycle, server};

fn log_to_bundle_fifo(debug: bool) {
    let filter = if debug { "debug" } else { "info" };
    let filter = beacon_vmm::log_filter(filter);
    // containerd reads the bundle's `log` FIFO into its own log.
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open("log");
    match fifo {
        Ok(f) => {
            let writer = beacon_shim::logfifo::LogFifo::new(f);
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(writer))
                .init();
        }
        Err(_) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::io::sink)
                .init();
        }
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let inv = match Invocation::parse(args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("containerd-shim-beaconbox-v1: {e}");
            return ExitCode::from(2);
        }
    };
    match inv.action {
        Action::Start => match lifecycle::start(&inv) {
            Ok(address) => match lifecycle::print(address.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            },
            Err(e) => {
                eprintln!("containerd-shim-beaconbox-v1 start: {e:#}");
                ExitCode::FAILURE
            }
        },
        Action::Delete => match lifecycle::delete(&inv).and_then(|b| lifecycle::print(&b)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-beaconbox-v1 delete: {e:#}");
                ExitCode::FAILURE
            }
        },
        Action::Serve => {
            log_to_bundle_fifo(inv.debug);
            match server::serve(&inv) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("shim server failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

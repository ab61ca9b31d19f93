//! `beacon-lab`: run one command inside the nested KVM lab (see `tests/lab/run`).
//!
//! Exit code: the command's; 124 when it timed out; 125 when the lab itself failed.

use std::time::Duration;

use beacon_tests::lab::{os_args, parse_env, Lab, LabError};
use clap::Parser;

/// Run a command inside a QEMU-emulated VM that has a real /dev/kvm.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Cli {
    /// Give up (and kill the lab VM) after this many seconds.
    #[arg(long, default_value_t = 600, env = "BEACON_LAB_TIMEOUT")]
    timeout: u64,
    /// Memory of the lab VM in MiB.
    #[arg(long, default_value_t = 3072, env = "BEACON_LAB_MEMORY_MIB")]
    memory: u32,
    /// Extra environment for the command (repeatable KEY=VALUE).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print only the command's output, not the lab's console.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let mut lab = Lab::new();
    lab.timeout = Duration::from_secs(cli.timeout);
    lab.memory_mib = cli.memory;
    lab.echo_console = !cli.quiet;
    match parse_env(&cli.env) {
        Ok(extra) => lab.env.extend(extra),
        Err(e) => {
            eprintln!("beacon-lab: {e}");
            std::process::exit(125);
        }
    }
    match lab.run(&os_args(&cli.command)) {
        Ok(out) => {
            if cli.quiet {
                print!("{}", out.output);
            }
            eprintln!(
                "beacon-lab: exit {} after {:.1} s",
                out.exit_code,
                out.elapsed.as_secs_f64()
            );
            std::process::exit(out.exit_code);
        }
        Err(e @ LabError::Timeout { .. }) => {
            eprintln!("beacon-lab: {e}");
            std::process::exit(124);
        }
        Err(e) => {
            eprintln!("beacon-lab: {e}");
            std::process::exit(125);
        }
    }
}

//! `beacon-vsock-tool`: listen or connect over AF_VSOCK, a unix socket, or the
//! hybrid vsock backend's `CONNECT` handshake, with many connections at once;
//! each sends N bytes of a deterministic stream and checks what it receives.
//! Prints `VSOCK-TOOL-OK <label> conns=K bytes=<received per connection>
//! sum=<its checksum> secs=<slowest connection>` (and, for a server,
//! `abandoned=K` when K connections were gone before any data moved and were
//! replaced) or exits 1.
//! Runs on the host and, packed into a guest initrd, in the guest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use beacon_tests::vsock_tool::{
    connect_retry, exchange, hold_cid, listen, serve, summarize, Endpoint,
};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Name printed in the summary line.
    #[arg(long, global = true, default_value = "vsock")]
    label: String,
    /// Connections (the server accepts this many; the client opens them at
    /// once, each moving its data as soon as it is open).
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Open (or accept) every connection before any data moves, so no
    /// handshake answer queues behind this job's own streams (a guest sends
    /// its vsock packets first come, first served).
    #[arg(long, global = true)]
    open_all_first: bool,
    /// Bytes each side of each connection sends.
    #[arg(long, global = true, default_value_t = 1 << 20)]
    bytes: u64,
    /// Bytes each connection expects from its peer (default: --bytes).
    #[arg(long, global = true)]
    recv_bytes: Option<u64>,
    /// Exit 124 if not done by then.
    #[arg(long, global = true, default_value_t = 300)]
    timeout_secs: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Accept --conns connections.
    Serve {
        /// AF_VSOCK port (any CID).
        #[arg(long)]
        vsock: Option<u32>,
        /// Unix socket path.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
    /// Hold a guest CID in /dev/vhost-vsock (prints `HOLDING <cid>`) until killed
    /// or --timeout-secs.
    HoldCid { cid: u64 },
    /// Open --conns connections.
    Connect {
        /// AF_VSOCK CID:PORT.
        #[arg(long)]
        vsock: Option<String>,
        /// Unix socket path.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Hybrid backend socket PATH:PORT (sends `CONNECT PORT`).
        #[arg(long)]
        hybrid: Option<String>,
        /// Keep retrying a refused connection this long.
        #[arg(long, default_value_t = 60)]
        retry_secs: u64,
    },
}

fn split_last(s: &str) -> Result<(&str, u32), String> {
    let (a, p) = s
        .rsplit_once(':')
        .ok_or(format!("{s:?}: expected ...:PORT"))?;
    Ok((a, p.parse().map_err(|_| format!("{p:?} is not a port"))?))
}

fn run(cli: Cli) -> Result<String, String> {
    let timeout = cli.timeout_secs;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        eprintln!("beacon-vsock-tool: timed out after {timeout} s");
        std::process::exit(124);
    });
    let bytes = cli.bytes;
    let recv_bytes = cli.recv_bytes.unwrap_or(bytes);
    let mut abandoned = 0;
    let reports = match cli.cmd {
        Cmd::HoldCid { cid } => {
            let _held = hold_cid(cid).map_err(|e| format!("holding CID {cid}: {e}"))?;
            println!("HOLDING {cid}");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Serve { vsock, unix } => {
            let ep = match (vsock, unix) {
                (Some(port), None) => Endpoint::Vsock {
                    cid: u32::MAX,
                    port,
                },
                (None, Some(p)) => Endpoint::Unix(p),
                _ => return Err("serve needs exactly one of --vsock or --unix".into()),
            };
            let l = listen(&ep).map_err(|e| format!("listen on {ep:?}: {e}"))?;
            let served = serve(&l, cli.conns, bytes, cli.open_all_first)?;
            abandoned = served.abandoned;
            served.reports
        }
        Cmd::Connect {
            vsock,
            unix,
            hybrid,
            retry_secs,
        } => {
            let ep = match (vsock, unix, hybrid) {
                (Some(v), None, None) => {
                    let (cid, port) = split_last(&v)?;
                    Endpoint::Vsock {
                        cid: cid.parse().map_err(|_| format!("{cid:?} is not a CID"))?,
                        port,
                    }
                }
                (None, Some(p), None) => Endpoint::Unix(p),
                (None, None, Some(h)) => {
                    let (path, port) = split_last(&h)?;
                    Endpoint::Hybrid {
                        path: path.into(),
                        port,
                    }
                }
                _ => return Err("connect needs exactly one of --vsock, --unix or --hybrid".into()),
            };
            let deadline = Instant::now() + Duration::from_secs(retry_secs);
            // One connection waits for the peer to listen; the others follow
            // it at once (no storm of retries while the peer boots).
            let first =
                connect_retry(&ep, deadline).map_err(|e| format!("connect to {ep:?}: {e}"))?;
            // Each thread yields one connection's report, or why it has none.
            let threads: Vec<std::thread::JoinHandle<Result<_, String>>> = if cli.open_all_first {
                let mut connecting = Vec::new();
                for _ in 1..cli.conns {
                    let ep = ep.clone();
                    connecting.push(std::thread::spawn(move || {
                        connect_retry(&ep, deadline).map_err(|e| format!("connect to {ep:?}: {e}"))
                    }));
                }
                let mut conns = vec![first];
                for t in connecting {
                    match t.join() {
                        Ok(Ok(c)) => conns.push(c),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err("a connecting thread panicked".into()),
                    }
                }
                conns
                    .into_iter()
                    .map(|c| std::thread::spawn(move || Ok(exchange(c, bytes))))
                    .collect()
            } else {
                let mut first = Some(first);
                (0..cli.conns)
                    .map(|_| {
                        let ep = ep.clone();
                        let ready = first.take();
                        std::thread::spawn(move || {
                            let conn = match ready {
                                Some(c) => Ok(c),
                                None => connect_retry(&ep, deadline),
                            };
                            conn.map(|c| exchange(c, bytes))
                                .map_err(|e| format!("connect to {ep:?}: {e}"))
                        })
                    })
                    .collect()
            };
            let mut reports = Vec::new();
            for t in threads {
                match t.join() {
                    Ok(Ok(r)) => reports.push(r),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err("a connection thread panicked".into()),
                }
            }
            reports
        }
    };
    let line = summarize(&cli.label, bytes, recv_bytes, &reports)?;
    Ok(if abandoned > 0 {
        format!("{line} abandoned={abandoned}")
    } else {
        line
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

//! CRI PortForward into a pod's VM. containerd's CRI plugin serves
//! PortForward by dialing `localhost:PORT` inside the pod's network
//! namespace; there, `beacon_netmgr::cni::pod::forward_localhost` redirects
//! every such connection to one listener, which this module serves: each
//! accepted connection is joined to the same port on the guest's loopback
//! through vminitd's `FORWARD` stream (vminitd README, "FORWARD").
//!
//! Owns those connections and nothing else: it never listens outside the
//! pod's namespace and never decides which ports may be reached (anything
//! on the guest's loopback, as with runc, where containerd reaches anything
//! on the pod's loopback).
//!
//! Bounded: at most [`MAX_OPEN`] forwards at once (more are reset at once),
//! the guest's answer within [`crate::guest::HANDSHAKE_TIMEOUT`], fixed copy
//! buffers (a side that stops reading stalls only its own forward). A port
//! the guest refuses is answered with a TCP reset, so containerd reports an
//! error to the client instead of an empty stream. Dropping the
//! [`PortForwarder`] ends the listener and every open forward.

use std::time::Duration;

use beacon_common::guest_protocol::StreamRequest;
use beacon_netmgr::cni::pod::original_port;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::guest::GuestLink;

/// Forwards open at once (vminitd allows as many).
pub const MAX_OPEN: usize = 64;

/// Serves a pod's port forward listener until dropped.
#[derive(Debug)]
pub struct PortForwarder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        // The task owns the forwards' JoinSet: aborting it drops the set,
        // which aborts every forward.
        self.task.abort();
    }
}

impl PortForwarder {
    /// Start serving `listener` (made by `forward_localhost`) for the pod
    /// `sandbox`, whose guest is reached through `link`.
    pub fn start(
        listener: std::net::TcpListener,
        link: GuestLink,
        sandbox: &str,
    ) -> std::io::Result<PortForwarder> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let sandbox = sandbox.to_string();
        let task = tokio::spawn(serve(listener, link, sandbox));
        Ok(PortForwarder { task })
    }
}

async fn serve(listener: TcpListener, link: GuestLink, sandbox: String) {
    let mut open: JoinSet<()> = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = open.join_next() => continue,
        };
        let conn = match accepted {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::warn!(sandbox, "port forward accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.len() >= MAX_OPEN {
            tracing::warn!(
                sandbox,
                "{MAX_OPEN} port forwards are open (the most allowed); resetting a new one"
            );
            reset(conn);
            continue;
        }
        open.spawn(forward(conn, link.clone(), sandbox.clone()));
    }
}

/// Join one accepted connection to its port in the guest.
async fn forward(mut conn: TcpStream, link: GuestLink, sandbox: String) {
    let port = match original_port(&conn) {
        Ok(port) => port,
        Err(e) => {
            tracing::warn!(
                sandbox,
                "a port forward connection without its original port ({e}); resetting it"
            );
            reset(conn);
            return;
        }
    };
    let mut guest = match link.open_stream(&StreamRequest::Forward { port }).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(sandbox, port, "port forward refused: {e}");
            reset(conn);
            return;
        }
    };
    tracing::debug!(sandbox, port, "port forward open");
    match tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
        Ok((to_guest, from_guest)) => {
            tracing::debug!(sandbox, port, to_guest, from_guest, "port forward closed")
        }
        Err(e) => tracing::debug!(sandbox, port, "port forward ended: {e}"),
    }
}

/// Close `conn` with a reset (linger 0), so the peer sees an error.
fn reset(conn: TcpStream) {
    if let Ok(std) = conn.into_std() {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        if let Err(e) =
            nix::sys::socket::setsockopt(&std, nix::sys::socket::sockopt::Linger, &linger)
        {
            tracing::debug!("setting linger 0 before a reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A listener with nothing redirected to it has no NAT record: the
    /// connection is reset, and the forwarder keeps serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_without_an_original_port_is_reset() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let link = GuestLink::Hybrid {
            uds: dir.path().join("nothing.sock"),
        };
        let fw = PortForwarder::start(listener, link, "pod1").expect("start");
        for _ in 0..2 {
            let got = tokio::task::spawn_blocking(move || {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                // The reset may come before the write: the write then
                // takes the error, and a later read would see only EOF.
                c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut buf = [0u8; 16];
                c.read(&mut buf)
            })
            .await
            .expect("join");
            let e = got.expect_err("reset, not an empty stream");
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "{e}"
            );
        }
        drop(fw);
    }
}

//! Port forwarding into the guest: a `FORWARD <port>` connection on the
//! stream port is joined to TCP `port` on the guest's loopback, so the host
//! can serve CRI PortForward (containerd dials `localhost:PORT` in the pod's
//! network namespace; in a beaconbox pod that namespace is this VM's, which
//! every container of the pod shares).
//!
//! Owns connecting the loopback and copying bytes both ways. Never listens,
//! and never reaches any address but the guest's own loopback (127.0.0.1,
//! then ::1, as containerd tries them). Only the host can ask: the stream
//! port serves nobody else (`transport`).
//!
//! Bounded: at most [`ForwardLimits::max_open`] forwards at once (more are
//! refused with a reason, not queued), each connect within
//! [`ForwardLimits::connect_timeout`], and copying uses fixed buffers, so a
//! peer that stops reading stalls its own forward and nothing else.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::transport::BoxStream;

/// What forwards may hold.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// Forwards open at once.
    pub max_open: usize,
    /// How long connecting the loopback may take.
    pub connect_timeout: Duration,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            max_open: 64,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The forwards of one vminitd.
#[derive(Clone)]
pub struct Forwards {
    open: Arc<Semaphore>,
    limits: ForwardLimits,
}

/// A loopback connection made for the host, holding its slot.
pub struct Forward {
    conn: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Forwards {
    pub fn new(limits: ForwardLimits) -> Forwards {
        Forwards {
            open: Arc::new(Semaphore::new(limits.max_open)),
            limits,
        }
    }

    /// Connect loopback `port`; `Err` is the reason to send the host.
    pub async fn connect(&self, port: u16) -> Result<Forward, String> {
        let slot = self.open.clone().try_acquire_owned().map_err(|_| {
            format!(
                "{} forwards are open (the most allowed): close some first",
                self.limits.max_open
            )
        })?;
        let mut why = Vec::new();
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let addr = SocketAddr::new(ip, port);
            match tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(conn)) => return Ok(Forward { conn, _slot: slot }),
                Ok(Err(e)) => why.push(format!("{addr}: {e}")),
                Err(_) => why.push(format!(
                    "{addr}: no answer within {:?}",
                    self.limits.connect_timeout
                )),
            }
        }
        Err(format!("cannot connect {}", why.join("; ")))
    }
}

impl Forward {
    /// Copy bytes both ways until both sides are done (each direction's end
    /// is passed on as a shutdown), then close both.
    pub async fn run(mut self, mut host: BoxStream) {
        if let Err(e) = tokio::io::copy_bidirectional(&mut host, &mut self.conn).await {
            tracing::debug!("port forward ended: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn bytes_flow_both_ways_and_the_slots_are_bounded() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = server.local_addr().expect("addr").port();
        let echo = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = server.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let fw = Forwards::new(ForwardLimits {
            max_open: 1,
            ..ForwardLimits::default()
        });
        let first = fw.connect(port).await.expect("connect");
        let refused = fw.connect(port).await.err().expect("beyond the cap");
        assert!(refused.contains("1 forwards are open"), "{refused}");

        let (mut host, guest_side) = tokio::io::duplex(64);
        let run = tokio::spawn(first.run(Box::new(guest_side)));
        host.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        host.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        drop(host);
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the forward ends when the host closes")
            .expect("join");
        // Its slot is free again.
        let again = fw.connect(port).await.expect("a slot came free");
        drop(again);
        echo.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_port_is_refused_with_both_addresses() {
        // Bind and drop: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let why = Forwards::new(ForwardLimits::default())
            .connect(port)
            .await
            .err()
            .expect("nothing listens");
        assert!(why.contains(&format!("127.0.0.1:{port}")), "{why}");
        assert!(why.contains(&format!("[::1]:{port}")), "{why}");
    }
}

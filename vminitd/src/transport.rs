//! Listen addresses and the byte-stream listener for stdio and events.
//! Owns the parsing of `unix:///path` and `vsock://CID:PORT` addresses and
//! accepting connections on them; it knows nothing of what the bytes mean.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_vsock::{VsockAddr, VsockListener};

/// vsock port of the ttrpc Task API in the guest.
pub const TASK_VSOCK_PORT: u32 = 1024;
/// vsock port of the stdio and event streams in the guest.
pub const STREAM_VSOCK_PORT: u32 = 1025;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path (host tests).
    Unix(PathBuf),
    /// A vsock port; `cid` -1 (`VMADDR_CID_ANY`) in the guest.
    Vsock { cid: u32, port: u32 },
}

/// A malformed listen address.
#[derive(Debug, thiserror::Error)]
#[error("Bad listen address {addr:?}: {why}")]
pub struct AddrError {
    addr: String,
    why: &'static str,
}

impl ListenAddr {
    /// Parses `unix:///path` or `vsock://CID:PORT` (CID may be -1).
    pub fn parse(s: &str) -> Result<ListenAddr, AddrError> {
        let err = |why| AddrError {
            addr: s.to_string(),
            why,
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(err("unix path must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| err("missing :PORT"))?;
            let cid = if cid == "-1" {
                libc::VMADDR_CID_ANY
            } else {
                cid.parse().map_err(|_| err("bad CID"))?
            };
            let port = port.parse().map_err(|_| err("bad port"))?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        Err(err("expected unix:// or vsock://"))
    }

    /// The address in the form ttrpc's `Server::bind` accepts.
    pub fn to_ttrpc(&self) -> String {
        match self {
            ListenAddr::Unix(p) => format!("unix://{}", p.display()),
            ListenAddr::Vsock { cid, port } if *cid == libc::VMADDR_CID_ANY => {
                format!("vsock://-1:{port}")
            }
            ListenAddr::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
        }
    }
}

/// One accepted byte stream.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

/// A boxed accepted stream.
pub type BoxStream = Box<dyn ByteStream>;

/// Accepts byte streams on a unix or vsock address.
pub enum StreamListener {
    Unix(UnixListener),
    Vsock(VsockListener),
}

impl StreamListener {
    /// Binds the address (removing a stale unix socket file first).
    pub fn bind(addr: &ListenAddr) -> std::io::Result<StreamListener> {
        match addr {
            ListenAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(StreamListener::Unix(UnixListener::bind(p)?))
            }
            ListenAddr::Vsock { cid, port } => Ok(StreamListener::Vsock(VsockListener::bind(
                VsockAddr::new(*cid, *port),
            )?)),
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&mut self) -> std::io::Result<BoxStream> {
        match self {
            StreamListener::Unix(l) => Ok(Box::new(l.accept().await?.0)),
            StreamListener::Vsock(l) => Ok(Box::new(l.accept().await?.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///run/t.sock").expect("unix"),
            ListenAddr::Unix("/run/t.sock".into())
        );
        let v = ListenAddr::parse("vsock://-1:1024").expect("vsock");
        assert_eq!(
            v,
            ListenAddr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 1024
            }
        );
        assert_eq!(v.to_ttrpc(), "vsock://-1:1024");
        assert!(ListenAddr::parse("unix://relative").is_err());
        assert!(ListenAddr::parse("vsock://3").is_err());
        assert!(ListenAddr::parse("tcp://1.2.3.4:5").is_err());
    }
}

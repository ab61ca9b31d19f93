//! The host side of the hybrid vsock backend: the listening unix socket host
//! programs connect to (`<uds_path>`), the `CONNECT <port>\n` handshake they
//! open with, and the non-blocking connects to `<uds_path>_<port>` for
//! connections the guest initiates.
//!
//! The listener is created before the guest boots (mode 0600; a stale socket
//! file nobody listens on is replaced, anything else is refused) and its file
//! is removed when the device ends. Nothing here blocks: every socket is
//! non-blocking, and a handshake line is bounded. This module never touches
//! guest memory or connection state.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_HANDSHAKE_LINE: usize = 32;

/// Why the hybrid backend's listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("vsock socket {path:?}: another process is listening on it; stop it or pass another uds path")]
    InUse { path: PathBuf },
    #[error("vsock socket {path:?}: a file that is not a socket is in the way; remove it or pass another uds path")]
    NotASocket { path: PathBuf },
    #[error("vsock socket {path:?} cannot be created: {source}; check that its folder exists and is writable")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock socket path {path:?} is {len} bytes; unix sockets take at most 107 (with the _PORT suffix of guest-initiated connections)")]
    TooLong { path: PathBuf, len: usize },
}

/// Longest socket path we accept for `<uds_path>`, leaving room for `_4294967295`.
pub const MAX_UDS_PATH: usize = 107 - 11;

/// The listening socket at `<uds_path>`; its file is removed on drop.
#[derive(Debug)]
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so drop never removes a
    /// file someone else put there later.
    ident: Option<(u64, u64)>,
}

impl HostListener {
    /// Listen on `path` (non-blocking, mode 0600).
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        let len = path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH {
            return Err(ListenError::TooLong {
                path: path.to_path_buf(),
                len,
            });
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                tracing::info!(?path, "replacing a stale vsock socket nobody listens on");
                std::fs::remove_file(path).map_err(|source| ListenError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok(_) => {
                return Err(ListenError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(_) => {}
        }
        let create = |source| ListenError::Create {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(create)?;
        let mut me = Self {
            listener,
            path: path.to_path_buf(),
            ident: None,
        };
        let meta = std::fs::symlink_metadata(path).map_err(create)?;
        me.ident = Some((meta.dev(), meta.ino()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
        me.listener.set_nonblocking(true).map_err(create)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept one waiting connection (non-blocking); `Ok(None)` when none waits.
    pub fn accept(&self) -> std::io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        if let (Some(ident), Ok(meta)) = (self.ident, std::fs::symlink_metadata(&self.path)) {
            if (meta.dev(), meta.ino()) == ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What a host program's first bytes said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Not a whole line yet.
    Incomplete,
    /// `CONNECT <port>\n`.
    Connect(u32),
    /// Anything else, or a line that is too long.
    Garbage,
}

/// Parse the bytes a host program sent so far (pure; a fuzz target).
pub fn parse_connect_line(bytes: &[u8]) -> Handshake {
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return if bytes.len() >= MAX_HANDSHAKE_LINE {
            Handshake::Garbage
        } else {
            Handshake::Incomplete
        };
    };
    if end >= MAX_HANDSHAKE_LINE {
        return Handshake::Garbage;
    }
    let Some(line) = bytes.get(..end) else {
        return Handshake::Garbage;
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(port) = line.strip_prefix(b"CONNECT ") else {
        return Handshake::Garbage;
    };
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return Handshake::Garbage;
    }
    std::str::from_utf8(port)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map_or(Handshake::Garbage, Handshake::Connect)
}

/// A host connection still in its handshake: bytes read so far.
#[derive(Debug)]
pub struct PendingHandshake {
    pub stream: UnixStream,
    buf: [u8; MAX_HANDSHAKE_LINE],
    filled: usize,
}

impl PendingHandshake {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: [0; MAX_HANDSHAKE_LINE],
            filled: 0,
        }
    }

    /// Read what is available, byte by byte up to the newline (so no byte
    /// after the handshake line is consumed), and parse it.
    pub fn advance(&mut self) -> std::io::Result<Handshake> {
        loop {
            let Some(slot) = self.buf.get_mut(self.filled..self.filled + 1) else {
                return Ok(Handshake::Garbage);
            };
            match self.stream.read(slot) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "closed during the handshake",
                    ))
                }
                Ok(_) => {
                    self.filled += 1;
                    let so_far = self.buf.get(..self.filled).unwrap_or_default();
                    match parse_connect_line(so_far) {
                        Handshake::Incomplete => continue,
                        done => return Ok(done),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Handshake::Incomplete),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// `<uds_path>_<port>`: where connections the guest opens to `port` go.
pub fn port_socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connect to a unix socket without ever blocking: a listener whose backlog is
/// full answers `WouldBlock` (the caller refuses the guest's request).
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

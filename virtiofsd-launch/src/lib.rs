//! Spawn, supervise and reap one virtiofsd per share

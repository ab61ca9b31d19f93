//! Guest PID 1: Task API over vsock, crun driver

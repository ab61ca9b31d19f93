use super::*;
use std::os::fd::FromRawFd;

use beacon_devices::BusDevice;
use event_manager::{EventManager, SubscriberOps};

fn pipe(nonblocking_write: bool) -> (File, File) {
    let mut fds = [0i32; 2];
    let flags = libc::O_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), flags) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    if nonblocking_write {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    }
    (r, w)
}

#[test]
fn the_buffer_takes_what_fits_and_counts_the_rest() {
    let buffer = ConsoleBuffer::new(8).expect("buffer");
    let mut sink = buffer.sink();
    assert_eq!(sink.write(b"hello").expect("write"), 5);
    assert_eq!(buffer.ready.read().expect("signalled on first bytes"), 1);
    assert_eq!(sink.write(b"world!").expect("write"), 6, "never an error");
    assert!(
        buffer.ready.read().is_err(),
        "no second signal while non-empty"
    );
    assert_eq!(buffer.dropped(), 3);
    let p = lock(&buffer.pending);
    assert_eq!(p.bytes.iter().copied().collect::<Vec<_>>(), b"hellowor");
}

#[test]
fn a_reader_that_never_reads_cannot_block_the_drain() {
    let buffer = ConsoleBuffer::new(CONSOLE_BUFFER_BYTES).expect("buffer");
    let (_reader, writer) = pipe(true);
    let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().expect("epoll");
    manager.add_subscriber(Box::new(ConsoleDrain::new(
        buffer.clone(),
        ConsoleOutput::NonBlocking(writer),
    )));
    let mut sink = buffer.sink();
    // Far more than a pipe holds (64 KiB) plus the buffer.
    for _ in 0..(4 * CONSOLE_BUFFER_BYTES / 1024) {
        sink.write_all(&[b'x'; 1024]).expect("never blocks");
        manager.run_with_timeout(0).expect("turn");
    }
    assert!(buffer.dropped() > 0, "the overflow was dropped, not queued");
    // The drain is waiting for the pipe to become writable, not spinning.
    assert_eq!(manager.run_with_timeout(0).expect("turn"), 0);
}

#[test]
fn drained_output_arrives_in_order() {
    let buffer = ConsoleBuffer::new(CONSOLE_BUFFER_BYTES).expect("buffer");
    let (mut reader, writer) = pipe(true);
    let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().expect("epoll");
    manager.add_subscriber(Box::new(ConsoleDrain::new(
        buffer.clone(),
        ConsoleOutput::NonBlocking(writer),
    )));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut got = Vec::new();
    let mut sink = buffer.sink();
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut sent = 0;
    while got.len() < data.len() {
        if sent < data.len() {
            let end = (sent + 10_000).min(data.len());
            sink.write_all(&data[sent..end]).expect("write");
            sent = end;
        }
        manager.run_with_timeout(10).expect("turn");
        let mut buf = [0u8; 65536];
        match reader.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(got, data);
    assert_eq!(buffer.dropped(), 0);
}

#[test]
fn the_log_file_rotates_past_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.log");
    let mut log = RotatingLog::open(&path, 100).expect("open");
    log.write_all(&[b'a'; 60]).expect("write");
    log.write_all(&[b'b'; 60]).expect("write rotates first");
    log.write_all(&[b'c'; 30]).expect("write");
    let old = std::fs::read(dir.path().join("vm.log.1")).expect("rotated part");
    assert_eq!(old, vec![b'a'; 60]);
    let new = std::fs::read(&path).expect("current part");
    assert_eq!(new.len(), 90);
    // Reopening continues the count from the file's size.
    let mut again = RotatingLog::open(&path, 100).expect("reopen");
    again.write_all(&[b'd'; 20]).expect("write rotates");
    assert_eq!(std::fs::read(&path).expect("current").len(), 20);
    let old = std::fs::read(dir.path().join("vm.log.1")).expect("rotated again");
    assert_eq!(old.len(), 90, "the previous part is the whole last one");
}

/// Rotation happens on the device event loop, which may touch no path once
/// confined: it must work on a thread confined as the event loop is.
#[test]
fn the_log_file_rotates_on_a_confined_event_loop_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.log");
    let mut log = RotatingLog::open(&path, 100).expect("open");
    std::thread::spawn(move || {
        crate::seccomp::confine_current_thread(
            crate::seccomp::ThreadClass::Events,
            crate::seccomp::SeccompMode::Trap,
        )
        .expect("confined");
        for round in 0..5u8 {
            log.write_all(&[b'a' + round; 70])
                .expect("write (rotating)");
        }
    })
    .join()
    .expect("the confined writer");
    assert_eq!(std::fs::read(&path).expect("current"), vec![b'e'; 70]);
    let old = std::fs::read(dir.path().join("vm.log.1")).expect("previous");
    assert_eq!(old, vec![b'd'; 70]);
}

fn uart(room: &EventFd) -> SharedSerial {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    Arc::new(Mutex::new(SerialDevice::with_input_room(
        irq,
        Box::new(std::io::sink()) as ConsoleSink,
        Some(room.try_clone().expect("clone")),
    )))
}

#[test]
fn input_reaches_the_guest_in_order_without_loss_and_without_spinning() {
    let (reader, mut writer) = pipe(false);
    let room = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let serial = uart(&room);
    let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().expect("epoll");
    manager.add_subscriber(Box::new(ConsoleInput::new(reader, serial.clone(), room)));
    let fifo = lock(&serial).input_room();
    let data: Vec<u8> = (0..fifo * 5).map(|i| (i % 251) as u8).collect();
    writer.write_all(&data).expect("write");
    drop(writer);
    let mut got = Vec::new();
    let mut idle_turns = 0;
    while got.len() < data.len() {
        let served = manager.run_with_timeout(10).expect("turn");
        // The guest reads everything in its FIFO.
        let mut s = lock(&serial);
        let avail = fifo - s.input_room();
        for _ in 0..avail {
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        drop(s);
        if served == 0 && avail == 0 {
            idle_turns += 1;
            assert!(idle_turns < 100, "input stalled after {} bytes", got.len());
        }
    }
    assert_eq!(got, data);
}

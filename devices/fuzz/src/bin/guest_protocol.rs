//! Fuzz target: the line protocol between the shim and vminitd
//! (`beacon_common::guest_protocol`), what each side parses from the other:
//! the event lines vminitd sends the shim (`GuestEvent::parse`: exits and
//! OOMs, JSON), the first line of a stream connection (`StreamRequest::parse`,
//! what vminitd's stream port reads before it hands a connection to a
//! process or, for `FORWARD`, joins it to a loopback port) and the
//! vhost-vsock auth line (`VsockSecret::accepts`, the check
//! that keeps the guest's containers off vminitd's ports). Must hold: no
//! panic; every event and request that parses round-trips through its
//! `to_line`, its ids follow the id rule and its exit time is a real
//! `SystemTime`; an auth line is accepted exactly when it is the secret's own
//! line (with or without its newline); a secret file parses exactly when it is
//! 64 hex digits (and an optional newline), and then round-trips.
#![no_main]

use beacon_common::guest_protocol::{
    GuestEvent, StreamRequest, VsockSecret, MAX_EVENT_LINE, MAX_HANDSHAKE_LINE, SECRET_BYTES,
};
use beacon_common::id::valid_id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => event(rest),
        1 => request(rest),
        2 => auth(rest),
        _ => secret_file(rest),
    }
});

fn event(line: &[u8]) {
    let Ok(e) = GuestEvent::parse(line) else {
        return;
    };
    assert!(line.len() <= MAX_EVENT_LINE);
    match &e {
        GuestEvent::Exit {
            container_id,
            id,
            exited_at,
            ..
        } => {
            assert!(valid_id(container_id) && valid_id(id));
            assert!(exited_at.to_system_time().is_some());
        }
        GuestEvent::Oom { container_id } => assert!(valid_id(container_id)),
    }
    let again = e.to_line();
    assert_eq!(again.last(), Some(&b'\n'));
    assert_eq!(GuestEvent::parse(again.trim_ascii_end()), Ok(e));
}

fn request(bytes: &[u8]) {
    let Ok(line) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(r) = StreamRequest::parse(line) else {
        return;
    };
    assert!(line.len() <= MAX_HANDSHAKE_LINE);
    match &r {
        StreamRequest::Stdio {
            container, exec, ..
        } => {
            assert!(valid_id(container));
            assert!(exec.as_deref().is_none_or(valid_id));
        }
        // Port 0 is never a forward target.
        StreamRequest::Forward { port } => assert_ne!(*port, 0),
        StreamRequest::Events => {}
    }
    assert_eq!(StreamRequest::parse(&r.to_line()), Ok(r));
}

fn auth(bytes: &[u8]) {
    let (key, line) = bytes.split_at(bytes.len().min(SECRET_BYTES));
    let mut b = [0u8; SECRET_BYTES];
    b[..key.len()].copy_from_slice(key);
    let secret = VsockSecret::from_bytes(b);
    let own = secret.auth_line();
    let own = own.as_bytes();
    let expected = line == own || Some(line) == own.strip_suffix(b"\n");
    assert_eq!(secret.accepts(line), expected);
    assert!(secret.accepts(own));
}

fn secret_file(text: &[u8]) {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let well_formed = body.len() == 2 * SECRET_BYTES && body.iter().all(u8::is_ascii_hexdigit);
    match VsockSecret::parse_file(text) {
        Ok(s) => {
            assert!(well_formed);
            assert_eq!(VsockSecret::parse_file(&s.to_file()), Ok(s));
        }
        Err(_) => assert!(!well_formed),
    }
}

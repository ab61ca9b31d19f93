//! Fuzz target: what the shim decodes of vminitd's Task API replies, as its
//! ttrpc client does: a 10-byte frame header (length, stream id, type,
//! flags; frames longer than ttrpc's `MESSAGE_LENGTH_MAX` are refused before
//! anything is read), the `ttrpc.Response` in the frame (status and payload),
//! then the payload as the reply of each Task call the shim makes (Create,
//! Start, State, Wait, Pids, Stats, Connect, Delete, and the empty reply of
//! the others). Must hold: no panic or hang, and no allocation beyond what
//! the frame's bytes can carry (libFuzzer's `-rss_limit_mb` fails the run
//! otherwise); a reply that decodes re-encodes to bytes that decode to it.
#![no_main]

use containerd_shim_protos::api::{
    ConnectResponse, CreateTaskResponse, DeleteResponse, Empty, PidsResponse, StartResponse,
    StateResponse, StatsResponse, WaitResponse,
};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::ttrpc::proto::{MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX};
use containerd_shim_protos::ttrpc::{MessageHeader, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 0x80 != 0 {
        // A whole frame: header, then the Response it announces.
        let Some(head) = rest.get(..MESSAGE_HEADER_LENGTH) else {
            return;
        };
        let h = MessageHeader::from(head);
        if h.length as usize > MESSAGE_LENGTH_MAX {
            return;
        }
        let body = &rest[MESSAGE_HEADER_LENGTH..];
        let Some(body) = body.get(..h.length as usize) else {
            return;
        };
        if let Ok(r) = Response::parse_from_bytes(body) {
            round_trip(&r);
            reply(selector, &r.payload);
        }
    } else {
        reply(selector, rest);
    }
});

/// The payload as the reply `selector` names.
fn reply(selector: u8, payload: &[u8]) {
    match selector % 9 {
        0 => decode::<CreateTaskResponse>(payload),
        1 => decode::<StartResponse>(payload),
        2 => decode::<StateResponse>(payload),
        3 => decode::<WaitResponse>(payload),
        4 => decode::<PidsResponse>(payload),
        5 => decode::<StatsResponse>(payload),
        6 => decode::<ConnectResponse>(payload),
        7 => decode::<DeleteResponse>(payload),
        _ => decode::<Empty>(payload),
    }
}

fn decode<M: Message + PartialEq + std::fmt::Debug>(payload: &[u8]) {
    if let Ok(m) = M::parse_from_bytes(payload) {
        round_trip(&m);
    }
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.write_to_bytes().expect("a decoded message encodes");
    let again = M::parse_from_bytes(&bytes).expect("its encoding decodes");
    assert_eq!(&again, m);
}

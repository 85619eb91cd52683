//! Feeds arbitrary bytes to every frame decoder, as a hostile peer would.
//! `cargo fuzz run decode_frames` from `proto/`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::Frame;
use proto::control::{ControlRequest, ControlResponse};
use proto::piece::{PieceRequest, PieceResponse};

fn drain<F: Frame>(data: &[u8]) {
    let mut b = Bytes::copy_from_slice(data);
    // Decode frames back to back until the input runs out or turns invalid; a decoded
    // message must re-encode and decode to itself.
    while let Ok(Some(msg)) = F::decode(&mut b) {
        let again = msg.to_bytes().expect("a decoded message encodes");
        let mut again = again;
        assert!(F::decode(&mut again).expect("re-decodes").is_some());
    }
}

fuzz_target!(|data: &[u8]| {
    drain::<ControlRequest>(data);
    drain::<ControlResponse>(data);
    drain::<PieceRequest>(data);
    drain::<PieceResponse>(data);
});

//! Frames: a 4-byte big-endian body length, then a postcard-encoded body.
//!
//! Decoding checks the declared length against the message type's cap before it allocates
//! or waits for more bytes, then validates the decoded value (bitmap shapes, list sizes),
//! so nothing a peer sends can make a receiver allocate more than the cap or hold an
//! inconsistent message.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid message: {0}")]
pub struct ValidationError(pub &'static str);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame body is not a valid message: {0}")]
    Malformed(String),
    #[error("frame has {0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// A message type that travels in frames.
pub trait Frame: Serialize + DeserializeOwned {
    /// Largest body accepted for this type.
    const MAX_LEN: usize;

    /// Invariants serde can't express; checked after every decode.
    fn validate(&self) -> Result<(), ValidationError>;

    fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let body =
            postcard::to_allocvec(self).map_err(|e| EncodeError::Serialize(e.to_string()))?;
        if body.len() > Self::MAX_LEN {
            return Err(EncodeError::TooLarge {
                len: body.len(),
                max: Self::MAX_LEN,
            });
        }
        out.reserve(HEADER_LEN + body.len());
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
        Ok(())
    }

    fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(&mut b)?;
        Ok(b.freeze())
    }

    /// Parses the length prefix, refusing lengths over the cap. For stream readers: read
    /// [`HEADER_LEN`] bytes, call this, then read exactly that many body bytes.
    fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, DecodeError> {
        let len = u32::from_be_bytes(header) as usize;
        if len > Self::MAX_LEN {
            return Err(DecodeError::TooLarge {
                len,
                max: Self::MAX_LEN,
            });
        }
        Ok(len)
    }

    /// Decodes a body whose length came from [`Frame::body_len`].
    fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        let (msg, rest) = postcard::take_from_bytes::<Self>(body)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        msg.validate()?;
        Ok(msg)
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed;
    /// `buf` is only advanced past a complete, valid frame.
    fn decode(buf: &mut Bytes) -> Result<Option<Self>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&buf[..HEADER_LEN]);
        let len = Self::body_len(header)?;
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = Self::decode_body(&buf[HEADER_LEN..HEADER_LEN + len])?;
        buf.advance(HEADER_LEN + len);
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;
    use crate::ids::*;
    use crate::layout::*;
    use crate::piece::*;
    use proptest::prelude::*;

    fn arb_task() -> impl Strategy<Value = TaskId> {
        any::<[u8; 32]>().prop_map(TaskId::from_bytes)
    }
    fn arb_digest() -> impl Strategy<Value = Sha256Digest> {
        any::<[u8; 32]>().prop_map(Sha256Digest::from_bytes)
    }
    fn arb_host() -> impl Strategy<Value = HostId> {
        "[a-z0-9][a-z0-9.-]{0,20}".prop_map(|s| HostId::new(s).unwrap())
    }
    fn arb_set() -> impl Strategy<Value = PieceSet> {
        (0u32..300, any::<u64>()).prop_map(|(len, seed)| {
            let mut s = PieceSet::new(len);
            for i in 0..len {
                if (seed.rotate_left(i % 64) ^ u64::from(i)) & 1 == 1 {
                    s.insert(PieceIndex(i));
                }
            }
            s
        })
    }
    fn arb_records() -> impl Strategy<Value = Vec<PieceRecord>> {
        proptest::collection::vec(
            (0u32..1000, arb_digest()).prop_map(|(p, digest)| PieceRecord {
                piece: PieceIndex(p),
                digest,
            }),
            0..20,
        )
    }
    fn arb_addr() -> impl Strategy<Value = std::net::SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into())
    }
    fn arb_layout() -> impl Strategy<Value = Option<PieceLayout>> {
        proptest::option::of(
            (
                0u64..1 << 40,
                MIN_PIECE_SIZE..=MAX_PIECE_SIZE,
                any::<u32>(),
                proptest::option::of(MIN_PIECE_SIZE..=MAX_PIECE_SIZE),
            )
                .prop_filter_map("valid", |(l, s, head, tail)| match tail {
                    Some(t) => PieceLayout::with_tail(l, s, head % 4096, t).ok(),
                    None => PieceLayout::new(l, s).ok(),
                }),
        )
    }

    fn arb_request() -> impl Strategy<Value = ControlRequest> {
        prop_oneof![
            (
                arb_host(),
                any::<u64>(),
                arb_addr(),
                proptest::collection::vec(("[a-z]{1,8}", "[a-z0-9]{0,8}"), 0..4),
                any::<u32>()
            )
                .prop_map(|(host, s, peer_addr, labels, upload_slots)| {
                    ControlRequest::RegisterHost(HostInfo {
                        host,
                        session: SessionId(s),
                        peer_addr,
                        labels,
                        upload_slots,
                    })
                }),
            (arb_host(), any::<u64>(), any::<u32>()).prop_map(|(host, s, u)| {
                ControlRequest::Heartbeat {
                    host,
                    session: SessionId(s),
                    uploads_in_flight: u,
                }
            }),
            (
                arb_host(),
                arb_task(),
                "http://[a-z]{1,10}/[a-z?=&]{0,30}",
                proptest::option::of(arb_digest())
            )
                .prop_map(|(host, task, url, content_digest)| {
                    ControlRequest::RegisterPeer {
                        host,
                        task,
                        url,
                        content_digest,
                    }
                }),
            (arb_host(), arb_task(), any::<u64>(), any::<bool>()).prop_map(
                |(host, task, content_length, supports_range)| {
                    ControlRequest::ReportLayout {
                        host,
                        task,
                        content_length,
                        supports_range,
                    }
                }
            ),
            (arb_host(), arb_task(), arb_records(), 0..3u8).prop_map(|(host, task, pieces, s)| {
                ControlRequest::AnnouncePieces {
                    host,
                    task,
                    pieces,
                    source: [
                        AnnounceSource::Origin,
                        AnnounceSource::Peer,
                        AnnounceSource::Restored,
                    ][s as usize],
                }
            }),
            (arb_host(), arb_task(), arb_set(), 0..=MAX_ASSIGNMENTS).prop_map(
                |(host, task, have, max_assignments)| ControlRequest::Schedule {
                    host,
                    task,
                    busy: PieceSet::new(have.len()),
                    have,
                    max_assignments
                }
            ),
            (
                arb_host(),
                arb_task(),
                any::<u32>(),
                proptest::option::of(arb_host())
            )
                .prop_map(|(host, task, p, parent)| ControlRequest::PieceFailed {
                    host,
                    task,
                    piece: PieceIndex(p),
                    parent,
                    reason: PieceFailure::Corrupt
                }),
            (arb_host(), proptest::option::of(arb_task()))
                .prop_map(|(host, task)| ControlRequest::Leave { host, task }),
            (
                arb_host(),
                arb_task(),
                proptest::collection::vec(any::<u32>(), 0..8)
            )
                .prop_map(|(host, task, p)| ControlRequest::RenewOriginLeases {
                    host,
                    task,
                    pieces: p.into_iter().map(PieceIndex).collect(),
                }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = ControlResponse> {
        let assignment = (
            any::<u32>(),
            arb_digest(),
            proptest::collection::vec((arb_host(), arb_addr()), 1..4),
            0..3u8,
        )
            .prop_map(|(p, digest, parents, kind)| Assignment {
                piece: PieceIndex(p),
                source: match kind {
                    0 => PieceSource::Parents {
                        digest,
                        parents: parents
                            .into_iter()
                            .map(|(host, addr)| ParentRef { host, addr })
                            .collect(),
                    },
                    1 => PieceSource::Origin,
                    _ => PieceSource::OriginWhole,
                },
            });
        prop_oneof![
            Just(ControlResponse::Ack),
            (
                arb_layout(),
                any::<bool>(),
                proptest::option::of(arb_digest()),
                arb_records(),
                any::<bool>()
            )
                .prop_map(
                    |(layout, supports_range, content_digest, digests, probe)| {
                        ControlResponse::Task(TaskView {
                            layout,
                            supports_range,
                            content_digest,
                            digests,
                            probe,
                        })
                    }
                ),
            (
                arb_layout(),
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(assignment, 0..10),
                any::<u32>()
            )
                .prop_map(
                    |(layout, supports_range, probe, assignments, retry_after_ms)| {
                        ControlResponse::Schedule(ScheduleReply {
                            layout,
                            supports_range,
                            probe,
                            assignments,
                            retry_after_ms,
                        })
                    }
                ),
            ".{0,40}".prop_map(|message| ControlResponse::Error {
                code: ControlErrorCode::UnknownTask,
                message
            }),
        ]
    }

    fn round_trip<F: Frame + PartialEq + std::fmt::Debug>(msg: &F) {
        let mut bytes = msg.to_bytes().unwrap();
        // Every strict prefix asks for more bytes and consumes nothing.
        for cut in [0, 1, HEADER_LEN, bytes.len() - 1] {
            let mut prefix = bytes.slice(..cut.min(bytes.len() - 1));
            assert_eq!(F::decode(&mut prefix).unwrap(), None);
        }
        assert_eq!(F::decode(&mut bytes).unwrap().as_ref(), Some(msg));
        assert!(bytes.is_empty());
    }

    proptest! {
        #[test]
        fn control_requests_round_trip(msg in arb_request()) { round_trip(&msg); }

        #[test]
        fn control_responses_round_trip(msg in arb_response()) { round_trip(&msg); }

        #[test]
        fn piece_frames_round_trip(task in arb_task(), p in any::<u32>(), len in 0..=MAX_PIECE_SIZE, d in arb_digest()) {
            round_trip(&PieceRequest { task, piece: PieceIndex(p) });
            round_trip(&PieceResponse::Data { len, digest: d });
            round_trip(&PieceResponse::Busy);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = Bytes::from(data.clone());
            let _ = ControlRequest::decode(&mut b);
            let mut b = Bytes::from(data.clone());
            let _ = ControlResponse::decode(&mut b);
            let mut b = Bytes::from(data);
            let _ = PieceResponse::decode(&mut b);
        }
    }

    #[test]
    fn oversized_frame_refused_before_body_arrives() {
        let mut b = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            PieceRequest::decode(&mut b),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(b.len(), 4, "nothing consumed");
    }

    #[test]
    fn truncated_and_trailing_frames() {
        let req = PieceRequest {
            task: TaskId::from_bytes([7; 32]),
            piece: PieceIndex(3),
        };
        let full = req.to_bytes().unwrap();
        // Declared length shorter than the message: malformed, not a panic.
        let mut short = BytesMut::new();
        short.put_u32(5);
        short.put_slice(&full[HEADER_LEN..HEADER_LEN + 5]);
        assert!(matches!(
            PieceRequest::decode(&mut short.freeze()),
            Err(DecodeError::Malformed(_))
        ));
        // Declared length longer than the message: trailing bytes.
        let mut long = BytesMut::new();
        long.put_u32((full.len() - HEADER_LEN + 2) as u32);
        long.put_slice(&full[HEADER_LEN..]);
        long.put_slice(&[0, 0]);
        assert!(matches!(
            PieceRequest::decode(&mut long.freeze()),
            Err(DecodeError::TrailingBytes(2))
        ));
    }

    #[test]
    fn invalid_messages_are_rejected_after_decode() {
        let resp = PieceResponse::Data {
            len: MAX_PIECE_SIZE + 1,
            digest: Sha256Digest::of(b""),
        };
        // Encode bypasses validation on purpose here: a lying peer could send this.
        let body = postcard::to_allocvec(&resp).unwrap();
        let mut b = BytesMut::new();
        b.put_u32(body.len() as u32);
        b.put_slice(&body);
        assert!(matches!(
            PieceResponse::decode(&mut b.freeze()),
            Err(DecodeError::Invalid(_))
        ));
    }
}

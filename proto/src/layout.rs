//! How a task's content is cut into pieces, and sets of piece indices.
//!
//! The supernode fixes a task's layout once, from the content length, and every peer uses
//! it. The first `head_pieces` pieces are `piece_size` bytes; the rest of the content (the
//! tail) is cut into pieces of `tail_piece_size`, the last one possibly shorter. A layout
//! without a tail has `tail_piece_size == 0` and piece `i` covers bytes
//! `[i * piece_size, min((i + 1) * piece_size, len))`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::PieceIndex;

/// Smallest piece size picked automatically. A piece is relayed only once it is whole and
/// verified, so its transfer time is the swarm's per-hop delay: 4 MiB pieces left a
/// 128 MiB / 8-host swarm at 1.31 x the bound, 1 MiB at 1.11 x (bench/swarm.sh).
///
/// Smaller is not better everywhere. On 16 hosts at 100 Mbit/s (256 MiB, alternated
/// runs) 512 KiB pieces took 23.1-23.2 s against 23.2-23.4 s at 1 MiB (the last origin
/// pieces leave less for their lessees to pass on at the end), and 256 KiB 22.8-23.0 s at
/// 96-99% CPU; 128 KiB ran out of CPU (26.6-26.7 s). But on 32 hosts at 25 Mbit/s, where
/// half of each piece's copies are made from stored pieces, 512 KiB took 133.5 s against
/// 112.4 s at 1 MiB in the same session: per-piece gaps between uploads (a schedule
/// round trip, a retry after a busy parent) cost more of a smaller piece's transfer. So
/// 1 MiB stays; `min_piece_size` / `max_piece_size` in the supernode's config change it.
pub const DEFAULT_MIN_PIECE_SIZE: u32 = 1 << 20;
/// Largest piece size picked automatically: bounds the memory one in-flight piece pins.
pub const DEFAULT_MAX_PIECE_SIZE: u32 = 16 << 20;
/// Target piece count; the piece size grows (by powers of two) past it for large files.
pub const TARGET_PIECE_COUNT: u64 = 256;
/// Smallest piece size a layout may declare (tests use small pieces to get many of them).
pub const MIN_PIECE_SIZE: u32 = 16 << 10;
/// Largest piece size a layout may declare: a receiver buffers one piece per in-flight
/// request, so this bounds memory per request.
pub const MAX_PIECE_SIZE: u32 = 64 << 20;
/// Most pieces a task may have; bounds bitmaps and digest lists on the wire.
pub const MAX_PIECES: u32 = 1 << 20;

/// Default size of the pieces at the end of the content; see [`LayoutRule::tail_piece_size`].
pub const DEFAULT_TAIL_PIECE_SIZE: u32 = 256 << 10;
/// Default length of the small-piece tail; see [`LayoutRule::tail_length`].
pub const DEFAULT_TAIL_LENGTH: u64 = 16 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("piece size {0} outside {MIN_PIECE_SIZE}..={MAX_PIECE_SIZE}")]
    PieceSize(u32),
    #[error("tail piece size {tail} outside {MIN_PIECE_SIZE}..={piece_size} (the piece size)")]
    TailPieceSize { tail: u32, piece_size: u32 },
    #[error("{head_pieces} pieces of {piece_size} bytes exceed the content's {len} bytes")]
    HeadTooLong {
        len: u64,
        piece_size: u32,
        head_pieces: u32,
    },
    #[error("content of {len} bytes in pieces of {piece_size} needs more than {MAX_PIECES} pieces")]
    TooManyPieces { len: u64, piece_size: u32 },
}

/// How [`PieceLayout::choose`] cuts content of a given length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutRule {
    pub min_piece_size: u32,
    pub max_piece_size: u32,
    /// Size of the pieces the last [`Self::tail_length`] bytes are cut into; 0 for none.
    ///
    /// The origin's link is the swarm's bottleneck and its fetches run in content order,
    /// so the last pieces to leave it are the last of the file. Each lands at its lessee
    /// faster than the lessee can pass it on to every other host once fewer fetches share
    /// the origin, so the swarm's finish trails the origin's last byte by about half a
    /// piece per relay: 0.5-0.9 s at 1 MiB on 16 hosts at 100 Mbit/s (bench/swarm.sh).
    /// Small pieces everywhere shrink that debt but cost a schedule decision, a digest and
    /// an upload gap per piece all through the file (19% slower at 1/2 the size on 32 hosts
    /// at 25 Mbit/s); small pieces only at the end pay that price where it buys something.
    /// Measured there (256 MiB, alternated runs, same binaries): no tail 23.24-23.28 s,
    /// 256 KiB pieces over the last 8 MiB 22.93-22.94 s, 16 MiB 22.87-22.96 s, 32 MiB
    /// 22.98-23.12 s; 128 KiB over 16 MiB 22.92-23.13 s.
    pub tail_piece_size: u32,
    /// Bytes at the end of the content cut into tail pieces: at most 1/8 of the content,
    /// and none unless that is at least one whole piece.
    pub tail_length: u64,
}

impl Default for LayoutRule {
    fn default() -> Self {
        Self {
            min_piece_size: DEFAULT_MIN_PIECE_SIZE,
            max_piece_size: DEFAULT_MAX_PIECE_SIZE,
            tail_piece_size: DEFAULT_TAIL_PIECE_SIZE,
            tail_length: DEFAULT_TAIL_LENGTH,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceLayout {
    pub content_length: u64,
    pub piece_size: u32,
    /// Pieces of `piece_size` before the tail (0 without a tail).
    pub head_pieces: u32,
    /// Size of the pieces after the first `head_pieces`; 0 when there is no tail.
    pub tail_piece_size: u32,
}

impl PieceLayout {
    /// Picks the layout for a content length: the smallest power of two in
    /// `[min, max]` giving at most [`TARGET_PIECE_COUNT`] pieces (else `max`), then a tail
    /// of smaller pieces as the rule says.
    pub fn choose(content_length: u64, rule: &LayoutRule) -> Result<Self, LayoutError> {
        let (min, max) = (rule.min_piece_size, rule.max_piece_size);
        let mut size = min;
        while size < max && content_length.div_ceil(u64::from(size)) > TARGET_PIECE_COUNT {
            size = size.saturating_mul(2).min(max);
        }
        let span = rule.tail_length.min(content_length / 8);
        if rule.tail_piece_size == 0 || rule.tail_piece_size >= size || span < u64::from(size) {
            return Self::new(content_length, size);
        }
        let head = (content_length - span) / u64::from(size);
        Self::with_tail(
            content_length,
            size,
            u32::try_from(head).unwrap_or(u32::MAX),
            rule.tail_piece_size,
        )
    }

    /// A layout of equal pieces (the last one possibly shorter).
    pub fn new(content_length: u64, piece_size: u32) -> Result<Self, LayoutError> {
        Self::with_tail(content_length, piece_size, 0, 0)
    }

    /// `head_pieces` pieces of `piece_size`, then the rest in pieces of `tail_piece_size`
    /// (0 for none, with `head_pieces` 0).
    pub fn with_tail(
        content_length: u64,
        piece_size: u32,
        head_pieces: u32,
        tail_piece_size: u32,
    ) -> Result<Self, LayoutError> {
        let l = Self {
            content_length,
            piece_size,
            head_pieces,
            tail_piece_size,
        };
        l.validate()?;
        Ok(l)
    }

    /// Checks a layout that arrived over the wire.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&self.piece_size) {
            return Err(LayoutError::PieceSize(self.piece_size));
        }
        if self.tail_piece_size == 0 {
            // One spelling per layout, so equal layouts compare equal.
            if self.head_pieces != 0 {
                return Err(LayoutError::TailPieceSize {
                    tail: 0,
                    piece_size: self.piece_size,
                });
            }
        } else {
            if !(MIN_PIECE_SIZE..=self.piece_size).contains(&self.tail_piece_size) {
                return Err(LayoutError::TailPieceSize {
                    tail: self.tail_piece_size,
                    piece_size: self.piece_size,
                });
            }
            if self.head_bytes() > self.content_length {
                return Err(LayoutError::HeadTooLong {
                    len: self.content_length,
                    piece_size: self.piece_size,
                    head_pieces: self.head_pieces,
                });
            }
        }
        if self.count_u64() > u64::from(MAX_PIECES) {
            return Err(LayoutError::TooManyPieces {
                len: self.content_length,
                piece_size: self.piece_size,
            });
        }
        Ok(())
    }

    fn head_bytes(&self) -> u64 {
        u64::from(self.head_pieces) * u64::from(self.piece_size)
    }

    /// The layout as two runs of equal pieces: (pieces in the head, bytes in the head,
    /// size of a tail piece). Without a tail the head is everything and the tail empty,
    /// so every lookup below has one shape.
    fn runs(&self) -> (u64, u64, u64) {
        if self.tail_piece_size == 0 {
            let count = self.content_length.div_ceil(u64::from(self.piece_size));
            (count, self.content_length, u64::from(self.piece_size))
        } else {
            (
                u64::from(self.head_pieces),
                self.head_bytes(),
                u64::from(self.tail_piece_size),
            )
        }
    }

    fn count_u64(&self) -> u64 {
        let (head, head_end, tail) = self.runs();
        head + (self.content_length - head_end).div_ceil(tail)
    }

    pub fn piece_count(&self) -> u32 {
        // validate() bounds this by MAX_PIECES, so it fits.
        u32::try_from(self.count_u64()).unwrap_or(MAX_PIECES)
    }

    /// Byte offset and length of a piece, or `None` past the end.
    pub fn piece_range(&self, piece: PieceIndex) -> Option<(u64, u32)> {
        if piece.0 >= self.piece_count() {
            return None;
        }
        let (head, head_end, tail) = self.runs();
        let i = u64::from(piece.0);
        let (start, size) = if i < head {
            (i * u64::from(self.piece_size), u64::from(self.piece_size))
        } else {
            (head_end + (i - head) * tail, tail)
        };
        let len = (self.content_length - start).min(size);
        Some((start, len as u32))
    }

    /// The piece holding byte `offset`, or `None` past the end.
    pub fn piece_at(&self, offset: u64) -> Option<PieceIndex> {
        if offset >= self.content_length {
            return None;
        }
        let (head, head_end, tail) = self.runs();
        let i = if offset < head_end {
            offset / u64::from(self.piece_size)
        } else {
            head + (offset - head_end) / tail
        };
        Some(PieceIndex(i as u32))
    }

    /// Bytes in the pieces of `set` (a set for another layout counts what fits this one).
    pub fn bytes_in(&self, set: &PieceSet) -> u64 {
        set.iter()
            .filter_map(|p| self.piece_range(p))
            .map(|(_, len)| u64::from(len))
            .sum()
    }

    pub fn pieces(&self) -> impl Iterator<Item = PieceIndex> + use<> {
        (0..self.piece_count()).map(PieceIndex)
    }
}

/// A set of piece indices below a fixed length, as a bitmap (one bit a piece, so a
/// 1,048,576-piece task costs 128 KiB).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PieceSet {
    len: u32,
    #[serde(with = "serde_bytes_vec")]
    bits: Vec<u8>,
}

mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

impl std::fmt::Debug for PieceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceSet({}/{})", self.count(), self.len)
    }
}

impl PieceSet {
    pub fn new(len: u32) -> Self {
        Self {
            len,
            bits: vec![0; len.div_ceil(8) as usize],
        }
    }

    pub fn full(len: u32) -> Self {
        let mut s = Self::new(len);
        for i in 0..len {
            s.insert(PieceIndex(i));
        }
        s
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the bitmap's size matches its declared length and no bit past the end is
    /// set; a decoded set that fails this came from a buggy or lying sender.
    pub fn is_well_formed(&self) -> bool {
        self.len <= MAX_PIECES
            && self.bits.len() == self.len.div_ceil(8) as usize
            && (self.len.is_multiple_of(8)
                || self.bits.last().is_none_or(|b| b >> (self.len % 8) == 0))
    }

    pub fn insert(&mut self, i: PieceIndex) -> bool {
        if i.0 >= self.len {
            return false;
        }
        let (byte, bit) = ((i.0 / 8) as usize, i.0 % 8);
        let was = self.bits[byte] & (1 << bit) != 0;
        self.bits[byte] |= 1 << bit;
        !was
    }

    pub fn remove(&mut self, i: PieceIndex) {
        if i.0 < self.len {
            self.bits[(i.0 / 8) as usize] &= !(1 << (i.0 % 8));
        }
    }

    pub fn contains(&self, i: PieceIndex) -> bool {
        i.0 < self.len && self.bits[(i.0 / 8) as usize] & (1 << (i.0 % 8)) != 0
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = PieceIndex> + '_ {
        (0..self.len).map(PieceIndex).filter(|i| self.contains(*i))
    }

    pub fn missing(&self) -> impl Iterator<Item = PieceIndex> + '_ {
        (0..self.len).map(PieceIndex).filter(|i| !self.contains(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn untailed() -> LayoutRule {
        LayoutRule {
            tail_piece_size: 0,
            ..Default::default()
        }
    }

    #[test]
    fn piece_size_grows_with_length() {
        let l = |len| PieceLayout::choose(len, &untailed()).unwrap();
        assert_eq!(l(0).piece_count(), 0);
        assert_eq!(l(1).piece_size, 1 << 20);
        assert_eq!(l(256 * MIB).piece_count(), 256);
        assert_eq!(l(256 * MIB + 1).piece_size, 2 << 20);
        assert_eq!(l(1024 * MIB).piece_size, 4 << 20);
        assert_eq!(l(1024 * MIB + 1).piece_size, 8 << 20);
        assert_eq!(l(100 * 1024 * MIB).piece_size, 16 << 20);
    }

    #[test]
    fn boundary_sizes() {
        let ps = MIN_PIECE_SIZE as u64;
        for (len, count, last) in [
            (0, 0, None),
            (1, 1, Some(1)),
            (ps - 1, 1, Some(ps - 1)),
            (ps, 1, Some(ps)),
            (ps + 1, 2, Some(1)),
            (10 * ps, 10, Some(ps)),
        ] {
            let l = PieceLayout::new(len, MIN_PIECE_SIZE).unwrap();
            assert_eq!(l.piece_count(), count, "len {len}");
            let last_len = count
                .checked_sub(1)
                .map(|i| l.piece_range(PieceIndex(i)).unwrap().1 as u64);
            assert_eq!(last_len, last, "len {len}");
            assert_eq!(l.piece_range(PieceIndex(count)), None);
            let total: u64 = l.pieces().map(|p| l.piece_range(p).unwrap().1 as u64).sum();
            assert_eq!(total, len);
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(PieceLayout::new(10, 1).is_err());
        assert!(PieceLayout::new(u64::MAX, MIN_PIECE_SIZE).is_err());
        let m = 1 << 20;
        // Tail pieces larger than the head's, or below the minimum.
        assert!(PieceLayout::with_tail(8 * MIB, m, 4, 2 * m).is_err());
        assert!(PieceLayout::with_tail(8 * MIB, m, 4, MIN_PIECE_SIZE - 1).is_err());
        // A head longer than the content.
        assert!(PieceLayout::with_tail(8 * MIB, m, 9, m / 4).is_err());
        // No tail spelled with a head count: two spellings of one layout.
        assert!(PieceLayout::with_tail(8 * MIB, m, 4, 0).is_err());
        // Too many tail pieces.
        assert!(PieceLayout::with_tail(u64::from(MAX_PIECES) * (16 << 10), m, 0, 16 << 10).is_ok());
        assert!(
            PieceLayout::with_tail((u64::from(MAX_PIECES) * (16 << 10)) + 1, m, 0, 16 << 10)
                .is_err()
        );
    }

    #[test]
    fn the_default_cuts_the_last_16_mib_into_256_kib_pieces() {
        let l = PieceLayout::choose(256 * MIB, &LayoutRule::default()).unwrap();
        assert_eq!(
            (l.piece_size, l.head_pieces, l.tail_piece_size),
            (1 << 20, 240, 256 << 10)
        );
        assert_eq!(l.piece_count(), 240 + 64);
        assert_eq!(l.piece_range(PieceIndex(239)), Some((239 * MIB, 1 << 20)));
        assert_eq!(l.piece_range(PieceIndex(240)), Some((240 * MIB, 256 << 10)));
        assert_eq!(
            l.piece_range(PieceIndex(303)),
            Some((256 * MIB - (256 << 10), 256 << 10))
        );
        // Up to 1/8 of the content, and never less than one whole piece.
        let l = PieceLayout::choose(40 * MIB, &LayoutRule::default()).unwrap();
        assert_eq!((l.head_pieces, l.piece_count()), (35, 35 + 20));
        let l = PieceLayout::choose(7 * MIB, &LayoutRule::default()).unwrap();
        assert_eq!((l.tail_piece_size, l.piece_count()), (0, 7));
        // A tail piece no smaller than the piece size is no tail.
        let big = LayoutRule {
            min_piece_size: 256 << 10,
            ..Default::default()
        };
        assert_eq!(
            PieceLayout::choose(64 * MIB, &big).unwrap().tail_piece_size,
            0
        );
    }

    #[test]
    fn tailed_pieces_tile_the_content_and_offsets_find_them() {
        let rule = LayoutRule {
            min_piece_size: 64 << 10,
            max_piece_size: 64 << 10,
            tail_piece_size: 16 << 10,
            tail_length: 100 << 10,
        };
        for len in [0, 1, 800 << 10, (800 << 10) + 1, (1 << 20) - 7, 5 << 20] {
            let l = PieceLayout::choose(len, &rule).unwrap();
            let mut next = 0;
            for p in l.pieces() {
                let (start, n) = l.piece_range(p).unwrap();
                assert_eq!(start, next, "len {len} piece {p:?}");
                assert!(n > 0);
                assert_eq!(l.piece_at(start), Some(p));
                assert_eq!(l.piece_at(start + u64::from(n) - 1), Some(p));
                next = start + u64::from(n);
            }
            assert_eq!(next, len);
            assert_eq!(l.piece_at(len), None);
            assert_eq!(l.piece_range(PieceIndex(l.piece_count())), None);
            assert_eq!(l.bytes_in(&PieceSet::full(l.piece_count())), len);
        }
        let l = PieceLayout::choose(800 << 10, &rule).unwrap();
        assert!(l.tail_piece_size > 0 && l.head_pieces > 0);
        let mut s = PieceSet::new(l.piece_count());
        s.insert(PieceIndex(0));
        s.insert(PieceIndex(l.piece_count() - 1));
        assert_eq!(l.bytes_in(&s), (64 << 10) + (16 << 10));
    }

    #[test]
    fn piece_set_ops() {
        let mut s = PieceSet::new(10);
        assert!(s.insert(PieceIndex(3)));
        assert!(!s.insert(PieceIndex(3)));
        assert!(!s.insert(PieceIndex(10)));
        assert!(s.contains(PieceIndex(3)));
        assert_eq!(s.count(), 1);
        assert_eq!(s.missing().count(), 9);
        assert!(s.is_well_formed());
        assert!(PieceSet::full(10).is_full());
        let bad = PieceSet {
            len: 3,
            bits: vec![0xff],
        };
        assert!(!bad.is_well_formed());
    }
}

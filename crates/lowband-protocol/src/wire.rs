//! The envelope every message travels in (design.md's wire rules).
//!
//! ```text
//! offset size field
//!      0    4 magic "LBND"
//!      4    1 format version (1)
//!      5    1 kind (1 = update: site -> coordinator, 2 = global: coordinator -> site,
//!                  3 = global delta: coordinator -> site, a change to add; empty = no change,
//!                  4 = training report: site -> coordinator, see `TrainingReport`)
//!      6    2 reserved, must be 0
//!      8    8 round (u64 LE)
//!     16    4 site id (u32 LE): the sender of an update, the addressee of a global
//!               (0xFFFF_FFFF = every site: one envelope the coordinator sends to all)
//!     20    4 payload length (u32 LE)
//!     24    n payload (a codec payload)
//!   24+n    4 CRC-32 (IEEE) of bytes 0 .. 24+n
//! ```
//! Decoding checks the magic, version, kind and length against the configured limit before it
//! looks at the payload, and the checksum before it trusts any of it.

pub const MAGIC: [u8; 4] = *b"LBND";
pub const WIRE_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 24;
pub const TRAILER_BYTES: usize = 4;
/// The addressee of a global that every site receives alike: the coordinator builds (and the
/// network driver signs) its envelope once and sends the same bytes to every member.
pub const EVERY_SITE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// A site's delta for a round.
    Update = 1,
    /// The global parameters a round starts from.
    Global = 2,
    /// The change to add to the global parameters the site holds (a compressed downlink); an
    /// empty payload means no change.
    GlobalDelta = 3,
    /// What a site's training of a round measured (`TrainingReport`): telemetry for the
    /// driver's metrics, never an input of the protocol's state.
    Report = 4,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated: {len} bytes, need {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("bad magic {0:?}: not a lowband message")]
    BadMagic([u8; 4]),
    #[error("wire format version {0}; this build speaks version {WIRE_VERSION}")]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("message length {len} does not match its header ({expected})")]
    LengthMismatch { len: usize, expected: usize },
    #[error("checksum {found:08x} does not match the message's {expected:08x}")]
    BadChecksum { expected: u32, found: u32 },
    #[error("training report: {0}")]
    BadReport(String),
}

/// A site's training of one round, as it measured it: sent (kind 4) just before its update, so
/// that a networked run reports the same per-step losses and compute time as an in-memory one.
///
/// ```text
/// offset size field
///      0    8 training seconds (f64 LE, finite, >= 0)
///      8    4 steps h (u32 LE)
///     12   4h the training loss of each step (f32 LE, finite)
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingReport {
    pub seconds: f64,
    pub losses: Vec<f32>,
}

impl TrainingReport {
    pub fn encode(&self, round: u64, site: u32) -> Vec<u8> {
        let mut payload = Vec::with_capacity(12 + 4 * self.losses.len());
        payload.extend_from_slice(&self.seconds.to_le_bytes());
        payload.extend_from_slice(&(self.losses.len() as u32).to_le_bytes());
        for loss in &self.losses {
            payload.extend_from_slice(&loss.to_le_bytes());
        }
        encode(MessageKind::Report, round, site, &payload)
    }

    /// The report in a kind-4 message's payload, for a round of at most `steps_max` steps.
    pub fn decode(payload: &[u8], steps_max: usize) -> Result<TrainingReport, WireError> {
        let bad = |why: String| Err(WireError::BadReport(why));
        if payload.len() < 12 {
            return bad(format!("{} bytes, need at least 12", payload.len()));
        }
        let seconds = f64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        let steps = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as usize;
        if steps > steps_max {
            return bad(format!("{steps} steps, a round has at most {steps_max}"));
        }
        if payload.len() != 12 + 4 * steps {
            return bad(format!("{} bytes for {steps} steps", payload.len()));
        }
        if !(seconds.is_finite() && seconds >= 0.0) {
            return bad(format!("training seconds {seconds}"));
        }
        let losses: Vec<f32> = payload[12..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(loss) = losses.iter().find(|l| !l.is_finite()) {
            return bad(format!("a loss of {loss}"));
        }
        Ok(TrainingReport { seconds, losses })
    }
}

/// A decoded envelope; the payload borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: MessageKind,
    pub round: u64,
    pub site: u32,
    pub payload: &'a [u8],
}

/// Wrap `payload` in an envelope.
pub fn encode(kind: MessageKind, round: u64, site: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload over 4 GiB");
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len() + TRAILER_BYTES);
    out.extend_from_slice(&MAGIC);
    out.push(WIRE_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&round.to_le_bytes());
    out.extend_from_slice(&site.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Check and open an envelope whose payload may be at most `payload_bytes_max`.
pub fn decode(bytes: &[u8], payload_bytes_max: usize) -> Result<Message<'_>, WireError> {
    if bytes.len() < HEADER_BYTES + TRAILER_BYTES {
        return Err(WireError::Truncated {
            len: bytes.len(),
            needed: HEADER_BYTES + TRAILER_BYTES,
        });
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if bytes[4] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(bytes[4]));
    }
    let kind = match bytes[5] {
        1 => MessageKind::Update,
        2 => MessageKind::Global,
        3 => MessageKind::GlobalDelta,
        4 => MessageKind::Report,
        other => return Err(WireError::UnknownKind(other)),
    };
    if bytes[6] != 0 || bytes[7] != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let round = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let site = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes")) as usize;
    if len > payload_bytes_max {
        return Err(WireError::TooLarge {
            len: len as u64,
            max: payload_bytes_max,
        });
    }
    let expected = HEADER_BYTES + len + TRAILER_BYTES;
    if bytes.len() != expected {
        return Err(WireError::LengthMismatch {
            len: bytes.len(),
            expected,
        });
    }
    let body = &bytes[..HEADER_BYTES + len];
    let found = u32::from_le_bytes(bytes[HEADER_BYTES + len..].try_into().expect("4 bytes"));
    let expected_crc = crc32fast::hash(body);
    if found != expected_crc {
        return Err(WireError::BadChecksum {
            expected: expected_crc,
            found,
        });
    }
    Ok(Message {
        kind,
        round,
        site,
        payload: &bytes[HEADER_BYTES..HEADER_BYTES + len],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let bytes = encode(MessageKind::Update, 7, 3, b"hello");
        assert_eq!(bytes.len(), HEADER_BYTES + 5 + TRAILER_BYTES);
        let m = decode(&bytes, 100).unwrap();
        assert_eq!(
            (m.kind, m.round, m.site, m.payload),
            (MessageKind::Update, 7, 3, &b"hello"[..])
        );
    }

    #[test]
    fn every_corruption_is_a_typed_error() {
        let good = encode(MessageKind::Global, 1, 2, &[9u8; 32]);
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert!(matches!(
            decode(&good[..10], 100),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&with(0, b'X'), 100),
            Err(WireError::BadMagic(_))
        ));
        assert_eq!(
            decode(&with(4, 2), 100),
            Err(WireError::UnsupportedVersion(2))
        );
        assert_eq!(decode(&with(5, 9), 100), Err(WireError::UnknownKind(9)));
        assert_eq!(decode(&with(6, 1), 100), Err(WireError::ReservedNotZero));
        assert!(matches!(
            decode(&good, 31),
            Err(WireError::TooLarge { len: 32, max: 31 })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 1], 100),
            Err(WireError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode(&with(30, 0), 100),
            Err(WireError::BadChecksum { .. })
        ));
        let mut huge = good.clone();
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge, 100),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_training_report_round_trips_and_a_bad_one_is_refused() {
        let report = TrainingReport {
            seconds: 1.25,
            losses: vec![2.5, 2.25, 2.0],
        };
        let bytes = report.encode(4, 1);
        let m = decode(&bytes, 1 << 10).unwrap();
        assert_eq!((m.kind, m.round, m.site), (MessageKind::Report, 4, 1));
        assert_eq!(TrainingReport::decode(m.payload, 10).unwrap(), report);
        // More steps than a round has, a length that does not match, a non-finite value.
        assert!(matches!(
            TrainingReport::decode(m.payload, 2),
            Err(WireError::BadReport(_))
        ));
        assert!(matches!(
            TrainingReport::decode(&m.payload[..m.payload.len() - 1], 10),
            Err(WireError::BadReport(_))
        ));
        assert!(matches!(
            TrainingReport::decode(&m.payload[..8], 10),
            Err(WireError::BadReport(_))
        ));
        let nan = TrainingReport {
            seconds: 1.0,
            losses: vec![f32::NAN],
        }
        .encode(0, 0);
        assert!(matches!(
            TrainingReport::decode(decode(&nan, 100).unwrap().payload, 10),
            Err(WireError::BadReport(_))
        ));
        let negative = TrainingReport {
            seconds: -1.0,
            losses: vec![],
        }
        .encode(0, 0);
        assert!(matches!(
            TrainingReport::decode(decode(&negative, 100).unwrap().payload, 10),
            Err(WireError::BadReport(_))
        ));
        let mut huge = m.payload.to_vec();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            TrainingReport::decode(&huge, 10),
            Err(WireError::BadReport(_))
        ));
    }
}

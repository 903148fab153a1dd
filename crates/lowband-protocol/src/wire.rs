//! The envelope every message travels in (design.md's wire rules).
//!
//! ```text
//! offset size field
//!      0    4 magic "LBND"
//!      4    1 format version (1)
//!      5    1 kind (1 = update: site -> coordinator, 2 = global: coordinator -> site,
//!                  3 = global delta: coordinator -> site, a change to add; empty = no change,
//!                  4 = training report: site -> coordinator, see `TrainingReport`,
//!                  5 = join request: site -> coordinator, see `JoinRequest`,
//!                  6 = cue: coordinator -> site in a scheduled run, see `crate::cue`)
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
    /// A site's first message on a connection (`JoinRequest`): the run settings it was started
    /// with, which the coordinator compares with its own before it admits the site.
    Join = 5,
    /// What a site of a scheduled run (asynchronous rounds, a quorum on the emulated clock) does
    /// at its next step (`crate::cue::Cue`): the coordinator keeps the run's schedule.
    Cue = 6,
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
    #[error("join request: {0}")]
    BadJoin(String),
    #[error("cue: {0}")]
    BadCue(String),
}

/// Largest join request payload.
pub const JOIN_BYTES_MAX: usize = 64 << 10;

/// What a site says when it joins (kind 5, its first message on every connection): the settings
/// of the run it was started for, as `name = value` pairs (names sorted and unique; UTF-8, one
/// pair a line, `name\tvalue\n`). The coordinator admits it only if they equal its own, and
/// otherwise closes the connection naming every field that differs, so a site started from
/// another cluster file (another H, seed, learning rate, corpus, ...) can never be merged
/// silently.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinRequest {
    pub settings: std::collections::BTreeMap<String, String>,
}

impl JoinRequest {
    pub fn encode(&self, site: u32) -> Vec<u8> {
        let mut payload = String::new();
        for (name, value) in &self.settings {
            debug_assert!(!name.contains(['\t', '\n']) && !value.contains(['\t', '\n']));
            payload.push_str(name);
            payload.push('\t');
            payload.push_str(value);
            payload.push('\n');
        }
        encode(MessageKind::Join, 0, site, payload.as_bytes())
    }

    /// The request in a kind-5 message's payload.
    pub fn decode(payload: &[u8]) -> Result<JoinRequest, WireError> {
        let bad = |why: String| Err(WireError::BadJoin(why));
        if payload.len() > JOIN_BYTES_MAX {
            return bad(format!("{} bytes, at most {JOIN_BYTES_MAX}", payload.len()));
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return bad("not UTF-8".into());
        };
        let mut settings = std::collections::BTreeMap::new();
        for line in text.split_terminator('\n') {
            let Some((name, value)) = line.split_once('\t') else {
                return bad(format!("line {line:?} is not name<TAB>value"));
            };
            if name.is_empty()
                || settings
                    .insert(name.to_string(), value.to_string())
                    .is_some()
            {
                return bad(format!("empty or repeated name {name:?}"));
            }
        }
        Ok(JoinRequest { settings })
    }

    /// Every setting that differs between `self` (the coordinator's) and `site`'s, as
    /// `name (coordinator V, site W)`; empty when they agree.
    pub fn differences(&self, site: &JoinRequest) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(site.settings.keys()).collect();
        let shown = |v: Option<&String>| v.map_or("(none)".to_string(), |v| v.clone());
        names
            .into_iter()
            .filter(|name| self.settings.get(*name) != site.settings.get(*name))
            .map(|name| {
                format!(
                    "{name} (coordinator {}, site {})",
                    shown(self.settings.get(name)),
                    shown(site.settings.get(name))
                )
            })
            .collect()
    }
}

/// A site's training of one round, as it measured it: sent (kind 4) just before its update, so
/// that a networked run reports the same per-step losses and compute time as an in-memory one.
///
/// ```text
/// offset size field
///      0    8 training seconds (f64 LE, finite, >= 0)
///      8    4 steps h (u32 LE)
///     12   4h the training loss of each step (f32 LE, finite)
/// 12+4h    8 bytes received from the coordinator since the last report (u64 LE)
/// 20+4h    8 seconds they took, each message from its first byte to its last (f64 LE, >= 0)
/// ```
/// (The last 16 bytes may be absent: nothing said of the download.)
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingReport {
    pub seconds: f64,
    pub losses: Vec<f32>,
    /// What the site received since its last report, and the seconds it took (its download's
    /// measured rate, for the live view).
    pub received_bytes: u64,
    pub received_seconds: f64,
}

impl TrainingReport {
    pub fn encode(&self, round: u64, site: u32) -> Vec<u8> {
        let mut payload = Vec::with_capacity(12 + 4 * self.losses.len());
        payload.extend_from_slice(&self.seconds.to_le_bytes());
        payload.extend_from_slice(&(self.losses.len() as u32).to_le_bytes());
        for loss in &self.losses {
            payload.extend_from_slice(&loss.to_le_bytes());
        }
        payload.extend_from_slice(&self.received_bytes.to_le_bytes());
        payload.extend_from_slice(&self.received_seconds.to_le_bytes());
        encode(MessageKind::Report, round, site, &payload)
    }

    /// The largest payload of a report for a round of at most `steps_max` steps.
    pub fn payload_bytes_max(steps_max: usize) -> usize {
        28 + 4 * steps_max
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
        let losses_end = 12 + 4 * steps;
        if payload.len() != losses_end && payload.len() != losses_end + 16 {
            return bad(format!("{} bytes for {steps} steps", payload.len()));
        }
        if !(seconds.is_finite() && seconds >= 0.0) {
            return bad(format!("training seconds {seconds}"));
        }
        let (received_bytes, received_seconds) = match payload.get(losses_end..) {
            Some(tail) if tail.len() == 16 => (
                u64::from_le_bytes(tail[..8].try_into().expect("8 bytes")),
                f64::from_le_bytes(tail[8..].try_into().expect("8 bytes")),
            ),
            _ => (0, 0.0),
        };
        if !(received_seconds.is_finite() && received_seconds >= 0.0) {
            return bad(format!("download seconds {received_seconds}"));
        }
        let losses: Vec<f32> = payload[12..losses_end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(loss) = losses.iter().find(|l| !l.is_finite()) {
            return bad(format!("a loss of {loss}"));
        }
        Ok(TrainingReport {
            seconds,
            losses,
            received_bytes,
            received_seconds,
        })
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
    encode_with(kind, round, site, payload.len(), |out| {
        out.extend_from_slice(payload)
    })
}

/// An envelope whose payload `write` appends in place (no copy of a large payload);
/// `capacity` is the payload's expected size. Panics if the payload is over 4 GiB (the size
/// field's limit; callers bound parameter counts below it).
pub fn encode_with(
    kind: MessageKind,
    round: u64,
    site: u32,
    capacity: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + capacity + TRAILER_BYTES);
    out.extend_from_slice(&MAGIC);
    out.push(WIRE_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&round.to_le_bytes());
    out.extend_from_slice(&site.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    write(&mut out);
    let len = u32::try_from(out.len() - HEADER_BYTES).expect("payload over 4 GiB");
    out[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The kind an envelope says it is, from its header alone (nothing else checked: `decode` does
/// that): for a caller that must know what a message was after handing it on.
pub fn peek_kind(bytes: &[u8]) -> Option<MessageKind> {
    if bytes.len() < HEADER_BYTES || bytes[..4] != MAGIC || bytes[4] != WIRE_VERSION {
        return None;
    }
    match bytes[5] {
        1 => Some(MessageKind::Update),
        2 => Some(MessageKind::Global),
        3 => Some(MessageKind::GlobalDelta),
        4 => Some(MessageKind::Report),
        5 => Some(MessageKind::Join),
        6 => Some(MessageKind::Cue),
        _ => None,
    }
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
    let Some(kind) = peek_kind(bytes) else {
        return Err(WireError::UnknownKind(bytes[5]));
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
            received_bytes: 3_400_000,
            received_seconds: 0.5,
        };
        let bytes = report.encode(4, 1);
        let m = decode(&bytes, 1 << 10).unwrap();
        assert_eq!((m.kind, m.round, m.site), (MessageKind::Report, 4, 1));
        assert_eq!(TrainingReport::decode(m.payload, 10).unwrap(), report);
        // Without its last 16 bytes it says nothing of the download.
        let short = TrainingReport::decode(&m.payload[..m.payload.len() - 16], 10).unwrap();
        assert_eq!((short.losses.len(), short.received_bytes), (3, 0));
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
            ..TrainingReport::default()
        }
        .encode(0, 0);
        assert!(matches!(
            TrainingReport::decode(decode(&nan, 100).unwrap().payload, 10),
            Err(WireError::BadReport(_))
        ));
        let negative = TrainingReport {
            seconds: -1.0,
            ..TrainingReport::default()
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

    #[test]
    fn a_join_request_round_trips_and_names_what_differs() {
        let ours = JoinRequest {
            settings: [("seed", "0"), ("strategy", "diloco@10"), ("steps", "2000")]
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .into(),
        };
        let encoded = ours.encode(3);
        let m = decode(&encoded, JOIN_BYTES_MAX).unwrap();
        assert_eq!((m.kind, m.site), (MessageKind::Join, 3));
        assert_eq!(JoinRequest::decode(m.payload).unwrap(), ours);
        let mut theirs = ours.clone();
        theirs.settings.insert("strategy".into(), "diloco@5".into());
        theirs.settings.remove("seed");
        assert_eq!(
            ours.differences(&theirs),
            vec![
                "seed (coordinator 0, site (none))".to_string(),
                "strategy (coordinator diloco@10, site diloco@5)".to_string()
            ]
        );
        assert!(ours.differences(&ours).is_empty());
        let invalid: [&[u8]; 4] = [b"no tab\n", b"a\t1\na\t2\n", b"\t1\n", &[0xff, b'\t', b'1']];
        for bad in invalid {
            assert!(
                matches!(JoinRequest::decode(bad), Err(WireError::BadJoin(_))),
                "{bad:?}"
            );
        }
    }
}

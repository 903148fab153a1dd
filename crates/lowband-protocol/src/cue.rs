//! Cues: how the coordinator of a scheduled run (asynchronous rounds, or synchronous rounds
//! closed on a quorum, both on the emulated clock) tells a networked site what to do.
//!
//! In such a run the schedule (which update reaches the coordinator when, which merge a site
//! takes before which of its steps) is a function of the settings and the seed. The coordinator
//! keeps it, as the in-memory driver does, and cues each site step by step; the site trains as
//! cued, in order, and answers every step with its loss (a training report of one step) and, when
//! cued to, its update. The coordinator waits only for an update it needs next; the sites run
//! ahead on their cues, so they train in parallel. The global parameters travel as the usual
//! messages (kinds 2 and 3, counted in the ledger); a cue only says how many of those received
//! (and not yet taken) a step takes first.
//!
//! ```text
//! payload of a kind-6 message
//! offset size field
//!      0    1 what: 1 = start, 2 = step, 3 = down, 4 = take
//! start: the next global message received is where the site starts (nothing trained yet)
//! step:
//!      1    4 globals to take before the step (u32 LE), in the order received
//!      5    8 the learning rate schedule's step (u64 LE)
//!     13    8 the round to send an update for after the step (u64 LE; u64::MAX: none)
//! down:
//!      1    1 revert to: 0 = nothing, 1 = where the current update began, 2 = the round's start
//!               (what the site trained since is lost); every global received and not taken is
//!               dropped
//! take: (the globals a step would take first, when no step follows: a site that waits or has
//!        finished)
//!      1    4 globals to take (u32 LE)
//! save: (at a quiet moment of the schedule: nothing in flight, every global taken) save the
//!        site's state as the envelope's round's, and keep no other saved state but `keep`'s
//!      1    8 the round of the last save the coordinator committed (u64 LE; u64::MAX: none)
//! restore: (first, on a resumed run) continue from the state saved as the envelope's round's
//! answer: (the site's, to save or restore; the envelope carries the cue's round)
//!      1    1 1 = done, 0 = not done (no state directory, a write or a check failed: its log says)
//! ```
//!
//! A networked scheduled run is saved in two phases: the coordinator cues every site to save at
//! a quiet moment, waits for every answer, and only then writes its own state (whose atomic
//! switch is the commit point). A site keeps its new state and the last committed one, so that a
//! coordinator that dies between the two phases resumes from a save every site still holds.

use crate::wire::{self, MessageKind, WireError};

/// No update after this step (and no committed save to keep).
const NO_SEND: u64 = u64::MAX;

/// Where a site that goes down goes back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revert {
    /// Nothing to undo (it was waiting).
    Nothing,
    /// Where its current update began (an asynchronous site).
    Reference,
    /// The start of the round it was training (a synchronous site).
    RoundStart,
}

/// What a site does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cue {
    /// The next global received is the run's start.
    Start,
    /// Take `take` globals, train one step at the schedule's step `lr_step`, and send the update
    /// for round `send` after it.
    Step {
        take: u32,
        lr_step: u64,
        send: Option<u64>,
    },
    /// The site goes down (a fault of the run's schedule).
    Down(Revert),
    /// Take `take` globals; no step follows.
    Take(u32),
    /// Save the site's state as the envelope round's; keep only it and the save of round `keep`
    /// (the last one the coordinator committed).
    Save { keep: Option<u64> },
    /// Continue from the state saved as the envelope round's (a resumed run's first cue).
    Restore,
    /// A site's answer to `Save` or `Restore`: whether it did it.
    Answer(bool),
}

impl Cue {
    /// The largest payload of a cue.
    pub const PAYLOAD_BYTES_MAX: usize = 21;

    /// The cue as a kind-6 message to `site` during `round`.
    pub fn encode(&self, round: u64, site: u32) -> Vec<u8> {
        let mut payload = Vec::with_capacity(Self::PAYLOAD_BYTES_MAX);
        match *self {
            Cue::Start => payload.push(1),
            Cue::Step {
                take,
                lr_step,
                send,
            } => {
                payload.push(2);
                payload.extend_from_slice(&take.to_le_bytes());
                payload.extend_from_slice(&lr_step.to_le_bytes());
                payload.extend_from_slice(&send.unwrap_or(NO_SEND).to_le_bytes());
            }
            Cue::Down(revert) => {
                payload.push(3);
                payload.push(match revert {
                    Revert::Nothing => 0,
                    Revert::Reference => 1,
                    Revert::RoundStart => 2,
                });
            }
            Cue::Take(take) => {
                payload.push(4);
                payload.extend_from_slice(&take.to_le_bytes());
            }
            Cue::Save { keep } => {
                payload.push(5);
                payload.extend_from_slice(&keep.unwrap_or(NO_SEND).to_le_bytes());
            }
            Cue::Restore => payload.push(6),
            Cue::Answer(done) => payload.extend_from_slice(&[7, done as u8]),
        }
        wire::encode(MessageKind::Cue, round, site, &payload)
    }

    /// The cue in a kind-6 message's payload.
    pub fn decode(payload: &[u8]) -> Result<Cue, WireError> {
        let bad = |why: String| Err(WireError::BadCue(why));
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        match payload {
            [1] => Ok(Cue::Start),
            [2, ..] if payload.len() == 21 => {
                let take = u32::from_le_bytes(payload[1..5].try_into().expect("4 bytes"));
                let (lr_step, send) = (u64_at(5), u64_at(13));
                Ok(Cue::Step {
                    take,
                    lr_step,
                    send: (send != NO_SEND).then_some(send),
                })
            }
            [3, revert] => Ok(Cue::Down(match revert {
                0 => Revert::Nothing,
                1 => Revert::Reference,
                2 => Revert::RoundStart,
                other => return bad(format!("revert {other}")),
            })),
            [4, a, b, c, d] => Ok(Cue::Take(u32::from_le_bytes([*a, *b, *c, *d]))),
            [5, ..] if payload.len() == 9 => {
                let keep = u64_at(1);
                Ok(Cue::Save {
                    keep: (keep != NO_SEND).then_some(keep),
                })
            }
            [6] => Ok(Cue::Restore),
            [7, done @ (0 | 1)] => Ok(Cue::Answer(*done == 1)),
            [] => bad("empty".into()),
            [what, ..] => bad(format!("{} bytes for what {what}", payload.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cue_round_trips_and_a_bad_one_is_refused() {
        for cue in [
            Cue::Start,
            Cue::Step {
                take: 2,
                lr_step: 41,
                send: Some(7),
            },
            Cue::Step {
                take: 0,
                lr_step: 0,
                send: None,
            },
            Cue::Down(Revert::Nothing),
            Cue::Down(Revert::Reference),
            Cue::Down(Revert::RoundStart),
            Cue::Take(3),
            Cue::Save { keep: Some(4) },
            Cue::Save { keep: None },
            Cue::Restore,
            Cue::Answer(true),
            Cue::Answer(false),
        ] {
            let bytes = cue.encode(3, 1);
            let message = wire::decode(&bytes, Cue::PAYLOAD_BYTES_MAX).unwrap();
            assert_eq!(
                (message.kind, message.round, message.site),
                (MessageKind::Cue, 3, 1)
            );
            assert_eq!(Cue::decode(message.payload).unwrap(), cue);
        }
        for bad in [
            &[][..],
            &[0],
            &[1, 0],
            &[2, 0, 0],
            &[3, 3],
            &[3],
            &[4, 1],
            &[5, 0, 0],
            &[6, 0],
            &[7, 2],
            &[7],
            &[9; 21],
        ] {
            assert!(
                matches!(Cue::decode(bad), Err(WireError::BadCue(_))),
                "{bad:?}"
            );
        }
    }
}

//! A site's side of a round: adopt the global parameters, report the delta.

use lowband_codec::{Codec, Fp32};

use crate::wire::{self, MessageKind};
use crate::{ProtocolError, SiteId};

/// Inputs to a site.
#[derive(Debug, Clone, Copy)]
pub enum SiteEvent<'a> {
    /// Bytes from the coordinator.
    PacketArrived(&'a [u8]),
    /// Local training for `round` finished with these parameters.
    TrainingDone { round: u64, params: &'a [f32] },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SiteAction {
    /// Set the trainer's parameters to `Site::round_start` and run the round's inner steps.
    Train { round: u64 },
    /// Send these bytes to the coordinator.
    Send(Vec<u8>),
}

pub struct Site {
    id: SiteId,
    round: Option<u64>,
    start: Vec<f32>,
    delta: Vec<f32>,
    codec: Box<dyn Codec>,
    payload: Vec<u8>,
}

impl Site {
    pub fn new(id: SiteId, params: usize) -> Self {
        Site { id, round: None, start: vec![0.0; params], delta: vec![0.0; params], codec: Box::new(Fp32), payload: Vec::new() }
    }

    pub fn id(&self) -> SiteId {
        self.id
    }

    /// The global parameters the current round started from.
    pub fn round_start(&self) -> &[f32] {
        &self.start
    }

    pub fn round(&self) -> Option<u64> {
        self.round
    }

    pub fn handle(&mut self, event: SiteEvent) -> Result<Vec<SiteAction>, ProtocolError> {
        match event {
            SiteEvent::PacketArrived(bytes) => {
                let message = wire::decode(bytes, self.codec.payload_bytes(self.start.len()))?;
                if message.kind != MessageKind::Global {
                    return Err(ProtocolError::WrongKind(message.kind));
                }
                if message.site != self.id {
                    return Err(ProtocolError::SiteMismatch { claimed: message.site, from: self.id });
                }
                if let Some(current) = self.round {
                    if message.round < current {
                        return Err(ProtocolError::WrongRound { expected: current, found: message.round });
                    }
                }
                self.codec.decode(message.payload, &mut self.start)?;
                self.round = Some(message.round);
                Ok(vec![SiteAction::Train { round: message.round }])
            }
            SiteEvent::TrainingDone { round, params } => {
                let current = self.round.ok_or(ProtocolError::NoOpenRound)?;
                if round != current {
                    return Err(ProtocolError::WrongRound { expected: current, found: round });
                }
                assert_eq!(params.len(), self.start.len(), "trainer and protocol disagree on the parameter count");
                for ((d, s), p) in self.delta.iter_mut().zip(&self.start).zip(params) {
                    *d = s - p;
                }
                self.payload.clear();
                self.codec.encode(&self.delta, &mut self.payload);
                Ok(vec![SiteAction::Send(wire::encode(MessageKind::Update, round, self.id, &self.payload))])
            }
        }
    }
}

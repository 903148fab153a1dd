//! The coordinator's downlink with changes (a compressed downlink, or fragments): the parameters
//! as the sites hold them (θ_sites), who holds them, and the broadcast of θ − θ_sites through the
//! downlink codec with its own error feedback (what is not sent stays in θ − θ_sites).

use std::collections::BTreeSet;

use lowband_codec::{build, Codec, Fp32};
use rayon::prelude::*;

use super::{Action, CoordinatorConfig};
use crate::wire::{self, MessageKind};
use crate::{ProtocolError, SiteId};

pub(super) struct Downlink {
    codec: Box<dyn Codec>,
    /// θ_sites: θ minus what has not been sent yet (empty without changes).
    pub shared: Vec<f32>,
    /// The members that hold θ_sites.
    pub synced: BTreeSet<SiteId>,
    change: Vec<f32>,
    change_payload: Vec<u8>,
    /// θ_sites and its holders as they were before the open round's broadcast, and the codec's
    /// random state then: what a saved state records, so that a restored coordinator sends that
    /// broadcast again, byte for byte.
    pub shared_before: Vec<f32>,
    pub synced_before: BTreeSet<SiteId>,
    pub random_before: Option<u64>,
}

impl Downlink {
    pub fn new(config: &CoordinatorConfig, initial: &[f32]) -> Result<Downlink, ProtocolError> {
        let changes = config.sends_changes();
        let held = || {
            if changes {
                initial.to_vec()
            } else {
                Vec::new()
            }
        };
        Ok(Downlink {
            codec: build(&config.compression.downlink)?,
            shared: held(),
            synced: BTreeSet::new(),
            change: if changes {
                vec![0.0; config.params]
            } else {
                Vec::new()
            },
            change_payload: Vec::new(),
            shared_before: held(),
            synced_before: BTreeSet::new(),
            random_before: None,
        })
    }

    /// Continue from a saved state (lengths checked by the caller).
    pub fn restore(&mut self, shared: Vec<f32>, synced: Vec<SiteId>, random: Option<u64>) {
        debug_assert_eq!(shared.len(), self.shared.len());
        self.shared_before.clone_from(&shared);
        self.shared = shared;
        self.synced = synced.into_iter().collect();
        self.synced_before = self.synced.clone();
        if let Some(random) = random {
            self.codec.set_random_state(random);
        }
        self.random_before = random;
    }

    /// Encode θ − θ_sites over `range` (the fragment the last round changed), apply what the
    /// sites will decode to θ_sites, send it to the members that hold θ_sites and θ_sites in full
    /// to those that do not (two envelopes at most, each shared by the members it goes to).
    pub fn broadcast_change(
        &mut self,
        global: &[f32],
        range: std::ops::Range<usize>,
        round: u64,
        members: &BTreeSet<SiteId>,
        actions: &mut Vec<Action>,
    ) {
        debug_assert_eq!(self.shared.len(), global.len(), "θ_sites is held in full");
        crate::par::zip_apply(&mut self.shared_before, &self.shared, |b, s| *b = *s);
        self.synced_before.clone_from(&self.synced);
        self.random_before = self.codec.random_state();
        let change = &mut self.change[range.clone()];
        change
            .par_chunks_mut(crate::par::PIECE)
            .zip(global[range.clone()].par_chunks(crate::par::PIECE))
            .zip(self.shared[range.clone()].par_chunks(crate::par::PIECE))
            .for_each(|((change, global), shared)| {
                for ((c, g), s) in change.iter_mut().zip(global).zip(shared) {
                    *c = g - s;
                }
            });
        self.change_payload.clear();
        if change.par_iter().any(|c| *c != 0.0) {
            self.codec.encode(change, &mut self.change_payload);
            // What every synced site will add, the way it adds it (in place for a sparse codec);
            // our own encoding decodes (checked by the tests).
            let shared = &mut self.shared[range];
            let applied = match self.codec.decode_add(&self.change_payload, shared, 1.0) {
                Ok(true) => true,
                Ok(false) => {
                    let decoded = self.codec.decode(&self.change_payload, change).is_ok();
                    if decoded {
                        crate::par::zip_apply(shared, change, |s, c| *s += c);
                    }
                    decoded
                }
                Err(_) => false,
            };
            if !applied {
                self.change_payload.clear();
            }
        }
        let (mut change, mut full): (Option<bytes::Bytes>, Option<bytes::Bytes>) = (None, None);
        for &site in members {
            let bytes = if self.synced.contains(&site) {
                change
                    .get_or_insert_with(|| {
                        wire::encode(
                            MessageKind::GlobalDelta,
                            round,
                            wire::EVERY_SITE,
                            &self.change_payload,
                        )
                        .into()
                    })
                    .clone()
            } else {
                full.get_or_insert_with(|| {
                    let capacity = Fp32.payload_bytes(self.shared.len());
                    let shared = &self.shared;
                    wire::encode_with(
                        MessageKind::Global,
                        round,
                        wire::EVERY_SITE,
                        capacity,
                        |out| Fp32.encode(shared, out),
                    )
                    .into()
                })
                .clone()
            };
            actions.push(Action::Send { to: site, bytes });
        }
        self.synced.extend(members.iter().copied());
    }
}

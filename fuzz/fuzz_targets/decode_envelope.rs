//! Fuzz the envelope, the training report, the cue and a site's handling of whatever arrives:
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowband_protocol::cue::Cue;
use lowband_protocol::wire::{self, MessageKind, TrainingReport};
use lowband_protocol::{Compression, Site, SiteEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = wire::decode(data, 1 << 16) {
        if message.kind == MessageKind::Report {
            let _ = TrainingReport::decode(message.payload, 64);
        }
        if message.kind == MessageKind::Cue {
            let _ = Cue::decode(message.payload);
        }
    }
    let _ = TrainingReport::decode(data, 64);
    let _ = Cue::decode(data);
    let compression = Compression {
        uplink: "topk:k=4,chunk=64".parse().unwrap(),
        downlink: "topk:k=4,chunk=64".parse().unwrap(),
        feedback_decay: Some(1.0),
    };
    let mut site = Site::with_initial(0, vec![0.0; 300], compression).expect("valid");
    let _ = site.handle(SiteEvent::PacketArrived(data));
});

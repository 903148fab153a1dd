//! Fuzz what an untrusted site reaches first on the coordinator: its join request, then any
//! packet in an open round, under the plain mean and a robust aggregator, and the round's close.
//! Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowband_protocol::wire::{self, JoinRequest, MessageKind};
use lowband_protocol::{
    Compression, Coordinator, CoordinatorConfig, Event, OuterConfig, Robustness,
};

const PARAMS: usize = 300;

fuzz_target!(|data: &[u8]| {
    let _ = JoinRequest::decode(data);
    if let Ok(message) = wire::decode(data, wire::JOIN_BYTES_MAX) {
        if message.kind == MessageKind::Join {
            let _ = JoinRequest::decode(message.payload);
        }
    }
    for (uplink, aggregator) in [("fp32", "mean"), ("topk:k=4,chunk=64", "median"), ("int8:chunk=64", "centered-clip")] {
        let config = CoordinatorConfig {
            quorum: 1,
            compression: Compression {
                uplink: uplink.parse().expect("a codec"),
                downlink: "fp32".parse().expect("a codec"),
                feedback_decay: None,
            },
            robustness: Robustness::with(aggregator.parse().expect("an aggregator")),
            sites_start_synced: true,
            ..CoordinatorConfig::new(PARAMS, OuterConfig::DILOCO)
        };
        let mut coordinator = Coordinator::new(config, vec![0.0; PARAMS]).expect("valid");
        coordinator.handle(0, Event::SiteJoined { site: 0 });
        coordinator.handle(0, Event::SiteJoined { site: 1 });
        coordinator.start(0);
        let _ = coordinator.handle(1, Event::PacketArrived { from: 0, bytes: data });
        // Close the round on its deadline with whatever was accepted.
        let _ = coordinator.handle(u64::MAX / 2, Event::Tick);
        assert!(coordinator.global().iter().all(|p| p.is_finite()));
    }
});

//! The coordinator's side of a scheduled run: a site's messages in order, one that it did not
//! sign handed on empty (the protocol refuses it), and a silent site stopping the run after the
//! wait instead of stalling it.

use std::sync::mpsc;
use std::sync::Arc;

use lowband_net::{ClientOptions, Identity, Limits, SiteClient, Switchboard};
use lowband_protocol::wire::JoinRequest;

#[test]
fn a_site_is_heard_in_order_and_a_silent_one_stops_the_run_after_the_wait() {
    let coordinator = Arc::new(Identity::generate().unwrap());
    let site = Arc::new(Identity::generate().unwrap());
    let settings = JoinRequest {
        settings: [("run.seed".to_string(), "1".to_string())].into(),
    };
    let (address_tx, address_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let client = {
        let (site, coordinator_key, join) =
            (site.clone(), coordinator.public_key(), settings.encode(0));
        std::thread::spawn(move || {
            let address = address_rx.recv().unwrap();
            let mut client = SiteClient::connect(ClientOptions {
                identity: site,
                coordinator: (address, coordinator_key),
                limits: Limits::default(),
                reconnect_ms: 0,
                join,
                leave_on_ctrl_c: false,
            })
            .unwrap();
            for message in [b"first".to_vec(), b"second".to_vec()] {
                assert!(client.send(message).unwrap().is_none());
            }
            // Then silent until the coordinator is done.
            done_rx.recv().unwrap();
        })
    };
    let board = Switchboard::open::<lowband_net::NetError>(
        coordinator,
        &[site.public_key()],
        &settings,
        "127.0.0.1:0".parse().unwrap(),
        &Limits::default(),
        10_000,
        lowband_net::Stops::default(),
        |address| {
            address_tx.send(address).unwrap();
            Ok(())
        },
    )
    .unwrap();
    let mut board = board.with_wait_ms(300);
    assert_eq!(board.next_from(0).unwrap().packet, b"first");
    let second = board.next_from(0).unwrap();
    assert_eq!(second.packet, b"second");
    assert_eq!(
        second.sealed_bytes,
        b"second".len() + lowband_net::SIGNATURE_BYTES
    );
    let started = std::time::Instant::now();
    let error = board.next_from(0).err().unwrap().to_string();
    assert!(error.contains("sent nothing for 0.3 s"), "{error}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    board.finish();
    done_tx.send(()).unwrap();
    client.join().unwrap();
}

/// An abort from another thread ends the wait for the sites at once, with its reason (not after
/// the join timeout with "did not join").
#[test]
fn an_abort_ends_the_wait_for_sites_that_never_join() {
    let coordinator = Arc::new(Identity::generate().unwrap());
    let site = Identity::generate().unwrap();
    let settings = JoinRequest {
        settings: [("run.seed".to_string(), "1".to_string())].into(),
    };
    let abort = lowband_net::Abort::new();
    let started = std::time::Instant::now();
    let aborter = abort.clone();
    let result = Switchboard::open::<lowband_net::NetError>(
        coordinator,
        &[site.public_key()],
        &settings,
        "127.0.0.1:0".parse().unwrap(),
        &Limits::default(),
        600_000,
        lowband_net::Stops {
            on_ctrl_c: false,
            abort: Some(abort),
        },
        move |_address| {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                aborter.abort("every site process died");
            });
            Ok(())
        },
    );
    let error = result.err().expect("an aborted admission is an error");
    assert!(
        error.to_string().contains("every site process died"),
        "{error}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

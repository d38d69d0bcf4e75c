//! Fuzzes the replication link (`portkeep-ha`), which a plaintext link
//! exposes to anyone who can connect and a TLS link to the authenticated
//! peer: the frame decoder on arbitrary octets (a decoded message
//! re-encodes to a frame that decodes the same), and a backup and an
//! active fed those octets in arbitrary pieces at arbitrary times, then
//! asked for their timers, output, durable writes and (the backup) a
//! promotion. Nothing may panic; a frame error only ends the connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_ha::{Active, ActiveConfig, Backup, Message, Position};
use portkeep_server::{SubscriberKeying, Timestamp};

fuzz_target!(|data: &[u8]| {
    let keying = SubscriberKeying::default();
    // The decoder alone.
    let mut buf = data.to_vec();
    while let Ok(Some(m)) = Message::decode(&mut buf, &keying) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let again = Message::decode(&mut out, &keying).expect("own frame decodes");
        assert_eq!(again, Some(m), "re-decoded differently");
    }
    // The state machines, the input cut where each chunk's first octet
    // says, time moving by its second.
    let mut b = Backup::new(3, keying.clone());
    let mut a = Active::new(3, ActiveConfig::default(), keying);
    let mut now = Timestamp(1_000_000);
    b.connected(now);
    a.connected(now, Position { term: 3, seq: 10 }, true);
    let mut rest = data;
    let (mut b_alive, mut a_alive) = (true, true);
    while rest.len() >= 2 {
        let n = usize::from(rest[0]).min(rest.len() - 2);
        now = Timestamp(now.0 + u64::from(rest[1]) * 7);
        let chunk = &rest[2..2 + n];
        rest = &rest[2 + n..];
        if b_alive {
            b_alive = b.handle_input(now, chunk).is_ok();
            let _ = b.poll_transmit();
            for (seq, _) in b.take_unpersisted() {
                b.persisted(seq);
            }
        }
        if a_alive {
            a_alive = a.handle_input(now, chunk).is_ok();
            a.handle_timeout(now);
            let _ = a.poll_transmit();
        }
    }
    let _ = b.promote(now);
});

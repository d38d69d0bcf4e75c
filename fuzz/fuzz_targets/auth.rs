//! Fuzzes RFC 7652's codec: `PaMessage::parse` must never panic, and a
//! message it accepts encodes to bytes it reads the same; finding and
//! verifying an authentication tag in any octets (PA or common message)
//! must never panic, and a message tagged with a key verifies with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_proto::auth::{self, MacAlgorithm, PaMessage, Prf, TagKey};
use portkeep_proto::CodePoints;

fuzz_target!(|data: &[u8]| {
    let cp = CodePoints::default();
    if let Ok(m) = PaMessage::parse(data) {
        let mut out = Vec::new();
        m.encode(&mut out).expect("a parsed message encodes");
        assert_eq!(PaMessage::parse(&out), Ok(m), "re-parse differs");
    }
    let k = auth::transport_key(Prf::HmacSha256, &[7; 64], 1, 2, 3);
    let key = TagKey::new(MacAlgorithm::HmacSha256_128, &k, 3).expect("32-octet key");
    let _ = auth::common_tag(data, &cp);
    let _ = auth::verify(data, &key, &cp);
    let mut signed = data.to_vec();
    if auth::sign(&mut signed, &key, (1, 9), &cp).is_ok() {
        // The tag is the last option and the only one of its kind, unless
        // the octets already carried one.
        if auth::verify(data, &key, &cp) == Err(auth::TagError::Missing) {
            assert_eq!(auth::verify(&signed, &key, &cp), Ok(()), "own tag fails");
        }
    }
});

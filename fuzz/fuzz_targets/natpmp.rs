//! Fuzzes the NAT-PMP codec (RFC 6886): `NatPmpRequest::parse` and
//! `NatPmpReply::parse` must never panic; a request it accepts encodes to
//! the request's first octets (the reserved field zeroed) and parses back
//! to the same value; a reply it reads encodes back to something it reads
//! the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_proto::natpmp::{NatPmpReply, NatPmpRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = NatPmpRequest::parse(data) {
        let bytes = req.to_bytes();
        assert!(bytes.len() <= data.len(), "a request never grows");
        assert_eq!(NatPmpRequest::parse(&bytes), Ok(req), "re-parse differs");
    }
    if let Some(reply) = NatPmpReply::parse(data) {
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(
            NatPmpReply::parse(&out).map(|r| {
                let mut again = Vec::new();
                r.encode(&mut again);
                again
            }),
            Some(out.clone()),
            "re-encoding is stable"
        );
    }
});

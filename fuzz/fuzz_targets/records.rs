//! Fuzzes the record decoders a damaged disk feeds (`portkeep-server`'s
//! `record` module: mapping records, subscribers, THIRD_PARTY requester
//! states) and the replication item lists: nothing panics, and what
//! decodes re-encodes to bytes that decode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_ha::wire::{decode_items, encode_items};
use portkeep_server::record::{
    decode_mapping, decode_requester, decode_subscriber, encode_mapping, encode_requester,
    encode_subscriber,
};
use portkeep_server::SubscriberKeying;

fuzz_target!(|data: &[u8]| {
    let keying = SubscriberKeying::default();
    if let Some(m) = decode_mapping(data, &keying) {
        let again = decode_mapping(&encode_mapping(&m), &keying);
        assert_eq!(again, Some(m), "mapping record round trip");
    }
    if let Some(s) = decode_subscriber(data) {
        assert_eq!(decode_subscriber(&encode_subscriber(&s)), Some(s));
    }
    if let Some(r) = decode_requester(data) {
        assert_eq!(decode_requester(&encode_requester(&r)), Some(r));
    }
    if let Some(items) = decode_items(data, &keying) {
        let mut out = Vec::new();
        encode_items(&items, &mut out);
        assert_eq!(
            decode_items(&out, &keying),
            Some(items),
            "item list round trip"
        );
    }
});

//! Fuzzes `Request::parse`: it must never panic, and whatever it accepts must
//! encode to a message of the same length that parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_proto::{CodePoints, Opcode, OptionCode, Request, ResultCode};

fuzz_target!(|data: &[u8]| {
    // The default code points and a second set, so that both the GET/NEXT
    // paths and their "unknown opcode/option" counterparts get exercised.
    let alternate = CodePoints {
        get_opcode: Opcode(100),
        next_option: OptionCode(97),
        nonexist_map: ResultCode(200),
    };
    for cp in [CodePoints::default(), alternate] {
        if let Ok(msg) = Request::parse(data, &cp) {
            let bytes = msg.to_bytes(&cp).expect("a parsed message re-encodes");
            assert_eq!(bytes.len(), data.len(), "re-encoding keeps the length");
            assert_eq!(Request::parse(&bytes, &cp), Ok(msg), "re-parse differs");
        }
    }
});

//! Property tests for the codec: every valid value survives encode/parse,
//! and parsing arbitrary or damaged octets never panics and, when it
//! succeeds, yields a value that is stable under encode/parse.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::Ipv6Addr;

use portkeep_proto::{
    CodePoints, Filter, GetData, MapData, Next, NextItems, OpData, Opcode, OptionCode, PcpOption,
    PeerData, Protocol, Request, RequestHeader, Response, ResponseHeader, ResultCode,
    MAX_MESSAGE_LEN,
};
use proptest::prelude::*;

/// The defaults, and a second set so the code points really are parameters.
fn code_points() -> impl Strategy<Value = CodePoints> {
    prop_oneof![
        Just(CodePoints::default()),
        Just(CodePoints {
            get_opcode: Opcode(100),
            next_option: OptionCode(97),
            nonexist_map: ResultCode(200),
        }),
    ]
}

fn ip() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_ipv6_mapped()),
        Just(Ipv6Addr::UNSPECIFIED),
    ]
}

/// Option codes the codec interprets (so `Unknown` must avoid them).
fn is_known_option(code: u8, cp: &CodePoints) -> bool {
    matches!(code, 1 | 2 | 3 | 128 | 192) || code == cp.next_option.0
}

/// Any option except NEXT (which may not nest).
fn flat_option(cp: CodePoints) -> impl Strategy<Value = PcpOption> {
    prop_oneof![
        ip().prop_map(PcpOption::ThirdParty),
        Just(PcpOption::PreferFailure),
        (any::<u8>(), any::<u16>(), ip()).prop_map(|(prefix_len, remote_port, remote_ip)| {
            PcpOption::Filter(Filter {
                prefix_len,
                remote_port,
                remote_ip,
            })
        }),
        ".{0,24}".prop_map(PcpOption::Description),
        Just(PcpOption::CheckpointRequired),
        (
            any::<u8>().prop_filter("unknown code", move |c| !is_known_option(*c, &cp)),
            proptest::collection::vec(any::<u8>(), 0..24),
        )
            .prop_map(|(code, data)| PcpOption::Unknown {
                code: OptionCode(code),
                data,
            }),
    ]
}

fn next(items: impl Strategy<Value = NextItems>) -> impl Strategy<Value = PcpOption> {
    (
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()),
        (ip(), ip(), any::<u32>(), any::<u16>(), any::<u16>()),
        items,
    )
        .prop_map(
            |(
                (protocol, internal_af, external_af, more_end),
                (internal_ip, external_ip, lifetime, internal_port, external_port),
                items,
            )| {
                PcpOption::Next(Next {
                    protocol: Protocol(protocol),
                    internal_af,
                    external_af,
                    more_end,
                    internal_ip,
                    external_ip,
                    lifetime,
                    internal_port,
                    external_port,
                    items,
                })
            },
        )
}

fn request_option(cp: CodePoints) -> impl Strategy<Value = PcpOption> {
    let codes = proptest::collection::vec(any::<u8>().prop_map(OptionCode), 0..10)
        .prop_map(NextItems::Codes);
    prop_oneof![4 => flat_option(cp), 1 => next(codes)]
}

fn response_option(cp: CodePoints) -> impl Strategy<Value = PcpOption> {
    let embedded = proptest::collection::vec(flat_option(cp), 0..4).prop_map(NextItems::Options);
    prop_oneof![3 => flat_option(cp), 2 => next(embedded)]
}

fn map_data() -> impl Strategy<Value = MapData> {
    (
        any::<[u8; 12]>(),
        any::<u8>(),
        any::<u16>(),
        any::<u16>(),
        ip(),
    )
        .prop_map(
            |(nonce, protocol, internal_port, external_port, external_ip)| MapData {
                nonce,
                protocol: Protocol(protocol),
                internal_port,
                external_port,
                external_ip,
            },
        )
}

/// 4-aligned payloads: a message is a multiple of 4 octets (RFC 6887 section 7).
fn payload(max_words: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<[u8; 4]>(), 0..max_words)
        .prop_map(|w| w.into_iter().flatten().collect())
}

fn op_data(cp: CodePoints) -> impl Strategy<Value = OpData> {
    let known = move |op: &u8| matches!(*op, 0..=2) || *op == cp.get_opcode.0;
    prop_oneof![
        Just(OpData::Announce),
        map_data().prop_map(OpData::Map),
        (map_data(), any::<u16>(), ip()).prop_map(|(map, remote_port, remote_ip)| {
            OpData::Peer(PeerData {
                map,
                remote_port,
                remote_ip,
            })
        }),
        (
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            ip(),
            ip(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(
                |(protocol, internal_af, external_af, internal_ip, external_ip, ip_, ep)| {
                    OpData::Get(GetData {
                        protocol: Protocol(protocol),
                        internal_af,
                        external_af,
                        internal_ip,
                        external_ip,
                        internal_port: ip_,
                        external_port: ep,
                    })
                }
            ),
        // The opcode is 7 bits on the wire.
        (
            (0u8..128).prop_filter("unknown opcode", move |op| !known(op)),
            payload(16)
        )
            .prop_map(|(op, payload)| OpData::Opaque {
                opcode: Opcode(op),
                payload,
            }),
    ]
}

fn fits(bytes: Result<Vec<u8>, portkeep_proto::EncodeError>) -> bool {
    bytes.is_ok_and(|b| b.len() <= MAX_MESSAGE_LEN)
}

fn request() -> impl Strategy<Value = (CodePoints, Request)> {
    code_points()
        .prop_flat_map(|cp| {
            (
                Just(cp),
                (any::<u32>(), ip()),
                op_data(cp),
                proptest::collection::vec(request_option(cp), 0..6),
            )
        })
        .prop_map(|(cp, (lifetime, client_ip), data, options)| {
            // An opaque body swallows everything after the header.
            let options = if matches!(data, OpData::Opaque { .. }) {
                Vec::new()
            } else {
                options
            };
            (
                cp,
                Request {
                    header: RequestHeader {
                        lifetime,
                        client_ip,
                    },
                    data,
                    options,
                },
            )
        })
        .prop_filter("fits in 1100 octets", |(cp, r)| fits(r.to_bytes(cp)))
}

fn response() -> impl Strategy<Value = (CodePoints, Response)> {
    code_points()
        .prop_flat_map(|cp| {
            // An error response that copied a request too short for its
            // opcode: a known opcode with an opaque, short body.
            // Body sizes in 32-bit words: MAP 9, PEER 14, GET 10.
            let short_copy = prop_oneof![
                Just((Opcode::MAP, 9usize)),
                Just((Opcode::PEER, 14)),
                Just((cp.get_opcode, 10))
            ]
            .prop_flat_map(|(opcode, words)| {
                payload(words).prop_map(move |payload| OpData::Opaque { opcode, payload })
            });
            (
                Just(cp),
                (any::<u8>(), any::<u32>(), any::<u32>()),
                prop_oneof![4 => op_data(cp), 1 => short_copy],
                proptest::collection::vec(response_option(cp), 0..6),
            )
        })
        .prop_map(|(cp, (result, lifetime, epoch), data, options)| {
            let short_copy = matches!(&data, OpData::Opaque { opcode, .. }
                if *opcode == Opcode::MAP || *opcode == Opcode::PEER || *opcode == cp.get_opcode);
            let options = if matches!(data, OpData::Opaque { .. }) {
                Vec::new()
            } else {
                options
            };
            // Only error responses may be short copies.
            let result = if short_copy && result == 0 { 1 } else { result };
            (
                cp,
                Response {
                    header: ResponseHeader {
                        result: ResultCode(result),
                        lifetime,
                        epoch,
                    },
                    data,
                    options,
                },
            )
        })
        .prop_filter("fits in 1100 octets", |(cp, r)| fits(r.to_bytes(cp)))
}

/// Parses `bytes` both ways; when a parse succeeds, its encoding must parse
/// back to the same value (and have the same length).
fn parse_is_stable(bytes: &[u8], cp: &CodePoints) {
    if let Ok(r) = Request::parse(bytes, cp) {
        let again = r.to_bytes(cp).unwrap();
        assert_eq!(again.len(), bytes.len());
        assert_eq!(Request::parse(&again, cp), Ok(r));
    }
    if let Ok(r) = Response::parse(bytes, cp) {
        let again = r.to_bytes(cp).unwrap();
        assert_eq!(again.len(), bytes.len());
        assert_eq!(Response::parse(&again, cp), Ok(r));
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(prop::sample::Index, u8),
    SetByte(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..12).prop_map(Mutation::Extend),
    ]
}

fn mutate(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        match m {
            Mutation::FlipBit(i, b) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] ^= 1 << b;
            }
            Mutation::SetByte(i, v) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = *v;
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::Extend(e) => bytes.extend_from_slice(e),
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn request_round_trips((cp, req) in request()) {
        let bytes = req.to_bytes(&cp).unwrap();
        prop_assert_eq!(bytes.len() % 4, 0);
        prop_assert_eq!(bytes[0], 2);
        prop_assert_eq!(bytes[1] & 0x80, 0);
        prop_assert_eq!(Request::parse(&bytes, &cp), Ok(req));
        // A request is never mistaken for a response.
        prop_assert!(Response::parse(&bytes, &cp).is_err());
    }

    #[test]
    fn response_round_trips((cp, rsp) in response()) {
        let bytes = rsp.to_bytes(&cp).unwrap();
        prop_assert_eq!(bytes.len() % 4, 0);
        prop_assert_eq!(bytes[1] & 0x80, 0x80);
        prop_assert_eq!(&bytes[12..24], &[0u8; 12][..], "reserved 96 bits are zero");
        prop_assert_eq!(Response::parse(&bytes, &cp), Ok(rsp));
        prop_assert!(Request::parse(&bytes, &cp).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        cp in code_points(),
        bytes in proptest::collection::vec(any::<u8>(), 0..1200),
    ) {
        parse_is_stable(&bytes, &cp);
    }

    /// Random octets behind a plausible header, so parsing gets past the
    /// version and length checks into bodies and options.
    #[test]
    fn plausible_bytes_never_panic(
        cp in code_points(),
        r in any::<bool>(),
        opcode in prop_oneof![0u8..4, Just(96), Just(100), 0u8..128],
        words in proptest::collection::vec(
            prop_oneof![
                any::<[u8; 4]>(),
                // Option headers with small lengths, which frame more often.
                (prop_oneof![Just(1u8), Just(2), Just(3), Just(96), Just(97), Just(128), Just(192), any::<u8>()], 0u16..64)
                    .prop_map(|(c, l)| { let l = l.to_be_bytes(); [c, 0, l[0], l[1]] }),
            ],
            6..80,
        ),
    ) {
        let mut bytes: Vec<u8> = words.into_iter().flatten().collect();
        bytes[0] = 2;
        bytes[1] = opcode | if r { 0x80 } else { 0 };
        parse_is_stable(&bytes, &cp);
    }

    #[test]
    fn mutated_requests_never_panic(
        (cp, req) in request(),
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(req.to_bytes(&cp).unwrap(), &muts);
        parse_is_stable(&bytes, &cp);
    }

    #[test]
    fn mutated_responses_never_panic(
        (cp, rsp) in response(),
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(rsp.to_bytes(&cp).unwrap(), &muts);
        parse_is_stable(&bytes, &cp);
    }
}

mod rfc7652 {
    //! RFC 7652's PA messages and tags.
    use super::*;
    use portkeep_proto::auth::{self, MacAlgorithm, PaMessage, PaOption, Prf, TagKey};

    /// PRF and MAC_ALGORITHM options (which may repeat), then at most one
    /// EAP_PAYLOAD.
    fn pa_options() -> impl Strategy<Value = Vec<PaOption>> {
        (
            proptest::collection::vec(any::<u32>(), 0..3),
            proptest::collection::vec(any::<u32>(), 0..3),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        )
            .prop_map(|(prfs, macs, eap)| {
                let mut v: Vec<PaOption> = prfs.into_iter().map(PaOption::Prf).collect();
                v.extend(macs.into_iter().map(PaOption::MacAlgorithm));
                v.extend(eap.map(PaOption::EapPayload));
                v
            })
    }

    fn pa_message() -> impl Strategy<Value = PaMessage> {
        (
            any::<bool>(),
            any::<u8>(),
            any::<u32>(),
            ip(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            pa_options(),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(
                    response,
                    result,
                    epoch,
                    client_ip,
                    session_id,
                    seq,
                    nonce,
                    mut options,
                    life,
                )| {
                    if let Some(n) = nonce {
                        options.insert(0, PaOption::Nonce(n));
                    }
                    if let (true, Some(l)) = (response, life) {
                        options.push(PaOption::SessionLifetime(l));
                    }
                    PaMessage {
                        response,
                        result: ResultCode(result),
                        lifetime: 0,
                        epoch: if response { epoch } else { 0 },
                        client_ip: if response {
                            Ipv6Addr::UNSPECIFIED
                        } else {
                            client_ip
                        },
                        session_id,
                        seq,
                        options,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn rfc7652_s5_pa_messages_round_trip_and_tags_verify(m in pa_message(), msk in proptest::collection::vec(any::<u8>(), 16..80)) {
            let mut out = Vec::new();
            prop_assert!(m.encode(&mut out).is_ok());
            prop_assert_eq!(PaMessage::parse(&out), Ok(m));
            let cp = CodePoints::default();
            let k = auth::transport_key(Prf::HmacSha256, &msk, 1, 2, 3);
            let key = TagKey::new(MacAlgorithm::HmacSha256_128, &k, 3).unwrap();
            if auth::sign(&mut out, &key, (0, 0), &cp).is_ok() {
                prop_assert_eq!(auth::verify(&out, &key, &cp), Ok(()));
                prop_assert!(PaMessage::parse(&out).is_ok());
            }
        }

        #[test]
        fn rfc7652_s5_damaged_pa_messages_never_panic(
            m in pa_message(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<usize>(),
        ) {
            let mut out = Vec::new();
            prop_assert!(m.encode(&mut out).is_ok());
            let i = at % out.len();
            out[i] = byte;
            out.truncate(cut % (out.len() + 1));
            if let Ok(again) = PaMessage::parse(&out) {
                let mut re = Vec::new();
                prop_assert!(again.encode(&mut re).is_ok());
                prop_assert_eq!(PaMessage::parse(&re), Ok(again));
            }
            let cp = CodePoints::default();
            let _ = auth::common_tag(&out, &cp);
        }
    }
}

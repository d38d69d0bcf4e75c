//! PCP authentication (RFC 7652): the AUTHENTICATION opcode's messages
//! ("PA messages", section 5.1), their options (sections 5.3 to 5.11), the
//! transport key (section 4) and the authentication tags every message of
//! a session carries (sections 6.1 and 6.2).
//!
//! Like the rest of the crate this does no I/O and keeps no session: which
//! sequence numbers a session accepts, when it re-authenticates and what a
//! server answers without one are the business of the server and client
//! that hold the session.
//!
//! Where RFC 7652 leaves a choice open, the reading taken here is the one
//! in `AUTH.md` of the project's specification notes: 4-octet session id,
//! nonce and key id encoded big-endian in the key derivation, and
//! Option-Length of a tag option counting every field after the option
//! header.

use std::net::Ipv6Addr;

use ring::hmac;

use crate::options::ip_at;
use crate::{
    CodePoints, EncodeError, Opcode, OptionCode, ParseError, ResultCode, HEADER_LEN,
    MAX_MESSAGE_LEN, VERSION,
};

/// Length of a PA message without options: the common header and the
/// opcode's Session ID and Sequence Number (RFC 7652 section 5.1).
pub const PA_FIXED_LEN: usize = HEADER_LEN + 8;

/// The label of the transport key derivation (RFC 7652 section 4): the
/// eight ASCII octets "IETF PCP", no terminator.
const KEY_LABEL: &[u8; 8] = b"IETF PCP";

/// A pseudo-random function of the key derivation (RFC 7652 section 5.7:
/// IKEv2 Transform Type 2, RFC 4868 section 4). HMAC-SHA-256 is the one
/// every implementation must support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prf {
    /// PRF_HMAC_SHA2_256 (5).
    HmacSha256,
    /// PRF_HMAC_SHA2_384 (6).
    HmacSha384,
    /// PRF_HMAC_SHA2_512 (7).
    HmacSha512,
}

impl Prf {
    /// Its IKEv2 transform id, as the PRF option carries it.
    pub fn id(self) -> u32 {
        match self {
            Prf::HmacSha256 => 5,
            Prf::HmacSha384 => 6,
            Prf::HmacSha512 => 7,
        }
    }

    /// The function with transform id `id`, if this codec has it.
    pub fn from_id(id: u32) -> Option<Prf> {
        match id {
            5 => Some(Prf::HmacSha256),
            6 => Some(Prf::HmacSha384),
            7 => Some(Prf::HmacSha512),
            _ => None,
        }
    }

    fn algorithm(self) -> hmac::Algorithm {
        match self {
            Prf::HmacSha256 => hmac::HMAC_SHA256,
            Prf::HmacSha384 => hmac::HMAC_SHA384,
            Prf::HmacSha512 => hmac::HMAC_SHA512,
        }
    }
}

/// A MAC algorithm of the authentication tags (RFC 7652 section 5.8:
/// IKEv2 Transform Type 3, RFC 4868 section 2). HMAC-SHA-256-128 is the
/// one every implementation must support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacAlgorithm {
    /// AUTH_HMAC_SHA2_256_128 (12).
    HmacSha256_128,
    /// AUTH_HMAC_SHA2_384_192 (13).
    HmacSha384_192,
    /// AUTH_HMAC_SHA2_512_256 (14).
    HmacSha512_256,
}

impl MacAlgorithm {
    /// Its IKEv2 transform id, as the MAC_ALGORITHM option carries it.
    pub fn id(self) -> u32 {
        match self {
            MacAlgorithm::HmacSha256_128 => 12,
            MacAlgorithm::HmacSha384_192 => 13,
            MacAlgorithm::HmacSha512_256 => 14,
        }
    }

    /// The algorithm with transform id `id`, if this codec has it.
    pub fn from_id(id: u32) -> Option<MacAlgorithm> {
        match id {
            12 => Some(MacAlgorithm::HmacSha256_128),
            13 => Some(MacAlgorithm::HmacSha384_192),
            14 => Some(MacAlgorithm::HmacSha512_256),
            _ => None,
        }
    }

    /// Octets of Authentication Data: the HMAC output truncated to half
    /// (RFC 4868 section 2.3).
    pub fn tag_len(self) -> usize {
        match self {
            MacAlgorithm::HmacSha256_128 => 16,
            MacAlgorithm::HmacSha384_192 => 24,
            MacAlgorithm::HmacSha512_256 => 32,
        }
    }

    /// Octets of its key: the hash's output length (RFC 4868 section
    /// 2.1.1).
    pub fn key_len(self) -> usize {
        self.tag_len() * 2
    }

    /// The PRF whose single output is exactly this algorithm's key, the
    /// only pairings offered (RFC 7652 does not say how to stretch a
    /// shorter output).
    pub fn matching_prf(self) -> Prf {
        match self {
            MacAlgorithm::HmacSha256_128 => Prf::HmacSha256,
            MacAlgorithm::HmacSha384_192 => Prf::HmacSha384,
            MacAlgorithm::HmacSha512_256 => Prf::HmacSha512,
        }
    }

    fn algorithm(self) -> hmac::Algorithm {
        self.matching_prf().algorithm()
    }
}

/// `prf(MSK, "IETF PCP" || Session ID || Nonce || Key ID)`, the key of a
/// session's tags (RFC 7652 section 4): one PRF output, the MSK as the
/// HMAC key whatever its length (RFC 4868 section 2.4).
pub fn transport_key(prf: Prf, msk: &[u8], session_id: u32, nonce: u32, key_id: u32) -> Vec<u8> {
    let key = hmac::Key::new(prf.algorithm(), msk);
    let mut input = Vec::with_capacity(20);
    input.extend_from_slice(KEY_LABEL);
    input.extend_from_slice(&session_id.to_be_bytes());
    input.extend_from_slice(&nonce.to_be_bytes());
    input.extend_from_slice(&key_id.to_be_bytes());
    hmac::sign(&key, &input).as_ref().to_vec()
}

/// A transport key ready to tag and verify messages.
#[derive(Clone)]
pub struct TagKey {
    mac: MacAlgorithm,
    key: hmac::Key,
    key_id: u32,
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("TagKey")
            .field("mac", &self.mac)
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl TagKey {
    /// The key `key` (a [`transport_key`]) with id `key_id`, for `mac`.
    /// `None` if the key is not the algorithm's key length.
    pub fn new(mac: MacAlgorithm, key: &[u8], key_id: u32) -> Option<TagKey> {
        (key.len() == mac.key_len()).then(|| TagKey {
            mac,
            key: hmac::Key::new(mac.algorithm(), key),
            key_id,
        })
    }

    /// The key's id, as tags carry it.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The MAC algorithm.
    pub fn mac(&self) -> MacAlgorithm {
        self.mac
    }

    fn compute(&self, zeroed: &[u8]) -> Vec<u8> {
        let full = hmac::sign(&self.key, zeroed);
        full.as_ref()[..self.mac.tag_len()].to_vec()
    }
}

/// An option of a PA message (RFC 7652 sections 5.3 to 5.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaOption {
    /// NONCE (section 5.3): the client's random value, echoed by the server.
    Nonce(u32),
    /// PA_AUTHENTICATION_TAG (section 5.5): the key id and the MAC.
    PaAuthenticationTag {
        /// The transport key's id (zero: the MSK itself).
        key_id: u32,
        /// The MAC output.
        data: Vec<u8>,
    },
    /// EAP_PAYLOAD (section 5.6): one EAP packet.
    EapPayload(Vec<u8>),
    /// PSEUDO_RANDOM_FUNCTION (section 5.7): an IKEv2 PRF transform id.
    Prf(u32),
    /// MAC_ALGORITHM (section 5.8): an IKEv2 integrity transform id.
    MacAlgorithm(u32),
    /// SESSION_LIFETIME (section 5.9), in seconds; responses only.
    SessionLifetime(u32),
    /// RECEIVED_PAK (section 5.10): the sequence number of the PA message
    /// being acknowledged.
    ReceivedPak(u32),
    /// ID_INDICATOR (section 5.11): which credentials to use; responses
    /// only.
    IdIndicator(String),
    /// Any other option, kept as it came.
    Unknown {
        /// Its code.
        code: OptionCode,
        /// Its data without padding.
        data: Vec<u8>,
    },
}

impl PaOption {
    fn code(&self) -> OptionCode {
        match self {
            PaOption::Nonce(_) => OptionCode::NONCE,
            PaOption::PaAuthenticationTag { .. } => OptionCode::PA_AUTHENTICATION_TAG,
            PaOption::EapPayload(_) => OptionCode::EAP_PAYLOAD,
            PaOption::Prf(_) => OptionCode::PSEUDO_RANDOM_FUNCTION,
            PaOption::MacAlgorithm(_) => OptionCode::MAC_ALGORITHM,
            PaOption::SessionLifetime(_) => OptionCode::SESSION_LIFETIME,
            PaOption::ReceivedPak(_) => OptionCode::RECEIVED_PAK,
            PaOption::IdIndicator(_) => OptionCode::ID_INDICATOR,
            PaOption::Unknown { code, .. } => *code,
        }
    }

    fn data(&self) -> Vec<u8> {
        match self {
            PaOption::Nonce(v)
            | PaOption::Prf(v)
            | PaOption::MacAlgorithm(v)
            | PaOption::SessionLifetime(v)
            | PaOption::ReceivedPak(v) => v.to_be_bytes().to_vec(),
            PaOption::PaAuthenticationTag { key_id, data } => {
                let mut v = key_id.to_be_bytes().to_vec();
                v.extend_from_slice(data);
                v
            }
            PaOption::EapPayload(d) | PaOption::Unknown { data: d, .. } => d.clone(),
            PaOption::IdIndicator(s) => s.as_bytes().to_vec(),
        }
    }

    fn parse(code: OptionCode, data: &[u8], response: bool) -> Result<PaOption, ParseError> {
        let malformed = |reason| ParseError::MalformedOption { code, reason };
        let word = || -> Result<u32, ParseError> {
            <[u8; 4]>::try_from(data)
                .map(u32::from_be_bytes)
                .map_err(|_| malformed("option length does not match its definition"))
        };
        Ok(match code {
            OptionCode::NONCE => PaOption::Nonce(word()?),
            OptionCode::PA_AUTHENTICATION_TAG => {
                if data.len() < 4 {
                    return Err(malformed("PA_AUTHENTICATION_TAG shorter than its key id"));
                }
                PaOption::PaAuthenticationTag {
                    key_id: u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                    data: data[4..].to_vec(),
                }
            }
            OptionCode::EAP_PAYLOAD => PaOption::EapPayload(data.to_vec()),
            OptionCode::PSEUDO_RANDOM_FUNCTION => PaOption::Prf(word()?),
            OptionCode::MAC_ALGORITHM => PaOption::MacAlgorithm(word()?),
            OptionCode::SESSION_LIFETIME if !response => {
                return Err(malformed(
                    "SESSION_LIFETIME in a request (RFC 7652 section 5.9)",
                ))
            }
            OptionCode::SESSION_LIFETIME => PaOption::SessionLifetime(word()?),
            OptionCode::RECEIVED_PAK => PaOption::ReceivedPak(word()?),
            OptionCode::ID_INDICATOR if !response => {
                return Err(malformed(
                    "ID_INDICATOR in a request (RFC 7652 section 5.11)",
                ))
            }
            OptionCode::ID_INDICATOR => match std::str::from_utf8(data) {
                Ok(s) => PaOption::IdIndicator(s.to_owned()),
                Err(_) => return Err(malformed("ID_INDICATOR is not UTF-8")),
            },
            _ => PaOption::Unknown {
                code,
                data: data.to_vec(),
            },
        })
    }
}

/// A PA message (RFC 7652 section 5.1): a PCP request ("PA-Client") or
/// response ("PA-Server") with opcode AUTHENTICATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaMessage {
    /// A PA-Server message (R bit set) rather than a PA-Client one.
    pub response: bool,
    /// The result code: in a PA-Client message the octet RFC 7652 takes
    /// from the request header's reserved field.
    pub result: ResultCode,
    /// The lifetime field: zero when sent, ignored when received.
    pub lifetime: u32,
    /// PA-Server: the server's epoch (RFC 6887 section 8.5).
    pub epoch: u32,
    /// PA-Client: the client's address (IPv4-mapped for IPv4).
    pub client_ip: Ipv6Addr,
    /// The session (zero in a PA-Initiation).
    pub session_id: u32,
    /// The sender's PA sequence number (RFC 7652 section 5.2).
    pub seq: u32,
    /// The options, in order.
    pub options: Vec<PaOption>,
}

/// The options of which a PA message may carry one at most (RFC 7652
/// sections 5.3 to 5.11; PRF and MAC_ALGORITHM may repeat).
const AT_MOST_ONCE: [OptionCode; 7] = [
    OptionCode::NONCE,
    OptionCode::PA_AUTHENTICATION_TAG,
    OptionCode::EAP_PAYLOAD,
    OptionCode::SESSION_LIFETIME,
    OptionCode::RECEIVED_PAK,
    OptionCode::ID_INDICATOR,
    OptionCode::AUTHENTICATION_TAG,
];

impl PaMessage {
    /// Whether `bytes` is a PCP message with opcode AUTHENTICATION (either
    /// direction), so a caller can route it here first.
    pub fn is_pa(bytes: &[u8]) -> bool {
        bytes.len() >= 2 && bytes[0] == VERSION && bytes[1] & 0x7f == Opcode::AUTHENTICATION.0
    }

    /// Reads a PA message. Structure only: which result codes and options
    /// a session accepts when is the holder's to decide.
    pub fn parse(bytes: &[u8]) -> Result<PaMessage, ParseError> {
        if bytes.len() < 2 {
            return Err(ParseError::Runt(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(bytes[0]));
        }
        if bytes[1] & 0x7f != Opcode::AUTHENTICATION.0 {
            return Err(ParseError::Malformed("not an AUTHENTICATION message"));
        }
        if bytes.len() > MAX_MESSAGE_LEN || !bytes.len().is_multiple_of(4) {
            return Err(ParseError::Malformed(
                "length over 1100 octets or not a multiple of 4",
            ));
        }
        if bytes.len() < PA_FIXED_LEN {
            return Err(ParseError::Malformed(
                "shorter than the AUTHENTICATION opcode's 8 octets",
            ));
        }
        let response = bytes[1] & 0x80 != 0;
        let word =
            |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut options = Vec::new();
        let mut rest = &bytes[PA_FIXED_LEN..];
        while !rest.is_empty() {
            let code = OptionCode(rest[0]);
            let malformed = |reason| ParseError::MalformedOption { code, reason };
            if rest.len() < 4 {
                return Err(malformed("option header truncated"));
            }
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let padded = (len + 3) & !3;
            if rest.len() - 4 < padded {
                return Err(malformed("option data overruns the message"));
            }
            if AT_MOST_ONCE.contains(&code) && options.iter().any(|o: &PaOption| o.code() == code) {
                return Err(malformed("option repeated (RFC 7652 section 5)"));
            }
            options.push(PaOption::parse(code, &rest[4..4 + len], response)?);
            rest = &rest[4 + padded..];
        }
        Ok(PaMessage {
            response,
            result: ResultCode(bytes[3]),
            lifetime: word(4),
            epoch: if response { word(8) } else { 0 },
            client_ip: if response {
                Ipv6Addr::UNSPECIFIED
            } else {
                ip_at(bytes, 8)
            },
            session_id: word(24),
            seq: word(28),
            options,
        })
    }

    /// Writes the message to `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.clear();
        out.push(VERSION);
        out.push(Opcode::AUTHENTICATION.0 | if self.response { 0x80 } else { 0 });
        out.push(0);
        out.push(self.result.0);
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        if self.response {
            out.extend_from_slice(&self.epoch.to_be_bytes());
            out.extend_from_slice(&[0; 12]);
        } else {
            out.extend_from_slice(&self.client_ip.octets());
        }
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        for o in &self.options {
            push_option(out, o.code(), &o.data())?;
        }
        if out.len() > MAX_MESSAGE_LEN {
            return Err(EncodeError::TooLong(out.len()));
        }
        Ok(())
    }

    /// The EAP packet it carries, if any.
    pub fn eap(&self) -> Option<&[u8]> {
        self.options.iter().find_map(|o| match o {
            PaOption::EapPayload(p) => Some(p.as_slice()),
            _ => None,
        })
    }

    /// Its NONCE, if any.
    pub fn nonce(&self) -> Option<u32> {
        self.options.iter().find_map(|o| match o {
            PaOption::Nonce(n) => Some(*n),
            _ => None,
        })
    }
}

fn push_option(out: &mut Vec<u8>, code: OptionCode, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::TooLong(data.len()))?;
    out.push(code.0);
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + ((4 - data.len() % 4) % 4), 0);
    Ok(())
}

/// The AUTHENTICATION_TAG of a MAP, PEER or ANNOUNCE message (RFC 7652
/// section 5.4), without its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonTag {
    /// The session.
    pub session_id: u32,
    /// The sender's sequence number for common messages (section 6.5).
    pub seq: u32,
    /// The transport key's id.
    pub key_id: u32,
}

/// Why a message's tag does not verify (RFC 7652 section 6.2: the message
/// is then discarded silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The message carries no tag.
    #[error("no authentication tag")]
    Missing,
    /// The message or its options do not parse far enough to find it.
    #[error("the message's options cannot be walked")]
    Malformed,
    /// Two tags.
    #[error("more than one authentication tag")]
    Repeated,
    /// A tag made with another key.
    #[error("tag of key {0}, not of this key")]
    OtherKey(u32),
    /// Authentication Data of the wrong length for the algorithm.
    #[error("authentication data of {0} octets")]
    WrongLength(usize),
    /// The MAC does not match.
    #[error("the MAC does not match")]
    Mismatch,
    /// The tagged message would exceed 1100 octets.
    #[error("no room for the tag within 1100 octets")]
    NoRoom,
}

/// Where the options of a PCP message start, by opcode (RFC 6887 sections
/// 11.1, 12.1, 14.1; RFC 7652 section 5.1; the GET opcode's 40 octets).
fn options_start(bytes: &[u8], cp: &CodePoints) -> Option<usize> {
    let op = Opcode(*bytes.get(1)? & 0x7f);
    let body = if op == Opcode::ANNOUNCE {
        0
    } else if op == Opcode::MAP {
        crate::MAP_BODY_LEN
    } else if op == Opcode::PEER {
        crate::PEER_BODY_LEN
    } else if op == Opcode::AUTHENTICATION {
        8
    } else if op == cp.get_opcode {
        crate::GET_BODY_LEN
    } else {
        return None;
    };
    let start = HEADER_LEN + body;
    (bytes.len() >= start).then_some(start)
}

/// The tag option of the message (AUTHENTICATION_TAG, or
/// PA_AUTHENTICATION_TAG for a PA message): the offset of its data and its
/// data length.
fn find_tag(bytes: &[u8], cp: &CodePoints) -> Result<(usize, usize), TagError> {
    let start = options_start(bytes, cp).ok_or(TagError::Malformed)?;
    let want = if bytes[1] & 0x7f == Opcode::AUTHENTICATION.0 {
        OptionCode::PA_AUTHENTICATION_TAG
    } else {
        OptionCode::AUTHENTICATION_TAG
    };
    let mut found = None;
    let mut at = start;
    while at < bytes.len() {
        if bytes.len() - at < 4 {
            return Err(TagError::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let padded = (len + 3) & !3;
        if bytes.len() - at - 4 < padded {
            return Err(TagError::Malformed);
        }
        if bytes[at] == want.0 {
            if found.is_some() {
                return Err(TagError::Repeated);
            }
            found = Some((at + 4, len));
        }
        at += 4 + padded;
    }
    found.ok_or(TagError::Missing)
}

/// The AUTHENTICATION_TAG fields of a common message, if it carries one.
pub fn common_tag(bytes: &[u8], cp: &CodePoints) -> Result<CommonTag, TagError> {
    let (at, len) = find_tag(bytes, cp)?;
    if bytes[1] & 0x7f == Opcode::AUTHENTICATION.0 {
        return Err(TagError::Missing);
    }
    if len < 12 {
        return Err(TagError::WrongLength(len.saturating_sub(12)));
    }
    let word = |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    Ok(CommonTag {
        session_id: word(at),
        seq: word(at + 4),
        key_id: word(at + 8),
    })
}

/// Tags a message (RFC 7652 section 6.1): appends AUTHENTICATION_TAG
/// (session, sequence number and key id; MAP, PEER, ANNOUNCE and GET) or,
/// for a PA message, PA_AUTHENTICATION_TAG (key id), with the
/// Authentication Data zero, computes the MAC over the whole message and
/// writes it in. `session` is `(session id, common sequence number)`,
/// ignored for a PA message, whose opcode fields carry both.
pub fn sign(
    msg: &mut Vec<u8>,
    key: &TagKey,
    session: (u32, u32),
    cp: &CodePoints,
) -> Result<(), TagError> {
    let start = options_start(msg, cp).ok_or(TagError::Malformed)?;
    let pa = msg[1] & 0x7f == Opcode::AUTHENTICATION.0;
    let mac_len = key.mac.tag_len();
    let fixed = if pa { 4 } else { 12 };
    if msg.len() + 4 + fixed + mac_len > MAX_MESSAGE_LEN || start > msg.len() {
        return Err(TagError::NoRoom);
    }
    let code = if pa {
        OptionCode::PA_AUTHENTICATION_TAG
    } else {
        OptionCode::AUTHENTICATION_TAG
    };
    msg.push(code.0);
    msg.push(0);
    msg.extend_from_slice(&((fixed + mac_len) as u16).to_be_bytes());
    if !pa {
        msg.extend_from_slice(&session.0.to_be_bytes());
        msg.extend_from_slice(&session.1.to_be_bytes());
    }
    msg.extend_from_slice(&key.key_id.to_be_bytes());
    let data_at = msg.len();
    msg.resize(data_at + mac_len, 0);
    let mac = key.compute(msg);
    msg[data_at..].copy_from_slice(&mac);
    Ok(())
}

/// Verifies a message's tag with `key` (RFC 7652 section 6.2): the key id
/// must be the key's, and the MAC over the message with its
/// Authentication Data zeroed must match, compared in constant time. The
/// caller has found the session (and checked its sequence numbers).
pub fn verify(msg: &[u8], key: &TagKey, cp: &CodePoints) -> Result<(), TagError> {
    let (at, len) = find_tag(msg, cp)?;
    let pa = msg[1] & 0x7f == Opcode::AUTHENTICATION.0;
    let fixed = if pa { 4 } else { 12 };
    if len < fixed {
        return Err(TagError::WrongLength(0));
    }
    let key_at = at + fixed - 4;
    let key_id = u32::from_be_bytes([
        msg[key_at],
        msg[key_at + 1],
        msg[key_at + 2],
        msg[key_at + 3],
    ]);
    if key_id != key.key_id {
        return Err(TagError::OtherKey(key_id));
    }
    let data = at + fixed..at + len;
    if data.len() != key.mac.tag_len() {
        return Err(TagError::WrongLength(data.len()));
    }
    let mut zeroed = msg.to_vec();
    zeroed[data.clone()].fill(0);
    let want = key.compute(&zeroed);
    let diff = want
        .iter()
        .zip(&msg[data])
        .fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff == 0 {
        Ok(())
    } else {
        Err(TagError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    //! Vectors written by hand from RFC 7652's figures; the key and MAC
    //! values were computed independently of this code (Python's `hmac`).
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn msk() -> Vec<u8> {
        (0u8..64).collect()
    }

    #[test]
    fn rfc7652_s4_transport_key_vector() {
        let k = transport_key(Prf::HmacSha256, &msk(), 1, 0x1122_3344, 1);
        assert_eq!(
            k,
            unhex("bf3fabd0d9b6014c68559f5dfc925b6f44a95fae1f87954eb377c57281ba6de4")
        );
        // Every input counts.
        assert_ne!(k, transport_key(Prf::HmacSha256, &msk(), 2, 0x1122_3344, 1));
        assert_ne!(k, transport_key(Prf::HmacSha256, &msk(), 1, 0x1122_3345, 1));
        assert_ne!(k, transport_key(Prf::HmacSha256, &msk(), 1, 0x1122_3344, 2));
        assert_eq!(transport_key(Prf::HmacSha512, &msk(), 1, 1, 1).len(), 64);
    }

    /// A PA-Initiation (section 3.1.1): INITIATION, session 0, sequence 0,
    /// a NONCE.
    const INITIATION: &str = "02 03 00 0e 00000000 00000000000000000000ffffc0000202 \
                              00000000 00000000 04 00 0004 11223344";

    #[test]
    fn rfc7652_s5_1_pa_initiation_vector() {
        let m = PaMessage::parse(&unhex(INITIATION)).unwrap();
        assert!(!m.response);
        assert_eq!(m.result, ResultCode::INITIATION);
        assert_eq!(m.client_ip, "::ffff:192.0.2.2".parse::<Ipv6Addr>().unwrap());
        assert_eq!((m.session_id, m.seq), (0, 0));
        assert_eq!(m.options, vec![PaOption::Nonce(0x1122_3344)]);
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(out, unhex(INITIATION));
    }

    /// The server's first answer (section 3.1.1): AUTHENTICATION_REQUEST,
    /// session 7, the nonce echoed, an EAP-Request/Identity (RFC 3748
    /// section 5.1: code 1, id 1, length 5, type 1), the PRF and MAC it
    /// offers, and an ID_INDICATOR.
    const FIRST_REQUEST: &str = "02 83 00 16 00000000 0000002a 000000000000000000000000 \
                                 00000007 00000000 \
                                 04 00 0004 11223344 \
                                 07 00 0005 0101000501 000000 \
                                 08 00 0004 00000005 \
                                 09 00 0004 0000000c \
                                 0c 00 000b 6578616d706c652e6e6574 00";

    #[test]
    fn rfc7652_s5_pa_server_vector_with_every_offer() {
        let m = PaMessage::parse(&unhex(FIRST_REQUEST)).unwrap();
        assert!(m.response);
        assert_eq!(m.result, ResultCode::AUTHENTICATION_REQUEST);
        assert_eq!(m.epoch, 42);
        assert_eq!((m.session_id, m.seq), (7, 0));
        assert_eq!(m.nonce(), Some(0x1122_3344));
        assert_eq!(m.eap(), Some(&[1u8, 1, 0, 5, 1][..]));
        assert_eq!(
            m.options[2..],
            [
                PaOption::Prf(Prf::HmacSha256.id()),
                PaOption::MacAlgorithm(MacAlgorithm::HmacSha256_128.id()),
                PaOption::IdIndicator("example.net".into()),
            ]
        );
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(out, unhex(FIRST_REQUEST));
    }

    #[test]
    fn rfc7652_s5_malformed_pa_messages() {
        let good = unhex(INITIATION);
        // Shorter than the opcode's 8 octets.
        assert!(matches!(
            PaMessage::parse(&good[..28]),
            Err(ParseError::Malformed(_))
        ));
        // NONCE of 3 octets.
        let mut bad = good.clone();
        bad[35] = 3;
        assert!(matches!(
            PaMessage::parse(&bad),
            Err(ParseError::MalformedOption {
                code: OptionCode::NONCE,
                ..
            })
        ));
        // Two NONCEs.
        let mut two = good.clone();
        two.extend_from_slice(&good[32..]);
        assert!(matches!(
            PaMessage::parse(&two),
            Err(ParseError::MalformedOption {
                code: OptionCode::NONCE,
                ..
            })
        ));
        // SESSION_LIFETIME and ID_INDICATOR are the server's to send.
        let mut req = good.clone();
        req.extend_from_slice(&unhex("0a 00 0004 00000e10"));
        assert!(PaMessage::parse(&req).is_err());
        // An option overrunning the message.
        let mut over = good;
        over[35] = 8;
        assert!(PaMessage::parse(&over).is_err());
    }

    fn key() -> TagKey {
        let k = transport_key(Prf::HmacSha256, &msk(), 1, 0x1122_3344, 1);
        TagKey::new(MacAlgorithm::HmacSha256_128, &k, 1).unwrap()
    }

    /// A MAP request (RFC 6887 section 11.1) from 192.0.2.2: TCP 8080,
    /// lifetime 3600, nonce 0x01.., suggesting nothing.
    const MAP: &str = "02 01 0000 00000e10 00000000000000000000ffffc0000202 \
                       010101010101010101010101 06 000000 1f90 0000 \
                       00000000000000000000000000000000";

    #[test]
    fn rfc7652_s6_1_tagged_map_vector() {
        let cp = CodePoints::default();
        let mut m = unhex(MAP);
        sign(&mut m, &key(), (1, 5), &cp).unwrap();
        // The tag: option 5, length 12 + 16, session 1, sequence 5, key 1,
        // then HMAC-SHA-256 of the message with those 16 octets zero,
        // truncated to 16 octets.
        assert_eq!(
            m[60..],
            unhex(
                "05 00 001c 00000001 00000005 00000001 \
                 f02b6e2c3e5e039cdbc03944fa79a877"
            )[..]
        );
        assert_eq!(
            common_tag(&m, &cp),
            Ok(CommonTag {
                session_id: 1,
                seq: 5,
                key_id: 1
            })
        );
        assert_eq!(verify(&m, &key(), &cp), Ok(()));
    }

    #[test]
    fn rfc7652_s6_2_any_change_fails_verification() {
        let cp = CodePoints::default();
        let mut base = unhex(MAP);
        // CHECKPOINT_REQUIRED (RFC 7767), then the tag.
        base.extend_from_slice(&unhex("c0 00 0000"));
        let mut m = base.clone();
        sign(&mut m, &key(), (1, 5), &cp).unwrap();
        assert_eq!(verify(&m, &key(), &cp), Ok(()));
        for i in 0..m.len() {
            for bit in 0..8 {
                let mut f = m.clone();
                f[i] ^= 1 << bit;
                assert!(verify(&f, &key(), &cp).is_err(), "octet {i} bit {bit}");
            }
        }
        // CHECKPOINT_REQUIRED stripped in flight (RFC 7767 section 5), the
        // length otherwise right: the tag no longer verifies.
        let mut stripped = unhex(MAP);
        stripped.extend_from_slice(&m[base.len()..]);
        assert_eq!(verify(&stripped, &key(), &cp), Err(TagError::Mismatch));
        // Another key, or none.
        let other = TagKey::new(
            MacAlgorithm::HmacSha256_128,
            &transport_key(Prf::HmacSha256, &msk(), 1, 0x1122_3344, 2),
            2,
        )
        .unwrap();
        assert_eq!(verify(&m, &other, &cp), Err(TagError::OtherKey(1)));
        assert_eq!(verify(&base, &key(), &cp), Err(TagError::Missing));
    }

    #[test]
    fn rfc7652_s5_5_a_tagged_pa_message_round_trips() {
        let cp = CodePoints::default();
        let mut m = Vec::new();
        PaMessage {
            response: true,
            result: ResultCode::AUTHENTICATION_SUCCEEDED,
            lifetime: 0,
            epoch: 100,
            client_ip: Ipv6Addr::UNSPECIFIED,
            session_id: 7,
            seq: 3,
            options: vec![PaOption::SessionLifetime(3600)],
        }
        .encode(&mut m)
        .unwrap();
        sign(&mut m, &key(), (0, 0), &cp).unwrap();
        let parsed = PaMessage::parse(&m).unwrap();
        assert!(matches!(
            parsed.options.last(),
            Some(PaOption::PaAuthenticationTag { key_id: 1, data }) if data.len() == 16
        ));
        assert_eq!(verify(&m, &key(), &cp), Ok(()));
        m[27] ^= 1; // the session id
        assert_eq!(verify(&m, &key(), &cp), Err(TagError::Mismatch));
        // A PA message's tag is no common tag.
        assert!(common_tag(&m, &cp).is_err());
    }

    #[test]
    fn rfc7652_s6_1_no_tag_beyond_1100_octets() {
        let cp = CodePoints::default();
        let mut m = unhex(MAP);
        // A DESCRIPTION that leaves less than the tag's 32 octets.
        let room = MAX_MESSAGE_LEN - m.len() - 4 - 28;
        m.extend_from_slice(&[0x80, 0, (room >> 8) as u8, room as u8]);
        m.resize(m.len() + room, b'x');
        assert_eq!(sign(&mut m, &key(), (1, 1), &cp), Err(TagError::NoRoom));
    }
}

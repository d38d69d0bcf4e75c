//! Open code points: each is a newtype over its wire byte, with named
//! constants for the values we know. Unknown values survive a round trip and
//! print their number.

use std::fmt;

macro_rules! code_point {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:expr, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u8);

        impl $name {
            $( $(#[$vmeta])* pub const $variant: $name = $name($value); )*

            /// The registered name of this code point, if this codec knows it.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some(stringify!($variant)), )*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }

        impl From<u8> for $name {
            fn from(v: u8) -> Self { $name(v) }
        }
        impl From<$name> for u8 {
            fn from(v: $name) -> u8 { v.0 }
        }
    };
}

code_point! {
    /// PCP opcode (RFC 6887 section 19.2; GET from the failure-scenarios draft).
    ///
    /// GET has no IANA value; [`Opcode::GET`] is our private-use default
    /// and servers and clients take the value from [`CodePoints`].
    Opcode {
        ANNOUNCE = 0,
        MAP = 1,
        PEER = 2,
        /// RFC 7652 section 5.1 (`crate::auth`).
        AUTHENTICATION = 3,
        /// Failure-scenarios draft section 4.1 (private-use default).
        GET = 96,
    }
}

code_point! {
    /// PCP option code (RFC 6887 section 19.3, RFC 7220, RFC 7652, RFC 7753,
    /// RFC 7767).
    OptionCode {
        THIRD_PARTY = 1,
        PREFER_FAILURE = 2,
        FILTER = 3,
        /// RFC 7652 section 5.3.
        NONCE = 4,
        /// RFC 7652 section 5.4: on MAP, PEER and ANNOUNCE messages.
        AUTHENTICATION_TAG = 5,
        /// RFC 7652 section 5.5: on PA messages.
        PA_AUTHENTICATION_TAG = 6,
        /// RFC 7652 section 5.6.
        EAP_PAYLOAD = 7,
        /// RFC 7652 section 5.7.
        PSEUDO_RANDOM_FUNCTION = 8,
        /// RFC 7652 section 5.8.
        MAC_ALGORITHM = 9,
        /// RFC 7652 section 5.9.
        SESSION_LIFETIME = 10,
        /// RFC 7652 section 5.10.
        RECEIVED_PAK = 11,
        /// RFC 7652 section 5.11.
        ID_INDICATOR = 12,
        /// Failure-scenarios draft section 4.4 (private-use default, mandatory range).
        NEXT = 96,
        DESCRIPTION = 128,
        PORT_SET = 130,
        CHECKPOINT_REQUIRED = 192,
    }
}

code_point! {
    /// PCP result code (RFC 6887 section 7.4; NONEXIST_MAP from the draft).
    ResultCode {
        SUCCESS = 0,
        UNSUPP_VERSION = 1,
        NOT_AUTHORIZED = 2,
        MALFORMED_REQUEST = 3,
        UNSUPP_OPCODE = 4,
        UNSUPP_OPTION = 5,
        MALFORMED_OPTION = 6,
        NETWORK_FAILURE = 7,
        NO_RESOURCES = 8,
        UNSUPP_PROTOCOL = 9,
        USER_EX_QUOTA = 10,
        CANNOT_PROVIDE_EXTERNAL = 11,
        ADDRESS_MISMATCH = 12,
        EXCESSIVE_REMOTE_PEERS = 13,
        /// RFC 7652 section 7 (14 to 23).
        INITIATION = 14,
        AUTHENTICATION_REQUIRED = 15,
        AUTHENTICATION_FAILED = 16,
        AUTHENTICATION_SUCCEEDED = 17,
        AUTHORIZATION_FAILED = 18,
        SESSION_TERMINATED = 19,
        UNKNOWN_SESSION_ID = 20,
        DOWNGRADE_ATTACK_DETECTED = 21,
        AUTHENTICATION_REQUEST = 22,
        AUTHENTICATION_REPLY = 23,
        /// Failure-scenarios draft section 4.2 (private-use default).
        NONEXIST_MAP = 192,
    }
}

code_point! {
    /// IANA protocol number as carried in MAP and PEER (RFC 6887 section 11.1).
    Protocol {
        /// "All protocols" (RFC 6887 section 11.1).
        ALL = 0,
        ICMP = 1,
        TCP = 6,
        UDP = 17,
        DCCP = 33,
        ICMPV6 = 58,
        SCTP = 132,
    }
}

impl OptionCode {
    /// Options 0-127 are mandatory to process, 128-255 optional
    /// (RFC 6887 section 7.3).
    pub fn is_mandatory(self) -> bool {
        self.0 < 128
    }
}

impl ResultCode {
    /// Whether this error tells the client the same request will keep failing
    /// for a long time (RFC 6887 section 7.4: "long lifetime" errors) rather
    /// than a short, transient one (NETWORK_FAILURE, NO_RESOURCES,
    /// USER_EX_QUOTA, CANNOT_PROVIDE_EXTERNAL; and RFC 7652's
    /// AUTHENTICATION_REQUIRED and UNKNOWN_SESSION_ID, which the client
    /// cures by authenticating, so they say nothing lasting: RFC 7652 gives
    /// them no lifetime).
    pub fn is_long_lifetime_error(self) -> bool {
        !matches!(self.0, 0 | 7 | 8 | 10 | 11 | 15 | 20)
    }
}

impl Protocol {
    /// Whether MAP/PEER of this protocol carry port numbers (RFC 6887
    /// section 11.1: for protocols without ports, the port fields are zero).
    pub fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 33 | 132)
    }
}

/// The code points of the failure-scenarios draft, which IANA never assigned.
///
/// Both sides must agree, so servers and clients read them from their
/// configuration; the defaults are from the private-use ranges
/// (see `docs/extensions.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePoints {
    /// GET opcode (draft section 4.1).
    pub get_opcode: Opcode,
    /// NEXT option, mandatory to process (draft section 4.4).
    pub next_option: OptionCode,
    /// NONEXIST_MAP result code (draft section 4.2).
    pub nonexist_map: ResultCode,
}

impl Default for CodePoints {
    fn default() -> Self {
        CodePoints {
            get_opcode: Opcode::GET,
            next_option: OptionCode::NEXT,
            nonexist_map: ResultCode::NONEXIST_MAP,
        }
    }
}

//! Address conventions of the wire format.
//!
//! RFC 6887 section 5: every address field is 128 bits and an IPv4 address
//! is written IPv4-mapped (`::ffff:a.b.c.d`); the all-zeros IPv4 address is
//! `::ffff:0.0.0.0`, and all 96 leading bits must be checked. The GET/NEXT
//! fields of the failure-scenarios draft (section 4.1) instead carry an
//! address family and, for IPv4, the 4 address octets followed by 96 zero
//! bits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IANA Address Family Number for IPv4 (as used by GET/NEXT).
pub const AF_IPV4: u8 = 1;
/// IANA Address Family Number for IPv6 (as used by GET/NEXT).
pub const AF_IPV6: u8 = 2;

/// Writes an address the RFC 6887 way (IPv4-mapped for IPv4).
pub fn to_wire(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Reads an RFC 6887 address field: IPv4-mapped becomes IPv4.
pub fn from_wire(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

/// Whether the field holds the unspecified address of either family
/// (`::` or `::ffff:0.0.0.0`, RFC 6887 section 5).
pub fn is_unspecified(ip: Ipv6Addr) -> bool {
    ip.is_unspecified() || ip.to_ipv4_mapped() == Some(Ipv4Addr::UNSPECIFIED)
}

/// Writes an address in the draft's GET/NEXT form: family and 128 bits,
/// IPv4 as 4 octets then 96 zero bits.
pub fn to_af_wire(ip: IpAddr) -> (u8, Ipv6Addr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (AF_IPV4, Ipv6Addr::from(b))
        }
        IpAddr::V6(v6) => (AF_IPV6, v6),
    }
}

/// Reads a GET/NEXT address: `Ok(None)` for family 0 (any), `Err` for an
/// unknown family or an IPv4 address whose trailing 96 bits are not zero.
pub fn from_af_wire(af: u8, ip: Ipv6Addr) -> Result<Option<IpAddr>, &'static str> {
    let b = ip.octets();
    match af {
        0 => Ok(None),
        AF_IPV4 => {
            if b[4..].iter().any(|&x| x != 0) {
                return Err("IPv4 address not followed by 96 zero bits");
            }
            Ok(Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))))
        }
        AF_IPV6 => Ok(Some(IpAddr::V6(ip))),
        _ => Err("unknown address family"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6887_s5_ipv4_is_mapped() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let w = to_wire(ip);
        assert_eq!(w.octets()[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(from_wire(w), ip);
        assert!(is_unspecified(to_wire("0.0.0.0".parse().unwrap())));
        assert!(is_unspecified(Ipv6Addr::UNSPECIFIED));
        assert!(!is_unspecified(w));
    }

    #[test]
    fn draft_s4_1_af_addresses() {
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let (af, w) = to_af_wire(ip);
        assert_eq!(af, AF_IPV4);
        assert_eq!(w.octets()[..4], [198, 51, 100, 1]);
        assert_eq!(from_af_wire(af, w), Ok(Some(ip)));
        assert_eq!(from_af_wire(0, w), Ok(None));
        assert!(from_af_wire(3, w).is_err());
        assert!(from_af_wire(AF_IPV4, to_wire(ip)).is_err());
    }
}

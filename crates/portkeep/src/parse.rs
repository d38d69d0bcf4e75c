//! Value parsers for the command line. Each error says what was expected;
//! clap adds which argument it was.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portkeep_proto::{Filter, Nonce, Protocol, NONCE_LEN, SERVER_PORT};

/// `tcp`, `udp`, another protocol name, `all` (0), or a number 0-255
/// (RFC 6887 section 11.1 carries the IANA protocol number).
pub fn protocol(s: &str) -> Result<Protocol, String> {
    let named = match s.to_ascii_lowercase().as_str() {
        "all" => Some(Protocol::ALL),
        "tcp" => Some(Protocol::TCP),
        "udp" => Some(Protocol::UDP),
        "sctp" => Some(Protocol::SCTP),
        "dccp" => Some(Protocol::DCCP),
        "icmp" => Some(Protocol::ICMP),
        "icmpv6" => Some(Protocol::ICMPV6),
        _ => None,
    };
    if let Some(p) = named {
        return Ok(p);
    }
    s.parse::<u8>().map(Protocol).map_err(|_| {
        "expected tcp, udp, sctp, dccp, icmp, icmpv6, all, or a protocol number 0-255".to_owned()
    })
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP meaning port 5351
/// (RFC 6887 section 19.1).
pub fn server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, SERVER_PORT))
        .map_err(|_| "expected IP, IP:PORT or [IPv6]:PORT".to_owned())
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`: an address and a port, 0 when
/// omitted (a GET filter's wildcard, failure-scenarios draft section 4.1).
pub fn endpoint(s: &str) -> Result<(IpAddr, u16), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port()));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| (ip, 0))
        .map_err(|_| "expected IP, IP:PORT or [IPv6]:PORT".to_owned())
}

/// Seconds, fractions allowed; 0 means no bound (RFC 6887 section 8.1.1,
/// MRD 0).
pub fn timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| "expected a number of seconds".to_owned())?;
    if !secs.is_finite() || secs < 0.0 {
        return Err("expected a non-negative number of seconds".to_owned());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "too many seconds".to_owned())
}

/// 24 hexadecimal digits: the 96-bit mapping nonce (RFC 6887 section 11.1).
pub fn nonce(s: &str) -> Result<Nonce, String> {
    let mut out = [0u8; NONCE_LEN];
    if s.len() != 2 * NONCE_LEN {
        return Err(format!(
            "expected {} hex digits (96 bits), got {} characters",
            2 * NONCE_LEN,
            s.chars().count()
        ));
    }
    hex::decode_to_slice(s, &mut out).map_err(|e| format!("not hexadecimal: {e}"))?;
    Ok(out)
}

/// A suggested external address: `IP:PORT`, `[IPv6]:PORT`, `IP` or `:PORT`
/// (RFC 6887 section 11.1: address and port are each a hint or zero).
pub fn suggest(s: &str) -> Result<(Option<IpAddr>, u16), String> {
    const WANT: &str = "expected IP:PORT, [IPv6]:PORT, IP or :PORT";
    if let Some(port) = s.strip_prefix(':') {
        return port
            .parse::<u16>()
            .map(|p| (None, p))
            .map_err(|_| WANT.to_owned());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((Some(sa.ip()), sa.port()));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| (Some(ip), 0))
        .map_err(|_| WANT.to_owned())
}

/// A remote peer: `IP:PORT` or `[IPv6]:PORT`.
pub fn remote(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| "expected IP:PORT or [IPv6]:PORT".to_owned())
}

/// `PREFIX/LEN[:PORT]` for FILTER (RFC 6887 section 13.3). An IPv4 length
/// counts IPv4 bits; the option carries it as the IPv4-mapped length (+96).
pub fn filter(s: &str) -> Result<Filter, String> {
    const WANT: &str = "expected PREFIX/LEN or PREFIX/LEN:PORT";
    let (ip, rest) = s.split_once('/').ok_or_else(|| WANT.to_owned())?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{WANT}: bad address"))?;
    let (len, port) = match rest.split_once(':') {
        Some((l, p)) => (l, Some(p)),
        None => (rest, None),
    };
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{WANT}: bad prefix length"))?;
    let port: u16 = match port {
        Some(p) => p.parse().map_err(|_| format!("{WANT}: bad port"))?,
        None => 0,
    };
    portkeep_client::filter(ip, len, port).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols() {
        assert_eq!(protocol("TCP"), Ok(Protocol::TCP));
        assert_eq!(protocol("udp"), Ok(Protocol::UDP));
        assert_eq!(protocol("all"), Ok(Protocol::ALL));
        assert_eq!(protocol("132"), Ok(Protocol::SCTP));
        assert!(protocol("256").is_err());
        assert!(protocol("tcpx").is_err());
    }

    #[test]
    fn rfc6887_s19_1_servers_default_to_port_5351() {
        assert_eq!(server("10.0.0.1"), Ok("10.0.0.1:5351".parse().unwrap()));
        assert_eq!(server("::1"), Ok("[::1]:5351".parse().unwrap()));
        assert_eq!(server("[::1]"), Ok("[::1]:5351".parse().unwrap()));
        assert_eq!(server("[::1]:6000"), Ok("[::1]:6000".parse().unwrap()));
        assert!(server("example").is_err());
        assert!(server("1.2.3.4:99999").is_err());
    }

    #[test]
    fn draft_s4_1_endpoints_default_to_port_0() {
        assert_eq!(endpoint("192.0.2.1"), Ok(("192.0.2.1".parse().unwrap(), 0)));
        assert_eq!(
            endpoint("192.0.2.1:80"),
            Ok(("192.0.2.1".parse().unwrap(), 80))
        );
        assert_eq!(
            endpoint("[2001:db8::1]:80"),
            Ok(("2001:db8::1".parse().unwrap(), 80))
        );
        assert_eq!(
            endpoint("2001:db8::1"),
            Ok(("2001:db8::1".parse().unwrap(), 0))
        );
        assert!(endpoint("nope").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(timeout("0"), Ok(Duration::ZERO));
        assert!(timeout("-1").is_err());
        assert!(timeout("NaN").is_err());
        assert!(timeout("inf").is_err());
        assert!(timeout("1e300").is_err());
    }

    #[test]
    fn rfc6887_s11_1_nonces_are_96_bits_of_hex() {
        assert_eq!(nonce("00112233445566778899aabb").unwrap()[11], 0xbb);
        assert!(nonce("00112233445566778899aab").is_err());
        assert!(nonce("00112233445566778899aabbcc").is_err());
        assert!(nonce("0011223344556677889zaabb").is_err());
        // Multi-byte characters must not trip a byte-length check.
        assert!(nonce("ééééééééééé").is_err());
        assert!(nonce("éééééééééééé").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("198.51.100.1:80"),
            Ok((Some("198.51.100.1".parse().unwrap()), 80))
        );
        assert_eq!(suggest(":80"), Ok((None, 80)));
        assert_eq!(
            suggest("198.51.100.1"),
            Ok((Some("198.51.100.1".parse().unwrap()), 0))
        );
        assert_eq!(
            suggest("2001:db8::1"),
            Ok((Some("2001:db8::1".parse().unwrap()), 0))
        );
        assert_eq!(
            suggest("[2001:db8::1]:443"),
            Ok((Some("2001:db8::1".parse().unwrap()), 443))
        );
        assert!(suggest(":x").is_err());
        assert!(suggest("host:80").is_err());
    }

    #[test]
    fn rfc6887_s13_3_filters() {
        let f = filter("198.51.100.0/24:443").unwrap();
        assert_eq!((f.prefix_len, f.remote_port), (120, 443));
        assert_eq!(
            f.remote_ip,
            "::ffff:198.51.100.0".parse::<std::net::Ipv6Addr>().unwrap()
        );
        let f = filter("2001:db8::/32").unwrap();
        assert_eq!((f.prefix_len, f.remote_port), (32, 0));
        let f = filter("[2001:db8::]/48:22").unwrap();
        assert_eq!((f.prefix_len, f.remote_port), (48, 22));
        assert!(filter("198.51.100.0/33").is_err());
        assert!(filter("198.51.100.0").is_err());
        assert!(filter("x/8").is_err());
        assert!(filter("10.0.0.0/8:x").is_err());
    }
}

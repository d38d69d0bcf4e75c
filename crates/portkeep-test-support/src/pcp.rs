//! Raw PCP over real UDP sockets: requests built by hand, one exchange at
//! a time, and the client's epoch check (RFC 6887 section 8.5).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use portkeep_client::{EpochTracker, EpochVerdict, RequestBuilder};
use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader, Response,
};

use crate::process::now;

/// 127.0.0.1.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// ::1.
pub const LOCALHOST6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// An IP address from its text.
pub fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A UDP port that was free on `ip` a moment ago.
pub fn free_port(ip: IpAddr) -> u16 {
    UdpSocket::bind(SocketAddr::new(ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"))
}

/// A port free for both UDP and TCP on `ip`, below the kernel's ephemeral
/// range, for a daemon that is restarted on the same address.
///
/// A port from [`free_port`] lies inside the ephemeral range, so between a
/// kill and the restart any socket of a test running alongside may be handed
/// it by the kernel; no socket bound to port 0 is ever given one below it.
/// Ports are spread by process id and handed out once per process, so test
/// binaries and tests in one binary do not pick the same one.
pub fn restartable_port(ip: IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low = ephemeral_low().clamp(2048, 65535);
    let span = low - 1024;
    let base = (std::process::id() % 97) as u16 * (span / 97);
    for _ in 0..span {
        let p = 1024 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let udp = UdpSocket::bind((ip, p)).is_ok();
        let tcp = std::net::TcpListener::bind((ip, p)).is_ok();
        if udp && tcp {
            return p;
        }
    }
    panic!("no free port on {ip} below the ephemeral range (from {low})")
}

/// The first port of `net.ipv4.ip_local_port_range` (Linux's default 32768
/// when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Whether `addr` can be bound right now (the socket is closed again).
pub fn bindable(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_ok()
}

/// A MAP request for TCP `port` on behalf of `client`, with
/// CHECKPOINT_REQUIRED (RFC 7767) if `checkpoint`.
pub fn map_request(
    client: IpAddr,
    port: u16,
    lifetime: u32,
    nonce: [u8; 12],
    checkpoint: bool,
) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce,
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: if checkpoint {
            vec![PcpOption::CheckpointRequired]
        } else {
            vec![]
        },
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

/// An ANNOUNCE request from `client`.
pub fn announce_request(client: IpAddr) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: 0,
            client_ip: to_wire(client),
        },
        data: OpData::Announce,
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

/// Sends `req` once from `sock` and waits for its reply within the
/// socket's timeout (no retransmission: load tests must notice the moment
/// a daemon dies). Datagrams from elsewhere, and late replies to earlier
/// requests, are skipped: for MAP the reply must carry this request's nonce
/// and internal port (RFC 6887 section 11.4).
pub fn exchange_once(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Option<Response> {
    let sent = Request::parse(req, &CodePoints::default()).ok()?;
    sock.send_to(req, server).ok()?;
    let mut buf = [0u8; 1100];
    loop {
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        if from != server {
            continue;
        }
        let Ok(r) = Response::parse(&buf[..n], &CodePoints::default()) else {
            continue;
        };
        match (sent.data.map_part(), r.data.map_part()) {
            (Some(a), Some(b)) if a.nonce != b.nonce || a.internal_port != b.internal_port => {
                continue
            }
            (Some(_), None) => continue,
            _ => return Some(r),
        }
    }
}

/// The epoch check of RFC 6887 section 8.5: an ANNOUNCE from `client` to
/// `server` (answered within `timeout`), its epoch fed to `tracker`.
pub fn epoch_check(
    tracker: &mut EpochTracker,
    server: SocketAddr,
    client: IpAddr,
    timeout: Duration,
) -> EpochVerdict {
    let sock = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    sock.set_read_timeout(Some(timeout)).unwrap();
    let r = exchange_once(&sock, server, &announce_request(client)).expect("ANNOUNCE answered");
    tracker.observe(now(), r.header.epoch)
}

/// One request/response exchange from a socket bound to `src`, with up to
/// three transmissions (UDP on loopback rarely loses anything, but may).
/// Returns the raw response and the address it came from.
pub fn exchange(src: IpAddr, server: SocketAddr, datagram: &[u8]) -> (Vec<u8>, SocketAddr) {
    let sock = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    for _ in 0..3 {
        sock.send_to(datagram, server).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            return (buf[..n].to_vec(), from);
        }
    }
    panic!(
        "no answer from {server} to a {}-octet request from {src}",
        datagram.len()
    )
}

/// Sends the request built from `builder` as client `src` and parses the
/// answer, checking it came from `server`.
pub fn request(src: IpAddr, server: SocketAddr, builder: &RequestBuilder) -> Response {
    let req = builder.build(src).unwrap();
    request_raw(src, server, &req)
}

/// Sends `req` (its header may lie about the client) from `src`.
pub fn request_raw(src: IpAddr, server: SocketAddr, req: &Request) -> Response {
    let cp = CodePoints::default();
    let (bytes, from) = exchange(src, server, &req.to_bytes(&cp).unwrap());
    assert_eq!(from, server, "answer from another address than the server");
    Response::parse(&bytes, &cp).unwrap()
}

//! A hostile load for a PCP server: what the flood test and
//! `portkeep-bench --flood` send at a server while a well-behaved client
//! maps and renews.
//!
//! Five kinds of datagram, in turn, from many loopback sources (each its
//! own subscriber under the default keying):
//!
//! - **random** octets, 0 to 1,200 of them (version and opcode bytes
//!   anything);
//! - **quota-exhausting MAPs**: each source asks for new internal ports
//!   with the longest lifetime, until its quota runs out (and the server's
//!   capacity, where the quotas add up to more: RFC 6887 section 17.2's
//!   attack, one subscriber holding what others need);
//! - **NEXT walks**: GET with NEXT from sources that hold mappings
//!   (failure-scenarios draft section 4: each answer is as large as a
//!   response may be);
//! - **oversized** requests: a valid MAP header followed by filler, 1,101
//!   to 1,500 octets (RFC 6887 section 7: at most 1,100);
//! - **THIRD_PARTY** MAPs naming another host from sources the server
//!   does not authorise (RFC 6887 section 13.1: NOT_AUTHORIZED, an error
//!   reply the error limiter bounds).
//!
//! Replies are never read: they pile up in the sources' receive buffers
//! and the kernel drops them, as a flooder's would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, GetData, MapData, Next, NextItems, OpData, PcpOption, Protocol, Request,
    RequestHeader,
};

use crate::process::now;

/// What to send, and how fast.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The server.
    pub server: SocketAddr,
    /// Index of the first source (127.2.0.1 is index 0); flooders in
    /// several threads take disjoint ranges.
    pub first_source: u16,
    /// Sources, one socket each, from `first_source` on.
    pub sources: u16,
    /// Datagrams per second in all; `None`: as fast as one thread sends.
    pub rate: Option<f64>,
}

/// The kinds of datagram, in the order sent.
pub const KINDS: [&str; 5] = [
    "random",
    "quota_map",
    "next_walk",
    "oversized",
    "third_party",
];

/// What a flood sent.
#[derive(Debug, Clone, Default)]
pub struct FloodStats {
    /// Datagrams sent, by [`KINDS`].
    pub sent: [u64; 5],
    /// Sends the kernel refused (a full socket buffer).
    pub send_errors: u64,
}

impl FloodStats {
    /// Datagrams sent in all.
    pub fn total(&self) -> u64 {
        self.sent.iter().sum()
    }
}

/// A xorshift generator: the flood is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn source_ip(i: u16) -> IpAddr {
    let n = u32::from(i) + 1;
    IpAddr::V4(Ipv4Addr::new(127, 2, (n >> 8) as u8, n as u8))
}

fn map(client: IpAddr, port: u16, nonce: u8, options: Vec<PcpOption>) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: u32::MAX,
            client_ip: to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce: [nonce; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options,
    }
    .to_bytes(&CodePoints::default())
    .expect("a MAP encodes")
}

fn next_walk(client: IpAddr) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: 0,
            client_ip: to_wire(client),
        },
        data: OpData::Get(GetData {
            protocol: Protocol::ALL,
            internal_af: 0,
            external_af: 0,
            internal_ip: Ipv6Addr::UNSPECIFIED,
            external_ip: Ipv6Addr::UNSPECIFIED,
            internal_port: 0,
            external_port: 0,
        }),
        options: vec![PcpOption::Next(Next {
            protocol: Protocol::ALL,
            internal_af: 0,
            external_af: 0,
            more_end: 0,
            internal_ip: Ipv6Addr::UNSPECIFIED,
            external_ip: Ipv6Addr::UNSPECIFIED,
            lifetime: 0,
            internal_port: 0,
            external_port: 0,
            items: NextItems::Codes(Vec::new()),
        })],
    }
    .to_bytes(&CodePoints::default())
    .expect("a GET encodes")
}

/// Sends the flood until `stop` is set; blocks the calling thread.
pub fn flood(cfg: &FloodConfig, stop: &AtomicBool) -> FloodStats {
    let socks: Vec<(IpAddr, UdpSocket)> = (0..cfg.sources.max(1))
        .map(|i| {
            let i = cfg.first_source.saturating_add(i);
            let ip = source_ip(i);
            let s = UdpSocket::bind(SocketAddr::new(ip, 0))
                .unwrap_or_else(|e| panic!("cannot bind a flood source on {ip}: {e}"));
            s.set_nonblocking(true).expect("non-blocking");
            (ip, s)
        })
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut stats = FloodStats::default();
    // The next internal port each source asks for.
    let mut next_port = vec![1u16; socks.len()];
    let started = now();
    let mut buf = Vec::with_capacity(1600);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if let Some(rate) = cfg.rate {
            // Paced: never ahead of `rate`; checked every 64 datagrams.
            if i.is_multiple_of(64) {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                if stats.total() >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
            }
        }
        let src = i % socks.len();
        let (ip, sock) = &socks[src];
        let kind = (i / socks.len()) % KINDS.len();
        buf.clear();
        match kind {
            0 => {
                let n = (rng.next() % 1201) as usize;
                buf.extend((0..n).map(|_| rng.next() as u8));
            }
            1 => {
                let p = next_port[src];
                next_port[src] = p.checked_add(1).unwrap_or(1);
                buf.extend_from_slice(&map(*ip, p, src as u8, vec![]));
            }
            2 => buf.extend_from_slice(&next_walk(*ip)),
            3 => {
                buf.extend_from_slice(&map(*ip, 9, src as u8, vec![]));
                let n = 1101 + (rng.next() % 400) as usize;
                buf.resize(n, 0);
            }
            _ => {
                let other = IpAddr::V4(Ipv4Addr::new(10, 9, 8, (rng.next() % 250) as u8 + 1));
                buf.extend_from_slice(&map(
                    *ip,
                    (rng.next() % 60000) as u16 + 1,
                    7,
                    vec![PcpOption::ThirdParty(to_wire(other))],
                ));
            }
        }
        match sock.send_to(&buf, cfg.server) {
            Ok(_) => stats.sent[kind] += 1,
            Err(_) => stats.send_errors += 1,
        }
        i += 1;
    }
    stats
}

/// The resident set of process `pid` now and at its peak, in KiB
/// (`VmRSS`, `VmHWM` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

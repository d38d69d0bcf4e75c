//! `--walk`: the GET/NEXT walk benchmark (target: walking 100,000
//! mappings of one client over loopback in under a second).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use portkeep_client::{GetFilter, Walker};
use portkeep_proto::{CodePoints, Protocol, Response, ResultCode};

use crate::{map_request, now, INTERNAL_PORT_AT, NONCE_AT};

/// Internal ports per protocol: TCP first, then UDP.
const PORTS: usize = 50_000;

/// Creates `n` mappings for 127.1.0.1, keeping a window of requests in
/// flight.
fn create(sock: &UdpSocket, ip: Ipv4Addr, n: usize) -> anyhow::Result<Duration> {
    let start = now();
    let mut pending: VecDeque<usize> = VecDeque::new();
    let mut next = 0;
    let mut done = 0;
    let mut buf = [0u8; 1100];
    let mut template = map_request(ip, 0, 1024, false);
    while done < n {
        while next < n && pending.len() < 128 {
            let port = u16::try_from(1024 + next % PORTS)?;
            let proto = if next < PORTS {
                Protocol::TCP
            } else {
                Protocol::UDP
            };
            template[INTERNAL_PORT_AT..INTERNAL_PORT_AT + 2].copy_from_slice(&port.to_be_bytes());
            // The MAP body (RFC 6887 section 11.1): protocol after the nonce.
            template[NONCE_AT + 12] = proto.0;
            template[NONCE_AT + 8..NONCE_AT + 10].copy_from_slice(&port.to_be_bytes());
            template[NONCE_AT + 10] = proto.0;
            sock.send(&template)?;
            pending.push_back(next);
            next += 1;
        }
        match sock.recv(&mut buf) {
            Ok(len) if len >= 4 => {
                if buf[3] != 0 {
                    bail!("MAP failed with result {}", buf[3]);
                }
                pending.pop_front();
                done += 1;
            }
            Ok(_) => {}
            Err(_) => bail!("MAP responses lost ({done} of {n} created)"),
        }
    }
    Ok(start.elapsed())
}

pub(crate) fn run(server: SocketAddr, n: usize, json: bool) -> anyhow::Result<()> {
    if n > 2 * PORTS {
        bail!("--walk is at most {}", 2 * PORTS);
    }
    let ip = Ipv4Addr::new(127, 1, 0, 1);
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .with_context(|| format!("cannot bind {ip}"))?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(1 << 22);
    let create_t = create(&sock, ip, n)?;

    let cp = CodePoints::default();
    let mut walker = Walker::new(GetFilter::default());
    let mut buf = [0u8; 1100];
    let mut got = 0usize;
    let mut retransmissions = 0u32;
    let start: Instant = now();
    while let Some(req) = walker.request(IpAddr::V4(ip)) {
        let bytes = req.to_bytes(&cp)?;
        let resp = loop {
            sock.send(&bytes)?;
            match sock.recv(&mut buf) {
                Ok(len) => break Response::parse(&buf[..len], &cp)?,
                // RFC 6887 section 8.1.1: resend the identical request.
                Err(_) => retransmissions += 1,
            }
        };
        if resp.header.result != ResultCode::SUCCESS && resp.header.result != cp.nonexist_map {
            bail!("GET failed with result {}", resp.header.result);
        }
        got += walker.handle(&resp, &cp)?.len();
    }
    let walk_t = start.elapsed();
    if got != n {
        bail!("walk returned {got} mappings, expected {n}");
    }
    let out = serde_json::json!({
        "server": server.to_string(),
        "mappings": n,
        "create_seconds": create_t.as_secs_f64(),
        "walk_seconds": walk_t.as_secs_f64(),
        "get_requests": walker.requests(),
        "retransmissions": retransmissions,
        "mappings_per_second": (n as f64 / walk_t.as_secs_f64()).round(),
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "portkeep-bench --walk against {server}: {n} mappings of one client created in {:.2} s; \
             walked in {:.3} s with {} GET requests ({} retransmissions)",
            create_t.as_secs_f64(),
            walk_t.as_secs_f64(),
            walker.requests(),
            retransmissions
        );
    }
    Ok(())
}

//! [`Client::walk`] and [`Client::get_mapping`] (GET / NEXT, PCP
//! failure-scenarios draft section 4) against the real server core behind
//! a UDP socket on 127.0.0.1, with a lossy path to exercise the
//! retransmission of GET transactions (RFC 6887 section 8.1.1).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portkeep_client::{
    Client, ClientConfig, GetFilter, RequestBuilder, RequestOptions, RetransmitParams,
};
use portkeep_proto::{OptionCode, Protocol};
use portkeep_server::{Outcome, Server, ServerConfig, Timestamp};
use tokio::net::UdpSocket;

/// Serves the core on 127.0.0.1; drops every `drop_every`-th datagram
/// (0: none). Returns the address and the count of datagrams seen.
async fn serve(drop_every: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        let cfg = ServerConfig {
            external_addresses: vec!["192.0.2.1".parse().unwrap()],
            ..ServerConfig::default()
        };
        let mut server = Server::new(cfg, Timestamp(0));
        let mut buf = [0u8; 2048];
        let mut out = Vec::new();
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let k = count.fetch_add(1, Ordering::Relaxed) + 1;
            if drop_every != 0 && k.is_multiple_of(drop_every) {
                continue;
            }
            if server.handle(Timestamp(1000), from, &buf[..n], &mut out) == Outcome::Reply {
                let _ = sock.send_to(&out, from).await;
            }
        }
    });
    (addr, seen)
}

fn fast() -> ClientConfig {
    ClientConfig {
        retransmit: RetransmitParams {
            irt: Duration::from_millis(20),
            mrt: Duration::from_millis(100),
            mrc: 0,
            mrd: Duration::from_secs(10),
        },
        ..ClientConfig::default()
    }
}

/// Draft section 4.5/4.6 over a lossy path: the walk returns each of the
/// client's 300 mappings exactly once, in the server's order, with their
/// DESCRIPTION embedded, although some GETs had to be retransmitted.
#[tokio::test]
async fn draft_s4_5_walk_over_loopback_returns_each_mapping_once() {
    let (addr, seen) = serve(7).await;
    let client = Client::connect_with(addr, fast()).await.unwrap();
    let opts = RequestOptions::default();
    for p in 0..300u16 {
        let b = RequestBuilder::map(Protocol::UDP, 5000 + p).description(format!("m{p}"));
        client.send(&b, opts).await.unwrap();
    }
    let before = seen.load(Ordering::Relaxed);
    let filter = GetFilter {
        options: vec![OptionCode::DESCRIPTION],
        ..GetFilter::default()
    };
    let mut walk = client.walk(filter, opts);
    let mut got = Vec::new();
    while let Some(m) = walk.next().await {
        got.push(m.unwrap());
    }
    let requests = walk.requests();
    let ports: Vec<u16> = got.iter().map(|m| m.internal.port()).collect();
    assert_eq!(ports, (5000..5300).collect::<Vec<_>>());
    for m in &got {
        assert_eq!(
            m.description(),
            Some(format!("m{}", m.internal.port() - 5000).as_str())
        );
        assert_eq!(m.internal.ip(), client.client_ip());
        assert!(m.lifetime > 0);
    }
    let unique: HashSet<_> = got.iter().map(|m| m.internal).collect();
    assert_eq!(unique.len(), 300);
    let sent = seen.load(Ordering::Relaxed) - before;
    assert!(
        sent > requests as usize,
        "some GETs were lost and retransmitted ({sent} sent, {requests} GETs)"
    );
}

/// Draft section 4.5, "pure" GET: one mapping by filter, `None` for
/// NONEXIST_MAP; a walk with nothing to return ends at once.
#[tokio::test]
async fn draft_s4_5_pure_get_over_loopback() {
    let (addr, _) = serve(0).await;
    let client = Client::connect_with(addr, fast()).await.unwrap();
    let opts = RequestOptions::default();
    assert!(client
        .walk(GetFilter::all(), opts)
        .collect()
        .await
        .unwrap()
        .is_empty());
    let reply = client
        .send(&RequestBuilder::map(Protocol::TCP, 8080), opts)
        .await
        .unwrap();
    let filter = |port| GetFilter {
        protocol: Protocol::TCP,
        internal_port: port,
        ..GetFilter::all()
    };
    let m = client
        .get_mapping(&filter(8080), opts)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.protocol, Protocol::TCP);
    assert_eq!(m.internal, SocketAddr::new(client.client_ip(), 8080));
    assert_eq!(Some(m.external), reply.external());
    assert!(client
        .get_mapping(&filter(8081), opts)
        .await
        .unwrap()
        .is_none());
}

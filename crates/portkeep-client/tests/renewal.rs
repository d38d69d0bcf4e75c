//! The renewal API against the real server core (RFC 7767 section 3.2):
//! a mapping whose CHECKPOINT_REQUIRED was refused wins it at a later
//! renewal once resources free up, and gives it up when renewed without.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portkeep_client::{Client, ClientError, RequestBuilder, RequestOptions};
use portkeep_proto::{CodePoints, PcpOption, Protocol, Request};
use portkeep_server::{
    BackupState, CheckpointClass, CheckpointMode, CheckpointPolicy, Outcome, RateLimit, Server,
    ServerConfig, Timestamp,
};
use tokio::net::UdpSocket;

/// The core behind a loopback socket, on a clock the test moves.
struct Fixture {
    addr: SocketAddr,
    clock: Arc<AtomicU64>,
    server: Arc<Mutex<Server>>,
    seen: Arc<Mutex<Vec<Request>>>,
}

async fn fixture() -> Fixture {
    let cfg = ServerConfig {
        checkpoint: CheckpointPolicy {
            max_mappings: 100,
            classes: vec![CheckpointClass {
                name: "silver".into(),
                mode: CheckpointMode::OnRequest,
                max: Some(8),
                rate: Some(RateLimit {
                    count: 1,
                    per: Duration::from_secs(1),
                    burst: 1,
                }),
            }],
            default_class: 0,
            assign: Vec::new(),
        },
        ..ServerConfig::default()
    };
    let clock = Arc::new(AtomicU64::new(1_000_000));
    let mut core = Server::new(cfg, Timestamp(clock.load(Ordering::SeqCst)));
    core.set_backup_state(BackupState::InSync);
    let server = Arc::new(Mutex::new(core));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let (c, s, l) = (clock.clone(), server.clone(), seen.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let mut out = Vec::new();
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if let Ok(r) = Request::parse(&buf[..n], &CodePoints::default()) {
                l.lock().unwrap().push(r);
            }
            let now = Timestamp(c.load(Ordering::SeqCst));
            let outcome = s.lock().unwrap().handle(now, from, &buf[..n], &mut out);
            if outcome == Outcome::Reply {
                let _ = sock.send_to(&out, from).await;
            }
        }
    });
    Fixture {
        addr,
        clock,
        server,
        seen,
    }
}

fn opts() -> RequestOptions {
    RequestOptions {
        max_duration: Some(Duration::from_secs(5)),
        ..RequestOptions::default()
    }
}

fn flags(f: &Fixture) -> Vec<(u16, bool)> {
    let mut v: Vec<(u16, bool)> = f
        .server
        .lock()
        .unwrap()
        .mappings()
        .iter()
        .map(|m| (m.key.internal_port, m.checkpoint))
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test]
async fn rfc7767_s3_2_a_later_renewal_wins_the_checkpoint() {
    let f = fixture().await;
    let client = Client::connect(f.addr).await.unwrap();
    let first = client
        .create(
            &RequestBuilder::map(Protocol::TCP, 8080).checkpoint_required(),
            opts(),
        )
        .await
        .unwrap();
    assert!(first.checkpoint_honoured());
    // Burst of 1 spent: the second mapping is made but not protected.
    let mut second = client
        .create(
            &RequestBuilder::map(Protocol::TCP, 8081).checkpoint_required(),
            opts(),
        )
        .await
        .unwrap();
    assert!(second.checkpoint_requested());
    assert!(!second.checkpoint_honoured());
    assert_eq!(flags(&f), vec![(8080, true), (8081, false)]);
    // A second later the bucket has a token: the renewal wins it.
    f.clock.fetch_add(1000, Ordering::SeqCst);
    let external = second.external();
    assert!(client.renew(&mut second, opts()).await.unwrap());
    assert!(second.checkpoint_honoured());
    assert_eq!(second.external(), external, "same mapping");
    assert_eq!(flags(&f), vec![(8080, true), (8081, true)]);
    // The renewal resent the same nonce and the option.
    let seen = f.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1], seen[2], "a renewal is the same request again");
    assert!(seen[2].options.contains(&PcpOption::CheckpointRequired));
}

#[tokio::test]
async fn rfc7767_s3_2_renewal_without_the_option_gives_it_up() {
    let f = fixture().await;
    let client = Client::connect(f.addr).await.unwrap();
    let mut m = client
        .create(
            &RequestBuilder::map(Protocol::UDP, 5353).checkpoint_required(),
            opts(),
        )
        .await
        .unwrap();
    assert!(m.checkpoint_honoured());
    m.set_checkpoint(false);
    assert!(!client.renew(&mut m, opts()).await.unwrap());
    assert!(!m.checkpoint_requested());
    assert_eq!(flags(&f), vec![(5353, false)]);
    // Delete through the handle.
    let del = m.delete_request().unwrap();
    client.send(&del, opts()).await.unwrap();
    assert!(flags(&f).is_empty());
}

#[tokio::test]
async fn create_refuses_requests_that_make_no_mapping() {
    let f = fixture().await;
    let client = Client::connect(f.addr).await.unwrap();
    let err = client
        .create(&RequestBuilder::announce(), opts())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotAMapping { .. }), "{err}");
}
